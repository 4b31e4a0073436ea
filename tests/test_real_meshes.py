"""Real meshes at a practical time step (issue 13's done-when checks), the scenes on real
meshes, ``diffsim info MESH``, the run summary's time-step lines and the viewer's rebuild.

The meshes are read from ../shared/assets; a test that needs one skips where it is absent.
Every test here stays under about 10 s on two cores (measured times in the comments, on a
shared 2-core machine with one torch thread); the full 1 s bunny drop is measured by
benchmarks/bench_time_steps.py instead.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

import diffsim as ds  # noqa: E402
from diffsim.apps import cli  # noqa: E402
from diffsim.apps.scene import load_scene  # noqa: E402
from diffsim.apps.viewer import ViewerController  # noqa: E402

from .helpers import asset  # noqa: E402
from .scene_rollouts import scene_frames  # noqa: E402

torch.set_num_threads(1)

G = 9.81
RUBBER = dict(youngs_modulus=1e5, poissons_ratio=0.4, density=1000.0)
BUNNY_SCENE = ROOT / "scenes" / "bunny_drop.py"
ARMADILLO_SCENE = ROOT / "scenes" / "armadillo_drop.py"


def reference(name: str) -> ds.TetMesh:
    """An asset centred and scaled to 0.3 m tall, its lowest vertex 2 cm above y = 0."""
    return ds.TetMesh.load(asset(name)).centered().scaled_to(0.3).placed_on(0.0, gap=0.02)


def centre_of_mass(sim: ds.Simulator, traj: ds.Trajectory, frame: int):
    """Mass-weighted mean position and velocity ``([3], [3])`` at a frame (added mass too)."""
    mass = torch.as_tensor(sim.mesh.lumped_masses(sim.material.density))
    if sim.mass_scaling is not None:
        mass = mass + torch.as_tensor(sim.mass_scaling.added_mass)
    w = (mass / mass.sum())[:, None]
    x = (w * traj.positions[frame].double()).sum(0)
    v = (w * traj.velocities[frame].double()).sum(0)
    return x, v


def scene_sim(path: Path, **parameters) -> ds.Simulator:
    """A real-mesh scene's simulator (skips where its mesh, the scene's MESH, is absent)."""
    scene = load_scene(path)
    asset(scene.module.MESH)
    return scene.build(parameters=parameters)


# ----------------------------------------------------------------- done-when checks
@pytest.mark.parametrize("name", ["Armadillo13K.msh", "32770_octocat.msh", "hollowCat7.5K.msh"])
def test_large_real_meshes_run_with_auto_substeps_and_fall_at_g(name):
    # Measured: Armadillo 83 substeps per 1 ms step, octocat 136, hollowCat 89; 3 steps take
    # 2-4 s each (4.6M, 2.9M, 5.1M tet-substeps per step).
    mesh = reference(name)
    sim = ds.Simulator(mesh, ds.StableNeoHookean(**RUBBER), dt=1e-3, substeps="auto")
    assert sim.model.dt / sim.model.substeps <= sim.stable_dt
    assert sim.model.substeps == sim.stable_step.substeps(1e-3) > 50
    with torch.no_grad():
        traj = sim.rollout(3)
    assert torch.isfinite(traj.positions).all() and torch.isfinite(traj.velocities).all()
    x, v = centre_of_mass(sim, traj, -1)
    assert float(v[1]) == pytest.approx(-G * 3e-3, rel=1e-3)
    x0, _ = centre_of_mass(sim, traj, 0)
    drop = float(x0[1] - x[1])
    assert drop == pytest.approx(0.5 * G * 3e-3**2, rel=0.02)  # + h/t from symplectic Euler
    # no blow-up: every vertex moves with the body (speeds near g t)
    assert float(traj.velocities[-1].norm(dim=1).max()) < 2 * G * 3e-3


def test_bunny_reference_scene_falls_at_g_with_auto_substeps_in_float32():
    # Measured: 146 substeps per step (stable substep 6.86e-6 s), 20 steps in 5 s; the
    # centre of mass falls at g to 1e-6 relative (damping off: it would slow the fall).
    sim = scene_sim(BUNNY_SCENE, damping=0.0, mass_scaling=None)
    assert sim.dtype == torch.float32 and sim.model.substeps == 146
    assert sim.added_mass == 0.0
    with torch.no_grad():
        traj = sim.rollout(20)  # 20 ms; the bunny falls 2 cm in 64 ms
    for frame in (5, 10, 20):
        _, v = centre_of_mass(sim, traj, frame)
        assert float(v[1]) == pytest.approx(-G * frame * 1e-3, rel=0.01)
        assert abs(float(v[0])) < 1e-6 and abs(float(v[2])) < 1e-6


def test_bunny_with_mass_scaling_drops_lands_and_does_not_blow_up():
    # Measured: 10 substeps per step with 0.0347 kg (0.64%) added; 120 steps in 2.5 s. It
    # lands at 64 ms (centre of mass down 3.2 cm at 90 ms), rebounds at 0.35 m/s; the fastest
    # vertex peaks at 2.9 m/s (the ears). The full 1 s: benchmarks/bench_time_steps.py.
    # The scene's rollout from rest (it has no initial_state), shared with the tests of
    # scenes (tests/scene_rollouts.py): its first 120 steps.
    _, sim, positions, velocities = scene_frames(BUNNY_SCENE.stem, 120)  # skips without it
    traj = SimpleNamespace(positions=positions, velocities=velocities)
    assert sim.model.substeps == 10 and sim.stable_dt == pytest.approx(1e-4)
    assert sim.added_mass == pytest.approx(0.0347, rel=0.02)
    assert sim.mass_scaling.fraction < 0.01
    assert len(positions) == 121 and not velocities[0].any()  # 120 steps from rest
    assert torch.equal(positions[0], sim.initial_state().positions)
    assert torch.isfinite(traj.positions).all()
    y = traj.positions[..., 1]
    assert float(y.min()) > 0.0  # never through the ground
    _, v = centre_of_mass(sim, traj, 20)
    assert float(v[1]) == pytest.approx(-G * 0.02, rel=0.02)  # falls at g (damping 1/s)
    landed = int(torch.nonzero(y.min(dim=1).values < sim.model.ground.dhat)[0])
    assert 55 <= landed <= 75  # sqrt(2 * 0.02 m / g) = 64 ms
    x0, _ = centre_of_mass(sim, traj, 0)
    x, v = centre_of_mass(sim, traj, -1)
    assert 0.02 < float(x0[1] - x[1]) < 0.06  # down by the gap, plus some squash
    assert float(v[1]) > -0.2  # stopped falling (it left at -0.62 m/s)
    assert float(traj.velocities.norm(dim=2).max()) < 5.0


# ----------------------------------------------------------------- scenes on real meshes
@pytest.mark.parametrize("path", [BUNNY_SCENE, ARMADILLO_SCENE], ids=lambda p: p.stem)
def test_real_mesh_scenes_run_a_few_steps(path):
    # Measured: bunny 10 substeps (0.62% added), 5 steps 0.2 s; Armadillo 20 substeps (0.097%
    # added at 5e-5 s), 5 steps 0.8 s.
    sim = scene_sim(path)
    scene = load_scene(path)
    assert scene.steps >= 800 and scene.camera is not None
    assert sim.model.substeps <= 20 and 0 < sim.mass_scaling.fraction < 0.01
    assert sim.model.dt / sim.model.substeps <= sim.stable_dt * (1 + 1e-9)
    with torch.no_grad():
        traj = sim.rollout(5, scene.initial_state(sim))
    assert torch.isfinite(traj.positions).all()
    assert float(traj.positions[..., 1].min()) > 0.0
    assert float(traj.velocities[-1, :, 1].mean()) == pytest.approx(-G * 5e-3, rel=0.02)


def test_a_scene_without_the_assets_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    # The scene copied where no ../shared/assets is beside it, and no DIFFSIM_ASSETS.
    monkeypatch.delenv("DIFFSIM_ASSETS", raising=False)
    copy = tmp_path / "a" / "scenes" / "bunny_drop.py"
    copy.parent.mkdir(parents=True)
    shutil.copy(BUNNY_SCENE, copy)
    assert cli.main(["run", str(copy), "--steps", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert "needs ../shared/assets/bunny.msh" in err[0] and "DIFFSIM_ASSETS" in err[0]


def test_a_scene_finds_its_mesh_through_diffsim_assets(tmp_path, monkeypatch):
    source = asset("bunny.msh")
    (tmp_path / "meshes").mkdir()
    shutil.copy(source, tmp_path / "meshes" / "bunny.msh")
    copy = tmp_path / "a" / "scenes" / "bunny_drop.py"
    copy.parent.mkdir(parents=True)
    shutil.copy(BUNNY_SCENE, copy)
    monkeypatch.setenv("DIFFSIM_ASSETS", str(tmp_path / "meshes"))
    assert load_scene(copy).build().mesh.n_tets == 19379


def test_bunny_scene_rendered_by_diffsim_run(tmp_path, capsys):
    # Measured: 3 steps and one 64x48 PNG in about 3 s (with EGL start-up).
    from diffsim.apps import render

    asset("bunny.msh")
    try:
        render.init_headless()
    except render.RenderError as exc:
        pytest.skip(f"headless EGL rendering unavailable: {exc}")
    import imageio.v3 as iio

    out = tmp_path / "bunny.png"
    args = ["run", str(BUNNY_SCENE), "--steps", "3", "--out", str(out), "--size", "64x48"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "10 substeps of 0.0001 s per step" in text and "added mass 0.0347 kg" in text
    image = iio.imread(out)
    assert image.shape == (48, 64, 3) and image.std() > 5


# ----------------------------------------------------------------- diffsim run's summary
TINY = """
import diffsim as ds

