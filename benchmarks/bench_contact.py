"""Contact benchmark: the cost of surface contact per substep, in one run.

The tables:

1. The mat dropped on a ball (scenes/mat_on_sphere.py, timed after a warm-up that drapes
   it) and two spheres colliding head-on (scenes/spheres_collide.py, timed through the
   impact): the Warp path against the torch reference, and against the Warp path's elastic
   core alone (contact off, from the same state: the floor of a contact substep).
2. The reference bunny (bunny.msh 0.3 m tall, float32, 1e-5 s substeps, ground at 0) falling
   through the air from 2 cm, and lying on the ground: contact on against contact off.
3. An impact the step limit cuts: two 10 cm boxes (162 tets each) thrown together at 6 m/s
   with 0.25 ms substeps (faster than the barrier stops at that substep, as a scene
   without ``contact_speed`` has it), timed through the impact; the substeps the fused
   launches hand to the general path are counted (the differentiable launches truncate
   cut steps themselves; only the volume limit's cuts, off here, are handed over).

Each row gives the forward time per substep, the forward+backward time per substep (loss:
mean height of the last frame, gradient w.r.t. the initial velocities), the shares of the
forward time spent in each contact stage (``SurfaceContact.timings``: broad phase, barrier
forces, friction, the continuous-collision limit, the checks of contact-free blocks and
their predictions (``clear_over``), the selection of the candidate sets for fused contact
substeps and those launches, which run the whole substep (elasticity included); the rest
is elasticity, integration and the candidate cache's checks), the candidate pairs at the
end and the broad-phase rebuilds. The Warp path runs fused contact substeps
(:mod:`diffsim.backends.warp.contact_steps`), forward and backward, except the steps the
step limit cuts in a differentiable run (the general path takes those); the torch
reference runs the general path substep by substep. One torch thread; the Warp path's
broad-phase queries and checks may use the backend's two CPU threads.
Usage: ``python benchmarks/bench_contact.py [--steps 40] [--quick]
[--repeat 3] [--only spheres_collide bunny impact]`` (``--repeat``: the fastest of several runs,
taken in turns with the other rows of the table).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import diffsim as ds
from diffsim.apps.scene import load_scene, with_parameters
from diffsim.sim.state import State

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
PHASES = ("broad_phase", "barrier", "friction", "ccd", "checks", "select", "fused")
# (name, scene file, warm-up steps, timed steps) at the scenes' own dt and substeps.
SCENES = [
    ("mat on sphere", "mat_on_sphere", 100, 40),
    ("spheres collide", "spheres_collide", 15, 30),
]
CONFIGS = [("warp", "warp"), ("torch", "torch")]  # (simulator backend, contact implementation)


def new_row() -> dict:
    """An empty row: the fastest times (s per substep), shares, pairs and rebuilds."""
    return {"fwd": float("inf"), "fwd_bwd": float("inf"), "shares": {}, "pairs": 0, "rebuilds": 0}


def time_once(sim: ds.Simulator, state: State, steps: int, backward_steps: int, row: dict):
    """One forward and one forward+backward run from ``state`` into ``row``, which keeps the
    fastest of each (with the shares, pairs and rebuilds of the fastest forward run)."""
    contact = sim.model.contact
    substeps = sim.model.substeps
    with torch.no_grad():
        if contact is not None:
            contact.timings.clear()
        start = time.perf_counter()
        end = sim.rollout(steps, state).state(-1)
        forward = time.perf_counter() - start
    if forward / (steps * substeps) < row["fwd"]:
        row["fwd"] = forward / (steps * substeps)
        if contact is not None:
            row["shares"] = {p: contact.timings[p] / forward for p in PHASES}
            row["pairs"] = contact.candidates(end.positions).n_pairs
            row["rebuilds"] = int(contact.timings["rebuilds"])
    v0 = state.velocities.clone().requires_grad_(True)
    start = time.perf_counter()
    traj = sim.rollout(backward_steps, State(state.positions, v0))
    traj.positions[-1][:, 1].mean().backward()
    seconds = (time.perf_counter() - start) / (backward_steps * substeps)
    row["fwd_bwd"] = min(row["fwd_bwd"], seconds)


def timed_side_by_side(runs: list, steps: int, backward_steps: int, repeat: int) -> list:
    """``(name, row)`` for each ``(name, simulator, state)`` of ``runs``: the fastest of
    ``repeat`` runs each, taken in turns (run 1 of every row, then run 2, ...), so that a
    shared machine's slow minutes fall on all rows alike."""
    rows = [(name, new_row()) for name, _, _ in runs]
    for _ in range(repeat):
        for (_, sim, state), (_, row) in zip(runs, rows, strict=True):
            time_once(sim, state, steps, backward_steps, row)
    return rows


