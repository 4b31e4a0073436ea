"""Static equilibrium + implicit adjoint vs the gradient of an unrolled damped rollout to rest.

Scene: ../shared/assets/bar-2523.msh (886 vertices, 2,523 tets) scaled to 1 m long, 0.1 m
tall (y) and 0.05 m wide, clamped at x = 0, sagging under gravity; Stable Neo-Hookean E = 1e8 Pa, nu = 0.3,
density 1000 kg/m^3; float64; torch backend; one torch thread. Loss: mean height of the
vertices; gradient with respect to the global E.

Rows: the equilibrium with each linear solver (Newton solve, then the adjoint backward),
and the unrolled rollout (explicit steps with mass-proportional damping near critical for
the first bending mode, run until the positions are within 1% of the sag of the
equilibrium, checkpointed every 100 steps), forward and backward.

    python benchmarks/bench_equilibrium.py [--mesh PATH] [--max-steps 20000]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

import diffsim as ds

ASSETS = Path(__file__).resolve().parents[1] / ".." / "shared" / "assets"
E, NU, RHO = 1e8, 0.3, 1000.0
# The mesh's 1 x 0.5 x 0.1 axes, turned so that its 0.1 side (z) is vertical (y).
TURN = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


def build(mesh_path: Path, damping: float = 0.0, dt: float = 1e-3) -> ds.Simulator:
    mesh = ds.TetMesh.load(mesh_path)
    mesh = mesh.transformed(scale=0.1, rotation=TURN)
    mesh = mesh.transformed(translation=-mesh.vertices.min(axis=0))
    fixed = np.flatnonzero(mesh.vertices[:, 0] < 1e-6)
    material = ds.StableNeoHookean(
        youngs_modulus=torch.tensor(E, dtype=torch.float64, requires_grad=True),
        poissons_ratio=NU,
        density=RHO,
    )
    return ds.Simulator(
        mesh,
        material,
        fixed=fixed,
        ground=None,
        damping=damping,
        dt=dt,
        backend="torch",
        dtype=torch.float64,
    )


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench_equilibrium(sim: ds.Simulator, solver: str) -> dict:
    E_param = sim.material.youngs_modulus
    sim.equilibrium(linear_solver=solver)  # warm-up: colouring, imports
    (x, info), t_fwd = timed(lambda: sim.equilibrium(linear_solver=solver, return_info=True))
    loss = x[:, 1].mean()
    (grad,), t_bwd = timed(lambda: torch.autograd.grad(loss, E_param))
    return {
        "x": x.detach(),
        "forward": t_fwd,
        "backward": t_bwd,
        "grad": float(grad),
        "note": f"{info.iterations} Newton its, {info.hessian_products} HVPs, "
        f"{info.linear_iterations} {'CG its' if solver == 'cg' else 'LU'}",
        "per_iteration": t_fwd / max(info.iterations, 1),
    }


def steps_to_rest(sim: ds.Simulator, x_star: torch.Tensor, max_steps: int) -> int:
    """Steps until every vertex is within 1% of the sag of the equilibrium."""
    sag = float((sim.model.rest_positions[:, 1] - x_star[:, 1]).max())
    state = sim.initial_state()
    with torch.no_grad():
        for step in range(1, max_steps + 1):
            state = sim.step(state)
            if step % 50 == 0 and float((state.positions - x_star).abs().max()) < 0.01 * sag:
                return step
    raise RuntimeError(f"the rollout did not come to rest within {max_steps} steps")


def bench_rollout(sim: ds.Simulator, steps: int) -> dict:
    E_param = sim.material.youngs_modulus
    traj, t_fwd = timed(lambda: sim.rollout(steps=steps, checkpoint_every=100))
    loss = traj.positions[-1][:, 1].mean()
    (grad,), t_bwd = timed(lambda: torch.autograd.grad(loss, E_param))
    return {
        "forward": t_fwd,
        "backward": t_bwd,
        "grad": float(grad),
        "note": f"{steps} steps, dt {sim.model.dt:g} s",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mesh", type=Path, default=ASSETS / "bar-2523.msh")
    parser.add_argument("--max-steps", type=int, default=20000)
    args = parser.parse_args()
    if not args.mesh.exists():
        raise SystemExit(f"{args.mesh} not found: this benchmark needs ../shared/assets")
    torch.set_num_threads(1)

    sim = build(args.mesh)
    print(f"{sim.mesh!r}; E = {E:g} Pa, float64, torch backend, 1 thread")
    rows = {s: bench_equilibrium(sim, s) for s in ("direct", "cg")}
    x_star = rows["direct"]["x"]
    sag = float((sim.model.rest_positions[:, 1] - x_star[:, 1]).max())
    print(f"sag {sag * 1e3:.2f} mm")

    # Explicit dt from the smallest tet's wave transit time; damping critical for mode 1.
    edge = float(np.cbrt(sim.mesh.rest_volumes.min() * 6.0))
    dt = 0.5 * edge / math.sqrt(E / RHO)
    omega1 = math.sqrt(9.81 / sag) * 1.1  # ~ first bending frequency of a sagging cantilever
    dyn = build(args.mesh, damping=2.0 * omega1, dt=dt)
    steps = steps_to_rest(dyn, x_star, args.max_steps)
    rows["unrolled"] = bench_rollout(dyn, steps)

    base = rows["direct"]["forward"] + rows["direct"]["backward"]
    print()
    print(
        "| method | forward (s) | backward (s) | total (s) | total / equilibrium | dL/dE | notes |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, label in (
        ("direct", "equilibrium, direct LU"),
        ("cg", "equilibrium, PCG"),
        ("unrolled", "unrolled damped rollout"),
    ):
        r = rows[name]
        total = r["forward"] + r["backward"]
        print(
            f"| {label} | {r['forward']:.2f} | {r['backward']:.2f} | {total:.2f} | "
            f"{total / base:.1f}x | {r['grad']:.6e} | {r['note']} |"
        )
    d = rows["direct"]
    print()
    print(f"adjoint / one Newton iteration (direct): {d['backward'] / d['per_iteration']:.2f}")
    print(
        f"adjoint / one Newton iteration (cg): "
        f"{rows['cg']['backward'] / rows['cg']['per_iteration']:.2f}"
    )
    rel = abs(rows["unrolled"]["grad"] - d["grad"]) / abs(d["grad"])
    print(
        f"relative difference of dL/dE, unrolled vs adjoint: {rel:.2e} "
        f"(the rollout stops within 1% of rest)"
    )


if __name__ == "__main__":
    main()
