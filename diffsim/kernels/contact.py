"""Warp kernels for surface contact: BVH queries, closest features, barrier forces,
friction, CCD.

Pure Warp (no torch, nothing of diffsim outside kernels/): the torch side, which launches
them, is :mod:`diffsim.contact.warp_glue`. Kernels are generated once per scalar type
(float32, float64) by :func:`contact_kernels`. The force kernel writes ``f = -dE/dx`` from
closed-form gradients of the barrier; its Warp adjoint (the kernel differentiated by Warp)
gives the Hessian-vector products of the backward pass. Friction (the formulas of
:mod:`diffsim.contact.friction`) is one kernel for the lagged pair terms and two per pass;
its backward runs their Warp adjoints in reverse. Closest-point weights follow the
same region tests and formulas as the torch reference in :mod:`diffsim.contact.distances`.
The CCD kernels implement the algorithm of :mod:`diffsim.contact.ccd` (its constants are
kernel arguments).
"""

import functools
from types import SimpleNamespace

import warp as wp

# Point-triangle pairs carry kind 0, edge-edge pairs kind 1.
POINT_TRIANGLE, EDGE_EDGE = 0, 1


def _build(scalar):
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
        # a e - b^2, b f - c e and a f - b c as products of cross products (Lagrange's
        # identity): differences of dot products cancel to rounding noise for parallel edges
        # (distances.edge_edge_parameters).
        n = wp.cross(da, db)
        denom = wp.dot(n, n)
        s_num = wp.dot(n, wp.cross(db, r))
        t_num = wp.dot(n, wp.cross(da, r))
        f = wp.dot(db, r)
        # Classification on values (no derivative flows through the branch choice).
        s = zero
        if denom > parallel_fraction * a * e:
            s = wp.clamp(s_num / denom, zero, one)
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
            s = s_num / denom
            t = t_num / denom
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

    @wp.func
    def box_gap2(kind: int, x0: vec3, x1: vec3, x2: vec3, x3: vec3) -> scalar:
        """Squared gap between the bounding boxes of the pair's two sides (0 where they
        overlap): a cheap lower bound on the squared distance."""
        lo_a = x0
        hi_a = x0
        lo_b = wp.min(x2, x3)
        hi_b = wp.max(x2, x3)
        if kind == 1:
            lo_a = wp.min(x0, x1)
            hi_a = wp.max(x0, x1)
        else:
            lo_b = wp.min(lo_b, x1)
            hi_b = wp.max(hi_b, x1)
        g = wp.max(wp.max(lo_b - hi_a, lo_a - hi_b), vec3(zero, zero, zero))
        return wp.dot(g, g)

    @wp.func
    def barrier_pair(
        kind: int, x0: vec3, x1: vec3, x2: vec3, x3: vec3, c: vec4, diff: vec3, d2: scalar,
        eps_k: scalar, w: scalar, s_hat: scalar, floor: scalar,
    ):  # fmt: skip
        """The barrier gradient dE/dx_i at the pair's four vertices (the forces are minus
        these), for a pair within dhat: closest-point weights c, separation diff, its
        squared length d2, mollifier eps_k, ``w = kappa * smallest mass``."""
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
            if cs < eps_k:
                r = cs / eps_k
                mol = (two - r) * r
                dm = two * (one - r) / eps_k
                # -w b dm/dx: gradient of c = |e0 x e1|^2 is 2 e1 x cr (p1), 2 cr x e0 (q1).
                g1 = (w * bv * dm * two) * wp.cross(e1, cr)
                g3 = (w * bv * dm * two) * wp.cross(cr, e0)
        gd = (w * mol * db * two) * diff
        return c[0] * gd - g1, c[1] * gd + g1, c[2] * gd - g3, c[3] * gd + g3

    @wp.func
    def friction_terms(
        kind: int, x0: vec3, x1: vec3, x2: vec3, x3: vec3, m0: scalar, m1: scalar,
        m2: scalar, m3: scalar, c: vec4, sep: vec3, d2: scalar, eps_k: scalar, s_hat: scalar,
        floor: scalar, kappa: scalar, h_mu: scalar,
    ):  # fmt: skip
        """Friction's lagged terms of a pair within dhat (see :func:`friction_geometry`):
        ``(c_i / m_i, unit normal, m_eff, Coulomb limit h mu lambda)``."""
        d2 = wp.max(d2, floor)
        w = wp.min(wp.min(m0, m1), wp.min(m2, m3))
        mol = one
        if kind == 1:
            cr = wp.cross(x1 - x0, x3 - x2)
            cs = wp.dot(cr, cr)
            if cs < eps_k:
                r = cs / eps_k
                mol = (two - r) * r
        d = wp.sqrt(d2)
        normal_force = -kappa * w * mol * two * d * barrier_d(d2, s_hat)
        w0 = c[0] / m0
        w1 = c[1] / m1
        w2 = c[2] / m2
        w3 = c[3] / m3
        m_eff = one / (c[0] * w0 + c[1] * w1 + c[2] * w2 + c[3] * w3)
        return vec4(w0, w1, w2, w3), sep / d, m_eff, h_mu * normal_force

    @wp.func
    def friction_stop(
        c: vec4, n: vec3, me: scalar, lim: scalar, v0: vec3, v1: vec3, v2: vec3, v3: vec3,
        eps_v: scalar,
    ):  # fmt: skip
        """A pair's slip-stopping fraction ``stop`` and impulse ``m_eff stop u`` (kg m/s) at
        velocities v0..v3 (see :func:`friction_slip`)."""
        v_rel = c[0] * v0 + c[1] * v1 + c[2] * v2 + c[3] * v3
        u = v_rel - wp.dot(v_rel, n) * n
        tiny = scalar(1e-6) * eps_v
        speed = wp.sqrt(wp.dot(u, u) + tiny * tiny)
        slope = one / speed
        if speed < eps_v:
            slope = two / eps_v - speed / (eps_v * eps_v)
        gamma = lim * slope / me
        stop = one - one / (one + gamma)
        return stop, (me * stop) * u

    @wp.func
    def friction_capped(most: scalar, before: vec3, impulse: vec3, cap: scalar) -> vec3:
        """A pair's impulse so far after adding ``impulse`` relaxed by the largest load of
        its vertices, capped at the Coulomb limit (see :func:`friction_apply`)."""
        trial = before + (one / wp.max(most, one)) * impulse
        q2 = wp.dot(trial, trial)
        after = trial
        if q2 > cap * cap:
            after = (cap / wp.sqrt(q2)) * trial
        return after

    @wp.func
    def pair_within(
        x: wp.array(dtype=vec3),
        pairs: wp.array2d(dtype=wp.int32),
        kinds: wp.array(dtype=wp.int32),
        k: int,
        s_hat: scalar,
        parallel_fraction: scalar,
    ) -> bool:
        """Whether pair k is closer than sqrt(s_hat) at x (its boxes' gap tested first)."""
        x0 = x[pairs[k, 0]]
        x1 = x[pairs[k, 1]]
        x2 = x[pairs[k, 2]]
        x3 = x[pairs[k, 3]]
        kind = kinds[k]
        if box_gap2(kind, x0, x1, x2, x3) >= s_hat:
            return False
        c = pair_weights(kind, x0, x1, x2, x3, parallel_fraction)
        diff = c[0] * x0 + c[1] * x1 + c[2] * x2 + c[3] * x3
        return wp.dot(diff, diff) < s_hat

    @wp.kernel
    def active_pairs(
        x: wp.array(dtype=vec3),
        pairs: wp.array2d(dtype=wp.int32),
        kinds: wp.array(dtype=wp.int32),
        s_hat: scalar,
        parallel_fraction: scalar,
        count: wp.array(dtype=wp.int32),
        active: wp.array(dtype=wp.int32),
    ):
        """Lists the pairs closer than sqrt(s_hat) (``active[:count[0]]``, pair ids): the
        only ones the barrier and friction kernels visit."""
        k = wp.tid()
        if pair_within(x, pairs, kinds, k, s_hat, parallel_fraction):
            active[wp.atomic_add(count, 0, 1)] = k

    @wp.kernel
    def active_pairs_in(
        x: wp.array(dtype=vec3),
        pairs: wp.array2d(dtype=wp.int32),
        kinds: wp.array(dtype=wp.int32),
        s_hat: scalar,
        parallel_fraction: scalar,
        rows: wp.array(dtype=wp.int64),
        count: wp.array(dtype=wp.int32),
        active: wp.array(dtype=wp.int32),
    ):
        """:func:`active_pairs` among the pairs ``rows``."""
        k = wp.int32(rows[wp.tid()])
        if pair_within(x, pairs, kinds, k, s_hat, parallel_fraction):
            active[wp.atomic_add(count, 0, 1)] = k

    @wp.kernel
    def barrier_forces(
        x: wp.array(dtype=vec3),
        mass: wp.array(dtype=scalar),
        pairs: wp.array2d(dtype=wp.int32),
        kinds: wp.array(dtype=wp.int32),
        eps: wp.array(dtype=scalar),
        active: wp.array(dtype=wp.int32),
        count: wp.array(dtype=wp.int32),
        s_hat: scalar,
        floor: scalar,
        kappa: scalar,
        parallel_fraction: scalar,
        f: wp.array(dtype=vec3),
    ):
        """Forces ``f = -dE/dx`` (added) of the listed pairs (``active[:count[0]]``, from
        :func:`active_pairs`)."""
        t = wp.tid()
        if t >= count[0]:
            return
        k = active[t]
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
        g0, g1, g2, g3 = barrier_pair(kind, x0, x1, x2, x3, c, diff, d2, eps[k], w, s_hat, floor)
        wp.atomic_sub(f, i0, g0)
        wp.atomic_sub(f, i1, g1)
        wp.atomic_sub(f, i2, g2)
        wp.atomic_sub(f, i3, g3)

    @wp.kernel
    def friction_geometry(
        x: wp.array(dtype=vec3),
        mass: wp.array(dtype=scalar),
        pairs: wp.array2d(dtype=wp.int32),
        kinds: wp.array(dtype=wp.int32),
        eps: wp.array(dtype=scalar),
        active: wp.array(dtype=wp.int32),
        count: wp.array(dtype=wp.int32),
        s_hat: scalar,
        floor: scalar,
        kappa: scalar,
        parallel_fraction: scalar,
        h_mu: scalar,
        weights: wp.array(dtype=vec4),
        coef: wp.array(dtype=vec4),
        normal: wp.array(dtype=vec3),
        m_eff: wp.array(dtype=scalar),
        limit: wp.array(dtype=scalar),
    ):
        """Friction's lagged pair terms (see contact/friction.py), per listed pair t
        (``active[t]``, within dhat): the closest-point weights c, the shares ``c_i / m_i``,
        the unit normal, ``m_eff = 1 / sum_i c_i^2 / m_i`` and the Coulomb limit of the
        pair's impulse per substep, ``h mu lambda`` (kg m/s)."""
        t = wp.tid()
        if t >= count[0]:
            return
        k = active[t]
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
        sep = c[0] * x0 + c[1] * x1 + c[2] * x2 + c[3] * x3
        d2 = wp.dot(sep, sep)
        if d2 >= s_hat:
            return
        cf, n, me, lim = friction_terms(
            kind, x0, x1, x2, x3, mass[i0], mass[i1], mass[i2], mass[i3], c, sep, d2, eps[k],
            s_hat, floor, kappa, h_mu,
        )  # fmt: skip
        weights[t] = c
        coef[t] = cf
        normal[t] = n
        m_eff[t] = me
        limit[t] = lim

    @wp.kernel
    def friction_slip(
        pairs: wp.array2d(dtype=wp.int32),
        active: wp.array(dtype=wp.int32),
        count: wp.array(dtype=wp.int32),
        weights: wp.array(dtype=vec4),
        normal: wp.array(dtype=vec3),
        m_eff: wp.array(dtype=scalar),
        limit: wp.array(dtype=scalar),
        v: wp.array(dtype=vec3),
        eps_v: scalar,
        load: wp.array(dtype=scalar),
        impulse: wp.array(dtype=vec3),
    ):
        """One friction pass, part 1: per listed pair, the impulse ``m_eff stop u`` (kg m/s)
        that removes the fraction ``stop = 1 - 1/(1 + gamma)`` of its slip u at velocities
        v, and ``stop`` added to ``load`` at its four vertices."""
        t = wp.tid()
        if t >= count[0]:
            return
        k = active[t]
        i0 = pairs[k, 0]
        i1 = pairs[k, 1]
        i2 = pairs[k, 2]
        i3 = pairs[k, 3]
        stop, imp = friction_stop(
            weights[t], normal[t], m_eff[t], limit[t], v[i0], v[i1], v[i2], v[i3], eps_v
        )
        impulse[t] = imp
        wp.atomic_add(load, i0, stop)
        wp.atomic_add(load, i1, stop)
        wp.atomic_add(load, i2, stop)
        wp.atomic_add(load, i3, stop)

    @wp.kernel
    def friction_apply(
        pairs: wp.array2d(dtype=wp.int32),
        active: wp.array(dtype=wp.int32),
        count: wp.array(dtype=wp.int32),
        coef: wp.array(dtype=vec4),
        limit: wp.array(dtype=scalar),
        impulse: wp.array(dtype=vec3),
        load: wp.array(dtype=scalar),
        total_in: wp.array(dtype=vec3),
        total_out: wp.array(dtype=vec3),
        v_out: wp.array(dtype=vec3),
    ):
        """One friction pass, part 2: the pair's impulse, divided by the largest load of its
        vertices where that exceeds 1, is added to its impulse so far, which is capped at the
        Coulomb limit; each vertex takes ``-c_i / m_i`` of the change."""
        t = wp.tid()
        if t >= count[0]:
            return
        k = active[t]
        i0 = pairs[k, 0]
        i1 = pairs[k, 1]
        i2 = pairs[k, 2]
        i3 = pairs[k, 3]
        most = wp.max(wp.max(load[i0], load[i1]), wp.max(load[i2], load[i3]))
        before = total_in[t]
        after = friction_capped(most, before, impulse[t], limit[t])
        total_out[t] = after
        step = after - before
        cf = coef[t]
        wp.atomic_sub(v_out, i0, cf[0] * step)
        wp.atomic_sub(v_out, i1, cf[1] * step)
        wp.atomic_sub(v_out, i2, cf[2] * step)
        wp.atomic_sub(v_out, i3, cf[3] * step)

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
    def sides_max(kind: int, s0: scalar, s1: scalar, s2: scalar, s3: scalar) -> scalar:
        """The largest of a pair's per-vertex values on side A plus the largest on side B
        (point | triangle, or edge | edge)."""
        if kind == 1:
            return wp.max(s0, s1) + wp.max(s2, s3)
        return s0 + wp.max(s1, wp.max(s2, s3))

    @wp.func
    def side_reach(kind: int, y0: vec3, y1: vec3, y2: vec3, y3: vec3) -> scalar:
        """max over side A of |y_i| + max over side B of |y_j| (see contact/ccd.py)."""
        return sides_max(kind, wp.length(y0), wp.length(y1), wp.length(y2), wp.length(y3))

    @wp.func
    def relative_reach(kind: int, y0: vec3, y1: vec3, y2: vec3, y3: vec3) -> scalar:
        """side_reach after subtracting the mean of the four displacements."""
        c = scalar(0.25) * (y0 + y1 + y2 + y3)
        return side_reach(kind, y0 - c, y1 - c, y2 - c, y3 - c)

    @wp.func
    def pair_aim(
        kind: int, x0: vec3, x1: vec3, x2: vec3, x3: vec3, keep: scalar, slack: scalar,
        parallel_fraction: scalar,
    ):  # fmt: skip
        """A pair's distance bound ``(1 - keep) d`` and the reach its scales aim at,
        ``(1 - slack)`` of it: ``(limit, aim)`` (m)."""
        c = pair_weights(kind, x0, x1, x2, x3, parallel_fraction)
        diff = c[0] * x0 + c[1] * x1 + c[2] * x2 + c[3] * x3
        limit = (one - keep) * wp.length(diff)
        return limit, (one - slack) * limit

    @wp.func
    def pair_scale(
        kind: int, x0: vec3, x1: vec3, x2: vec3, x3: vec3, y0: vec3, y1: vec3, y2: vec3,
        y3: vec3, keep: scalar, slack: scalar, parallel_fraction: scalar,
    ):  # fmt: skip
        """CCD pass 1 for one pair at x0..x3 moving by y0..y3: ``(bound, t_abs, t)``, its
        distance bound ``(1 - keep) d``, absolute scale and relative scale (1: not
        limited; see :func:`step_scales`)."""
        limit, aim = pair_aim(kind, x0, x1, x2, x3, keep, slack, parallel_fraction)
        absolute = side_reach(kind, y0, y1, y2, y3)
        ta = one
        if absolute > aim:
            ta = aim / absolute
        reach = relative_reach(kind, y0, y1, y2, y3)
        t = one
        if reach > aim:
            t = aim / reach
        return limit, ta, t

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
        limit, ta, t = pair_scale(
            kind, x[i0], x[i1], x[i2], x[i3], dx[i0], dx[i1], dx[i2], dx[i3], keep, slack,
            parallel_fraction,
        )  # fmt: skip
        bound[k] = limit
        t_abs[k] = ta
        if t < one:
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

    return SimpleNamespace(
        active_pairs=active_pairs,
        active_pairs_in=active_pairs_in,
        barrier_forces=barrier_forces,
        friction_geometry=friction_geometry,
        friction_slip=friction_slip,
        friction_apply=friction_apply,
        step_scales=step_scales,
        verify_scales=verify_scales,
        pair_distances=pair_distances,
        element_boxes=element_boxes,
        pair_weights=pair_weights,
        box_gap2=box_gap2,
        barrier_pair=barrier_pair,
        friction_terms=friction_terms,
        friction_stop=friction_stop,
        friction_capped=friction_capped,
        pair_scale=pair_scale,
        relative_reach=relative_reach,
        sides_max=sides_max,
        side_reach=side_reach,
        pair_aim=pair_aim,
    )


@functools.cache
def contact_kernels(scalar) -> SimpleNamespace:
    """The contact kernels for ``wp.float32`` or ``wp.float64``, built on first use:
    ``active_pairs``, ``active_pairs_in``, ``barrier_forces``, ``friction_geometry``,
    ``friction_slip``, ``friction_apply``, ``step_scales``, ``verify_scales``,
    ``pair_distances``, ``element_boxes``, and the per-pair functions they are made of
    (``pair_weights``, ``box_gap2``, ``barrier_pair``, ``friction_terms``,
    ``friction_stop``, ``friction_capped``, ``pair_scale``, ``relative_reach``,
    ``sides_max``), which the
    fused contact substeps of :mod:`diffsim.kernels.contact_advance` call too (the BVH
    queries are in :mod:`diffsim.kernels.broad_phase`)."""
    if scalar not in (wp.float32, wp.float64):
        raise ValueError(f"contact kernels exist for wp.float32 and wp.float64, not {scalar}")
    return _build(scalar)
