"""Point-triangle and edge-edge distances with IPC closest-feature types (torch reference).

Every distance is written as ``d^2 = |p - q|^2`` between two closest points, each a convex
combination of the pair's vertices with weights ``beta``. The feature type (which vertices
or edges the closest points lie on) is classified on detached values; the weights are then
recomputed from differentiable formulas for that type, so the gradient and Hessian of
``d^2`` are exact inside each type's region (the same values as the IPC Toolkit's
type-specific formulas). Type codes follow ``ipctk``'s enums.
"""

from __future__ import annotations

import torch

# Point-triangle types (ipctk.PointTriangleDistanceType order).
P_T0, P_T1, P_T2, P_E0, P_E1, P_E2, P_T = range(7)
# Edge-edge types (ipctk.EdgeEdgeDistanceType order).
EA0_EB0, EA0_EB1, EA1_EB0, EA1_EB1, EA_EB0, EA_EB1, EA0_EB, EA1_EB, EA_EB = range(9)
# Edges whose squared cross-product norm is below this fraction of |ea|^2 |eb|^2 count as
# parallel; their closest points are taken at an endpoint.
PARALLEL_FRACTION = {torch.float32: 1e-8, torch.float64: 1e-16}
# The IPC Toolkit's edge-edge mollifier threshold: eps_x = 1e-3 |ea_rest|^2 |eb_rest|^2.
MOLLIFIER_FRACTION = 1e-3


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=-1)


def point_triangle_type(
    p: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor
) -> torch.Tensor:
    """Closest-feature types ``[k]`` (int64) of points ``p`` to triangles ``(a, b, c)``."""
    with torch.no_grad():
        ab, ac, ap, bp, cp = b - a, c - a, p - a, p - b, p - c
        d1, d2 = _dot(ab, ap), _dot(ac, ap)
        d3, d4 = _dot(ab, bp), _dot(ac, bp)
        d5, d6 = _dot(ab, cp), _dot(ac, cp)
        va, vb, vc = d3 * d6 - d5 * d4, d5 * d2 - d1 * d6, d1 * d4 - d3 * d2
        kind = torch.full(p.shape[:-1], P_T, dtype=torch.int64, device=p.device)
        # Later assignments win: apply the region tests in reverse order of priority.
        kind = torch.where((va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0), P_E1, kind)
        kind = torch.where((vb <= 0) & (d2 >= 0) & (d6 <= 0), P_E2, kind)
        kind = torch.where((d6 >= 0) & (d5 <= d6), P_T2, kind)
        kind = torch.where((vc <= 0) & (d1 >= 0) & (d3 <= 0), P_E0, kind)
        kind = torch.where((d3 >= 0) & (d4 <= d3), P_T1, kind)
        kind = torch.where((d1 <= 0) & (d2 <= 0), P_T0, kind)
    return kind


