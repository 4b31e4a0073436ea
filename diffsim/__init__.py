"""diffsim: differentiable explicit-dynamics simulation of tetrahedral FEM solids."""

from diffsim.contact import SurfaceContact
from diffsim.equilibrium import EquilibriumError, EquilibriumInfo
from diffsim.fit import FitResult, fit
from diffsim.materials import (
    Corotated,
    LinearElastic,
    Material,
    NeoHookean,
    StableNeoHookean,
    StVK,
    lame_parameters,
)
from diffsim.mesh import TetMesh
from diffsim.observation import Observation, ObservationError
from diffsim.simulator import BackendWarning, SimulationError, Simulator, StabilityWarning
from diffsim.state import State, Trajectory

__version__ = "0.1.0"

__all__ = [
    "BackendWarning",
    "Corotated",
    "EquilibriumError",
    "EquilibriumInfo",
    "FitResult",
    "LinearElastic",
    "Material",
    "NeoHookean",
    "Observation",
    "ObservationError",
    "SimulationError",
    "Simulator",
    "StabilityWarning",
    "StVK",
    "StableNeoHookean",
    "State",
    "SurfaceContact",
    "TetMesh",
    "Trajectory",
    "fit",
    "lame_parameters",
]
