"""Batched worlds against separate rollouts: B worlds of a ~1k-tet body, side by side.

For B = 1, 4, 16, 64 worlds of one body (a box of 6 x 6 x 5 cells, 1080 tets, or
``--mesh`` a file of ../shared/assets, or ``--mesh mat-on-ball``: the mat lying on the
ball of scenes/mat_on_sphere.py, surface contact acting in every world), each world with
its own Young's modulus, this times

- separate: B rollouts of one single-world simulator, one after the other, each with its
  world's modulus passed as ``params=`` (what a loop over parameter sets does);
- batched: one rollout of ``Simulator(worlds=B)`` with the B moduli ``[B]``;

forward (no graph) and forward + backward (loss: mean height of the last frame, gradient
with respect to every world's modulus), and prints the time per world-step and the
speed-up. Each configuration runs in a fresh subprocess, after a warm-up rollout, and keeps
the best of ``--repeats`` runs. Warp backend, float32, the default thread count (see
docs/backends.md), stable substeps ("auto").

    .venv/bin/python benchmarks/bench_worlds.py              # B = 1, 4, 16, 64
    .venv/bin/python benchmarks/bench_worlds.py --quick      # B = 1, 4, 16, fewer steps
    .venv/bin/python benchmarks/bench_worlds.py --quick --mesh mat-on-ball --no-fit

Then, unless ``--no-fit``, the fit of three recorded drops in one process against two
(torchrun), time per iteration (the rows of benchmarks/bench_fit_targets.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
# With --mesh mat-on-ball, the rollouts start where one world's run is after this many steps
# (the mat lying on the ball, its contact acting).
WARM_UP_STEPS = 100


# ----------------------------------------------------------------------------- worker side
def _build(spec: dict, worlds: int | None):
    import torch

    import diffsim as ds

    if spec["mesh"] == "mat-on-ball":  # contact acting: scenes/mat_on_sphere.py as it is
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from scenes import mat_on_sphere

        sim = mat_on_sphere.build()
        return sim.mesh, sim.replace(worlds=worlds, dtype=getattr(torch, spec["dtype"]))
    if spec["mesh"] == "box":
        mesh = ds.TetMesh.box(size=(0.12, 0.12, 0.1), resolution=(6, 6, 5))
    else:
        mesh = ds.TetMesh.load(ASSETS / spec["mesh"]).centered().scaled_to(0.12)
    mesh = mesh.placed_on(0.0, gap=0.02)
    dtype = {"float32": torch.float32, "float64": torch.float64}[spec["dtype"]]
    material = ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.4, density=1000.0)
    sim = ds.Simulator(
        mesh, material, dt=spec["dt"], substeps="auto", backend=spec["backend"], dtype=dtype,
        device=spec["device"], worlds=worlds,
    )  # fmt: skip
    return mesh, sim


def _worker(spec: dict) -> dict:
    import torch

    import diffsim as ds

    torch.set_num_threads(1)
    B, steps, batched = spec["worlds"], spec["steps"], spec["batched"]
    mesh, sim = _build(spec, B if batched else None)
    E0 = float(sim.material.youngs_modulus)
    moduli = E0 * (1.0 + 0.5 * torch.arange(B, dtype=sim.dtype) / max(B - 1, 1))
    grad = spec["task"] == "grad"
    start = None  # the rest state; with contact, the mat lying on the ball
    if spec["mesh"] == "mat-on-ball":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            end = _build(spec, None)[1].rollout(WARM_UP_STEPS)
        x, v = end.positions[-1], end.velocities[-1]
        start = ds.State(x, v)
        if batched:
            start = sim.initial_state(x.expand(B, *x.shape), v.expand(B, *v.shape))

    def run() -> None:
        E = moduli.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            if batched:
                traj = sim.rollout(steps, start, params={"youngs_modulus": E})
                loss = traj.positions[-1, ..., 1].mean(dim=-1).sum()
                if grad:
                    loss.backward()
                return
            for w in range(B):
                traj = sim.rollout(steps, start, params={"youngs_modulus": E[w]})
                if grad:
                    traj.positions[-1, :, 1].mean().backward()

    run()  # warm-up: kernels loaded, buffers allocated
    best, best_cpu = float("inf"), float("inf")
    for _ in range(spec["repeats"]):
        if sim.device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        if sim.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return {
        "seconds": best,
        "per_world_step_ms": 1e3 * best / (B * steps),
        "cpu_per_world_step_ms": 1e3 * best_cpu / (B * steps),
        "tets": mesh.n_tets,
        "substeps": sim.model.substeps,
    }


# ----------------------------------------------------------------------------- driver side
def _run(spec: dict) -> dict:
    env = dict(os.environ)
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cell(r: dict) -> str:
    if "error" in r:
        return r["error"]
    return f"{r['per_world_step_ms']:.3f} ({r['cpu_per_world_step_ms']:.3f})"


def _ratio(separate: dict, batched: dict) -> str:
    if "error" in separate or "error" in batched:
        return "n/a"
    return f"{separate['seconds'] / batched['seconds']:.1f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="B = 1, 4, 16 and 20 steps")
    parser.add_argument("--worlds", type=int, nargs="+", help="world counts (default 1 4 16 64)")
    parser.add_argument("--steps", type=int, default=50, help="steps per rollout")
    parser.add_argument("--dt", type=float, default=1e-3, help="time per step in s")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (best)")
    parser.add_argument(
        "--mesh",
        default="box",
        help="'box', 'mat-on-ball' (scenes/mat_on_sphere.py from its 100th step: surface "
        "contact acting; its own dt and substeps) or a file in ../shared/assets",
    )
    parser.add_argument("--backend", default="warp", choices=["warp", "torch"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-fit", action="store_true", help="skip the 1- vs 2-process fit")
    parser.add_argument("--fit-iters", type=int, default=6, help="fit iterations per run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return
    worlds = args.worlds or ([1, 4, 16] if args.quick else [1, 4, 16, 64])
    steps = 20 if args.quick else args.steps
    base = {
        "mesh": args.mesh, "dt": args.dt, "steps": steps, "repeats": args.repeats,
        "backend": args.backend, "dtype": args.dtype, "device": args.device,
    }  # fmt: skip
    rows = []
    for B in worlds:
        row = {"worlds": B}
        for task in ("forward", "grad"):
            for batched in (False, True):
                spec = {**base, "worlds": B, "task": task, "batched": batched}
                row[(task, batched)] = _run(spec)
        rows.append(row)
        print(f"  B = {B} done", file=sys.stderr, flush=True)
    _print(rows, args, steps)
    if not args.no_fit:
        _print_fit(args.fit_iters, steps=40 if args.quick else 80)


def _print_fit(iters: int, steps: int) -> None:
    """The fit of three drops (benchmarks/bench_fit_targets.py, its 1296-tet cube, each
    process running its targets as worlds) in 1 process and in 2 (torchrun, gloo)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_fit_targets as fits

    print()
    print(
        f"Fitting three drops (bench_fit_targets.py, {steps} steps each, Adam, float64, Warp, "
        f"targets as worlds): seconds per iteration, median after the first of {iters}"
    )
    print()
    print("| processes | tets | s/iter | ratio to 1 process |")
    print("|---|---|---|---|")
    base = None
    for processes in (1, 2):
        row = fits.run(6, steps, iters, processes, "auto")
        base = base or row["iteration_s"]
        print(
            f"| {processes} | {row['tets']} | {row['iteration_s']:.4f} "
            f"| {row['iteration_s'] / base:.2f} |",
            flush=True,
        )


