"""The constitutive laws of the built-in materials as Warp functions: one place per material.

For each material, in the order of the kernel ids (the ``kernel`` attribute of the classes
in ``diffsim.physics.materials``): its energy density ``psi(F, mu, lam)``, its first Piola-Kirchhoff
stress ``stress(F, mu, lam) = dpsi/dF`` and the stress's directional derivative
``dstress(F, dF, mu, lam) -> (dP, dF : dP/dmu, dF : dP/dlam)`` (the force VJP's core). The
formulas are those of the torch psi; a test checks every law against it. Adding a material
means its class in diffsim/materials.py and its three functions here, appended to ``laws``.
"""

from types import SimpleNamespace

import warp as wp


def build_material_laws(dtype, differentiable: bool) -> SimpleNamespace:
    """The laws for one scalar type (``wp.float32`` or ``wp.float64``).

    Args:
        dtype: the Warp scalar type.
        differentiable: register the polar rotation's closed-form adjoint (for kernels Warp
            differentiates; the registration builds the function, so it is done only then).

    Returns:
        A namespace with ``laws`` (a tuple, by kernel id, of namespaces ``psi``, ``stress``,
        ``dstress``) and the shared tensor functions ``cofactor`` and ``polar_rotation``.
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
    def psi_snh(F: mat33, mu: T, lam: T) -> T:
        ic = wp.ddot(F, F)
        J = wp.determinant(F)
        alpha = T(1.0) + T(0.75) * mu / lam
        vol = (J - alpha) * (J - alpha) - (T(1.0) - alpha) * (T(1.0) - alpha)
        return (
            T(0.5) * mu * (ic - T(3.0))
            - T(0.5) * mu * wp.log((ic + T(1.0)) / T(4.0))
            + T(0.5) * lam * vol
        )

    @wp.func
    def psi_nh(F: mat33, mu: T, lam: T) -> T:
        ic = wp.ddot(F, F)
        lj = wp.log(wp.determinant(F))
        return T(0.5) * mu * (ic - T(3.0)) - mu * lj + T(0.5) * lam * lj * lj

    @wp.func
    def psi_stvk(F: mat33, mu: T, lam: T) -> T:
        E = T(0.5) * (wp.transpose(F) @ F - wp.identity(3, T))
        return mu * wp.ddot(E, E) + T(0.5) * lam * wp.trace(E) * wp.trace(E)

    @wp.func
    def psi_corotated(F: mat33, mu: T, lam: T) -> T:
        R = polar_rotation(F)
        J = wp.determinant(F)
        return mu * wp.ddot(F - R, F - R) + T(0.5) * lam * (J - T(1.0)) * (J - T(1.0))

    @wp.func
    def psi_linear(F: mat33, mu: T, lam: T) -> T:
        eps = T(0.5) * (F + wp.transpose(F)) - wp.identity(3, T)
        return mu * wp.ddot(eps, eps) + T(0.5) * lam * wp.trace(eps) * wp.trace(eps)

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
        skew((tr(S) I - S) y) / 2. The same linear system as adj_polar_rotation
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

    def law(psi, stress, dstress) -> SimpleNamespace:
        return SimpleNamespace(psi=psi, stress=stress, dstress=dstress)

    laws = (
        law(psi_snh, pk1_snh, dstress_snh),
        law(psi_nh, pk1_nh, dstress_nh),
        law(psi_stvk, pk1_stvk, dstress_stvk),
        law(psi_corotated, pk1_corotated, dstress_corotated),
        law(psi_linear, pk1_linear, dstress_linear),
    )
    return SimpleNamespace(laws=laws, cofactor=cofactor, polar_rotation=polar_rotation)
