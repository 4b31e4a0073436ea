"""Parameter sweeps: simulate a grid or a list of parameter sets, with a loss per set.

:func:`sweep` runs one rollout per parameter set (material parameters, damping, gravity:
any name of :meth:`Simulator.parameters`) from the same start state, as worlds of batched
rollouts where the simulator has them and one by one otherwise, with a progress bar. It
returns the trajectories and, given a loss (a function of a trajectory, or an observation),
the loss of each set: the brute-force view of a fit's loss landscape, or a first guess for
one.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffsim.fitting.observation import Observation
from diffsim.fitting.targets import call_state
from diffsim.fitting.worlds import (
    check_single_world,
    stack_states,
    supports_worlds,
    world_simulator,
    world_trajectory,
)
from diffsim.sim.state import State, Trajectory
from diffsim.simulator import SimulationError, Simulator

# Parameter sets per batched rollout when the caller does not say.
DEFAULT_WORLDS_PER_ROLLOUT = 16

Loss = Callable[[Trajectory], float | torch.Tensor]


@dataclass
class SweepResult:
    """What :func:`sweep` returns.

    Attributes:
        parameters: the parameter sets, in order (floats, or lists for per-tet values and
            vectors).
        trajectories: one :class:`Trajectory` per set (``[steps + 1, n, 3]``).
        losses: the loss of each set ``[S]``, or None without a loss.
        seconds: wall time of the sweep.
        batched: whether the sets ran as worlds of batched rollouts.
    """

    parameters: list[dict]
    trajectories: list[Trajectory]
    losses: np.ndarray | None = None
    seconds: float = 0.0
    batched: bool = False
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.parameters)

    @property
    def best(self) -> int:
        """Index of the set with the lowest loss.

        Raises:
            ValueError: the sweep had no loss.
        """
        if self.losses is None:
            raise ValueError("this sweep has no losses; pass loss= to sweep()")
        return int(np.nanargmin(self.losses))

    @property
    def best_parameters(self) -> dict:
        """The parameter set with the lowest loss."""
        return self.parameters[self.best]

    def positions(self) -> torch.Tensor:
        """Every set's positions stacked, ``[S, steps + 1, n, 3]``."""
        return torch.stack([t.positions for t in self.trajectories])

    def table(self) -> str:
        """The sets and their losses as a text table (one row per set)."""
        header = "".join(f"{n:>16s}" for n in self.names) + (
            "" if self.losses is None else "      loss"
        )
        rows = [header]
        for i, values in enumerate(self.parameters):
            row = "".join(f"{_short(values[n]):>16s}" for n in self.names)
            if self.losses is not None:
                row += f"  {self.losses[i]:.4e}"
            rows.append(row)
        return "\n".join(rows)


def parameter_sets(parameters: Mapping[str, Sequence] | Sequence[Mapping]) -> list[dict]:
    """The parameter sets of a sweep: a grid (name -> values; every combination, the last
    name varying fastest) or a list of sets (dicts) as they are."""
    if isinstance(parameters, Mapping):
        names = list(parameters)
        values = [list(_values(parameters[n], n)) for n in names]
        return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*values)]
    sets = [dict(s) for s in parameters]
    for s in sets:
        if not isinstance(s, dict):
            raise TypeError(f"a list of parameter sets holds dicts, got {type(s).__name__}")
    return sets