STEPS = 2

def build():
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=2, origin=(0.0, 0.05, 0.0))
    material = ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.4)
    return ds.Simulator(mesh, material, dt=1e-3, substeps={substeps!r}, mass_scaling={ms!r},
                        backend="torch")
"""


def test_run_summary_names_substeps_stable_substep_and_added_mass(tmp_path, capsys):
    path = tmp_path / "tiny.py"
    path.write_text(TINY.format(substeps=3, ms=None))
    assert cli.main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    sim = load_scene(path).build()
    assert (
        f"3 substeps of 0.000333 s per step; estimated stable substep {sim.stable_dt:.3g} s" in out
    )
    assert "added mass 0 kg (no mass scaling)" in out
    path.write_text(TINY.format(substeps="auto", ms=2e-3))
    assert cli.main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    sim = load_scene(path).build()
    assert sim.added_mass > 0 and sim.model.substeps == 1
    assert "1 substep of 0.001 s per step; estimated stable substep 0.002 s" in out
    assert f"added mass {sim.added_mass:.3g} kg (" in out and "by mass_scaling=0.002 s" in out


# ----------------------------------------------------------------- diffsim info MESH
def test_info_mesh_prints_quality_stable_step_substeps_and_mass_scaling(tmp_path, capsys):
    mesh = ds.TetMesh.box(size=(0.3, 0.3, 0.3), resolution=6)
    mesh.save(tmp_path / "box.npz")
    assert cli.main(["info", str(tmp_path / "box.npz")]) == 0
    out = capsys.readouterr().out
    from diffsim.physics.stable_step import stable_step

    est = stable_step(mesh.vertices, mesh.tets, 1e5, 0.4, 1000.0)
    assert "box.npz: 343 vertices, 1296 tets, 1 body, 0.3 x 0.3 x 0.3 m" in out
    assert "smallest altitude" in out and "slivers (ratio > 10)  0" in out
    assert "dilatational wave speed 14.6 m/s" in out
    assert f"stable substep {est.dt:.3g} s" in out
    assert "at dt = 0.001 s  1 substep of 0.001 s" in out
    assert "to a 0.0001 s substep" in out  # already stable: nothing added
    assert "0 kg added" in out
    args = ["info", str(tmp_path / "box.npz"), "--poissons-ratio", "0.49", "--dt", "1e-2"]
    assert cli.main([*args, "--youngs-modulus", "1e6", "--density", "500"]) == 0
    out = capsys.readouterr().out
    est = stable_step(mesh.vertices, mesh.tets, 1e6, 0.49, 500.0)
    assert f"at dt = 0.01 s  {est.substeps(1e-2)} substeps" in out


def test_info_on_the_bunny_shows_its_sliver_and_the_mass_scaling_cost(capsys):
    path = asset("bunny.msh")
    assert cli.main(["info", str(path), "--scale", "0.0968"]) == 0
    out = capsys.readouterr().out
    assert "19379 tets" in out and "tet 13734" in out and "slivers (ratio > 10)  619" in out
    assert "147 substeps" in out  # 6.8e-6 s at this scale
    assert "0.64% of" in out and "10 substeps at dt = 0.001 s" in out


def test_info_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["info", "--dt", "1e-3"]) == 2
    assert "apply to a mesh: diffsim info MESH --dt" in capsys.readouterr().err
    assert cli.main(["info", str(tmp_path / "x.msh")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli.main(["info", str(tmp_path / "x.txt")]) == 2
    assert "expected a mesh file" in capsys.readouterr().err
    ds.TetMesh.box(resolution=1).save(tmp_path / "b.npz")
    assert cli.main(["info", str(tmp_path / "b.npz"), "--poissons-ratio", "0.5"]) == 2
    assert "--poissons-ratio must be in (-1, 0.5)" in capsys.readouterr().err


# ----------------------------------------------------------------- the viewer's rebuild
SLIDER_SCENE = """
import diffsim as ds

