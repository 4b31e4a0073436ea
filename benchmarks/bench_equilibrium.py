"""Static equilibrium + implicit adjoint vs the gradient of an unrolled damped rollout to rest.

Two cantilevers, clamped at x = 0 and sagging under gravity; Stable Neo-Hookean E = 1e8 Pa,
nu = 0.3, density 1000 kg/m^3; float64; torch backend (plus one row on the Warp backend,
when present); one torch thread. Loss: mean height of the vertices; gradient with respect
to the global E.

1. bar: ../shared/assets/bar-2523.msh (886 vertices, 2,523 tets) scaled to 1 m long, 0.1 m
   tall and 0.05 m wide. The equilibrium with each linear solver (Newton solve, then the
   adjoint backward). Its sliver tets force an explicit dt far too small to unroll to rest,
   so the table gives the steps the rollout would need instead.
2. box beam: 0.5 m x 0.1 m x 0.05 m, 32 x 4 x 2 cells (1,536 tets): the same two rows, and
   the unrolled rollout (explicit steps with mass-proportional damping near critical for
   the first bending mode, run until the positions are within 1% of the sag of the
   equilibrium, checkpointed every 100 steps), forward and backward.

    python benchmarks/bench_equilibrium.py [--max-steps 20000]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

import diffsim as ds
from diffsim.backends import BACKENDS

ASSETS = Path(__file__).resolve().parents[1] / ".." / "shared" / "assets"
E, NU, RHO = 1e8, 0.3, 1000.0
# The mesh's 1 x 0.5 x 0.1 axes, turned so that its 0.1 side (z) is vertical (y).
TURN = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


def bar_mesh(path: Path) -> ds.TetMesh:
    mesh = ds.TetMesh.load(path).transformed(scale=0.1, rotation=TURN)
    return mesh.transformed(translation=-mesh.vertices.min(axis=0))


def box_beam() -> ds.TetMesh:
    return ds.TetMesh.box(size=(0.5, 0.1, 0.05), resolution=(32, 4, 2))


def build(
    mesh: ds.TetMesh, damping: float = 0.0, dt: float = 1e-3, backend: str = "torch"
) -> ds.Simulator:
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
        backend=backend,
        dtype=torch.float64,
    )


def shortest_height(mesh: ds.TetMesh) -> float:
    """The smallest tet altitude 3 V / (largest face area), in m."""
    corners = mesh.vertices[mesh.tets]
    areas = []
    for a, b, c in ((0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)):
        cross = np.cross(corners[:, b] - corners[:, a], corners[:, c] - corners[:, a])
        areas.append(0.5 * np.linalg.norm(cross, axis=1))
    return float((3.0 * mesh.rest_volumes / np.max(areas, axis=0)).min())


def p_wave_factor(nu: float) -> float:
    """(lambda + 2 mu) / E: the P-wave modulus relative to E."""
    return (1.0 - nu) / ((1.0 + nu) * (1.0 - 2.0 * nu))


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench_equilibrium(sim: ds.Simulator, solver: str) -> dict:
    E_param = sim.material.youngs_modulus
    sim.equilibrium(linear_solver=solver)  # warm-up: colouring, imports, Warp modules
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


def explicit_setup(sim: ds.Simulator, sag: float) -> tuple[float, float]:
    """A stable explicit dt (s) and a damping rate (1/s) near critical for bending mode 1."""
    dt = 0.5 * shortest_height(sim.mesh) / math.sqrt(E * p_wave_factor(NU) / RHO)
    omega1 = math.sqrt(9.81 / sag) * 1.1  # ~ first bending frequency of a sagging cantilever
    return dt, 2.0 * omega1


def print_table(title: str, rows: dict) -> None:
    base = rows["direct"]["forward"] + rows["direct"]["backward"]
    print(f"\n{title}\n")
    print("| method | forward (s) | backward (s) | total (s) | vs equilibrium | dL/dE | notes |")
    print("|---|---|---|---|---|---|---|")
    labels = {
        "direct": "equilibrium, direct LU",
        "warp": "equilibrium, direct LU, Warp backend",
        "cg": "equilibrium, PCG",
        "unrolled": "unrolled damped rollout",
    }
    for name, r in rows.items():
        total = r["forward"] + r["backward"]
        print(
            f"| {labels[name]} | {r['forward']:.2f} | {r['backward']:.2f} | {total:.2f} | "
            f"{total / base:.1f}x | {r['grad']:.6e} | {r['note']} |"
        )
    for name in [k for k in ("direct", "cg", "warp") if k in rows]:
        r = rows[name]
        print(f"adjoint / one Newton iteration ({name}): {r['backward'] / r['per_iteration']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mesh", type=Path, default=ASSETS / "bar-2523.msh")
    parser.add_argument("--max-steps", type=int, default=20000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"E = {E:g} Pa, nu = {NU}, float64, torch backend, 1 thread")

    if args.mesh.exists():
        sim = build(bar_mesh(args.mesh))
        rows = {s: bench_equilibrium(sim, s) for s in ("direct", "cg")}
        if "warp" in BACKENDS:
            rows["warp"] = bench_equilibrium(build(bar_mesh(args.mesh), backend="warp"), "direct")
        sag = float((sim.model.rest_positions[:, 1] - rows["direct"]["x"][:, 1]).max())
        dt, damping = explicit_setup(sim, sag)
        t_rest = 6.6 / (0.5 * damping)  # critically damped mode 1 within ~1%
        print_table(f"bar-2523 ({sim.mesh!r}), sag {sag * 1e3:.2f} mm", rows)
        print(
            f"unrolling to rest would need dt {dt:.2g} s (sliver tets) and about "
            f"{t_rest / dt:,.0f} steps"
        )
    else:
        print(f"{args.mesh} not found: skipping the bar (it needs ../shared/assets)")

    sim = build(box_beam())
    rows = {s: bench_equilibrium(sim, s) for s in ("direct", "cg")}
    x_star = rows["direct"]["x"]
    sag = float((sim.model.rest_positions[:, 1] - x_star[:, 1]).max())
    dt, damping = explicit_setup(sim, sag)
    dyn = build(box_beam(), damping=damping, dt=dt)
    steps = steps_to_rest(dyn, x_star, args.max_steps)
    rows["unrolled"] = bench_rollout(dyn, steps)
    print_table(f"box beam ({sim.mesh!r}), sag {sag * 1e3:.2f} mm", rows)
    rel = abs(rows["unrolled"]["grad"] - rows["direct"]["grad"]) / abs(rows["direct"]["grad"])
    print(f"dL/dE, unrolled vs adjoint: relative difference {rel:.2e} (rollout within 1% of rest)")


if __name__ == "__main__":
    main()