def _print(rows: list[dict], args, steps: int) -> None:
    import torch

    first = next((v for r in rows for v in r.values() if isinstance(v, dict) and "tets" in v), {})
    print(
        f"# diffsim worlds: {args.mesh} ({first.get('tets', '?')} tets), {args.backend} "
        f"backend, {args.dtype}, {args.device}, dt = {args.dt:g} s x {first.get('substeps', '?')} "
        f"substeps, {steps} steps, torch {torch.__version__}, {os.cpu_count()} CPU cores, "
        f"DIFFSIM_WARP_THREADS={os.environ.get('DIFFSIM_WARP_THREADS', 'default')}, load "
        f"average {os.getloadavg()[0]:.1f} at the end"
    )
    print()
    print(
        "Time per world-step in ms, wall clock (CPU time of the process, all its threads, in "
        "brackets), best of runs; speed-up = separate / batched, wall clock"
    )
    print()
    print(
        "| worlds B | forward: B separate | forward: batched | speed-up "
        "| fwd+bwd: B separate | fwd+bwd: batched | speed-up |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        f_sep, f_bat = r[("forward", False)], r[("forward", True)]
        g_sep, g_bat = r[("grad", False)], r[("grad", True)]
        print(
            f"| {r['worlds']} | {_cell(f_sep)} | {_cell(f_bat)} | {_ratio(f_sep, f_bat)} "
            f"| {_cell(g_sep)} | {_cell(g_bat)} | {_ratio(g_sep, g_bat)} |"
        )


if __name__ == "__main__":
    main()
