"""Meshing and file formats: from_surface(method=...), TetMesh.load/save through meshio,
surface files through load, and the VTU time-series export for ParaView.

The optional packages (tetgen, pytetwild, meshio: ``pip install diffsim[meshing]``) are
tested where they import; each such test skips with the reason otherwise. Their absence is
tested everywhere by hiding them (``sys.modules[name] = None``).
"""

from __future__ import annotations

import importlib
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
import trimesh

import diffsim as ds
from diffsim.mesh.meshio_io import MESHIO_SUFFIXES


def optional(name: str):
    """The optional package, or skip (naming it and the extra)."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        pytest.skip(f"{name} is not importable ({exc}); pip install diffsim[meshing]")


def ball(radius: float = 0.1, subdivisions: int = 2) -> trimesh.Trimesh:
    return trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)


def hide(monkeypatch, *names: str) -> None:
    """Makes ``import name`` fail as if the package were not installed."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


# ----------------------------------------------------------------- from_surface methods
@pytest.mark.parametrize("method", ["tetgen", "tetwild"])
def test_from_surface_with_a_real_tetrahedralizer_fills_the_ball(method):
    optional("tetgen" if method == "tetgen" else "pytetwild")
    mesh = ds.TetMesh.from_surface(ball(), resolution=6, method=method)
    exact = 4 / 3 * np.pi * 0.1**3
    assert (mesh.rest_volumes > 0).all()
    assert abs(mesh.rest_volumes.sum() - exact) / exact < 0.05
    radii = np.linalg.norm(mesh.vertices[mesh.surface_vertices], axis=1)
    assert np.abs(radii - 0.1).max() < 0.005  # the surface is kept (within the envelope)
    slivers = len(mesh.quality().slivers)
    # fTetWild's optimization leaves none; TetGen's refinement a few (3 of 513 tets here)
    assert slivers == 0 if method == "tetwild" else slivers < 0.02 * mesh.n_tets
    # every vertex is used by a tet (the constructor checks it) and finer means more tets
    finer = ds.TetMesh.from_surface(ball(), resolution=12, method=method)
    assert finer.n_tets > mesh.n_tets


def test_from_surface_takes_a_path_and_a_method(tmp_path):
    optional("tetgen")
    path = tmp_path / "ball.stl"
    ball().export(path)
    mesh = ds.TetMesh.from_surface(path, resolution=6, method="tetgen")
    assert mesh.n_tets > 0


def test_from_surface_rejects_an_unknown_method():
    with pytest.raises(ValueError, match=r"method must be one of \('voxel', 'tetwild', 'tetgen'\)"):
        ds.TetMesh.from_surface(ball(), method="delaunay")


@pytest.mark.parametrize(
    "method, package, extra", [("tetgen", "tetgen", "tetgen"), ("tetwild", "pytetwild", "meshing")]
)
def test_a_missing_tetrahedralizer_names_the_extra(monkeypatch, method, package, extra):
    hide(monkeypatch, package)
    with pytest.raises(ImportError, match=rf"needs the optional package .*diffsim\[{extra}\]"):
        ds.TetMesh.from_surface(ball(), method=method)


def test_a_tetrahedralizer_missing_its_own_import_names_that_import(monkeypatch):
    real = importlib.import_module

    def broken(name, *args):
        if name == "tetgen":
            raise ModuleNotFoundError("No module named 'pyvista'", name="pyvista")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(ImportError, match="could not import 'pyvista'.*pip install pyvista"):
        ds.TetMesh.from_surface(ball(), method="tetgen")


def test_from_surface_rejects_an_open_surface_for_every_method():
    open_surface = ball(subdivisions=1)
    open_surface.update_faces(np.arange(len(open_surface.faces)) > 0)
    for method in ("voxel", "tetgen", "tetwild"):
        with pytest.raises(ValueError, match="not closed"):
            ds.TetMesh.from_surface(open_surface, method=method)


# ----------------------------------------------------------------- load of surface files
@pytest.mark.parametrize("suffix", [".stl", ".obj", ".ply"])
def test_load_tetrahedralizes_a_surface_file(tmp_path, suffix):
    path = tmp_path / f"blob{suffix}"
    ball(subdivisions=1).export(path)
    mesh = ds.TetMesh.load(path, resolution=4)
    assert mesh.n_tets > 0 and (mesh.rest_volumes > 0).all()
    expected = ds.TetMesh.from_surface(path, resolution=4)
    assert np.allclose(mesh.vertices, expected.vertices) and (mesh.tets == expected.tets).all()


