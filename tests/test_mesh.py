import numpy as np
import pytest
import torch
import trimesh

import diffsim as ds
from diffsim.mesh.geometry import signed_volumes

from .helpers import asset


def test_box_volume_surface_and_orientation():
    mesh = ds.TetMesh.box(size=(0.2, 0.3, 0.4), resolution=(2, 3, 4), origin=(1.0, 2.0, 3.0))
    assert mesh.n_tets == 6 * 2 * 3 * 4
    assert np.isclose(mesh.rest_volumes.sum(), 0.2 * 0.3 * 0.4)
    assert (mesh.rest_volumes > 0).all()
    faces = mesh.surface_faces
    # 2 triangles per boundary cell face
    assert len(faces) == 4 * (2 * 3 + 3 * 4 + 2 * 4)
    # outward normals: the divergence theorem gives the volume
    v = mesh.vertices[faces]
    volume = np.einsum("fi,fi->f", v[:, 0], np.cross(v[:, 1], v[:, 2])).sum() / 6
    assert np.isclose(volume, 0.2 * 0.3 * 0.4)
    # closed surface: every edge shared by exactly two triangles
    edges = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    assert (counts == 2).all()
    assert len(mesh.surface_edges) == len(counts)


def test_dm_inv_maps_rest_edges_to_identity():
    mesh = ds.TetMesh.box(resolution=2)
    from diffsim.mesh.geometry import edge_matrices

    F = edge_matrices(mesh.vertices, mesh.tets) @ mesh.dm_inv
    assert np.allclose(F, np.eye(3))


def test_lumped_masses_sum_to_total_mass():
    mesh = ds.TetMesh.box(size=(1, 2, 3), resolution=(2, 2, 2))
    assert np.isclose(mesh.lumped_masses(500.0).sum(), 500.0 * 6.0)
    per_tet = np.linspace(1, 2, mesh.n_tets)
    assert np.isclose(mesh.lumped_masses(per_tet).sum(), (per_tet * mesh.rest_volumes).sum())


def test_sphere_and_from_surface_approximate_the_ball():
    ball = ds.TetMesh.sphere(radius=0.1, resolution=8)
    exact = 4 / 3 * np.pi * 0.1**3
    assert abs(ball.rest_volumes.sum() - exact) / exact < 0.05
    surf = ds.TetMesh.from_surface(
        trimesh.creation.icosphere(subdivisions=2, radius=0.1), resolution=8
    )
    assert abs(surf.rest_volumes.sum() - exact) / exact < 0.1
    assert (surf.rest_volumes > 0).all()
    radii = np.linalg.norm(surf.vertices[surf.surface_vertices], axis=1)
    assert np.abs(radii - 0.1).max() < 0.02


def test_from_surface_rejects_open_surface():
    open_surface = trimesh.creation.icosphere(subdivisions=1)
    open_surface.update_faces(np.arange(len(open_surface.faces) - 1))
    with pytest.raises(ValueError, match="not closed"):
        ds.TetMesh.from_surface(open_surface, resolution=4)


def test_beam_dimensions():
    beam = ds.TetMesh.beam(length=1.0, width=0.1, height=0.2, cells_per_width=2)
    assert np.allclose(np.ptp(beam.vertices, axis=0), [1.0, 0.2, 0.1])


@pytest.mark.parametrize("name", ["tet.msh", "cube.msh", "torus.msh", "bunny.msh", "mat40x40.msh"])
def test_shared_meshes_load(name):
    mesh = ds.TetMesh.load(asset(name))
    assert (mesh.rest_volumes > 0).all()
    assert len(mesh.surface_faces) > 0


def test_msh_and_npz_round_trip(tmp_path):
    mesh = ds.TetMesh.merge(
        [ds.TetMesh.box(resolution=1), ds.TetMesh.box(resolution=1, origin=(2, 0, 0))]
    )
    for suffix in (".msh", ".npz"):
        path = tmp_path / f"m{suffix}"
        mesh.save(path)
        back = ds.TetMesh.load(path)
        assert np.allclose(back.vertices, mesh.vertices)
        assert (back.tets == mesh.tets).all()
    assert (ds.TetMesh.load(tmp_path / "m.npz").body_ids == mesh.body_ids).all()


def test_msh_v22_reads(tmp_path):
    text = """$MeshFormat
2.2 0 8
$EndMeshFormat
$Nodes
5
1 0 0 0
2 1 0 0
3 0 1 0
4 0 0 1
7 5 5 5
$EndNodes
$Elements
2
1 15 2 0 1 7
2 4 2 0 1 1 2 3 4
$EndElements
"""
    path = tmp_path / "old.msh"
    path.write_text(text)
    mesh = ds.TetMesh.load(path, allow_unused_vertices=True)
    assert mesh.n_tets == 1 and mesh.n_vertices == 5
    assert np.isclose(mesh.rest_volumes[0], 1 / 6)


