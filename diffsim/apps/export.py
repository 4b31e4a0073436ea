"""Trajectories for ParaView: a VTU file per frame and a ``.pvd`` collection that times them.

Each frame's ``.vtu`` (written with meshio, ``pip install diffsim[meshing]``) holds the tet
mesh at that frame with vertex fields ``velocity`` (m/s), ``displacement`` (m, from the
rest positions) and ``speed`` (m/s), and, given the material, tet fields ``von_mises``
(Pa) and ``energy_density`` (J/m^3). Open the ``.pvd`` in ParaView to play it.
"""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np

from diffsim.apps.fields import FieldContext, tet_field
from diffsim.mesh.meshio_io import meshio_module, write_meshio
from diffsim.physics.materials import Material
from diffsim.sim.state import Trajectory


def export_vtu_series(
    traj: Trajectory,
    path: str | Path,
    material: Material | None = None,
    *,
    rest_positions: np.ndarray | None = None,
    stride: int = 1,
    max_frames: int | None = None,
) -> list[Path]:
    """Writes a trajectory as a VTU time series: ``path`` (.pvd) and one .vtu per frame.

    The frames go to a folder beside ``path`` named ``<stem>_frames`` (``x.pvd`` ->
    ``x_frames/x_00000.vtu``, ...), which the ``.pvd`` lists with their times.

    Args:
        traj: a trajectory with tets (``[T + 1, n, 3]`` positions; one world).
        path: the ``.pvd`` file to write; its folder must exist.
        material: the material for the tet fields ``von_mises`` (Pa) and
            ``energy_density`` (J/m^3), or None for vertex fields only.
        rest_positions: ``[n, 3]`` rest positions (m) for displacements and stresses
            (default: the first frame, which is the rest shape unless the run started
            deformed: pass ``sim.mesh.vertices`` then).
        stride: write every ``stride``-th frame (the last one is always written).
        max_frames: at most this many frames (the stride grows to fit), or None.

    Returns:
        The ``.vtu`` files written, in time order.

    Raises:
        ValueError: ``path`` is not a ``.pvd`` in an existing folder, the trajectory has no
            tets or holds several worlds, or a bad stride.
        ImportError: meshio is not installed (the message names the fix).
    """
    path = Path(path)
    if path.suffix.lower() != ".pvd":
        raise ValueError(f"{path}: export_vtu_series writes a .pvd file (and .vtu frames)")
    if not path.parent.is_dir():
        raise ValueError(f"{path}: folder {path.parent} does not exist; create it first")
    if traj.tets is None:
        raise ValueError("export_vtu_series needs the tets: a trajectory from rollout() has them")
    if traj.n_worlds is not None:
        raise ValueError(f"the trajectory holds {traj.n_worlds} worlds; export one: traj.world(i)")
    if not (isinstance(stride, int) and stride >= 1):
        raise ValueError(f"stride must be an integer >= 1, got {stride!r}")
    meshio_module("export_vtu_series")  # fail before writing anything
    positions = traj.positions.detach().cpu().double().numpy()
    velocities = traj.velocities.detach().cpu().double().numpy()
    tets = np.asarray(traj.tets, dtype=np.int64)
    rest = positions[0] if rest_positions is None else np.asarray(rest_positions, np.float64)
    if rest.shape != positions.shape[1:]:
        raise ValueError(f"rest_positions must have shape {list(positions.shape[1:])}")
    frames = _frames(traj.n_frames, stride, max_frames)
    context = None if material is None else FieldContext(rest, tets, material)
    folder = path.parent / f"{path.stem}_frames"
    folder.mkdir(exist_ok=True)
    written = []
    for i in frames:
        point_data = {
            "velocity": velocities[i],
            "displacement": positions[i] - rest,
            "speed": np.linalg.norm(velocities[i], axis=1),
        }
        cell_data = {}
        if context is not None:
            for name in ("von_mises", "energy_density"):
                cell_data[name] = tet_field(name, context, positions[i])
        frame = folder / f"{path.stem}_{i:05d}.vtu"
        write_meshio(frame, positions[i], tets, point_data=point_data, cell_data=cell_data)
        written.append(frame)
    _write_pvd(path, [(i * traj.dt, f) for i, f in zip(frames, written, strict=True)])
    return written


def _frames(n_frames: int, stride: int, max_frames: int | None) -> list[int]:
    """Frame indices: every ``stride``-th, the last always, at most ``max_frames``."""
    if max_frames is not None:
        if max_frames < 2:
            return [n_frames - 1] if max_frames == 1 else []
        stride = max(stride, -(-(n_frames - 1) // (max_frames - 1)))
    frames = list(range(0, n_frames, stride))
    if frames[-1] != n_frames - 1:
        frames.append(n_frames - 1)
    return frames


def _write_pvd(path: Path, entries: list[tuple[float, Path]]) -> None:
    """The ParaView collection: one DataSet per (time in s, file), paths relative to it."""
    lines = [
        '<?xml version="1.0"?>',
        '<VTKFile type="Collection" version="0.1" byte_order="LittleEndian">',
        "  <Collection>",
    ]
    for t, file in entries:
        relative = file.relative_to(path.parent).as_posix()
        lines.append(
            f'    <DataSet timestep="{t:.9g}" group="" part="0" file={quoteattr(relative)}/>'
        )
    lines += ["  </Collection>", "</VTKFile>", ""]
    path.write_text("\n".join(lines))