def test_load_of_a_surface_uses_the_default_resolution_and_checks_its_options(tmp_path):
    path = tmp_path / "blob.stl"
    ball(subdivisions=1).export(path)
    default = ds.TetMesh.load(path)
    assert default.n_tets == ds.TetMesh.from_surface(path, resolution=16).n_tets
    with pytest.raises(ValueError, match="takes resolution= and method= for it"):
        ds.TetMesh.load(path, fix_orientation=True)
    ds.TetMesh.box(resolution=1).save(tmp_path / "m.npz")
    with pytest.raises(ValueError, match="apply to surface files"):
        ds.TetMesh.load(tmp_path / "m.npz", resolution=4)
    with pytest.raises(FileNotFoundError, match="surface file not found"):
        ds.TetMesh.load(tmp_path / "nope.obj")
    with pytest.raises(ValueError, match=r"unknown mesh format '.xyz'; use a tet mesh"):
        ds.TetMesh.load(tmp_path / "m.xyz")


# ----------------------------------------------------------------- meshio formats
def two_bodies() -> ds.TetMesh:
    return ds.TetMesh.merge(
        [ds.TetMesh.box(resolution=2), ds.TetMesh.box(resolution=1, origin=(2.0, 0.0, 0.0))]
    )


@pytest.mark.parametrize("suffix", MESHIO_SUFFIXES)
def test_meshio_formats_round_trip_with_bodies(tmp_path, suffix):
    optional("meshio")
    mesh = two_bodies()
    path = tmp_path / f"two{suffix}"
    mesh.save(path)
    back = ds.TetMesh.load(path)
    assert np.allclose(back.vertices, mesh.vertices)
    assert (back.tets == mesh.tets).all()
    assert back.n_bodies == 2 and (back.body_ids == mesh.body_ids).all()
    one = ds.TetMesh.box(resolution=1)
    one.save(tmp_path / f"one{suffix}")
    assert ds.TetMesh.load(tmp_path / f"one{suffix}").n_bodies == 1


def test_tetgen_node_and_ele_are_one_mesh(tmp_path):
    optional("meshio")
    mesh = ds.TetMesh.box(resolution=2)
    mesh.save(tmp_path / "box.node")
    assert (tmp_path / "box.ele").is_file()
    a = ds.TetMesh.load(tmp_path / "box.node")
    b = ds.TetMesh.load(tmp_path / "box.ele")
    assert (a.tets == b.tets).all() and np.allclose(a.vertices, b.vertices)


def test_meshio_file_without_tets_is_a_clear_error(tmp_path):
    meshio = optional("meshio")
    surface = ball(subdivisions=1)
    meshio.write(tmp_path / "s.vtu", meshio.Mesh(surface.vertices, [("triangle", surface.faces)]))
    with pytest.raises(ValueError, match=r"holds no 4-node tetrahedra \(cells: triangle\)"):
        ds.TetMesh.load(tmp_path / "s.vtu")
    (tmp_path / "bad.vtu").write_text("not xml")
    with pytest.raises(ValueError, match="meshio could not read it"):
        ds.TetMesh.load(tmp_path / "bad.vtu")


def test_meshio_keeps_only_the_tets_and_their_vertices(tmp_path):
    meshio = optional("meshio")
    box = ds.TetMesh.box(resolution=1)
    points = np.vstack([box.vertices, [[5.0, 5.0, 5.0]]])  # a vertex only a triangle uses
    cells = [("triangle", np.array([[0, 1, 8]])), ("tetra", box.tets)]
    meshio.write(tmp_path / "mixed.vtu", meshio.Mesh(points, cells))
    back = ds.TetMesh.load(tmp_path / "mixed.vtu")
    assert back.n_vertices == 8 and (back.tets == box.tets).all()


@pytest.mark.parametrize("suffix", [".vtu", ".mesh", ".node"])
def test_meshio_formats_without_meshio_name_the_extra(tmp_path, monkeypatch, suffix):
    hide(monkeypatch, "meshio")
    with pytest.raises(ImportError, match=r"pip install diffsim\[meshing\]"):
        ds.TetMesh.box(resolution=1).save(tmp_path / f"m{suffix}")
    (tmp_path / f"m{suffix}").write_text("")
    with pytest.raises(ImportError, match=r"needs the optional package 'meshio'"):
        ds.TetMesh.load(tmp_path / f"m{suffix}")


