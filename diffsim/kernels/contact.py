"""Warp kernels for surface contact: BVH broad phase, closest features, barrier forces, CCD.

Kernels are generated once per scalar type (float32, float64) by closures. The force kernel
writes ``f = -dE/dx`` from closed-form gradients of the barrier; its Warp adjoint (the
kernel differentiated by Warp) gives the Hessian-vector products of the backward pass.
Closest-point weights follow the same region tests and formulas as the torch reference in
:mod:`diffsim.contact.distances`.
"""

import torch
import warp as wp

from diffsim.backends.warp.setup import init_warp
from diffsim.contact.ccd import (
    ABSOLUTE_ROUNDS,
    EQUALIZE_ROUNDS,
    MIN_GAP_FRACTION,
    SCALE_SLACK,
)

init_warp()

# Point-triangle pairs carry kind 0, edge-edge pairs kind 1.
POINT_TRIANGLE, EDGE_EDGE = 0, 1
_KERNELS: dict = {}


def _make_kernels(scalar):
    vec3 = {wp.float32: wp.vec3f, wp.float64: wp.vec3d}[scalar]
    vec4 = {wp.float32: wp.vec4f, wp.float64: wp.vec4d}[scalar]
    zero, one, two = scalar(0.0), scalar(1.0), scalar(2.0)

    @wp.func
    def seg_param(p: vec3, a: vec3, b: vec3) -> scalar:
        e = b - a
        return wp.dot(p - a, e) / wp.max(wp.dot(e, e), scalar(1e-30))

    @wp.func
    def pt_weights(p: vec3, a: vec3, b: vec3, c: vec3) -> vec4:
        """Weights (1, -beta_a, -beta_b, -beta_c) of p - q, q the closest point on abc."""
        ab = b - a
        ac = c - a
        ap = p - a
        d1 = wp.dot(ab, ap)
        d2 = wp.dot(ac, ap)
        if d1 <= zero and d2 <= zero:
            return vec4(one, -one, zero, zero)
        bp = p - b
        d3 = wp.dot(ab, bp)
        d4 = wp.dot(ac, bp)
        if d3 >= zero and d4 <= d3:
            return vec4(one, zero, -one, zero)
        vc = d1 * d4 - d3 * d2
        if vc <= zero and d1 >= zero and d3 <= zero:
            t = seg_param(p, a, b)
            return vec4(one, t - one, -t, zero)
        cp = p - c
        d5 = wp.dot(ab, cp)
        d6 = wp.dot(ac, cp)
        if d6 >= zero and d5 <= d6:
            return vec4(one, zero, zero, -one)
        vb = d5 * d2 - d1 * d6
        if vb <= zero and d2 >= zero and d6 <= zero:
            t = seg_param(p, c, a)
            return vec4(one, -t, zero, t - one)
        va = d3 * d6 - d5 * d4
        if va <= zero and d4 - d3 >= zero and d5 - d6 >= zero:
            t = seg_param(p, b, c)
            return vec4(one, zero, t - one, -t)
        a00 = wp.dot(ab, ab)
        a01 = wp.dot(ab, ac)
        a11 = wp.dot(ac, ac)
        r0 = wp.dot(ab, ap)
        r1 = wp.dot(ac, ap)
        det = wp.max(a00 * a11 - a01 * a01, scalar(1e-30))
        u = (a11 * r0 - a01 * r1) / det
        v = (a00 * r1 - a01 * r0) / det
        return vec4(one, u + v - one, -u, -v)

    @wp.func
    def ee_weights(p0: vec3, p1: vec3, q0: vec3, q1: vec3, parallel_fraction: scalar) -> vec4:
        """Weights (1 - s, s, -(1 - t), -t) of the closest points of edges p0p1, q0q1."""
        da = p1 - p0
        db = q1 - q0
        r = p0 - q0
        a = wp.dot(da, da)
        e = wp.dot(db, db)
        b = wp.dot(da, db)
        c = wp.dot(da, r)
        f = wp.dot(db, r)
        denom = a * e - b * b
        # Classification on values (no derivative flows through the branch choice).
        s = zero
        if denom > parallel_fraction * a * e:
            s = wp.clamp((b * f - c * e) / denom, zero, one)
        t = (b * s + f) / e
        if t < zero:
            t = zero
            s = wp.clamp(-c / a, zero, one)
        elif t > one:
            t = one
            s = wp.clamp((b - c) / a, zero, one)
        s_in = s > zero and s < one
        t_in = t > zero and t < one
        # Differentiable parameters for the classified type.
        if s_in and t_in:
            s = (b * f - c * e) / denom
            t = (a * f - b * c) / denom
        elif s_in:
            if t <= zero:
                s = seg_param(q0, p0, p1)
            else:
                s = seg_param(q1, p0, p1)
        elif t_in:
            if s <= zero:
                t = seg_param(p0, q0, q1)
            else:
                t = seg_param(p1, q0, q1)
        return vec4(one - s, s, t - one, -t)

    @wp.func
    def barrier_d(s: scalar, s_hat: scalar) -> scalar:
        d = s - s_hat
        return -two * d * wp.log(s / s_hat) - d * d / s

    @wp.func
    def barrier_v(s: scalar, s_hat: scalar) -> scalar:
        d = s - s_hat
        return -d * d * wp.log(s / s_hat)

    @wp.func
    def pair_weights(
        kind: int, x0: vec3, x1: vec3, x2: vec3, x3: vec3, parallel_fraction: scalar
    ) -> vec4:
        if kind == 0:
            return pt_weights(x0, x1, x2, x3)
        return ee_weights(x0, x1, x2, x3, parallel_fraction)

    @wp.kernel
    def barrier_forces(
        x: wp.array(dtype=vec3),
        mass: wp.array(dtype=scalar),
        pairs: wp.array2d(dtype=wp.int32),
        kinds: wp.array(dtype=wp.int32),
        eps: wp.array(dtype=scalar),
        s_hat: scalar,
        floor: scalar,
        kappa: scalar,
        parallel_fraction: scalar,
        f: wp.array(dtype=vec3),
        energy: wp.array(dtype=scalar),
    ):
        k = wp.tid()
        i0 = pairs[k, 0]
        i1 = pairs[k, 1]
        i2 = pairs[k, 2]
        i3 = pairs[k, 3]
        x0 = x[i0]
        x1 = x[i1]
        x2 = x[i2]
        x3 = x[i3]
        kind = kinds[k]
        c = pair_weights(kind, x0, x1, x2, x3, parallel_fraction)
        diff = c[0] * x0 + c[1] * x1 + c[2] * x2 + c[3] * x3
        d2 = wp.dot(diff, diff)
        if d2 >= s_hat:
            return
        w = kappa * wp.min(wp.min(mass[i0], mass[i1]), wp.min(mass[i2], mass[i3]))
        db = zero
        bv = barrier_v(floor, s_hat)
        if d2 > floor:
            db = barrier_d(d2, s_hat)
            bv = barrier_v(d2, s_hat)
        mol = one
        g1 = vec3(zero, zero, zero)
        g3 = vec3(zero, zero, zero)
        if kind == 1:
            e0 = x1 - x0
            e1 = x3 - x2
            cr = wp.cross(e0, e1)
            cs = wp.dot(cr, cr)
            if cs < eps[k]:
                r = cs / eps[k]
                mol = (two - r) * r
                dm = two * (one - r) / eps[k]
                # -w b dm/dx: gradient of c = |e0 x e1|^2 is 2 e1 x cr (p1), 2 cr x e0 (q1).
                g1 = (w * bv * dm * two) * wp.cross(e1, cr)
                g3 = (w * bv * dm * two) * wp.cross(cr, e0)
        gd = (w * mol * db * two) * diff
        wp.atomic_sub(f, i0, c[0] * gd - g1)
        wp.atomic_sub(f, i1, c[1] * gd + g1)
        wp.atomic_sub(f, i2, c[2] * gd - g3)
        wp.atomic_sub(f, i3, c[3] * gd + g3)
        energy[k] = w * mol * bv

    @wp.kernel
    def pair_distances(
        x: wp.array(dtype=vec3),
        pairs: wp.array2d(dtype=wp.int32),
        kinds: wp.array(dtype=wp.int32),
        parallel_fraction: scalar,
        d2: wp.array(dtype=scalar),
    ):
        """Squared distance of each pair's closest points."""
        k = wp.tid()
        x0 = x[pairs[k, 0]]
        x1 = x[pairs[k, 1]]
        x2 = x[pairs[k, 2]]
        x3 = x[pairs[k, 3]]
        c = pair_weights(kinds[k], x0, x1, x2, x3, parallel_fraction)
        diff = c[0] * x0 + c[1] * x1 + c[2] * x2 + c[3] * x3
        d2[k] = wp.dot(diff, diff)

    @wp.func
    def side_reach(kind: int, y0: vec3, y1: vec3, y2: vec3, y3: vec3) -> scalar:
        """max over side A of |y_i| + max over side B of |y_j| (see contact/ccd.py)."""
        s0 = wp.length(y0)
        s1 = wp.length(y1)
        s2 = wp.length(y2)
        s3 = wp.length(y3)
        if kind == 1:
            return wp.max(s0, s1) + wp.max(s2, s3)
        return s0 + wp.max(s1, wp.max(s2, s3))

    @wp.func
    def relative_reach(kind: int, y0: vec3, y1: vec3, y2: vec3, y3: vec3) -> scalar:
        """side_reach after subtracting the mean of the four displacements."""
        c = scalar(0.25) * (y0 + y1 + y2 + y3)
        return side_reach(kind, y0 - c, y1 - c, y2 - c, y3 - c)

    @wp.kernel
    def step_scales(
        x: wp.array(dtype=vec3),
        dx: wp.array(dtype=vec3),
        pairs: wp.array2d(dtype=wp.int32),
        kinds: wp.array(dtype=wp.int32),
        keep: scalar,
        slack: scalar,
        parallel_fraction: scalar,
        alpha: wp.array(dtype=scalar),
        bound: wp.array(dtype=scalar),
        t_abs: wp.array(dtype=scalar),
    ):
        """Pass 1: each pair's relative limit t_k lowers its vertices' scales."""
        k = wp.tid()
        i0 = pairs[k, 0]
        i1 = pairs[k, 1]
        i2 = pairs[k, 2]
        i3 = pairs[k, 3]
        kind = kinds[k]
        c = pair_weights(kind, x[i0], x[i1], x[i2], x[i3], parallel_fraction)
        diff = c[0] * x[i0] + c[1] * x[i1] + c[2] * x[i2] + c[3] * x[i3]
        limit = (one - keep) * wp.length(diff)
        bound[k] = limit
        aim = (one - slack) * limit
        y0 = dx[i0]
        y1 = dx[i1]
        y2 = dx[i2]
        y3 = dx[i3]
        absolute = side_reach(kind, y0, y1, y2, y3)
        ta = one
        if absolute > aim:
            ta = aim / absolute
        t_abs[k] = ta
        reach = relative_reach(kind, y0, y1, y2, y3)
        if reach > aim:
            t = aim / reach
            wp.atomic_min(alpha, i0, t)
            wp.atomic_min(alpha, i1, t)
            wp.atomic_min(alpha, i2, t)
            wp.atomic_min(alpha, i3, t)

    @wp.kernel
    def verify_scales(
        dx: wp.array(dtype=vec3),
        pairs: wp.array2d(dtype=wp.int32),
        kinds: wp.array(dtype=wp.int32),
        bound: wp.array(dtype=scalar),
        t_abs: wp.array(dtype=scalar),
        alpha_in: wp.array(dtype=scalar),
        mode: int,
        settled: wp.array(dtype=wp.int32),
        alpha_out: wp.array(dtype=scalar),
        failing: wp.array(dtype=wp.int32),
    ):
        """A verification round at the scaled displacements (mode 0: equalize a failing
        pair's scales; 1: give it the absolute bound; 2: absolute bound for every pair left)."""
        k = wp.tid()
        if settled[k] != 0:
            return
        i0 = pairs[k, 0]
        i1 = pairs[k, 1]
        i2 = pairs[k, 2]
        i3 = pairs[k, 3]
        a0 = alpha_in[i0]
        a1 = alpha_in[i1]
        a2 = alpha_in[i2]
        a3 = alpha_in[i3]
        if mode != 2:
            reach = relative_reach(kinds[k], a0 * dx[i0], a1 * dx[i1], a2 * dx[i2], a3 * dx[i3])
            if reach <= bound[k]:
                return
            wp.atomic_add(failing, 0, 1)
        t = t_abs[k]
        if mode == 0:
            t = wp.min(wp.min(a0, a1), wp.min(a2, a3))
        else:
            settled[k] = 1
        wp.atomic_min(alpha_out, i0, t)
        wp.atomic_min(alpha_out, i1, t)
        wp.atomic_min(alpha_out, i2, t)
        wp.atomic_min(alpha_out, i3, t)

    @wp.kernel
    def element_boxes(
        x: wp.array(dtype=vec3),
        elements: wp.array2d(dtype=wp.int32),
        corners: int,
        lowers: wp.array(dtype=wp.vec3),
        uppers: wp.array(dtype=wp.vec3),
    ):
        k = wp.tid()
        p = x[elements[k, 0]]
        lo = wp.vec3(float(p[0]), float(p[1]), float(p[2]))
        hi = lo
        for j in range(1, corners):
            q = x[elements[k, j]]
            qf = wp.vec3(float(q[0]), float(q[1]), float(q[2]))
            lo = wp.min(lo, qf)
            hi = wp.max(hi, qf)
        lowers[k] = lo
        uppers[k] = hi

    return {
        "barrier_forces": barrier_forces,
        "step_scales": step_scales,
        "verify_scales": verify_scales,
        "pair_distances": pair_distances,
        "element_boxes": element_boxes,
    }


