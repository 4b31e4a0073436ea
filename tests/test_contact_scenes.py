"""Every contact scene stays intersection-free at every frame and between frames (checked
with ipctk's exact and continuous collision checks), with no NaN and no inverted tet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import diffsim as ds
from diffsim.apps.scene import load_scene
from diffsim.contact.potential import pair_distances

ipctk = pytest.importorskip("ipctk")
SCENES = Path(__file__).resolve().parents[1] / "scenes"
# Steps per scene: enough for the bodies to meet and press on each other.
CONTACT_SCENES = {"spheres_collide": 70, "cube_stack": 120, "mat_on_sphere": 80, "torus_chain": 150}


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
    scene = load_scene(SCENES / f"{name}.py")
    sim = scene.build()
    contact = sim.model.contact
    assert contact is not None
    steps = scene.steps if steps is None else steps
    with torch.no_grad():
        traj = sim.rollout(steps, scene.initial_state(sim))
    x = traj.positions.double().numpy()
    assert np.isfinite(x).all() and torch.isfinite(traj.velocities).all()
    mesh = sim.mesh
    corners = x[:, mesh.tets]
    edges = corners[:, :, 1:] - corners[:, :, :1]
    assert (np.linalg.det(edges) > 0).all(), "a tet inverted"
    assert_intersection_free(mesh, x)
    # The bodies really met: some pair came within the barrier's range.
    closest = min(contact.min_distance(traj.positions[i]) for i in range(len(x)))
    assert 0 < closest < contact.dhat
    if sim.model.ground is not None:
        assert x[..., 1].min() > sim.model.ground.height
    return traj, sim


@pytest.mark.parametrize("name", sorted(CONTACT_SCENES))
def test_contact_scene_is_intersection_free(name):
    run_and_check(name, CONTACT_SCENES[name])


@pytest.mark.slow
def test_mat_on_sphere_full_run_is_intersection_free_and_folds_onto_itself():
    traj, sim = run_and_check("mat_on_sphere", None)
    contact, body = sim.model.contact, torch.as_tensor(sim.mesh.body_ids)
    self_contact = 0
    for x in traj.positions[::2]:  # a fold can touch for only a few frames
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