def build():
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=2, origin=(0.0, 0.02, 0.0))
    material = ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.3)
    return ds.Simulator(mesh, material, dt=1e-3, ground=0.0, backend="torch")
"""


def test_viewer_slider_nu_049_at_1ms_gets_stable_substeps_and_does_not_blow_up(tmp_path):
    path = tmp_path / "scene.py"
    path.write_text(SLIDER_SCENE)
    c = ViewerController.for_scene(load_scene(path))
    assert c.sim.model.substeps == 1
    # One substep of 1 ms is 2.3 x this mesh's stable substep at nu = 0.49 (measured: the
    # old rebuild kept 1 substep and raised SimulationError at step 16).
    c.set_parameter("poissons_ratio", 0.49)
    sim = c.sim
    assert sim.model.substeps == sim.stable_step.substeps(1e-3) > 1
    assert sim.model.dt / sim.model.substeps <= sim.stable_dt
    c.step(60)
    assert c.error is None
    assert np.isfinite(c.positions()).all() and c.positions()[:, 1].min() > 0.0
    # A larger dt keeps the rule; a smaller one never gets a coarser substep than the scene's.
    c.set_parameter("dt", 1e-2)
    assert c.sim.model.substeps == max(c.sim.stable_step.substeps(1e-2), 10)
    c.step(3)
    assert c.error is None


def test_viewer_rebuild_keeps_the_scenes_mass_scaling():
    asset("bunny.msh")
    c = ViewerController.for_scene(load_scene(BUNNY_SCENE))
    before = c.sim.added_mass
    c.set_parameter("damping", 2.0)
    assert c.sim.settings["mass_scaling"] == 1e-4 and c.sim.added_mass == pytest.approx(before)
    assert c.sim.model.substeps == 10
    c.set_parameter("poissons_ratio", 0.49)  # stiffer: more mass to reach 1e-4 s, same steps
    assert c.sim.model.substeps == 10 and c.sim.added_mass > before
    c.step(3)
    assert c.error is None and np.isfinite(c.positions()).all()
