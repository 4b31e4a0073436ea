"""Every scene script runs; the scene loader reports bad scripts clearly; with_parameters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import diffsim as ds
from diffsim.apps.scene import DEFAULT_FPS, DEFAULT_STEPS, SceneError, load_scene, with_parameters

from .helpers import build_scene
from .scene_rollouts import scene_frames

torch.set_num_threads(1)

SCENES = sorted((Path(__file__).resolve().parents[1] / "scenes").glob("*.py"))
TINY = """
import diffsim as ds

def build():
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=2, origin=(0.0, 0.05, 0.0))
    return ds.Simulator(mesh, ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.3),
                        dt=1e-3, backend="torch")
"""


def write(tmp_path: Path, text: str, name: str = "scene.py") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_three_required_scenes_exist():
    names = {p.stem for p in SCENES}
    assert {"cube_drop", "cantilever", "sphere_bounce"} <= names


@pytest.mark.parametrize("path", SCENES, ids=[p.stem for p in SCENES])
def test_scene_runs_a_few_steps(path):
    scene = load_scene(path)
    assert scene.steps >= 1 and scene.fps >= 1
    sim = build_scene(scene)  # skips a scene whose assets are absent
    state = scene.initial_state(sim)
    with torch.no_grad():
        traj = sim.rollout(5, state)
    x = traj.positions
    assert torch.isfinite(x).all() and torch.isfinite(traj.velocities).all()
    if sim.model.ground is not None:
        assert float(x[..., 1].min()) > sim.model.ground.height
    if scene.camera is not None:
        assert set(scene.camera) == {"position", "target"}


def test_cantilever_is_clamped_at_x0_and_sags():
    scene = load_scene(next(p for p in SCENES if p.stem == "cantilever"))
    sim = scene.build()
    fixed = sim.model.fixed_indices.numpy()
    assert np.allclose(sim.mesh.vertices[fixed, 0], 0.0)
    assert len(fixed) == np.isclose(sim.mesh.vertices[:, 0], 0.0).sum()
    with torch.no_grad():
        traj = sim.rollout(60)
    tip = sim.mesh.vertices[:, 0] > sim.mesh.vertices[:, 0].max() - 1e-9
    assert torch.equal(traj.positions[-1, fixed], traj.positions[0, fixed])
    assert float(traj.positions[-1, tip, 1].mean()) < float(traj.positions[0, tip, 1].mean())


def test_sphere_scene_throws_the_ball_sideways():
    scene = load_scene(next(p for p in SCENES if p.stem == "sphere_bounce"))
    sim = scene.build()
    state = scene.initial_state(sim)
    assert float(state.velocities[:, 0].mean()) > 0.5


def test_defaults_and_overrides(tmp_path):
    scene = load_scene(write(tmp_path, TINY))
    assert (scene.steps, scene.fps, scene.camera) == (DEFAULT_STEPS, DEFAULT_FPS, None)
    sim = scene.build(dtype=torch.float64)
    assert sim.dtype == torch.float64 and sim.backend_name == "torch"
    assert scene.name == "scene"


def test_missing_file_and_wrong_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="scene file not found"):
        load_scene(tmp_path / "nope.py")
    with pytest.raises(SceneError, match="Python file"):
        load_scene(write(tmp_path, TINY, "scene.txt"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("x = 1\n", "must define build"),
        ("STEPS = -3\ndef build(): pass\n", "STEPS must be an integer"),
        ("FPS = 2.5\ndef build(): pass\n", "FPS must be an integer"),
        ("CAMERA = {'position': (1, 2)}\ndef build(): pass\n", "CAMERA must be a dict"),
        ("CAMERA = {'position': (1, 2), 'target': (0, 0, 0)}\ndef build(): pass\n", "3 finite"),
        ("import nonexistent_module_xyz\n", r"scene\.py:1: ModuleNotFoundError"),
        ("def build(:\n", r"scene\.py:1: SyntaxError"),
    ],
)
def test_bad_scripts_raise_one_clear_error(tmp_path, text, message):
    with pytest.raises(SceneError, match=message):
        load_scene(write(tmp_path, text))


def test_build_errors_name_the_line(tmp_path):
    scene = load_scene(write(tmp_path, "def build():\n    return 1 / 0\n"))
    with pytest.raises(SceneError, match=r"scene\.py:2: ZeroDivisionError.*in build"):
        scene.build()
    scene = load_scene(write(tmp_path, "def build():\n    return 42\n"))
    with pytest.raises(SceneError, match="must return a diffsim.Simulator, got int"):
        scene.build()


def test_initial_state_must_be_a_state(tmp_path):
    scene = load_scene(write(tmp_path, TINY + "\ndef initial_state(sim):\n    return 3\n"))
    with pytest.raises(SceneError, match="must return a diffsim.State"):
        scene.initial_state(scene.build())


def test_with_parameters_changes_only_what_is_asked():
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=2, origin=(0.0, 0.05, 0.0))
    sim = ds.Simulator(
        mesh,
        ds.NeoHookean(youngs_modulus=1e5, poissons_ratio=0.3, density=500.0),
        dt=1e-3,
        substeps=2,
        fixed=[0, 1],
        damping=0.5,
        friction=0.4,
        backend="torch",
    )
    new = with_parameters(sim, youngs_modulus=2e5, dt=5e-4, gravity=(0.0, -19.62, 0.0))
    assert isinstance(new.material, ds.NeoHookean)
    assert new.material.youngs_modulus == 2e5 and new.material.poissons_ratio == 0.3
    assert new.material.density == 500.0
    assert new.model.dt == 5e-4 and new.model.substeps == 2
    assert new.model.fixed_indices.tolist() == [0, 1]
    assert float(new.damping) == 0.5
    assert new.model.ground.friction == 0.4 and new.model.ground.dhat == sim.model.ground.dhat
    # The ground stiffness follows |g| (the default is proportional to it).
    assert new.model.ground.stiffness == pytest.approx(2 * sim.model.ground.stiffness)
    assert sim.material.youngs_modulus == 1e5 and sim.model.dt == 1e-3  # unchanged
    with pytest.raises(ValueError, match="poissons_ratio"):
        with_parameters(sim, poissons_ratio=0.5)


def test_with_parameters_keeps_mass_scaling_and_the_volume_limit():
    # A real-mesh scene changed to another backend or dtype (--backend, --dtype) kept its
    # substeps but lost its mass scaling, and blew up at the first step.
    mesh = ds.TetMesh.sphere(radius=0.1, resolution=4, center=(0.0, 0.15, 0.0))
    material = ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.4, density=1000.0)
    target = 3.0 * ds.Simulator(mesh, material).stable_dt  # mass is added to reach it
    sim = ds.Simulator(mesh, material, substeps="auto", mass_scaling=target, min_volume_ratio=0.2)
    for new in (
        with_parameters(sim, backend="torch", dtype=torch.float64),
        with_parameters(sim, youngs_modulus=2e5),
    ):
        assert new.mass_scaling is not None and new.model.added_mass is not None
        assert new.mass_scaling.fraction > 0
        assert new.model.volume_limit.min_ratio == 0.2
    same = with_parameters(sim, backend="torch")
    assert torch.equal(same.model.added_mass.double(), sim.model.added_mass.double())
    with torch.no_grad():
        assert torch.isfinite(same.rollout(3).positions).all()


def run_whole(name: str):
    """The simulator and positions of the whole scene (its STEPS) from its initial state,
    rolled out once per session for the tests of scenes (tests/scene_rollouts.py)."""
    scene, sim, positions, velocities = scene_frames(name)
    assert len(positions) == scene.steps + 1
    assert torch.isfinite(positions).all() and torch.isfinite(velocities).all()
    return sim, positions


def test_cube_drop_lands_and_stays_on_the_ground():
    sim, x = run_whole("cube_drop")
    assert float(x[..., 1].min()) > 0.0
    com = x[-1].mean(dim=0)
    assert 0.07 < float(com[1]) < 0.13  # resting: the 0.2 m cube's centre near 0.1 m
    assert float(com[[0, 2]].abs().max()) < 0.05


def test_cantilever_sags_by_a_plausible_amount():
    sim, x = run_whole("cantilever")
    tip = sim.mesh.vertices[:, 0] > sim.mesh.vertices[:, 0].max() - 1e-9
    sag = float(x[0, tip, 1].mean() - x[-1, tip, 1].mean())
    assert 0.01 < sag < 0.25


def test_sphere_bounces_and_rolls_on():
    sim, x = run_whole("sphere_bounce")
    y = x[..., 1]
    assert float(y.min()) > 0.0
    lowest = y.min(dim=1).values
    assert float(lowest.min()) < 1e-3  # it reached the ground ...
    assert float(x[-1, :, 0].mean()) > 0.3  # ... and travelled on
