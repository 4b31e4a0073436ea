"""How the peak memory of a rollout gradient grows with the number of steps T, with and
without checkpointing (K = round(sqrt(T))), on both backends.

Each configuration runs in a fresh subprocess that reports its peak resident memory above
the baseline measured just before the rollout (mesh, simulator and warm-up done). The
rollout returns all T + 1 frames, so part of every figure is the trajectory itself
(2 x (T + 1) x n x 3 floats); the rest is the autograd tape.

    python benchmarks/bench_checkpoint_memory.py [--steps 100 200 400 800] [--resolution 10]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(backend: str, steps: int, checkpoint: int | None, resolution: int) -> dict:
    import torch

    import diffsim as ds

    torch.set_num_threads(1)
    mesh = ds.TetMesh.box(size=(0.2, 0.2, 0.2), resolution=resolution, origin=(0.0, 0.05, 0.0))
    E = torch.tensor(1e5, requires_grad=True)
    sim = ds.Simulator(mesh, ds.StableNeoHookean(E, 0.4, 1000.0), dt=1e-4, backend=backend)
    warm = sim.rollout(2, checkpoint_every=checkpoint)
    warm.positions[-1, :, 1].mean().backward()
    E.grad = None
    del warm
    baseline = _rss_kib("VmRSS")
    # VmHWM only rises; reset it so the peak is this rollout's (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    start = time.perf_counter()
    traj = sim.rollout(steps, checkpoint_every=checkpoint)
    traj.positions[-1, :, 1].mean().backward()
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    trajectory_mib = 2 * (steps + 1) * mesh.n_vertices * 3 * 4 / 2**20
    return {
        "peak_mib": (peak - baseline) / 1024,
        "seconds": seconds,
        "trajectory_mib": trajectory_mib,
        "n_tets": mesh.n_tets,
    }


def run_config(backend: str, steps: int, checkpoint: int | None, resolution: int) -> dict:
    args = [sys.executable, __file__, "--worker", backend, str(steps), str(checkpoint or 0)]
    args += ["--resolution", str(resolution)]
    out = subprocess.run(args, capture_output=True, text=True, check=True, env=os.environ.copy())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 200, 400, 800])
    parser.add_argument("--resolution", type=int, default=10, help="box cells per side")
    parser.add_argument("--backends", nargs="+", default=["torch", "warp"])
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        backend, steps, k = args.worker
        result = worker(backend, int(steps), int(k) or None, args.resolution)
        print(json.dumps(result))
        return
    rows = []
    for backend in args.backends:
        for steps in args.steps:
            k = round(math.sqrt(steps))
            plain = run_config(backend, steps, None, args.resolution)
            ckpt = run_config(backend, steps, k, args.resolution)
            rows.append((backend, steps, k, plain, ckpt))
    n_tets = rows[0][3]["n_tets"]
    print(f"Peak memory of rollout + backward above baseline, box of {n_tets} tets, float32")
    header = "| backend | T | K | no checkpoint MiB | checkpoint MiB | ratio | trajectory MiB |"
    print(header + " time no ckpt s | time ckpt s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for backend, steps, k, plain, ckpt in rows:
        ratio = ckpt["peak_mib"] / max(plain["peak_mib"], 1e-9)
        print(
            f"| {backend} | {steps} | {k} | {plain['peak_mib']:.0f} | {ckpt['peak_mib']:.0f} | "
            f"{ratio:.2f} | {plain['trajectory_mib']:.0f} | {plain['seconds']:.2f} | "
            f"{ckpt['seconds']:.2f} |"
        )


if __name__ == "__main__":
    main()
