"""diffsim: differentiable explicit-dynamics simulation of tetrahedral FEM solids.

The public names load on first use (PEP 562), so ``import diffsim`` and ``diffsim --help``
do not import torch or Warp until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "BackendWarning": "diffsim.simulator",
    "ContactWarning": "diffsim.contact",
    "Corotated": "diffsim.physics.materials",
    "EquilibriumError": "diffsim.equilibrium",
    "EquilibriumInfo": "diffsim.equilibrium",
    "FitResult": "diffsim.fitting.fit",
    "LinearElastic": "diffsim.physics.materials",
    "Material": "diffsim.physics.materials",
    "NeoHookean": "diffsim.physics.materials",
    "Observation": "diffsim.fitting.observation",
    "ObservationError": "diffsim.fitting.observation",
    "SimulationError": "diffsim.simulator",
    "Simulator": "diffsim.simulator",
    "StabilityWarning": "diffsim.simulator",
    "StVK": "diffsim.physics.materials",
    "SweepResult": "diffsim.fitting.sweeps",
    "StableNeoHookean": "diffsim.physics.materials",
    "State": "diffsim.sim.state",
    "SurfaceContact": "diffsim.contact",
    "Target": "diffsim.fitting.targets",
    "TetMesh": "diffsim.mesh",
    "Trajectory": "diffsim.sim.state",
    "fit": "diffsim.fitting.fit",
    "lame_parameters": "diffsim.physics.materials",
    "sweep": "diffsim.fitting.sweeps",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'diffsim' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # for type checkers and IDEs
    from diffsim.contact import ContactWarning, SurfaceContact
    from diffsim.equilibrium import EquilibriumError, EquilibriumInfo
    from diffsim.fitting.fit import FitResult, fit
    from diffsim.fitting.observation import Observation, ObservationError
    from diffsim.fitting.sweeps import SweepResult, sweep
    from diffsim.fitting.targets import Target
    from diffsim.mesh import TetMesh
    from diffsim.physics.materials import (
        Corotated,
        LinearElastic,
        Material,
        NeoHookean,
        StableNeoHookean,
        StVK,
        lame_parameters,
    )
    from diffsim.sim.state import State, Trajectory
    from diffsim.simulator import BackendWarning, SimulationError, Simulator, StabilityWarning
