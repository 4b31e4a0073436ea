"""Warp kernels, one file per concern, generated once per scalar type.

The kernels of one dtype live in two Warp modules: ``diffsim_float32`` holds every
kernel a rollout and its gradient need (the backward ones derived by hand), built by
:func:`kernels_for`; ``diffsim_float32_grad`` holds the kernels Warp differentiates,
built by :func:`grad_kernels_for` on the first ``forces()`` or energy gradient. So a
process builds, compiles (or loads from the kernel cache) only what it uses. Nothing
depends on the mesh or on parameter values, so nothing recompiles when they change.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace


def _scalar(scalar):
    import warp as wp

    if scalar not in (wp.float32, wp.float64):
        raise ValueError(f"Warp kernels exist for wp.float32 and wp.float64, not {scalar}")
    return scalar


@functools.cache
def kernels_for(scalar) -> SimpleNamespace:
    """The forward kernels and Warp types for ``wp.float32`` or ``wp.float64``."""
    import warp as wp

    from diffsim.kernels.advance import build_advance
    from diffsim.kernels.elastic import build_elastic
    from diffsim.kernels.force_vjp import build_force_vjp
    from diffsim.kernels.integrate import build_integrate

    scalar = _scalar(scalar)
    module = f"diffsim_{scalar.__name__}"
    elastic = build_elastic(scalar, module, differentiable=False)
    integrate = build_integrate(scalar, module, differentiable=False)
    force_vjp = build_force_vjp(scalar, module, elastic)
    kernels = SimpleNamespace(
        scalar=scalar,
        vec3=wp.types.vector(3, scalar),
        position=wp.vec3d,  # positions are float64 for every scalar type (precision rule)
        mat33=wp.types.matrix((3, 3), scalar),
        **vars(elastic),
        **vars(force_vjp),
        **vars(integrate),
        **vars(build_advance(scalar, module, elastic, integrate, force_vjp)),
    )
    wp.get_module(module).options["enable_backward"] = False  # no adjoint code to compile
    return kernels


@functools.cache
def grad_kernels_for(scalar) -> SimpleNamespace:
    """The kernels launched with ``adjoint=True``: ``total_forces``, ``tet_energy`` and the
    reference ``tet_forces`` the hand-derived force VJP is tested against (built on first
    use)."""
    from diffsim.kernels.elastic import build_elastic
    from diffsim.kernels.integrate import build_integrate

    scalar = _scalar(scalar)
    module = f"diffsim_{scalar.__name__}_grad"
    return SimpleNamespace(
        **vars(build_elastic(scalar, module, differentiable=True)),
        **vars(build_integrate(scalar, module, differentiable=True)),
    )


@functools.cache
def contact_advance_for(scalar) -> SimpleNamespace:
    """The fused contact substeps (:mod:`diffsim.kernels.contact_advance`) in a module of
    their own, ``diffsim_float32_contact``, built on first use (a run without surface
    contact never compiles them)."""
    from diffsim.kernels.contact import contact_kernels
    from diffsim.kernels.contact_advance import build_contact_advance

    scalar = _scalar(scalar)
    module = f"diffsim_{scalar.__name__}_contact"
    forward = kernels_for(scalar)
    return build_contact_advance(scalar, module, forward, forward, contact_kernels(scalar))


def build_every_kernel() -> list[str]:
    """Builds (without compiling) every kernel of diffsim, for both scalar types.

    Returns:
        The names of the Warp modules that hold them, the slowest to compile first.
    """
    import warp as wp

    from diffsim.kernels import intersections  # noqa: F401 - its kernel
    from diffsim.kernels.broad_phase import broad_phase_kernels
    from diffsim.kernels.contact import contact_kernels
    from diffsim.kernels.inversion import inversion_kernels
    from diffsim.kernels.runtime import init_warp

    init_warp()
    for scalar, vec3 in ((wp.float32, wp.vec3f), (wp.float64, wp.vec3d)):
        kernels_for(scalar)
        grad_kernels_for(scalar)
        contact_advance_for(scalar)
        contact_kernels(scalar)
        broad_phase_kernels(scalar)
        inversion_kernels(vec3)
    # Seconds each took to compile for the CPU, measured (Warp 1.19, one core): the fused
    # contact substeps 44-45, broad phase 18, contact 17, the others 1-14.
    return [
        "diffsim_float32_contact",
        "diffsim_float64_contact",
        "diffsim.kernels.broad_phase",
        "diffsim.kernels.contact",
        "diffsim_float32",
        "diffsim_float64",
        "diffsim_float32_grad",
        "diffsim_float64_grad",
        "diffsim.kernels.inversion",
        "diffsim.kernels.intersections",
    ]
