"""Fitting parameters to observed motion: the fit loop, observations, several targets (spread
over processes with torch.distributed), and parameter sweeps."""

from diffsim.fitting.fit import FitResult, fit
from diffsim.fitting.observation import Observation, ObservationError
from diffsim.fitting.sweeps import SweepResult, sweep
from diffsim.fitting.targets import Target

__all__ = ["FitResult", "Observation", "ObservationError", "SweepResult", "Target", "fit", "sweep"]
