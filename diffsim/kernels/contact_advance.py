"""Whole substeps with surface contact in one CPU launch: no Python between them.

A substep with surface contact, as :func:`diffsim.backends.integrator.substep` computes it
by torch ops around per-stage kernels, costs a millisecond of Python and launch overhead
on a mesh of a few thousand tets, several times its arithmetic. ``contact_advance`` runs
many such substeps in one launch (dim 1, one thread; on a large mesh another thread adds
half the tet forces, ``tet_share``) with the same formulas (the per-pair
functions of :mod:`diffsim.kernels.contact`, the vertex update of
:mod:`diffsim.kernels.integrate`), per substep:

1. checks that the candidate pairs still hold every pair within dhat (the positions'
   offsets from where the candidate set and its near subset were selected are within
   their reaches; see ``SurfaceContact``), selecting the near subset again where it
   expired (as ``SurfaceContact._near_set`` does),
2. elastic + gravity forces, the barrier forces of the near pairs within dhat,
3. the velocity update (damping, clamp, fixed mask), surface friction (lagged, from the
   barrier at the substep's start), the free move and the implicit ground step,
4. checks the step: not capped (``MAX_STEP_FRACTION``), within the candidates' reach; the
   continuous collision check (the step limit of ``SurfaceContact.step_scales``: pass 1,
   the verification rounds) truncates the vertices it limits; with a volume limit, its
   rounds (``limit_volumes``) and the collision check again on the step it shortened, in
   turns (``integrator._limit_volumes``),
5. commits the new state (prescribed vertices at their place on the line).

With time-of-impact splits (``ContactStep.split_levels`` > 0: ``contact_time_of_impact``)
a step the collision check would cut is tried again at half its length from the same
forces (3. and 4. again), down to the shortest step, which is truncated; after a step the
next tries the largest power of two the time taken is an odd multiple of, forces
recomputed (1. and 2.): the steps of :func:`diffsim.backends.integrator.substep`. A launch
stopping within a split substep returns x and v to the substep's start (``x_start``,
``v_start``). A differentiable launch does not split: it hands such a substep to the
general path (``SPLIT``).

Where a check fails the launch stops before committing that substep and reports why; the
caller then takes it the general way (new candidate sets, a capped step or a blow-up
error) and launches again.

A differentiable launch saves the state and total forces at each substep's start, the
near rows each substep used and the vertices the step limit truncated, each with its scale
and the pair bound the scale is the value of (it stops where the volume limit cuts a
step); ``contact_retreat`` runs its adjoint in reverse, substep by substep: it replays the
velocity update and friction, then takes the adjoints of the truncation (the scales'
through their bounds, ``bound_vjp``), the move and the ground, the friction passes, the
lagged friction terms, the velocity update, the barrier and the elastic forces. The
vertex update's adjoint is the hand-derived one of :mod:`diffsim.kernels.integrate`, the
elastic forces' that of :mod:`diffsim.kernels.force_vjp`; the per-pair ones are
``wp.grad`` of the forward's functions (each dotted with its cotangents), so they are the
derivatives of the very formulas the forward ran: float64 gradients agree with the general
path's to 1e-12.
"""

from types import SimpleNamespace

import warp as wp

from diffsim.kernels.advance import barrier
from diffsim.kernels.volume_limit import edge_matrix, first_crossing

# status[1]: why a launch stopped.
FINISHED = 0  # every substep asked for was taken
SETS_EXPIRED = 1  # at a substep's start: select the candidate sets again at these positions
GENERAL_STEP = 2  # this substep needs the general path, status[2] says why:
CAPPED = 1  # the step limit would cap the whole step (or raise a blow-up)
BEYOND_REACH = 2  # the step leaves the candidate set's reach (the caller builds one for it)
LIMITED = 3  # a differentiable launch leaves steps the volume limit cuts to the general path
SPLIT = 4  # a differentiable launch leaves substeps split at a time of impact to it
REASONS = {CAPPED: "capped", BEYOND_REACH: "beyond_reach", LIMITED: "limited", SPLIT: "split"}
GAVE_UP = 3  # status[1]: a worker stopped waiting for the others (a hang of seconds)
# status[1]: a differentiable launch's records of truncated vertices are full (it stops
# before the substep; the next launch goes on).
RECORDS_FULL = 4
# The jobs a launch's other workers run on their tets (Team.command[1]).
FORCES = 0  # add their elastic forces
VOLUMES = 1  # flag those the volume limit's first round cuts (volume_fails)


