"""The data loss of a fit over its targets, and its gradient, summed over processes.

Each process evaluates the targets of its share (:func:`~diffsim.fitting.targets.shares`),
one rollout per target or, where the simulator has batched worlds, one rollout for all of
them. What it contributes goes into one buffer, ``[failed, L_1..L_N, g_1..g_N]`` with zeros
for the targets of other processes, and one all-reduce sums the buffers. Every process then
adds the per-target terms up in the same order, so the loss and gradient do not depend on
how the targets were split (one rollout per target: bit for bit; batched worlds: to
rounding). A simulation that fails in one process fails the evaluation in all of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffsim.fitting.distributed import Reducer
from diffsim.fitting.observation import Observation
from diffsim.fitting.targets import Target
from diffsim.fitting.worlds import stack_states, world_parameters, world_simulator
from diffsim.sim.state import State
from diffsim.simulator import SimulationError, Simulator


@dataclass
class LocalTarget:
    """A target this process evaluates: its global index, start state, length and data."""

    index: int
    observation: Observation
    start: State | None
    steps: int
    positions: torch.Tensor  # [F, k, 3] observed (missing points zeroed)
    weights: torch.Tensor  # [F, k] (missing points 0)


class Objective:
    """Per-target data losses and their gradients, summed over the processes of a fit.

    Args:
        sim: the scene's simulator (single world).
        local: the targets of this process.
        coefficients: ``[N]`` float64 factor of each target's loss in the total (its weight,
            divided by the weights' sum for a mean).
        per_target: names of the parameters with one value per target (``[N]``).
        loss: ``"mse"`` or ``"huber"``.
        huber_delta: the Huber distance (m).
        checkpoint_every: segment length for checkpointed rollouts, or None.
        mode: ``"dynamic"`` or ``"equilibrium"``.
        batched: run the local targets as worlds of one rollout.
        reducer: sums over processes.
    """

    def __init__(
        self,
        sim: Simulator,
        local: list[LocalTarget],
        coefficients: torch.Tensor,
        per_target: list[str],
        loss: str,
        huber_delta: float,
        checkpoint_every: int | None,
        mode: str,
        batched: bool,
        reducer: Reducer,
    ) -> None:
        self.sim, self.local, self.coefficients = sim, local, coefficients
        self.per_target, self.loss, self.huber_delta = set(per_target), loss, huber_delta
        self.checkpoint_every, self.mode, self.batched = checkpoint_every, mode, batched
        self.reducer = reducer
        self.n_targets = len(coefficients)
        self.timing = {"forward": 0.0, "backward": 0.0}
        self._warm: dict[int, torch.Tensor] = {}  # equilibrium of each target, the next start
        self._world_sim: Simulator | None = None

    # ----------------------------------------------------------------- one target's loss
    def target_loss(self, item: LocalTarget, positions: torch.Tensor) -> torch.Tensor:
        """Weighted mean (robust) squared distance of a rollout ``[T + 1, n, 3]`` to a target."""
        obs = item.observation
        if self.mode == "equilibrium":
            pred = positions[:1]
            if obs.indices is not None:
                pred = pred[:, torch.as_tensor(obs.indices, device=pred.device)]
        else:
            pred = obs.predict(positions, self.sim.model.dt)
        d2 = (pred - item.positions).square().sum(-1)
        if self.loss == "huber":
            delta = self.huber_delta
            d2 = 2.0 * delta**2 * (torch.sqrt(1.0 + d2 / delta**2) - 1.0)
        return (item.weights * d2).sum() / item.weights.sum()

    def _parameters(self, values: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
        return {n: v[index] if n in self.per_target else v for n, v in values.items()}

    def _rollout(self, item: LocalTarget, values: dict[str, torch.Tensor]) -> torch.Tensor:
        params = self._parameters(values, item.index)
        if self.mode == "equilibrium":
            warm = self._warm.get(item.index)
            x = self.sim.equilibrium(params=params, x0=warm)
            self._warm[item.index] = x.detach()
            return x.unsqueeze(0)
        return self.sim.rollout(
            item.steps, state=item.start, checkpoint_every=self.checkpoint_every, params=params
        ).positions

    def _batched_losses(self, values: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The losses of every local target from one rollout of as many worlds."""
        worlds = len(self.local)
        if self._world_sim is None:
            self._world_sim = world_simulator(self.sim, worlds)
        idx = torch.as_tensor([t.index for t in self.local], device=self.sim.device)
        shared = {n: v for n, v in values.items() if n not in self.per_target}
        own = {n: v[idx] for n, v in values.items() if n in self.per_target}
        starts = [t.start if t.start is not None else self.sim.initial_state() for t in self.local]
        trajectory = self._world_sim.rollout(
            max(t.steps for t in self.local),
            state=stack_states(starts),
            checkpoint_every=self.checkpoint_every,
            params=world_parameters(shared, own, worlds),
        )
        return [self.target_loss(t, trajectory.positions[:, j]) for j, t in enumerate(self.local)]

    # ----------------------------------------------------------------- evaluations
    def losses(self, values: Callable[[], dict[str, torch.Tensor]]) -> torch.Tensor:
        """Every target's data loss ``[N]`` (no gradient), summed over processes.

        Raises:
            SimulationError: a rollout failed in this or another process.
        """
        buffer = torch.zeros(1 + self.n_targets, dtype=torch.float64)
        message = ""
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                current = values()
                if self.batched and self.local:
                    for t, value in zip(self.local, self._batched_losses(current), strict=True):
                        buffer[1 + t.index] = float(value)
                else:
                    for t in self.local:
                        buffer[1 + t.index] = float(self.target_loss(t, self._rollout(t, current)))
        except SimulationError as exc:
            buffer[0], message = 1.0, str(exc)
        self.timing["forward"] += time.perf_counter() - t0
        buffer = self.reducer.sum(buffer)
        self._raise_if_failed(buffer, message)
        return buffer[1:]

    def gradients(
        self,
        values: Callable[[], dict[str, torch.Tensor]],
        trainables: list[torch.Tensor],
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every target's data loss ``[N]`` and the gradient of ``sum_i c_i L_i / scale``
        with respect to ``trainables`` (flattened, float64), summed over processes.

        Raises:
            SimulationError: a rollout failed in this or another process, or the gradient
                is not finite.
        """
        sizes = [t.numel() for t in trainables]
        width = sum(sizes)
        buffer = torch.zeros(1 + self.n_targets * (1 + width), dtype=torch.float64)
        rows = buffer[1 + self.n_targets :].view(self.n_targets, width)
        message = ""
        try:
            if self.batched and self.local:
                self._batched_gradient(values, trainables, scale, buffer, rows)
            else:
                for t in self.local:
                    self._zero(trainables)
                    t0 = time.perf_counter()
                    value = self.target_loss(t, self._rollout(t, values()))
                    t1 = time.perf_counter()
                    (self.coefficients[t.index].to(value.dtype) * value / scale).backward()
                    self.timing["forward"] += t1 - t0
                    self.timing["backward"] += time.perf_counter() - t1
                    buffer[1 + t.index] = float(value.detach())
                    rows[t.index] = _flat_grad(trainables)
        except SimulationError as exc:
            buffer.zero_()
            buffer[0], message = 1.0, str(exc)
        self._zero(trainables)
        buffer = self.reducer.sum(buffer)
        self._raise_if_failed(buffer, message)
        rows = buffer[1 + self.n_targets :].view(self.n_targets, width)
        grad = rows.sum(dim=0)
        if not torch.isfinite(grad).all():
            raise SimulationError("the loss gradient is not finite")
        return buffer[1 : 1 + self.n_targets], grad

    def _batched_gradient(self, values, trainables, scale, buffer, rows) -> None:
        self._zero(trainables)
        t0 = time.perf_counter()
        losses = self._batched_losses(values())
        t1 = time.perf_counter()
        total = sum(
            self.coefficients[t.index].to(v.dtype) * v
            for t, v in zip(self.local, losses, strict=True)
        )
        (total / scale).backward()
        self.timing["forward"] += t1 - t0
        self.timing["backward"] += time.perf_counter() - t1
        for t, value in zip(self.local, losses, strict=True):
            buffer[1 + t.index] = float(value.detach())
        # One backward pass gives the sum over this process's worlds: it goes in one row.
        rows[self.local[0].index] = _flat_grad(trainables)

    def _raise_if_failed(self, buffer: torch.Tensor, message: str) -> None:
        failed = int(round(float(buffer[0])))
        if failed:
            if message and failed == 1:
                raise SimulationError(message)
            raise SimulationError(
                f"the simulation failed in {failed} of {self.reducer.size} processes"
                + (f" (here: {message})" if message else "")
            )

    @staticmethod
    def _zero(trainables: list[torch.Tensor]) -> None:
        for t in trainables:
            t.grad = None


def _flat_grad(trainables: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(
        [
            (t.grad if t.grad is not None else torch.zeros_like(t)).detach().reshape(-1).double()
            for t in trainables
        ]
    )


def local_targets(
    sim: Simulator, targets: list[Target], indices: list[int], mode: str, steps: list[int]
) -> list[LocalTarget]:
    """The targets of this process, with start states and observed data as tensors."""
    as_t = dict(dtype=sim.dtype, device=sim.device)
    out = []
    for i in indices:
        target = targets[i]
        positions, weights = target.observation.targets(**as_t)
        start = None if mode == "equilibrium" else target.start(sim, i)
        out.append(LocalTarget(i, target.observation, start, steps[i], positions, weights))
    return out
