"""Fitting parameters to observed motion: the fit loop and observations."""

from diffsim.fitting.fit import FitResult, fit

__all__ = ["FitResult", "fit"]
