"""Every scene in scenes/ run to its end: wall time and what the tests' shorter windows miss.

The tests run each scene for as many steps as its mechanism needs to act (tests/
scene_rollouts.py); this script runs each for its whole ``STEPS`` (the Armadillo: 800
steps, several minutes) and prints, per scene: tets, substeps, steps, wall time per frame,
the frames with inverted tets (from the simulator's own count, ``sim.inversions``), the
most at once and the lowest J, the steps the volume limit cut where a scene sets one,
whether every position stayed finite, and the lowest
height where the scene has a ground. Usage: ``python benchmarks/check_scenes.py
[--only armadillo_drop bunny_drop]``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

from diffsim.apps.scene import SceneError, load_scene

SCENES = Path(__file__).resolve().parents[1] / "scenes"


def check(path: Path) -> str:
    """One scene's line."""
    scene = load_scene(path)
    try:
        sim = scene.build()
    except SceneError as exc:
        return f"{path.stem}: not built ({exc})"
    start = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traj = sim.rollout(scene.steps, scene.initial_state(sim))
    seconds = time.perf_counter() - start
    record = sim.inversions
    counts = record.counts.reshape(len(record.counts), -1).sum(dim=1)
    frames = torch.nonzero(counts).flatten()
    inverted = "none"
    if len(frames):
        inverted = (
            f"{len(frames)} frames from {int(frames[0]) + 1}, up to {int(counts.max())} tets, "
            f"lowest J {record.min_volume_ratio:.3g}"
        )
    finite = bool(torch.isfinite(traj.positions).all())
    ground, low = sim.model.ground, ""
    if ground is not None:
        low = f", lowest y - ground {float(traj.positions[..., 1].min()) - ground.height:.2e} m"
    limited = ""
    if sim.model.contact is not None:
        limited = f"; step limit cut {sim.contact_steps_cut} vertex-steps"
    if sim.model.volume_limit is not None:
        counts = sim.model.volume_limit.counts
        limited += (
            f"; volume limit cut {counts['limited_vertex_steps']} vertex-steps in "
            f"{counts['limited_substeps']} substeps"
        )
    kinds = sorted({type(w.message).__name__ for w in caught})
    return (
        f"{path.stem}: {sim.mesh.n_tets} tets, {sim.model.substeps} substeps, {scene.steps} steps, "
        f"{1e3 * seconds / scene.steps:.2f} ms/frame; inverted: {inverted}{limited}; "
        f"finite: {finite}{low}; warnings: {', '.join(kinds) or 'none'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", help="these scenes (file stems) only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for path in sorted(SCENES.glob("*.py")):
        if args.only and path.stem not in args.only:
            continue
        print(check(path), flush=True)


if __name__ == "__main__":
    main()