@wp.kernel
def _query_vertex_face(
    bvh: wp.uint64,
    lowers: wp.array(dtype=wp.vec3),
    uppers: wp.array(dtype=wp.vec3),
    vertices: wp.array(dtype=wp.int32),
    faces: wp.array2d(dtype=wp.int32),
    pad: float,
    count: wp.array(dtype=wp.int32),
    out: wp.array2d(dtype=wp.int32),
):
    i = wp.tid()
    v = vertices[i]
    pad3 = wp.vec3(pad, pad, pad)
    query = wp.bvh_query_aabb(bvh, lowers[i] - pad3, uppers[i] + pad3)
    j = int(0)  # noqa: UP018 - a mutable Warp variable
    while wp.bvh_query_next(query, j):
        if faces[j, 0] != v and faces[j, 1] != v and faces[j, 2] != v:
            slot = wp.atomic_add(count, 0, 1)
            if slot < out.shape[0]:
                out[slot, 0] = i
                out[slot, 1] = j


@wp.kernel
def _query_edge_edge(
    bvh: wp.uint64,
    lowers: wp.array(dtype=wp.vec3),
    uppers: wp.array(dtype=wp.vec3),
    edges: wp.array2d(dtype=wp.int32),
    pad: float,
    count: wp.array(dtype=wp.int32),
    out: wp.array2d(dtype=wp.int32),
):
    i = wp.tid()
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
                slot = wp.atomic_add(count, 0, 1)
                if slot < out.shape[0]:
                    out[slot, 0] = i
                    out[slot, 1] = j


