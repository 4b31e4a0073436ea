"""Hand-derived backward pass of the per-tet elastic force kernels, as forward-only Warp kernels.

``tet_force_vjp[material]`` computes what the Warp-generated adjoint of
``elastic.tet_forces[material]`` computes, at about the cost of the forward kernel:

* adj_x += (df/dx)^T adj_f. Forces are minus the gradient of the elastic energy, so the
  Jacobian is minus the (symmetric) Hessian and the product is a directional derivative:
  dF = dDs Dm^-1 with dDs gathered from adj_f like Ds from x, dP = (dP/dF) : dF, and the
  scatter of -V dP Dm^-T, exactly as the forward kernel scatters -V P Dm^-T.
* adj_mu, adj_lam += adj_P : dP/dmu, adj_P : dP/dlam. The scatter's adjoint is
  adj_P = -V sum_a (adj_f_a - adj_f_0) (row a of Dm^-1)^T = -V dF, the same dF.

Each material's ``dP`` is written in closed form from the stresses of
:mod:`diffsim.kernels.elastic` (derivations in the docstrings below). For Stable
Neo-Hookean the kernels take the re-parameterised Lame constants mu', lambda', with
alpha = 1 + 0.75 mu' / lambda' (so alpha depends on both parameters).
"""

from types import SimpleNamespace

import warp as wp


