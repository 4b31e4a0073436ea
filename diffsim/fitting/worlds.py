"""Batched worlds, where the simulator has them: detection and the glue fitting needs.

A simulator made with ``worlds=B`` runs B copies of its scene in one rollout: parameters
with a leading world axis (``[B]``, ``[B, n_tets]``), states ``[B, n, 3]`` and trajectories
``[T + 1, B, n, 3]``. Fitting and sweeps use it when the simulator's class takes a
``worlds`` argument (:func:`supports_worlds`) and otherwise run one rollout per world, with
the same results.
"""

from __future__ import annotations

import inspect

import torch

from diffsim.sim.state import State, Trajectory
from diffsim.simulator import Simulator


def supports_worlds(sim: Simulator) -> bool:
    """Whether ``sim``'s class can run several worlds in one rollout (a ``worlds`` argument)."""
    try:
        return "worlds" in inspect.signature(type(sim)).parameters
    except (TypeError, ValueError):
        return False


def world_count(sim: Simulator) -> int | None:
    """The number of worlds ``sim`` was made with, or None for a single-world simulator."""
    worlds = getattr(sim, "settings", {}).get("worlds")
    return None if worlds in (None, 1) else int(worlds)


def check_single_world(sim: Simulator) -> None:
    """Raises ValueError for a simulator made with several worlds (fits and sweeps make them)."""
    worlds = world_count(sim)
    if worlds is not None:
        raise ValueError(
            f"give a single-world simulator (this one has worlds={worlds}); fitting and sweeps "
            "make the worlds they need from it"
        )


def world_simulator(sim: Simulator, worlds: int) -> Simulator:
    """``sim`` with ``worlds`` worlds (a new simulator; ``sim`` is unchanged)."""
    return sim.replace(worlds=worlds)


def stack_states(states: list[State]) -> State:
    """One batched state ``[B, n, 3]`` from B single-world states."""
    return State(
        torch.stack([s.positions for s in states]), torch.stack([s.velocities for s in states])
    )


def world_parameters(
    shared: dict[str, torch.Tensor], per_world: dict[str, torch.Tensor], worlds: int
) -> dict[str, torch.Tensor]:
    """Rollout parameters of a batched simulator, each with an explicit world axis.

    Args:
        shared: values common to every world (``[]`` or ``[n_tets]``), expanded to
            ``[B]`` or ``[B, n_tets]``.
        per_world: values with one entry per world already (``[B]`` or ``[B, n_tets]``).
        worlds: B.
    """
    out = {k: v.expand(worlds, *v.shape) for k, v in shared.items()}
    for name, value in per_world.items():
        if value.shape[0] != worlds:
            raise ValueError(f"{name} has {value.shape[0]} values for {worlds} worlds")
        out[name] = value
    return out


def world_trajectory(trajectory: Trajectory, world: int, steps: int | None = None) -> Trajectory:
    """World ``world`` of a batched trajectory, optionally its first ``steps`` steps only."""
    end = None if steps is None else steps + 1
    return Trajectory(
        trajectory.positions[:end, world],
        trajectory.velocities[:end, world],
        trajectory.dt,
        trajectory.tets,
        trajectory.surface_faces,
    )