def kernels(dtype: torch.dtype) -> dict:
    """The contact kernels for a torch dtype (float32 or float64), built on first use."""
    if dtype not in _KERNELS:
        scalar = {torch.float32: wp.float32, torch.float64: wp.float64}[dtype]
        _KERNELS[dtype] = _make_kernels(scalar)
    return _KERNELS[dtype]


def _vec3(t: torch.Tensor):
    vec3 = {torch.float32: wp.vec3f, torch.float64: wp.vec3d}[t.dtype]
    return wp.from_torch(t.contiguous(), dtype=vec3)


def _int32(t: torch.Tensor):
    return wp.from_torch(t.to(torch.int32).contiguous())


def _boxes(x_wp, elements: torch.Tensor, dtype: torch.dtype, device: str):
    n = len(elements)
    lowers = wp.empty(n, dtype=wp.vec3, device=device)
    uppers = wp.empty(n, dtype=wp.vec3, device=device)
    if n:
        wp.launch(
            kernels(dtype)["element_boxes"],
            dim=n,
            inputs=[x_wp, _int32(elements), elements.shape[1]],
            outputs=[lowers, uppers],
            device=device,
        )
    return lowers, uppers


def _collect(kernel, dim: int, inputs: list, device: str, guess: int) -> torch.Tensor:
    """Runs a pair-writing query kernel, growing the output until every pair fits."""
    capacity = max(guess, 1024)
    while True:
        count = wp.zeros(1, dtype=wp.int32, device=device)
        out = wp.empty((capacity, 2), dtype=wp.int32, device=device)
        if dim:
            wp.launch(kernel, dim=dim, inputs=[*inputs, count, out], device=device)
        found = int(count.numpy()[0])
        if found <= capacity:
            return wp.to_torch(out)[:found].to(torch.int64)
        capacity = found


