"""Headless rendering: polyscope's EGL backend draws frames; imageio writes PNG, MP4 or GIF.

Polyscope is one global window per process. :func:`init_headless` opens it once with the
``openGL3_egl`` backend (no display needed, e.g. Mesa EGL on a server);
:class:`FrameRenderer` registers a body's surface once and updates its vertex positions per
frame. :func:`write_frames` encodes frames (MP4 through imageio-ffmpeg, GIF through pillow,
or a folder of PNGs) and :func:`export_surfaces` writes OBJ or PLY surface sequences.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

# Default picture size in pixels; MP4 (yuv420p) needs even sizes.
DEFAULT_SIZE = (800, 600)
# Camera direction (from the target) of the fitted view, and its vertical field of view.
FIT_DIRECTION = np.array([0.55, 0.35, 1.0])
FIT_FOV_DEGREES = 45.0
BODY_COLOR = (0.35, 0.55, 0.85)
FIXED_COLOR = (0.85, 0.2, 0.15)
VIDEO_SUFFIXES = (".mp4", ".gif")
SURFACE_FORMATS = ("obj", "ply")


class RenderError(RuntimeError):
    """Rendering is unavailable or an output cannot be written; the message says why."""


def init_headless() -> None:
    """Opens polyscope's headless EGL window once per process.

    Raises:
        RenderError: polyscope or EGL is not available (the message names the fix).
    """
    try:
        import polyscope as ps
    except ImportError as exc:  # pragma: no cover - polyscope is a dependency
        raise RenderError("polyscope is not installed; pip install polyscope") from exc
    if ps.is_initialized():
        return  # already open (headless, or an interactive viewer's window)
    ps.set_verbosity(0)
    ps.set_use_prefs_file(False)
    ps.set_allow_headless_backends(True)
    ps.set_errors_throw_exceptions(True)
    try:
        ps.init("openGL3_egl")
    except Exception as exc:
        raise RenderError(
            f"cannot start polyscope's EGL backend ({str(exc).splitlines()[0]}); headless "
            "rendering needs an OpenGL 3.3 EGL driver (on Debian/Ubuntu: apt-get install "
            "libegl1 libgl1-mesa-dri)"
        ) from exc


def fit_camera(bounds: np.ndarray, fov_degrees: float = FIT_FOV_DEGREES) -> dict:
    """A camera that sees the box ``bounds`` ``[[min xyz], [max xyz]]`` (m), from the front-right.

    Returns:
        ``{"position": (x, y, z), "target": (x, y, z)}`` in metres.
    """
    bounds = np.asarray(bounds, dtype=np.float64)
    target = bounds.mean(axis=0)
    radius = max(0.5 * float(np.linalg.norm(bounds[1] - bounds[0])), 1e-6)
    distance = 1.15 * radius / math.sin(math.radians(fov_degrees) / 2)
    direction = FIT_DIRECTION / np.linalg.norm(FIT_DIRECTION)
    position = target + distance * direction
    return {"position": tuple(position.tolist()), "target": tuple(target.tolist())}


def frame_stride(dt: float, fps: int) -> int:
    """Steps per video frame so the video plays in real time: ``round(1 / (fps dt))``, >= 1."""
    return max(1, round(1.0 / (fps * dt)))


def frame_indices(n_frames: int, stride: int, count: int | None = None) -> list[int]:
    """Frames ``0, stride, 2 stride, ...`` of ``n_frames`` (at most ``count``), the last included.

    The last frame is appended when the stride skips it, so the end state is always shown.
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    picks = list(range(0, n_frames, stride))
    if picks and picks[-1] != n_frames - 1:
        picks.append(n_frames - 1)
    if count is not None:
        picks = picks[:count]
    return picks


