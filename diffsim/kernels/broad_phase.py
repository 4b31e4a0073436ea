"""Warp kernels of the contact broad phase: BVH queries that measure what they find.

Each query thread takes one surface vertex (against a BVH over the boundary triangles) or
one boundary edge (against a BVH over the edges, pairs ``j > i``): element ``first + stride
* tid``, so that a query can run as interleaved parts on several CPU threads. It skips the
pairs that share a vertex and the sliver pairs (joined by a tet edge, found by a binary
search in each vertex's sorted list of tet neighbours, and closer at rest than a fraction
of that edge), and measures the squared distance of every pair whose boxes
come within the pad, with the closest-point weights and the formula of the ``pair_distances`` kernel
of :mod:`diffsim.kernels.contact` (the same values, bit for bit). Only pairs closer than a
given distance are written: rows ``(p, a, b, c)`` or ``(p0, p1, q0, q1)`` of vertex ids and
their squared distances (and an edge pair's mollifier threshold, the product of the two
edges' rest terms, the first scaled), at slots taken with an atomic counter (rows past the
output's length are counted, not written, so the caller can size the output and run
again). On the CPU threads run in order, so a launch's rows come in the order of its query
elements, each element's in the order its tree query finds them.

``closing_vertex_face`` and ``closing_edge_edge`` ask the same trees, refit over the boxes
that elements sweep along a guessed straight motion (``swept_boxes``), whether any pair may
come within a distance along it: its distance at the start less the most the motion can
close it (the bound of :func:`diffsim.contact.ccd.pair_reach`). They count, write nothing,
and stop at the first such pair.

``frame_distances`` measures given pairs (their distances or squared distances) in each of a
run of frames, and ``frame_bounds`` bounds the frames' offsets in one pass (the check that a
run of contact-free substeps stayed clear of contact).

Pure Warp: the torch side is :mod:`diffsim.contact.warp_broad_phase`.
"""

import functools
from types import SimpleNamespace

import warp as wp

from diffsim.kernels.contact import contact_kernels


@wp.struct
class SliverRule:
    """What the sliver-pair test needs (the rule of
    :func:`diffsim.contact.candidates.sliver_pairs`)."""

    offsets: wp.array(dtype=wp.int32)  # [n + 1]: where each vertex's tet neighbours start
    neighbours: wp.array(dtype=wp.int32)  # each vertex's tet neighbours, ascending
    rest: wp.array(dtype=wp.vec3d)  # rest positions about their centroid (m)
    fraction: wp.float64  # of the shortest joining edge


