"""A contact simulation starts intersection-free: overlapping bodies and self-intersecting
meshes are refused at set-up with a clear error (diffsim.contact.intersections), checked
against the IPC Toolkit's intersection test."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffsim as ds
from diffsim.contact.candidates import SurfacePrimitives
from diffsim.contact.intersections import surface_crossings
from tests.helpers import ASSETS, asset

ipctk = pytest.importorskip("ipctk")
MATERIAL = ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.3, density=1000.0)


def crossings(mesh: ds.TetMesh) -> int:
    surface = SurfacePrimitives.from_mesh(mesh)
    return surface_crossings(surface, torch.as_tensor(mesh.vertices))[0]


def ipctk_intersects(mesh: ds.TetMesh) -> bool:
    v = np.asarray(mesh.vertices, dtype=np.float64)
    cmesh = ipctk.CollisionMesh.build_from_full_mesh(v, mesh.surface_edges, mesh.surface_faces)
    return bool(ipctk.has_intersections(cmesh, cmesh.vertices(v)))


@pytest.mark.parametrize("name", sorted(p.name for p in ASSETS.glob("*.msh")) or ["torus.msh"])
def test_the_real_meshes_do_not_intersect_themselves(name):
    mesh = ds.TetMesh.load(asset(name))
    assert crossings(mesh) == 0
    assert not ipctk_intersects(mesh)


def test_crossings_agree_with_the_ipc_toolkit_on_overlapping_and_separate_bodies():
    """Two tori (../shared/assets/torus.msh), the second turned and moved by random amounts:
    overlapping, linked, close and apart; the check finds crossings exactly where ipctk
    finds intersections."""
    torus = ds.TetMesh.load(asset("torus.msh")).centered().scaled_to(0.1)
    generator = np.random.default_rng(7)
    outcomes = []
    for _ in range(24):
        axis = generator.normal(size=3)
        angle = generator.uniform(0, np.pi)
        k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        k /= np.linalg.norm(axis)
        rotation = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
        shift = generator.uniform(-0.06, 0.06, size=3)
        mesh = ds.TetMesh.merge([torus, torus.transformed(rotation=rotation, translation=shift)])
        found, expected = crossings(mesh) > 0, ipctk_intersects(mesh)
        assert found == expected, (rotation, shift)
        outcomes.append(found)
    print(f"{sum(outcomes)} of {len(outcomes)} overlap")
    assert 4 <= sum(outcomes) <= 20  # both cases were tested


def test_overlapping_bodies_are_refused_with_the_crossing_and_the_fix():
    torus = ds.TetMesh.load(asset("torus.msh")).centered().scaled_to(0.1)
    mesh = ds.TetMesh.merge([torus, torus.transformed(translation=(0.02, 0.011, 0.01))])
    with pytest.raises(ValueError, match="bodies 0 and 1 overlap") as info:
        ds.Simulator(mesh, MATERIAL, ground=None)
    message = str(info.value)
    print(message)
    assert "passes through triangle" in message and "contact=False" in message
    assert "move them apart" in message
    ds.Simulator(
        mesh, MATERIAL, ground=None, contact=False
    )  # without contact it is the user's choice


def test_a_mesh_whose_surface_passes_through_itself_is_refused():
    """A bar wound one and a half times around a circle: no tet is inverted, but its two
    ends occupy the same place."""
    bar = ds.TetMesh.box(size=(1.0, 0.1, 0.1), resolution=(40, 2, 2))
    x = bar.vertices
    angle = 1.5 * 2 * np.pi * x[:, 0]
    radius = 0.4 - x[:, 1]  # (inward with y: the tets keep their orientation)
    wound = np.stack([radius * np.cos(angle), radius * np.sin(angle), x[:, 2]], axis=1)
    mesh = ds.TetMesh(wound, bar.tets)
    assert ipctk_intersects(mesh)
    with pytest.raises(ValueError, match="the surface of body 0 passes through itself"):
        ds.Simulator(mesh, MATERIAL, ground=None)


@pytest.mark.parametrize("worlds", [None, 2])
def test_initial_positions_that_overlap_are_refused(worlds):
    """The rest shape is apart; the initial positions move one torus into the other."""
    torus = ds.TetMesh.load(asset("torus.msh")).centered().scaled_to(0.1)
    mesh = ds.TetMesh.merge([torus, torus.transformed(translation=(0.2, 0.0, 0.0))])
    sim = ds.Simulator(mesh, MATERIAL, ground=None, worlds=worlds)
    moved = torch.as_tensor(mesh.vertices).clone()
    moved[torch.as_tensor(mesh.body_ids == 1), 0] -= 0.18
    if worlds is None:
        with pytest.raises(ValueError, match="intersect in the initial positions: bodies 0"):
            sim.initial_state(positions=moved)
    else:
        both = torch.stack([torch.as_tensor(mesh.vertices), moved])
        with pytest.raises(ValueError, match="initial positions of world 1: bodies 0 and 1"):
            sim.initial_state(positions=both)
    sim.initial_state(positions=torch.as_tensor(mesh.vertices) + 0.01)  # apart: accepted
