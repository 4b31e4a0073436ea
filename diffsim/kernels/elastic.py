"""Per-tet elastic energy and forces of the built-in materials, as Warp kernels.

The per-material laws (psi, its stress P = dpsi/dF and the stress's derivative) live in
:mod:`diffsim.kernels.material_laws`; this file gathers F per tet and scatters forces. The
backward pass of the forces is hand-derived in
:mod:`diffsim.kernels.force_vjp`; Warp-generated adjoints serve the energy's gradient and,
for the forces, as the reference the hand-derived kernels are tested against. Material ids
follow the ``kernel`` attribute of the classes in diffsim.physics.materials. For Stable Neo-Hookean
the kernels take the re-parameterised Lame constants (mu' = 4/3 mu, lambda' = lambda +
5/6 mu), which the torch side computes (``kernel_lame``) so that the (E, nu) chain stays in
torch. Positions arrive as float64 (``wp.vec3d``) whatever the kernels' scalar type.
"""

from types import SimpleNamespace

import warp as wp

from diffsim.kernels.material_laws import build_material_laws


def build_elastic(dtype, module: str, differentiable: bool) -> SimpleNamespace:
    """Elastic kernels for one scalar type (``wp.float32`` or ``wp.float64``).

    Built twice per dtype: forward-only, and differentiable (with the custom adjoint of
    the polar rotation, whose registration costs a build of the function at import, so the
    differentiable flavour is built only when a backward pass first needs it).

    Args:
        dtype: the Warp scalar type.
        module: the Warp module the kernels go into.
        differentiable: build the kernels with adjoints.

    Returns:
        A namespace with the Warp functions ``cofactor``, ``polar_rotation``,
        ``deformation_gradient`` and ``add_tet_forces`` (per material) that other kernels
        fuse in, and either ``tet_forces_chunked`` (forward-only, per material) or
        ``tet_forces`` (per material, with adjoints: the reference for the hand-derived
        force VJP) and ``tet_energy``.
    """
    T = dtype
    vec3 = wp.types.vector(3, T)
    mat33 = wp.types.matrix((3, 3), T)

    @wp.struct
    class TetElements:
        """The tets and their material, as the force kernels take them."""

        tets: wp.array(dtype=wp.vec4i)  # [m] corner vertex ids
        dm_inv: wp.array(dtype=mat33)  # [m] inverse rest edge matrices (1/m)
        volume: wp.array(dtype=T)  # [m] rest volumes (m^3)
        mu: wp.array(dtype=T)  # the kernel's Lame mu (Pa), [m] per tet or [1]
        lam: wp.array(dtype=T)  # the kernel's Lame lambda (Pa), [m] per tet or [1]
        per_tet: int  # 1 where mu and lam are per tet: tet e reads index e * per_tet

    material_laws = build_material_laws(T, differentiable)
    cofactor, polar_rotation = material_laws.cofactor, material_laws.polar_rotation

    @wp.func
    def deformation_gradient(x: wp.array(dtype=wp.vec3d), tet: wp.vec4i, dm_inv: mat33) -> mat33:
        # F = Ds Dm^-1. Positions are float64 (the precision rule, docs/how-it-works.md):
        # the edges are differenced in float64, then rounded to the kernel's type.
        x0 = x[tet[0]]
        e1 = vec3(x[tet[1]] - x0)
        e2 = vec3(x[tet[2]] - x0)
        e3 = vec3(x[tet[3]] - x0)
        return wp.matrix_from_cols(e1, e2, e3) @ dm_inv

    @wp.func
    def gradient_of_field(a: wp.array(dtype=vec3), tet: wp.vec4i, dm_inv: mat33) -> mat33:
        # The same linear map on a vertex field of the kernel's type (the force VJP
        # gathers dF from adj_f with it).
        a0 = a[tet[0]]
        return wp.matrix_from_cols(a[tet[1]] - a0, a[tet[2]] - a0, a[tet[3]] - a0) @ dm_inv

    def tet_force_func(stress):
        @wp.func
        def add_tet_forces(
            x: wp.array(dtype=wp.vec3d), el: TetElements, e: int, f: wp.array(dtype=vec3)
        ):
            # Adds tet e's forces -V P Dm^-T to its four corners.
            tet = el.tets[e]
            dmi = el.dm_inv[e]
            F = deformation_gradient(x, tet, dmi)
            p = e * el.per_tet
            P = -el.volume[e] * stress(F, el.mu[p], el.lam[p])
            f1 = P @ dmi[0]
            f2 = P @ dmi[1]
            f3 = P @ dmi[2]
            # Atomic on CUDA (tets share corners); a plain add on the CPU.
            wp.atomic_add(f, tet[0], -(f1 + f2 + f3))
            wp.atomic_add(f, tet[1], f1)
            wp.atomic_add(f, tet[2], f2)
            wp.atomic_add(f, tet[3], f3)

        return add_tet_forces

    def forces_kernel(add_tet_forces, target_module: str, backward: bool):
        @wp.kernel(module=target_module, enable_backward=backward)
        def tet_forces(
            x: wp.array(dtype=wp.vec3d),
            el: TetElements,
            start: int,
            stop: int,
            chunk: int,
            f: wp.array(dtype=vec3),
        ):
            """One material: each thread adds the force -V P Dm^-T of ``chunk`` tets.

            Chunks amortise Warp's per-thread call overhead on the CPU. Iterations are
            independent (they only accumulate into f), so the loop's adjoint, run in reverse,
            is exact; the adjoint of the kernel is a Hessian-vector product.
            """
            first = start + wp.tid() * chunk
            last = wp.min(first + chunk, stop)
            for e in range(first, last):
                add_tet_forces(x, el, e, f)

        return tet_forces

    laws = material_laws.laws
    add_tet_forces = tuple(tet_force_func(law.stress) for law in laws)
    kernels = tuple(forces_kernel(add, module, differentiable) for add in add_tet_forces)
    shared = dict(
        TetElements=TetElements,
        laws=laws,
        cofactor=cofactor,
        polar_rotation=polar_rotation,
        deformation_gradient=deformation_gradient,
        gradient_of_field=gradient_of_field,
        add_tet_forces=add_tet_forces,
    )
    if not differentiable:
        return SimpleNamespace(**shared, tet_forces_chunked=kernels)

    def energy_kernel(psi):
        @wp.kernel(module=module)
        def tet_energy(
            x: wp.array(dtype=wp.vec3d),
            tets: wp.array(dtype=wp.vec4i),
            dm_inv: wp.array(dtype=mat33),
            volume: wp.array(dtype=T),
            mu: wp.array(dtype=T),
            lam: wp.array(dtype=T),
            per_tet: int,
            energy: wp.array(dtype=T),
        ):
            """One material: elastic energy psi(F) V of each tet (J)."""
            e = wp.tid()
            F = deformation_gradient(x, tets[e], dm_inv[e])
            p = e * per_tet
            energy[e] = volume[e] * psi(F, mu[p], lam[p])

        return tet_energy

    energies = tuple(energy_kernel(law.psi) for law in laws)
    return SimpleNamespace(**shared, tet_forces=kernels, tet_energy=energies)
