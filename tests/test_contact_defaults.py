"""Contact that can be on by default: free flight keeps its speed, rest stays at rest, the
default dhat fits the geometry, and surface friction does not depend on orientation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import diffsim as ds
from diffsim.contact import ContactWarning, SurfaceContact
from diffsim.contact.rest_gaps import REST_GAP_FRACTION
from tests.helpers import asset

F64 = torch.float64


def cube(size: float = 0.1, resolution: int = 3) -> ds.TetMesh:
    return ds.TetMesh.box(size=(size, size, size), resolution=resolution)


# ----------------------------------------------------------------- free flight
@pytest.mark.parametrize("backend", ["warp", "torch"])
@pytest.mark.parametrize("speed", [30.0, 40.0])
def test_a_cube_flying_freely_keeps_its_speed(speed, backend):
    # 0.4 ms substeps: the cube moves 12-16 mm per substep, close to the 19 mm between its
    # nearest non-adjacent surface elements; only their relative motion (zero) may count.
    mesh = cube()
    sim = ds.Simulator(
        mesh,
        ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.3, density=1000.0),
        dt=4e-4,
        gravity=(0.0, 0.0, 0.0),
        ground=None,
        contact=True,
        backend=backend,
    )
    v0 = torch.zeros((mesh.n_vertices, 3))
    v0[:, 0] = speed
    with torch.no_grad():
        traj = sim.rollout(100, sim.initial_state(velocities=v0))
    v = traj.velocities.double()
    deviation = (v - torch.tensor([speed, 0.0, 0.0], dtype=F64)).norm(dim=-1).max()
    assert float(deviation) < 1e-6 * speed
    contact = sim.model.contact
    assert contact.timings["limited_vertex_steps"] == 0
    # The candidate cache follows the common motion: 4 m of flight, one broad phase.
    assert contact.timings["rebuilds"] == 1


# ----------------------------------------------------------------- default dhat
def thin_mat_and_far_box() -> ds.TetMesh:
    """An 8 mm mat and a small box 2 m away (the scene's diagonal makes 0.5% of it 10 mm)."""
    mat = ds.TetMesh.box(size=(0.2, 0.008, 0.2), resolution=(10, 1, 10), origin=(-0.1, 0, -0.1))
    far = ds.TetMesh.box(size=(0.05, 0.05, 0.05), resolution=1, origin=(2.0, 0.0, 0.0))
    return ds.TetMesh.merge([mat, far])


def rest_gap(mesh: ds.TetMesh) -> float:
    """The smallest rest distance between non-adjacent surface elements (m), by brute force."""
    from diffsim.contact.candidates import SurfacePrimitives, brute_force_candidates
    from diffsim.contact.potential import pair_distances

    surface = SurfacePrimitives.from_mesh(mesh)
    x = torch.tensor(mesh.vertices)
    c = brute_force_candidates(surface, x, 0.05)
    return float(torch.cat(pair_distances(x, c)).min().sqrt())


def test_default_dhat_fits_a_thin_mat_and_keeps_the_old_rule_elsewhere():
    mesh = thin_mat_and_far_box()
    diag = float(np.linalg.norm(np.ptp(mesh.vertices, axis=0)))
    gap = rest_gap(mesh)
    assert gap <= 0.008  # the mat's thickness (edges along its rim come closer: 7 mm)
    dhat = SurfaceContact.default_dhat(mesh)
    assert 5e-3 * diag > 0.008  # the old rule: larger than the mat is thick
    assert dhat == pytest.approx(REST_GAP_FRACTION * gap, rel=1e-9)
    # Where the geometry allows it, the default is 0.5% of the diagonal as before.
    box = cube()
    assert SurfaceContact.default_dhat(box) == pytest.approx(
        5e-3 * np.linalg.norm(np.ptp(box.vertices, axis=0))
    )
    sim = ds.Simulator(mesh, ds.StableNeoHookean(5e3, 0.3), ground=None, contact=True)
    assert sim.model.contact.dhat == pytest.approx(dhat)


def test_an_explicit_dhat_above_the_rest_gaps_warns_naming_the_pairs():
    mesh = thin_mat_and_far_box()
    material = ds.StableNeoHookean(5e3, 0.3)
    with pytest.warns(ContactWarning, match=r"start inside the barrier") as record:
        ds.Simulator(mesh, material, ground=None, contact=True, contact_dhat=0.01)
    message = str(record[0].message)
    assert "point-triangle" in message or "edge-edge" in message
    assert "contact_dhat" in message
    assert issubclass(ContactWarning, UserWarning)
    with warnings.catch_warnings():  # the default never warns
        warnings.simplefilter("error", ContactWarning)
        ds.Simulator(mesh, material, ground=None, contact=True)


def test_bodies_placed_almost_touching_warn_that_they_set_a_tiny_dhat():
    """Two boxes stacked 10 microns apart: the default dhat is 5 microns (the rest state
    stays at rest) and the set-up warns with the gap, the bodies, the speed the barrier
    then stops and the fix; 1 mm apart, or a thin part of one body, it does not warn."""
    material = ds.StableNeoHookean(1e5, 0.3, 1000.0)

    def stacked(gap: float) -> ds.TetMesh:
        lower = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=2)
        upper = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=2, origin=(0.02, 0.1 + gap, 0))
        return ds.TetMesh.merge([lower, upper])

    with pytest.warns(ContactWarning, match=r"bodies 0 and 1 start 0.01 mm apart") as record:
        sim = ds.Simulator(stacked(1e-5), material, ground=None)
    message = str(record[0].message)
    print(message)
    assert sim.model.contact.dhat == pytest.approx(5e-6, rel=1e-6)
    assert "stops approaches only up to about" in message and "apart for the full dhat" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error", ContactWarning)
        ds.Simulator(stacked(1e-3), material, ground=None)
        ds.Simulator(thin_mat_and_far_box(), ds.StableNeoHookean(5e3, 0.3), ground=None)


