"""Real meshes at a practical time step: stable substeps, mass scaling, wall time, meshers.

Prints two tables (docs/time-steps.md holds their output):

1. For the bunny and the Armadillo (../shared/assets, centred, 0.3 m tall, Stable
   Neo-Hookean E = 1e5 Pa, nu = 0.4, 1000 kg/m^3, dt = 1 ms, substeps="auto", the Warp
   backend in float32): the stable substep, the substeps per step, the mass added by mass
   scaling and the wall time per simulated second, without mass scaling and with it at
   5e-5 s and 1e-4 s. The wall time is measured over ``--sim-ms`` of simulated time (after
   one warm-up step) and scaled to 1 s.
2. The tetrahedralizers of ``TetMesh.from_surface`` on the boundary surfaces of the torus
   and the bunny (and the asset's own tet mesh for reference): time, tet count, smallest
   altitude, slivers, stable substep and substeps per 1 ms.

``--full`` also runs scenes/bunny_drop.py for its whole simulated second.
Usage: ``python benchmarks/bench_time_steps.py [--sim-ms 10] [--full] [--no-tetwild]``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

import torch

import diffsim as ds
from diffsim.physics.stable_step import stable_step

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
RUBBER = dict(youngs_modulus=1e5, poissons_ratio=0.4, density=1000.0)
DT = 1e-3
SIM_MESHES = ("bunny.msh", "Armadillo13K.msh")
TARGETS = (None, 5e-5, 1e-4)
SURFACES = ("torus.msh", "bunny.msh")
# (label, method, resolution) rows of the tetrahedralizer table.
MESHERS = (
    ("voxel, resolution 16", "voxel", 16),
    ("voxel, resolution 32", "voxel", 32),
    ("tetwild, resolution 16", "tetwild", 16),
    ("tetgen, resolution 16", "tetgen", 16),
)


def reference(name: str) -> ds.TetMesh:
    return ds.TetMesh.load(ASSETS / name).centered().scaled_to(0.3).placed_on(0.0, gap=0.02)


def simulate_row(name: str, target: float | None, sim_ms: float) -> str:
    sim = ds.Simulator(
        reference(name), ds.StableNeoHookean(**RUBBER), dt=DT, substeps="auto",
        mass_scaling=target, ground=0.0,
    )  # fmt: skip
    steps = max(1, round(sim_ms * 1e-3 / DT))
    with torch.no_grad():
        state = sim.rollout(1).state(-1)  # warm-up: kernel loading
        start = time.perf_counter()
        traj = sim.rollout(steps, state)
        elapsed = time.perf_counter() - start
    assert torch.isfinite(traj.positions).all(), f"{name} blew up"
    per_second = elapsed / (steps * DT)
    rate = sim.mesh.n_tets * sim.model.substeps * steps / elapsed
    added = "none" if target is None else f"{target:g} s"
    scaling = sim.mass_scaling
    mass = (
        "-" if scaling is None else f"{scaling.total_added:.3g} kg ({100 * scaling.fraction:.2g}%)"
    )
    return (
        f"| {name.removesuffix('.msh')} | {added} | {sim.stable_dt:.3g} s | {sim.model.substeps} | "
        f"{mass} | {per_second:.0f} s | {rate / 1e6:.1f} M |"
    )


def surface(name: str):
    import trimesh

    mesh = reference(name)
    return mesh, trimesh.Trimesh(mesh.vertices, mesh.surface_faces, process=True)


def mesher_row(name: str, label: str, mesh: ds.TetMesh, seconds: float | None) -> str:
    quality = mesh.quality()
    est = stable_step(mesh.vertices, mesh.tets, **RUBBER)
    took = "-" if seconds is None else f"{seconds:.2f} s"
    return (
        f"| {name.removesuffix('.msh')} | {label} | {took} | {mesh.n_tets:,} | "
        f"{quality.min_altitude * 1e3:.3g} mm | {len(quality.slivers):,} | {est.dt:.3g} s | "
        f"{est.substeps(DT)} |"
    )


def available(method: str) -> str | None:
    """None if the method's package imports, else why not."""
    package = {"tetwild": "pytetwild", "tetgen": "tetgen"}.get(method)
    if package is None:
        return None
    try:
        importlib.import_module(package)
    except ImportError as exc:
        return str(exc)
    return None


def full_second() -> None:
    from diffsim.apps.scene import load_scene

    scene = load_scene(ROOT / "scenes" / "bunny_drop.py")
    sim = scene.build()
    with torch.no_grad():
        start = time.perf_counter()
        traj = sim.rollout(scene.steps)
        elapsed = time.perf_counter() - start
    y = traj.positions[..., 1]
    v = traj.velocities[-1].norm(dim=1)
    print(
        f"\nscenes/bunny_drop.py, {scene.steps} steps ({scene.steps * DT:g} s simulated, "
        f"{sim.model.substeps} substeps, +{100 * sim.mass_scaling.fraction:.2g}% mass): "
        f"{elapsed:.1f} s wall; finite {bool(torch.isfinite(traj.positions).all())}, lowest "
        f"vertex {float(y.min()):.2g} m, at the end mean speed {float(v.mean()):.3f} m/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sim-ms", type=float, default=10.0, help="simulated ms timed per row")
    parser.add_argument("--full", action="store_true", help="also run the bunny scene for 1 s")
    parser.add_argument("--no-tetwild", action="store_true", help="skip fTetWild (slow)")
    args = parser.parse_args()
    if not ASSETS.is_dir():
        sys.exit(f"{ASSETS} not found: the benchmark meshes live in ../shared/assets")
    torch.set_num_threads(1)
    print(f"{os.cpu_count()} cores; dt = {DT:g} s, substeps='auto', Warp, float32")
    print("\n| mesh | mass scaling | stable substep | substeps | added mass | wall per "
          "simulated s | tet-substeps/s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name in SIM_MESHES:
        for target in TARGETS:
            print(simulate_row(name, target, args.sim_ms), flush=True)
    print("\n| surface of | method | time | tets | smallest altitude | slivers | stable substep "
          "| substeps per 1 ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name in SURFACES:
        original, surf = surface(name)
        print(mesher_row(name, "the asset's own tet mesh", original, None), flush=True)
        for label, method, resolution in MESHERS:
            why = available(method)
            if method == "tetwild" and args.no_tetwild:
                why = "skipped (--no-tetwild)"
            if why is not None:
                print(f"| {name.removesuffix('.msh')} | {label} | {why} | | | | | |")
                continue
            start = time.perf_counter()
            mesh = ds.TetMesh.from_surface(surf, resolution=resolution, method=method)
            print(mesher_row(name, label, mesh, time.perf_counter() - start), flush=True)
    if args.full:
        full_second()


if __name__ == "__main__":
    main()
