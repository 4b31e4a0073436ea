"""Several recorded motions fitted at once: :class:`Target`, start states, shares per process.

A :class:`Target` is one recording: its :class:`~diffsim.fitting.observation.Observation`
(markers, frame times), the state its motion starts from and its rollout length. A fit to
several targets sums (or averages) their losses; :func:`shares` splits them over the
processes of a distributed fit.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffsim.fitting.observation import Observation
from diffsim.sim.state import State
from diffsim.simulator import Simulator

StateSource = State | Callable[..., State] | None


@dataclass
class Target:
    """One recorded motion to fit.

    Attributes:
        observation: the recording (an :class:`Observation` or the path of its ``.npz``).
        state: the state its motion starts from: a :class:`State`, or a function of the
            simulator (``state(sim)``, or ``state(sim, index)`` with the target's 0-based
            index) returning one. None: the observation's own start state
            (``initial_positions``) if it has one, else rest.
        steps: its rollout length, or None for up to its last frame.
        weight: its share of the loss (> 0): the loss is ``sum_i weight_i L_i``, divided by
            ``sum_i weight_i`` with ``reduction="mean"``.
        name: a label for reports (default: the file name, or ``target <i>``).
    """

    observation: Observation | str | Path
    state: StateSource = None
    steps: int | None = None
    weight: float = 1.0
    name: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.observation, (str, Path)):
            if self.name is None:
                self.name = Path(self.observation).name
            self.observation = Observation.load(self.observation)
        if not isinstance(self.observation, Observation):
            raise TypeError(
                f"a target's observation must be an Observation or a path, "
                f"got {type(self.observation).__name__}"
            )
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight)) or (
            self.weight <= 0
        ):
            raise ValueError(f"a target's weight must be a finite number > 0, got {self.weight!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 0):
            raise ValueError(f"a target's steps must be an integer >= 0, got {self.steps!r}")

    def start(self, sim: Simulator, index: int) -> State | None:
        """The state the motion starts from (None: the simulator's rest state)."""
        if isinstance(self.state, State):
            return self.state
        if callable(self.state):
            return call_state(self.state, sim, index)
        obs = self.observation
        if obs.has_start:
            return sim.initial_state(
                positions=obs.initial_positions, velocities=obs.initial_velocities
            )
        return None

    def first_frames(self, n: int) -> Target:
        """A copy observing only the first ``n`` frames (its own length then follows them)."""
        return Target(self.observation.first_frames(n), self.state, None, self.weight, self.name)


def call_state(make: Callable[..., State], sim: Simulator, index: int) -> State:
    """``make(sim, index)`` if it takes two positional arguments, else ``make(sim)``."""
    try:
        signature = inspect.signature(make)
    except (TypeError, ValueError):  # a builtin or C callable: call it the plain way
        return make(sim)
    positional = [
        p
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    takes_two = len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in positional)
    return make(sim, index) if takes_two else make(sim)


def as_targets(observation, state: StateSource = None, steps: int | None = None) -> list[Target]:
    """The targets of a fit from what :func:`diffsim.fit` was given.

    Args:
        observation: an :class:`Observation`, a path, a :class:`Target`, or a list of them.
        state: the start state for targets that do not name their own: a :class:`State`,
            a function (``state(sim)`` or ``state(sim, index)``), or a list with one per
            target.
        steps: the rollout length for targets that do not set their own.

    Returns:
        One :class:`Target` per recording, each with a name.
    """
    items = list(observation) if isinstance(observation, (list, tuple)) else [observation]
    if not items:
        raise ValueError("no targets: give at least one observation")
    if isinstance(state, (list, tuple)):
        if len(state) != len(items):
            raise ValueError(
                f"state is a list of {len(state)} start states for {len(items)} targets; "
                "give one per target"
            )
        states = list(state)
    else:
        states = [state] * len(items)
    targets = []
    for i, (item, start) in enumerate(zip(items, states, strict=True)):
        if isinstance(item, Target):
            target = Target(
                item.observation,
                item.state if item.state is not None else start,
                item.steps if item.steps is not None else steps,
                item.weight,
                item.name,
            )
        else:
            target = Target(item, start, steps)
        if target.name is None:
            target.name = f"target {i}"
        targets.append(target)
    return targets


def shares(n_targets: int, size: int) -> list[list[int]]:
    """The targets of each process: contiguous blocks whose sizes differ by at most one.

    Args:
        n_targets: number of targets.
        size: number of processes.
    """
    return [block.tolist() for block in np.array_split(np.arange(n_targets), size)]