def build_contact_advance(dtype, module: str, elastic, integrate, contact) -> SimpleNamespace:
    """The fused contact substep kernels for one scalar type, one per material.

    Args:
        dtype: the Warp scalar type.
        module: the Warp module they go into.
        elastic: the namespace of :func:`diffsim.kernels.elastic.build_elastic` (forward).
        integrate: the namespace of :func:`diffsim.kernels.integrate.build_integrate`.
        contact: the namespace of :func:`diffsim.kernels.contact.contact_kernels`.

    Returns:
        A namespace with the struct ``ContactStep``, ``contact_advance`` and
        ``contact_retreat`` (its adjoint), tuples of kernels indexed by the material id.
    """
    T = dtype
    vec3 = wp.types.vector(3, T)
    vec4 = wp.types.vector(4, T)
    VertexUpdate, VertexCoefficients = integrate.VertexUpdate, integrate.VertexCoefficients
    TetElements = elastic.TetElements
    vertex_velocity, vertex_move = integrate.vertex_velocity, integrate.vertex_move
    vertex_move_vjp = integrate.vertex_move_vjp
    vertex_velocity_vjp = integrate.vertex_velocity_vjp
    pair_weights, box_gap2 = contact.pair_weights, contact.box_gap2
    barrier_pair, friction_terms = contact.barrier_pair, contact.friction_terms
    friction_stop, friction_capped = contact.friction_stop, contact.friction_capped
    pair_scale, relative_reach = contact.pair_scale, contact.relative_reach
    sides_max, side_reach, pair_aim = contact.sides_max, contact.side_reach, contact.pair_aim

    @wp.struct
    class ContactStep:
        """The surface contact's constants and the validity of its candidate sets."""

        origin: wp.vec3d  # local positions are x - origin, in the working dtype (m)
        s_hat: T  # dhat^2 (m^2)
        floor: T  # the squared-distance floor (m^2)
        kappa: T  # barrier stiffness (1/(m^2 s^2))
        parallel_fraction: T  # edge-edge parallel test
        h_mu: T  # substep times the friction coefficient (s)
        eps_v: T  # friction smoothing speed (m/s)
        passes: int  # friction passes per substep (0: no surface friction)
        keep: T  # the CCD's MIN_GAP_FRACTION
        slack: T  # the CCD's SCALE_SLACK
        reach: wp.float64  # the candidate set holds while offset(x - anchor) <= reach (m)
        near_reach: wp.float64  # the near rows hold while offset(x - near_anchor) <= this
        n_rows: int  # the near rows in rows[:n_rows]
        near_steps: wp.float64  # ... among the candidates within dhat + 2 near_steps s
        dhat: wp.float64  # (m)
        last_step: wp.float64  # s: the offset of the last substep taken before the launch (m)
        differentiable: int  # 1: save each substep for the adjoint (the volume limit: stop)
        closest: wp.float64  # the candidates' smallest distance at the anchor (m)
        keep_factor: wp.float64  # (1 - keep) (1 - slack)
        equalize_rounds: int  # the step limit's verification rounds that equalize
        rounds: int  # ... and all of them but the last (absolute bounds for all)
        max_step: wp.float64  # larger relative offsets of a step are capped (m)
        max_translation: wp.float64  # ... and larger absolute displacements (m)
        min_ratio: wp.float64  # the volume limit's floor (0: no volume limit)
        volume_rounds: int  # its rounds of scaling before failing tets' corners stop
        volume_turns: int  # its turns with the step limit's rows before the general path
        volume_slack: wp.float64  # a tet fails below its floor less this
        bisections: int  # bisection steps of its first crossings
        # A step the step limit cuts is tried again at half its length, down to
        # 1 / 2**split_levels of the substep (SurfaceContact.split_levels; 0: truncated).
        split_levels: int

    @wp.struct
    class Team:
        """The CPU worker threads of a launch. The main one runs everything but the other
        workers' shares of the tets: their forces (in the adjoint, their vector-Jacobian
        products), which each adds into its own row of ``forces``, and the volume limit's
        first-round ``flags``. They meet at :func:`diffsim.kernels.advance.barrier` before
        and after each such job."""

        count: int  # workers (1: the main one alone, no barriers)
        tet_stop: int  # the main worker's tets are [0, tet_stop)
        forces: wp.array2d(dtype=vec3)  # [count, n]: row w >= 1 worker w's; zero between
        sync: wp.array(dtype=wp.int32)  # the barrier's counters
        spin_limit: wp.int64  # spins before a waiting worker gives up
        command: wp.array(dtype=wp.int32)  # [2]: 1 go on, 0 return; the job (row: adjoint)
        flags: wp.array(dtype=wp.int32)  # [m]: the tets the volume limit's first round cuts

    @wp.func
    def share_tets(team: Team, job: int) -> int:
        """Starts the other workers on their tets: ``job`` ``FORCES`` or ``VOLUMES`` (the
        saved row in the adjoint); nonzero where one gave up."""
        if team.count < 2:
            return 0
        team.command[0] = 1
        team.command[1] = job
        return barrier(team.sync, team.count, team.spin_limit)

    @wp.func
    def shared_done(team: Team) -> int:
        """The barrier after a job on the tets (every worker's); nonzero where one gave up."""
        if team.count < 2:
            return 0
        return barrier(team.sync, team.count, team.spin_limit)

    @wp.func
    def next_job(team: Team) -> int:
        """An other worker's wait for the main one: the job it gives (the saved row in the
        adjoint), or -1 to return (told to, or a worker gave up)."""
        if barrier(team.sync, team.count, team.spin_limit) != 0:
            return -1
        if team.command[0] == 0:
            return -1
        return team.command[1]

    @wp.func
    def release(team: Team):
        """Lets the other workers return (before every return of the main one)."""
        if team.count > 1:
            team.command[0] = 0
            barrier(team.sync, team.count, team.spin_limit)

    @wp.func
    def others_forces(team: Team, i: int) -> vec3:
        """The other workers' sum for vertex i, their rows zeroed for the next substep."""
        total = vec3()
        for w in range(1, team.count):
            total = total + team.forces[w, i]
            team.forces[w, i] = vec3()
        return total

    def tet_share_kernel(add_tet_forces):
        @wp.kernel(module=module, enable_backward=False)
        def tet_share(
            x: wp.array(dtype=wp.vec3d),
            x_new: wp.array(dtype=wp.vec3d),
            el: TetElements,
            det_dm_inv: wp.array(dtype=wp.float64),
            p: ContactStep,
            team: Team,
            worker: int,
            tet_start: int,
            tet_stop: int,
        ):
            """Worker ``worker``'s share of ``contact_advance``'s tets (dim 1, on a thread of
            its own): between the main worker's barriers, for the job it is given, adds the
            forces of tets [tet_start, tet_stop) at x into its row of ``team.forces``
            (``FORCES``), or flags in ``team.flags`` those the volume limit's first round
            cuts on the step x -> x_new (``VOLUMES``)."""
            own = team.forces[worker]
            job = next_job(team)
            while job >= 0:
                if job == FORCES:
                    for e in range(tet_start, tet_stop):
                        add_tet_forces(x, el, e, own)
                else:
                    for e in range(tet_start, tet_stop):
                        team.flags[e] = volume_fails(x, x_new, el, e, det_dm_inv, p)
                job = -1
                if shared_done(team) == 0:
                    job = next_job(team)

        return tet_share

    def tet_vjp_share_kernel(add_tet_force_vjp):
        @wp.kernel(module=module, enable_backward=False)
        def tet_vjp_share(
            x_saved: wp.array2d(dtype=wp.vec3d),
            adj_f: wp.array(dtype=vec3),
            el: TetElements,
            team: Team,
            worker: int,
            tet_start: int,
            tet_stop: int,
            adj_mu: wp.array(dtype=T),
            adj_lam: wp.array(dtype=T),
        ):
            """Worker ``worker``'s share of ``contact_retreat``'s force vector-Jacobian
            products (dim 1, on a thread of its own): at each substep adds those of tets
            [tet_start, tet_stop) at saved row ``team.command[1]`` into its row of
            ``team.forces``, and its parameter cotangents into adj_mu and adj_lam of its own."""
            own = team.forces[worker]
            row = next_job(team)
            while row >= 0:
                x_r = x_saved[row]
                for e in range(tet_start, tet_stop):
                    add_tet_force_vjp(x_r, adj_f, el, e, own, adj_mu, adj_lam)
                row = -1
                if shared_done(team) == 0:
                    row = next_job(team)

        return tet_vjp_share

    @wp.struct
    class CandidatePairs:
        """The candidate set in Warp form and the rows of it that can be within dhat."""

        pairs: wp.array2d(dtype=wp.int32)  # [m, 4] vertex ids (p, a, b, c) or (p0, p1, q0, q1)
        kinds: wp.array(dtype=wp.int32)  # [m] 0: point-triangle, 1: edge-edge
        eps: wp.array(dtype=T)  # [m] mollifier thresholds (1 for point-triangle)
        rows: wp.array(dtype=wp.int32)  # [m] the near rows first (``ContactStep.n_rows``)

    @wp.struct
    class ActivePairs:
        """The pairs within dhat at a substep's start, with friction's lagged terms."""

        ids: wp.array(dtype=wp.int32)  # rows of the candidate set
        weights: wp.array(dtype=vec4)  # closest-point weights c
        coef: wp.array(dtype=vec4)  # c_i / m_i
        normal: wp.array(dtype=vec3)
        m_eff: wp.array(dtype=T)
        limit: wp.array(dtype=T)  # the Coulomb limit of the pair's impulse (kg m/s)

    @wp.func
    def local(x: wp.vec3d, origin: wp.vec3d) -> vec3:
        d = x - origin
        return vec3(T(d[0]), T(d[1]), T(d[2]))

    @wp.func
    def offset(lo: vec3, hi: vec3) -> wp.float64:
        # candidates.relative_offset: half the diagonal of the displacements' bounding box.
        return wp.float64(T(0.5) * wp.length(hi - lo))

    @wp.func
    def pair_ids(cand: CandidatePairs, k: int):
        """The four vertex ids of candidate k."""
        return cand.pairs[k, 0], cand.pairs[k, 1], cand.pairs[k, 2], cand.pairs[k, 3]

    @wp.func
    def select_active(
        cand: CandidatePairs,
        rows: wp.array(dtype=wp.int32),
        n_rows: int,
        xl: wp.array(dtype=vec3),
        mass: wp.array(dtype=T),
        p: ContactStep,
        act: ActivePairs,
        total: wp.array(dtype=vec3),
    ) -> int:
        """The pairs among the near rows ``rows[:n_rows]`` within dhat at local xl, in
        ``act.ids`` in row order (the ``active_pairs_in`` kernel's rule), with friction's
        lagged terms where it acts (``friction_geometry``) and zero impulses so far;
        returns how many."""
        n_active = int(0)  # noqa: UP018 - a Warp variable
        for r in range(n_rows):
            k = rows[r]
            i0, i1, i2, i3 = pair_ids(cand, k)
            x0 = xl[i0]
            x1 = xl[i1]
            x2 = xl[i2]
            x3 = xl[i3]
            kind = cand.kinds[k]
            if box_gap2(kind, x0, x1, x2, x3) < p.s_hat:
                cw = pair_weights(kind, x0, x1, x2, x3, p.parallel_fraction)
                diff = cw[0] * x0 + cw[1] * x1 + cw[2] * x2 + cw[3] * x3
                d2 = wp.dot(diff, diff)
                if d2 < p.s_hat:
                    act.ids[n_active] = k
                    if p.passes > 0:
                        cf, nrm, me, lim = friction_terms(
                            kind, x0, x1, x2, x3, mass[i0], mass[i1], mass[i2], mass[i3], cw,
                            diff, d2, cand.eps[k], p.s_hat, p.floor, p.kappa, p.h_mu,
                        )  # fmt: skip
                        act.weights[n_active] = cw
                        act.coef[n_active] = cf
                        act.normal[n_active] = nrm
                        act.m_eff[n_active] = me
                        act.limit[n_active] = lim
                        total[n_active] = vec3()
                    n_active += 1
        return n_active

    @wp.func
    def friction_pass(
        cand: CandidatePairs,
        act: ActivePairs,
        n_active: int,
        eps_v: T,
        v_in: wp.array(dtype=vec3),
        v_out: wp.array(dtype=vec3),
        load: wp.array(dtype=T),
        impulse: wp.array(dtype=vec3),
        total_in: wp.array(dtype=vec3),
        total_out: wp.array(dtype=vec3),
    ):
        """One friction pass over the active pairs (``friction_slip`` then
        ``friction_apply`` of :mod:`diffsim.kernels.contact`, one after the other): the
        loads and impulses from v_in, then each pair's capped impulse so far (total_in to
        total_out) and its change taken from v_out (v_in itself, or a copy of it)."""
        for i in range(load.shape[0]):
            load[i] = T(0.0)
        for t in range(n_active):
            k = act.ids[t]
            i0, i1, i2, i3 = pair_ids(cand, k)
            stop, imp = friction_stop(
                act.weights[t], act.normal[t], act.m_eff[t], act.limit[t], v_in[i0], v_in[i1],
                v_in[i2],
                v_in[i3], eps_v,
            )  # fmt: skip
            impulse[t] = imp
            load[i0] = load[i0] + stop
            load[i1] = load[i1] + stop
            load[i2] = load[i2] + stop
            load[i3] = load[i3] + stop
        for t in range(n_active):
            k = act.ids[t]
            i0, i1, i2, i3 = pair_ids(cand, k)
            most = wp.max(load[i0], load[i1])
            most = wp.max(most, wp.max(load[i2], load[i3]))
            before = total_in[t]
            after = friction_capped(most, before, impulse[t], act.limit[t])
            total_out[t] = after
            change = after - before
            cf = act.coef[t]
            v_out[i0] = v_out[i0] - cf[0] * change
            v_out[i1] = v_out[i1] - cf[1] * change
            v_out[i2] = v_out[i2] - cf[2] * change
            v_out[i3] = v_out[i3] - cf[3] * change

    @wp.func
    def tet_step(
        x: wp.array(dtype=wp.vec3d),
        x_new: wp.array(dtype=wp.vec3d),
        tet: wp.vec4i,
        c: wp.float64,
        s0: wp.float64,
        s1: wp.float64,
        s2: wp.float64,
        s3: wp.float64,
        p: ContactStep,
    ):
        """A tet's step under the volume limit, its corners' steps x -> x_new scaled by
        s0..s3 (c = det Dm^-1): the edge matrices at the start and the end (the end's again
        where the start's is not needed), its volume ratio at the end and its floor,
        min(start ratio, min_ratio), measured only below min_ratio."""
        x0 = x[tet[0]]
        x1 = x[tet[1]]
        x2 = x[tet[2]]
        x3 = x[tet[3]]
        y0 = x0 + s0 * (x_new[tet[0]] - x0)
        y1 = x1 + s1 * (x_new[tet[1]] - x1)
        y2 = x2 + s2 * (x_new[tet[2]] - x2)
        y3 = x3 + s3 * (x_new[tet[3]] - x3)
        d1 = edge_matrix(y0, y1, y2, y3)
        end = c * wp.determinant(d1)
        d0 = d1
        floor = p.min_ratio
        if end < p.min_ratio - p.volume_slack:
            d0 = edge_matrix(x0, x1, x2, x3)
            floor = wp.min(c * wp.determinant(d0), p.min_ratio)
        return d0, d1, end, floor

    @wp.func
    def volume_fails(
        x: wp.array(dtype=wp.vec3d),
        x_new: wp.array(dtype=wp.vec3d),
        el: TetElements,
        e: int,
        det_dm_inv: wp.array(dtype=wp.float64),
        p: ContactStep,
    ) -> wp.int32:
        """1 where tet e fails the volume limit at the end of the whole step x -> x_new (the
        first round of ``limit_volumes``, every scale 1), else 0."""
        one = wp.float64(1.0)
        d0, d1, end, floor = tet_step(x, x_new, el.tets[e], det_dm_inv[e], one, one, one, one, p)
        if end < floor - p.volume_slack:
            return wp.int32(1)
        return wp.int32(0)

    @wp.func
    def limit_volumes(
        x: wp.array(dtype=wp.vec3d),
        x_new: wp.array(dtype=wp.vec3d),
        el: TetElements,
        p: ContactStep,
        scale: wp.array(dtype=wp.float64),
        scale_out: wp.array(dtype=wp.float64),
        changed: wp.array(dtype=wp.int32),
        det_dm_inv: wp.array(dtype=wp.float64),
        flags: wp.array(dtype=wp.int32),
        by_flags: bool,
    ) -> int:
        """The volume limit's scales of the step x -> x_new into ``scale [n]`` (the rounds of
        :func:`diffsim.physics.volume_limit.volume_step_scales`, which end within
        ``volume_rounds + n``; after the first, only the tets with a corner whose scale
        dropped are measured again; a tet's start ratio only where its end ratio is below
        the floor); returns the vertices it limits. ``det_dm_inv [m]``: c = det Dm^-1 per
        tet (J = c det Ds). Scratch: ``scale_out``, ``changed [n]``. The first round
        measures, with ``by_flags``, the tets flagged in ``flags [m]`` (those that fail at
        x_new, ``volume_fails``: the others pass it), else those with a corner flagged in
        ``changed`` by the caller (the others are known to pass at x_new)."""
        n = x.shape[0]
        for i in range(n):
            scale[i] = wp.float64(1.0)
        settled = int(0)  # noqa: UP018 - a Warp variable
        for round_ in range(p.volume_rounds + n + 1):
            if settled == 0:
                for i in range(n):
                    scale_out[i] = scale[i]
                failing = int(0)  # noqa: UP018 - a Warp variable
                for e in range(el.tets.shape[0]):
                    tet = el.tets[e]
                    again = False
                    if round_ == 0 and by_flags:
                        again = flags[e] != 0
                    else:
                        again = (
                            changed[tet[0]] + changed[tet[1]] + changed[tet[2]] + changed[tet[3]]
                        ) > 0
                    if again:
                        c = det_dm_inv[e]
                        d0, d1, end, floor = tet_step(
                            x, x_new, tet, c, scale[tet[0]], scale[tet[1]], scale[tet[2]],
                            scale[tet[3]], p,
                        )  # fmt: skip
                        if end < floor - p.volume_slack:
                            failing += 1
                            t = wp.float64(0.0)
                            if round_ < p.volume_rounds:
                                t = first_crossing(d0, d1 - d0, floor / c, p.bisections)
                            for k in range(4):
                                corner = tet[k]
                                scale_out[corner] = wp.min(scale_out[corner], scale[corner] * t)
                for i in range(n):
                    changed[i] = 0
                    if scale_out[i] < scale[i]:
                        changed[i] = 1
                    scale[i] = scale_out[i]
                if failing == 0:
                    settled = 1
        limited = int(0)  # noqa: UP018 - a Warp variable
        for i in range(n):
            if scale[i] < wp.float64(1.0):
                limited += 1
        return limited

    @wp.func
    def can_limit(
        cand: CandidatePairs,
        k: int,
        anchor_d2: wp.float64,
        offsets: wp.array(dtype=T),
        lengths: wp.array(dtype=T),
        keep_factor: wp.float64,
        scene: wp.float64,
    ) -> bool:
        """Whether candidate k, ``sqrt(anchor_d2)`` apart at the anchor, may be limited by a
        step whose vertex steps are ``lengths`` long (see ``select_ccd_rows``), its vertices
        ``offsets`` from the anchor (less a common offset: the pair is at least its anchor
        distance less the largest offset on each side apart); ``scene``: the scene's size
        (m)."""
        i0, i1, i2, i3 = pair_ids(cand, k)
        kind = cand.kinds[k]
        s0 = lengths[i0]
        s1 = lengths[i1]
        s2 = lengths[i2]
        s3 = lengths[i3]
        side = wp.float64(sides_max(kind, s0, s1, s2, s3))
        moved = wp.float64(sides_max(kind, offsets[i0], offsets[i1], offsets[i2], offsets[i3]))
        # The relative reach is the side reach about the four steps' mean c: at most the side
        # reach plus 2 |c| <= (s0 + s1 + s2 + s3) / 2. Room for rounding: the lengths and
        # the distances pass 1 measures are in the working dtype (float32: about 1e-7 of
        # the scene's size).
        bound = side + wp.float64(0.5) * wp.float64(s0 + s1 + s2 + s3)
        reach = (bound / keep_factor + moved) * wp.float64(1.0 + 1e-5) + wp.float64(1e-6) * scene
        return anchor_d2 < reach * reach

    @wp.func
    def roll_back(
        x: wp.array(dtype=wp.vec3d),
        v: wp.array(dtype=vec3),
        x_start: wp.array(dtype=wp.vec3d),
        v_start: wp.array(dtype=vec3),
        done: int,
        status: wp.array(dtype=wp.int32),
        counts: wp.vec3i,
    ):
        """A launch stopping within a split substep (``done`` shortest steps of it taken,
        so its first step was split, where x_start and v_start were saved) returns to the
        substep's start: x, v and the volume limit's counts ``status[6:9]``
        as they were then, so that the caller takes the whole substep again."""
        if done > 0:
            for i in range(x.shape[0]):
                x[i] = x_start[i]
                v[i] = v_start[i]
            status[6] = counts[0]
            status[7] = counts[1]
            status[8] = counts[2]

    @wp.func
    def select_ccd_rows(
        cand: CandidatePairs,
        anchor_d2: wp.array(dtype=wp.float64),
        ccd_rows: wp.array(dtype=wp.int32),
        p: ContactStep,
        moved: wp.float64,
        relative: wp.float64,
        lo: vec3,
        hi: vec3,
        n_rows: int,
        near_reach: wp.float64,
        near_moved: wp.float64,
        offsets: wp.array(dtype=T),
        lengths: wp.array(dtype=T),
    ):
        """The step limit's rows into ``ccd_rows`` (SurfaceContact.step_scales,
        warp_glue.step_scales): the candidates that some scales in [0, 1] of a step with
        offset bounds ``lo, hi`` and offset ``relative`` could bring within reach, by their
        distances at the anchor; none where the closest candidate lies beyond. Of those,
        only the rows the step could limit at all by the lengths of their vertices' steps
        (``lengths [n]``, m) and their offsets from the anchor (``offsets [n]``, m, less a
        common offset: a pair is at least its anchor distance less the largest offset on
        each side apart now): a pair at distance d whose side reach plus half the sum of
        its four step lengths is at most ``(1 - keep) (1 - slack) d`` is not limited in
        pass 1 (that sum bounds its relative reach), fails no verification round (scales
        in [0, 1] only shorten the steps) and takes an absolute scale of 1, so leaving it out
        changes no scale. Returns how many, and how many the distances at the anchor
        alone would have taken."""
        n_ccd = int(0)  # noqa: UP018 - a Warp variable
        considered = int(0)  # noqa: UP018 - a Warp variable
        if not (p.closest - wp.float64(2.0) * moved > wp.float64(4.0) * relative / p.keep_factor):
            off0 = offset(wp.min(lo, vec3()), wp.max(hi, vec3()))
            reach_ccd = wp.float64(4.0) * off0 / p.keep_factor
            reach_ccd = reach_ccd + wp.float64(2.0) * moved
            reach_ccd = reach_ccd * wp.float64(1.0 + 1e-5) + wp.float64(1e-12)
            # The pairs outside the near rows are at least dhat + 2 R - 2 (the offset since
            # the rows were selected) apart: where that is beyond the step's reach, only
            # near rows can be limited (the same pairs in the same order, without a pass
            # over the whole set).
            needed = wp.float64(4.0) * off0 / p.keep_factor
            needed = needed * wp.float64(1.0 + 1e-5) + wp.float64(1e-12)
            near_free = p.dhat + wp.float64(2.0) * (near_reach - near_moved)
            count = cand.pairs.shape[0]
            if near_free > needed:
                count = n_rows
            for r in range(count):
                k = r
                if near_free > needed:
                    k = cand.rows[r]
                if anchor_d2[k] < reach_ccd * reach_ccd:
                    considered += 1
                    scene = p.max_translation
                    if can_limit(cand, k, anchor_d2[k], offsets, lengths, p.keep_factor, scene):
                        ccd_rows[n_ccd] = k
                        n_ccd += 1
        return n_ccd, considered

    @wp.func
    def lower(alpha: wp.array(dtype=T), source: wp.array(dtype=wp.int32), i: int, t: T, code: int):
        """Lowers vertex i's scale to t where t is smaller, noting its bound's ``code``."""
        if t < alpha[i]:
            alpha[i] = t
            source[i] = code

    @wp.func
    def collision_scales(
        cand: CandidatePairs,
        ccd_rows: wp.array(dtype=wp.int32),
        n_ccd: int,
        xl: wp.array(dtype=vec3),
        dx: wp.array(dtype=vec3),
        p: ContactStep,
        bounds: wp.array(dtype=T),
        scales_abs: wp.array(dtype=T),
        settled: wp.array(dtype=wp.int32),
        alpha: wp.array(dtype=T),
        alpha_out: wp.array(dtype=T),
        source: wp.array(dtype=wp.int32),
        source_out: wp.array(dtype=wp.int32),
        verify: bool,
    ) -> int:
        """The step limit's scales ``alpha [n]`` of the step ``dx`` (local) over the rows
        ``ccd_rows[:n_ccd]`` (SurfaceContact.step_scales, warp_glue.step_scales): pass 1,
        then, with ``verify``, the verification rounds (equalize, absolute bounds, absolute
        bounds for every pair left). Returns 1 where some scale is below 1. Where a scale is
        below 1, ``source [n]`` names the bound it is the value of: ``2 k`` for candidate
        k's relative bound, ``2 k + 1`` for its absolute one (the adjoint differentiates
        that bound, ``bound_vjp``)."""
        n = alpha.shape[0]
        cut = int(0)  # noqa: UP018 - a Warp variable
        for i in range(n):
            alpha[i] = T(1.0)
        for r in range(n_ccd):
            k = ccd_rows[r]
            i0, i1, i2, i3 = pair_ids(cand, k)
            bound, t_abs, t_rel = pair_scale(
                cand.kinds[k], xl[i0], xl[i1], xl[i2], xl[i3], dx[i0], dx[i1],
                dx[i2], dx[i3], p.keep, p.slack, p.parallel_fraction,
            )  # fmt: skip
            bounds[r] = bound
            scales_abs[r] = t_abs
            settled[r] = 0
            if t_rel < T(1.0):
                cut = 1
                code = 2 * k
                lower(alpha, source, i0, t_rel, code)
                lower(alpha, source, i1, t_rel, code)
                lower(alpha, source, i2, t_rel, code)
                lower(alpha, source, i3, t_rel, code)
        if cut != 0 and verify:
            # Verification rounds: equalize, then absolute bounds, then absolute bounds for
            # every pair left (mode 2).
            done = int(0)  # noqa: UP018 - a Warp variable
            for rnd in range(p.rounds + 1):
                if done == 0:
                    mode = int(2)  # noqa: UP018 - a Warp variable
                    if rnd < p.equalize_rounds:
                        mode = int(0)  # noqa: UP018 - a Warp variable
                    elif rnd < p.rounds:
                        mode = int(1)  # noqa: UP018 - a Warp variable
                    for i in range(n):
                        alpha_out[i] = alpha[i]
                        source_out[i] = source[i]
                    failing = int(0)  # noqa: UP018 - a Warp variable
                    for r in range(n_ccd):
                        if settled[r] == 0:
                            k = ccd_rows[r]
                            i0, i1, i2, i3 = pair_ids(cand, k)
                            a0 = alpha[i0]
                            a1 = alpha[i1]
                            a2 = alpha[i2]
                            a3 = alpha[i3]
                            acts = int(1)  # noqa: UP018 - a Warp variable
                            if mode != 2:
                                reach = relative_reach(
                                    cand.kinds[k], a0 * dx[i0], a1 * dx[i1], a2 * dx[i2],
                                    a3 * dx[i3],
                                )  # fmt: skip
                                if reach <= bounds[r]:
                                    acts = int(0)  # noqa: UP018
                                else:
                                    failing += 1
                            if acts != 0:
                                scale = scales_abs[r]
                                code = 2 * k + 1
                                if mode == 0:
                                    # The smallest of the four scales, and its bound.
                                    scale = a0
                                    code = source[i0]
                                    if a1 < scale:
                                        scale = a1
                                        code = source[i1]
                                    if a2 < scale:
                                        scale = a2
                                        code = source[i2]
                                    if a3 < scale:
                                        scale = a3
                                        code = source[i3]
                                else:
                                    settled[r] = 1
                                lower(alpha_out, source_out, i0, scale, code)
                                lower(alpha_out, source_out, i1, scale, code)
                                lower(alpha_out, source_out, i2, scale, code)
                                lower(alpha_out, source_out, i3, scale, code)
                    for i in range(n):
                        alpha[i] = alpha_out[i]
                        source[i] = source_out[i]
                    if mode != 2 and failing == 0:
                        done = 1
        return cut

    def contact_advance_kernel(add_tet_forces):
        @wp.kernel(module=module, enable_backward=False)
        def contact_advance(
            x: wp.array(dtype=wp.vec3d),
            v: wp.array(dtype=vec3),
            el: TetElements,
            c: VertexCoefficients,
            s: VertexUpdate,
            fixed_start: wp.array(dtype=wp.vec3d),
            targets: wp.array2d(dtype=wp.vec3d),
            substeps: int,
            first_substep: int,
            p: ContactStep,
            team: Team,
            cand: CandidatePairs,
            anchor: wp.array(dtype=vec3),
            anchor_d2: wp.array(dtype=wp.float64),
            near_anchor: wp.array(dtype=vec3),
            xl: wp.array(dtype=vec3),
            f_el: wp.array(dtype=vec3),
            f_c: wp.array(dtype=vec3),
            x_new: wp.array(dtype=wp.vec3d),
            v_new: wp.array(dtype=vec3),
            dx: wp.array(dtype=vec3),
            load: wp.array(dtype=T),
            offsets: wp.array(dtype=T),
            lengths: wp.array(dtype=T),
            x_start: wp.array(dtype=wp.vec3d),
            v_start: wp.array(dtype=vec3),
            act: ActivePairs,
            impulse: wp.array(dtype=vec3),
            total: wp.array(dtype=vec3),
            ccd_rows: wp.array(dtype=wp.int32),
            bounds: wp.array(dtype=T),
            scales_abs: wp.array(dtype=T),
            settled: wp.array(dtype=wp.int32),
            alpha: wp.array(dtype=T),
            alpha_out: wp.array(dtype=T),
            source: wp.array(dtype=wp.int32),
            source_out: wp.array(dtype=wp.int32),
            volume_scale: wp.array(dtype=wp.float64),
            volume_out: wp.array(dtype=wp.float64),
            volume_changed: wp.array(dtype=wp.int32),
            det_dm_inv: wp.array(dtype=wp.float64),
            volume_total: wp.array(dtype=wp.float64),
            x_out: wp.array2d(dtype=wp.vec3d),
            v_out: wp.array2d(dtype=vec3),
            x_saved: wp.array2d(dtype=wp.vec3d),
            v_saved: wp.array2d(dtype=vec3),
            f_saved: wp.array2d(dtype=vec3),
            row_sets: wp.array2d(dtype=wp.int32),
            row_set_of: wp.array(dtype=wp.int32),
            row_set_sizes: wp.array(dtype=wp.int32),
            cut_vertex: wp.array(dtype=wp.int32),
            cut_source: wp.array(dtype=wp.int32),
            cut_alpha: wp.array(dtype=T),
            cut_start: wp.array(dtype=wp.int32),
            status: wp.array(dtype=wp.int32),
            stats: wp.array(dtype=wp.float64),
        ):
            """Steps ``targets.shape[0]`` of ``substeps`` substeps, from substep
            ``first_substep`` of the first; launched with dim 1 (the main worker of
            ``team``, whose other workers run ``tet_share`` at once).

            x and v ``[n]`` are advanced in place; the state after each step goes to its row
            of x_out and v_out ``[steps, n]``. Prescribed vertices reach ``targets[step]``
            linearly from ``fixed_start`` (written at each step's first substep; given by
            the caller when it starts within a step). ``cand.rows[:p.n_rows]`` are the rows
            of the candidate set that can be within dhat while the sets hold; ``anchor`` and
            ``near_anchor`` ``[n]`` the local positions the sets were selected at,
            ``anchor_d2`` ``[m]`` the candidates' squared distances at the anchor; x_start,
            v_start ``[n]`` hold a split substep's start. Where the
            near rows expire the kernel selects them again (``cand.rows`` ``[m]`` and
            ``near_anchor`` are overwritten). The rest are scratch: xl .. load, alpha ..
            source_out ``[n]``, ``act``, impulse, total, ccd_rows .. settled ``[m]``. A
            differentiable launch saves each substep's state and forces (x_saved ..
            f_saved), its near rows (row_sets .. row_set_sizes) and the vertices the step
            limit truncated: substep r's are ``cut_vertex[cut_start[r]:cut_start[r + 1]]``
            with their scales and the bounds those came from (``cut_alpha``,
            ``cut_source``); where they would overflow ``cut_vertex``, it stops before the
            substep (``RECORDS_FULL``).
            Writes ``status = (substeps taken, why it stopped, which check, near
            selections, limited vertex-steps, near rows last selected, the volume limit's
            vertex-steps and substeps, its turns after the first, the steps tried again
            shorter)`` and ``stats =
            (offset, largest displacement)`` (m) of the last substep taken (``stats[2]``:
            the offset of the one held back; ``stats[3]``: the last selection's reach;
            ``stats[4:6]`` add up the step limit's rows by the anchor distances and those of
            them it measured, ``select_ccd_rows``).
            """
            n = x.shape[0]
            taken = int(0)  # noqa: UP018 - a Warp variable
            pieces = 1 << p.split_levels  # the shortest step, in parts of the substep
            n_rows = p.n_rows
            near_reach = p.near_reach
            last_step = p.last_step
            selections = int(0)  # noqa: UP018 - a Warp variable
            limited = int(0)  # noqa: UP018 - a Warp variable
            n_cuts = int(0)  # noqa: UP018 - the truncated vertices saved (differentiable)
            if p.differentiable != 0:  # the near rows each substep used, for the adjoint
                cut_start[0] = 0
                for r in range(n_rows):
                    row_sets[0, r] = cand.rows[r]
                row_set_sizes[0] = n_rows
            for step in range(targets.shape[0]):
                j_first = int(0)  # noqa: UP018 - a Warp variable
                if step == 0:
                    j_first = first_substep
                for j in range(j_first, substeps):
                    done = int(0)  # noqa: UP018 - the substep's time taken, in shortest steps
                    size = pieces  # the length of the step tried next, in shortest steps
                    fresh = int(1)  # noqa: UP018 - 0: a cut step tried again, the same forces
                    sub_limited = int(0)  # noqa: UP018 - the substep's truncated vertex-steps
                    sub_splits = int(0)  # noqa: UP018 - and its steps tried again shorter
                    sub_status = wp.vec3i(status[6], status[7], status[8])
                    moved = wp.float64(0.0)  # the sets' offsets at x (set by a fresh step)
                    near_moved = wp.float64(0.0)
                    while done < pieces:
                        # A step of size / pieces of the substep (its h: sp, friction: pp).
                        sp = VertexUpdate()
                        sp = s
                        sp.h = s.h * T(size) / T(pieces)
                        pp = ContactStep()
                        pp = p
                        pp.h_mu = p.h_mu * T(size) / T(pieces)
                        if fresh != 0:
                            # 1. The sets hold at x.
                            lo = vec3(T(1e30), T(1e30), T(1e30))
                            hi = -lo
                            near_lo = lo
                            near_hi = hi
                            for i in range(n):
                                y = local(x[i], p.origin)
                                xl[i] = y
                                lo = wp.min(lo, y - anchor[i])
                                hi = wp.max(hi, y - anchor[i])
                                near_lo = wp.min(near_lo, y - near_anchor[i])
                                near_hi = wp.max(near_hi, y - near_anchor[i])
                            # Each vertex's offset from the anchor less the common part (the
                            # centre of the box), and the farthest (candidates.farthest_offset).
                            common = T(0.5) * (lo + hi)
                            moved = wp.float64(0.0)
                            for i in range(n):
                                o = wp.length(xl[i] - anchor[i] - common)
                                offsets[i] = o
                                moved = wp.max(moved, wp.float64(o))
                            near_moved = offset(near_lo, near_hi)
                            expired = near_moved > near_reach
                            # A differentiable launch keeps at most row_sets' sets of rows.
                            full = p.differentiable != 0 and selections + 1 >= row_sets.shape[0]
                            if moved > p.reach or (expired and full):
                                release(team)
                                status[0] = taken
                                roll_back(x, v, x_start, v_start, done, status, sub_status)
                                status[1] = SETS_EXPIRED
                                status[3] = selections
                                return
                            if expired:
                                # The near rows again, here (SurfaceContact._near_set): the
                                # candidates closer than dhat + 2 R, R = near_steps s, those the
                                # anchor's distances cannot rule out measured.
                                near_reach = p.near_steps * last_step
                                within = p.dhat + wp.float64(2.0) * near_reach
                                beyond = (within + wp.float64(2.0) * moved) * wp.float64(1.0 + 1e-5)
                                beyond = beyond + wp.float64(1e-12)
                                kept = T(within * wp.float64(1.0 + 1e-5) + wp.float64(1e-12))
                                n_rows = int(0)  # noqa: UP018 - a Warp variable
                                for k in range(cand.pairs.shape[0]):
                                    if anchor_d2[k] < beyond * beyond:
                                        y0 = xl[cand.pairs[k, 0]]
                                        y1 = xl[cand.pairs[k, 1]]
                                        y2 = xl[cand.pairs[k, 2]]
                                        y3 = xl[cand.pairs[k, 3]]
                                        kind = cand.kinds[k]
                                        if box_gap2(kind, y0, y1, y2, y3) < kept * kept:
                                            cw = pair_weights(
                                                kind, y0, y1, y2, y3, p.parallel_fraction
                                            )
                                            diff = cw[0] * y0 + cw[1] * y1 + cw[2] * y2 + cw[3] * y3
                                            if wp.dot(diff, diff) < kept * kept:
                                                cand.rows[n_rows] = k
                                                n_rows += 1
                                for i in range(n):
                                    near_anchor[i] = xl[i]
                                near_moved = wp.float64(0.0)
                                selections += 1
                                status[5] = n_rows
                                stats[3] = near_reach
                                if p.differentiable != 0:
                                    for r in range(n_rows):
                                        row_sets[selections, r] = cand.rows[r]
                                    row_set_sizes[selections] = n_rows
                            # 2. Forces.
                            for i in range(n):
                                f_el[i] = vec3()
                                f_c[i] = vec3()
                            # The other workers' tets at once (their forces: team.forces).
                            if share_tets(team, FORCES) != 0:
                                status[0] = taken
                                status[1] = GAVE_UP
                                return
                            for e in range(team.tet_stop):
                                add_tet_forces(x, el, e, f_el)
                            if shared_done(team) != 0:
                                status[0] = taken
                                status[1] = GAVE_UP
                                return
                            # Theirs into f_el (their rows are zeroed as read): a step
                            # tried again shorter reuses f_el.
                            for i in range(n):
                                f_el[i] = f_el[i] + others_forces(team, i)
                        n_active = select_active(
                            cand, cand.rows, n_rows, xl, c.mass, pp, act, total
                        )
                        if fresh != 0:
                            for t in range(n_active):
                                k = act.ids[t]
                                i0, i1, i2, i3 = pair_ids(cand, k)
                                x0 = xl[i0]
                                x1 = xl[i1]
                                x2 = xl[i2]
                                x3 = xl[i3]
                                kind = cand.kinds[k]
                                cw = pair_weights(kind, x0, x1, x2, x3, p.parallel_fraction)
                                diff = cw[0] * x0 + cw[1] * x1 + cw[2] * x2 + cw[3] * x3
                                m01 = wp.min(c.mass[i0], c.mass[i1])
                                w = p.kappa * wp.min(m01, wp.min(c.mass[i2], c.mass[i3]))
                                g0, g1, g2, g3 = barrier_pair(
                                    kind, x0, x1, x2, x3, cw, diff, wp.dot(diff, diff), cand.eps[k],
                                    w, p.s_hat, p.floor,
                                )  # fmt: skip
                                f_c[i0] = f_c[i0] - g0
                                f_c[i1] = f_c[i1] - g1
                                f_c[i2] = f_c[i2] - g2
                                f_c[i3] = f_c[i3] - g3
                        # 3. Velocities, friction, the move and the ground.
                        for i in range(n):
                            m = c.mass[i]
                            world = i // c.world_size
                            is_fixed = int(0)  # noqa: UP018 - a Warp variable, not a constant
                            if c.fixed_slot[i] >= 0:
                                is_fixed = 1
                            f = (f_el[i] + m * c.gravity[world]) + f_c[i]
                            v_new[i] = vertex_velocity(v[i], f, m, c.damping[world], is_fixed, sp)
                            if p.differentiable != 0:
                                row_set_of[taken] = selections
                                x_saved[taken, i] = x[i]
                                v_saved[taken, i] = v[i]
                                f_saved[taken, i] = f
                        if n_active > 0:
                            for _pass in range(p.passes):
                                friction_pass(
                                    cand, act, n_active, p.eps_v, v_new, v_new, load, impulse,
                                    total, total,
                                )  # fmt: skip
                        lo = vec3(T(1e30), T(1e30), T(1e30))
                        hi = -lo
                        for i in range(n):
                            xn, vn = vertex_move(x[i], v_new[i], sp)
                            x_new[i] = xn
                            v_new[i] = vn
                            d = local(xn, p.origin) - xl[i]
                            dx[i] = d
                            lengths[i] = wp.length(d)
                            lo = wp.min(lo, d)
                            hi = wp.max(hi, d)
                        # 4. The step: not capped, within the reach, limiting no pair.
                        relative = offset(lo, hi)
                        absolute = wp.float64(wp.length(wp.max(wp.abs(lo), wp.abs(hi))))
                        general = int(0)  # noqa: UP018 - a Warp variable
                        if relative > p.max_step or absolute > p.max_translation:
                            general = CAPPED
                        elif moved + relative > p.reach:
                            general = BEYOND_REACH
                        n_limited = int(0)  # noqa: UP018 - a Warp variable
                        cut = int(0)  # noqa: UP018 - a Warp variable
                        n_ccd = int(0)  # noqa: UP018 - a Warp variable
                        if general == 0:
                            n_ccd, considered = select_ccd_rows(
                                cand, anchor_d2, ccd_rows, p, moved, relative, lo, hi, n_rows,
                                near_reach, near_moved, offsets, lengths,
                            )  # fmt: skip
                            stats[4] = stats[4] + wp.float64(considered)
                            stats[5] = stats[5] + wp.float64(n_ccd)
                        if n_ccd > 0:
                            cut = collision_scales(
                                cand, ccd_rows, n_ccd, xl, dx, p, bounds, scales_abs, settled,
                                alpha, alpha_out, source, source_out, True,
                            )  # fmt: skip
                        split = int(0)  # noqa: UP018 - 1: the step is tried again at half its length
                        if cut != 0 and size > 1:
                            if p.differentiable != 0:
                                general = SPLIT
                            else:
                                split = 1
                                cut = 0
                        if cut != 0:
                            # The truncated step: within the candidates' reach (else the
                            # caller builds a set for it, held back with the truncated step's
                            # offset, which it measures the same way), its offset the last step's.
                            t_lo = vec3(T(1e30), T(1e30), T(1e30))
                            t_hi = -t_lo
                            for i in range(n):
                                a = alpha[i]
                                if a < T(1.0):
                                    n_limited += 1
                                y = a * dx[i]
                                t_lo = wp.min(t_lo, y)
                                t_hi = wp.max(t_hi, y)
                            relative = offset(t_lo, t_hi)
                            if moved + relative > p.reach:
                                general = BEYOND_REACH
                            elif p.differentiable != 0 and n_cuts + n_limited > cut_vertex.shape[0]:
                                # Never at a launch's first substep: the records hold at least
                                # one per vertex.
                                release(team)
                                status[0] = taken
                                status[1] = RECORDS_FULL
                                status[3] = selections
                                return
                            else:
                                e = n_cuts
                                for i in range(n):
                                    a = alpha[i]
                                    if a < T(1.0):
                                        x_new[i] = x[i] + wp.float64(a) * (x_new[i] - x[i])
                                        v_new[i] = v_new[i] * a
                                        if p.differentiable != 0:
                                            cut_vertex[e] = i
                                            cut_source[e] = source[i]
                                            cut_alpha[e] = a
                                            e += 1
                        # The volume limit on the step as the step limit left it, in turns with
                        # the step limit on the shortened step (integrator._limit_volumes).
                        n_volume = int(0)  # noqa: UP018 - a Warp variable
                        later_turns = int(0)  # noqa: UP018 - a Warp variable
                        if general == 0 and split == 0 and p.min_ratio > wp.float64(0.0):
                            for i in range(n):
                                volume_total[i] = wp.float64(1.0)
                            pending = int(1)  # noqa: UP018 - a Warp variable
                            for turn in range(p.volume_turns):
                                if pending != 0 and general == 0:
                                    # After the first turn every tet passed at x_new, except
                                    # where the step limit has since shortened a corner's step.
                                    if turn > 0:
                                        later_turns += 1
                                        for i in range(n):
                                            volume_changed[i] = int(alpha[i] < T(1.0))
                                    else:
                                        # The tets the first round cuts, flagged by every
                                        # worker at once (their share of the tets each).
                                        if share_tets(team, VOLUMES) != 0:
                                            status[0] = taken
                                            status[1] = GAVE_UP
                                            return
                                        for e in range(team.tet_stop):
                                            team.flags[e] = volume_fails(
                                                x, x_new, el, e, det_dm_inv, p
                                            )
                                        if shared_done(team) != 0:
                                            status[0] = taken
                                            status[1] = GAVE_UP
                                            return
                                    cuts = limit_volumes(
                                        x, x_new, el, p, volume_scale, volume_out, volume_changed,
                                        det_dm_inv, team.flags, turn == 0,
                                    )  # fmt: skip
                                    if cuts == 0:
                                        pending = 0
                                    elif p.differentiable != 0:
                                        general = LIMITED
                                    else:
                                        for i in range(n):
                                            shrink = volume_scale[i]
                                            if shrink < wp.float64(1.0):
                                                x_new[i] = x[i] + shrink * (x_new[i] - x[i])
                                                v_new[i] = v_new[i] * T(shrink)
                                                volume_total[i] = volume_total[i] * shrink
                                        # The step limit again, on the shortened step (its
                                        # rows selected for it, as the general path does).
                                        lo = vec3(T(1e30), T(1e30), T(1e30))
                                        hi = -lo
                                        for i in range(n):
                                            d = local(x_new[i], p.origin) - xl[i]
                                            f_c[i] = d
                                            lengths[i] = wp.length(d)
                                            lo = wp.min(lo, d)
                                            hi = wp.max(hi, d)
                                        rows_again, considered = select_ccd_rows(
                                            cand, anchor_d2, ccd_rows, p, moved, offset(lo, hi),
                                            lo, hi, n_rows, near_reach, near_moved, offsets,
                                            lengths,
                                        )  # fmt: skip
                                        stats[4] = stats[4] + wp.float64(considered)
                                        stats[5] = stats[5] + wp.float64(rows_again)
                                        again = int(0)  # noqa: UP018 - a Warp variable
                                        if rows_again > 0:
                                            again = collision_scales(
                                                cand, ccd_rows, rows_again, xl, f_c, p, bounds,
                                                scales_abs, settled, alpha, alpha_out, source,
                                                source_out, True,
                                            )  # fmt: skip
                                        if again == 0:
                                            pending = 0
                                        else:
                                            for i in range(n):
                                                shrink = wp.float64(alpha[i])
                                                if shrink < wp.float64(1.0):
                                                    x_new[i] = x[i] + shrink * (x_new[i] - x[i])
                                                    v_new[i] = v_new[i] * alpha[i]
                            if pending != 0 and general == 0:
                                general = LIMITED  # the turns did not settle: the general path
                            for i in range(n):
                                if volume_total[i] < wp.float64(1.0):
                                    n_volume += 1
                        if general != 0:
                            release(team)
                            status[0] = taken
                            roll_back(x, v, x_start, v_start, done, status, sub_status)
                            status[1] = GENERAL_STEP
                            status[2] = general
                            status[3] = selections
                            stats[2] = relative
                            return
                        if split != 0:
                            if size == pieces:  # the substep's start, for roll_back
                                for i in range(n):
                                    x_start[i] = x[i]
                                    v_start[i] = v[i]
                            size = size // 2
                            fresh = 0
                            sub_splits += 1
                        else:
                            # 5. Commit the step; the substep's last one commits the substep.
                            ends = done + size
                            last = ends == pieces
                            fraction = wp.float64(j * pieces + ends) / wp.float64(substeps * pieces)
                            for i in range(n):
                                slot = c.fixed_slot[i]
                                xn = x_new[i]
                                if slot >= 0:
                                    if j == 0 and done == 0:
                                        fixed_start[slot] = x[i]
                                    start = fixed_start[slot]
                                    xn = start + (targets[step, slot] - start) * fraction
                                x[i] = xn
                                v[i] = v_new[i]
                                if j == substeps - 1 and last:
                                    x_out[step, i] = xn
                                    v_out[step, i] = v_new[i]
                            done = ends
                            size = done & -done  # the power of two that done is an odd multiple of
                            fresh = 1
                            last_step = relative
                            sub_limited += n_limited
                            if n_volume > 0:
                                status[6] += n_volume
                                status[7] += 1
                            status[8] += later_turns
                            stats[0] = relative
                            stats[1] = absolute
                            status[3] = selections
                            if last:
                                taken += 1
                                limited += sub_limited
                                if p.differentiable != 0:
                                    n_cuts += sub_limited
                                    cut_start[taken] = n_cuts
                                status[4] = limited
                                status[9] += sub_splits
            release(team)
            status[0] = taken
            status[1] = FINISHED
            status[3] = selections

        return contact_advance

    # Scalar functions whose gradients (wp.grad) are the per-pair vector-Jacobian products
    # of the backward pass: each returns its outputs dotted with their cotangents.
    @wp.func
    def barrier_dot(
        kind: int, x0: vec3, x1: vec3, x2: vec3, x3: vec3, m0: T, m1: T, m2: T, m3: T,
        eps_k: T, kappa: T, s_hat: T, floor: T, pf: T, a0: vec3, a1: vec3, a2: vec3, a3: vec3,
    ) -> T:  # fmt: skip
        cw = pair_weights(kind, x0, x1, x2, x3, pf)
        diff = cw[0] * x0 + cw[1] * x1 + cw[2] * x2 + cw[3] * x3
        w = kappa * wp.min(wp.min(m0, m1), wp.min(m2, m3))
        d2 = wp.dot(diff, diff)
        g0, g1, g2, g3 = barrier_pair(kind, x0, x1, x2, x3, cw, diff, d2, eps_k, w, s_hat, floor)
        # The forces are minus the gradient.
        return -(wp.dot(a0, g0) + wp.dot(a1, g1) + wp.dot(a2, g2) + wp.dot(a3, g3))

    @wp.func
    def geometry_dot(
        kind: int, x0: vec3, x1: vec3, x2: vec3, x3: vec3, m0: T, m1: T, m2: T, m3: T,
        eps_k: T, s_hat: T, floor: T, kappa: T, h_mu: T, pf: T, a_cw: vec4, a_cf: vec4,
        a_n: vec3, a_me: T, a_lim: T,
    ) -> T:  # fmt: skip
        cw = pair_weights(kind, x0, x1, x2, x3, pf)
        diff = cw[0] * x0 + cw[1] * x1 + cw[2] * x2 + cw[3] * x3
        d2 = wp.dot(diff, diff)
        cf, nrm, me, lim = friction_terms(
            kind, x0, x1, x2, x3, m0, m1, m2, m3, cw, diff, d2, eps_k, s_hat, floor, kappa, h_mu
        )
        return wp.dot(a_cw, cw) + wp.dot(a_cf, cf) + wp.dot(a_n, nrm) + a_me * me + a_lim * lim

    @wp.func
    def stop_dot(
        cw: vec4, nrm: vec3, me: T, lim: T, v0: vec3, v1: vec3, v2: vec3, v3: vec3, eps_v: T,
        a_stop: T, a_imp: vec3,
    ) -> T:  # fmt: skip
        stop, imp = friction_stop(cw, nrm, me, lim, v0, v1, v2, v3, eps_v)
        return a_stop * stop + wp.dot(a_imp, imp)

    @wp.func
    def capped_dot(
        l0: T, l1: T, l2: T, l3: T, before: vec3, imp: vec3, cap: T, a_after: vec3
    ) -> T:  # fmt: skip
        most = wp.max(wp.max(l0, l1), wp.max(l2, l3))
        return wp.dot(a_after, friction_capped(most, before, imp, cap))

    @wp.func
    def bound_dot(
        kind: int, x0: vec3, x1: vec3, x2: vec3, x3: vec3, y0: vec3, y1: vec3, y2: vec3,
        y3: vec3, keep: T, slack: T, pf: T, absolute: int, a_t: T,
    ) -> T:  # fmt: skip
        # The step limit's bound of a pair at x0..x3 moving by y0..y3 (pair_scale's t, or
        # its t_abs with ``absolute``), times its cotangent.
        limit, aim = pair_aim(kind, x0, x1, x2, x3, keep, slack, pf)
        reach = T(0.0)
        if absolute != 0:
            reach = side_reach(kind, y0, y1, y2, y3)
        else:
            reach = relative_reach(kind, y0, y1, y2, y3)
        return a_t * (aim / reach)

    # The per-pair vector-Jacobian products: the gradients (wp.grad) of the functions above,
    # the cotangents of their inputs by name.
    @wp.func
    def barrier_vjp(
        kind: int, x0: vec3, x1: vec3, x2: vec3, x3: vec3, m0: T, m1: T, m2: T, m3: T,
        eps_k: T, kappa: T, s_hat: T, floor: T, pf: T, a0: vec3, a1: vec3, a2: vec3, a3: vec3,
    ):  # fmt: skip
        g = wp.grad(barrier_dot)(
            kind, x0, x1, x2, x3, m0, m1, m2, m3, eps_k, kappa, s_hat, floor, pf, a0, a1, a2, a3
        )
        return g[1], g[2], g[3], g[4], vec4(g[5], g[6], g[7], g[8])

    @wp.func
    def geometry_vjp(
        kind: int, x0: vec3, x1: vec3, x2: vec3, x3: vec3, m0: T, m1: T, m2: T, m3: T,
        eps_k: T, s_hat: T, floor: T, kappa: T, h_mu: T, pf: T, a_cw: vec4, a_cf: vec4,
        a_n: vec3, a_me: T, a_lim: T,
    ):  # fmt: skip
        g = wp.grad(geometry_dot)(
            kind, x0, x1, x2, x3, m0, m1, m2, m3, eps_k, s_hat, floor, kappa, h_mu, pf, a_cw,
            a_cf, a_n, a_me, a_lim,
        )  # fmt: skip
        return g[1], g[2], g[3], g[4], vec4(g[5], g[6], g[7], g[8])

    @wp.func
    def stop_vjp(
        cw: vec4, nrm: vec3, me: T, lim: T, v0: vec3, v1: vec3, v2: vec3, v3: vec3, eps_v: T,
        a_stop: T, a_imp: vec3,
    ):  # fmt: skip
        g = wp.grad(stop_dot)(cw, nrm, me, lim, v0, v1, v2, v3, eps_v, a_stop, a_imp)
        return g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]

    @wp.func
    def capped_vjp(l0: T, l1: T, l2: T, l3: T, before: vec3, imp: vec3, cap: T, a_after: vec3):
        g = wp.grad(capped_dot)(l0, l1, l2, l3, before, imp, cap, a_after)
        return vec4(g[0], g[1], g[2], g[3]), g[4], g[5], g[6]

    @wp.func
    def bound_vjp(
        kind: int, x0: vec3, x1: vec3, x2: vec3, x3: vec3, y0: vec3, y1: vec3, y2: vec3,
        y3: vec3, keep: T, slack: T, pf: T, absolute: int, a_t: T,
    ):  # fmt: skip
        g = wp.grad(bound_dot)(
            kind, x0, x1, x2, x3, y0, y1, y2, y3, keep, slack, pf, absolute, a_t
        )  # fmt: skip
        return g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8]

    @wp.kernel(module=module, enable_backward=True)
    def pair_adjoints(
        x: wp.array(dtype=vec3), s4: wp.array(dtype=vec4), t: wp.array(dtype=T), k: int
    ):  # fmt: skip
        """Never launched. Warp writes a function's adjoint only where a kernel with
        adjoints calls it (elsewhere an empty stub: without this kernel the closest-point
        weights' derivatives were silently dropped, 5% of a contact gradient), and the
        wp.grad calls of ``contact_retreat`` need those of the per-pair functions."""
        t[0] = barrier_dot(
            k, x[0], x[1], x[2], x[3], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8], t[9],
            x[4], x[5], x[6], x[7],
        )  # fmt: skip
        t[1] = geometry_dot(
            k, x[0], x[1], x[2], x[3], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8], t[9],
            t[10], s4[0], s4[1], x[4], t[11], t[12],
        )  # fmt: skip
        t[2] = stop_dot(s4[0], x[0], t[1], t[2], x[1], x[2], x[3], x[4], t[3], t[4], x[5])
        t[3] = capped_dot(t[1], t[2], t[3], t[4], x[0], x[1], t[5], x[2])
        t[4] = bound_dot(
            k, x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7], t[1], t[2], t[3], k, t[4]
        )  # fmt: skip

    @wp.func
    def moved_by(x: wp.vec3d, w: vec3, s: VertexUpdate, origin: wp.vec3d, xl: vec3) -> vec3:
        """A vertex's step (local) by the move and the ground at velocity w, as the step
        limit measured it."""
        xn, vn = vertex_move(x, w, s)
        return local(xn, origin) - xl

    @wp.func
    def add_pair_cotangents(
        adj_x: wp.array(dtype=vec3), adj_mass: wp.array(dtype=T), i0: int, i1: int, i2: int,
        i3: int, g0: vec3, g1: vec3, g2: vec3, g3: vec3, gm: vec4,
    ):  # fmt: skip
        """Adds a pair's position and mass cotangents to its four vertices'."""
        adj_x[i0] = adj_x[i0] + g0
        adj_x[i1] = adj_x[i1] + g1
        adj_x[i2] = adj_x[i2] + g2
        adj_x[i3] = adj_x[i3] + g3
        adj_mass[i0] = adj_mass[i0] + gm[0]
        adj_mass[i1] = adj_mass[i1] + gm[1]
        adj_mass[i2] = adj_mass[i2] + gm[2]
        adj_mass[i3] = adj_mass[i3] + gm[3]

    def contact_retreat_kernel(add_tet_force_vjp):
        @wp.kernel(module=module, enable_backward=False)
        def contact_retreat(
            el: TetElements,
            c: VertexCoefficients,
            s: VertexUpdate,
            substeps: int,
            first_substep: int,
            taken: int,
            p: ContactStep,
            team: Team,
            cand: CandidatePairs,
            x_saved: wp.array2d(dtype=wp.vec3d),
            v_saved: wp.array2d(dtype=vec3),
            f_saved: wp.array2d(dtype=vec3),
            row_sets: wp.array2d(dtype=wp.int32),
            row_set_of: wp.array(dtype=wp.int32),
            row_set_sizes: wp.array(dtype=wp.int32),
            cut_vertex: wp.array(dtype=wp.int32),
            cut_source: wp.array(dtype=wp.int32),
            cut_alpha: wp.array(dtype=T),
            cut_start: wp.array(dtype=wp.int32),
            cut_adj: wp.array(dtype=T),
            grad_xs: wp.array2d(dtype=vec3),
            grad_vs: wp.array2d(dtype=vec3),
            xl: wp.array(dtype=vec3),
            v_pass: wp.array2d(dtype=vec3),
            total_pass: wp.array2d(dtype=vec3),
            load_pass: wp.array2d(dtype=T),
            impulse_pass: wp.array2d(dtype=vec3),
            act: ActivePairs,
            adj_cw: wp.array(dtype=vec4),
            adj_cf: wp.array(dtype=vec4),
            adj_n: wp.array(dtype=vec3),
            adj_me: wp.array(dtype=T),
            adj_lim: wp.array(dtype=T),
            adj_total: wp.array(dtype=vec3),
            adj_imp: wp.array(dtype=vec3),
            adj_load: wp.array(dtype=T),
            adj_f: wp.array(dtype=vec3),
            adj_xl: wp.array(dtype=vec3),
            hvp: wp.array(dtype=vec3),
            adj_x: wp.array(dtype=vec3),
            adj_v: wp.array(dtype=vec3),
            adj_start: wp.array(dtype=vec3),
            adj_targets: wp.array2d(dtype=vec3),
            adj_mass: wp.array(dtype=T),
            adj_mu: wp.array(dtype=T),
            adj_lam: wp.array(dtype=T),
            adj_gravity: wp.array(dtype=vec3),
            adj_damping: wp.array(dtype=T),
        ):
            """The adjoint of ``taken`` substeps of a differentiable ``contact_advance``
            launch, in reverse; dim 1 (the main worker of ``team``, whose other workers
            run ``tet_vjp_share`` at once).

            Reads the state and total forces it saved ``[taken, n]``, the cotangents of its
            frames ``grad_xs``, ``grad_vs`` ``[steps, n]`` (rows: the steps ending in the
            launch, counted from its first), and on entry ``adj_x``, ``adj_v`` ``[n]`` (of
            its end state) and ``adj_start`` ``[k]`` (of the prescribed vertices' start of
            its last step). Leaves in them the cotangents of its start state and of the
            start it was given (zero where its first substep began a step), adds those of
            the targets, masses, mu, lam, gravity and damping (``[1]`` per world). Per
            substep: the velocity update and friction are replayed, then the adjoints of
            the move and the ground, the friction passes (in reverse), the lagged friction
            terms, the velocity update, the barrier and the elastic forces.
            """
            n = adj_x.shape[0]
            passes = p.passes
            for back in range(taken):
                r = taken - 1 - back
                g = first_substep + r
                step = g // substeps
                j = g - step * substeps
                if j == substeps - 1:
                    for i in range(n):
                        adj_x[i] = adj_x[i] + grad_xs[step, i]
                        adj_v[i] = adj_v[i] + grad_vs[step, i]
                    if back > 0:  # a new step: its own prescribed start
                        for k in range(adj_start.shape[0]):
                            adj_start[k] = vec3()
                # Prescribed vertices: x_new = start + (target - start) fraction.
                fraction = T(j + 1) / T(substeps)
                for i in range(n):
                    slot = c.fixed_slot[i]
                    if slot >= 0:
                        adj_targets[step, slot] = adj_targets[step, slot] + adj_x[i] * fraction
                        adj_start[slot] = adj_start[slot] + adj_x[i] * (T(1.0) - fraction)
                        adj_x[i] = vec3()
                # Replay: local positions, velocities, the active pairs and friction.
                for i in range(n):
                    xl[i] = local(x_saved[r, i], p.origin)
                    is_fixed = int(0)  # noqa: UP018 - a Warp variable
                    if c.fixed_slot[i] >= 0:
                        is_fixed = 1
                    world = i // c.world_size
                    v_pass[0, i] = vertex_velocity(
                        v_saved[r, i], f_saved[r, i], c.mass[i], c.damping[world], is_fixed, s
                    )
                row_set = row_set_of[r]
                n_active = select_active(
                    cand, row_sets[row_set], row_set_sizes[row_set], xl, c.mass, p, act,
                    total_pass[0],
                )  # fmt: skip
                used = int(0)  # noqa: UP018 - the passes replayed
                if n_active > 0:
                    used = passes
                for q in range(used):
                    for i in range(n):
                        v_pass[q + 1, i] = v_pass[q, i]
                    friction_pass(
                        cand, act, n_active, p.eps_v, v_pass[q], v_pass[q + 1], load_pass[q],
                        impulse_pass[q], total_pass[q], total_pass[q + 1],
                    )  # fmt: skip
                for i in range(n):
                    adj_xl[i] = vec3()
                    adj_load[i] = T(0.0)
                    hvp[i] = vec3()  # here: the cotangent of x through truncated steps
                # The step limit's truncation, x + a (x_move - x) and a v_move, with the
                # scale a the bound of the pair it came from: adj_x and adj_v become the
                # cotangents of the move's x and v.
                for e in range(cut_start[r], cut_start[r + 1]):
                    i = cut_vertex[e]
                    xn, vn = vertex_move(x_saved[r, i], v_pass[used, i], s)
                    y = local(xn, p.origin) - xl[i]
                    cut_adj[e] = wp.dot(adj_x[i], y) + wp.dot(adj_v[i], vn)
                for e in range(cut_start[r], cut_start[r + 1]):
                    i = cut_vertex[e]
                    a = cut_alpha[e]
                    hvp[i] = (T(1.0) - a) * adj_x[i]
                    adj_x[i] = a * adj_x[i]
                    adj_v[i] = a * adj_v[i]
                for e in range(cut_start[r], cut_start[r + 1]):
                    code = cut_source[e]
                    k = code // 2
                    i0, i1, i2, i3 = pair_ids(cand, k)
                    q0, q1, q2, q3, z0, z1, z2, z3 = bound_vjp(
                        cand.kinds[k], xl[i0], xl[i1], xl[i2], xl[i3],
                        moved_by(x_saved[r, i0], v_pass[used, i0], s, p.origin, xl[i0]),
                        moved_by(x_saved[r, i1], v_pass[used, i1], s, p.origin, xl[i1]),
                        moved_by(x_saved[r, i2], v_pass[used, i2], s, p.origin, xl[i2]),
                        moved_by(x_saved[r, i3], v_pass[used, i3], s, p.origin, xl[i3]),
                        p.keep, p.slack, p.parallel_fraction, code - 2 * k, cut_adj[e],
                    )  # fmt: skip
                    adj_xl[i0] = adj_xl[i0] + q0 - z0
                    adj_xl[i1] = adj_xl[i1] + q1 - z1
                    adj_xl[i2] = adj_xl[i2] + q2 - z2
                    adj_xl[i3] = adj_xl[i3] + q3 - z3
                    adj_x[i0] = adj_x[i0] + z0
                    adj_x[i1] = adj_x[i1] + z1
                    adj_x[i2] = adj_x[i2] + z2
                    adj_x[i3] = adj_x[i3] + z3
                # The move and the ground: adj_v becomes the cotangent of the velocity
                # after friction, adj_x that of x (its direct part).
                for i in range(n):
                    ax, aw = vertex_move_vjp(x_saved[r, i], v_pass[used, i], s, adj_x[i], adj_v[i])
                    adj_x[i] = ax + hvp[i]
                    adj_v[i] = aw
                # Friction passes in reverse (v_out = v_in - sum c_i / m_i change).
                for t in range(n_active):
                    adj_cw[t] = vec4()
                    adj_cf[t] = vec4()
                    adj_n[t] = vec3()
                    adj_me[t] = T(0.0)
                    adj_lim[t] = T(0.0)
                    adj_total[t] = vec3()
                for back_q in range(used):
                    q = used - 1 - back_q
                    for t in range(n_active):
                        k = act.ids[t]
                        i0, i1, i2, i3 = pair_ids(cand, k)
                        cf = act.coef[t]
                        before = total_pass[q, t]
                        change = total_pass[q + 1, t] - before
                        a_change = -(
                            cf[0] * adj_v[i0] + cf[1] * adj_v[i1] + cf[2] * adj_v[i2]
                            + cf[3] * adj_v[i3]
                        )  # fmt: skip
                        adj_cf[t] = adj_cf[t] - vec4(
                            wp.dot(change, adj_v[i0]), wp.dot(change, adj_v[i1]),
                            wp.dot(change, adj_v[i2]), wp.dot(change, adj_v[i3]),
                        )  # fmt: skip
                        a_after = adj_total[t] + a_change
                        g_load, g_before, g_imp, g_cap = capped_vjp(
                            load_pass[q, i0], load_pass[q, i1], load_pass[q, i2],
                            load_pass[q, i3], before, impulse_pass[q, t], act.limit[t], a_after,
                        )  # fmt: skip
                        adj_load[i0] = adj_load[i0] + g_load[0]
                        adj_load[i1] = adj_load[i1] + g_load[1]
                        adj_load[i2] = adj_load[i2] + g_load[2]
                        adj_load[i3] = adj_load[i3] + g_load[3]
                        adj_total[t] = g_before - a_change
                        adj_imp[t] = g_imp
                        adj_lim[t] = adj_lim[t] + g_cap
                    # The slip: the loads and impulses from the pass's velocities.
                    for t in range(n_active):
                        k = act.ids[t]
                        i0, i1, i2, i3 = pair_ids(cand, k)
                        a_stop = adj_load[i0] + adj_load[i1] + adj_load[i2] + adj_load[i3]
                        s_cw, s_n, s_me, s_lim, s_v0, s_v1, s_v2, s_v3 = stop_vjp(
                            act.weights[t], act.normal[t], act.m_eff[t], act.limit[t],
                            v_pass[q, i0],
                            v_pass[q, i1], v_pass[q, i2], v_pass[q, i3], p.eps_v, a_stop,
                            adj_imp[t],
                        )  # fmt: skip
                        adj_cw[t] = adj_cw[t] + s_cw
                        adj_n[t] = adj_n[t] + s_n
                        adj_me[t] = adj_me[t] + s_me
                        adj_lim[t] = adj_lim[t] + s_lim
                        adj_v[i0] = adj_v[i0] + s_v0
                        adj_v[i1] = adj_v[i1] + s_v1
                        adj_v[i2] = adj_v[i2] + s_v2
                        adj_v[i3] = adj_v[i3] + s_v3
                    for i in range(n):
                        adj_load[i] = T(0.0)
                # The lagged friction terms, from x and the masses.
                if used > 0:
                    for t in range(n_active):
                        k = act.ids[t]
                        i0, i1, i2, i3 = pair_ids(cand, k)
                        q0, q1, q2, q3, qm = geometry_vjp(
                            cand.kinds[k], xl[i0], xl[i1], xl[i2], xl[i3], c.mass[i0], c.mass[i1],
                            c.mass[i2], c.mass[i3], cand.eps[k], p.s_hat, p.floor, p.kappa, p.h_mu,
                            p.parallel_fraction, adj_cw[t], adj_cf[t], adj_n[t], adj_me[t],
                            adj_lim[t],
                        )  # fmt: skip
                        add_pair_cotangents(adj_xl, adj_mass, i0, i1, i2, i3, q0, q1, q2, q3, qm)
                # The velocity update: adj_v becomes that of the substep's start velocity.
                for i in range(n):
                    m = c.mass[i]
                    world = i // c.world_size
                    is_fixed = int(0)  # noqa: UP018 - a Warp variable
                    if c.fixed_slot[i] >= 0:
                        is_fixed = 1
                    gv, gf, gm, gd = vertex_velocity_vjp(
                        v_saved[r, i], f_saved[r, i], m, c.damping[world], is_fixed, s, adj_v[i]
                    )
                    adj_v[i] = gv
                    adj_f[i] = gf
                    grav = c.gravity[world]
                    adj_mass[i] = adj_mass[i] + gm + wp.dot(gf, grav)
                    adj_gravity[world] = adj_gravity[world] + m * gf
                    adj_damping[world] = adj_damping[world] + gd
                    hvp[i] = vec3()
                # The barrier forces of the active pairs.
                for t in range(n_active):
                    k = act.ids[t]
                    i0, i1, i2, i3 = pair_ids(cand, k)
                    b0, b1, b2, b3, bm = barrier_vjp(
                        cand.kinds[k], xl[i0], xl[i1], xl[i2], xl[i3], c.mass[i0], c.mass[i1],
                        c.mass[i2], c.mass[i3], cand.eps[k], p.kappa, p.s_hat, p.floor,
                        p.parallel_fraction, adj_f[i0], adj_f[i1], adj_f[i2], adj_f[i3],
                    )  # fmt: skip
                    add_pair_cotangents(adj_xl, adj_mass, i0, i1, i2, i3, b0, b1, b2, b3, bm)
                # The elastic forces: (df/dx)^T adj_f.
                x_r = x_saved[r]
                if share_tets(team, r) != 0:
                    return
                for e in range(team.tet_stop):
                    add_tet_force_vjp(x_r, adj_f, el, e, hvp, adj_mu, adj_lam)
                if shared_done(team) != 0:
                    return
                for i in range(n):
                    total = adj_x[i] + adj_xl[i] + (hvp[i] + others_forces(team, i))
                    slot = c.fixed_slot[i]
                    if j == 0 and slot >= 0:
                        total = total + adj_start[slot]  # start = x at the step's start
                    adj_x[i] = total
                if j == 0:
                    for k in range(adj_start.shape[0]):
                        adj_start[k] = vec3()
            release(team)

        return contact_retreat

    return SimpleNamespace(
        ContactStep=ContactStep,
        Team=Team,
        CandidatePairs=CandidatePairs,
        ActivePairs=ActivePairs,
        tet_share=tuple(tet_share_kernel(add) for add in elastic.add_tet_forces),
        tet_vjp_share=tuple(tet_vjp_share_kernel(add) for add in elastic.add_tet_force_vjp),
        contact_advance=tuple(contact_advance_kernel(add) for add in elastic.add_tet_forces),
        contact_retreat=tuple(contact_retreat_kernel(add) for add in elastic.add_tet_force_vjp),
    )
