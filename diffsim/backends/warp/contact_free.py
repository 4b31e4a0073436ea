"""Steps with surface contact on, run without it where contact turns out not to act.

Surface contact costs nothing where nothing is near anything, if the steps do not have to
ask it every substep. So with contact on, the Warp backend runs blocks of steps with the
contact-free kernels (on the CPU the fused ones of :mod:`diffsim.backends.warp.fused`; on
CUDA the per-substep ones), keeping the positions at the start of every substep, and then
asks the contact whether it would have acted anywhere in the block
(:meth:`~diffsim.contact.SurfaceContact.clear_over`: no pair within dhat, no step the
continuous collision limit would cut). If not, the block is exact: the barrier and the
friction are zero and the step limit is one, forward and backward. If so, the block is run
again substep by substep with contact. A block is tried only when the start state looks
clear for the whole block (contact would not act along its velocities' relative part over
twice the block's duration), so scenes in contact do not pay for many failed tries; block
lengths double while they pass and halve until the prediction does. Where contact
substeps run fused (CPU), which costs little more than the contact-free kernels, a try is
made only where it can pay for the searches its checks run (``SUBSTEPS_PER_CHECK``).
"""

from __future__ import annotations

import torch

from diffsim.backends.base import Backend
from diffsim.backends.warp import bridge, fused
from diffsim.contact.surface_contact import CappedStep
from diffsim.physics.elasticity import inverse_rest_determinants

# The largest block tried fused: its saved substeps hold at most this many values per array.
MAX_SAVED_VALUES = 6_000_000
# A block is tried fused only if the start state is clear of contact by this factor times
# the distance its velocities could close over the block.
PREDICTION_FACTOR = 2.0
# Where contact substeps run fused, a block's check measures at most this many pair-frames
# (near pairs times frames; more: the block runs with contact). The ball thrown at the mat
# (scenes/ball_at_mat.py) measured the mat's own pairs, thousands, over 27 substeps a step:
# 1.07 ms per substep, 0.42 without those tries.
MOST_MEASURED = 20_000
# After a failed prediction, the next steps run with contact without asking again: 1, 2,
# 4, .. steps, at most this many, while predictions keep failing (a body resting on another
# asked every step: 9% of the mat on the ball's substep).
MAX_PREDICTION_BACKOFF = 8
# Where contact substeps run fused (CPU), a try pays only if it covers at least this many
# substeps per search its checks run (predictions and the block's check that go beyond the
# candidate set: a broad phase or a sweep, ``timings["searches"]``, about a millisecond on
# the colliding spheres, 30 fused contact substeps with nothing near; a check the set's
# bound settles costs little). Below, the next steps run with contact without asking,
# backing off up to MAX_IDLE_SUBSTEPS. Without this rule every scene ran slower with the
# tries than with fused contact alone: cube_drop 0.90 against 0.17 ms a frame,
# spheres_collide 6.31 against 1.83, bunny_drop 24.2 against 20.9 (docs/contact.md,
# "Nothing near anything").
SUBSTEPS_PER_CHECK = 32
MAX_IDLE_SUBSTEPS = 1024


