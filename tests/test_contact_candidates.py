"""The contact broad phase: the measured BVH queries against the box candidates and the
torch reference, and the candidate cache's rebuild policy on the Warp path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import diffsim as ds
from diffsim.apps.scene import load_scene
from diffsim.contact.candidates import SurfacePrimitives, find_candidates, near_candidates
from diffsim.contact.distances import mollifier_threshold
from tests.helpers import asset

ROOT = Path(__file__).resolve().parents[1]


def two_bodies() -> ds.TetMesh:
    """A box and a sphere just above it, turned so that no box edges are axis-aligned."""
    box = ds.TetMesh.box(size=(0.4, 0.1, 0.4), resolution=(4, 2, 4))
    c, s = np.cos(0.3), np.sin(0.3)
    rotation = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    box = box.transformed(rotation=rotation)
    ball = ds.TetMesh.sphere(0.08, 4, (0.02, 0.14, 0.01))
    return ds.TetMesh.merge([box, ball])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_measured_queries_equal_the_box_candidates_filtered_by_distance(dtype):
    from diffsim.contact.warp_glue import pair_arrays, squared_distances

    mesh = two_bodies()
    surface = SurfacePrimitives.from_mesh(mesh)
    x = torch.tensor(mesh.vertices - mesh.vertices.mean(axis=0), dtype=dtype)
    cache: dict = {}
    for radius in (0.01, 0.05, 0.3):  # the last one grows the outputs
        within = radius * (1 + 1e-6)
        c, d2 = near_candidates(surface, x, radius, within, "bvh", cache)
        # The same rows in the same order, the same distances and mollifier thresholds as
        # the box candidates measured by the pair-distance kernel and filtered.
        boxes = find_candidates(surface, x, radius, "bvh")
        all_d2 = squared_distances(pair_arrays(boxes, dtype), x)
        keep = all_d2 < within**2
        k1 = len(boxes.point_triangle)
        assert torch.equal(c.point_triangle, boxes.point_triangle[keep[:k1]])
        assert torch.equal(c.edge_edge, boxes.edge_edge[keep[k1:]])
        assert torch.equal(d2, all_d2[keep])
        assert torch.equal(c.mollifier_eps, boxes.mollifier_eps[keep[k1:]])
        eps = mollifier_threshold(*surface.rest_positions[c.edge_edge].unbind(1))
        assert torch.equal(c.mollifier_eps, eps)
        assert d2.dtype == dtype and len(c.point_triangle) and len(c.edge_edge)
        # The same set as the torch reference (which measures with the torch formulas).
        ref, ref_d2 = near_candidates(surface, x, radius, within, "brute")
        for name in ("point_triangle", "edge_edge"):
            a = {tuple(r) for r in getattr(ref, name).tolist()}
            b = {tuple(r) for r in getattr(c, name).tolist()}
            assert a == b
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(d2.sort().values, ref_d2.sort().values, rtol=tol, atol=0.0)
    assert list(cache) == [dtype]  # one broad phase per dtype, reused


def test_outputs_grow_until_every_pair_fits():
    mesh = two_bodies()
    surface = SurfacePrimitives.from_mesh(mesh)
    x = torch.tensor(mesh.vertices)
    cache: dict = {}
    first, d2 = near_candidates(surface, x, 0.3, 0.3, "bvh", cache)
    for _, query in cache[torch.float64]._queries:
        for part in query.parts:
            part.allocate(3)  # far too small: the queries run again with room for all
    again, d2_again = near_candidates(surface, x, 0.3, 0.3, "bvh", cache)
    assert torch.equal(first.point_triangle, again.point_triangle)
    assert torch.equal(first.edge_edge, again.edge_edge)
    assert torch.equal(d2, d2_again)


def test_warp_path_rebuilds_its_candidates_about_as_often_as_the_torch_path():
    """The contact-free predictions and checks of the Warp path keep the candidate set they
    find (no shrink to the next substep's needs): two balls thrown at each other rebuilt it
    82 times in 25 steps where the torch path rebuilt it 25 times. Counted: broad phases (a
    set filtered from the last one, at the same positions, runs none; the Warp path's guesses
    of a block long enough to pay build a set of their reach, which the next fused launch
    filters back down: 5 of each in these 25 steps at 14 substeps)."""
    broad_phases = {}
    for backend in ("warp", "torch"):
        scene = load_scene(ROOT / "scenes" / "spheres_collide.py")
        sim = scene.build().replace(backend=backend)
        with torch.no_grad():
            sim.rollout(25, scene.initial_state(sim))
        timings = sim.model.contact.timings
        broad_phases[backend] = timings["rebuilds"] - timings.get("filtered_rebuilds", 0)
    assert broad_phases["warp"] <= broad_phases["torch"] + 5, broad_phases


def test_frame_distances_kernel_matches_the_torch_formulas():
    from diffsim.contact.surface_contact import _frame_distances

    mesh = two_bodies()
    surface = SurfacePrimitives.from_mesh(mesh)
    x = torch.tensor(mesh.vertices)
    c, d2 = near_candidates(surface, x, 0.05, 0.05, "bvh")
    rng = np.random.default_rng(3)
    frames = x + torch.tensor(rng.normal(scale=0.01, size=(5, *x.shape)))
    frames[0] = x
    fast = _frame_distances(frames, c, warp=True)
    ref = _frame_distances(frames, c, warp=False)
    assert fast.shape == (5, c.n_pairs)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(fast[0], d2.sqrt(), rtol=1e-15, atol=0.0)


@pytest.mark.parametrize("broad_phase", ["bvh", "brute"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_set_filtered_at_its_anchor_is_the_set_built_there(broad_phase, dtype):
    from diffsim.contact import SurfaceContact

    mesh = two_bodies()
    x = torch.tensor(mesh.vertices - mesh.vertices.mean(axis=0), dtype=dtype)
    kwargs = {"dhat": 0.004, "stiffness": 1.0, "broad_phase": broad_phase}
    filtered, fresh = SurfaceContact(mesh, **kwargs), SurfaceContact(mesh, **kwargs)
    filtered._rebuild(x, 0.05)
    big = filtered._candidates.n_pairs
    # Smaller, then larger again (no larger than the first) at the same positions: filtered
    # from the first set, no broad phase.
    for reach in (0.01, 0.02):
        filtered._rebuild(x.clone(), reach)
        fresh._rebuild(x, reach)
        a, b = filtered._candidates, fresh._candidates
        assert big > a.n_pairs > 0
        for name in ("point_triangle", "edge_edge", "mollifier_eps"):
            assert torch.equal(getattr(a, name), getattr(b, name))
        assert torch.equal(filtered._anchor_d2, fresh._anchor_d2)
        assert filtered._closest == fresh._closest
    assert filtered.timings["filtered_rebuilds"] == 2 and "filtered_rebuilds" not in fresh.timings
    # Elsewhere, or larger than the set built there, it is a broad phase again.
    filtered._rebuild(x + 1e-3, 0.01)
    filtered._rebuild(x + 1e-3, 0.02)
    assert filtered.timings["filtered_rebuilds"] == 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_subset_is_measured_as_the_whole_set_is(dtype):
    from diffsim.contact.warp_broad_phase import squared_distances
    from diffsim.contact.warp_glue import pair_arrays
    from diffsim.contact.warp_glue import squared_distances as all_squared_distances

    mesh = two_bodies()
    surface = SurfacePrimitives.from_mesh(mesh)
    x = torch.tensor(mesh.vertices, dtype=dtype)
    c, _ = near_candidates(surface, x, 0.05, 0.05)
    y = x + torch.tensor(np.random.default_rng(4).normal(scale=0.01, size=x.shape), dtype=dtype)
    pt, ee = torch.arange(0, len(c.point_triangle), 3), torch.arange(1, len(c.edge_edge), 3)
    d2 = squared_distances(y, c.point_triangle[pt], c.edge_edge[ee])
    rows = torch.cat([pt, ee + len(c.point_triangle)])
    assert len(pt) and len(ee)
    assert torch.equal(d2, all_squared_distances(pair_arrays(c, dtype), y)[rows])


def test_frame_offset_bounds_are_the_torch_bounds_bit_for_bit():
    from diffsim.contact.warp_broad_phase import frame_offset_bounds

    rng = np.random.default_rng(5)
    frames = torch.tensor(rng.normal(size=(6, 40, 3))) + 1e3  # far from the origin: rounding
    origin = torch.tensor(rng.normal(size=3)) + 1e3
    anchor = frames[2] - origin + torch.tensor(rng.normal(scale=1e-3, size=(40, 3)))
    local = frames - origin
    expected = (
        *torch.aminmax(local - local[0], dim=1),
        *torch.aminmax(local[1:] - local[:-1], dim=1),
        *torch.aminmax(local - anchor, dim=1),
    )
    along = torch.linspace(0.0, 1.0, len(frames), dtype=torch.float64)[:, None, None]
    chord = local[-1] - local[0]
    off_chord = (local - local[0] - along * chord).norm(dim=2).amax(dim=1)
    from diffsim.contact import warp_broad_phase

    split = CountingLauncher()
    for launcher in (None, split):  # the frames split between two threads
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(warp_broad_phase, "SPLIT_VERTEX_FRAMES", 0)  # however few
            bounds = frame_offset_bounds(frames, origin, anchor, launcher)
        for got, want in zip(bounds[:-1], expected, strict=True):
            assert torch.equal(got, want)
        # The distances from the straight paths (to rounding: norms summed in other orders).
        torch.testing.assert_close(bounds[-1], off_chord, rtol=1e-12, atol=1e-12)
        assert float(off_chord.min()) == 0.0 and float(off_chord.max()) > 1.0  # ends on it
    assert split.calls == 1
    # float32 frames (a float32 simulation's substeps) are read as float64, not converted.
    single = frames.to(torch.float32)
    local = single.to(torch.float64) - origin
    expected = (
        *torch.aminmax(local - local[0], dim=1),
        *torch.aminmax(local[1:] - local[:-1], dim=1),
        *torch.aminmax(local - anchor, dim=1),
    )
    for got, want in zip(frame_offset_bounds(single, origin, anchor)[:-1], expected, strict=True):
        assert got.dtype == torch.float64 and torch.equal(got, want)
    frames[3, 7, 1] = float("nan")
    assert frame_offset_bounds(frames, origin, anchor) is None
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(warp_broad_phase, "SPLIT_VERTEX_FRAMES", 0)
        assert frame_offset_bounds(frames, origin, anchor, split) is None


def test_recorded_launches_follow_new_shapes():
    """The checks' kernels are launched from recordings re-pointed at each call's tensors:
    other frame counts, vertex counts and pair counts give the torch values every time."""
    from diffsim.contact.surface_contact import _frame_distances
    from diffsim.contact.warp_broad_phase import frame_offset_bounds

    mesh = two_bodies()
    surface = SurfacePrimitives.from_mesh(mesh)
    x = torch.tensor(mesh.vertices)
    c, _ = near_candidates(surface, x, 0.05, 0.05)
    rng = np.random.default_rng(6)
    for frames, pairs in ((2, 7), (9, 40), (3, c.n_pairs), (5, 1)):
        f = x + torch.tensor(rng.normal(scale=0.01, size=(frames, *x.shape)))
        sub = c.subset(torch.arange(pairs))
        fast = _frame_distances(f, sub, warp=True)
        torch.testing.assert_close(fast, _frame_distances(f, sub), rtol=1e-12, atol=1e-15)
        vertices = torch.unique(torch.cat([sub.point_triangle, sub.edge_edge]))
        part = f[:, vertices]
        origin, anchor = part[0, 0].clone(), part[-1] - part[0, 0]
        local = part - origin
        bounds = frame_offset_bounds(part, origin, anchor)
        assert torch.equal(bounds[2], torch.aminmax(local[1:] - local[:-1], dim=1)[0])
        assert torch.equal(bounds[5], torch.aminmax(local - anchor, dim=1)[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_refit_trees_find_the_pairs_fresh_trees_find(dtype):
    """A real mesh (two tori) carried 5 m away with a small wobble is queried on refit trees
    (no build): the same pairs and distances as trees built there. Deformed by more than
    half an edge, the trees are built anew."""

    torus = ds.TetMesh.load(asset("torus.msh")).centered().scaled_to(0.2)
    mesh = ds.TetMesh.merge([torus, torus.transformed(translation=(0.05, 0.03, 0.0))])
    surface = SurfacePrimitives.from_mesh(mesh)
    x0 = torch.tensor(mesh.vertices, dtype=dtype)
    radius = 0.01
    cache: dict = {}
    near_candidates(surface, x0, radius, radius, "bvh", cache)
    broad = cache[dtype]
    assert broad.builds == 1
    rng = np.random.default_rng(0)
    edge = float(np.linalg.norm(np.diff(mesh.vertices[mesh.surface_edges], axis=1), axis=-1).mean())
    wobble = torch.tensor(rng.uniform(-0.1, 0.1, size=x0.shape) * edge, dtype=dtype)
    for x, builds in ((x0 + 5.0 + wobble, 1), (x0 * 1.5, 2)):
        c, d2 = near_candidates(surface, x, radius, radius, "bvh", cache)
        assert broad.builds == builds  # refit while moved as a whole, built where deformed
        fresh, fresh_d2 = near_candidates(surface, x, radius, radius, "bvh")
        for name in ("point_triangle", "edge_edge"):
            rows, fresh_rows = getattr(c, name), getattr(fresh, name)
            assert len(rows) > 100
            assert {tuple(r) for r in rows.tolist()} == {tuple(r) for r in fresh_rows.tolist()}
        measured = []
        for found, distances in ((c, d2), (fresh, fresh_d2)):
            kinds = [0] * len(found.point_triangle) + [1] * len(found.edge_edge)
            rows = torch.cat([found.point_triangle, found.edge_edge]).tolist()
            values = zip(kinds, rows, distances.tolist(), strict=True)
            measured.append({(kind, *r): d for kind, r, d in values})
        assert measured[0] == measured[1]  # the same distances, bit for bit
    print(f"mean edge {edge:.4f} m; pairs {len(d2)}")


class CountingLauncher:
    """A two-thread launcher that counts its hand-overs."""

    def __init__(self) -> None:
        from diffsim.backends.warp.threads import SplitLauncher

        self.launcher, self.threads, self.calls = SplitLauncher.shared(2), 2, 0

    def run(self, *jobs) -> None:
        self.calls += 1
        self.launcher.run(*jobs)


def test_query_parts_on_two_threads_give_the_rows_of_one_thread(monkeypatch):
    """The queries run as interleaved parts, on the Warp backend's two CPU threads where it
    has them (and the two trees are built at once): the same rows, in the same order, with
    the same distances as on one."""
    from diffsim.contact import warp_broad_phase

    monkeypatch.setattr(warp_broad_phase, "SPLIT_ELEMENTS", 0)  # split however small

    torus = ds.TetMesh.load(asset("torus.msh")).centered().scaled_to(0.2)
    mesh = ds.TetMesh.merge([torus, torus.transformed(translation=(0.05, 0.03, 0.0))])
    surface = SurfacePrimitives.from_mesh(mesh)
    x = torch.tensor(mesh.vertices)
    one, d2_one = near_candidates(surface, x, 0.01, 0.01, "bvh", {})
    cache: dict = {}
    launcher = CountingLauncher()
    two, d2_two = near_candidates(surface, x, 0.01, 0.01, "bvh", cache, launcher)
    assert launcher.calls == 2  # one hand-over for both trees' builds, one for both queries
    parts = [part for _, query in cache[x.dtype]._queries for part in query.parts]
    assert len(parts) == 4 and all(int(part.count[0]) > 0 for part in parts)  # both ran
    for name in ("point_triangle", "edge_edge", "mollifier_eps"):
        assert torch.equal(getattr(one, name), getattr(two, name))
    assert torch.equal(d2_one, d2_two) and len(d2_one) > 1000


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_swept_test_of_a_guessed_motion_agrees_with_the_brute_one(dtype):
    """A guess (a straight motion) asks whether any pair may come within a distance along it
    (``SurfaceContact._closing``): the Warp trees of swept boxes and the brute pairs give the
    same answer on two real tori, carried apart, together and wobbled; where it says no,
    no pair comes that close anywhere along the motion (sampled), and two bodies moving
    as a whole past each other are no, though a static set covering their motion would
    list thousands of pairs."""
    from diffsim.contact.surface_contact import SurfaceContact

    torus = ds.TetMesh.load(asset("torus.msh")).centered().scaled_to(0.2)
    mesh = ds.TetMesh.merge([torus, torus.transformed(translation=(0.25, 0.0, 0.0))])
    body = torch.as_tensor(mesh.body_ids)
    contacts = {
        method: SurfaceContact(mesh, dhat=2e-3, stiffness=1.0, broad_phase=method, dtype=dtype)
        for method in ("bvh", "brute")
    }
    x = contacts["bvh"].local(torch.tensor(mesh.vertices, dtype=dtype))
    needed = 2e-3
    rng = np.random.default_rng(1)
    answers = []
    # Towards each other by these distances (the gap is 0.05 m), each torus as a whole,
    # plus a wobble of each vertex by up to this much.
    for close, wobble in [(0.02, 0.0), (0.045, 0.0), (0.06, 0.0), (0.02, 0.004), (0.0, 0.03)]:
        for _ in range(3):
            dx = torch.zeros_like(x)
            dx[:, 0] = torch.where(body == 0, 0.5 * close, -0.5 * close).to(dtype)
            dx += torch.tensor(rng.uniform(-wobble, wobble, size=x.shape), dtype=dtype)
            dx += torch.tensor(rng.uniform(-1, 1, size=3), dtype=dtype)  # a common motion
            found = {m: c._closing(x, dx, needed) for m, c in contacts.items()}
            assert found["bvh"] == found["brute"], (close, wobble)
            answers.append(found["bvh"])
            # The listed pairs' test (a Warp pass, torch formulas on the brute path).
            listed = {}
            for m, c in contacts.items():
                c._candidates_at(x)  # (the sampling below moves the sets)
                listed[m] = c._listed_closing(x, dx, c._moved_from_anchor(x), needed)
            assert listed["bvh"] == listed["brute"], (close, wobble)
            if close == 0.02 and wobble == 0.0:
                assert not found["bvh"]
            if not found["bvh"]:  # no pair comes within needed along the motion
                for t in np.linspace(0.0, 1.0, 11):
                    y = x + float(t) * dx
                    assert contacts["brute"].min_distance(y + contacts["brute"].origin) > needed
    assert True in answers and False in answers
    # A static set reaching along the first motion lists the pairs within its extent.
    static, _ = near_candidates(SurfacePrimitives.from_mesh(mesh), x, 0.02 + needed, 0.02, "bvh")
    print(f"answers {answers}; a static set over 2 cm: {static.n_pairs} pairs")
    assert static.n_pairs > 1000