def scene_rows(file: str, warmup: int, steps: int, backward_steps: int, repeat: int) -> list:
    runs = []
    for backend, implementation in CONFIGS:
        scene = load_scene(ROOT / "scenes" / f"{file}.py")
        sim = with_parameters(scene.build(), backend=backend)
        sim.model.contact.implementation = implementation
        with torch.no_grad():
            state = sim.rollout(warmup, scene.initial_state(sim)).state(-1)
        runs.append((f"{backend}/{implementation}", sim, state))
        if backend == "warp":
            # The elastic core alone from the same state (the bodies then pass through each
            # other): the floor the contact substeps are measured against.
            runs.append(("warp, contact off", sim.replace(contact=False), state))
    return timed_side_by_side(runs, steps, backward_steps, repeat), runs[0][1]


def impact_rows(steps: int, repeat: int) -> tuple[list, ds.Simulator, dict]:
    """Two boxes 1 cm apart meeting at 6 m/s (float32, no gravity), timed from 1 ms before
    they meet over ``steps`` steps, forward and forward+backward alike; the Warp run's fused
    contact counts over the timed runs."""
    runs = []
    for backend, implementation in CONFIGS:
        boxes = [
            ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=3, origin=(x, y, z))
            for x, y, z in ((-0.11, 0.0, 0.0), (0.01, 0.03, 0.02))
        ]
        mesh = ds.TetMesh.merge(boxes)
        material = ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.3, density=1000.0)
        sim = ds.Simulator(
            mesh, material, dt=1e-3, substeps=4, gravity=(0.0, 0.0, 0.0), ground=None,
            backend=backend,
        )  # fmt: skip
        sim.model.contact.implementation = implementation
        v = torch.zeros((mesh.n_vertices, 3))
        v[:, 0] = torch.where(torch.as_tensor(mesh.body_ids == 0), 3.0, -3.0)
        with torch.no_grad():
            state = sim.rollout(1, sim.initial_state(velocities=v)).state(-1)
        runs.append((f"{backend}/{implementation}", sim, state))
    warp = runs[0][1]
    before = dict(warp.backend.fused_contact.counts)
    rows = timed_side_by_side(runs, steps, steps, repeat)
    counts = {k: v - before.get(k, 0) for k, v in warp.backend.fused_contact.counts.items()}
    return rows, warp, counts


def bunny(contact: bool, gap: float) -> ds.Simulator:
    """The reference bunny scene (as benchmarks/bench_fit.py), with or without contact."""
    mesh = ds.TetMesh.load(ASSETS / "bunny.msh").centered().scaled_to(0.3).placed_on(0.0, gap=gap)
    material = ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.4, density=1000.0)
    return ds.Simulator(
        mesh, material, dt=1e-5, substeps=1, ground=0.0, dtype=torch.float32, contact=contact
    )