# ----------------------------------------------------------------- rest stays at rest
def real_mesh(name: str) -> ds.TetMesh:
    """A mesh from ../shared/assets, centred; 0.3 m tall (the mat keeps its 1 m x 8 mm)."""
    mesh = ds.TetMesh.load(asset(f"{name}.msh")).centered()
    return mesh if name == "mat40x40" else mesh.scaled_to(0.3)


REAL_MESHES = [
    "tet",
    "cube",
    "torus",
    "bar-2523",
    "sphere1K",
    "mat40x40",
    "bunny",
    "32770_octocat",
    "Armadillo13K",
    "hollowCat7.5K",
]
MATS = {"thin_mat_box": thin_mat_and_far_box}
SUBSTEPS = 100


def at_rest(mesh: ds.TetMesh, youngs: float, dtype: torch.dtype, contact: bool):
    """The fastest vertex speed (m/s) over ~100 stable substeps from rest, zero gravity."""
    sim = ds.Simulator(
        mesh,
        ds.StableNeoHookean(youngs_modulus=youngs, poissons_ratio=0.3, density=1000.0),
        dt=1e-4,
        substeps="auto",
        gravity=(0.0, 0.0, 0.0),
        ground=None,
        contact=contact,
        dtype=dtype,
    )
    steps = max(1, round(SUBSTEPS / sim.model.substeps))
    with torch.no_grad():
        traj = sim.rollout(steps, sim.initial_state())
    return float(traj.velocities.norm(dim=-1).max()), sim


@pytest.mark.parametrize("name", REAL_MESHES + sorted(MATS))
def test_a_body_at_rest_with_contact_on_stays_at_rest(name):
    # float64: the elastic core holds a rest state to ~1e-12 m/s, so 1e-6 m/s measures what
    # contact adds. (Before: the bunny reached 355 m/s, the thin mat 26 m/s.)
    mesh = MATS[name]() if name in MATS else real_mesh(name)
    youngs = 5e3 if "mat" in name else 1e5
    fastest, sim = at_rest(mesh, youngs, F64, contact=True)
    contact = sim.model.contact
    # The default leaves every pair at least 1 / REST_GAP_FRACTION barrier widths apart.
    closest = contact.min_distance(torch.as_tensor(mesh.vertices))
    assert closest >= (1 - 1e-3) * contact.dhat / REST_GAP_FRACTION
    assert fastest < 1e-6, f"fastest vertex {fastest:.3g} m/s (dhat {contact.dhat:.3g} m)"


def _without_sliver_rule(surface):
    """The same surface with no tet neighbours known: no pair is a sliver pair."""
    import dataclasses

    return dataclasses.replace(surface, neighbours=surface.neighbours[:0])


