"""Headless rendering (polyscope EGL): pictures, videos of every scene, surface export, fields."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import diffsim as ds
from diffsim.apps import render
from diffsim.apps.fields import FieldContext, tet_field, tets_to_vertices, vertex_field
from diffsim.apps.scene import load_scene

from .helpers import build_scene

torch.set_num_threads(1)

SCENES = sorted((Path(__file__).resolve().parents[1] / "scenes").glob("*.py"))


@pytest.fixture(scope="module")
def egl():
    try:
        render.init_headless()
    except render.RenderError as exc:
        pytest.skip(f"headless EGL rendering unavailable: {exc}")


def bluish(pixels: np.ndarray) -> np.ndarray:
    """Where pixels have the body's blue tint (blue well above red), [h, w] bool."""
    p = pixels.astype(int)
    return p[..., 2] - p[..., 0] > 40


def test_picture_is_not_blank_and_shows_the_mesh_where_the_camera_points(egl):
    mesh = ds.TetMesh.box(size=(0.2, 0.2, 0.2), resolution=1, origin=(1.0, 0.5, -2.0))
    centre = mesh.bounds.mean(axis=0)
    camera = {"position": tuple(centre + [0.3, 0.2, 0.8]), "target": tuple(centre)}
    r = render.FrameRenderer(mesh.surface_faces, mesh.vertices, size=(96, 64), camera=camera)
    image = r.render(mesh.vertices)
    assert image.shape == (64, 96, 3) and image.dtype == np.uint8
    assert image.std() > 10  # not blank
    h, w = image.shape[:2]
    centre_patch = bluish(image[h // 2 - 4 : h // 2 + 4, w // 2 - 4 : w // 2 + 4])
    assert centre_patch.mean() > 0.75  # the body is where the camera looks
    assert bluish(image[:6, :6]).mean() == 0  # and not in the corner
    # Look well to the side: the body leaves the centre.
    away = {"position": camera["position"], "target": tuple(centre + [2.0, 0.0, 0.0])}
    r2 = render.FrameRenderer(mesh.surface_faces, mesh.vertices, size=(96, 64), camera=away)
    image2 = r2.render(mesh.vertices)
    assert bluish(image2[h // 2 - 4 : h // 2 + 4, w // 2 - 4 : w // 2 + 4]).mean() < 0.1
    r2.close()


def test_moving_the_mesh_moves_it_in_the_picture(egl):
    mesh = ds.TetMesh.box(size=(0.2, 0.2, 0.2), resolution=1, origin=(-0.1, 0.1, -0.1))
    camera = {"position": (0.0, 0.2, 1.5), "target": (0.0, 0.2, 0.0)}
    r = render.FrameRenderer(mesh.surface_faces, mesh.vertices, size=(128, 64), camera=camera)
    left = bluish(r.render(mesh.vertices - [0.4, 0, 0]))
    right = bluish(r.render(mesh.vertices + [0.4, 0, 0]))
    cols = np.arange(128)
    assert (cols * left.sum(0)).sum() / left.sum() < 50
    assert (cols * right.sum(0)).sum() / right.sum() > 78
    r.close()


def test_bodies_get_distinct_colours(egl):
    a = ds.TetMesh.box(size=(0.2, 0.2, 0.2), resolution=1, origin=(-0.3, 0.1, -0.1))
    b = ds.TetMesh.box(size=(0.2, 0.2, 0.2), resolution=1, origin=(0.1, 0.1, -0.1))
    both = ds.TetMesh.merge([a, b])
    camera = {"position": (0.0, 0.3, 1.2), "target": (0.0, 0.2, 0.0)}
    r = render.FrameRenderer(
        both.surface_faces, both.vertices, size=(128, 64), camera=camera, body_ids=both.body_ids
    )
    image = r.render(both.vertices).astype(int)
    r.close()
    orange = (image[..., 0] - image[..., 2]) > 60
    cols = np.arange(128)
    assert bluish(image).sum() > 50 and orange.sum() > 50
    assert (cols * bluish(image).sum(0)).sum() / bluish(image).sum() < 64  # body 0 on the left
    assert (cols * orange.sum(0)).sum() / orange.sum() > 64  # body 1 on the right


@pytest.mark.parametrize("path", SCENES, ids=[p.stem for p in SCENES])
def test_video_of_each_scene_decodes_with_the_requested_frames_and_size(egl, tmp_path, path):
    import imageio.v3 as iio

    scene = load_scene(path)
    sim = build_scene(scene)  # skips a scene whose assets are absent
    with torch.no_grad():
        traj = sim.rollout(6, scene.initial_state(sim))
    out = tmp_path / f"{path.stem}.mp4"
    n = render.render_trajectory(
        traj.positions.numpy(),
        sim.mesh.surface_faces,
        out,
        dt=traj.dt,
        fps=scene.fps,
        stride=2,
        size=(80, 48),
        camera=scene.camera,
        ground=None if sim.model.ground is None else sim.model.ground.height,
        fixed=sim.model.fixed_indices.numpy(),
    )
    frames = iio.imread(out)
    assert n == 4 and frames.shape == (4, 48, 80, 3)  # frames 0, 2, 4, 6
    assert frames.std() > 5


def test_gif_png_and_folder_outputs_with_a_field(egl, tmp_path):
    import imageio.v3 as iio

    mesh = ds.TetMesh.box(size=(0.2, 0.2, 0.2), resolution=2, origin=(-0.1, 0.1, -0.1))
    frames = np.stack([mesh.vertices + [0.0, 0.02 * i, 0.0] for i in range(5)])
    context = FieldContext(mesh.vertices, mesh.tets)
    common = dict(dt=0.01, stride=1, size=(64, 48), field="displacement", context=context)
    assert render.render_trajectory(frames, mesh.surface_faces, tmp_path / "a.gif", **common) == 5
    gif = iio.imread(tmp_path / "a.gif")
    assert gif.shape[0] == 5 and gif.shape[1:3] == (48, 64)
    render.render_trajectory(frames, mesh.surface_faces, tmp_path / "last.png", **common)
    assert iio.imread(tmp_path / "last.png").shape == (48, 64, 3)
    n = render.render_trajectory(
        frames, mesh.surface_faces, str(tmp_path / "pngs") + "/", max_frames=3, **common
    )
    assert n == 3 and len(list((tmp_path / "pngs").glob("frame_*.png"))) == 3


def test_bad_outputs_are_clear_errors(tmp_path):
    with pytest.raises(render.RenderError, match="unknown output type '.avi'"):
        render.check_output(tmp_path / "x.avi")
    with pytest.raises(render.RenderError, match="does not exist"):
        render.check_output(tmp_path / "missing" / "x.mp4")
    assert render.check_output(tmp_path) == "dir"


def test_frame_selection_and_camera_fit():
    assert render.frame_stride(1e-3, 30) == 33
    assert render.frame_stride(0.1, 30) == 1
    assert render.frame_indices(10, 4) == [0, 4, 8, 9]
    assert render.frame_indices(9, 4) == [0, 4, 8]
    assert render.frame_indices(10, 4, count=2) == [0, 4]
    cam = render.fit_camera(np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 1.0]]))
    assert np.allclose(cam["target"], (0.5, 1.0, 0.5))
    assert np.linalg.norm(np.subtract(cam["position"], cam["target"])) > 1.2


@pytest.mark.parametrize("fmt", ["obj", "ply"])
def test_surface_export_reads_back(tmp_path, fmt):
    import trimesh

    mesh = ds.TetMesh.box(size=(0.2, 0.3, 0.4), resolution=2)
    frames = np.stack([mesh.vertices, mesh.vertices + 1.0])
    paths = render.export_surfaces(frames, mesh.surface_faces, tmp_path, fmt)
    assert [p.name for p in paths] == [f"frame_00000.{fmt}", f"frame_00001.{fmt}"]
    loaded = trimesh.load(paths[1], process=False, force="mesh")
    surf = mesh.surface_vertices
    assert len(loaded.vertices) == len(surf) and len(loaded.faces) == len(mesh.surface_faces)
    assert np.allclose(
        np.sort(loaded.vertices, 0), np.sort(mesh.vertices[surf] + 1.0, 0), atol=1e-6
    )
    assert loaded.is_watertight
    assert loaded.volume == pytest.approx(0.2 * 0.3 * 0.4, rel=1e-5)  # outward normals


def test_fields_at_rest_and_under_stretch():
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=2)
    material = ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.3)
    ctx = FieldContext(mesh.vertices, mesh.tets, material)
    assert ctx.available() == ["speed", "displacement", "energy_density", "von_mises"]
    assert FieldContext(mesh.vertices).available() == ["speed", "displacement"]
    x = mesh.vertices.copy()
    assert np.abs(vertex_field("von_mises", ctx, x)).max() < 1e-6
    assert np.abs(vertex_field("energy_density", ctx, x)).max() < 1e-6
    stretched = x * [1.01, 1.0, 1.0]
    sigma = tet_field("von_mises", ctx, stretched)
    # Uniaxial strain 1%: von Mises = |sigma_xx - sigma_yy| = 2 mu * 0.01 for small strain.
    mu = 1e5 / (2 * 1.3)
    assert np.allclose(sigma, 2 * mu * 0.01, rtol=0.05)
    energy = vertex_field("energy_density", ctx, stretched)
    assert (energy > 0).all()
    v = np.zeros_like(x)
    v[:, 1] = 2.0
    assert np.allclose(vertex_field("speed", ctx, x, v), 2.0)
    assert np.allclose(vertex_field("displacement", ctx, x + [0.0, 0.0, 0.3]), 0.3)
    assert np.allclose(tets_to_vertices(np.full(mesh.n_tets, 7.0), ctx), 7.0)
    with pytest.raises(ValueError, match="unknown field"):
        vertex_field("pressure", ctx, x)
    with pytest.raises(ValueError, match="needs the mesh's tets and a material"):
        vertex_field("von_mises", FieldContext(mesh.vertices, mesh.tets), x)
