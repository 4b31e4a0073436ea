"""Per-tet elastic energy and forces of the built-in materials, as Warp kernels.

Each material's first Piola-Kirchhoff stress P = dpsi/dF is written analytically from the
same psi as :mod:`diffsim.materials`. The backward pass of the forces is hand-derived in
:mod:`diffsim.kernels.force_vjp`; Warp-generated adjoints serve the energy's gradient and,
for the forces, as the reference the hand-derived kernels are tested against. Material ids
follow the ``kernel`` attribute of the classes in diffsim.materials. For Stable Neo-Hookean
the kernels take the re-parameterised Lame constants (mu' = 4/3 mu, lambda' = lambda +
5/6 mu), which the torch side computes (``kernel_lame``) so that the (E, nu) chain stays in
torch. Positions arrive as float64 (``wp.vec3d``) whatever the kernels' scalar type.
"""

from types import SimpleNamespace

import warp as wp

SNH, NH, STVK, COROTATED, LINEAR = 0, 1, 2, 3, 4


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

    @wp.func
    def cofactor(F: mat33) -> mat33:
        # dJ/dF: columns are cross products of the other two columns of F.
        c0 = wp.cross(F[:, 1], F[:, 2])
        c1 = wp.cross(F[:, 2], F[:, 0])
        c2 = wp.cross(F[:, 0], F[:, 1])
        return wp.matrix_from_cols(c0, c1, c2)

    @wp.func
    def polar_rotation(F: mat33) -> mat33:
        U = mat33()
        s = vec3()
        V = mat33()
        wp.svd3(F, U, s, V)
        R = U @ wp.transpose(V)
        if wp.determinant(R) < T(0.0):
            # det R = +1: flip the direction of the smallest singular value.
            k = int(0)  # noqa: UP018 - a Warp variable, not a constant
            if wp.abs(s[1]) < wp.abs(s[k]):
                k = 1
            if wp.abs(s[2]) < wp.abs(s[k]):
                k = 2
            R = R - T(2.0) * wp.outer(U[:, k], V[:, k])
        return R

    def adj_polar_rotation(F: mat33, adj_ret: mat33):
        # Closed form of the polar rotation's derivative (see materials.polar_rotation_vjp):
        # smooth at repeated singular values, unlike the SVD's adjoint.
        R = polar_rotation(F)
        S = wp.transpose(R) @ F
        S = T(0.5) * (S + wp.transpose(S))
        A = wp.trace(S) * wp.identity(3, T) - S
        M = wp.transpose(R) @ adj_ret
        W = M - wp.transpose(M)
        g = T(0.5) * vec3(W[2, 1] - W[1, 2], W[0, 2] - W[2, 0], W[1, 0] - W[0, 1])
        y = wp.inverse(A) @ g
        wp.adjoint[F] += R @ wp.skew(y)

    if differentiable:
        wp.func_grad(polar_rotation)(adj_polar_rotation)

    @wp.func
    def pk1_snh(F: mat33, mu: T, lam: T) -> mat33:
        ic = wp.ddot(F, F)
        C = cofactor(F)
        J = wp.dot(F[:, 0], C[:, 0])
        alpha = T(1.0) + T(0.75) * mu / lam
        return mu * (T(1.0) - T(1.0) / (ic + T(1.0))) * F + lam * (J - alpha) * C

    @wp.func
    def pk1_nh(F: mat33, mu: T, lam: T) -> mat33:
        J = wp.determinant(F)
        return mu * F + (lam * wp.log(J) - mu) / J * cofactor(F)

    @wp.func
    def pk1_stvk(F: mat33, mu: T, lam: T) -> mat33:
        E = T(0.5) * (wp.transpose(F) @ F - wp.identity(3, T))
        return F @ (T(2.0) * mu * E + lam * wp.trace(E) * wp.identity(3, T))

    @wp.func
    def pk1_corotated(F: mat33, mu: T, lam: T) -> mat33:
        J = wp.determinant(F)
        R = polar_rotation(F)
        return T(2.0) * mu * (F - R) + lam * (J - T(1.0)) * cofactor(F)

    @wp.func
    def pk1_linear(F: mat33, mu: T, lam: T) -> mat33:
        eye = wp.identity(3, T)
        eps = T(0.5) * (F + wp.transpose(F)) - eye
        return T(2.0) * mu * eps + lam * wp.trace(eps) * eye

    @wp.func
    def psi(F: mat33, mu: T, lam: T, material: int) -> T:
        eye = wp.identity(3, T)
        e = T(0.0)
        if material == SNH:
            ic = wp.ddot(F, F)
            J = wp.determinant(F)
            alpha = T(1.0) + T(0.75) * mu / lam
            vol = (J - alpha) * (J - alpha) - (T(1.0) - alpha) * (T(1.0) - alpha)
            e = (
                T(0.5) * mu * (ic - T(3.0))
                - T(0.5) * mu * wp.log((ic + T(1.0)) / T(4.0))
                + T(0.5) * lam * vol
            )
        elif material == NH:
            ic = wp.ddot(F, F)
            lj = wp.log(wp.determinant(F))
            e = T(0.5) * mu * (ic - T(3.0)) - mu * lj + T(0.5) * lam * lj * lj
        elif material == STVK:
            E = T(0.5) * (wp.transpose(F) @ F - eye)
            e = mu * wp.ddot(E, E) + T(0.5) * lam * wp.trace(E) * wp.trace(E)
        elif material == COROTATED:
            R = polar_rotation(F)
            J = wp.determinant(F)
            e = mu * wp.ddot(F - R, F - R) + T(0.5) * lam * (J - T(1.0)) * (J - T(1.0))
        else:
            eps = T(0.5) * (F + wp.transpose(F)) - eye
            e = mu * wp.ddot(eps, eps) + T(0.5) * lam * wp.trace(eps) * wp.trace(eps)
        return e

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
            x: wp.array(dtype=wp.vec3d),
            tets: wp.array(dtype=wp.vec4i),
            dm_inv: wp.array(dtype=mat33),
            volume: wp.array(dtype=T),
            mu: wp.array(dtype=T),
            lam: wp.array(dtype=T),
            per_tet: int,
            e: int,
            f: wp.array(dtype=vec3),
        ):
            # Adds tet e's forces -V P Dm^-T to its four corners.
            tet = tets[e]
            dmi = dm_inv[e]
            F = deformation_gradient(x, tet, dmi)
            p = e * per_tet
            P = -volume[e] * stress(F, mu[p], lam[p])
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
            tets: wp.array(dtype=wp.vec4i),
            dm_inv: wp.array(dtype=mat33),
            volume: wp.array(dtype=T),
            mu: wp.array(dtype=T),
            lam: wp.array(dtype=T),
            per_tet: int,
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
                add_tet_forces(x, tets, dm_inv, volume, mu, lam, per_tet, e, f)

        return tet_forces

    stresses = (pk1_snh, pk1_nh, pk1_stvk, pk1_corotated, pk1_linear)
    add_tet_forces = tuple(tet_force_func(stress) for stress in stresses)
    kernels = tuple(forces_kernel(add, module, differentiable) for add in add_tet_forces)
    shared = dict(
        cofactor=cofactor,
        polar_rotation=polar_rotation,
        deformation_gradient=deformation_gradient,
        gradient_of_field=gradient_of_field,
        add_tet_forces=add_tet_forces,
    )
    if not differentiable:
        return SimpleNamespace(**shared, tet_forces_chunked=kernels)

    @wp.kernel(module=module)
    def tet_energy(
        x: wp.array(dtype=wp.vec3d),
        tets: wp.array(dtype=wp.vec4i),
        dm_inv: wp.array(dtype=mat33),
        volume: wp.array(dtype=T),
        mu: wp.array(dtype=T),
        lam: wp.array(dtype=T),
        per_tet: int,
        material: int,
        energy: wp.array(dtype=T),
    ):
        """Elastic energy psi(F) V of each tet (J)."""
        e = wp.tid()
        F = deformation_gradient(x, tets[e], dm_inv[e])
        p = e * per_tet
        energy[e] = volume[e] * psi(F, mu[p], lam[p], material)

    return SimpleNamespace(**shared, tet_forces=kernels, tet_energy=tet_energy)
