"""Steps with surface contact acting, many substeps per launch (CPU), forward and backward.

Where contact acts, a substep of the general path (:func:`diffsim.backends.integrator.substep`
around the per-stage contact kernels) costs about a millisecond of Python and launch
overhead on a mesh of a few thousand tets. :class:`FusedContactSteps` instead selects the
candidate sets (:meth:`~diffsim.contact.SurfaceContact.fused_sets`) and launches
:mod:`diffsim.kernels.contact_advance`, which takes substeps with the same formulas until
one needs more: the sets to be selected again (then selected here and launched again) or
the general path (a step that is capped, one that leaves the sets' reach: then that
substep is taken by the general path, and the next launch goes on). Where a gradient is
asked for, each launch is an autograd node (:class:`_ContactLaunch`) whose backward runs
the launch's adjoint kernel; such a launch keeps each set of near rows it selects for the
adjoint (up to ``ROW_SETS``) and the vertices its step limit truncates, with the bounds
their scales came from (up to ``CUTS_PER_VERTEX`` per vertex), and leaves steps the volume
limit cuts to the general path. With time-of-impact splits (``contact_time_of_impact``),
a launch splits a cut substep as the general path does, or, differentiable, hands it to the
general path. One world, CPU, the Warp contact implementation; everything else takes the
general path.
"""

from __future__ import annotations

import functools
import math
import time
from types import SimpleNamespace

import torch
import warp as wp

from diffsim.backends import integrator
from diffsim.backends.warp.bridge import wrap
from diffsim.backends.warp.fused import GAVE_UP_MESSAGE, SPIN_LIMIT
from diffsim.backends.warp.threads import MIN_TETS_PER_CONTACT_WORKER, one_torch_thread
from diffsim.contact.ccd import ABSOLUTE_ROUNDS, EQUALIZE_ROUNDS, MIN_GAP_FRACTION, SCALE_SLACK
from diffsim.contact.distances import PARALLEL_FRACTION
from diffsim.contact.friction import FRICTION_PASSES
from diffsim.contact.potential import MIN_DISTANCE_FRACTION
from diffsim.contact.surface_contact import CappedStep, SurfaceContact
from diffsim.kernels import contact_advance_for
from diffsim.kernels.contact_advance import (
    BEYOND_REACH,
    FINISHED,
    GAVE_UP,
    GENERAL_STEP,
    REASONS,
    RECORDS_FULL,
    SETS_EXPIRED,
)
from diffsim.physics import volume_limit as volume_rule
from diffsim.physics.elasticity import inverse_rest_determinants
from diffsim.sim.model import POSITION_DTYPE

# A differentiable launch saves at most this many truncated vertices per vertex of the mesh
# (their scales and bounds, for the adjoint); it stops before a substep that would save
# more (RECORDS_FULL), and the next launch goes on.
CUTS_PER_VERTEX = 4
# A differentiable launch selects the near rows again at most this many times less one
# (each set is kept for the adjoint, one row per candidate); then it stops, and the next
# launch starts with the sets selected anew.
ROW_SETS = 8


def runs_fused(contact, device) -> bool:
    """Whether substeps with this contact object (one world's) run in the fused contact
    launches on this Warp device: on the CPU, by the Warp contact kernels."""
    return (
        device.is_cpu and isinstance(contact, SurfaceContact) and contact.implementation == "warp"
    )


