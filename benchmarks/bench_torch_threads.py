"""Torch's threads beside the Warp backend: the scenes as users run them, in one run.

Users run with torch's default intra-op threads (one per core); the other benchmarks and
the tests set one torch thread. Torch's OpenMP threads spin after each parallel op and
take the cores from the Warp backend's worker threads, so the Warp backend runs its work
with one torch thread (``diffsim.backends.warp.threads.one_torch_thread``). Three
configurations, each scene in a fresh process, the configurations in turns:

- ``default, unscoped``: torch's default threads, ``one_torch_thread`` taken away (the
  behaviour before it: ``torch.set_num_threads`` made a no-op in that process);
- ``default``: torch's default threads, as a user runs;
- ``one thread``: ``torch.set_num_threads(1)`` for the whole process (the benchmarks).

Each row: frames per scene, forward and forward+backward time per frame (loss: mean
height of the last frame, gradient w.r.t. the initial velocities), each the fastest of
``--repeat`` runs, and its ratio to ``one thread``. Usage: ``python
benchmarks/bench_torch_threads.py [--repeat 2] [--only spheres_collide]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (scene file stem, timed steps): two contact scenes, the bunny falling (contact-free
# blocks), a small cube dropped on the ground (per-frame overhead); "worlds": 16 batched
# worlds of a 1,080-tet box dropped on the ground (benchmarks/bench_worlds.py's body).
SCENES = [
    ("spheres_collide", 40),
    ("mat_on_sphere", 60),
    ("bunny_drop", 100),
    ("cube_drop", 100),
    ("worlds", 30),
]
WORLDS = 16
CONFIGS = ["default, unscoped", "default", "one thread"]


def child(scene_name: str, steps: int, config: str) -> None:
    """Times one scene in this process under ``config``; prints a JSON line."""
    import torch

    if config == "one thread":
        torch.set_num_threads(1)
    elif config == "default, unscoped":
        torch.set_num_threads = lambda n: None  # one_torch_thread can change nothing

    import warnings

    from diffsim.apps.scene import load_scene
    from diffsim.sim.state import State

    if scene_name == "worlds":
        import diffsim as ds

        mesh = ds.TetMesh.box(size=(0.12, 0.12, 0.1), resolution=(6, 6, 5)).placed_on(0.0, 0.02)
        material = ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.4, density=1000.0)
        sim = ds.Simulator(mesh, material, dt=1e-3, substeps="auto", worlds=WORLDS)
        start_state = sim.initial_state()
    else:
        scene = load_scene(ROOT / "scenes" / f"{scene_name}.py")
        sim = scene.build()
        start_state = scene.initial_state(sim)

    def forward_backward() -> float:
        start = time.perf_counter()
        v0 = start_state.velocities.clone().requires_grad_(True)
        traj = sim.rollout(steps, State(start_state.positions, v0))
        traj.positions[-1][:, 1].mean().backward()
        return time.perf_counter() - start

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        forward_backward()  # compiles every kernel the run meets
        with torch.no_grad():
            start = time.perf_counter()
            sim.rollout(steps, start_state)
            forward = time.perf_counter() - start
        both = forward_backward()
    print(json.dumps({"threads": torch.get_num_threads(), "fwd": forward, "fwd_bwd": both}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--only", nargs="+", help="these scenes (file stems) only")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2])
        return
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)  # torch's default threads unless a row sets one
    scenes = [s for s in SCENES if not args.only or s[0] in args.only]
    best: dict = {}
    threads = {}
    for _ in range(args.repeat):
        for name, steps in scenes:
            for config in CONFIGS:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", name, str(steps), config],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                row = json.loads(out.stdout.strip().splitlines()[-1])
                threads[(name, config)] = row["threads"]
                old = best.get((name, config), {"fwd": float("inf"), "fwd_bwd": float("inf")})
                best[(name, config)] = {k: min(old[k], row[k] / steps) for k in old}
    print(f"torch default threads on this machine: {threads.get((scenes[0][0], 'default'))}")
    print(f"{'scene':16} {'config':18} {'fwd ms':>8} {'ratio':>7} {'fwd+bwd ms':>11} {'ratio':>7}")
    for name, steps in scenes:
        one = best[(name, "one thread")]
        for config in CONFIGS:
            r = best[(name, config)]
            print(
                f"{name:16} {config:18} {1e3 * r['fwd']:8.2f} {r['fwd'] / one['fwd']:6.2f}x "
                f"{1e3 * r['fwd_bwd']:11.2f} {r['fwd_bwd'] / one['fwd_bwd']:6.2f}x"
            )
        print(f"{'':16} ({steps} frames)")


if __name__ == "__main__":
    main()
