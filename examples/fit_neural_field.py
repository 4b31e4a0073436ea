"""Recover a graded stiffness field E(x) with a neural field, from observed motion.

The "true" block has E(x) = E0 (2 + sin(pi u0) cos(pi u1)) with u the rest position scaled
to [0, 1] over the block, so E varies between E0 and 3 E0 across it. It is released from a
stretched and sheared shape and every vertex is observed for 40 ms. The fit starts from a
uniform 2 E0 and learns E(x) as a small MLP of the rest tet centroids (with Fourier
features); the field's relative error falls as the fit runs.

    python examples/fit_neural_field.py [--iters 150]
"""

from __future__ import annotations

import argparse
import math

import torch

import diffsim as ds

E0 = 5e4  # Pa
SIZE = (0.1, 0.1, 0.04)  # m
STEPS = 40


def build(youngs_modulus=2 * E0) -> ds.Simulator:
    """A free block (no gravity, no ground), float64 on the torch backend."""
    mesh = ds.TetMesh.box(size=SIZE, resolution=(4, 4, 2))
    material = ds.StableNeoHookean(youngs_modulus=youngs_modulus, poissons_ratio=0.3)
    return ds.Simulator(
        mesh,
        material,
        dt=1e-3,
        substeps=2,
        gravity=(0.0, 0.0, 0.0),
        ground=None,
        backend="torch",
        dtype=torch.float64,
    )


def initial_state(sim: ds.Simulator) -> ds.State:
    """Stretched 10% along x, squeezed 5% along y and sheared, at rest."""
    x = sim.model.rest_positions
    d = x - x.mean(dim=0)
    scale = torch.tensor([1.10, 0.95, 1.0], dtype=x.dtype)
    shear = torch.stack([0.08 * d[:, 1], 0.04 * d[:, 0], torch.zeros_like(d[:, 0])], dim=1)
    return sim.initial_state(positions=x.mean(dim=0) + d * scale + shear)


def true_field(points: torch.Tensor) -> torch.Tensor:
    """E(x) in Pa at points ``[m, 3]`` (m)."""
    u = points / torch.tensor(SIZE, dtype=points.dtype)
    return E0 * (2.0 + torch.sin(math.pi * u[:, 0]) * torch.cos(math.pi * u[:, 1]))


class StiffnessField(torch.nn.Module):
    """MLP of Fourier features of the rest position (scaled to the block); output log-factor."""

    def __init__(self, frequencies: int = 3, hidden: int = 32) -> None:
        super().__init__()
        self.register_buffer("size", torch.tensor(SIZE, dtype=torch.float64))
        self.register_buffer(
            "freqs", math.pi * torch.arange(1, frequencies + 1, dtype=torch.float64)
        )
        width = 3 + 6 * frequencies
        self.net = torch.nn.Sequential(
            torch.nn.Linear(width, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
        ).double()
        torch.nn.init.zeros_(self.net[-1].weight)  # output 0: the start value everywhere
        torch.nn.init.zeros_(self.net[-1].bias)

    def forward(self, centroids: torch.Tensor) -> torch.Tensor:
        u = centroids / self.size
        phase = u[:, :, None] * self.freqs
        feats = torch.cat([u, torch.sin(phase).flatten(1), torch.cos(phase).flatten(1)], dim=1)
        return self.net(feats).squeeze(1)


def run(iters: int = 150, lr: float = 0.05, log=print) -> tuple[ds.FitResult, list[float]]:
    """Fits the field; returns the result and the field's relative RMS error per iteration."""
    torch.manual_seed(0)
    truth = build()
    centroids = truth.model.rest_positions[truth.model.tets].mean(dim=1)
    e_true = true_field(centroids)
    truth.material = truth.material.replace(youngs_modulus=e_true)
    with torch.no_grad():
        observation = ds.Observation.from_trajectory(
            truth.rollout(STEPS, state=initial_state(truth))
        )
    errors: list[float] = []

    def track(progress) -> None:
        e = progress.values["youngs_modulus"]
        errors.append(float(((e - e_true) / e_true).square().mean().sqrt()))

    field = StiffnessField()
    result = ds.fit(
        build(),
        observation,
        ["youngs_modulus"],
        fields={"youngs_modulus": field},
        state=initial_state,
        optimizer="adam",
        iters=iters,
        lr=lr,
        patience=iters,
        callback=track,
        log=log,
    )
    fitted = torch.as_tensor(result.values["youngs_modulus"])
    final = float(((fitted - e_true) / e_true).square().mean().sqrt())
    log(f"relative RMS error of E(x): start {errors[0]:.3f}, fitted {final:.3f}")
    return result, errors


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=150)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run(args.iters, args.lr)
