"""Simulation data only: the Model (static, never mutated by a step) and the State and
Trajectory a step takes and returns."""
