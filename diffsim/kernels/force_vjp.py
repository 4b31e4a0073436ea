"""Hand-derived backward pass of the per-tet elastic force kernels, as forward-only Warp kernels.

``tet_force_vjp[material]`` computes what the Warp-generated adjoint of
``elastic.tet_forces[material]`` computes, at about the cost of the forward kernel:

* adj_x += (df/dx)^T adj_f. Forces are minus the gradient of the elastic energy, so the
  Jacobian is minus the (symmetric) Hessian and the product is a directional derivative:
  dF = dDs Dm^-1 with dDs gathered from adj_f like Ds from x, dP = (dP/dF) : dF, and the
  scatter of -V dP Dm^-T, exactly as the forward kernel scatters -V P Dm^-T.
* adj_mu, adj_lam += adj_P : dP/dmu, adj_P : dP/dlam. The scatter's adjoint is
  adj_P = -V sum_a (adj_f_a - adj_f_0) (row a of Dm^-1)^T = -V dF, the same dF.

Each material's ``dP`` is written in closed form next to its stress in
:mod:`diffsim.kernels.material_laws` (derivations in their docstrings). For Stable
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

    TetElements = elastic.TetElements
    deformation_gradient = elastic.deformation_gradient
    gradient_of_field = elastic.gradient_of_field

    def vjp_func(dstress):
        @wp.func
        def add_tet_force_vjp(
            x: wp.array(dtype=wp.vec3d),
            adj_f: wp.array(dtype=vec3),
            el: TetElements,
            e: int,
            adj_x: wp.array(dtype=vec3),
            adj_mu: wp.array(dtype=T),
            adj_lam: wp.array(dtype=T),
        ):
            # Tet e's (df/dx)^T adj_f into adj_x, its parameter cotangents at e * per_tet.
            tet = el.tets[e]
            dmi = el.dm_inv[e]
            F = deformation_gradient(x, tet, dmi)
            dF = gradient_of_field(adj_f, tet, dmi)
            p = e * el.per_tet
            dP, dmu, dlam = dstress(F, dF, el.mu[p], el.lam[p])
            v = el.volume[e]
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
            el: TetElements,
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
                add_tet_force_vjp(x, adj_f, el, e, adj_x, adj_mu, adj_lam)

        return tet_force_vjp

    add_tet_force_vjp = tuple(vjp_func(law.dstress) for law in elastic.laws)
    return SimpleNamespace(
        add_tet_force_vjp=add_tet_force_vjp,
        tet_force_vjp=tuple(vjp_kernel(add) for add in add_tet_force_vjp),
    )
