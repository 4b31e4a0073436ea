"""Steps with surface contact acting, many substeps per launch (CPU, forward).

Where contact acts, a substep of the general path (:func:`diffsim.backends.integrator.substep`
around the per-stage contact kernels) costs about a millisecond of Python and launch
overhead on a mesh of a few thousand tets. :class:`FusedContactSteps` instead selects the
candidate sets (:meth:`~diffsim.contact.SurfaceContact.fused_sets`) and launches
:mod:`diffsim.kernels.contact_advance`, which takes substeps with the same formulas until
one needs more: the sets to be selected again (then selected here and launched again) or
the general path (a step the continuous collision check limits or that is capped, one that
leaves the sets' reach: then that substep is taken by the general path, and the next
launch goes on). Forward only, one world, CPU, the Warp contact implementation, no
time-of-impact splits; everything else takes the general path.
"""

from __future__ import annotations

import math
import time

import torch
import warp as wp

from diffsim.backends import integrator
from diffsim.backends.warp.bridge import wrap
from diffsim.contact.ccd import ABSOLUTE_ROUNDS, EQUALIZE_ROUNDS, MIN_GAP_FRACTION, SCALE_SLACK
from diffsim.contact.distances import PARALLEL_FRACTION
from diffsim.contact.friction import FRICTION_PASSES
from diffsim.contact.potential import MIN_DISTANCE_FRACTION
from diffsim.contact.surface_contact import CappedStep, SurfaceContact
from diffsim.kernels import contact_advance_for
from diffsim.kernels.contact_advance import BEYOND_REACH, FINISHED, REASONS, SETS_EXPIRED
from diffsim.sim.model import POSITION_DTYPE


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
            "near_selections": 0,
            "limited_vertex_steps": 0,
            **{reason: 0 for reason in REASONS.values()},
        }
        self._scratch: dict = {}

    def usable(self) -> bool:
        """Whether the model's contact can run fused: one world, on the CPU, by the Warp
        contact kernels, without time-of-impact splits."""
        b, m = self.backend, self.backend.model
        return (
            b.geometry.device.is_cpu
            and isinstance(m.contact, SurfaceContact)
            and m.contact.implementation == "warp"
            and integrator.SPLIT_LEVELS == 0
        )

    def advance(self, prepared, x: torch.Tensor, v: torch.Tensor, targets: torch.Tensor):
        """``len(targets)`` steps from ``(x, v)`` (no autograd): the frames
        ``([K, n, 3], [K, n, 3])``, as ``Backend.advance`` gives them."""
        b, m = self.backend, self.backend.model
        contact = m.contact
        g, k, w = b.geometry, b.kernels, prepared
        fused = contact_advance_for(k.scalar)
        n, substeps, n_steps = m.n_vertices, m.substeps, len(targets)
        x = b._positions(x).clone()  # advanced in place
        v = b._checked(v).clone()
        xs, vs = x.new_empty((n_steps, n, 3)), v.new_empty((n_steps, n, 3))
        idx = m.fixed_indices
        if not g.n_fixed:  # the kernel takes at least one (unused) target column
            targets = targets.new_zeros((n_steps, 1, 3))
        targets = targets.to(POSITION_DTYPE).contiguous()
        fixed_start = x[idx].clone() if g.n_fixed else x.new_zeros((1, 3))
        scratch = self._buffers(n, x, v)
        status, stats = scratch["status"], scratch["stats"]
        mu, lam = w.arrays[:2]
        settings = self._settings(fused, contact, v.dtype, m.substep_dt)
        step, j, held_back = 0, 0, 0.0
        while step < n_steps:
            # A new tensor: the contact's caches key on it.
            sets = contact.fused_sets(x.clone(), held_back)
            self._set_bounds(settings, sets)
            arrays = sets.arrays
            # The kernel may select near rows of its own: copies, the contact's are kept.
            rows, pair = self._pair_buffers(arrays.n, v)
            rows[: len(sets.rows)].copy_(sets.rows)
            near_anchor = scratch["near_anchor"]
            near_anchor.copy_(sets.near_anchor)
            start = time.perf_counter()
            wp.launch(
                fused.contact_advance[w.material],
                dim=1,
                inputs=[
                    wrap(x, k.position), wrap(v, k.vec3), g.tets, g.dm_inv, g.volume, mu,
                    lam, w.per_tet, w.vertex, w.settings, wrap(fixed_start, k.position),
                    wrap(targets[step:], k.position), substeps, j, settings,
                    wrap(arrays.pairs, wp.int32), wrap(arrays.kinds, wp.int32),
                    wrap(arrays.eps, k.scalar), wrap(rows, wp.int32),
                    wrap(sets.anchor.contiguous(), k.vec3),
                    wrap(sets.anchor_d2.contiguous(), wp.float64),
                    wrap(near_anchor, k.vec3), *scratch["per_vertex"],
                    *pair, *scratch["step_limit"], wrap(xs[step:], k.position),
                    wrap(vs[step:], k.vec3),
                    wrap(status, wp.int32), wrap(stats, wp.float64),
                ],
                device=g.device,
            )  # fmt: skip
            seconds = time.perf_counter() - start
            self.counts["launches"] += 1
            taken, why = int(status[0]), int(status[1])
            contact.timings["fused"] += seconds
            if taken:
                selected, limited = int(status[3]) > 0, int(status[4])
                contact.after_fused(taken, float(stats[0]), float(stats[1]), selected, limited)
                self.counts["near_selections"] += int(status[3])
                self.counts["limited_vertex_steps"] += limited
                self.counts["fused_substeps"] += taken
                step, j = divmod(step * substeps + j + taken, substeps)
            if why == FINISHED:
                break
            check = int(status[2]) if why != SETS_EXPIRED else 0
            self.counts["sets_expired" if why == SETS_EXPIRED else REASONS[check]] += 1
            # Launch again with sets selected where the launch stopped, or built for the
            # step it held back (as the general path's step limit would build one), unless
            # it took nothing with sets just selected for it.
            if why == SETS_EXPIRED and taken:
                held_back = 0.0
                continue
            if check == BEYOND_REACH and (taken or not held_back):
                held_back = float(stats[2])
                continue
            held_back = 0.0
            # The general path for this substep (held back in the kernel, or sets that do
            # not hold even as just selected).
            if j == 0 and g.n_fixed:
                fixed_start.copy_(x[idx])
            x_fixed = fixed_start + (targets[step, : g.n_fixed] - fixed_start) * (
                (j + 1) / substeps
            )
            try:
                x_new, v_new = b.substep(prepared, x.clone(), v.clone(), x_fixed[: g.n_fixed])
            except CappedStep as capped:
                capped.step = step  # the step it blew up in, for the message
                raise
            x.copy_(x_new)
            v.copy_(v_new)
            self.counts["general_substeps"] += 1
            if j == substeps - 1:
                xs[step].copy_(x)
                vs[step].copy_(v)
            step, j = divmod(step * substeps + j + 1, substeps)
        return xs, vs

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
            keep = [torch.zeros((n, 3), **t) for _ in range(4)]  # xl, f_el, f_c, v_new
            x_new = torch.zeros((n, 3), dtype=POSITION_DTYPE, device=x.device)
            dx, load = torch.zeros((n, 3), **t), torch.zeros(n, **t)
            alpha = [torch.zeros(n, **t), torch.zeros(n, **t)]  # the step limit's scales
            views = [wrap(a, k.vec3) for a in keep[:3]]
            views += [wrap(x_new, k.position), wrap(keep[3], k.vec3), wrap(dx, k.vec3)]
            views.append(wrap(load, k.scalar))
            found = {
                "owners": [*keep, x_new, dx, load, *alpha],
                "step_limit": [wrap(a, k.scalar) for a in alpha],
                "near_anchor": torch.zeros((n, 3), **t),
                "per_vertex": views,
                "status": torch.zeros(5, dtype=torch.int32),
                "stats": torch.zeros(3, dtype=torch.float64),
            }
            self._scratch[key] = found
        return found

    def _pair_buffers(self, rows: int, v: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Scratch per candidate pair (grown as needed, kept): the near rows (a tensor),
        and the views of active, weights, coef, normal, m_eff, limit, impulse, total and
        of the step limit's rows, bounds, absolute scales and settled flags."""
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
            held = (
                capacity,
                v.dtype,
                owners,
                [wrap(o, t) for o, t in zip(owners, types, strict=True)],
            )
            self._scratch["pairs"] = held
        return held[2][0], held[3][1:]