def build_force_vjp(dtype, module: str, elastic: SimpleNamespace) -> SimpleNamespace:
    """Force-VJP kernels for one scalar type (``wp.float32`` or ``wp.float64``).

    Args:
        dtype: the Warp scalar type.
        module: the Warp module of the forward-only kernels (no adjoint code is needed).
        elastic: the namespace of :func:`diffsim.kernels.elastic.build_elastic` (for its
            ``cofactor``, ``polar_rotation`` and ``deformation_gradient``).

    Returns:
        A namespace with ``tet_force_vjp``, a tuple of kernels indexed by the material id
        (SNH, NH, STVK, COROTATED, LINEAR, as in :mod:`diffsim.kernels.elastic`), and the
        per-tet Warp functions ``add_tet_force_vjp`` they loop over (fused elsewhere).
    """
    T = dtype
    vec3 = wp.types.vector(3, T)
    mat33 = wp.types.matrix((3, 3), T)

    cofactor, polar_rotation = elastic.cofactor, elastic.polar_rotation
    deformation_gradient = elastic.deformation_gradient
    gradient_of_field = elastic.gradient_of_field

    @wp.func
    def cofactor_jvp(F: mat33, dF: mat33) -> mat33:
        """Directional derivative of cofactor(F) along dF (product rule on each cross)."""
        c0 = wp.cross(dF[:, 1], F[:, 2]) + wp.cross(F[:, 1], dF[:, 2])
        c1 = wp.cross(dF[:, 2], F[:, 0]) + wp.cross(F[:, 2], dF[:, 0])
        c2 = wp.cross(dF[:, 0], F[:, 1]) + wp.cross(F[:, 0], dF[:, 1])
        return wp.matrix_from_cols(c0, c1, c2)

    @wp.func
    def polar_rotation_jvp(F: mat33, R: mat33, dF: mat33) -> mat33:
        """dR along dF: R^T dR = skew(y) with (tr(S) I - S) y = 2 axial(skew(R^T dF)).

        From R^T dF = skew(y) S + dS, whose skew part is (skew(y) S + S skew(y)) / 2 =
        skew((tr(S) I - S) y) / 2. The same linear system as elastic.adj_polar_rotation
        (A is symmetric), so the two are transposes of each other to rounding.
        """
        S = wp.transpose(R) @ F
        S = T(0.5) * (S + wp.transpose(S))
        A = wp.trace(S) * wp.identity(3, T) - S
        M = wp.transpose(R) @ dF
        g = vec3(M[2, 1] - M[1, 2], M[0, 2] - M[2, 0], M[1, 0] - M[0, 1])
        return R @ wp.skew(wp.inverse(A) @ g)

    # Each dstress_* returns (dP, dF : dP/dmu, dF : dP/dlam) for its material's P(F, mu, lam).
    @wp.func
    def dstress_snh(F: mat33, dF: mat33, mu: T, lam: T):
        """P = mu (1 - 1/(Ic+1)) F + lam (J - alpha) cof F, alpha = 1 + 0.75 mu/lam.

        dP = mu (1 - s) dF + 2 mu s^2 (F:dF) F + lam (cof F:dF) cof F + lam (J - alpha)
        dcof, s = 1/(Ic+1); dP/dmu = (1 - s) F - 0.75 cof F; dP/dlam = (J - 1) cof F.
        """
        ic = wp.ddot(F, F)
        C = cofactor(F)
        J = wp.dot(F[:, 0], C[:, 0])
        alpha = T(1.0) + T(0.75) * mu / lam
        s = T(1.0) / (ic + T(1.0))
        fdf = wp.ddot(F, dF)
        dJ = wp.ddot(C, dF)
        dP = (
            mu * (T(1.0) - s) * dF
            + (T(2.0) * mu * s * s * fdf) * F
            + (lam * dJ) * C
            + lam * (J - alpha) * cofactor_jvp(F, dF)
        )
        return dP, (T(1.0) - s) * fdf - T(0.75) * dJ, (J - T(1.0)) * dJ

    @wp.func
    def dstress_nh(F: mat33, dF: mat33, mu: T, lam: T):
        """P = mu F + (lam log J - mu)/J cof F.

        dP = mu dF + (lam + mu - lam log J)/J^2 (cof F:dF) cof F + (lam log J - mu)/J dcof;
        dP/dmu = F - cof F / J; dP/dlam = log J / J cof F.
        """
        C = cofactor(F)
        J = wp.dot(F[:, 0], C[:, 0])
        lj = wp.log(J)
        dJ = wp.ddot(C, dF)
        dP = (
            mu * dF
            + ((lam + mu - lam * lj) * dJ / (J * J)) * C
            + ((lam * lj - mu) / J) * cofactor_jvp(F, dF)
        )
        return dP, wp.ddot(F, dF) - dJ / J, lj / J * dJ

    @wp.func
    def dstress_stvk(F: mat33, dF: mat33, mu: T, lam: T):
        """P = F S, S = 2 mu E + lam tr(E) I, E = (F^T F - I)/2.

        dP = dF S + F (2 mu dE + lam tr(dE) I), dE = sym(F^T dF), tr(dE) = F:dF;
        dP/dmu = 2 F E; dP/dlam = tr(E) F.
        """
        eye = wp.identity(3, T)
        E = T(0.5) * (wp.transpose(F) @ F - eye)
        trE = wp.trace(E)
        FtdF = wp.transpose(F) @ dF
        dE = T(0.5) * (FtdF + wp.transpose(FtdF))
        trdE = wp.trace(dE)
        dP = dF @ (T(2.0) * mu * E + lam * trE * eye) + F @ (T(2.0) * mu * dE + lam * trdE * eye)
        # dF : (F E) = (F^T dF) : E = dE : E (E symmetric).
        return dP, T(2.0) * wp.ddot(dE, E), trE * trdE

    @wp.func
    def dstress_corotated(F: mat33, dF: mat33, mu: T, lam: T):
        """P = 2 mu (F - R) + lam (J - 1) cof F.

        dP = 2 mu (dF - dR) + lam (cof F:dF) cof F + lam (J - 1) dcof;
        dP/dmu = 2 (F - R); dP/dlam = (J - 1) cof F.
        """
        C = cofactor(F)
        J = wp.dot(F[:, 0], C[:, 0])
        R = polar_rotation(F)
        dJ = wp.ddot(C, dF)
        dP = (
            T(2.0) * mu * (dF - polar_rotation_jvp(F, R, dF))
            + (lam * dJ) * C
            + lam * (J - T(1.0)) * cofactor_jvp(F, dF)
        )
        return dP, T(2.0) * wp.ddot(F - R, dF), (J - T(1.0)) * dJ

    @wp.func
    def dstress_linear(F: mat33, dF: mat33, mu: T, lam: T):
        """P = 2 mu eps + lam tr(eps) I, eps = sym(F) - I.

        dP = 2 mu sym(dF) + lam tr(dF) I; dP/dmu = 2 eps; dP/dlam = tr(eps) I.
        """
        eye = wp.identity(3, T)
        eps = T(0.5) * (F + wp.transpose(F)) - eye
        sym_dF = T(0.5) * (dF + wp.transpose(dF))
        trdF = wp.trace(dF)
        dP = T(2.0) * mu * sym_dF + lam * trdF * eye
        return dP, T(2.0) * wp.ddot(eps, dF), wp.trace(eps) * trdF

    def vjp_func(dstress):
        @wp.func
        def add_tet_force_vjp(
            x: wp.array(dtype=wp.vec3d),
            adj_f: wp.array(dtype=vec3),
            tets: wp.array(dtype=wp.vec4i),
            dm_inv: wp.array(dtype=mat33),
            volume: wp.array(dtype=T),
            mu: wp.array(dtype=T),
            lam: wp.array(dtype=T),
            per_tet: int,
            e: int,
            adj_x: wp.array(dtype=vec3),
            adj_mu: wp.array(dtype=T),
            adj_lam: wp.array(dtype=T),
        ):
            # Tet e's (df/dx)^T adj_f into adj_x, its parameter cotangents at e * per_tet.
            tet = tets[e]
            dmi = dm_inv[e]
            F = deformation_gradient(x, tet, dmi)
            dF = gradient_of_field(adj_f, tet, dmi)
            p = e * per_tet
            dP, dmu, dlam = dstress(F, dF, mu[p], lam[p])
            v = volume[e]
            H = -v * dP
            f1 = H @ dmi[0]
            f2 = H @ dmi[1]
            f3 = H @ dmi[2]
            # Atomic on CUDA (tets share corners); a plain add on the CPU.
            wp.atomic_add(adj_x, tet[0], -(f1 + f2 + f3))
            wp.atomic_add(adj_x, tet[1], f1)
            wp.atomic_add(adj_x, tet[2], f2)
            wp.atomic_add(adj_x, tet[3], f3)
            # adj_P = -V dF (the scatter's adjoint), contracted with dP/dmu, dP/dlam.
            wp.atomic_add(adj_mu, p, -v * dmu)
            wp.atomic_add(adj_lam, p, -v * dlam)

        return add_tet_force_vjp

    def vjp_kernel(add_tet_force_vjp):
        @wp.kernel(module=module, enable_backward=False)
        def tet_force_vjp(
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
            adj_f: wp.array(dtype=vec3),
            adj_x: wp.array(dtype=vec3),
            adj_mu: wp.array(dtype=T),
            adj_lam: wp.array(dtype=T),
        ):
            """One material: adds (df/dx)^T adj_f to adj_x ([n], N/m-weighted) and the
            parameter cotangents to adj_mu, adj_lam (index e * per_tet), ``chunk`` tets
            per thread over [start, stop)."""
            first = start + wp.tid() * chunk
            last = wp.min(first + chunk, stop)
            for e in range(first, last):
                add_tet_force_vjp(
                    x, adj_f, tets, dm_inv, volume, mu, lam, per_tet, e, adj_x, adj_mu, adj_lam
                )

        return tet_force_vjp

    dstresses = (dstress_snh, dstress_nh, dstress_stvk, dstress_corotated, dstress_linear)
    add_tet_force_vjp = tuple(vjp_func(d) for d in dstresses)
    return SimpleNamespace(
        add_tet_force_vjp=add_tet_force_vjp,
        tet_force_vjp=tuple(vjp_kernel(add) for add in add_tet_force_vjp),
    )