def bvh_candidates(surface, x: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertex-face ``[k1, 2]`` and edge-edge ``[k2, 2]`` candidate index pairs (Warp BVH).

    Boxes are built in float32 and padded by ``radius`` plus a relative slack that covers the
    float32 rounding of the coordinates.
    """
    device = str(x.device)
    dtype = x.dtype
    x_wp = _vec3(x)
    scale = float(x.abs().max()) if len(x) else 1.0
    pad = float(radius) + 1e-6 * scale
    f_lo, f_hi = _boxes(x_wp, surface.faces, dtype, device)
    e_lo, e_hi = _boxes(x_wp, surface.edges, dtype, device)
    v_lo, v_hi = _boxes(x_wp, surface.vertices[:, None], dtype, device)
    vf = torch.zeros((0, 2), dtype=torch.int64, device=x.device)
    ee = torch.zeros((0, 2), dtype=torch.int64, device=x.device)
    if len(surface.faces) and len(surface.vertices):
        bvh_f = wp.Bvh(f_lo, f_hi)
        inputs = [bvh_f.id, v_lo, v_hi, _int32(surface.vertices), _int32(surface.faces), pad]
        vf = _collect(_query_vertex_face, len(surface.vertices), inputs, device, 8 * len(x))
    if len(surface.edges) > 1:
        bvh_e = wp.Bvh(e_lo, e_hi)
        inputs = [bvh_e.id, e_lo, e_hi, _int32(surface.edges), pad]
        ee = _collect(_query_edge_edge, len(surface.edges), inputs, device, 8 * len(x))
    return vf, ee


class PairArrays:
    """Candidate pairs in Warp form: ``[k, 4]`` int32 vertex ids, kinds and mollifier eps."""

    def __init__(self, candidates, dtype: torch.dtype) -> None:
        pt, ee = candidates.point_triangle, candidates.edge_edge
        self.n = len(pt) + len(ee)
        device = pt.device
        self.pairs = torch.cat([pt, ee]).to(torch.int32).reshape(-1, 4).contiguous()
        self.kinds = torch.cat(
            [
                torch.full((len(pt),), POINT_TRIANGLE, dtype=torch.int32, device=device),
                torch.full((len(ee),), EDGE_EDGE, dtype=torch.int32, device=device),
            ]
        )
        self.eps = torch.cat(
            [torch.ones(len(pt), dtype=dtype, device=device), candidates.mollifier_eps.to(dtype)]
        )
        self.wp_pairs = wp.from_torch(self.pairs)
        self.wp_kinds = wp.from_torch(self.kinds)
        self.wp_eps = wp.from_torch(self.eps)


def _parallel_fraction(dtype: torch.dtype) -> float:
    from diffsim.contact.distances import PARALLEL_FRACTION

    return PARALLEL_FRACTION[dtype]


def _force_inputs(arrays: "PairArrays", x, mass, dhat: float, floor: float, kappa: float) -> list:
    scalar = {torch.float32: wp.float32, torch.float64: wp.float64}[x.dtype]
    return [
        _vec3(x),
        wp.from_torch(mass.contiguous()),
        arrays.wp_pairs,
        arrays.wp_kinds,
        arrays.wp_eps,
        scalar(dhat**2),
        scalar(floor),
        scalar(kappa),
        scalar(_parallel_fraction(x.dtype)),
    ]


def forces_forward(
    arrays: PairArrays, x: torch.Tensor, mass: torch.Tensor, dhat: float, floor: float, kappa: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Barrier forces ``[n, 3]`` and per-pair energies ``[k]`` (no autograd)."""
    f = torch.zeros_like(x)
    energy = torch.zeros(arrays.n, dtype=x.dtype, device=x.device)
    if arrays.n:
        wp.launch(
            kernels(x.dtype)["barrier_forces"],
            dim=arrays.n,
            inputs=_force_inputs(arrays, x, mass, dhat, floor, kappa),
            outputs=[_vec3(f), wp.from_torch(energy)],
            device=str(x.device),
        )
    return f, energy


def forces_backward(
    arrays: PairArrays,
    x: torch.Tensor,
    mass: torch.Tensor,
    dhat: float,
    floor: float,
    kappa: float,
    grad_f: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vector-Jacobian products of the forces: ``(grad_x [n, 3], grad_mass [n])``."""
    grad_x = torch.zeros_like(x)
    grad_m = torch.zeros_like(mass)
    if arrays.n:
        inputs = _force_inputs(arrays, x, mass, dhat, floor, kappa)
        adj_inputs = [_vec3(grad_x), wp.from_torch(grad_m), None, None, None, *inputs[5:]]
        f = torch.zeros_like(x)
        energy = torch.zeros(arrays.n, dtype=x.dtype, device=x.device)
        adj_energy = torch.zeros_like(energy)
        wp.launch(
            kernels(x.dtype)["barrier_forces"],
            dim=arrays.n,
            inputs=inputs,
            outputs=[_vec3(f), wp.from_torch(energy)],
            adj_inputs=adj_inputs,
            adj_outputs=[_vec3(grad_f.contiguous()), wp.from_torch(adj_energy)],
            adjoint=True,
            device=str(x.device),
        )
    return grad_x, grad_m


def squared_distances(arrays: PairArrays, x: torch.Tensor) -> torch.Tensor:
    """Squared distances ``[k]`` (m^2) of the pairs (as ``contact.potential.pair_distances``,
    point-triangle pairs first; no autograd)."""
    d2 = torch.empty(arrays.n, dtype=x.dtype, device=x.device)
    if arrays.n:
        scalar = {torch.float32: wp.float32, torch.float64: wp.float64}[x.dtype]
        wp.launch(
            kernels(x.dtype)["pair_distances"],
            dim=arrays.n,
            inputs=[
                _vec3(x.detach()),
                arrays.wp_pairs,
                arrays.wp_kinds,
                scalar(_parallel_fraction(x.dtype)),
            ],
            outputs=[wp.from_torch(d2)],
            device=str(x.device),
        )
    return d2


def step_scales(arrays: PairArrays, x: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Per-vertex CCD step scales ``[n]`` (the algorithm of :mod:`diffsim.contact.ccd`).

    One kernel launch when no vertex is limited (the usual case); otherwise one more per
    verification round, each followed by a read of the failing-pair count.
    """
    alpha = torch.ones(len(x), dtype=x.dtype, device=x.device)
    if not arrays.n:
        return alpha
    device = str(x.device)
    scalar = {torch.float32: wp.float32, torch.float64: wp.float64}[x.dtype]
    kern = kernels(x.dtype)
    dx_wp = _vec3(dx.detach())
    bound = torch.empty(arrays.n, dtype=x.dtype, device=x.device)
    t_abs = torch.empty_like(bound)
    bound_wp, t_abs_wp = wp.from_torch(bound), wp.from_torch(t_abs)
    wp.launch(
        kern["step_scales"],
        dim=arrays.n,
        inputs=[
            _vec3(x.detach()),
            dx_wp,
            arrays.wp_pairs,
            arrays.wp_kinds,
            scalar(MIN_GAP_FRACTION),
            scalar(SCALE_SLACK),
            scalar(_parallel_fraction(x.dtype)),
        ],
        outputs=[wp.from_torch(alpha), bound_wp, t_abs_wp],
        device=device,
    )
    if bool((alpha == 1).all()):
        return alpha
    settled = torch.zeros(arrays.n, dtype=torch.int32, device=x.device)
    failing = torch.zeros(1, dtype=torch.int32, device=x.device)
    settled_wp, failing_wp = wp.from_torch(settled), wp.from_torch(failing)

    def round_(mode: int) -> torch.Tensor:
        out = alpha.clone()
        failing.zero_()
        wp.launch(
            kern["verify_scales"],
            dim=arrays.n,
            inputs=[
                dx_wp,
                arrays.wp_pairs,
                arrays.wp_kinds,
                bound_wp,
                t_abs_wp,
                wp.from_torch(alpha),
                mode,
                settled_wp,
            ],
            outputs=[wp.from_torch(out), failing_wp],
            device=device,
        )
        return out

    for r in range(EQUALIZE_ROUNDS + ABSOLUTE_ROUNDS):
        out = round_(0 if r < EQUALIZE_ROUNDS else 1)
        if int(failing[0]) == 0:
            return alpha
        alpha = out
    return round_(2)
