"""The cost of the volume limit (``min_volume_ratio``), side by side in one run.

Each row runs a scene from its initial state (after its warm-up steps) for its timed steps,
without and with ``min_volume_ratio=0.1``, and prints the wall time per step of each (the
fastest of ``--repeat`` runs), their ratio and the vertex-steps the limit cut. Where the
limit does not act, the ratio is the cost of checking it (one volume ratio per tet per
substep, in the fused launches); where it acts, of cutting. Usage: ``python
benchmarks/bench_volume_limit.py [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

import diffsim as ds
from diffsim.apps.scene import SceneError, load_scene

ROOT = Path(__file__).resolve().parents[1]
# (scene, warm-up steps, timed steps, what the timed steps show)
ROWS = [
    ("cube_drop", 0, 100, "a stiff cube falls and lands: no tet near the floor"),
    ("spheres_collide", 15, 30, "two soft balls meet head-on: contact acts"),
    ("bunny_drop", 0, 40, "the reference bunny falls through the air (19k tets)"),
    ("armadillo_drop", 140, 10, "the Armadillo on its crease: the limit acts"),
]


def seconds_per_step(sim: ds.Simulator, state: ds.State, steps: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        with torch.no_grad():
            start = time.perf_counter()
            sim.rollout(steps, state)
            best = min(best, time.perf_counter() - start)
    return best / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2, help="runs per cell, the fastest kept")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", ds.StabilityWarning)
    print(f"{'scene':16s} {'tets':>6s} {'off ms/step':>12s} {'on ms/step':>11s} {'ratio':>6s} "
          f"{'cut':>8s}  what the steps show")  # fmt: skip
    for name, warmup, steps, what in ROWS:
        scene = load_scene(ROOT / "scenes" / f"{name}.py")
        try:
            base = scene.build()
        except SceneError as exc:
            print(f"{name}: not built ({exc})")
            continue
        with torch.no_grad():
            state = base.rollout(warmup, scene.initial_state(base)).state(-1)
        times, cut = [], 0
        for floor in (None, 0.1):
            sim = base.replace(min_volume_ratio=floor)
            times.append(seconds_per_step(sim, state, steps, args.repeat))
            cut = sim.volume_steps_cut // args.repeat if floor else cut
        off, on = times
        print(f"{name:16s} {base.mesh.n_tets:6d} {1e3 * off:12.2f} {1e3 * on:11.2f} "
              f"{on / off:5.2f}x {cut:8d}  {what}")  # fmt: skip


if __name__ == "__main__":
    main()