def _rows(c) -> set:
    return set(map(tuple, c.point_triangle.tolist())) | set(map(tuple, c.edge_edge.tolist()))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_a_flat_tet_at_the_surface_does_not_set_dhat(dtype):
    # The bunny's closest pair of surface elements, 40 microns apart, lies across a flat tet
    # at its surface. It set the default dhat for the whole bunny (20 microns), so its
    # barrier stopped only 0.2 dhat / h = 0.04 m/s of approach at 1e-4 s substeps, and the
    # dropped bunny's self-contact was stopped by the step limit instead (bunny_drop: 8,938
    # vertex-steps cut). Sliver pairs (joined by a tet edge, closer at rest than a quarter
    # of that edge) are not candidates: the tet holds them apart. Measured: dhat 0.422 mm
    # (its closest other pair is 0.84 mm apart), 1,358 vertex-steps cut.
    mesh = real_mesh("bunny")
    dhat = SurfaceContact.default_dhat(mesh)
    print(f"bunny: default dhat {1e3 * dhat:.3g} mm")
    assert dhat > 2e-4
    from diffsim.contact.candidates import (
        Candidates,
        SurfacePrimitives,
        find_candidates,
        sliver_pairs,
    )
    from diffsim.contact.potential import pair_distances

    surface = SurfacePrimitives.from_mesh(mesh)
    x = torch.as_tensor(mesh.vertices)
    everything = find_candidates(_without_sliver_rule(surface), x, 1e-3)
    x = x.to(dtype)  # the working dtype; the rule measures rest distances in float64
    d_pt, d_ee = pair_distances(x, everything)
    closest = int(torch.cat([d_pt, d_ee]).argmin())
    assert closest < len(d_pt) and float(d_pt[closest].sqrt()) < 5e-5  # the 40 micron pair
    row = everything.point_triangle[closest : closest + 1]
    assert bool(sliver_pairs(surface, row, True)[0])
    # Each broad phase lists what it lists without the rule, less exactly the sliver pairs.
    for method in ("bvh", "brute"):
        found = find_candidates(_without_sliver_rule(surface), x, 1e-3, method)
        pt, ee = found.point_triangle, found.edge_edge
        slivers_pt, slivers_ee = sliver_pairs(surface, pt, True), sliver_pairs(surface, ee, False)
        kept = _rows(Candidates(pt[~slivers_pt], ee[~slivers_ee], found.mollifier_eps))
        assert _rows(find_candidates(surface, x, 1e-3, method)) == kept, method
        left_out = int(slivers_pt.sum() + slivers_ee.sum())
        print(f"{method}: {left_out} sliver pairs of {found.n_pairs} pairs within 1 mm")
        assert left_out > 0


def test_a_coarse_thin_mat_keeps_dhat_within_half_its_thickness():
    # An 8 mm mat of 83 mm cells and a body 2 m away (the scene rule alone: 12 mm). The
    # mat's two sides are one flat tet apart (8 mm against 83-118 mm edges) but joined by
    # its 8 mm vertical edges, so they are not sliver pairs and bound dhat. (Measured
    # against the elements' mean edge instead, they counted as slivers: dhat 11.8 mm.)
    mat = ds.TetMesh.box(size=(0.5, 0.008, 0.5), resolution=(6, 1, 6), origin=(-0.25, 0, -0.25))
    far = ds.TetMesh.box(size=(0.05, 0.05, 0.05), resolution=1, origin=(2.0, 0.0, 0.0))
    dhat = SurfaceContact.default_dhat(ds.TetMesh.merge([mat, far]))
    print(f"coarse thin mat: dhat {1e3 * dhat:.3g} mm")
    assert dhat <= REST_GAP_FRACTION * 0.008


@pytest.mark.parametrize("resolution", [1, 2])
def test_pairs_one_well_shaped_tet_apart_stay_candidates(resolution):
    # A coarse box's faces are one tet apart; its tets are well shaped (its closest pairs are
    # 0.58 of their joining edge apart), so all its pairs stay candidates: its faces crushed
    # together at 20 m/s still meet the barrier.
    from diffsim.contact.candidates import SurfacePrimitives, find_candidates

    mesh = cube(resolution=resolution)
    surface = SurfacePrimitives.from_mesh(mesh)
    x = torch.as_tensor(mesh.vertices)
    everything = _rows(find_candidates(_without_sliver_rule(surface), x, 1.0, "brute"))
    assert everything == _rows(find_candidates(surface, x, 1.0, "bvh"))
    assert everything == _rows(find_candidates(surface, x, 1.0, "brute"))
    assert len(everything) > 0


@pytest.mark.parametrize("name", ["bunny", "32770_octocat", "Armadillo13K", "hollowCat7.5K"])
def test_the_candidate_sets_of_a_real_mesh_at_rest_stay_small(name):
    # A candidate set lists the pairs within dhat + 2 R, its reach R at least the margin.
    # With the scene rule's dhat (0.5% of the diagonal) as the margin, the large real meshes
    # (0.2-0.3 of an edge) listed 4-15 pairs per surface element at rest (the Armadillo 11:
    # 466,000 pairs on its crease, 541 ms a step; with a margin of 0.2 edges 22,000 and 230
    # ms). Measured: bunny 0.55, octocat 1.82, Armadillo 0.60, hollowCat 1.10.
    mesh = real_mesh(name)
    material = ds.StableNeoHookean(1e5, 0.3)
    sim = ds.Simulator(mesh, material, substeps="auto", gravity=(0.0, 0.0, 0.0), ground=None)
    contact = sim.model.contact
    pairs = contact.candidates(torch.as_tensor(mesh.vertices)).n_pairs
    per_element = pairs / (len(contact.surface.vertices) + len(contact.surface.edges))
    print(
        f"{name}: dhat {contact.dhat:.3g} m, margin {contact.margin:.3g} m, {pairs} pairs, "
        f"{per_element:.2f} per surface vertex and edge"
    )
    assert per_element < 2.0
    assert contact.margin <= max(contact.dhat, 0.2 * contact.surface.mean_edge_length)