class FrameRenderer:
    """Draws one body's surface headless, frame after frame.

    Args:
        faces: surface triangles ``[f, 3]`` (vertex indices of the full mesh).
        positions: first-frame vertex positions ``[n, 3]`` (m).
        size: picture ``(width, height)`` in pixels.
        camera: ``{"position", "target"}`` in metres, or None to fit ``bounds``.
        bounds: ``[2, 3]`` box the whole motion stays in (m): the camera is fitted to it and
            the ground plane spans it (default: the first frame's bounding box).
        ground: ground plane height (m) to draw, or None for polyscope's automatic floor.
        fixed: indices of fixed vertices, drawn as red points (or None).
        body_ids: ``[n]`` body index per vertex; several bodies get distinct colours.
    """

    def __init__(
        self,
        faces: np.ndarray,
        positions: np.ndarray,
        *,
        size: Sequence[int] = DEFAULT_SIZE,
        camera: dict | None = None,
        bounds: np.ndarray | None = None,
        ground: float | None = 0.0,
        fixed: np.ndarray | None = None,
        body_ids: np.ndarray | None = None,
    ) -> None:
        import polyscope as ps

        width, height = (int(s) for s in size)
        if width < 16 or height < 16:
            raise ValueError(
                f"picture size must be at least 16 x 16 pixels, got {width} x {height}"
            )
        init_headless()
        self._ps = ps
        ps.remove_all_structures()
        ps.set_window_size(width, height)
        ps.set_build_default_gui_panels(False)
        ps.set_up_dir("y_up")
        ps.set_front_dir("z_front")
        ps.set_SSAA_factor(2)
        ps.set_background_color((1.0, 1.0, 1.0))
        ps.set_ground_plane_mode("tile_reflection")
        if ground is None:
            ps.set_ground_plane_height_mode("automatic")
        else:
            ps.set_ground_plane_height_mode("manual")
            ps.set_ground_plane_height(float(ground))
        positions = np.asarray(positions, dtype=np.float64)
        self.size = (width, height)
        self.faces = np.asarray(faces, dtype=np.int64)
        self._mesh = ps.register_surface_mesh(
            "body", positions, self.faces, color=BODY_COLOR, edge_width=0.5, smooth_shade=False
        )
        self._fixed = None
        if fixed is not None and len(fixed):
            self.fixed = np.asarray(fixed, dtype=np.int64)
            self._fixed = ps.register_point_cloud(
                "fixed vertices", positions[self.fixed], color=FIXED_COLOR, radius=0.01
            )
        bounds = _bounds(positions) if bounds is None else np.asarray(bounds, dtype=np.float64)
        # Fixed scene extents: the ground plane stays put and spans the whole motion.
        ps.set_automatically_compute_scene_extents(False)
        ps.set_bounding_box(tuple(bounds[0]), tuple(bounds[1]))
        ps.set_length_scale(max(float(np.linalg.norm(bounds[1] - bounds[0])), 1e-6))
        if camera is None:
            camera = fit_camera(bounds)
        self.camera = camera
        ps.look_at(tuple(camera["position"]), tuple(camera["target"]))
        if body_ids is not None and len(np.unique(body_ids)) > 1:
            colors = np.asarray(body_palette(int(np.max(body_ids)) + 1))[np.asarray(body_ids)]
            self._mesh.add_color_quantity("body", colors, enabled=True)

    def render(
        self,
        positions: np.ndarray,
        field: tuple[str, np.ndarray] | None = None,
        vminmax: tuple[float, float] | None = None,
    ) -> np.ndarray:
        """One picture ``[height, width, 3]`` uint8 of the body at ``positions [n, 3]``.

        Args:
            positions: vertex positions (m).
            field: ``(name, values [n])`` to colour the surface by, with a colour bar.
            vminmax: the colour map's range (default: the values' range).
        """
        ps = self._ps
        positions = np.asarray(positions, dtype=np.float64)
        self._mesh.update_vertex_positions(positions)
        if self._fixed is not None:
            self._fixed.update_point_positions(positions[self.fixed])
        if field is not None:
            name, values = field
            values = np.asarray(values, dtype=np.float64)
            if vminmax is None:
                vminmax = (float(values.min()), float(values.max()))
            self._mesh.add_scalar_quantity(
                name,
                values,
                enabled=True,
                cmap="viridis",
                vminmax=vminmax,
                onscreen_colorbar_enabled=True,
            )
        image = ps.screenshot_to_buffer(transparent_bg=False, include_UI=field is not None)
        return np.ascontiguousarray(image[:, :, :3])

    def close(self) -> None:
        """Removes the structures this renderer registered."""
        self._ps.remove_all_structures()


def body_palette(n: int) -> list[tuple[float, float, float]]:
    """``n`` distinguishable RGB colours in [0, 1], the first one :data:`BODY_COLOR`."""
    base = [BODY_COLOR, (0.9, 0.55, 0.25), (0.45, 0.75, 0.45), (0.75, 0.45, 0.8), (0.9, 0.8, 0.3)]
    return [base[i % len(base)] for i in range(n)]


def _bounds(positions: np.ndarray) -> np.ndarray:
    return np.stack([positions.min(axis=0), positions.max(axis=0)])


