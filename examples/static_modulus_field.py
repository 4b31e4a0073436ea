"""Recover a spatially varying Young's modulus from one noisy static deformation.

A synthetic "experiment": a 30 cm cantilever, clamped at x = 0, sags under its own weight
and a small tip load. Its Young's modulus varies along the beam, E(x) = E0 exp(0.5 sin(2 pi
x / L)), between about 0.6 E0 and 1.6 E0. The measured deformation is the equilibrium
positions of all vertices with Gaussian noise of 2% of the tip deflection.

Two fits start from the uniform guess E = E0 and minimise the misfit of the equilibrium
(``sim.equilibrium``, differentiated by one adjoint solve per iteration, no unrolling):

1. per element: one log-modulus per tet, with a smoothness penalty between tets that share
   a face (one deformation cannot pin 480 independent values);
2. a neural field: a small MLP of the tet centroid gives log E (its smoothness is the prior).

Both report the relative error of the recovered field, over all tets and over the part of
the beam where the bending moment is large enough to reveal stiffness (x < 0.8 L).

    python examples/static_modulus_field.py [--iterations 100] [--quick]
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

import diffsim as ds

LENGTH, SIDE = 0.3, 0.03  # m
E0 = 2e6  # Pa
NOISE = 0.02  # of the tip deflection
TIP_LOAD = 0.5  # N, downwards, spread over the tip face


def build() -> ds.Simulator:
    """The beam (20 x 2 x 2 cells, 480 tets), clamped at x = 0, float64, the default (Warp)
    backend."""
    mesh = ds.TetMesh.box(size=(LENGTH, SIDE, SIDE), resolution=(20, 2, 2))
    fixed = np.flatnonzero(mesh.vertices[:, 0] < 1e-9)
    material = ds.StableNeoHookean(youngs_modulus=E0, poissons_ratio=0.3, density=1000.0)
    return ds.Simulator(
        mesh, material, substeps="auto", fixed=fixed, ground=None, dtype=torch.float64
    )


def true_field(centroids: torch.Tensor) -> torch.Tensor:
    """The modulus to recover, ``[m]`` in Pa."""
    return E0 * torch.exp(0.5 * torch.sin(2 * math.pi * centroids[:, 0] / LENGTH))


def tip_load(sim: ds.Simulator) -> torch.Tensor:
    """External forces ``[n, 3]``: TIP_LOAD newtons down, shared by the tip-face vertices."""
    tip = torch.as_tensor(sim.mesh.vertices[:, 0] > LENGTH - 1e-9)
    load = torch.zeros(sim.model.n_vertices, 3, dtype=sim.dtype)
    load[tip, 1] = -TIP_LOAD / int(tip.sum())
    return load


def face_neighbours(tets: np.ndarray) -> np.ndarray:
    """Pairs ``[p, 2]`` of tets that share a face."""
    faces = np.concatenate(
        [np.sort(tets[:, list(f)], axis=1) for f in ((0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3))]
    )
    owner = np.tile(np.arange(len(tets)), 4)
    order = np.lexsort(faces.T[::-1])
    faces, owner = faces[order], owner[order]
    same = np.all(faces[1:] == faces[:-1], axis=1)
    return np.stack([owner[:-1][same], owner[1:][same]], axis=1)


def observe(sim: ds.Simulator, seed: int) -> tuple[torch.Tensor, float]:
    """The noisy measured equilibrium ``[n, 3]`` and the noise level (m)."""
    centroids = sim.model.rest_positions[sim.model.tets].mean(dim=1)
    with torch.no_grad():
        x = sim.equilibrium(
            params={"youngs_modulus": true_field(centroids)}, external_forces=tip_load(sim)
        )
    deflection = float((sim.model.rest_positions[:, 1] - x[:, 1]).max())
    sigma = NOISE * deflection
    gen = torch.Generator().manual_seed(seed)
    return x + sigma * torch.randn(x.shape, generator=gen, dtype=x.dtype), sigma


def field_errors(E: torch.Tensor, truth: torch.Tensor, centroids: torch.Tensor) -> dict:
    """Relative L2 errors of a field, everywhere and where x < 0.8 L."""
    inner = centroids[:, 0] < 0.8 * LENGTH

    def rel(mask):
        return float((E[mask] - truth[mask]).norm() / truth[mask].norm())

    return {"all": rel(torch.ones_like(inner)), "inner": rel(inner)}


class NeuralField(torch.nn.Module):
    """log(E / E0) as an MLP of the normalised position (3 -> 32 -> 32 -> 1, tanh)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, 32),
            torch.nn.Tanh(),
            torch.nn.Linear(32, 32),
            torch.nn.Tanh(),
            torch.nn.Linear(32, 1),
        )
        torch.nn.init.zeros_(self.net[-1].weight)
        torch.nn.init.zeros_(self.net[-1].bias)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor([LENGTH, SIDE, SIDE], dtype=points.dtype)
        return E0 * torch.exp(self.net(2.0 * points / scale - 1.0).squeeze(-1))


