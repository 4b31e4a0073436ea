"""Fitting cost on the reference bunny: time per iteration and peak memory, with and without
gradient checkpointing, per backend.

One fitting iteration = a rollout of the reference scene (DESIGN.md) with the current E and
nu, the loss against an observed trajectory (all vertices, every 10th step), its backward
pass and an Adam update. As in bench_backends.py, dt is 1e-5 s instead of the reference
1e-3 s, at which the bunny's sliver tets blow up in explicit time stepping; the work per
step does not depend on dt. Each configuration runs in a fresh subprocess so its peak resident
memory (ru_maxrss) is its own; "fit peak" is the peak minus the RSS before the fit started.

    python benchmarks/bench_fit.py [--steps 200] [--iters 4] [--checkpoint 20]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
DT = 1e-5  # s; see the module docstring


def reference_simulator(backend: str, youngs_modulus: float = 1e5, poissons_ratio: float = 0.4):
    """The DESIGN.md reference scene (bunny 0.3 m tall, 2 cm above the ground, float32),
    with dt = DT."""
    import torch

    import diffsim as ds

    mesh = ds.TetMesh.load(ASSETS / "bunny.msh").centered().scaled_to(0.3).placed_on(0.0, gap=0.02)
    material = ds.StableNeoHookean(
        youngs_modulus=youngs_modulus, poissons_ratio=poissons_ratio, density=1000.0
    )
    return ds.Simulator(
        mesh, material, dt=DT, substeps=1, ground=0.0, backend=backend, dtype=torch.float32
    )


def rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(backend: str, steps: int, iters: int, checkpoint: int | None) -> dict:
    import torch

    import diffsim as ds

    torch.set_num_threads(1)
    truth = reference_simulator(backend)
    with torch.no_grad():
        observation = ds.Observation.from_trajectory(truth.rollout(steps), stride=10)
    sim = reference_simulator(backend, youngs_modulus=7e4, poissons_ratio=0.35)
    base = rss_mb()
    t0 = time.perf_counter()
    result = ds.fit(
        sim,
        observation,
        ["youngs_modulus", "poissons_ratio"],
        optimizer="adam",
        iters=iters,
        lr=0.05,
        checkpoint_every=checkpoint,
        patience=iters + 1,
    )
    wall = time.perf_counter() - t0
    times = result.iteration_seconds
    steady = times[1:] if len(times) > 1 else times  # the first may compile kernels
    return {
        "backend": sim.backend_name,
        "checkpoint": checkpoint,
        "tets": sim.mesh.n_tets,
        "iteration_s": statistics.median(steady),
        "first_iteration_s": times[0],
        "rss_before_mb": base,
        "rss_peak_mb": rss_mb(),
        "wall_s": wall,
        "loss_first": result.loss_history[0],
        "loss_last": result.loss_history[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--checkpoint", type=int, default=20, help="segment length K")
    parser.add_argument("--backends", default="torch,warp")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        backend, ck = args.child.split(":")
        out = child(backend, args.steps, args.iters, int(ck) or None)
        print("RESULT " + json.dumps(out))
        return
    if not (ASSETS / "bunny.msh").is_file():
        sys.exit(f"{ASSETS / 'bunny.msh'} not found: the benchmark needs ../shared/assets")
    env = dict(os.environ)
    rows = []
    for backend in args.backends.split(","):
        for ck in (0, args.checkpoint):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                f"{backend}:{ck}",
                "--steps",
                str(args.steps),
                "--iters",
                str(args.iters),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"{backend} checkpoint={ck}: failed\n{proc.stderr[-2000:]}")
                continue
            rows.append(json.loads(lines[-1][7:]))
    if not rows:
        return
    ref = rows[0]
    print(
        f"\nfitting E and nu on the bunny ({ref['tets']} tets), {args.steps}-step rollout, "
        f"float32, dt {DT:g} s, 1 torch thread; median of iterations 2..{args.iters}"
    )
    header = (
        f"{'backend':8s} {'checkpoint':>10s} {'s/iter':>8s} {'ratio':>6s} "
        f"{'fit peak MB':>11s} {'ratio':>6s} {'RSS peak MB':>11s} {'1st iter s':>10s}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        peak = r["rss_peak_mb"] - r["rss_before_mb"]
        ref_peak = ref["rss_peak_mb"] - ref["rss_before_mb"]
        ck = f"K={r['checkpoint']}" if r["checkpoint"] else "none"
        print(
            f"{r['backend']:8s} {ck:>10s} {r['iteration_s']:8.2f} "
            f"{r['iteration_s'] / ref['iteration_s']:6.2f} {peak:11.0f} "
            f"{peak / max(ref_peak, 1e-9):6.2f} {r['rss_peak_mb']:11.0f} "
            f"{r['first_iteration_s']:10.2f}"
        )


if __name__ == "__main__":
    main()