class FusedContactSteps:
    """Runs steps with surface contact in fused launches for the Warp backend on the CPU.

    Args:
        backend: the :class:`~diffsim.backends.warp.backend.WarpBackend`.
    """

    def __init__(self, backend) -> None:
        self.backend = backend
        self.counts = {
            "fused_substeps": 0,
            "general_substeps": 0,
            "launches": 0,
            "sets_expired": 0,
            "records_full": 0,  # differentiable launches stopped with their records full
            "near_selections": 0,
            "limited_vertex_steps": 0,
            # The step limit's rows: by the anchor distances, and those it measured.
            "ccd_candidates": 0,
            "ccd_rows": 0,
            # The volume limit's turns after the first (the step limit shortened a step).
            "volume_turns": 0,
            **{reason: 0 for reason in REASONS.values()},
        }
        self._scratch: dict = {}

    def usable(self) -> bool:
        """Whether the model's contact can run fused: one world, on the CPU, by the Warp
        contact kernels."""
        return runs_fused(self.backend.model.contact, self.backend.geometry.device)

    def advance(self, prepared, x: torch.Tensor, v: torch.Tensor, targets: torch.Tensor):
        """``len(targets)`` steps from ``(x, v)``: the frames ``([K, n, 3], [K, n, 3])``, as
        ``Backend.advance`` gives them; differentiable where a gradient is asked for (each
        launch then an autograd node, :class:`_ContactLaunch`)."""
        b, m = self.backend, self.backend.model
        w, g = prepared, b.geometry
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, v, targets, *w.inputs))
        substeps, n_steps = m.substeps, len(targets)
        x, v = b._positions(x), b._checked(v)
        idx = m.fixed_indices
        if not g.n_fixed:  # the kernel takes at least one (unused) target column
            targets = targets.new_zeros((n_steps, 1, 3))
        targets = targets.to(POSITION_DTYPE)
        targets = targets if grad else targets.contiguous()
        fixed_start = x[idx] if g.n_fixed else x.new_zeros((1, 3))
        if not grad:
            x, v, fixed_start = x.clone(), v.clone(), fixed_start.clone()  # in place
            xs, vs = x.new_empty((n_steps, *x.shape)), v.new_empty((n_steps, *v.shape))
        frames: list = []  # (positions, velocities) of the steps done, in order (grad)
        step, j, held_back = 0, 0, 0.0
        while step < n_steps:
            # A new tensor: the contact's caches key on it.
            sets = m.contact.fused_sets(x.detach().clone(), held_back)
            if grad:
                info: dict = {}
                out = _ContactLaunch.apply(
                    self, w, sets, j, info, x, v, fixed_start, targets[step:], *w.inputs
                )
                taken, why, check, held = info["taken"], info["why"], info["check"], info["held"]
                if taken:
                    x, v, fixed_start = out[:3]
                    frames += list(zip(out[3], out[4], strict=True))
            else:
                taken, why, check, held = self._launch(
                    w, sets, x, v, fixed_start, targets[step:], j, xs[step:], vs[step:]
                )
            if taken:
                step, j = divmod(step * substeps + j + taken, substeps)
            if why == FINISHED:
                break
            if why == RECORDS_FULL:
                self.counts["records_full"] += 1
                held_back = 0.0
                continue
            self.counts["sets_expired" if why == SETS_EXPIRED else REASONS[check]] += 1
            # Launch again with sets selected where the launch stopped, or built for the
            # step it held back (as the general path's step limit would build one), unless
            # it took nothing with sets just selected for it.
            if why == SETS_EXPIRED and taken:
                held_back = 0.0
                continue
            if check == BEYOND_REACH and (taken or not held_back):
                held_back = held
                continue
            held_back = 0.0
            # The general path for this substep (held back in the kernel, or sets that do
            # not hold even as just selected).
            if j == 0 and g.n_fixed:
                fixed_start = x[idx] if grad else fixed_start.copy_(x[idx])
            x_fixed = fixed_start + (targets[step, : g.n_fixed] - fixed_start) * (
                (j + 1) / substeps
            )
            try:
                if grad:
                    x, v = b.substep(w, x, v, x_fixed[: g.n_fixed])
                else:
                    x_new, v_new = b.substep(w, x.clone(), v.clone(), x_fixed[: g.n_fixed])
                    x.copy_(x_new)
                    v.copy_(v_new)
            except CappedStep as capped:
                capped.step = step  # the step it blew up in, for the message
                raise
            self.counts["general_substeps"] += 1
            if j == substeps - 1:
                if grad:
                    frames.append((x, v))
                else:
                    xs[step].copy_(x)
                    vs[step].copy_(v)
            step, j = divmod(step * substeps + j + 1, substeps)
        if grad:
            return torch.stack([f[0] for f in frames]), torch.stack([f[1] for f in frames])
        return xs, vs

    def _launch(self, w, sets, x, v, fixed_start, targets, j, xs, vs, saved=None):
        """One launch of ``contact_advance`` from substep j of ``targets[0]``'s step: x, v
        and fixed_start advanced in place, frames into xs, vs; with ``saved`` (x, v, f
        buffers ``[substeps left, n, 3]``, the near row sets ``[ROW_SETS, m]``, each
        substep's set ``[substeps left]`` and their sizes ``[ROW_SETS]``, the truncated
        vertices, their bounds and scales ``[capacity]`` and each substep's first of them
        ``[substeps left + 1]``) differentiable.
        Returns ``(taken, why, check, held-back offset)`` and records the substeps in the
        contact."""
        b, m = self.backend, self.backend.model
        contact = m.contact
        g, k = b.geometry, b.kernels
        fused = contact_advance_for(k.scalar)
        scratch = self._buffers(m.n_vertices, x, v)
        status, stats = scratch["status"], scratch["stats"]
        settings = self._settings(fused, contact, v.dtype, m.substep_dt)
        volume_limit = m.volume_limit
        if volume_limit is not None:
            settings.min_ratio = volume_limit.min_ratio
            settings.volume_rounds = volume_rule.ROUNDS
            settings.volume_slack = volume_rule.SLACK
            settings.bisections = volume_rule.BISECTIONS
            settings.volume_turns = integrator.LIMIT_ALTERNATIONS
        status[6:].zero_()
        stats[4:].zero_()
        self._set_bounds(settings, sets)
        settings.differentiable = int(saved is not None)
        self.last_settings = settings
        arrays = sets.arrays
        # The kernel may select near rows of its own: copies, the contact's are kept.
        rows, act, pair = self._pair_buffers(arrays.n, v)
        rows[: len(sets.rows)].copy_(sets.rows)
        cand = self._candidate_pairs(arrays, rows)
        near_anchor = scratch["near_anchor"]
        near_anchor.copy_(sets.near_anchor)
        ids = scratch["dummy_ids"]
        saved = saved or (
            scratch["dummy_x"], scratch["dummy_v"], scratch["dummy_v"], scratch["dummy_sets"],
            ids, ids, ids, ids, scratch["dummy_scale"], ids,
        )  # fmt: skip
        start = time.perf_counter()
        team = self._team(v.dtype)
        x_w = wrap(x, k.position)
        main = functools.partial(
            wp.launch,
            fused.contact_advance[w.material],
            dim=1,
            inputs=[
                x_w, wrap(v, k.vec3), w.elements, w.vertex, w.settings,
                wrap(fixed_start, k.position),
                wrap(targets, k.position), m.substeps, j, settings, team.struct,
                cand, wrap(sets.anchor.contiguous(), k.vec3),
                wrap(sets.anchor_d2.contiguous(), wp.float64),
                wrap(near_anchor, k.vec3), *scratch["per_vertex"], act,
                *pair, *scratch["step_limit"], *scratch["volume_limit"],
                wrap(xs, k.position), wrap(vs, k.vec3),
                wrap(saved[0], k.position), wrap(saved[1], k.vec3), wrap(saved[2], k.vec3),
                wrap(saved[3], wp.int32), wrap(saved[4], wp.int32), wrap(saved[5], wp.int32),
                wrap(saved[6], wp.int32), wrap(saved[7], wp.int32), wrap(saved[8], k.scalar),
                wrap(saved[9], wp.int32),
                wrap(status, wp.int32), wrap(stats, wp.float64),
            ],
            device=g.device,
        )  # fmt: skip
        x_new, det_dm_inv = scratch["per_vertex"][3], scratch["volume_limit"][3]
        head = [x_w, x_new, w.elements, det_dm_inv, settings, team.struct]
        self._run_team(team, main, fused.tet_share[w.material], head)
        contact.timings["fused"] += time.perf_counter() - start
        self.counts["launches"] += 1
        taken, why = int(status[0]), int(status[1])
        if why == GAVE_UP:
            raise RuntimeError(GAVE_UP_MESSAGE)
        self.counts["ccd_candidates"] += int(stats[4])
        self.counts["ccd_rows"] += int(stats[5])
        if taken:
            limited, near = int(status[4]), None
            if int(status[3]):  # the rows the launch selected last, where it selected them
                picked = rows[: int(status[5])].to(torch.int64)
                near = (near_anchor.clone(), float(stats[3]), picked)
            splits = int(status[9])
            contact.after_fused(taken, float(stats[0]), float(stats[1]), near, limited, splits)
            self.counts["near_selections"] += int(status[3])
            self.counts["limited_vertex_steps"] += limited
            self.counts["fused_substeps"] += taken
            if volume_limit is not None and int(status[7]):
                volume_limit.counts["limited_vertex_steps"] += int(status[6])
                volume_limit.counts["limited_substeps"] += int(status[7])
            self.counts["volume_turns"] += int(status[8])
        check = int(status[2]) if why == GENERAL_STEP else 0
        return taken, why, check, float(stats[2])

    def _fused(self):
        """The fused contact kernels of the backend's scalar type."""
        return contact_advance_for(self.backend.kernels.scalar)

    def _team(self, dtype: torch.dtype) -> SimpleNamespace:
        """The worker threads' ``Team`` struct for this dtype (kept): one per
        ``MIN_TETS_PER_CONTACT_WORKER`` tets, at most the launcher's threads, the tets split
        in equal runs (worker w: ``bounds[w]``), and the tensors behind the struct."""
        key = ("team", dtype)
        team = self._scratch.get(key)
        if team is None:
            b = self.backend
            g, n = b.geometry, b.model.n_vertices
            threads = b.launcher.threads if b.launcher is not None else 1
            workers = max(1, min(threads, g.n_tets // MIN_TETS_PER_CONTACT_WORKER))
            bounds = [
                (g.n_tets * w // workers, g.n_tets * (w + 1) // workers) for w in range(workers)
            ]
            forces = torch.zeros((workers, n, 3), dtype=dtype)
            sync = torch.zeros(4, dtype=torch.int32)
            command = torch.zeros(2, dtype=torch.int32)
            flags = torch.zeros(g.n_tets, dtype=torch.int32)
            struct = self._fused().Team()
            struct.count, struct.tet_stop = workers, bounds[0][1]
            struct.forces = wp.from_torch(forces, dtype=b.kernels.vec3)
            struct.sync, struct.command = wp.from_torch(sync), wp.from_torch(command)
            struct.flags = wp.from_torch(flags)
            struct.spin_limit = SPIN_LIMIT
            owners = [forces, command, flags]
            team = SimpleNamespace(struct=struct, bounds=bounds, sync=sync, owners=owners)
            self._scratch[key] = team
        return team

    def _run_team(self, team, main, share, head: list, tail=None) -> None:
        """Runs ``main()`` (a launch of the main worker) here and ``share`` (the other
        workers' kernel, arguments ``[*head, worker, *its tets, *tail(worker)]``) on the
        launcher's other threads at once; raises where a worker gave up waiting."""
        if len(team.bounds) == 1:
            main()
            return
        team.sync.zero_()
        device = self.backend.geometry.device

        def guarded(job):
            def run() -> None:
                try:
                    job()
                except BaseException:
                    team.sync[2] = 1  # the others stop waiting
                    raise

            return run

        others = [
            functools.partial(
                wp.launch,
                share,
                dim=1,
                device=device,
                inputs=[*head, worker, *team.bounds[worker], *(tail(worker) if tail else [])],
            )  # fmt: skip
            for worker in range(1, len(team.bounds))
        ]
        self.backend.launcher.run(guarded(main), *(guarded(job) for job in others))
        if int(team.sync[2]):
            raise RuntimeError(GAVE_UP_MESSAGE)

    def _candidate_pairs(self, arrays, rows: torch.Tensor):
        """The ``CandidatePairs`` struct of a candidate set's arrays and the rows buffer
        (kept for the last set: a new one comes with each broad phase)."""
        held = self._scratch.get("candidates")
        if held is None or held[0] is not arrays or held[1] is not rows:
            k = self.backend.kernels
            cand = self._fused().CandidatePairs()
            cand.pairs = wp.from_torch(arrays.pairs, dtype=wp.int32)
            cand.kinds = wp.from_torch(arrays.kinds, dtype=wp.int32)
            cand.eps = wp.from_torch(arrays.eps, dtype=k.scalar)
            cand.rows = wp.from_torch(rows, dtype=wp.int32)
            held = (arrays, rows, cand)
            self._scratch["candidates"] = held
        return held[2]

    def _settings(self, fused, contact: SurfaceContact, dtype: torch.dtype, h: float):
        """The ``ContactStep`` struct's constants (the bounds are set per launch)."""
        p = fused.ContactStep()
        p.origin = wp.vec3d(*contact.origin.tolist())
        p.s_hat = contact.dhat**2
        p.floor = (MIN_DISTANCE_FRACTION * contact.dhat) ** 2
        p.kappa = contact.stiffness
        p.parallel_fraction = PARALLEL_FRACTION[dtype]
        p.h_mu = h * contact.friction
        p.eps_v = contact.friction_velocity
        p.passes = FRICTION_PASSES if contact.friction > 0.0 else 0
        p.keep, p.slack = MIN_GAP_FRACTION, SCALE_SLACK
        p.keep_factor = (1 - MIN_GAP_FRACTION) * (1 - SCALE_SLACK)
        p.equalize_rounds = EQUALIZE_ROUNDS
        p.rounds = EQUALIZE_ROUNDS + ABSOLUTE_ROUNDS
        p.split_levels = contact.split_levels
        return p

    @staticmethod
    def _set_bounds(p, sets) -> None:
        # Slightly inside the bounds: the general path measures them in its own order of
        # operations, and a substep at the edge is left to it.
        inside = 1.0 - 1e-6
        p.reach = sets.reach * inside
        p.near_reach = min(sets.near_reach, 1e300) * inside
        p.n_rows = len(sets.rows)
        p.near_steps = sets.near_steps
        p.dhat = math.sqrt(float(p.s_hat))
        p.last_step = sets.last_step
        p.closest = sets.closest
        p.max_step = sets.max_step * inside
        p.max_translation = sets.max_translation * inside

    def _buffers(self, n: int, x: torch.Tensor, v: torch.Tensor) -> dict:
        key = (n, v.dtype)
        found = self._scratch.get(key)
        if found is None:
            k = self.backend.kernels
            t = dict(dtype=v.dtype, device=v.device)
            keep = [torch.zeros((n, 3), **t) for _ in range(5)]  # xl, f_el, f_c, v_new, v_start
            x_new, x_start = (
                torch.zeros((n, 3), dtype=POSITION_DTYPE, device=x.device) for _ in range(2)
            )
            dx, load = torch.zeros((n, 3), **t), torch.zeros(n, **t)
            # Each vertex's offset from the anchor and step length, for the step limit.
            offsets, lengths = torch.zeros(n, **t), torch.zeros(n, **t)
            alpha = [torch.zeros(n, **t), torch.zeros(n, **t)]  # the step limit's scales
            # ... and the bounds they came from.
            source = [torch.zeros(n, dtype=torch.int32, device=x.device) for _ in range(2)]
            # The volume limit's scales, changed flags, det Dm^-1 per tet and total scales.
            volume = [torch.zeros(n, dtype=torch.float64, device=x.device) for _ in range(2)]
            volume.append(torch.zeros(n, dtype=torch.int32, device=x.device))
            volume.append(inverse_rest_determinants(self.backend.model.dm_inv).contiguous())
            volume.append(torch.zeros(n, dtype=torch.float64, device=x.device))
            views = [wrap(a, k.vec3) for a in keep[:3]]
            views += [wrap(x_new, k.position), wrap(keep[3], k.vec3), wrap(dx, k.vec3)]
            views += [wrap(load, k.scalar), wrap(offsets, k.scalar), wrap(lengths, k.scalar)]
            views += [wrap(x_start, k.position), wrap(keep[4], k.vec3)]  # a split substep's start
            found = {
                "owners": [
                    *keep,
                    x_new,
                    x_start,
                    dx,
                    load,
                    offsets,
                    lengths,
                    *alpha,
                    *source,
                    *volume,
                ],
                "dummy_x": torch.zeros((1, 1, 3), dtype=POSITION_DTYPE, device=x.device),
                "dummy_v": torch.zeros((1, 1, 3), **t),
                "dummy_sets": torch.zeros((1, 1), dtype=torch.int32, device=x.device),
                "dummy_ids": torch.zeros(1, dtype=torch.int32, device=x.device),
                "dummy_scale": torch.zeros(1, **t),
                "step_limit": [wrap(a, k.scalar) for a in alpha]
                + [wrap(a, wp.int32) for a in source],
                "volume_limit": [
                    wrap(volume[0], wp.float64),
                    wrap(volume[1], wp.float64),
                    wrap(volume[2], wp.int32),
                    wrap(volume[3], wp.float64),
                    wrap(volume[4], wp.float64),
                ],
                "near_anchor": torch.zeros((n, 3), **t),
                "per_vertex": views,
                "status": torch.zeros(10, dtype=torch.int32),
                "stats": torch.zeros(6, dtype=torch.float64),
            }
            self._scratch[key] = found
        return found

    def _pair_buffers(self, rows: int, v: torch.Tensor) -> tuple:
        """Scratch per candidate pair (grown as needed, kept): the near rows (a tensor),
        the ``ActivePairs`` struct, and the views of the impulses, the impulses so far and
        the step limit's rows, bounds, absolute scales and settled flags."""
        k = self.backend.kernels
        size = max(rows, 1)
        held = self._scratch.get("pairs")
        if held is None or held[0] < size or held[1] != v.dtype:
            capacity = max(size, 2 * (held[0] if held else 0), 64)
            t = dict(dtype=v.dtype, device=v.device)
            owners = [
                torch.zeros(capacity, dtype=torch.int32, device=v.device),  # rows
                torch.zeros(capacity, dtype=torch.int32, device=v.device),
                torch.zeros((capacity, 4), **t),
                torch.zeros((capacity, 4), **t),
                torch.zeros((capacity, 3), **t),
                torch.zeros(capacity, **t),
                torch.zeros(capacity, **t),
                torch.zeros((capacity, 3), **t),
                torch.zeros((capacity, 3), **t),
                torch.zeros(capacity, dtype=torch.int32, device=v.device),  # the step limit's
                torch.zeros(capacity, **t),
                torch.zeros(capacity, **t),
                torch.zeros(capacity, dtype=torch.int32, device=v.device),
            ]
            vec4 = wp.types.vector(4, k.scalar)
            types = [wp.int32, wp.int32, vec4, vec4, k.vec3, k.scalar, k.scalar, k.vec3, k.vec3]
            types += [wp.int32, k.scalar, k.scalar, wp.int32]
            act = self._fused().ActivePairs()
            act.ids, act.weights, act.coef, act.normal, act.m_eff, act.limit = (
                wp.from_torch(o, dtype=t) for o, t in zip(owners[1:7], types[1:7], strict=True)
            )
            views = [wrap(o, t) for o, t in zip(owners[7:], types[7:], strict=True)]
            held = (capacity, v.dtype, owners, act, views)
            self._scratch["pairs"] = held
        return held[2][0], held[3], held[4]

    def _adjoint_scratch(self, n: int, rows: int, passes: int, dtype, device) -> tuple:
        """``contact_retreat``'s scratch (kept, grown as needed; the kernel writes each
        before it reads it) for ``n`` vertices, ``rows`` near rows and ``passes`` friction
        passes: the views of its per-vertex and per-row arrays in its argument order, the
        ``ActivePairs`` struct, and the view of ``adj_f`` (the other workers read it)."""
        held = self._scratch.get("adjoint")
        same = held is not None and held[0] == (n, dtype)
        if not same or held[1] < rows or held[2] < passes:
            if same:
                rows, passes = max(rows, 2 * held[1]), max(passes, held[2])
            k = self.backend.kernels
            vec4 = wp.types.vector(4, k.scalar)
            shapes = {  # name: (shape, Warp type); None: int32 [rows]
                "xl": ((n, 3), k.vec3),
                "v_pass": ((passes + 1, n, 3), k.vec3),
                "total_pass": ((passes + 1, rows, 3), k.vec3),
                "load_pass": ((passes, n), k.scalar),
                "impulse_pass": ((passes, rows, 3), k.vec3),
                "ids": (None, wp.int32),  # the active pairs' rows
                "weights": ((rows, 4), vec4),
                "coef": ((rows, 4), vec4),
                "normal": ((rows, 3), k.vec3),
                "m_eff": ((rows,), k.scalar),
                "limit": ((rows,), k.scalar),
                "adj_cw": ((rows, 4), vec4),
                "adj_cf": ((rows, 4), vec4),
                "adj_n": ((rows, 3), k.vec3),
                "adj_me": ((rows,), k.scalar),
                "adj_lim": ((rows,), k.scalar),
                "adj_total": ((rows, 3), k.vec3),
                "adj_imp": ((rows, 3), k.vec3),
                "adj_load": ((n,), k.scalar),
                "adj_f": ((n, 3), k.vec3),
                "adj_xl": ((n, 3), k.vec3),
                "hvp": ((n, 3), k.vec3),
            }
            owners = {
                name: torch.empty(shape, dtype=dtype, device=device)
                if shape is not None
                else torch.empty(rows, dtype=torch.int32, device=device)
                for name, (shape, _) in shapes.items()
            }
            act = self._fused().ActivePairs()
            for name in ("ids", "weights", "coef", "normal", "m_eff", "limit"):
                setattr(act, name, wp.from_torch(owners[name], dtype=shapes[name][1]))
            views = {name: wrap(owners[name], kind) for name, (_, kind) in shapes.items()}
            held = ((n, dtype), rows, passes, owners, list(views.values()), act, views["adj_f"])
            self._scratch["adjoint"] = held
        return held[4], held[5], held[6]


class _ContactLaunch(torch.autograd.Function):
    """One differentiable launch of the fused contact substeps: ``(x, v, fixed_start,
    targets, mu, lam, mass, gravity, damping) -> (x, v, fixed_start, frames x, frames v)``
    at its end (``fixed_start``: where the prescribed vertices' current step began; the
    frames: the steps it completed). ``info`` receives what the launch did. Backward:
    ``contact_retreat`` over its substeps in reverse (the per-pair derivatives by
    ``wp.grad`` of the forward's functions, the vertex update's hand-derived adjoint)."""

    @staticmethod
    def forward(ctx, runner, w, sets, j, info, x, v, fixed_start, targets, *params):
        _b, m = runner.backend, runner.backend.model
        n, substeps = m.n_vertices, m.substeps
        x, v = x.detach().clone(), v.detach().clone()
        fixed_start = fixed_start.detach().clone()
        targets = targets.detach().contiguous()
        left = len(targets) * substeps - j
        ids = dict(dtype=torch.int32, device=x.device)
        saved = (
            x.new_empty((left, n, 3)),
            v.new_empty((left, n, 3)),
            v.new_empty((left, n, 3)),
            torch.empty((ROW_SETS, max(sets.arrays.n, 1)), **ids),
            torch.empty(left, **ids),
            torch.zeros(ROW_SETS, **ids),
            torch.empty(CUTS_PER_VERTEX * n, **ids),
            torch.empty(CUTS_PER_VERTEX * n, **ids),
            v.new_empty(CUTS_PER_VERTEX * n),
            torch.zeros(left + 1, **ids),
        )
        xs, vs = x.new_empty((len(targets), n, 3)), v.new_empty((len(targets), n, 3))
        taken, why, check, held = runner._launch(
            w, sets, x, v, fixed_start, targets, j, xs, vs, saved
        )
        info.update(taken=taken, why=why, check=check, held=held)
        done = (j + taken) // substeps
        settings = runner.last_settings
        ctx.runner, ctx.w, ctx.arrays, ctx.settings, ctx.j = runner, w, sets.arrays, settings, j
        ctx.taken, ctx.done, ctx.n_targets = taken, done, len(targets)
        cuts = int(saved[9][taken])
        ctx.saved = (saved[0][:taken], saved[1][:taken], saved[2][:taken], *saved[3:6])
        ctx.cuts = (saved[6][:cuts], saved[7][:cuts], saved[8][:cuts], saved[9][: taken + 1])
        ctx.param_shapes = [t.shape for t in params]
        return x, v, fixed_start, xs[:done], vs[:done]

    @staticmethod
    @one_torch_thread()
    def backward(ctx, g_x, g_v, g_start, g_xs, g_vs):
        runner, w, m = ctx.runner, ctx.w, ctx.runner.backend.model
        b, k = runner.backend, runner.backend.kernels
        g, n, taken = b.geometry, m.n_vertices, ctx.taken
        fused = contact_advance_for(k.scalar)
        dtype, device = w.inputs[2].dtype, w.inputs[2].device
        t = dict(dtype=dtype, device=device)

        def cotangent(grad, shape):
            return torch.zeros(shape, **t) if grad is None else grad.to(dtype).contiguous().clone()

        adj_x = cotangent(g_x, (n, 3))
        adj_v = cotangent(g_v, (n, 3))
        adj_start = cotangent(g_start, (max(g.n_fixed, 1), 3))
        rows_done = max(ctx.done, 1)
        grad_xs = torch.zeros((rows_done, n, 3), **t)
        grad_vs = torch.zeros((rows_done, n, 3), **t)
        if ctx.done and g_xs is not None:
            grad_xs[: ctx.done] = g_xs
        if ctx.done and g_vs is not None:
            grad_vs[: ctx.done] = g_vs
        # Scratch the kernel writes before it reads: per vertex, and per near row (the
        # active pairs are among them), for the friction passes replayed (kept, grown).
        rows_n = max(int(ctx.saved[5].max()), 1)
        passes = max(ctx.settings.passes, 1)
        views, act, adj_f_w = runner._adjoint_scratch(n, rows_n, passes, dtype, device)
        mu, lam, mass, gravity, damping = w.inputs
        adj = [
            torch.zeros((ctx.n_targets, max(g.n_fixed, 1), 3), **t),  # targets
            torch.zeros(n, **t),  # mass
            torch.zeros(len(mu), **t),
            torch.zeros(len(lam), **t),
            torch.zeros((m.n_worlds, 3), **t),  # gravity
            torch.zeros(m.n_worlds, **t),  # damping
        ]
        if taken:
            arrays = ctx.arrays
            x_saved, v_saved, f_saved, row_sets, row_set_of, row_set_sizes = ctx.saved
            cut_vertex, cut_source, cut_alpha, cut_start = ctx.cuts
            cut_adj = torch.empty(max(len(cut_vertex), 1), **t)
            team = runner._team(dtype)
            x_saved_w = wrap(x_saved, k.position)
            shares = [(torch.zeros_like(adj[2]), torch.zeros_like(adj[3])) for _ in team.bounds]
            main = functools.partial(
                wp.launch,
                fused.contact_retreat[w.material],
                dim=1,
                inputs=[
                    w.elements, w.vertex, w.settings, m.substeps, ctx.j, taken, ctx.settings,
                    team.struct, runner._candidate_pairs(arrays, row_sets[0]),
                    x_saved_w, wrap(v_saved, k.vec3), wrap(f_saved, k.vec3),
                    wrap(row_sets, wp.int32), wrap(row_set_of, wp.int32),
                    wrap(row_set_sizes, wp.int32),
                    wrap(cut_vertex, wp.int32), wrap(cut_source, wp.int32),
                    wrap(cut_alpha, k.scalar), wrap(cut_start, wp.int32), wrap(cut_adj, k.scalar),
                    wrap(grad_xs, k.vec3), wrap(grad_vs, k.vec3), *views[:5], act, *views[11:],
                    wrap(adj_x, k.vec3), wrap(adj_v, k.vec3), wrap(adj_start, k.vec3),
                    wrap(adj[0], k.vec3), wrap(adj[1], k.scalar), wrap(adj[2], k.scalar),
                    wrap(adj[3], k.scalar), wrap(adj[4], k.vec3), wrap(adj[5], k.scalar),
                ],
                device=g.device,
            )  # fmt: skip
            runner._run_team(
                team, main, fused.tet_vjp_share[w.material],
                [x_saved_w, adj_f_w, w.elements, team.struct],
                lambda worker: [wrap(a, k.scalar) for a in shares[worker]],
            )  # fmt: skip
            for mu_share, lam_share in shares[1:]:
                adj[2] += mu_share
                adj[3] += lam_share
        adj_targets, adj_mass, adj_mu, adj_lam, adj_gravity, adj_damping = adj
        return (
            None, None, None, None, None,
            adj_x.to(POSITION_DTYPE), adj_v,
            adj_start.to(POSITION_DTYPE) if g.n_fixed else None,
            adj_targets.to(POSITION_DTYPE),
            adj_mu.view(ctx.param_shapes[0]), adj_lam.view(ctx.param_shapes[1]),
            adj_mass.view(ctx.param_shapes[2]), adj_gravity.view(ctx.param_shapes[3]),
            adj_damping.view(ctx.param_shapes[4]),
        )  # fmt: skip
