"""Fitting three recorded drops at once: time per iteration in 1 process against 2 (torchrun).

The fit of tests/test_fit_targets.py (a cube thrown at the ground from three heights, E and
nu shared, float64, Warp backend), on the test's 48-tet cube and on a finer 1296-tet one.
One iteration = one rollout with gradient per target and an Adam step (Adam, not L-BFGS, so
that every iteration does the same work). Rows: one process running its targets one by one
("loop") or, where the simulator has batched worlds, as worlds of one rollout ("worlds"),
and two processes started by torchrun on 127.0.0.1 (gloo), which split the three targets
2 + 1 (each process runs its share one by one, or as worlds). Each row runs in a fresh
process (group), ``--repeat`` times; the time is the median iteration after the first, the
lowest of the repeats (other work on the machine only ever adds time).

    python benchmarks/bench_fit_targets.py [--steps 80] [--iters 10] [--repeat 3]
        [--resolutions 2 6]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Three drops: lift above the ground (m) and initial velocity (m/s), as in the tests.
DROPS = [(0.01, (0.3, -1.5, 0.0)), (0.03, (-0.4, -1.0, 0.2)), (0.02, (0.0, -2.0, 0.5))]


def build(resolution: int, youngs_modulus: float = 8e4, poissons_ratio: float = 0.25):
    """A 10 cm cube, ``resolution`` cells a side, 5 mm above the ground, float64, Warp."""
    import torch

    import diffsim as ds

    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=resolution, origin=(-0.05, 0.005, -0.05))
    material = ds.StableNeoHookean(
        youngs_modulus=youngs_modulus, poissons_ratio=poissons_ratio, density=1000.0
    )
    return ds.Simulator(
        mesh, material, dt=1e-3, substeps="auto", ground=0.0, backend="warp", dtype=torch.float64
    )


def child(resolution: int, steps: int, iters: int, batch: str, out: str) -> None:
    """One fit (in each process of a torchrun group); process 0 writes the timings."""
    import torch

    import diffsim as ds
    from diffsim.fitting import distributed

    torch.set_num_threads(1)
    distributed.share_cores()  # as diffsim fit does under torchrun
    truth = build(resolution, 5e4, 0.35)
    targets = []
    for i, (lift, velocity) in enumerate(DROPS):
        x = truth.model.rest_positions.clone()
        x[:, 1] += lift
        start = truth.initial_state(positions=x, velocities=velocity)
        with torch.no_grad():
            traj = truth.rollout(steps, state=start)
        targets.append(
            ds.Observation.from_trajectory(traj, stride=2, noise=5e-4, seed=i, with_start=True)
        )
    sim = build(resolution)
    result = ds.fit(
        sim,
        targets,
        optimizer="adam",
        iters=iters,
        lr=0.05,
        patience=iters + 1,
        batch={"auto": None, "off": False}[batch],
    )
    if result.processes > 1 and int(os.environ.get("RANK", "0")) != 0:
        return
    times = result.iteration_seconds
    Path(out).write_text(
        json.dumps(
            {
                "tets": sim.mesh.n_tets,
                "substeps": sim.model.substeps,
                "processes": result.processes,
                "batched": result.batched,
                "iteration_s": statistics.median(times[1:] if len(times) > 1 else times),
                "values": result.values,
            }
        )
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(resolution: int, steps: int, iters: int, processes: int, batch: str) -> dict:
    """One row: a fresh process (or torchrun group) running :func:`child`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "row.json")
        args = [
            __file__, "--child", "--resolutions", str(resolution), "--steps", str(steps),
            "--iters", str(iters), "--batch", batch, "--out", out,
        ]  # fmt: skip
        if processes == 1:
            command = [sys.executable, *args]
        else:
            command = [
                sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                "--nproc-per-node", str(processes), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--local-addr", "127.0.0.1",
                *args,
            ]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        if sys.platform.startswith("linux"):
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
        return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3, help="runs per row (the fastest)")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[2, 6])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.resolutions[0], args.steps, args.iters, args.batch, args.out)
        return
    sys.path.insert(0, str(ROOT))
    from diffsim.fitting.worlds import supports_worlds

    configs = [(1, "off", "loop"), (2, "off", "2 x loop")]
    if supports_worlds(build(2)):
        configs += [(1, "auto", "worlds"), (2, "auto", "2 x worlds")]
    print(
        f"3 targets, {args.steps} steps each, Adam, float64, Warp backend; "
        f"{os.cpu_count()} CPU cores"
    )
    header = (
        f"{'tets':>6s} {'substeps':>8s} {'processes':>9s} {'how':>12s} {'s/iter':>9s} {'ratio':>7s}"
    )
    print(header)
    print("-" * len(header))
    for resolution in args.resolutions:
        base = None
        for processes, batch, how in configs:
            rows = [
                run(resolution, args.steps, args.iters, processes, batch)
                for _ in range(args.repeat)
            ]
            row = min(rows, key=lambda r: r["iteration_s"])
            base = base or row["iteration_s"]
            print(
                f"{row['tets']:6d} {row['substeps']:8d} {processes:9d} {how:>12s} "
                f"{row['iteration_s']:9.4f} {row['iteration_s'] / base:7.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
