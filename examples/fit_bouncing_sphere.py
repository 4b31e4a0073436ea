"""Recover Young's modulus and Poisson's ratio of a ball from how it bounces.

A synthetic "experiment": a soft ball (E = 2e4 Pa, nu = 0.35) is thrown at the ground and
its motion recorded, with 1% position noise, at 8 surface markers every 2 ms. The fit
starts from a guess that is off by 2x in E and 0.15 in nu and recovers both: E sets how
long the ball stays in contact and how far it flattens, nu how much it bulges sideways.

    python examples/fit_bouncing_sphere.py [--iters 30]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import diffsim as ds

TRUE = {"youngs_modulus": 2e4, "poissons_ratio": 0.35}
GUESS = {"youngs_modulus": 4e4, "poissons_ratio": 0.2}
STEPS = 120  # 0.12 s: the fall, the impact and the rebound
RADIUS = 0.05  # m


def build(youngs_modulus: float, poissons_ratio: float) -> ds.Simulator:
    """The ball just above the ground, in float64 on the torch backend."""
    mesh = ds.TetMesh.sphere(radius=RADIUS, resolution=4, center=(0.0, RADIUS + 0.005, 0.0))
    material = ds.StableNeoHookean(
        youngs_modulus=youngs_modulus, poissons_ratio=poissons_ratio, density=1000.0
    )
    return ds.Simulator(
        mesh, material, dt=1e-3, substeps=2, ground=0.0, backend="torch", dtype=torch.float64
    )


def initial_state(sim: ds.Simulator) -> ds.State:
    """Thrown down and sideways at (0.3, -1.5, 0) m/s."""
    return sim.initial_state(velocities=(0.3, -1.5, 0.0))


def observe(noise: float = 0.01, seed: int = 0, steps: int = STEPS) -> ds.Observation:
    """The 'measured' motion: 8 surface markers every 2nd step, noise a fraction of the size."""
    truth = build(**TRUE)
    with torch.no_grad():
        traj = truth.rollout(steps, state=initial_state(truth))
    surface = truth.mesh.surface_vertices
    markers = surface[np.linspace(0, len(surface) - 1, 8).astype(int)]
    return ds.Observation.from_trajectory(
        traj, indices=markers, stride=2, noise=noise * 2 * RADIUS, seed=seed
    )


def run(iters: int = 30, steps: int = STEPS, log=print) -> ds.FitResult:
    """Fits E and nu from the guess over the first ``steps`` steps; returns the result."""
    observation = observe(steps=steps)
    result = ds.fit(
        build(**GUESS),
        observation,
        ["youngs_modulus", "poissons_ratio"],
        state=initial_state,
        optimizer="lbfgs",
        iters=iters,
        log=log,
    )
    for name, value in result.values.items():
        err = abs(value - TRUE[name]) / abs(TRUE[name])
        log(
            f"{name}: true {TRUE[name]:.5g}, start {GUESS[name]:.5g}, fitted {value:.5g} "
            f"({100 * err:.2f}% off)"
        )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=30)
    torch.set_num_threads(1)
    run(parser.parse_args().iters)
