"""Warp kernel of the intersection check: surface edges that pass through surface triangles.

``edge_face_crossings`` takes one boundary edge per thread, asks a BVH over the boundary
triangles (float32 boxes, padded) for the triangles whose boxes its box overlaps, and tests
each that shares no vertex with it exactly in float64: the edge crosses the triangle where
its ends lie strictly on opposite sides of the triangle's plane and the line through it
passes strictly inside the triangle's three edges (signed volumes of one sign). Two closed
surfaces that intersect cross this way somewhere (an edge of one through a triangle of the
other); touching at a vertex or along an edge, a measure-zero case, is not counted. Found
rows ``(edge, triangle)`` are written at slots taken with an atomic counter (rows past the
output's length are counted, not written).

Pure Warp: the torch side is :mod:`diffsim.contact.intersections`.
"""

import warp as wp


@wp.func
def signed_volume(a: wp.vec3d, b: wp.vec3d, c: wp.vec3d, d: wp.vec3d) -> wp.float64:
    """Six times the signed volume of the tet (a, b, c, d)."""
    return wp.dot(wp.cross(b - a, c - a), d - a)


@wp.func
def edge_crosses_triangle(p: wp.vec3d, q: wp.vec3d, a: wp.vec3d, b: wp.vec3d, c: wp.vec3d) -> bool:
    """Whether the segment p-q passes through the interior of the triangle (a, b, c)."""
    sp = signed_volume(a, b, c, p)
    sq = signed_volume(a, b, c, q)
    if not (
        (sp > wp.float64(0.0) and sq < wp.float64(0.0))
        or (sp < wp.float64(0.0) and sq > wp.float64(0.0))
    ):
        return False
    s0 = signed_volume(p, q, a, b)
    s1 = signed_volume(p, q, b, c)
    s2 = signed_volume(p, q, c, a)
    zero = wp.float64(0.0)
    return (s0 > zero and s1 > zero and s2 > zero) or (s0 < zero and s1 < zero and s2 < zero)


@wp.func
def f32(p: wp.vec3d) -> wp.vec3:
    return wp.vec3(float(p[0]), float(p[1]), float(p[2]))


@wp.kernel
def edge_face_crossings(
    bvh: wp.uint64,
    x: wp.array(dtype=wp.vec3d),
    edges: wp.array2d(dtype=wp.int32),
    faces: wp.array2d(dtype=wp.int32),
    pad: float,
    count: wp.array(dtype=wp.int32),
    found: wp.array2d(dtype=wp.int32),
):
    """Rows ``(edge, triangle)`` of the boundary edges that cross boundary triangles at x."""
    i = wp.tid()
    ip = edges[i, 0]
    iq = edges[i, 1]
    p = x[ip]
    q = x[iq]
    pad3 = wp.vec3(pad, pad, pad)
    query = wp.bvh_query_aabb(bvh, wp.min(f32(p), f32(q)) - pad3, wp.max(f32(p), f32(q)) + pad3)
    j = int(0)  # noqa: UP018 - a mutable Warp variable
    while wp.bvh_query_next(query, j):
        a = faces[j, 0]
        b = faces[j, 1]
        c = faces[j, 2]
        shared = a == ip or a == iq or b == ip or b == iq or c == ip or c == iq
        if not shared:
            if edge_crosses_triangle(p, q, x[a], x[b], x[c]):
                slot = wp.atomic_add(count, 0, 1)
                if slot < found.shape[0]:
                    found[slot, 0] = i
                    found[slot, 1] = j
