"""Contact benchmark: the mat dropped on a ball (scenes/mat_on_sphere.py), in contact.

For each implementation, runs a warm-up until the mat lies on the ball, then times a
forward rollout and reports the time share of the broad phase, the barrier forces, friction
and the continuous-collision limit (the rest is elasticity and integration), and the time
of a short forward+backward (loss: mean height of the last frame, gradient w.r.t. the
initial velocities). Usage: ``python benchmarks/bench_contact.py [--steps 40]``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("WARP_CACHE_PATH", str(Path(__file__).resolve().parents[1] / ".warp_cache"))

import torch  # noqa: E402

from diffsim.apps.scene import load_scene, with_parameters  # noqa: E402
from diffsim.sim.state import State  # noqa: E402

SCENE = Path(__file__).resolve().parents[1] / "scenes" / "mat_on_sphere.py"
CONFIGS = [
    ("warp", "warp", "bvh"),  # (simulator backend, contact implementation, broad phase)
    ("torch", "torch", "bvh"),
    ("torch", "torch", "brute"),
]
PHASES = ("broad_phase", "barrier", "friction", "ccd")


def simulator(backend: str, implementation: str, broad_phase: str):
    scene = load_scene(SCENE)
    sim = with_parameters(scene.build(), backend=backend)
    sim.model.contact.implementation = implementation
    sim.model.contact.broad_phase = broad_phase
    return scene, sim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--backward-steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for backend, implementation, broad_phase in CONFIGS:
        scene, sim = simulator(backend, implementation, broad_phase)
        contact = sim.model.contact
        with torch.no_grad():
            state = sim.rollout(args.warmup, scene.initial_state(sim)).state(-1)
            contact.timings.clear()
            start = time.perf_counter()
            sim.rollout(args.steps, state)
            total = time.perf_counter() - start
        shares = {p: contact.timings[p] / total for p in PHASES}
        pairs = contact.candidates(state.positions).n_pairs
        rebuilds = contact.timings["rebuilds"]
        v0 = state.velocities.clone().requires_grad_(True)
        start = time.perf_counter()
        traj = sim.rollout(args.backward_steps, State(state.positions, v0))
        traj.positions[-1][:, 1].mean().backward()
        fwd_bwd = time.perf_counter() - start
        rows.append((backend, implementation, broad_phase, total, shares, pairs, rebuilds, fwd_bwd))
    substeps = args.steps * sim.model.substeps
    print(
        f"mat on sphere: {sim.mesh.n_vertices} vertices, {sim.mesh.n_tets} tets, "
        f"{args.steps} steps x {sim.model.substeps} substeps after {args.warmup} warm-up steps"
    )
    print(
        f"{'backend/contact/broad':24s} {'ms/substep':>10s} {'vs warp':>8s} "
        + " ".join(f"{p:>11s}" for p in PHASES)
        + f" {'pairs':>7s} {'rebuilds':>8s} {'fwd+bwd s':>10s}"
    )
    base = rows[0][3]
    for backend, impl, bp, total, shares, pairs, rebuilds, fb in rows:
        print(
            f"{backend + '/' + impl + '/' + bp:24s} {1e3 * total / substeps:10.2f} "
            f"{total / base:7.2f}x "
            + " ".join(f"{100 * shares[p]:10.1f}%" for p in PHASES)
            + f" {pairs:7d} {int(rebuilds):8d} {fb:10.2f}"
        )


if __name__ == "__main__":
    main()