def trajectory_bounds(positions: np.ndarray, ground: float | None = None) -> np.ndarray:
    """Bounding box ``[2, 3]`` of all frames ``[T, n, 3]``, reaching down to the ground."""
    flat = np.asarray(positions).reshape(-1, 3)
    bounds = _bounds(flat)
    if ground is not None:
        bounds[0, 1] = min(bounds[0, 1], ground)
    return bounds


def surface_faces(trajectory) -> np.ndarray:
    """Boundary triangles ``[f, 3]`` of a :class:`diffsim.Trajectory` (from its tets if needed).

    Raises:
        ValueError: the trajectory holds neither surface faces nor tets.
    """
    if trajectory.surface_faces is not None:
        return np.asarray(trajectory.surface_faces, dtype=np.int64)
    if trajectory.tets is None:
        raise ValueError("the trajectory holds neither surface_faces nor tets; nothing to draw")
    from diffsim.mesh import TetMesh

    rest = trajectory.positions[0].detach().cpu().double().numpy()
    return TetMesh(rest, trajectory.tets, allow_unused_vertices=True).surface_faces


def check_output(path: str | Path) -> str:
    """The output kind of ``path``: ``"mp4"``, ``"gif"``, ``"png"`` or ``"dir"`` (a folder).

    A path ending in ``/`` or naming an existing folder is a folder of PNG frames.

    Raises:
        RenderError: an unknown suffix or a parent folder that does not exist.
    """
    text = str(path)
    path = Path(path)
    if text.endswith(("/", "\\")) or path.is_dir():
        return "dir"
    suffix = path.suffix.lower()
    if suffix not in (*VIDEO_SUFFIXES, ".png"):
        raise RenderError(f"{path}: unknown output type {suffix!r}; use .mp4, .gif, .png or DIR/")
    if not path.parent.exists():
        raise RenderError(f"{path}: folder {path.parent} does not exist")
    return suffix[1:]


def write_frames(frames: Iterable[np.ndarray], path: str | Path, fps: int) -> int:
    """Writes pictures ``[h, w, 3]`` uint8 as MP4, GIF, one PNG, or PNGs in a folder.

    A ``.png`` path keeps the last frame; a folder gets ``frame_00000.png``, ...

    Returns:
        The number of frames written.
    """
    kind = check_output(path)
    path = Path(path)
    if kind == "dir":
        import imageio.v3 as iio

        path.mkdir(parents=True, exist_ok=True)
        count = 0
        for i, frame in enumerate(frames):
            iio.imwrite(path / f"frame_{i:05d}.png", frame)
            count += 1
        return count
    if kind == "png":
        import imageio.v3 as iio

        last = None
        count = 0
        for frame in frames:
            last, count = frame, count + 1
        if last is not None:
            iio.imwrite(path, last)
        return count
    if kind == "gif":
        import imageio.v3 as iio

        stack = list(frames)
        if not stack:
            raise RenderError("no frames to write")
        # pillow's GIF writer takes the frame duration in ms.
        iio.imwrite(path, np.stack(stack), duration=1000.0 / fps, loop=0)
        return len(stack)
    return _write_mp4(frames, path, fps)


def _write_mp4(frames: Iterable[np.ndarray], path: Path, fps: int) -> int:
    import imageio.v2 as imageio

    count = 0
    try:
        writer = imageio.get_writer(
            path, fps=fps, codec="libx264", quality=8, macro_block_size=2, pixelformat="yuv420p"
        )
    except Exception as exc:
        raise RenderError(
            f"cannot write {path}: {exc}; MP4 needs imageio-ffmpeg (pip install imageio-ffmpeg)"
        ) from exc
    with writer:
        for frame in frames:
            writer.append_data(frame)
            count += 1
    return count