def sweep(
    simulator: Simulator | Callable[[], Simulator],
    parameters: Mapping[str, Sequence] | Sequence[Mapping],
    steps: int,
    *,
    state: State | Callable[..., State] | None = None,
    loss: Loss | Observation | str | Path | None = None,
    batch: bool | None = None,
    worlds_per_rollout: int = DEFAULT_WORLDS_PER_ROLLOUT,
    progress: bool = True,
) -> SweepResult:
    """Simulates every parameter set of a grid or list (no gradients) and scores each.

    Args:
        simulator: the scene's simulator (a single world), or a function returning one.
            Parameters a set does not name keep the simulator's values.
        parameters: a grid, ``{"youngs_modulus": [3e4, 1e5], "poissons_ratio": [0.2, 0.4]}``
            (every combination; the last name varies fastest), or a list of sets,
            ``[{"youngs_modulus": 3e4}, {"youngs_modulus": 1e5, "damping": 2.0}]``. Names
            are those of :meth:`Simulator.parameters`; values are numbers, or per-tet arrays
            and gravity vectors.
        steps: rollout length.
        state: the start state of every set: a :class:`State`, a function of the simulator
            (``state(sim)``), or None for rest.
        loss: a function of a set's :class:`Trajectory` returning a number, or an
            :class:`Observation` (or its path) to score each set by the fit's loss (the
            weighted mean squared distance, m^2); None for no losses.
        batch: run the sets as worlds of batched rollouts: None where the simulator has
            them, True (required) or False (one rollout per set).
        worlds_per_rollout: sets per batched rollout (memory grows with it).
        progress: show a progress bar (tqdm, on stderr).

    Returns:
        A :class:`SweepResult` with a trajectory (and a loss) per set, in order.

    Raises:
        SimulationError: a set's rollout failed (the message names the set).
        ValueError: an unknown parameter name, a bad option, or no sets.
    """
    sim = simulator if isinstance(simulator, Simulator) else simulator()
    if not isinstance(sim, Simulator):
        raise TypeError(f"simulator must be a Simulator or return one, got {type(sim).__name__}")
    check_single_world(sim)
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not isinstance(worlds_per_rollout, int) or worlds_per_rollout < 1:
        raise ValueError(f"worlds_per_rollout must be an integer >= 1, got {worlds_per_rollout!r}")
    sets = parameter_sets(parameters)
    if not sets:
        raise ValueError("no parameter sets to simulate")
    known = sim.parameters()
    names = list(dict.fromkeys(n for s in sets for n in s))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown parameters {unknown}; this scene's are {sorted(known)}")
    if batch is True and not supports_worlds(sim):
        raise ValueError(
            f"batch=True needs a simulator with batched worlds; {type(sim).__name__} has none "
            "here (use batch=None or False)"
        )
    batched = batch is not False and supports_worlds(sim) and len(sets) > 1
    score = _scorer(loss, sim)
    start = call_state(state, sim, 0) if callable(state) else state
    start = sim.initial_state() if start is None else start
    as_t = dict(dtype=sim.dtype, device=sim.device)
    trajectories: list[Trajectory] = []
    losses: list[float] = []
    made: dict[int, Simulator] = {}  # batched simulators by world count, reused
    bar = _bar(len(sets), progress)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            chunk = worlds_per_rollout if batched else 1
            for first in range(0, len(sets), chunk):
                group = sets[first : first + chunk]
                try:
                    if batched and len(group) > 1:
                        done = _batched(sim, made, group, names, known, start, steps, as_t)
                    else:
                        params = {n: torch.as_tensor(v, **as_t) for n, v in group[0].items()}
                        done = [sim.rollout(steps, state=start, params=params)]
                except SimulationError as exc:
                    which = (
                        f"set {first} {_describe(group[0])}"
                        if len(group) == 1
                        else f"sets {first}..{first + len(group) - 1}"
                    )
                    raise SimulationError(f"sweep {which}: {exc}") from exc
                trajectories.extend(done)
                if score is not None:
                    losses.extend(float(score(t)) for t in done)
                bar.update(len(group))
    finally:
        bar.close()
    return SweepResult(
        parameters=[{n: _plain(v) for n, v in s.items()} for s in sets],
        trajectories=trajectories,
        losses=None if score is None else np.asarray(losses, dtype=np.float64),
        seconds=time.perf_counter() - t0,
        batched=batched,
        names=names,
    )


def _batched(sim, made, group, names, known, start, steps, as_t) -> list[Trajectory]:
    """One rollout of ``len(group)`` worlds; a set's missing names take the simulator's."""
    worlds = len(group)
    if worlds not in made:
        made[worlds] = world_simulator(sim, worlds)
    params = {
        n: torch.stack([torch.as_tensor(s.get(n, known[n]), **as_t) for s in group]) for n in names
    }
    trajectory = made[worlds].rollout(steps, state=stack_states([start] * worlds), params=params)
    return [world_trajectory(trajectory, j) for j in range(worlds)]


def _scorer(loss, sim: Simulator) -> Loss | None:
    if loss is None or callable(loss) and not isinstance(loss, Observation):
        return loss
    obs = loss if isinstance(loss, Observation) else Observation.load(loss)
    obs.check(sim.model.n_vertices, sim.model.dt)
    target, weights = obs.targets(dtype=sim.dtype, device=sim.device)

    def observed(trajectory: Trajectory) -> float:
        if obs.steps(sim.model.dt)[-1] > trajectory.n_frames - 1:
            raise ValueError(
                f"the observation's last frame is at step {obs.steps(sim.model.dt)[-1]:g} but "
                f"the sweep runs {trajectory.n_frames - 1} steps; run more steps"
            )
        d2 = (obs.predict(trajectory.positions, sim.model.dt) - target).square().sum(-1)
        return float((weights * d2).sum() / weights.sum())

    return observed


def _bar(total: int, enabled: bool):
    class Silent:
        def update(self, n: int = 1) -> None:
            pass

        def close(self) -> None:
            pass

    if not enabled:
        return Silent()
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency; an old environment may lack it
        return Silent()
    return tqdm(total=total, desc="sweep", unit="set", leave=False)


def _values(values, name: str):
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
        if isinstance(values, torch.Tensor) and values.dim() > 0:
            return list(values)
        raise ValueError(f"the grid's {name} must be a list of values, got {values!r}")
    return values


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return float(value) if value.ndim == 0 else value.tolist()
    return float(value) if isinstance(value, (int, float)) else value


def _short(value) -> str:
    if isinstance(value, (list, tuple)):
        return f"[{len(value)} values]"
    return f"{value:.6g}" if isinstance(value, float) and math.isfinite(value) else str(value)


def _describe(values: dict) -> str:
    return "(" + ", ".join(f"{n}={_short(_plain(v))}" for n, v in values.items()) + ")"
