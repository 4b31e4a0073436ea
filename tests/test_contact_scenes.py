"""Every scene in scenes/ stays intersection-free at every frame and between frames (checked
with ipctk's exact and continuous collision checks), with no NaN and no inverted tet.

Contact is on in every scene (the default): where bodies meet, the barrier must act; a
single body must not pass through itself, and its own contact costs nothing there."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import diffsim as ds
from diffsim.contact.potential import pair_distances
from diffsim.physics.elasticity import volume_ratios
from tests.scene_rollouts import scene_frames

ipctk = pytest.importorskip("ipctk")
SCENES = Path(__file__).resolve().parents[1] / "scenes"
# Steps per scene (dt = 1 ms in all of them): enough for the bodies to meet and press on
# each other, for a dropped body to reach the ground, for the beam to sag.
SCENE_STEPS = {
    "armadillo_drop": 100,  # 3 cm fall: lands at 78 ms
    "ball_at_mat": 40,  # the ball meets the mat at about 15 ms and presses it down
    "bunny_drop": 80,  # 2 cm fall: lands at 64 ms
    "cantilever": 100,
    "cube_drop": 250,  # 20 cm fall: lands at 200 ms
    "cube_stack": 120,
    "mat_on_sphere": 80,
    "sphere_bounce": 280,  # 30 cm fall: lands at 250 ms
    "spheres_collide": 70,
    "stack_knockover": 100,  # the thrown cube hits the column at about 80 ms
    "torus_chain": 150,
}


# The scenes where bodies meet each other (in the others one body falls or sags).
MEETING = {"ball_at_mat", "cube_stack", "mat_on_sphere", "spheres_collide", "stack_knockover",
           "torus_chain"}  # fmt: skip


def test_every_scene_is_checked():
    assert sorted(SCENE_STEPS) == sorted(p.stem for p in SCENES.glob("*.py"))


def assert_intersection_free(mesh: ds.TetMesh, x: np.ndarray) -> None:
    """No surface intersection in any frame of ``x [frames, n, 3]``, none between frames."""
    cmesh = ipctk.CollisionMesh.build_from_full_mesh(
        mesh.vertices, mesh.surface_edges, mesh.surface_faces
    )
    for i in range(len(x)):
        v = cmesh.vertices(x[i])
        assert not ipctk.has_intersections(cmesh, v), f"surfaces intersect at frame {i}"
        if i:
            before = cmesh.vertices(x[i - 1])
            assert ipctk.is_step_collision_free(cmesh, before, v), f"surfaces cross in step {i}"


def run_and_check(name: str, steps: int | None) -> tuple:
    """Checks the first ``steps`` steps (default: the scene's STEPS) of the scene's rollout
    (shared with test_inversion and test_scenes); returns their positions and the simulator."""
    _, sim, positions, velocities = scene_frames(name, steps)
    assert torch.isfinite(positions).all() and torch.isfinite(velocities).all()
    x = positions.double().numpy()
    m = sim.model
    for i, xi in enumerate(positions):
        J = volume_ratios(xi.double(), m.tets, m.dm_inv.double())
        assert float(J.min()) > 0, f"a tet inverted at frame {i} (J = {float(J.min()):.3g})"
    assert_intersection_free(sim.mesh, x)
    contact, ground = m.contact, m.ground
    assert contact is not None  # on by default
    closest = min(contact.min_distance(positions[i]) for i in range(len(x)))
    if name in MEETING:  # the bodies really met: some pair came within the barrier's range
        assert 0 < closest < contact.dhat
    else:  # one body: its own surface never came near itself
        assert closest > contact.dhat
    if ground is not None:
        assert x[..., 1].min() > ground.height
        if name not in MEETING:  # a body dropped on the ground: it got there
            assert x[..., 1].min() < ground.height + ground.dhat
    if name not in MEETING and ground is None:  # the beam: it sags under its weight
        assert float((positions[-1] - positions[0]).norm(dim=1).max()) > 1e-3
    return positions, sim


@pytest.mark.parametrize("name", sorted(SCENE_STEPS))
def test_scene_is_intersection_free(name):
    run_and_check(name, SCENE_STEPS[name])


# The Armadillo, toppled onto a crease of its own surface, crushes that crease: its weight
# presses the crease's sides together deeper than the explicit barrier's stable stiffness
# holds (about 1,100 vertex-steps cut a frame from frame 130, at 0.5-2.5% of dhat, while the
# volume limit holds the tets there; docs/contact.md, Known limits). Not a fast impact:
# contact_speed=1 (51 substeps) still cuts 5,461 in these 160 steps.
CRUSHED = pytest.mark.xfail(
    strict=True, reason="resting contact crushed beyond the explicit barrier (Known limits)"
)


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=CRUSHED) if n == "armadillo_drop" else n for n in sorted(SCENE_STEPS)],
)
def test_no_scene_loses_energy_to_the_step_limit(name):
    # The scenes are what users copy: their impacts are stopped by the barrier, not cut by
    # the continuous collision limit (a cut step loses energy, and the run warns). A scene
    # with impacts faster than the barrier stops at the automatic substep names its speed
    # (contact_speed). The shared rollout covers each scene's impacts (ROLLOUT_STEPS).
    _, sim, _, _ = scene_frames(name, SCENE_STEPS[name])
    assert sim.contact_steps_cut == 0, (
        f"{name}: the step limit cut {sim.contact_steps_cut} vertex-steps"
    )


@pytest.mark.slow
def test_mat_on_sphere_full_run_is_intersection_free_and_folds_onto_itself():
    positions, sim = run_and_check("mat_on_sphere", None)
    contact, body = sim.model.contact, torch.as_tensor(sim.mesh.body_ids)
    self_contact = 0
    for x in positions[::2]:  # a fold can touch for only a few frames
        c = contact.candidates(x)
        d_pt, d_ee = pair_distances(x, c)
        pairs = torch.cat([c.point_triangle, c.edge_edge])
        within_mat = (body[pairs] == 1).all(dim=1)
        self_contact += int((within_mat & (torch.cat([d_pt, d_ee]) < contact.dhat**2)).sum())
    assert self_contact > 0, "the mat never touched itself"


@pytest.mark.parametrize("backend", ["warp", "torch"])
@pytest.mark.parametrize("speed", [6.0, 20.0])
def test_two_cubes_thrown_at_each_other_never_interpenetrate(speed, backend):
    # Each cube moves at `speed` towards the other, up to 10 mm per substep against a 20 mm
    # gap and 19 mm between non-adjacent elements within each cube: the relative step limit
    # must stop the approach while leaving each cube's own (common) motion alone.
    a = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=3, origin=(-0.11, 0.0, 0.0))
    b = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=3, origin=(0.01, 0.03, 0.02))
    mesh = ds.TetMesh.merge([a, b])
    sim = ds.Simulator(
        mesh,
        ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.3, density=1000.0),
        dt=1e-3,
        substeps=2,
        gravity=(0.0, 0.0, 0.0),
        ground=None,
        contact=True,
        backend=backend,
    )
    v0 = torch.zeros((mesh.n_vertices, 3))
    v0[:, 0] = torch.where(torch.as_tensor(mesh.body_ids == 0), speed, -speed)
    with torch.no_grad():
        traj = sim.rollout(30, sim.initial_state(velocities=v0))
    x = traj.positions.double().numpy()
    assert np.isfinite(x).all()
    assert_intersection_free(mesh, x)
    contact = sim.model.contact
    assert min(contact.min_distance(p) for p in traj.positions) < contact.dhat  # they met
    # and came apart again: the cubes' centres move away from each other at the end.
    centre = [traj.positions[:, mesh.body_ids == k].mean(dim=1)[:, 0] for k in (0, 1)]
    assert float((centre[1] - centre[0])[-1] - (centre[1] - centre[0])[-2]) > 0