def fit(
    sim, observed, sigma, field, parameters, iterations: int, lr: float, penalty=None, log=print
) -> tuple[torch.Tensor, list[float]]:
    """Adam on the misfit (in units of the noise) plus an optional penalty."""
    optimiser = torch.optim.Adam(parameters, lr=lr)
    load = tip_load(sim)
    warm = None
    losses = []
    for it in range(iterations):
        optimiser.zero_grad()
        E = field()
        x = sim.equilibrium(params={"youngs_modulus": E}, external_forces=load, x0=warm)
        warm = x.detach()  # warm start: each solve takes 2-3 Newton iterations
        misfit = ((x - observed) / sigma).square().mean()
        loss = misfit + (penalty() if penalty is not None else 0.0)
        loss.backward()
        optimiser.step()
        losses.append(float(misfit.detach()))
        if it % 10 == 0 or it == iterations - 1:
            log(f"  iteration {it:3d}: misfit {losses[-1]:.4g} (noise level: 1)")
    with torch.no_grad():
        return field().detach(), losses


def run(iterations: int = 100, quick: bool = False, seed: int = 0, log=print) -> dict:
    """Runs both fits; returns the field errors before and after. ``quick``: 3 iterations."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    iterations = 3 if quick else iterations
    sim = build()
    centroids = sim.model.rest_positions[sim.model.tets].mean(dim=1)
    truth = true_field(centroids)
    observed, sigma = observe(sim, seed)
    results = {"initial": field_errors(torch.full_like(truth, E0), truth, centroids)}

    log(f"per-element fit ({sim.model.n_tets} log-moduli, face smoothness penalty)")
    theta = torch.zeros(sim.model.n_tets, dtype=torch.float64, requires_grad=True)
    pairs = torch.as_tensor(face_neighbours(sim.mesh.tets))

    def smoothness():
        return 20.0 * (theta[pairs[:, 0]] - theta[pairs[:, 1]]).square().mean()

    E_elem, losses = fit(
        sim,
        observed,
        sigma,
        lambda: E0 * torch.exp(theta),
        [theta],
        iterations,
        lr=0.05,
        penalty=smoothness,
        log=log,
    )
    results["per_element"] = field_errors(E_elem, truth, centroids)
    results["per_element_misfit"] = losses[-1]

    log("neural field fit (MLP of position)")
    net = NeuralField().to(torch.float64)
    E_net, losses = fit(
        sim,
        observed,
        sigma,
        lambda: net(centroids),
        list(net.parameters()),
        iterations,
        lr=0.01,
        log=log,
    )
    results["neural"] = field_errors(E_net, truth, centroids)
    results["neural_misfit"] = losses[-1]

    log("relative L2 error of E   all tets   x < 0.8 L")
    for name in ("initial", "per_element", "neural"):
        e = results[name]
        log(f"  {name:<22} {e['all']:9.3f} {e['inner']:11.3f}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=100, help="Adam iterations per fit")
    parser.add_argument("--quick", action="store_true", help="3 iterations (a smoke test)")
    parser.add_argument("--seed", type=int, default=0, help="noise and initialisation seed")
    args = parser.parse_args()
    run(args.iterations, args.quick, args.seed)


if __name__ == "__main__":
    main()
