"""Headless rendering: polyscope's EGL backend draws frames; imageio writes PNG, MP4 or GIF.

Polyscope is one global window per process. :func:`init_headless` opens it once with the
``openGL3_egl`` backend (no display needed, e.g. Mesa EGL on a server);
:class:`FrameRenderer` registers a body's surface once and updates its vertex positions per
frame. :func:`write_frames` encodes frames (MP4 through imageio-ffmpeg, GIF through pillow,
or a folder of PNGs) and :func:`export_surfaces` writes OBJ or PLY surface sequences.

Pictures by default: a tiled floor with the bodies' shadows where the scene has a ground,
no floor where it has none; a camera that frames the whole motion (:func:`fit_camera`);
videos of at least :data:`MIN_VIDEO_SECONDS` (short motions play in slow motion,
:func:`video_stride`).
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
# Shadow darkness on the floor (0: none, 1: black).
SHADOW_DARKNESS = 0.4
# A default video lasts at least this long (s): short motions play in slow motion ...
MIN_VIDEO_SECONDS = 3.0
# ... but at most this many times slower than real time.
MAX_SLOW_MOTION = 10.0
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


def fit_camera(
    bounds: np.ndarray,
    fov_degrees: float = FIT_FOV_DEGREES,
    direction: Sequence[float] | None = None,
    aspect: float = DEFAULT_SIZE[0] / DEFAULT_SIZE[1],
    fill: float = 0.85,
) -> dict:
    """A camera that frames the box ``bounds`` ``[[min xyz], [max xyz]]`` (m).

    The camera looks at the box's centre from ``direction`` and stands just far enough
    that all eight corners fall inside the middle ``fill`` of the picture.

    Args:
        bounds: the box to frame (e.g. the bounding box of a whole trajectory).
        fov_degrees: the vertical field of view.
        direction: from the target towards the camera (any length), or None for
            :data:`FIT_DIRECTION` (front-right, a little above).
        aspect: picture width / height.
        fill: fraction of the picture's half-width and half-height the box may use.

    Returns:
        ``{"position": (x, y, z), "target": (x, y, z)}`` in metres.
    """
    bounds = np.asarray(bounds, dtype=np.float64)
    target = bounds.mean(axis=0)
    d = FIT_DIRECTION if direction is None else np.asarray(direction, dtype=np.float64)
    norm = float(np.linalg.norm(d))
    if not np.isfinite(norm) or norm == 0:
        d, norm = FIT_DIRECTION, float(np.linalg.norm(FIT_DIRECTION))
    back = d / norm  # from the target towards the camera
    up = np.array([0.0, 1.0, 0.0])
    if abs(float(back @ up)) > 0.999:  # looking straight down or up
        up = np.array([0.0, 0.0, -1.0])
    right = np.cross(up, back)
    right /= np.linalg.norm(right)
    true_up = np.cross(back, right)
    tan_v = math.tan(math.radians(fov_degrees) / 2) * fill
    tan_h = tan_v * aspect
    corners = np.array(
        [[x, y, z] for x in bounds[:, 0] for y in bounds[:, 1] for z in bounds[:, 2]]
    )
    rel = corners - target
    u, v, w = rel @ right, rel @ true_up, rel @ back
    # A corner at depth D - w needs |u| <= (D - w) tan_h and |v| <= (D - w) tan_v.
    distance = float(np.max(np.maximum(w + np.abs(u) / tan_h, w + np.abs(v) / tan_v)))
    size = max(float(np.linalg.norm(bounds[1] - bounds[0])), 1e-6)
    distance = max(distance, float(w.max()) + 0.05 * size, 1e-3)
    position = target + distance * back
    return {"position": tuple(position.tolist()), "target": tuple(target.tolist())}


def check_camera(camera: dict) -> dict:
    """``camera`` with float 3-tuples, checked.

    Raises:
        ValueError: not ``{"position", "target"}`` of 3 finite numbers each, or a position
            equal to the target (no view direction).
    """
    try:
        position = tuple(float(c) for c in camera["position"])
        target = tuple(float(c) for c in camera["target"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            'a camera is {"position": (x, y, z), "target": (x, y, z)} in metres'
        ) from None
    if len(position) != 3 or len(target) != 3:
        raise ValueError("camera position and target need 3 coordinates each (x, y, z)")
    if not all(math.isfinite(c) for c in position + target):
        raise ValueError(f"camera coordinates must be finite, got {position} -> {target}")
    if np.allclose(position, target, rtol=0.0, atol=1e-9):
        raise ValueError(
            f"camera position {position} equals its target: move the camera away from the "
            "point it looks at"
        )
    return {"position": position, "target": target}


def frame_stride(dt: float, fps: int) -> int:
    """Steps per video frame so the video plays in real time: ``round(1 / (fps dt))``, >= 1."""
    return max(1, round(1.0 / (fps * dt)))


def video_stride(
    n_steps: int,
    dt: float,
    fps: int,
    min_seconds: float = MIN_VIDEO_SECONDS,
    max_slow_motion: float = MAX_SLOW_MOTION,
) -> int:
    """Steps per video frame for a default video: real time, or slow motion if that is short.

    A motion of ``n_steps`` steps of ``dt`` that would play for less than ``min_seconds``
    in real time (:func:`frame_stride`) is slowed down to last ``min_seconds``, at most
    ``max_slow_motion`` times slower than real time.
    """
    real = frame_stride(dt, fps)
    if n_steps <= 0:
        return real
    wanted = max(1, math.floor(n_steps / (fps * min_seconds)))
    slowest = max(1, math.ceil(real / max_slow_motion))
    return min(real, max(wanted, slowest))


def slow_motion(stride: int, dt: float, fps: int) -> float:
    """How many times slower than real time a video with ``stride`` steps per frame plays."""
    return 1.0 / (fps * dt * stride)


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
        ground: height (m) of the scene's ground, drawn as a tiled floor, or None for a
            scene without ground (no floor: floating bodies do not seem to stand on one).
        fixed: indices of fixed vertices, drawn as red points (or None).
        body_ids: ``[n]`` body index per vertex; several bodies get distinct colours.
        view_direction: for a fitted camera, the direction from the target towards the
            camera (e.g. a scene's ``CAMERA`` position minus target), or None.
        shadows: draw the bodies' shadows on the floor (a second, shadow-only pass).

    Raises:
        ValueError: a picture smaller than 16 x 16 or a camera whose position equals its
            target.
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
        view_direction: Sequence[float] | None = None,
        shadows: bool = True,
    ) -> None:
        import polyscope as ps

        width, height = (int(s) for s in size)
        if width < 16 or height < 16:
            raise ValueError(
                f"picture size must be at least 16 x 16 pixels, got {width} x {height}"
            )
        if camera is not None:
            camera = check_camera(camera)
        init_headless()
        self._ps = ps
        ps.remove_all_structures()
        ps.set_window_size(width, height)
        ps.set_build_default_gui_panels(False)
        ps.set_up_dir("y_up")
        ps.set_front_dir("z_front")
        ps.set_SSAA_factor(2)
        ps.set_background_color((1.0, 1.0, 1.0))
        self.ground = None if ground is None else float(ground)
        self.shadows = bool(shadows) and self.ground is not None
        if self.ground is None:
            ps.set_ground_plane_mode("none")
        else:
            ps.set_ground_plane_mode("tile")
            ps.set_ground_plane_height_mode("manual")
            ps.set_ground_plane_height(self.ground)
            ps.set_shadow_darkness(SHADOW_DARKNESS)
            ps.set_shadow_blur_iters(0)  # blurring costs ~0.4 s a frame on a software renderer
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
            camera = fit_camera(bounds, direction=view_direction, aspect=width / height)
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
        ui = field is not None
        image = ps.screenshot_to_buffer(transparent_bg=False, include_UI=ui)[:, :, :3]
        if self.shadows:
            # Polyscope draws shadows only without the tiles: a second, shadow-only pass
            # (white, grey shadow, coloured bodies) darkens the tiled picture where it is grey.
            ps.set_ground_plane_mode("shadow_only")
            try:
                shade = ps.screenshot_to_buffer(transparent_bg=False, include_UI=ui)[:, :, :3]
            finally:
                ps.set_ground_plane_mode("tile")
            image = apply_shadow(image, shade)
        return np.ascontiguousarray(image)

    def close(self) -> None:
        """Removes the structures this renderer registered."""
        self._ps.remove_all_structures()


def body_palette(n: int) -> list[tuple[float, float, float]]:
    """``n`` distinguishable RGB colours in [0, 1], the first one :data:`BODY_COLOR`."""
    base = [BODY_COLOR, (0.9, 0.55, 0.25), (0.45, 0.75, 0.45), (0.75, 0.45, 0.8), (0.9, 0.8, 0.3)]
    return [base[i % len(base)] for i in range(n)]


def colour_range(lo: float, hi: float, rel: float = 4e-3) -> tuple[float, float]:
    """A colour map range for values in ``[lo, hi]`` whose colour bar labels differ.

    Values that are all nearly the same (within ``rel``, relative), e.g. the speed of a
    body in free fall, would give a colour bar whose five labels (four significant
    digits) show one number and colours that show rounding noise: a range from 0 is used
    instead for non-negative values (0 .. value, or 0 .. 1 for all zeros), else 10% either
    side.
    """
    lo, hi = float(lo), float(hi)
    if hi - lo > rel * max(abs(lo), abs(hi)) and hi > lo:
        return lo, hi
    if lo >= 0:
        return 0.0, hi if hi > 0 else 1.0
    pad = 0.1 * max(abs(lo), abs(hi))
    return lo - pad, hi + pad


def apply_shadow(image: np.ndarray, shade: np.ndarray, tolerance: int = 10) -> np.ndarray:
    """``image`` darkened where the shadow-only picture ``shade`` is grey (a shadow).

    Args:
        image: the picture with the floor, ``[h, w, 3]`` uint8.
        shade: the same view with a shadow-only ground on white, ``[h, w, 3]`` uint8.
        tolerance: channel spread below which a pixel of ``shade`` counts as grey.
    """
    shade = shade.astype(np.int16)
    grey = (shade.max(axis=2) - shade.min(axis=2)) < tolerance
    factor = np.where(grey, shade.mean(axis=2) / 255.0, 1.0)[..., None]
    return (image * factor).round().astype(np.uint8)


def label_image(
    image: np.ndarray, text: str, corner: str = "top-left", scale: float = 1.0
) -> np.ndarray:
    """A copy of ``image`` with ``text`` written in a corner, dark on a light box.

    Args:
        image: ``[h, w, 3]`` uint8.
        text: the label (one line).
        corner: ``"top-left"`` or ``"top-right"``.
        scale: font size relative to the default (1/20 of the picture height, >= 10 px).
    """
    from PIL import Image, ImageDraw, ImageFont

    h, w = image.shape[:2]
    size = max(10, round(h / 20 * scale))
    try:
        font = ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    picture = Image.fromarray(np.ascontiguousarray(image[:, :, :3]))
    draw = ImageDraw.Draw(picture)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(2, size // 4)
    x = pad if corner == "top-left" else max(pad, w - (right - left) - 3 * pad)
    y = pad
    draw.rectangle(
        (x - pad + left, y - pad + top, x + right + pad, y + bottom + pad), fill=(245, 245, 245)
    )
    draw.text((x, y), text, fill=(20, 20, 20), font=font)
    return np.asarray(picture)


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
    view_direction: Sequence[float] | None = None,
    shadows: bool = True,
    progress: bool = False,
) -> int:
    """Renders recorded frames to a video, a PNG or a folder of PNGs.

    Args:
        positions: ``[T, n, 3]`` vertex positions per recorded step (m).
        faces: surface triangles ``[f, 3]``.
        out: ``.mp4``, ``.gif``, ``.png`` (the last frame) or a folder.
        dt: time between recorded frames (s).
        fps: video frame rate.
        stride: recorded steps per video frame (default: :func:`video_stride`, real time
            or slow motion for a video of at least :data:`MIN_VIDEO_SECONDS`).
        max_frames: at most this many video frames (the first ones).
        size: ``(width, height)`` in pixels.
        camera: ``{"position", "target"}`` (m), or None to frame all frames.
        ground: ground height to draw (m), or None for no floor.
        fixed: fixed vertex indices to mark, or None.
        body_ids: ``[n]`` body index per vertex (distinct colours per body), or None.
        field: colour by this :data:`diffsim.apps.fields.FIELDS` name (with a colour bar), or None.
        velocities: ``[T, n, 3]`` (m/s), needed for the ``"speed"`` field.
        context: a :class:`diffsim.apps.fields.FieldContext` for fields.
        view_direction: for the framed camera, the direction from the target towards the
            camera, or None (:data:`FIT_DIRECTION`).
        shadows: shadows on the floor (when there is a ground).
        progress: show a progress bar on stderr.

    Returns:
        The number of frames written.

    Raises:
        RenderError: an output that cannot be written.
        ValueError: positions that are not finite, faces naming vertices that do not
            exist, or a bad camera.
    """
    kind = check_output(out)
    positions = np.asarray(positions)
    check_surface(positions, faces)
    stride = video_stride(len(positions) - 1, dt, fps) if stride is None else stride
    picks = frame_indices(len(positions), stride, max_frames)
    if kind == "png":
        picks = picks[-1:]
    values = None
    if field is not None:
        from diffsim.apps.fields import vertex_field

        if context is None:
            raise ValueError(f"field {field!r} needs a FieldContext")
        values = [
            vertex_field(
                field, context, positions[i], None if velocities is None else velocities[i]
            )
            for i in picks
        ]
        vminmax = colour_range(
            min(float(v.min()) for v in values), max(float(v.max()) for v in values)
        )
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
        view_direction=view_direction,
        shadows=shadows,
    )

    label = None
    if field is not None:
        from diffsim.apps.fields import FIELDS

        label = f"{field} ({FIELDS[field][0]})"

    def frames():
        from diffsim.apps.progress import progress_bar

        with progress_bar(len(picks), "render", "frame", enabled=progress) as bar:
            for k, i in enumerate(picks):
                colour = None if values is None else (label, values[k])
                yield renderer.render(positions[i], colour, vminmax if values is not None else None)
                bar.update(1)

    try:
        return write_frames(frames(), out, fps)
    finally:
        renderer.close()


def check_surface(positions: np.ndarray, faces: np.ndarray) -> None:
    """Checks frames ``[T, n, 3]`` and triangles ``[f, 3]`` before drawing them.

    Raises:
        ValueError: no frames, positions that are not finite (naming the first bad frame),
            or faces that are not vertex indices in ``[0, n)``.
    """
    positions = np.asarray(positions)
    if positions.ndim != 3 or positions.shape[2] != 3 or len(positions) == 0:
        raise ValueError(f"positions must be [frames, n, 3], got {list(positions.shape)}")
    bad = ~np.isfinite(positions).all(axis=(1, 2))
    if bad.any():
        raise ValueError(
            f"positions are NaN or infinite from frame {int(np.flatnonzero(bad)[0])} on; "
            "nothing to draw there (the simulation blew up: try a smaller dt)"
        )
    faces = np.asarray(faces)
    n = positions.shape[1]
    if faces.ndim != 2 or faces.shape[1] != 3 or not np.issubdtype(faces.dtype, np.integer):
        raise ValueError(f"faces must be integers of shape [f, 3], got {list(faces.shape)}")
    if faces.size and (faces.min() < 0 or faces.max() >= n):
        bad_index = int(faces.max()) if faces.max() >= n else int(faces.min())
        raise ValueError(
            f"faces refer to vertex {bad_index} but there are {n} vertices (valid: "
            f"0..{n - 1}); the faces do not belong to these positions"
        )