@pytest.mark.parametrize("name", ["thin_mat_box", "bunny"])
def test_contact_adds_nothing_to_a_float32_rest_state(name):
    # In float32 the elastic core alone leaves rest at 4e-6 (mat) to 4e-5 m/s (bunny): the
    # rounding of F at rest. Contact at rest must add nothing: no force, no energy, and the
    # same fastest vertex as with contact off (within the rounding of the other code path).
    mesh = MATS[name]() if name in MATS else real_mesh(name)
    youngs = 5e3 if "mat" in name else 1e5
    off, _ = at_rest(mesh, youngs, torch.float32, contact=False)
    on, sim = at_rest(mesh, youngs, torch.float32, contact=True)
    assert on <= 2.0 * off + 1e-7, (on, off)
    x = sim.initial_state().positions
    mass = sim.coefficients().mass
    contact = sim.model.contact
    assert float(contact.forces(x, mass).abs().max()) == 0.0
    assert float(contact.energy(x, mass)) == 0.0


# ----------------------------------------------------------------- friction orientation
def squeezed_box(gravity_along: str, backend: str, dtype: torch.dtype) -> float:
    """Slide (m) of a box squeezed between two fixed walls (1 mm gaps inside a 2 mm barrier)
    with friction 1.0 over 0.08 s; the scene for gravity along x is the one for gravity along
    y turned exactly (a signed permutation of the axes) by 90 degrees about z."""
    gap = 0.001
    wall_a = ds.TetMesh.box(
        size=(0.2, 0.2, 0.02), resolution=(2, 2, 1), origin=(-0.1, -0.1, -0.07 - gap)
    )
    box = ds.TetMesh.box(
        size=(0.05, 0.05, 0.1), resolution=(2, 2, 4), origin=(-0.025, -0.025, -0.05)
    )
    wall_b = ds.TetMesh.box(
        size=(0.2, 0.2, 0.02), resolution=(2, 2, 1), origin=(-0.1, -0.1, 0.05 + gap)
    )
    mesh = ds.TetMesh.merge([wall_a, box, wall_b])
    gravity = np.array([0.0, -9.81, 0.0])
    if gravity_along == "x":
        turn = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
        mesh = mesh.transformed(rotation=turn)
        gravity = turn @ gravity
    mesh = mesh.transformed(translation=(0.0, 0.5, 0.0))  # high above the ground
    with pytest.warns(ContactWarning):  # the walls start inside the barrier: the squeeze
        sim = ds.Simulator(
            mesh,
            ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.3, density=1000.0),
            dt=1e-3,
            substeps=2,
            gravity=tuple(gravity),
            ground=0.0,
            fixed=np.flatnonzero(mesh.body_ids != 1),
            contact=True,
            contact_dhat=0.002,
            contact_friction=1.0,
            backend=backend,
            dtype=dtype,
        )
    with torch.no_grad():
        traj = sim.rollout(80, sim.initial_state())
    moved = traj.positions[-1, mesh.body_ids == 1] - traj.positions[0, mesh.body_ids == 1]
    down = torch.as_tensor(gravity / np.linalg.norm(gravity), dtype=moved.dtype)
    return float(moved.mean(dim=0) @ down)


@pytest.mark.parametrize(
    "backend, dtype, tolerance",
    [("torch", F64, 1e-9), ("warp", F64, 1e-9), ("warp", torch.float32, 1e-5)],
)
def test_surface_friction_does_not_depend_on_the_orientation(backend, dtype, tolerance):
    # The turned scene is the same problem in exact arithmetic: only summation orders differ.
    # Measured: 12.0497 mm both ways, 2e-15 m apart in float64 and 7e-8 m in float32. The
    # tolerances (1e-9 m, 1e-5 m) leave over 100x room for other summation orders and are
    # over 100x below what the bug did (12.9 mm with gravity along y against 11.6 mm along
    # x; 33.2 mm without friction).
    along_y = squeezed_box("y", backend, dtype)
    along_x = squeezed_box("x", backend, dtype)
    assert 0.005 < along_y < 0.02  # it slid, and friction held it well below free sliding
    assert abs(along_x - along_y) < tolerance, (along_x, along_y)
