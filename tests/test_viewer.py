"""The viewer's controller driven headless, and its polyscope panel on the EGL backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffsim as ds
from diffsim.apps.scene import load_scene
from diffsim.apps.viewer import SHORTCUTS, SPEEDS, ViewerController, contact_segments

torch.set_num_threads(1)

SCENE = """
import diffsim as ds

def build():
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=2, origin=(0.0, 0.2, 0.0))
    material = ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.3)
    return ds.Simulator(mesh, material, dt=1e-3, fixed=[0], backend="torch")

def initial_state(sim):
    return sim.initial_state(velocities=(0.5, 0.0, 0.0))
"""


@pytest.fixture
def controller(tmp_path):
    path = tmp_path / "scene.py"
    path.write_text(SCENE)
    return ViewerController.for_scene(load_scene(path))


def test_play_tick_pause_and_speed(controller):
    c = controller
    x0 = c.positions().copy()
    c.tick()
    assert c.steps_done == 0  # paused at start
    c.play()
    c.tick()
    assert c.steps_done == 1 and c.time == pytest.approx(1e-3)
    assert not np.allclose(c.positions(), x0)
    c.faster()
    c.faster()
    assert c.speed == SPEEDS[2]
    c.tick()
    assert c.steps_done == 1 + SPEEDS[2]
    c.pause()
    c.tick()
    assert c.steps_done == 1 + SPEEDS[2]
    for _ in range(20):
        c.slower()
    assert c.speed == 1
    c.set_speed(9)
    assert c.speed == 10


def test_single_step_matches_the_simulator(controller):
    c = controller
    c.step()
    with torch.no_grad():
        expected = c.sim.step(c.scene.initial_state(c.sim))
    assert torch.equal(c.state.positions, expected.positions)


def test_reset_returns_to_the_scene_initial_state(controller):
    c = controller
    start = c.positions().copy()
    c.step(5)
    c.reset()
    assert c.steps_done == 0
    assert np.array_equal(c.positions(), start)
    assert float(c.state.velocities[:, 0].mean()) == pytest.approx(0.5)


def test_slider_change_rebuilds_the_simulation(controller):
    c = controller
    old = c.sim
    c.step(3)
    x = c.positions().copy()
    c.set_parameter("youngs_modulus", 3e5)
    assert c.rebuilds == 1 and c.sim is not old
    assert c.sim.material.youngs_modulus == 3e5 and old.material.youngs_modulus == 1e5
    assert np.array_equal(c.positions(), x)  # continues from the current state
    c.set_parameter("dt", 2e-3)
    assert c.sim.model.dt == 2e-3 and c.sim.material.youngs_modulus == 3e5
    c.set_parameter("gravity", 0.0)
    assert float(c.sim.gravity.norm()) == 0.0
    c.set_parameter("damping", 2.0)
    c.set_parameter("poissons_ratio", 0.45)
    assert float(c.sim.damping) == 2.0 and c.sim.material.poissons_ratio == 0.45
    assert c.sim.model.fixed_indices.tolist() == [0]
    assert c.parameters["dt"] == 2e-3 and c.rebuilds == 5
    before = c.sim
    with pytest.raises(ValueError, match="poissons_ratio"):
        c.set_parameter("poissons_ratio", 0.5)
    assert c.sim is before and c.parameters["poissons_ratio"] == 0.45
    with pytest.raises(ValueError, match="unknown parameter"):
        c.set_parameter("colour", 1.0)


def test_fields_and_keyboard_shortcuts(controller):
    c = controller
    assert c.fields() == ["speed", "displacement", "energy_density", "von_mises"]
    assert c.field_values() is None
    assert c.handle_key("c") and c.field == "speed"
    assert np.allclose(c.field_values(), 0.5)  # the thrown initial velocity, before any step
    c.set_field("von_mises")
    assert c.field_label() == "von_mises (Pa)"
    assert c.handle_key("space") and c.playing
    assert c.handle_key("n") and c.steps_done == 1
    assert c.handle_key("]") and c.speed == SPEEDS[1]
    assert c.handle_key("r") and c.steps_done == 0
    assert not c.handle_key("q")
    assert set(SHORTCUTS) == {"space", "n", "r", "]", "[", "c"}
    with pytest.raises(ValueError, match="not available"):
        c.set_field("pressure")
    np.testing.assert_array_equal(c.fixed_indices(), [0])


def test_a_blow_up_pauses_with_a_message(controller):
    c = controller
    # Slider rebuilds choose stable substeps (substeps="auto"; tests/test_real_meshes.py), so
    # force a blow-up: one fixed substep of 10 ms, far above the stable substep at E = 1e8.
    stiff = c.sim.material.replace(youngs_modulus=1e8)
    with pytest.warns(ds.StabilityWarning):
        c.sim = c.sim.replace(dt=1e-2, material=stiff)
    c.play()
    for _ in range(10):
        c.step(20)
    assert c.error is not None and not c.playing
    assert "non-finite" in c.error or "blew up" in c.error
    c.reset()
    assert c.error is None


def test_a_state_the_rollout_refuses_pauses_with_its_message(controller):
    # The rollout's start check refuses a state (here: pushed below the ground, as a user's
    # own state or a slider's new parameters could leave it): the viewer shows why and
    # pauses instead of closing with a traceback.
    c = controller
    x = c.state.positions.clone()
    x[:, 1] -= 1.0
    c.state = ds.State(x, c.state.velocities)
    c.play()
    c.step()
    assert c.error is not None and "below the ground" in c.error and not c.playing
    c.reset()
    assert c.error is None


def make_trajectory() -> tuple[ds.Trajectory, ds.Simulator]:
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=2, origin=(0.0, 0.05, 0.0))
    sim = ds.Simulator(mesh, ds.NeoHookean(), dt=1e-3, backend="torch")
    with torch.no_grad():
        return sim.rollout(12), sim


def test_scrubbing_shows_the_right_frame(tmp_path):
    traj, sim = make_trajectory()
    traj.save(tmp_path / "t.npz")
    loaded = ds.Trajectory.load(tmp_path / "t.npz")
    c = ViewerController.for_trajectory(loaded)
    assert not c.live and c.n_frames == 13
    assert c.fields() == ["speed", "displacement"]  # no material without the scene
    c.set_frame(7)
    assert np.allclose(c.positions(), traj.positions[7].numpy())
    assert c.time == pytest.approx(7e-3)
    c.set_frame(100)
    assert c.frame == 12
    c.set_frame(-5)
    assert c.frame == 0
    c.step()
    assert c.frame == 1
    c.play()
    c.set_speed(5)
    c.tick()
    c.tick()
    assert c.frame == 11
    c.tick()
    assert c.frame == 12  # stops at the end ...
    c.tick()
    assert c.frame == 4  # ... then loops
    c.reset()
    assert c.frame == 0 and np.allclose(c.positions(), traj.positions[0].numpy())
    with pytest.raises(ValueError, match="only when viewing a scene"):
        c.set_parameter("dt", 1e-3)
    with_scene = ViewerController.for_trajectory(loaded, sim)
    assert "von_mises" in with_scene.fields()


def test_contact_segments_show_vertices_touching_the_ground():
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=1, origin=(0.0, 0.05, 0.0))
    sim = ds.Simulator(mesh, ds.NeoHookean(), backend="torch")
    x = sim.initial_state().positions.clone()
    assert contact_segments(sim, x).shape == (0, 2, 3)
    low = x[:, 1] < 0.06
    x[low, 1] = 0.5 * sim.model.ground.dhat
    seg = contact_segments(sim, x)
    assert seg.shape == (int(low.sum()), 2, 3)
    assert np.allclose(seg[:, 1, 1], 0.0) and np.allclose(seg[:, 0, 1], 0.5 * sim.model.ground.dhat)


def test_polyscope_panel_runs_headless(controller):
    from diffsim.apps import render

    try:
        render.init_headless()
    except render.RenderError as exc:
        pytest.skip(f"headless EGL rendering unavailable: {exc}")
    import polyscope as ps

    from diffsim.apps.viewer import PolyscopeViewer

    c = controller
    c.set_field("von_mises")
    viewer = PolyscopeViewer(c, {"position": (0.4, 0.4, 0.6), "target": (0.05, 0.25, 0.05)})
    ps.set_user_callback(viewer.callback)
    try:
        c.play()
        for _ in range(3):
            ps.frame_tick()
        assert c.steps_done == 3
        assert ps.has_point_cloud("fixed vertices")
        assert viewer._shown_field == "von_mises (Pa)"
        viewer._apply("poissons_ratio", 0.7)  # rejected: shown as an error, slider restored
        assert c.error is not None and viewer.pending["poissons_ratio"] == 0.3
        viewer._apply("damping", 1.0)
        assert c.rebuilds == 1 and c.error is None
        c.set_field(None)
        ps.frame_tick()
        assert viewer._shown_field is None
    finally:
        ps.clear_user_callback()
        ps.remove_all_structures()


def test_contact_segments_show_surface_pairs_closer_than_dhat():
    a = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=1, origin=(0.0, 0.0, 0.0))
    b = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=1, origin=(0.15, 0.0, 0.0))
    sim = ds.Simulator(
        ds.TetMesh.merge([a, b]),
        ds.NeoHookean(),
        gravity=(0.0, 0.0, 0.0),
        ground=None,
        contact=True,
        backend="torch",
    )
    x = sim.initial_state().positions.clone()
    assert contact_segments(sim, x).shape == (0, 2, 3)
    dhat = sim.model.contact.dhat
    x[a.n_vertices :, 0] -= 0.05 - 0.5 * dhat  # the gap closes to dhat / 2
    seg = contact_segments(sim, x)
    assert len(seg) > 0
    lengths = np.linalg.norm(seg[:, 0] - seg[:, 1], axis=1)
    assert np.all(lengths < dhat) and np.allclose(lengths.min(), 0.5 * dhat, rtol=1e-3)