def bunny_rows(lying: bool, steps: int, backward_steps: int, repeat: int) -> list:
    """Falling from 2 cm (timed from the start), or lying on the ground: dropped from 2 mm
    at 0.5 m/s and timed after 600 substeps, squashed against the ground."""
    runs = []
    for contact in (False, True):
        sim = bunny(contact, gap=0.002 if lying else 0.02)
        v = torch.zeros((sim.mesh.n_vertices, 3))
        v[:, 1] = -0.5 if lying else 0.0
        state = sim.initial_state(velocities=v)
        with torch.no_grad():
            state = sim.rollout(600 if lying else 10, state).state(-1)
        runs.append((f"contact {'on' if contact else 'off'}", sim, state))
    return timed_side_by_side(runs, steps, backward_steps, repeat), runs[-1][1]


def table(title: str, rows: list, reference: str) -> None:
    print(f"\n{title}")
    print(
        f"{'':18s} {'fwd ms':>8s} {'ratio':>7s} {'fwd+bwd ms':>10s} {'ratio':>7s} "
        + " ".join(f"{p:>11s}" for p in PHASES)
        + f" {'pairs':>7s} {'rebuilds':>8s}"
    )
    base = dict(rows)[reference]
    for name, r in rows:
        shares = " ".join(
            f"{100 * r['shares'][p]:10.1f}%" if r["shares"] else f"{'-':>11s}" for p in PHASES
        )
        print(
            f"{name:18s} {1e3 * r['fwd']:8.2f} {r['fwd'] / base['fwd']:6.2f}x "
            f"{1e3 * r['fwd_bwd']:10.2f} {r['fwd_bwd'] / base['fwd_bwd']:6.2f}x "
            f"{shares} {r['pairs']:7d} {r['rebuilds']:8d}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: per scene)")
    parser.add_argument("--backward-steps", type=int, default=10)
    parser.add_argument("--bunny-substeps", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="fewer steps, no bunny on the ground")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per row, the fastest kept (noisy machines)"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[file for _, file, _, _ in SCENES] + ["bunny", "impact"],
        help="these tables only",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name, file, warmup, steps in SCENES:
        if args.only and file not in args.only:
            continue
        steps = args.steps or (steps // 4 if args.quick else steps)
        rows, sim = scene_rows(file, warmup, steps, args.backward_steps, args.repeat)
        table(
            f"{name}: {sim.mesh.n_vertices} vertices, {sim.mesh.n_tets} tets, "
            f"{steps} steps x {sim.model.substeps} substeps after {warmup} warm-up steps, "
            f"dhat {1e3 * sim.model.contact.dhat:.3g} mm (ratio: to the Warp path)",
            rows,
            "warp/warp",
        )
    if not args.only or "bunny" in args.only:
        bunny_tables(args)
    if not args.only or "impact" in args.only:
        steps = 10
        rows, sim, counts = impact_rows(steps, args.repeat)
        table(
            f"impact: two boxes at 6 m/s, {sim.mesh.n_tets} tets, float32, {steps} steps x "
            f"{sim.model.substeps} substeps through it, dhat {1e3 * sim.model.contact.dhat:.3g} "
            f"mm (ratio: to the Warp path)",
            rows,
            "warp/warp",
        )
        print(
            f"  Warp path over its timed runs (forward and forward+backward, {args.repeat} "
            f"each): {counts['fused_substeps']} substeps fused, {counts['general_substeps']} "
            f"on the general path ({counts.get('limited', 0)} of them steps the volume limit "
            f"cut in a differentiable run)"
        )


def bunny_tables(args) -> None:
    """The bunny falling and lying (table 2)."""
    if not (ASSETS / "bunny.msh").is_file():
        print(f"\n{ASSETS / 'bunny.msh'} not found: no bunny rows")
        return
    substeps = args.bunny_substeps // (4 if args.quick else 1)
    for lying in (False,) if args.quick else (False, True):
        rows, sim = bunny_rows(lying, substeps, args.backward_steps, args.repeat)
        where = "lying on the ground" if lying else "falling through the air"
        table(
            f"reference bunny {where}: {sim.mesh.n_tets} tets, float32, {substeps} substeps of "
            f"1e-5 s, dhat {1e3 * sim.model.contact.dhat:.3g} mm (ratio: to contact off)",
            rows,
            "contact off",
        )


if __name__ == "__main__":
    main()