def test_save_rejects_an_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"unknown mesh format '.stl'; use .msh, .npz, .vtu"):
        ds.TetMesh.box(resolution=1).save(tmp_path / "m.stl")


# ----------------------------------------------------------------- VTU time series
def falling_box():
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=2, origin=(0.0, 0.05, 0.0))
    material = ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.3)
    sim = ds.Simulator(mesh, material, dt=1e-3, backend="torch", dtype=torch.float64)
    with torch.no_grad():
        traj = sim.rollout(6, sim.initial_state(velocities=(0.0, 0.0, 0.0)))
    return sim, traj


def test_export_vtu_series_writes_a_pvd_with_stress_and_energy(tmp_path):
    meshio = optional("meshio")
    from diffsim.apps.export import export_vtu_series
    from diffsim.apps.fields import FieldContext, tet_field

    sim, traj = falling_box()
    out = tmp_path / "fall.pvd"
    frames = export_vtu_series(traj, out, sim.material, rest_positions=sim.mesh.vertices)
    assert len(frames) == traj.n_frames and all(f.is_file() for f in frames)
    root = ET.parse(out).getroot()
    assert root.attrib["type"] == "Collection"
    entries = root.find("Collection").findall("DataSet")
    times = [float(e.attrib["timestep"]) for e in entries]
    assert times == pytest.approx(list(traj.times))
    assert (out.parent / entries[-1].attrib["file"]).resolve() == frames[-1].resolve()
    last = meshio.read(frames[-1])
    assert np.allclose(last.points, traj.positions[-1].numpy())
    assert (last.cells_dict["tetra"] == sim.mesh.tets).all()
    assert last.point_data["velocity"].shape == (sim.mesh.n_vertices, 3)
    context = FieldContext.from_simulator(sim)
    for name in ("von_mises", "energy_density"):
        values = last.cell_data[name][0]
        assert values.shape == (sim.mesh.n_tets,)
        assert np.allclose(values, tet_field(name, context, traj.positions[-1]))
    first = meshio.read(frames[0])
    assert np.allclose(first.cell_data["von_mises"][0], 0.0, atol=1e-6)  # at rest


def test_export_without_a_material_has_only_vertex_fields_and_strides(tmp_path):
    meshio = optional("meshio")
    from diffsim.apps.export import export_vtu_series

    _, traj = falling_box()
    frames = export_vtu_series(traj, tmp_path / "x.pvd", stride=4)
    assert len(frames) == 3  # frames 0, 4 and the last (6)
    mesh = meshio.read(frames[1])
    assert "von_mises" not in mesh.cell_data and "displacement" in mesh.point_data
    assert np.allclose(
        mesh.point_data["displacement"], (traj.positions[4] - traj.positions[0]).numpy()
    )


def test_export_errors_are_clear(tmp_path, monkeypatch):
    optional("meshio")
    from diffsim.apps.export import export_vtu_series

    _, traj = falling_box()
    with pytest.raises(ValueError, match=r"a \.pvd file"):
        export_vtu_series(traj, tmp_path / "x.vtu")
    with pytest.raises(ValueError, match="folder .* does not exist"):
        export_vtu_series(traj, tmp_path / "nope" / "x.pvd")
    no_tets = ds.Trajectory(traj.positions, traj.velocities, traj.dt)
    with pytest.raises(ValueError, match="needs the tets"):
        export_vtu_series(no_tets, tmp_path / "x.pvd")
    hide(monkeypatch, "meshio")
    with pytest.raises(ImportError, match=r"pip install diffsim\[meshing\]"):
        export_vtu_series(traj, tmp_path / "x.pvd")


def test_render_cli_writes_a_pvd(tmp_path, capsys):
    optional("meshio")
    from diffsim.apps import cli

    sim, traj = falling_box()
    traj.save(tmp_path / "t.npz")
    out = tmp_path / "t.pvd"
    assert cli.main(["render", str(tmp_path / "t.npz"), "--out", str(out), "--stride", "2"]) == 0
    text = capsys.readouterr().out
    assert "wrote" in text and "4 VTU frames" in text and "--scene" in text
    assert out.is_file() and len(list((tmp_path / "t_frames").glob("*.vtu"))) == 4