def test_merge_tracks_bodies():
    a = ds.TetMesh.box(resolution=1)
    b = ds.TetMesh.box(resolution=2, origin=(3, 0, 0))
    both = ds.TetMesh.merge([a, b])
    assert both.n_bodies == 2
    assert (both.body_ids[: a.n_vertices] == 0).all() and (both.body_ids[a.n_vertices :] == 1).all()
    assert both.n_tets == a.n_tets + b.n_tets


def test_transforms():
    mesh = ds.TetMesh.box(size=(1, 2, 1), resolution=1)
    placed = mesh.scaled_to(0.3).placed_on(0.0, gap=0.02)
    assert np.isclose(np.ptp(placed.vertices[:, 1]), 0.3)
    assert np.isclose(placed.vertices[:, 1].min(), 0.02)
    mirrored = mesh.transformed(scale=(-1, 1, 1))
    assert (signed_volumes(mirrored.vertices, mirrored.tets) > 0).all()


def test_tensors_accepted():
    mesh = ds.TetMesh.box(resolution=1)
    again = ds.TetMesh(torch.tensor(mesh.vertices), torch.tensor(mesh.tets))
    assert again.n_tets == mesh.n_tets


UNIT = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1.0]])


@pytest.mark.parametrize(
    ("vertices", "tets", "message"),
    [
        (UNIT[:, :2], [[0, 1, 2, 3]], "shape \\[n, 3\\]"),
        (UNIT, [[0, 1, 2]], "shape \\[m, 4\\]"),
        (UNIT.astype(int), [[0, 1, 2, 3]], "floating point"),
        (UNIT, np.array([[0.0, 1, 2, 3]]), "integer"),
        (np.where(np.eye(4, 3) == 1, np.nan, UNIT), [[0, 1, 2, 3]], "non-finite"),
        (UNIT, [[0, 1, 2, 4]], "outside \\[0, 4\\)"),
        (UNIT, [[0, 1, 2, -1]], "outside"),
        (UNIT, [[0, 1, 1, 3]], "repeat a vertex"),
        (np.vstack([UNIT, [[5, 5, 5]]]), [[0, 1, 2, 3]], "used by no tet"),
        (np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0.0]]), [[0, 1, 2, 3]], "degenerate"),
        (UNIT, [[0, 2, 1, 3]], "inverted"),
        (UNIT, np.zeros((0, 4), dtype=int), "no tets"),
    ],
)
def test_bad_meshes_raise_clear_errors(vertices, tets, message):
    with pytest.raises(ValueError, match=message):
        ds.TetMesh(vertices, tets)


def test_inverted_tets_fixed_on_request():
    mesh = ds.TetMesh(UNIT, [[0, 2, 1, 3]], fix_orientation=True)
    assert mesh.rest_volumes[0] > 0


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        ds.TetMesh.load(tmp_path / "nope.msh")
    (tmp_path / "m.xyz").write_text("")
    with pytest.raises(ValueError, match="unknown mesh format"):
        ds.TetMesh.load(tmp_path / "m.xyz")
    (tmp_path / "m.obj").write_text("")  # a surface file: tetrahedralized, if it has triangles
    with pytest.raises(ValueError, match="m.obj: .*(no triangles|could not read)"):
        ds.TetMesh.load(tmp_path / "m.obj")
    (tmp_path / "bin.msh").write_text("$MeshFormat\n4.1 1 8\n$EndMeshFormat\n")
    with pytest.raises(ValueError, match="binary"):
        ds.TetMesh.load(tmp_path / "bin.msh")


def test_malformed_msh_names_the_section(tmp_path):
    mesh = ds.TetMesh.box(size=(1.0, 1.0, 1.0), resolution=(1, 1, 1))
    mesh.save(tmp_path / "good.msh")
    text = (tmp_path / "good.msh").read_text().splitlines()
    nodes = text.index("$Nodes")
    text[nodes + 4] = "0.0 oops 0.0"  # the first coordinate line of the first block
    (tmp_path / "bad.msh").write_text("\n".join(text))
    with pytest.raises(ValueError, match=r"bad.msh: malformed \$Nodes or \$Elements"):
        ds.TetMesh.load(tmp_path / "bad.msh")


def test_similarity_transforms_keep_the_mesh_valid_and_nan_still_raises():
    mesh = ds.TetMesh.box(size=(1.0, 2.0, 1.0), resolution=(2, 2, 2))
    moved = mesh.centered().scaled_to(0.5).placed_on(0.0, gap=0.1)
    assert np.allclose(moved.rest_volumes, mesh.rest_volumes * 0.25**3)
    assert moved.vertices[:, 1].min() == pytest.approx(0.1)
    assert (moved.rest_volumes > 0).all() and mesh.vertices[:, 1].min() == 0.0
    with pytest.raises(ValueError, match="non-finite"):
        mesh.transformed(translation=(float("nan"), 0.0, 0.0))


