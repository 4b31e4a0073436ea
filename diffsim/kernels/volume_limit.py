"""The volume step limit's per-tet arithmetic in Warp (float64).

The same rule as the torch reference :mod:`diffsim.physics.volume_limit`: a tet whose corners
move along their steps scaled by t has the volume ratio ``J(t) = det(F0 + t dF)``, a cubic
in t; :func:`first_crossing` finds the first t in [0, 1] at which it reaches a floor (the
cubic is monotone between its critical points, so the first piece that ends below the floor
holds the crossing, found by bisection). The fused contact substeps
(:mod:`diffsim.kernels.contact_advance`) run the rounds of the limit with it, on the edge
matrices Ds (J = det(Ds) det Dm^-1); the fused contact-free steps
(:mod:`diffsim.kernels.advance`) only check that no substep would have needed it, with
:func:`diffsim.kernels.inversion.volume_ratio`.
"""

import warp as wp


@wp.func
def edge_matrix(x0: wp.vec3d, x1: wp.vec3d, x2: wp.vec3d, x3: wp.vec3d) -> wp.mat33d:
    """Ds = [x1 - x0, x2 - x0, x3 - x0] (edges as columns)."""
    a = x1 - x0
    b = x2 - x0
    c = x3 - x0
    return wp.mat33d(a[0], b[0], c[0], a[1], b[1], c[1], a[2], b[2], c[2])


@wp.func
def adjugate_trace(m: wp.mat33d, n: wp.mat33d) -> wp.float64:
    """tr(adj(M) N): the rows of adj(M) are the cross products of M's columns."""
    m0 = wp.vec3d(m[0, 0], m[1, 0], m[2, 0])
    m1 = wp.vec3d(m[0, 1], m[1, 1], m[2, 1])
    m2 = wp.vec3d(m[0, 2], m[1, 2], m[2, 2])
    n0 = wp.vec3d(n[0, 0], n[1, 0], n[2, 0])
    n1 = wp.vec3d(n[0, 1], n[1, 1], n[2, 1])
    n2 = wp.vec3d(n[0, 2], n[1, 2], n[2, 2])
    cross = wp.dot(wp.cross(m1, m2), n0) + wp.dot(wp.cross(m2, m0), n1)
    return cross + wp.dot(wp.cross(m0, m1), n2)


@wp.func
def cubic(c: wp.vec4d, t: wp.float64) -> wp.float64:
    """c0 + c1 t + c2 t^2 + c3 t^3."""
    return ((c[3] * t + c[2]) * t + c[1]) * t + c[0]


@wp.func
def critical_point(r: wp.float64) -> wp.float64:
    """r where it lies inside (0, 1), else 0 (a breakpoint that adds no piece)."""
    if r > wp.float64(0.0) and r < wp.float64(1.0):
        return r
    return wp.float64(0.0)


@wp.func
def first_crossing(f0: wp.mat33d, df: wp.mat33d, floor: wp.float64, bisections: int) -> wp.float64:
    """The first t in [0, 1] with ``det(f0 + t df) = floor``, for a tet at or above the floor
    at t = 0 and below it at t = 1: the largest t found whose value is not below it."""
    c = wp.vec4d(
        wp.determinant(f0), adjugate_trace(f0, df), adjugate_trace(df, f0), wp.determinant(df)
    )
    # The critical points: roots of 3 c3 t^2 + 2 c2 t + c1.
    a = wp.float64(3.0) * c[3]
    b = wp.float64(2.0) * c[2]
    r1 = wp.float64(0.0)
    r2 = wp.float64(0.0)
    if a != wp.float64(0.0):
        disc = b * b - wp.float64(4.0) * a * c[1]
        if disc >= wp.float64(0.0):
            root = wp.sqrt(disc)
            r1 = (-b - root) / (wp.float64(2.0) * a)
            r2 = (-b + root) / (wp.float64(2.0) * a)
    elif b != wp.float64(0.0):
        r1 = -c[1] / b
        r2 = r1
    r1 = critical_point(r1)
    r2 = critical_point(r2)
    p1 = wp.min(r1, r2)
    p2 = wp.max(r1, r2)
    # The piece [lo, hi] that holds the first crossing.
    lo = wp.float64(0.0)
    hi = wp.float64(1.0)
    if p1 > wp.float64(0.0) and cubic(c, p1) < floor:
        hi = p1
    elif p2 > wp.float64(0.0) and cubic(c, p2) < floor:
        lo = p1
        hi = p2
    else:
        lo = p2
    for _ in range(bisections):
        mid = wp.float64(0.5) * (lo + hi)
        if cubic(c, mid) >= floor:
            lo = mid
        else:
            hi = mid
    return lo
