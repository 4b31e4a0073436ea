"""Every contact scene stays intersection-free at every frame and between frames (checked
with ipctk's exact and continuous collision checks), with no NaN and no inverted tet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffsim.contact.potential import pair_distances
from diffsim.scene import load_scene

ipctk = pytest.importorskip("ipctk")
SCENES = Path(__file__).resolve().parents[1] / "scenes"
# Steps per scene: enough for the bodies to meet and press on each other.
CONTACT_SCENES = {"spheres_collide": 70, "cube_stack": 120, "mat_on_sphere": 80, "torus_chain": 150}


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
    cmesh = ipctk.CollisionMesh.build_from_full_mesh(
        mesh.vertices, mesh.surface_edges, mesh.surface_faces
    )
    for i in range(len(x)):
        v = cmesh.vertices(x[i])
        assert not ipctk.has_intersections(cmesh, v), f"surfaces intersect at frame {i}"
        if i:
            before = cmesh.vertices(x[i - 1])
            assert ipctk.is_step_collision_free(cmesh, before, v), f"surfaces cross in step {i}"
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
    for x in traj.positions[::10]:
        c = contact.candidates(x)
        d_pt, d_ee = pair_distances(x, c)
        pairs = torch.cat([c.point_triangle, c.edge_edge])
        within_mat = (body[pairs] == 1).all(dim=1)
        self_contact += int((within_mat & (torch.cat([d_pt, d_ee]) < contact.dhat**2)).sum())
    assert self_contact > 0, "the mat never touched itself"