def test_quality_finds_a_constructed_sliver():
    # tet 0: the unit corner tet; tet 1: a sliver, four nearly coplanar well-spaced corners
    sliver = [[0, 0, 0], [1, 1, 0], [1, 0, 0.02], [0, 1, 0.02]]
    mesh = ds.TetMesh(
        np.vstack([UNIT, np.array(sliver) + 3.0]),
        [[0, 1, 2, 3], [4, 5, 6, 7]],
        fix_orientation=True,
    )
    q = mesh.quality()
    assert list(q.slivers) == [1] and q.min_altitude_tet == 1 and q.worst_tet == 1
    assert q.aspect_ratios[0] == pytest.approx(np.sqrt(2) * np.sqrt(3))  # edge sqrt 2, alt 1/sqrt 3
    assert q.aspect_ratios[1] > 10 * q.aspect_ratios[0]
    assert q.min_altitude == pytest.approx(q.altitudes[1]) and q.altitudes[1] < 0.05
    text = str(q)
    assert "slivers (ratio > 10)" in text and "tets [1]" in text and "smallest altitude" in text
    assert len(ds.TetMesh.box(resolution=2).quality().slivers) == 0
    assert len(mesh.quality(sliver_ratio=1.0).slivers) == 2


def test_from_surface_and_load_accept_a_surface_path(tmp_path):
    path = tmp_path / "blob.stl"
    trimesh.creation.icosphere(subdivisions=1, radius=0.1).export(path)
    mesh = ds.TetMesh.from_surface(str(path), resolution=4)
    assert mesh.n_tets > 0 and (mesh.rest_volumes > 0).all()
    assert ds.TetMesh.load(path, resolution=4).n_tets == mesh.n_tets  # load tetrahedralizes it
    with pytest.raises(FileNotFoundError, match="surface file not found"):
        ds.TetMesh.from_surface(tmp_path / "nope.obj")
    with pytest.raises(TypeError, match="surface must be a trimesh.Trimesh"):
        ds.TetMesh.from_surface(42)
    with pytest.raises(ValueError, match="is a tet mesh file: load it with TetMesh.load"):
        ds.TetMesh.box(resolution=1).save(tmp_path / "m.msh")
        ds.TetMesh.from_surface(tmp_path / "m.msh")


def test_msh_keeps_body_ids_and_order(tmp_path):
    a = ds.TetMesh.box(resolution=1)
    b = ds.TetMesh.box(resolution=2, origin=(3, 0, 0))
    c = ds.TetMesh.box(resolution=1, origin=(0, 3, 0))
    mesh = ds.TetMesh.merge([a, b, c])
    mesh.save(tmp_path / "three.msh")
    back = ds.TetMesh.load(tmp_path / "three.msh")
    assert back.n_bodies == 3 and (back.body_ids == mesh.body_ids).all()
    assert (back.tets == mesh.tets).all() and np.allclose(back.vertices, mesh.vertices)
    text = (tmp_path / "three.msh").read_text()
    assert '3 2 "body1"' in text and "$Entities" in text
    a.save(tmp_path / "one.msh")  # one body: no $Entities, one node and element block
    assert "$Entities" not in (tmp_path / "one.msh").read_text()
    assert ds.TetMesh.load(tmp_path / "one.msh").n_bodies == 1


def test_msh_v22_physical_tags_become_bodies_unless_they_share_vertices(tmp_path):
    nodes = "\n".join(
        f"{i + 1} {x} {y} {z}"
        for i, (x, y, z) in enumerate(np.vstack([UNIT, UNIT + 2, UNIT[1:] + [0, 0, 1]]))
    )

    def write(name, elements):
        lines = [
            "$MeshFormat",
            "2.2 0 8",
            "$EndMeshFormat",
            "$Nodes",
            "11",
            nodes,
            "$EndNodes",
            "$Elements",
            str(len(elements)),
            *elements,
            "$EndElements",
        ]
        (tmp_path / name).write_text("\n".join(lines))
        return tmp_path / name

    apart = write("apart.msh", ["1 4 2 7 1 1 2 3 4", "2 4 2 9 2 5 6 7 8"])
    mesh = ds.TetMesh.load(apart, allow_unused_vertices=True)
    assert mesh.body_ids[:8].tolist() == [0] * 4 + [1] * 4
    # two physical volumes sharing vertex 4: one body
    glued = write("glued.msh", ["1 4 2 7 1 1 2 3 4", "2 4 2 9 2 4 9 10 11", "3 4 2 9 2 5 6 7 8"])
    assert ds.TetMesh.load(glued, allow_unused_vertices=True, fix_orientation=True).n_bodies == 1


def test_surface_only_msh_says_to_tetrahedralize(tmp_path):
    text = "$MeshFormat\n2.2 0 8\n$EndMeshFormat\n$Nodes\n3\n1 0 0 0\n2 1 0 0\n3 0 1 0\n$EndNodes\n"
    text += "$Elements\n1\n1 2 2 0 1 1 2 3\n$EndElements\n"
    (tmp_path / "tri.msh").write_text(text)
    with pytest.raises(ValueError, match="no 4-node tetrahedra .* surface mesh, tetrahedralize"):
        ds.TetMesh.load(tmp_path / "tri.msh")