def export_surfaces(
    positions: np.ndarray | Iterable[np.ndarray],
    faces: np.ndarray,
    folder: str | Path,
    fmt: str = "obj",
) -> list[Path]:
    """Writes each frame's surface as ``frame_00000.obj`` (or ``.ply``) in ``folder``.

    Args:
        positions: ``[T, n, 3]`` or an iterable of ``[n, 3]`` vertex positions (m).
        faces: surface triangles ``[f, 3]``; only the vertices they use are written.
        folder: output folder (created).
        fmt: ``"obj"`` (text) or ``"ply"`` (binary little-endian).

    Returns:
        The files written.
    """
    if fmt not in SURFACE_FORMATS:
        raise ValueError(f"unknown surface format {fmt!r}; use one of {SURFACE_FORMATS}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    faces = np.asarray(faces, dtype=np.int64)
    used = np.unique(faces)
    local = np.searchsorted(used, faces)
    writer = _write_obj if fmt == "obj" else _write_ply
    paths = []
    for i, x in enumerate(positions):
        path = folder / f"frame_{i:05d}.{fmt}"
        writer(path, np.asarray(x, dtype=np.float64)[used], local)
        paths.append(path)
    return paths


def _write_obj(path: Path, vertices: np.ndarray, faces: np.ndarray) -> None:
    with open(path, "w") as f:
        f.write("# diffsim surface\n")
        np.savetxt(f, vertices, fmt="v %.9g %.9g %.9g")
        np.savetxt(f, faces + 1, fmt="f %d %d %d")


def _write_ply(path: Path, vertices: np.ndarray, faces: np.ndarray) -> None:
    header = (
        "ply\nformat binary_little_endian 1.0\ncomment diffsim surface\n"
        f"element vertex {len(vertices)}\nproperty float x\nproperty float y\nproperty float z\n"
        f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n"
    )
    records = np.empty(len(faces), dtype=[("n", "u1"), ("idx", "<i4", (3,))])
    records["n"] = 3
    records["idx"] = faces
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(vertices.astype("<f4").tobytes())
        f.write(records.tobytes())


def render_trajectory(
    positions: np.ndarray,
    faces: np.ndarray,
    out: str | Path,
    *,
    dt: float,
    fps: int = 30,
    stride: int | None = None,
    max_frames: int | None = None,
    size: Sequence[int] = DEFAULT_SIZE,
    camera: dict | None = None,
    ground: float | None = 0.0,
    fixed: np.ndarray | None = None,
    body_ids: np.ndarray | None = None,
    field: str | None = None,
    velocities: np.ndarray | None = None,
    context=None,
) -> int:
    """Renders recorded frames to a video, a PNG or a folder of PNGs.

    Args:
        positions: ``[T, n, 3]`` vertex positions per recorded step (m).
        faces: surface triangles ``[f, 3]``.
        out: ``.mp4``, ``.gif``, ``.png`` (the last frame) or a folder.
        dt: time between recorded frames (s).
        fps: video frame rate.
        stride: recorded steps per video frame (default: real time, :func:`frame_stride`).
        max_frames: at most this many video frames (the first ones).
        size: ``(width, height)`` in pixels.
        camera: ``{"position", "target"}`` (m), or None to fit all frames.
        ground: ground height to draw (m), or None.
        fixed: fixed vertex indices to mark, or None.
        body_ids: ``[n]`` body index per vertex (distinct colours per body), or None.
        field: colour by this :data:`diffsim.fields.FIELDS` name (with a colour bar), or None.
        velocities: ``[T, n, 3]`` (m/s), needed for the ``"speed"`` field.
        context: a :class:`diffsim.fields.FieldContext` for fields.

    Returns:
        The number of frames written.
    """
    kind = check_output(out)
    positions = np.asarray(positions)
    stride = frame_stride(dt, fps) if stride is None else stride
    picks = frame_indices(len(positions), stride, max_frames)
    if kind == "png":
        picks = picks[-1:]
    values = None
    if field is not None:
        from diffsim.fields import vertex_field

        if context is None:
            raise ValueError(f"field {field!r} needs a FieldContext")
        values = [
            vertex_field(
                field, context, positions[i], None if velocities is None else velocities[i]
            )
            for i in picks
        ]
        lo = min(float(v.min()) for v in values)
        hi = max(float(v.max()) for v in values)
        vminmax = (lo, hi if hi > lo else lo + 1e-12)
    bounds = trajectory_bounds(positions[picks], ground)
    renderer = FrameRenderer(
        faces,
        positions[picks[0]],
        size=size,
        camera=camera,
        bounds=bounds,
        ground=ground,
        fixed=fixed,
        body_ids=body_ids,
    )

    label = None
    if field is not None:
        from diffsim.fields import FIELDS

        label = f"{field} ({FIELDS[field][0]})"

    def frames():
        for k, i in enumerate(picks):
            colour = None if values is None else (label, values[k])
            yield renderer.render(positions[i], colour, vminmax if values is not None else None)

    try:
        return write_frames(frames(), out, fps)
    finally:
        renderer.close()