class ContactFreeBlocks:
    """Runs ``Backend.advance`` for the Warp backend on the CPU with contact on.

    Args:
        backend: the :class:`~diffsim.backends.warp.backend.WarpBackend`.
    """

    def __init__(self, backend) -> None:
        self.backend = backend
        self.block = 1  # steps of the next fused try
        self.backoff = 0  # steps without a prediction after the last failed one
        self.wait = 0  # steps left before the next prediction
        self.last_end: torch.Tensor | None = None  # positions where the last call ended
        self.most_measured: int | None = None  # the checks' limit (see clear_over)
        self.ratio_scales: torch.Tensor | None = None  # det Dm^-1 per tet (volume limit)
        # The per-substep kernels (CUDA), else the fused multi-step ones (CPU).
        self.per_substep = not backend.geometry.device.is_cpu
        self.counts = {
            "fused_steps": 0,
            "contact_steps": 0,
            "failed_tries": 0,
            "skipped_predictions": 0,
        }

    def advance(self, prepared, x, v, targets, out=None):
        """As :meth:`Backend.advance`; differentiable through either path."""
        b, m = self.backend, self.backend.model
        grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in (x, v, targets, *prepared.inputs)
        )
        n_steps = len(targets)
        # Where contact substeps run fused, a block whose check would measure many near
        # pairs at every frame costs more than running it with contact.
        fused_contact = b.fused_contact.usable()
        self.most_measured = MOST_MEASURED if fused_contact else None
        # A call that does not continue from where the last one ended (a new rollout from
        # another state) asks at its first step.
        last = self.last_end
        if last is None or last.shape != x.shape or not torch.equal(last, x.detach()):
            self.backoff = self.wait = 0
        per_step = m.substeps * m.n_vertices * 3
        longest = max(1, MAX_SAVED_VALUES // per_step)
        # Where contact substeps run fused, a try shorter than two checks' worth of
        # substeps cannot pay (unless the call ends sooner), and backoffs go further.
        worth, most_idle = 1, MAX_PREDICTION_BACKOFF
        if fused_contact:
            worth = max(1, -(-2 * SUBSTEPS_PER_CHECK // m.substeps))
            most_idle = max(MAX_PREDICTION_BACKOFF, -(-MAX_IDLE_SUBSTEPS // m.substeps))
        xs, vs = [], []
        i = 0
        while i < n_steps:
            frames = None
            k = 0  # (the per-substep kernels do not check the volume limit: no blocks with it)
            searches, asked = m.contact.timings["searches"], self.wait == 0
            if m.volume_limit is None or not self.per_substep:
                shortest = min(worth, longest, n_steps - i)
                steps = max(min(self.block, longest, n_steps - i), shortest)
                k = self._predicted_clear(x, v, steps, shortest, most_idle)
            if k:
                place = None if out is None else (out[0][i : i + k], out[1][i : i + k])
                frames = self._fused(prepared, x, v, targets[i : i + k], grad, place)
            covered = k * m.substeps if frames is not None else 0
            if k:  # a try (a failed prediction has backed off already)
                spent = m.contact.timings["searches"] - searches
                if fused_contact and covered < SUBSTEPS_PER_CHECK * spent:
                    self.backoff = min(max(1, 2 * self.backoff), most_idle)
                    self.wait = self.backoff
                elif covered:  # only a try that passed (and paid) ends a backoff
                    self.backoff = 0
            if frames is None:
                k = 1
                if fused_contact:
                    # The next steps that would not ask for a prediction run with contact
                    # anyway: in the same fused contact launches.
                    more = min(self.wait, n_steps - i - 1)
                    self.wait -= more
                    self.counts["skipped_predictions"] += more
                    k += more
                part = targets[i : i + k]
                try:
                    if fused_contact:
                        frames = b.fused_contact.advance(prepared, x, v, part)
                    else:
                        frames = Backend.advance(b, prepared, x, v, part)
                except CappedStep as capped:
                    capped.step += i  # counted from this call's first step
                    raise
                self.counts["contact_steps"] += k
                if asked:  # a failed prediction or try (not steps left without asking)
                    self.block = 1
            else:
                self.counts["fused_steps"] += k
                self.block = min(2 * k, longest)
            if out is not None:
                if frames[0].data_ptr() != out[0][i].data_ptr():  # not written there already
                    out[0][i : i + k].copy_(frames[0])
                    out[1][i : i + k].copy_(frames[1])
            else:
                xs.append(frames[0])
                vs.append(frames[1])
            x, v = frames[0][-1], frames[1][-1]
            i += k
        self.last_end = x.detach().clone()  # a copy: a view would keep the frames alive
        if out is not None:
            return out
        if not xs:
            empty = x.new_zeros((0, *x.shape))
            return empty, empty.to(v.dtype)
        return torch.cat(xs), torch.cat(vs)

    def _predicted_clear(
        self, x: torch.Tensor, v: torch.Tensor, steps: int, shortest: int, most_idle: int
    ) -> int:
        """The steps of a fused try: ``steps`` halved (not below ``shortest``) until
        :meth:`_looks_clear` says so, or 0 where ``shortest`` steps do not look clear either.
        Not asked for a few steps after it failed (0, backing off while it keeps failing, up
        to ``most_idle`` steps)."""
        if self.wait > 0:
            self.wait -= 1
            self.counts["skipped_predictions"] += 1
            return 0
        while True:
            if self._looks_clear(x, v, steps):
                return steps
            if steps <= shortest:
                break
            steps = max(steps // 2, shortest)
        self.backoff = min(max(1, 2 * self.backoff), most_idle)
        self.wait = self.backoff
        return 0

    def _looks_clear(self, x: torch.Tensor, v: torch.Tensor, steps: int) -> bool:
        """Whether a fused try of ``steps`` steps from (x, v) is likely to pass: contact
        would not act along the straight motion at the velocities' relative part for
        ``PREDICTION_FACTOR`` times the steps' duration."""
        m = self.backend.model
        with torch.no_grad():
            x = x.detach()
            v = v.detach().to(x.dtype)
            ahead = x + (PREDICTION_FACTOR * steps * m.dt) * (v - v.mean(dim=0))
            return m.contact.clear_over(torch.stack([x, ahead]), False, self.most_measured)

    def _fused(self, prepared, x, v, targets, grad: bool, place=None):
        """The fused frames ``([k, n, 3], [k, n, 3])`` if contact did not act, else None;
        without a gradient on the CPU written into ``place`` (two such tensors) if given."""
        b, m = self.backend, self.backend.model
        g, launcher = b.geometry, b.launcher
        x, v = b._positions(x), b._checked(v)
        targets = targets.to(x.dtype).contiguous()
        volume = None
        if m.volume_limit is not None:  # checked in the launch (where no substep needs it)
            below = torch.zeros(1, dtype=torch.int32, device=x.device)
            if self.ratio_scales is None:
                self.ratio_scales = inverse_rest_determinants(m.dm_inv).contiguous()
            volume = (m.volume_limit.min_ratio, below, self.ratio_scales)
        if self.per_substep:  # CUDA: the contact-free substep kernels, one by one
            frames, path = self._substeps(prepared, x, v, targets, grad)
        elif grad:
            seen: list = []
            frames = fused.Steps.apply(
                g, prepared, launcher, x, v, targets, *prepared.inputs, seen, volume
            )
            path = torch.cat([seen[0], frames[0][-1:].detach()])
        else:
            n_sub = len(targets) * m.substeps
            # The substeps' start positions and, after them, the last end: the check's path.
            path = x.new_empty((n_sub + 1, *x.shape))
            # The saved velocities and forces are not needed: one buffer takes both.
            unused = v.new_empty((n_sub, *v.shape))
            frames = place
            if frames is None:
                frames = (
                    x.new_empty((len(targets), *x.shape)),
                    v.new_empty((len(targets), *v.shape)),
                )
            fused.advance_steps(
                g, prepared, x, v, targets, frames, launcher, (path[:n_sub], unused, unused), volume
            )
            path[n_sub] = frames[0][-1]
        if volume is not None and int(volume[1][0]):
            self.counts["failed_tries"] += 1  # the volume limit would have cut a substep
            return None
        if not m.contact.clear_over(path, most_measured=self.most_measured):
            self.counts["failed_tries"] += 1
            return None
        return frames

    def _substeps(self, prepared, x, v, targets, grad: bool):
        """The steps as contact-free substeps of the per-substep kernels (the CUDA path):
        the frames ``([k, n, 3], [k, n, 3])`` and the positions at every substep's start
        and after the last, ``[k * substeps + 1, n, 3]`` (detached)."""
        b, m = self.backend, self.backend.model
        g, idx = b.geometry, m.fixed_indices
        path, xs, vs = [x.detach()], [], []
        for target in targets:
            start = x[idx]
            for j in range(m.substeps):
                x_fixed = (start + (target - start) * ((j + 1) / m.substeps)).contiguous()
                if grad:
                    x, v = bridge.Substep.apply(
                        g, prepared, b.launcher, x, v, x_fixed, *prepared.inputs
                    )
                else:
                    x, v = bridge.substep_forward(g, prepared, x, v, x_fixed, b.launcher)
                path.append(x.detach())
            xs.append(x)
            vs.append(v)
        return (torch.stack(xs), torch.stack(vs)), torch.stack(path)