def _segment_parameter(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Parameter t of the projection of p on the line a + t (b - a), differentiable."""
    e = b - a
    return _dot(p - a, e) / _dot(e, e).clamp_min(torch.finfo(e.dtype).tiny)


def point_triangle_weights(
    p: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    kind: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Barycentric weights ``[k, 3]`` of the closest point on each triangle, and the types.

    Differentiable in all positions (within each type's region).
    """
    kind = point_triangle_type(p, a, b, c) if kind is None else kind
    e0, e1, w = b - a, c - a, p - a
    a00, a01, a11 = _dot(e0, e0), _dot(e0, e1), _dot(e1, e1)
    r0, r1 = _dot(e0, w), _dot(e1, w)
    det = (a00 * a11 - a01 * a01).clamp_min(torch.finfo(p.dtype).tiny)
    u, v = (a11 * r0 - a01 * r1) / det, (a00 * r1 - a01 * r0) / det
    t_ab, t_bc, t_ca = (
        _segment_parameter(p, a, b),
        _segment_parameter(p, b, c),
        _segment_parameter(p, c, a),
    )
    one, zero = torch.ones_like(u), torch.zeros_like(u)
    options = {
        P_T0: (one, zero, zero),
        P_T1: (zero, one, zero),
        P_T2: (zero, zero, one),
        P_E0: (1 - t_ab, t_ab, zero),
        P_E1: (zero, 1 - t_bc, t_bc),
        P_E2: (t_ca, zero, 1 - t_ca),
        P_T: (1 - u - v, u, v),
    }
    beta = torch.zeros((*u.shape, 3), dtype=p.dtype, device=p.device)
    for code, weights in options.items():
        beta = torch.where((kind == code)[..., None], torch.stack(weights, dim=-1), beta)
    return beta, kind


def point_triangle_distance(
    p: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor
) -> torch.Tensor:
    """Squared distances ``[k]`` (m^2) from points to triangles, all ``[k, 3]``."""
    beta, _ = point_triangle_weights(p, a, b, c)
    q = beta[..., 0:1] * a + beta[..., 1:2] * b + beta[..., 2:3] * c
    return (p - q).square().sum(dim=-1)


def _lagrange_terms(
    da: torch.Tensor, db: torch.Tensor, r: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``a e - b^2``, ``b f - c e`` and ``a f - b c`` of the edge-edge closest points (a =
    da.da, b = da.db, c = da.r, e = db.db, f = db.r) as ``|n|^2``, ``n.(db x r)`` and
    ``n.(da x r)``, n = da x db (Lagrange's identity). The differences of products of dot
    products cancel to rounding noise for parallel edges, which then passed the parallel
    test and took garbage closest points (two cubes' parallel edges 1.5 mm apart measured
    3.8 mm); the cross products keep their relative accuracy."""
    n = torch.linalg.cross(da, db, dim=-1)
    return (
        _dot(n, n),
        _dot(n, torch.linalg.cross(db, r, dim=-1)),
        _dot(n, torch.linalg.cross(da, r, dim=-1)),
    )


def edge_edge_parameters(
    p0: torch.Tensor, p1: torch.Tensor, q0: torch.Tensor, q1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closest-point parameters ``s, t`` (``[k]``) on edges ``p0 p1`` and ``q0 q1``, and types.

    The closest points are ``p0 + s (p1 - p0)`` and ``q0 + t (q1 - q0)``.
    """
    da, db, r = p1 - p0, q1 - q0, p0 - q0
    with torch.no_grad():
        a, e, b = _dot(da, da), _dot(db, db), _dot(da, db)
        c, f = _dot(da, r), _dot(db, r)
        denom, s_num, _ = _lagrange_terms(da, db, r)
        parallel = denom <= PARALLEL_FRACTION[p0.dtype] * a * e
        s = torch.where(parallel, torch.zeros_like(a), (s_num / denom.clamp_min(1e-300)))
        s = s.clamp(0, 1)
        t = (b * s + f) / e
        low, high = t < 0, t > 1
        s = torch.where(low, (-c / a).clamp(0, 1), torch.where(high, ((b - c) / a).clamp(0, 1), s))
        t = t.clamp(0, 1)
        s_end = torch.where(s <= 0, 0, torch.where(s >= 1, 1, 2))
        t_end = torch.where(t <= 0, 0, torch.where(t >= 1, 1, 2))
        # (s_end, t_end) -> ipctk type; 2 means interior.
        table = torch.tensor(
            [[EA0_EB0, EA0_EB1, EA0_EB], [EA1_EB0, EA1_EB1, EA1_EB], [EA_EB0, EA_EB1, EA_EB]],
            device=p0.device,
        )
        kind = table[s_end, t_end]
    # Differentiable parameters for the classified type.
    denom, s_num, t_num = _lagrange_terms(da, db, r)
    denom = denom.clamp_min(torch.finfo(p0.dtype).tiny)
    s_both, t_both = s_num / denom, t_num / denom
    s_on_a0 = _segment_parameter(q0, p0, p1)
    s_on_a1 = _segment_parameter(q1, p0, p1)
    t_on_b0 = _segment_parameter(p0, q0, q1)
    t_on_b1 = _segment_parameter(p1, q0, q1)
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    options = {
        EA0_EB0: (zero, zero),
        EA0_EB1: (zero, one),
        EA1_EB0: (one, zero),
        EA1_EB1: (one, one),
        EA_EB0: (s_on_a0, zero),
        EA_EB1: (s_on_a1, one),
        EA0_EB: (zero, t_on_b0),
        EA1_EB: (one, t_on_b1),
        EA_EB: (s_both, t_both),
    }
    s_out, t_out = torch.zeros_like(a), torch.zeros_like(a)
    for code, (s_k, t_k) in options.items():
        s_out = torch.where(kind == code, s_k, s_out)
        t_out = torch.where(kind == code, t_k, t_out)
    return s_out, t_out, kind


def edge_edge_distance(
    p0: torch.Tensor, p1: torch.Tensor, q0: torch.Tensor, q1: torch.Tensor
) -> torch.Tensor:
    """Squared distances ``[k]`` (m^2) between edges ``p0 p1`` and ``q0 q1``, all ``[k, 3]``."""
    s, t, _ = edge_edge_parameters(p0, p1, q0, q1)
    diff = p0 + s[..., None] * (p1 - p0) - q0 - t[..., None] * (q1 - q0)
    return diff.square().sum(dim=-1)


def edge_edge_cross_squared(
    p0: torch.Tensor, p1: torch.Tensor, q0: torch.Tensor, q1: torch.Tensor
) -> torch.Tensor:
    """``|(p1 - p0) x (q1 - q0)|^2``, ``[k]`` (m^4)."""
    return torch.linalg.cross(p1 - p0, q1 - q0).square().sum(dim=-1)


def mollifier_threshold(
    p0: torch.Tensor, p1: torch.Tensor, q0: torch.Tensor, q1: torch.Tensor
) -> torch.Tensor:
    """eps_x = 1e-3 |p1 - p0|^2 |q1 - q0|^2 from rest positions, ``[k]`` (m^4)."""
    return MOLLIFIER_FRACTION * (p1 - p0).square().sum(-1) * (q1 - q0).square().sum(-1)


def edge_edge_mollifier(cross_squared: torch.Tensor, eps_x: torch.Tensor) -> torch.Tensor:
    """The IPC mollifier m(c) = (2 - c / eps_x) c / eps_x below eps_x, 1 above, ``[k]``."""
    r = cross_squared / eps_x
    return torch.where(r < 1, (2 - r) * r, torch.ones_like(r))