def _build(scalar):
    vec3 = {wp.float32: wp.vec3f, wp.float64: wp.vec3d}[scalar]
    pair_weights = contact_kernels(scalar).pair_weights

    @wp.func
    def squared_distance(kind: int, x0: vec3, x1: vec3, x2: vec3, x3: vec3, pf: scalar) -> scalar:
        c = pair_weights(kind, x0, x1, x2, x3, pf)
        diff = c[0] * x0 + c[1] * x1 + c[2] * x2 + c[3] * x3
        return wp.dot(diff, diff)

    @wp.func
    def f32(p: vec3) -> wp.vec3:
        return wp.vec3(float(p[0]), float(p[1]), float(p[2]))

    @wp.func
    def keep_pair(
        count: wp.array(dtype=wp.int32),
        pairs: wp.array2d(dtype=wp.int32),
        d2: wp.array(dtype=scalar),
        i0: int,
        i1: int,
        i2: int,
        i3: int,
        s: scalar,
    ) -> int:
        """Writes a found pair and its squared distance at the next free row (none where
        the rows are full: the caller grows them and queries again); returns the row."""
        slot = wp.atomic_add(count, 0, 1)
        if slot < pairs.shape[0]:
            pairs[slot, 0] = i0
            pairs[slot, 1] = i1
            pairs[slot, 2] = i2
            pairs[slot, 3] = i3
            d2[slot] = s
        return slot

    @wp.func
    def tied(rule: SliverRule, a: int, b: int) -> bool:
        """Whether vertices a and b are corners of a common tet (b in a's sorted list)."""
        lo = rule.offsets[a]
        hi = rule.offsets[a + 1]
        while lo < hi:
            mid = (lo + hi) // 2
            v = rule.neighbours[mid]
            if v == b:
                return True
            if v < b:
                lo = mid + 1
            else:
                hi = mid
        return False

    # The rest distances are measured in float64 whatever the working dtype.
    rest_squared_distance = squared_distance
    if scalar != wp.float64:
        rest_squared_distance = broad_phase_kernels(wp.float64).squared_distance

    @wp.func
    def tie_length2(rule: SliverRule, a: int, b: int, shortest: wp.float64) -> wp.float64:
        """``shortest``, or the squared rest length of the tet edge a-b where it is shorter."""
        if tied(rule, a, b):
            return wp.min(shortest, wp.length_sq(rule.rest[a] - rule.rest[b]))
        return shortest

    @wp.func
    def sliver(kind: int, i0: int, i1: int, i2: int, i3: int, rule: SliverRule) -> bool:
        """Whether the pair is a sliver pair: joined by a tet edge (from a vertex of one
        element to a vertex of the other) and closer at rest than ``rule.fraction`` of the
        shortest such edge."""
        inf = wp.float64(1e300)
        shortest = tie_length2(rule, i0, i2, inf)
        shortest = tie_length2(rule, i0, i3, shortest)
        if kind == 0:
            shortest = tie_length2(rule, i0, i1, shortest)
        else:
            shortest = tie_length2(rule, i1, i2, shortest)
            shortest = tie_length2(rule, i1, i3, shortest)
        if shortest == inf:
            return False
        r = rule.rest
        # 1e-16: the float64 parallel fraction (contact.distances.PARALLEL_FRACTION).
        s = rest_squared_distance(kind, r[i0], r[i1], r[i2], r[i3], wp.float64(1e-16))
        return s < rule.fraction * rule.fraction * shortest

    @wp.kernel
    def near_vertex_face(
        bvh: wp.uint64,
        first: int,
        stride: int,
        x: wp.array(dtype=vec3),
        vertices: wp.array(dtype=wp.int32),
        faces: wp.array2d(dtype=wp.int32),
        pad: float,
        within2: scalar,
        parallel_fraction: scalar,
        rule: SliverRule,
        count: wp.array(dtype=wp.int32),
        pairs: wp.array2d(dtype=wp.int32),
        d2: wp.array(dtype=scalar),
    ):
        i = first + stride * wp.tid()
        v = vertices[i]
        p = x[v]
        pad3 = wp.vec3(pad, pad, pad)
        query = wp.bvh_query_aabb(bvh, f32(p) - pad3, f32(p) + pad3)
        j = int(0)  # noqa: UP018 - a mutable Warp variable
        while wp.bvh_query_next(query, j):
            a = faces[j, 0]
            b = faces[j, 1]
            c = faces[j, 2]
            if a != v and b != v and c != v:
                s = squared_distance(0, p, x[a], x[b], x[c], parallel_fraction)
                if s < within2:
                    if not sliver(0, v, a, b, c, rule):
                        keep_pair(count, pairs, d2, v, a, b, c, s)

    @wp.kernel
    def near_edge_edge(
        bvh: wp.uint64,
        first: int,
        stride: int,
        x: wp.array(dtype=vec3),
        lowers: wp.array(dtype=wp.vec3),
        uppers: wp.array(dtype=wp.vec3),
        edges: wp.array2d(dtype=wp.int32),
        scaled_length2: wp.array(dtype=wp.float64),
        length2: wp.array(dtype=wp.float64),
        pad: float,
        within2: scalar,
        parallel_fraction: scalar,
        rule: SliverRule,
        count: wp.array(dtype=wp.int32),
        pairs: wp.array2d(dtype=wp.int32),
        d2: wp.array(dtype=scalar),
        eps: wp.array(dtype=wp.float64),
    ):
        i = first + stride * wp.tid()
        a0 = edges[i, 0]
        a1 = edges[i, 1]
        pad3 = wp.vec3(pad, pad, pad)
        query = wp.bvh_query_aabb(bvh, lowers[i] - pad3, uppers[i] + pad3)
        j = int(0)  # noqa: UP018 - a mutable Warp variable
        while wp.bvh_query_next(query, j):
            if j > i:
                b0 = edges[j, 0]
                b1 = edges[j, 1]
                if a0 != b0 and a0 != b1 and a1 != b0 and a1 != b1:
                    s = squared_distance(1, x[a0], x[a1], x[b0], x[b1], parallel_fraction)
                    if s < within2:
                        if not sliver(1, a0, a1, b0, b1, rule):
                            slot = keep_pair(count, pairs, d2, a0, a1, b0, b1, s)
                            if slot < pairs.shape[0]:
                                eps[slot] = scaled_length2[i] * length2[j]

    @wp.func
    def closing_reach(kind: int, y0: vec3, y1: vec3, y2: vec3, y3: vec3) -> scalar:
        """The most a pair's distance can shrink along its vertices' displacements (the
        formula of :func:`diffsim.contact.ccd.pair_reach`): the largest displacement of
        each side, the pair's mean displacement subtracted, summed."""
        c = (y0 + y1 + y2 + y3) * scalar(0.25)
        r0 = wp.length(y0 - c)
        r1 = wp.length(y1 - c)
        r2 = wp.length(y2 - c)
        r3 = wp.length(y3 - c)
        if kind == 0:
            return r0 + wp.max(r1, wp.max(r2, r3))
        return wp.max(r0, r1) + wp.max(r2, r3)

    @wp.func
    def closes(
        kind: int, i0: int, i1: int, i2: int, i3: int, x: wp.array(dtype=vec3),
        dx: wp.array(dtype=vec3), needed: scalar, parallel_fraction: scalar,
    ) -> bool:  # fmt: skip
        """Whether the pair may come within ``needed`` along the motion ``x + t dx``, t in
        [0, 1]: its distance at x less its closing reach is not beyond ``needed``."""
        s = squared_distance(kind, x[i0], x[i1], x[i2], x[i3], parallel_fraction)
        reach = closing_reach(kind, dx[i0], dx[i1], dx[i2], dx[i3])
        return wp.sqrt(wp.max(s, scalar(0.0))) - reach <= needed

    @wp.kernel
    def pairs_closing(
        pairs: wp.array2d(dtype=wp.int32),
        kinds: wp.array(dtype=wp.int32),
        x: wp.array(dtype=vec3),
        dx: wp.array(dtype=vec3),
        needed: scalar,
        parallel_fraction: scalar,
        count: wp.array(dtype=wp.int32),
    ):
        """Counts the given pairs that :func:`closes` (rows of vertex ids, kind per row)."""
        k = wp.tid()
        if closes(kinds[k], pairs[k, 0], pairs[k, 1], pairs[k, 2], pairs[k, 3], x, dx, needed,
                  parallel_fraction):  # fmt: skip
            wp.atomic_add(count, 0, 1)

    @wp.kernel
    def swept_boxes(
        x: wp.array(dtype=vec3),
        dx: wp.array(dtype=vec3),
        elements: wp.array2d(dtype=wp.int32),
        corners: int,
        lowers: wp.array(dtype=wp.vec3),
        uppers: wp.array(dtype=wp.vec3),
    ):
        """The float32 box of element k over the motion ``x + t dx``, t in [0, 1] (its
        corners at both ends)."""
        k = wp.tid()
        lo = f32(x[elements[k, 0]])
        hi = lo
        for j in range(corners):
            start = f32(x[elements[k, j]])
            end = f32(x[elements[k, j]] + dx[elements[k, j]])
            lo = wp.min(lo, wp.min(start, end))
            hi = wp.max(hi, wp.max(start, end))
        lowers[k] = lo
        uppers[k] = hi

    @wp.kernel
    def closing_vertex_face(
        bvh: wp.uint64,
        first: int,
        stride: int,
        x: wp.array(dtype=vec3),
        dx: wp.array(dtype=vec3),
        vertices: wp.array(dtype=wp.int32),
        faces: wp.array2d(dtype=wp.int32),
        pad: float,
        needed: scalar,
        parallel_fraction: scalar,
        rule: SliverRule,
        count: wp.array(dtype=wp.int32),
    ):
        """Counts the vertex-face pairs (swept boxes within ``pad``) that :func:`closes`;
        a thread stops once any thread has counted one."""
        if count[0] > 0:
            return
        i = first + stride * wp.tid()
        v = vertices[i]
        p = f32(x[v])
        q = f32(x[v] + dx[v])
        pad3 = wp.vec3(pad, pad, pad)
        query = wp.bvh_query_aabb(bvh, wp.min(p, q) - pad3, wp.max(p, q) + pad3)
        j = int(0)  # noqa: UP018 - a mutable Warp variable
        while wp.bvh_query_next(query, j):
            a = faces[j, 0]
            b = faces[j, 1]
            c = faces[j, 2]
            if a != v and b != v and c != v:
                if closes(0, v, a, b, c, x, dx, needed, parallel_fraction):
                    if not sliver(0, v, a, b, c, rule):
                        wp.atomic_add(count, 0, 1)
                        return

    @wp.kernel
    def closing_edge_edge(
        bvh: wp.uint64,
        first: int,
        stride: int,
        x: wp.array(dtype=vec3),
        dx: wp.array(dtype=vec3),
        lowers: wp.array(dtype=wp.vec3),
        uppers: wp.array(dtype=wp.vec3),
        edges: wp.array2d(dtype=wp.int32),
        pad: float,
        needed: scalar,
        parallel_fraction: scalar,
        rule: SliverRule,
        count: wp.array(dtype=wp.int32),
    ):
        """Counts the edge-edge pairs (swept boxes within ``pad``, pairs ``j > i``) that
        :func:`closes`; a thread stops once any thread has counted one."""
        if count[0] > 0:
            return
        i = first + stride * wp.tid()
        a0 = edges[i, 0]
        a1 = edges[i, 1]
        pad3 = wp.vec3(pad, pad, pad)
        query = wp.bvh_query_aabb(bvh, lowers[i] - pad3, uppers[i] + pad3)
        j = int(0)  # noqa: UP018 - a mutable Warp variable
        while wp.bvh_query_next(query, j):
            if j > i:
                b0 = edges[j, 0]
                b1 = edges[j, 1]
                if a0 != b0 and a0 != b1 and a1 != b0 and a1 != b1:
                    if closes(1, a0, a1, b0, b1, x, dx, needed, parallel_fraction):
                        if not sliver(1, a0, a1, b0, b1, rule):
                            wp.atomic_add(count, 0, 1)
                            return

    @wp.kernel
    def frame_distances(
        x: wp.array2d(dtype=vec3),
        pairs: wp.array2d(dtype=wp.int32),
        kinds: wp.array(dtype=wp.int32),
        parallel_fraction: scalar,
        root: int,
        out: wp.array2d(dtype=scalar),
    ):
        """Distance of pair k in frame f (positions ``x[f]``), or its square where ``root``
        is 0."""
        f, k = wp.tid()
        x0 = x[f, pairs[k, 0]]
        x1 = x[f, pairs[k, 1]]
        x2 = x[f, pairs[k, 2]]
        x3 = x[f, pairs[k, 3]]
        s = squared_distance(kinds[k], x0, x1, x2, x3, parallel_fraction)
        if root != 0:
            s = wp.sqrt(wp.max(s, scalar(0.0)))
        out[f, k] = s

    @wp.kernel
    def frame_bounds(
        first: int,
        stride: int,
        frames: wp.array2d(dtype=vec3),
        origin: wp.vec3d,
        anchor: wp.array(dtype=wp.vec3d),
        lo_first: wp.array(dtype=wp.vec3d),
        hi_first: wp.array(dtype=wp.vec3d),
        lo_step: wp.array(dtype=wp.vec3d),
        hi_step: wp.array(dtype=wp.vec3d),
        lo_anchor: wp.array(dtype=wp.vec3d),
        hi_anchor: wp.array(dtype=wp.vec3d),
        off_chord: wp.array(dtype=wp.float64),
        bad: wp.array(dtype=wp.int32),
    ):
        """Per frame f = first + stride tid (local positions ``frames[f] - origin``, in
        float64 whatever the frames' dtype): the componentwise bounds over the vertices of
        its positions less the first frame's, less the previous frame's (f > 0, written at
        f - 1) and less the anchor's, and the largest distance of a vertex from its straight
        path from the first frame to the last (at the fraction f / (F - 1) of it); ``bad``
        is set where a position is not finite (the bounds are then void)."""
        f = first + stride * wp.tid()
        last = frames.shape[0] - 1
        along = wp.float64(0.0)
        if last > 0:
            along = wp.float64(f) / wp.float64(last)
        before = wp.max(f - 1, 0)  # (frame 0 has no step: its step bounds are not written)
        # Starting from +-inf the first vertex sets every bound: one loop, no branch in it.
        # (Each its own vector: a copy assigned in Warp names the same variable.)
        inf = wp.float64(wp.inf)
        lo_d = wp.vec3d(inf, inf, inf)
        hi_d = wp.vec3d(-inf, -inf, -inf)
        lo_a = wp.vec3d(inf, inf, inf)
        hi_a = wp.vec3d(-inf, -inf, -inf)
        lo_s = wp.vec3d(inf, inf, inf)
        hi_s = wp.vec3d(-inf, -inf, -inf)
        off2 = wp.float64(0.0)  # the largest squared distance from the path
        total = wp.float64(0.0)  # not finite where any position is not
        for i in range(frames.shape[1]):
            x = wp.vec3d(frames[f, i]) - origin
            x0 = wp.vec3d(frames[0, i]) - origin
            d = x - x0
            lo_d = wp.min(lo_d, d)
            hi_d = wp.max(hi_d, d)
            off = d - along * ((wp.vec3d(frames[last, i]) - origin) - x0)
            off2 = wp.max(off2, wp.dot(off, off))
            a = x - anchor[i]
            lo_a = wp.min(lo_a, a)
            hi_a = wp.max(hi_a, a)
            st = x - (wp.vec3d(frames[before, i]) - origin)
            lo_s = wp.min(lo_s, st)
            hi_s = wp.max(hi_s, st)
            total += x[0] + x[1] + x[2]
        lo_first[f] = lo_d
        hi_first[f] = hi_d
        lo_anchor[f] = lo_a
        hi_anchor[f] = hi_a
        off_chord[f] = wp.sqrt(off2)
        if f > 0:
            lo_step[f - 1] = lo_s
            hi_step[f - 1] = hi_s
        if not wp.isfinite(total):
            bad[0] = 1

    return SimpleNamespace(
        squared_distance=squared_distance,
        near_vertex_face=near_vertex_face,
        near_edge_edge=near_edge_edge,
        frame_distances=frame_distances,
        frame_bounds=frame_bounds,
        swept_boxes=swept_boxes,
        pairs_closing=pairs_closing,
        closing_vertex_face=closing_vertex_face,
        closing_edge_edge=closing_edge_edge,
    )


@functools.cache
def broad_phase_kernels(scalar) -> SimpleNamespace:
    """The broad-phase kernels for ``wp.float32`` or ``wp.float64``, built on first use:
    ``near_vertex_face``, ``near_edge_edge``, ``frame_distances``, ``frame_bounds`` and, for
    the swept test of a guessed motion, ``swept_boxes``, ``closing_vertex_face``,
    ``closing_edge_edge`` and ``pairs_closing`` (given pairs), and the function
    ``squared_distance`` they measure pairs with."""
    if scalar not in (wp.float32, wp.float64):
        raise ValueError(f"broad-phase kernels exist for wp.float32 and wp.float64, not {scalar}")
    return _build(scalar)
