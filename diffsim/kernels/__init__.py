"""Warp kernels, one file per concern, generated once per scalar type.

The kernels of one dtype live in two Warp modules: ``diffsim_float32`` holds the
forward-only kernels a rollout needs, ``diffsim_float32_grad`` the differentiable ones
(compiled with their adjoints), loaded on the first backward pass or ``forces()`` call.
So a process compiles (or loads from the kernel cache) only what it uses, and the first
step does not wait for adjoint code. Nothing depends on the mesh or on parameter values, so nothing
recompiles when they change.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch


@functools.cache
def kernels_for(dtype: torch.dtype) -> SimpleNamespace:
    """The kernels and Warp types for ``torch.float32`` or ``torch.float64`` (built once)."""
    import warp as wp

    from diffsim.kernels.advance import build_advance
    from diffsim.kernels.elastic import build_elastic
    from diffsim.kernels.force_vjp import build_force_vjp
    from diffsim.kernels.integrate import build_integrate

    scalars = {torch.float32: wp.float32, torch.float64: wp.float64}
    if dtype not in scalars:
        raise ValueError(f"Warp kernels exist for float32 and float64, not {dtype}")
    scalar = scalars[dtype]
    module = f"diffsim_{scalar.__name__}"
    grad_module = f"{module}_grad"
    elastic = build_elastic(scalar, module, grad_module)
    integrate = build_integrate(scalar, module, grad_module)
    kernels = SimpleNamespace(
        scalar=scalar,
        vec3=wp.types.vector(3, scalar),
        mat33=wp.types.matrix((3, 3), scalar),
        **vars(elastic),
        **vars(build_force_vjp(scalar, module, elastic)),
        **vars(integrate),
        **vars(build_advance(scalar, module, elastic, integrate)),
    )
    wp.get_module(module).options["enable_backward"] = False  # no adjoint code to compile
    return kernels
