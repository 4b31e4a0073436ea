"""Per-vertex kernels: ground barrier and friction, and the fused symplectic Euler update.

The formulas are those of :mod:`diffsim.physics.ground`, :mod:`diffsim.physics.velocity` and
:class:`diffsim.backends.torch_backend.TorchBackend`, in the same order of operations:
v += h (f_elastic + m g) / m, damping v / (1 + h c), tanh clamp, fixed mask, the ground
barrier integrated implicitly per vertex (safeguarded Newton on
d' = d_pred + h^2 a(d')), friction from the barrier's normal force at the new height,
x += h v (the height as solved), then the prescribed positions of fixed vertices.
"""

from types import SimpleNamespace

import warp as wp

# The same constant as diffsim.physics.ground (kernels import nothing from diffsim; a test checks).
MIN_GAP_FRACTION = 1e-6
NEWTON_ITERATIONS = 80


def build_integrate(dtype, module: str, differentiable: bool) -> SimpleNamespace:
    """Vertex kernels for one scalar type (``wp.float32`` or ``wp.float64``).

    Built twice per dtype, like :func:`diffsim.kernels.elastic.build_elastic`: forward-only,
    and differentiable (with the ground solve's custom adjoint), the latter on first use.

    Args:
        dtype: the Warp scalar type.
        module: the Warp module the kernels go into.
        differentiable: build the kernels with adjoints.

    Returns:
        A namespace with the Warp function ``integrate_vertex`` that other kernels fuse in
        (and, forward only, its two halves ``vertex_velocity`` and ``vertex_move``, between
        which the fused contact substeps apply surface friction),
        and either ``integrate_vertex_vjp`` (its hand-derived adjoint), ``step_fast``
        (forward only, zeroes the force buffers it reads), ``step_vjp`` (its adjoint) and
        ``ground_roots`` (the ground solve's root, for the torch update around surface
        contact), or ``total_forces`` (differentiable).
    """
    T = dtype
    vec3 = wp.types.vector(3, T)

    @wp.struct
    class VertexUpdate:
        """The settings of the vertex update (one substep), by name."""

        h: T  # substep (s)
        has_ground: int  # 1 with a ground plane
        height: wp.float64  # the plane's y (m)
        dhat: T  # ground barrier activation distance (m)
        kappa: T  # ground barrier stiffness (1/(m^2 s^2))
        friction: T  # Coulomb coefficient with the ground
        eps_v: T  # friction smoothing speed (m/s)
        max_speed: T  # tanh clamp v_max (m/s), 0 for none

    @wp.struct
    class VertexCoefficients:
        """The per-vertex coefficients of the update: the differentiable ones and the mask."""

        mass: wp.array(dtype=T)  # lumped masses [n] (kg)
        gravity: wp.array(dtype=vec3)  # [W] one per world (m/s^2)
        damping: wp.array(dtype=T)  # [W] mass-proportional damping per world (1/s)
        fixed_slot: wp.array(dtype=int)  # [n]: row in the prescribed positions, or -1
        world_size: int  # vertices per world: vertex i is in world i // world_size

    tol = 8.0 * (1.1920929e-07 if dtype == wp.float32 else 2.220446049250313e-16)

    @wp.func
    def barrier_derivative(s: T, s_hat: T) -> T:
        out = T(0.0)
        if s < s_hat:
            d = s - s_hat
            out = T(-2.0) * d * wp.log(s / s_hat) - d * d / s
        return out

    @wp.func
    def ground_acceleration(d: T, dhat: T, kappa: T) -> T:
        # Barrier force per unit mass along +y at gap d (Ground.normal_acceleration).
        s = wp.max(d * d, (T(MIN_GAP_FRACTION) * dhat) * (T(MIN_GAP_FRACTION) * dhat))
        return -kappa * T(2.0) * d * barrier_derivative(s, dhat * dhat)

    @wp.func
    def gap_acceleration(d: T, dhat: T, kappa: T) -> T:
        # a(d) = -kappa 2 d b'(d^2), Ground._acceleration.
        return -kappa * T(2.0) * d * barrier_derivative(d * d, dhat * dhat)

    @wp.func
    def gap_acceleration_slope(d: T, dhat: T, kappa: T) -> T:
        # da/dd = -kappa (2 b'(s) + 4 s b''(s)), Ground._acceleration_slope.
        s_hat = dhat * dhat
        s = d * d
        out = T(0.0)
        if s < s_hat:
            r = s - s_hat
            lg = wp.log(s / s_hat)
            db = T(-2.0) * r * lg - r * r / s
            d2b = T(-2.0) * lg - T(4.0) * r / s + r * r / (s * s)
            out = -kappa * (T(2.0) * db + T(4.0) * s * d2b)
        return out

    @wp.func
    def gap_root(target: T, h: T, dhat: T, kappa: T) -> T:
        # Safeguarded Newton for d - target - h^2 a(d) = 0 in [min_gap, dhat] (Ground.solve).
        min_gap = T(MIN_GAP_FRACTION) * dhat
        lo = min_gap
        hi = dhat
        d = wp.clamp(target, min_gap, dhat)
        for _it in range(NEWTON_ITERATIONS):
            push = h * h * gap_acceleration(d, dhat, kappa)
            phi = d - target - push
            if wp.abs(phi) <= T(tol) * (d + wp.abs(target) + push):
                break
            if phi < T(0.0):
                lo = d
            else:
                hi = d
            newton = d - phi / (T(1.0) - h * h * gap_acceleration_slope(d, dhat, kappa))
            if newton >= lo and newton <= hi:
                d = newton
            else:
                d = T(0.5) * (lo + hi)
        return d

    @wp.func
    def ground_gap(d_pred: T, h: T, dhat: T, kappa: T) -> T:
        """Gap after the implicit barrier step, for a predicted gap d_pred < dhat
        (Ground.solve): the root refined by one Newton step, floored at the minimum gap."""
        d = gap_root(d_pred, h, dhat, kappa)
        slope = T(1.0) - h * h * gap_acceleration_slope(d, dhat, kappa)
        accel = gap_acceleration(d, dhat, kappa)
        d_new = d - (d - d_pred - h * h * accel) / slope
        return wp.max(d_new, T(MIN_GAP_FRACTION) * dhat)

    @wp.func
    def ground_gap_slope(d_pred: T, h: T, dhat: T, kappa: T) -> T:
        """d ground_gap / d d_pred: the root is held fixed; one Newton step gives
        dd'/dd_pred = 1 / (1 - h^2 a'(d')) (0 where the gap is floored)."""
        d = gap_root(d_pred, h, dhat, kappa)
        slope = T(1.0) - h * h * gap_acceleration_slope(d, dhat, kappa)
        accel = gap_acceleration(d, dhat, kappa)
        d_new = d - (d - d_pred - h * h * accel) / slope
        out = T(0.0)
        if d_new >= T(MIN_GAP_FRACTION) * dhat:
            out = T(1.0) / slope
        return out

    @wp.func
    def vertex_force(f_el: vec3, m: T, g: vec3, gap: T, has_ground: int, dhat: T, kappa: T) -> vec3:
        f = f_el + m * g
        if has_ground != 0:
            f = f + vec3(T(0.0), m * ground_acceleration(gap, dhat, kappa), T(0.0))
        return f

    @wp.func
    def friction_slope(speed: T, eps_v: T) -> T:
        # f1(|u|) / |u| of the IPC smoothing (Ground.apply_friction).
        out = T(1.0) / speed
        if speed < eps_v:
            out = T(2.0) / eps_v - speed / (eps_v * eps_v)
        return out

    @wp.func
    def velocity_replay(v: vec3, f: vec3, m: T, damping: T, is_fixed: int, s: VertexUpdate):
        """``vertex_velocity``'s intermediates: a = v + h f / m, q = 1 + h c, b = a / q, the
        clamp's phi(|b|^2 / v_max^2) and d phi / d r2, and w = b phi (zero if fixed)."""
        h = s.h
        max_speed = s.max_speed
        a = v + h * f / m
        q = T(1.0) + h * damping
        b = a / q
        phi = T(1.0)
        dphi = T(0.0)  # d phi / d r2
        if max_speed > T(0.0):
            r2 = wp.dot(b, b) / (max_speed * max_speed)
            phi = T(1.0) - r2 / T(3.0)
            dphi = T(-1.0) / T(3.0)
            if r2 >= T(1e-8):
                r = wp.sqrt(r2)
                t = wp.tanh(r)
                phi = t / r
                dphi = ((T(1.0) - t * t) / r - t / (r * r)) / (T(2.0) * r)
        w = b * phi
        if is_fixed != 0:
            w = w * T(0.0)
        return q, b, phi, dphi, w

    @wp.func
    def vertex_velocity(v: vec3, f: vec3, m: T, damping: T, is_fixed: int, s: VertexUpdate) -> vec3:
        """The velocity update before the ground: forces, damping, clamp, fixed mask."""
        q, b, phi, dphi, w = velocity_replay(v, f, m, damping, is_fixed, s)
        return w

    @wp.func
    def vertex_move(x: wp.vec3d, v1: vec3, s: VertexUpdate):
        """The free move ``x + h v`` and the implicit ground step: ``(x_new, v_new)``
        (fixed vertices are placed by the caller)."""
        h = s.h
        has_ground = s.has_ground
        height = s.height
        dhat = s.dhat
        kappa = s.kappa
        friction = s.friction
        eps_v = s.eps_v
        # Positions are float64: the increment h v is added in float64, never lost.
        xn = x + wp.vec3d(h * v1)
        if has_ground != 0:
            d_pred = T(x[1] - height) + h * v1[1]
            if d_pred < dhat:
                # The barrier's impulse changes the velocity; the height is the solved gap.
                d_new = ground_gap(d_pred, h, dhat, kappa)
                normal = gap_acceleration(d_new, dhat, kappa)
                v1 = vec3(v1[0], v1[1] + h * normal, v1[2])
                if friction > T(0.0):
                    u = vec3(v1[0], T(0.0), v1[2])
                    tiny = T(1e-6) * eps_v
                    speed = wp.sqrt(wp.dot(u, u) + tiny * tiny)
                    slope = friction_slope(speed, eps_v)
                    scale = T(1.0) / (T(1.0) + h * friction * normal * slope)
                    v1 = v1 - (T(1.0) - scale) * u
                xn = wp.vec3d(
                    x[0] + wp.float64(h * v1[0]), height + wp.float64(d_new),
                    x[2] + wp.float64(h * v1[2]),
                )  # fmt: skip
        return xn, v1

    @wp.func
    def integrate_vertex(
        x: wp.vec3d,
        v: vec3,
        f: vec3,
        m: T,
        damping: T,
        is_fixed: int,
        x_fixed: wp.vec3d,
        s: VertexUpdate,
    ):
        xn, v1 = vertex_move(x, vertex_velocity(v, f, m, damping, is_fixed, s), s)
        if is_fixed != 0:
            xn = x_fixed
        return xn, v1

    @wp.func
    def vertex_move_vjp(x: wp.vec3d, w: vec3, s: VertexUpdate, adj_x_free: vec3, adj_vn: vec3):
        """The adjoint of ``vertex_move`` (the free move and the ground step) at velocity w:
        the cotangents ``(x, w)`` given those of the new free position and velocity."""
        h = s.h
        has_ground = s.has_ground
        height = s.height
        dhat = s.dhat
        kappa = s.kappa
        friction = s.friction
        eps_v = s.eps_v
        adj_x = adj_x_free
        adj_w = h * adj_x_free + adj_vn
        d_pred = T(0.0)
        if has_ground != 0:
            d_pred = T(x[1] - height) + h * w[1]
        if has_ground != 0 and d_pred < dhat:
            # Forward: d' = G(d_pred), d_pred = (x1 - height) + h w1, N = a(d');
            # x_new = (x0 + h w''0, height + d', x2 + h w''2), v_new = (w''0, w1 + h N, w''2)
            # with w''0,2 = scale w0,2, scale = 1 / (1 + h mu N sigma(|u|)).
            d_new = ground_gap(d_pred, h, dhat, kappa)
            normal = gap_acceleration(d_new, dhat, kappa)
            normal_slope = gap_acceleration_slope(d_new, dhat, kappa)
            adj_w0 = h * adj_x_free[0] + adj_vn[0]
            adj_w2 = h * adj_x_free[2] + adj_vn[2]
            adj_d = adj_x_free[1] + adj_vn[1] * h * normal_slope
            if friction > T(0.0):
                tiny = T(1e-6) * eps_v
                speed = wp.sqrt(w[0] * w[0] + w[2] * w[2] + tiny * tiny)
                sigma = friction_slope(speed, eps_v)
                dsigma = T(-1.0) / (speed * speed)
                if speed < eps_v:
                    dsigma = T(-1.0) / (eps_v * eps_v)
                k = h * friction
                scale = T(1.0) / (T(1.0) + k * normal * sigma)
                adj_scale = adj_w0 * w[0] + adj_w2 * w[2]
                common = -adj_scale * scale * scale * k
                adj_speed = common * normal * dsigma
                adj_w0 = scale * adj_w0 + adj_speed * w[0] / speed
                adj_w2 = scale * adj_w2 + adj_speed * w[2] / speed
                adj_d = adj_d + common * sigma * normal_slope
            adj_d_pred = adj_d * ground_gap_slope(d_pred, h, dhat, kappa)
            adj_x = vec3(adj_x_free[0], adj_d_pred, adj_x_free[2])
            adj_w = vec3(adj_w0, adj_vn[1] + h * adj_d_pred, adj_w2)
        return adj_x, adj_w

    @wp.func
    def vertex_velocity_vjp(
        v: vec3, f: vec3, m: T, damping: T, is_fixed: int, s: VertexUpdate, adj_w: vec3
    ):
        """The adjoint of ``vertex_velocity``: the cotangents ``(v, f, m, damping)`` given
        that of its result (the mass term is the explicit h f / m dependence only)."""
        h = s.h
        max_speed = s.max_speed
        q, b, phi, dphi, w = velocity_replay(v, f, m, damping, is_fixed, s)
        if is_fixed != 0:
            adj_w = vec3()
        adj_b = phi * adj_w
        if max_speed > T(0.0):
            adj_b = adj_b + (wp.dot(adj_w, b) * dphi * T(2.0) / (max_speed * max_speed)) * b
        adj_a = adj_b / q
        adj_damping = -h * wp.dot(adj_b, b) / q
        adj_m = -h * wp.dot(adj_a, f) / (m * m)
        return adj_a, adj_a * (h / m), adj_m, adj_damping

    @wp.func
    def integrate_vertex_vjp(
        x: wp.vec3d,
        v: vec3,
        f: vec3,
        m: T,
        damping: T,
        is_fixed: int,
        s: VertexUpdate,
        adj_xn: vec3,
        adj_vn: vec3,
    ):
        """The adjoint of ``integrate_vertex``, derived by hand (reverse order of its steps).

        Returns the cotangents ``(x, v, f, m, damping, x_fixed)`` given those of the new
        position and velocity (in the kernel's type); the mass term is the explicit
        h f / m dependence only.
        """
        q, b, phi, dphi, w = velocity_replay(v, f, m, damping, is_fixed, s)
        adj_x_fixed = vec3()
        adj_x_free = adj_xn  # the cotangent of x_new where the vertex moves freely
        if is_fixed != 0:
            adj_x_fixed = adj_xn
            adj_x_free = vec3()
        adj_x, adj_w = vertex_move_vjp(x, w, s, adj_x_free, adj_vn)
        adj_v, adj_f, adj_m, adj_damping = vertex_velocity_vjp(v, f, m, damping, is_fixed, s, adj_w)
        return adj_x, adj_v, adj_f, adj_m, adj_damping, adj_x_fixed

    if not differentiable:

        @wp.kernel(module=module, enable_backward=False)
        def ground_roots(
            target: wp.array(dtype=T), h: T, dhat: T, kappa: T, out: wp.array(dtype=T)
        ):
            """The root of Ground.solve's equation for each predicted gap (its loop, one pass)."""
            i = wp.tid()
            out[i] = gap_root(target[i], h, dhat, kappa)

        @wp.kernel(module=module, enable_backward=False)
        def step_fast(
            x: wp.array(dtype=wp.vec3d),
            v: wp.array(dtype=vec3),
            f_a: wp.array(dtype=vec3),
            f_b: wp.array(dtype=vec3),
            c: VertexCoefficients,
            x_fixed: wp.array(dtype=wp.vec3d),
            s: VertexUpdate,
            save: int,
            f_saved: wp.array(dtype=vec3),
            x_new: wp.array(dtype=wp.vec3d),
            v_new: wp.array(dtype=vec3),
        ):
            """Forward-only update; reads the elastic forces f_a + f_b and zeroes them for reuse.

            With ``save`` set, the elastic forces are also written to ``f_saved`` (for backward).
            """
            i = wp.tid()
            world = i // c.world_size
            xi = x[i]
            m = c.mass[i]
            f_el = f_a[i] + f_b[i]
            if save != 0:
                f_saved[i] = f_el
            f = f_el + m * c.gravity[world]
            f_a[i] = vec3()
            f_b[i] = vec3()
            slot = c.fixed_slot[i]
            xf = wp.vec3d()
            is_fixed = int(0)  # noqa: UP018 - a Warp variable, not a constant
            if slot >= 0:
                xf = x_fixed[slot]
                is_fixed = 1
            xn, vn = integrate_vertex(xi, v[i], f, m, c.damping[world], is_fixed, xf, s)
            x_new[i] = xn
            v_new[i] = vn

        @wp.kernel(module=module, enable_backward=False)
        def step_vjp(
            x: wp.array(dtype=wp.vec3d),
            v: wp.array(dtype=vec3),
            f_el: wp.array(dtype=vec3),
            c: VertexCoefficients,
            s: VertexUpdate,
            adj_x_new: wp.array(dtype=vec3),
            adj_v_new: wp.array(dtype=vec3),
            adj_x: wp.array(dtype=vec3),
            adj_v: wp.array(dtype=vec3),
            adj_f: wp.array(dtype=vec3),
            adj_mass: wp.array(dtype=T),
            adj_gravity: wp.array(dtype=vec3),
            adj_damping: wp.array(dtype=T),
            adj_x_fixed: wp.array(dtype=vec3),
        ):
            """The adjoint of ``step_fast`` per vertex, from the saved x, v and elastic forces.

            Writes adj_x, adj_v, adj_f (elastic forces) and adj_x_fixed (prescribed
            positions); adds to adj_mass, and to the vertex's world's entries of adj_gravity
            and adj_damping ``[W]``.
            """
            i = wp.tid()
            world = i // c.world_size
            m = c.mass[i]
            g = c.gravity[world]
            slot = c.fixed_slot[i]
            is_fixed = int(0)  # noqa: UP018 - a Warp variable, not a constant
            if slot >= 0:
                is_fixed = 1
            gx, gv, gf, gm, gd, gxf = integrate_vertex_vjp(
                x[i], v[i], f_el[i] + m * g, m, c.damping[world], is_fixed, s, adj_x_new[i],
                adj_v_new[i],
            )  # fmt: skip
            adj_x[i] = gx
            adj_v[i] = gv
            adj_f[i] = gf
            adj_mass[i] = adj_mass[i] + gm + wp.dot(gf, g)
            wp.atomic_add(adj_gravity, world, m * gf)
            wp.atomic_add(adj_damping, world, gd)
            if slot >= 0:
                adj_x_fixed[slot] = gxf

        return SimpleNamespace(
            VertexUpdate=VertexUpdate,
            VertexCoefficients=VertexCoefficients,
            integrate_vertex=integrate_vertex,
            vertex_velocity=vertex_velocity,
            vertex_move=vertex_move,
            integrate_vertex_vjp=integrate_vertex_vjp,
            vertex_move_vjp=vertex_move_vjp,
            vertex_velocity_vjp=vertex_velocity_vjp,
            step_fast=step_fast,
            step_vjp=step_vjp,
            ground_roots=ground_roots,
        )

    @wp.kernel(module=module)
    def total_forces(
        x: wp.array(dtype=wp.vec3d),
        f_el: wp.array(dtype=vec3),
        mass: wp.array(dtype=T),
        gravity: wp.array(dtype=vec3),
        world_size: int,
        has_ground: int,
        height: wp.float64,
        dhat: T,
        kappa: T,
        f: wp.array(dtype=vec3),
    ):
        """Elastic + gravity + ground barrier force per vertex (N); gravity ``[W]`` per
        world, vertex i in world ``i // world_size``."""
        i = wp.tid()
        gap = T(x[i][1] - height)
        g = gravity[i // world_size]
        f[i] = vertex_force(f_el[i], mass[i], g, gap, has_ground, dhat, kappa)

    return SimpleNamespace(integrate_vertex=integrate_vertex, total_forces=total_forces)
