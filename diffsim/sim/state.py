"""Dynamic data: the state a step takes and returns, and recorded trajectories."""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class State:
    """Positions and velocities of all vertices.

    Attributes:
        positions: ``[n, 3]`` in m; ``[W, n, 3]`` for a simulator with W worlds.
        velocities: ``[n, 3]`` in m/s; ``[W, n, 3]`` with worlds.
    """

    positions: torch.Tensor
    velocities: torch.Tensor

    def detach(self) -> State:
        return State(self.positions.detach(), self.velocities.detach())


@dataclass
class Trajectory:
    """A recorded rollout: one frame per step, the initial state first.

    Attributes:
        positions: ``[T + 1, n, 3]`` in m (keeps its autograd graph); ``[T + 1, W, n, 3]``
            for a simulator with W worlds (:meth:`world` takes one out).
        velocities: ``[T + 1, n, 3]`` in m/s; ``[T + 1, W, n, 3]`` with worlds.
        dt: time between frames in s.
        tets: ``[m, 4]`` mesh connectivity (for viewing and rendering), or None.
        surface_faces: ``[f, 3]`` boundary triangles, or None.
    """

    positions: torch.Tensor
    velocities: torch.Tensor
    dt: float
    tets: np.ndarray | None = None
    surface_faces: np.ndarray | None = None

    @property
    def n_frames(self) -> int:
        return self.positions.shape[0]

    @property
    def times(self) -> np.ndarray:
        """Frame times in s, ``[T + 1]``."""
        return np.arange(self.n_frames) * self.dt

    @property
    def n_worlds(self) -> int | None:
        """W for a trajectory of W worlds (positions ``[T + 1, W, n, 3]``), else None."""
        return self.positions.shape[1] if self.positions.dim() == 4 else None

    def state(self, frame: int = -1) -> State:
        """The state at one frame (``[W, n, 3]`` each with worlds)."""
        return State(self.positions[frame], self.velocities[frame])

    def world(self, index: int) -> Trajectory:
        """World ``index`` of a trajectory of worlds, as a single-world trajectory
        ``[T + 1, n, 3]`` (views; graph kept). Raises ValueError without worlds."""
        if self.n_worlds is None:
            raise ValueError("this trajectory has no worlds (positions are [T + 1, n, 3])")
        if not -self.n_worlds <= index < self.n_worlds:
            raise ValueError(f"world index {index} is outside [0, {self.n_worlds})")
        out = Trajectory(
            self.positions[:, index],
            self.velocities[:, index],
            self.dt,
            self.tets,
            self.surface_faces,
        )
        out.metadata = self.metadata
        return out

    # Provenance read by :meth:`load` (scene, parameters, diffsim version, ...), or None.
    # A plain class attribute, not a dataclass field: the constructor is unchanged.
    metadata = None

    def save(self, path: str | Path, metadata: dict | None = None) -> None:
        """Writes an ``.npz`` with positions, velocities, dt, times and the mesh arrays.

        Args:
            path: the ``.npz`` file to write.
            metadata: provenance to keep with the arrays (e.g. the scene, its parameters,
                diffsim's version): a dict of JSON values, stored as a JSON string under
                ``metadata``. Default: :attr:`metadata` (what :meth:`load` read), if any.

        Raises:
            ValueError: ``metadata`` is not a dict or holds values JSON cannot store.
        """
        arrays = {
            "positions": self.positions.detach().cpu().numpy(),
            "velocities": self.velocities.detach().cpu().numpy(),
            "dt": np.asarray(self.dt),
            "times": self.times,
        }
        if self.tets is not None:
            arrays["tets"] = np.asarray(self.tets)
        if self.surface_faces is not None:
            arrays["surface_faces"] = np.asarray(self.surface_faces)
        metadata = self.metadata if metadata is None else metadata
        if metadata is not None:
            if not isinstance(metadata, dict):
                raise ValueError(f"metadata must be a dict, got {type(metadata).__name__}")
            try:
                arrays["metadata"] = np.asarray(json.dumps(metadata, allow_nan=False))
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    f"metadata must hold JSON values (str, numbers, lists, dicts): {exc}"
                ) from None
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype | None = None) -> Trajectory:
        """Reads a file written by :meth:`save` and checks it.

        The provenance saved with it, if any, is in the result's :attr:`metadata`.

        Raises:
            FileNotFoundError: no such file.
            ValueError: not an ``.npz`` archive, a required array is missing, shapes
                disagree, positions or velocities are not finite, ``dt`` is not one positive
                number, or tets or faces name vertices that do not exist.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"trajectory file not found: {path}")
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            data = None
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError(
                f"{path}: not an .npz archive; a trajectory is written by "
                "diffsim run SCENE.py --out FILE.npz (or Trajectory.save)"
            )
        with data:
            missing = {"positions", "dt"} - set(data.files)
            if missing:
                raise ValueError(
                    f"{path}: not a diffsim trajectory, missing {sorted(missing)} (found "
                    f"{sorted(data.files)}); write one with diffsim run SCENE.py --out FILE.npz"
                )
            arrays = {}
            for name in data.files:
                try:
                    arrays[name] = data[name]
                except Exception:  # pickled Python objects (refused), a damaged member
                    raise ValueError(
                        f"{path}: its array {name!r} cannot be read (damaged, or Python "
                        "objects); write the trajectory again with Trajectory.save"
                    ) from None
        positions = _numeric(arrays["positions"], "positions", path)
        velocities = (
            _numeric(arrays["velocities"], "velocities", path)
            if "velocities" in arrays
            else np.zeros_like(positions)
        )
        dt = _time_step(arrays["dt"], path)
        tets = arrays.get("tets")
        faces = arrays.get("surface_faces")
        metadata = _metadata(arrays["metadata"], path) if "metadata" in arrays else None
        if positions.ndim not in (3, 4) or positions.shape[-1] != 3 or positions.shape[0] == 0:
            raise ValueError(
                f"{path}: positions must be [frames, n, 3] (or [frames, worlds, n, 3]) with at "
                f"least one frame, got {list(positions.shape)}"
            )
        if velocities.shape != positions.shape:
            raise ValueError(
                f"{path}: velocities {velocities.shape} differ from positions {positions.shape}"
            )
        for name, values in (("positions", positions), ("velocities", velocities)):
            bad = ~np.isfinite(values).reshape(len(values), -1).all(axis=1)
            if bad.any():
                frame = int(np.flatnonzero(bad)[0])
                raise ValueError(
                    f"{path}: {name} are NaN or infinite from frame {frame} (t = "
                    f"{frame * dt:.4g} s) on; the run that wrote it blew up: run it again "
                    "with a smaller dt or more substeps"
                )
        n = positions.shape[-2]
        tets = _connectivity(tets, 4, "tets", n, path)
        faces = _connectivity(faces, 3, "surface_faces", n, path)
        # Without a dtype, the file's own: float64 positions stay float64 (precision rule).
        traj = cls(
            torch.as_tensor(positions, dtype=dtype or _float_dtype(positions)),
            torch.as_tensor(velocities, dtype=dtype or _float_dtype(velocities)),
            dt,
            tets,
            faces,
        )
        traj.metadata = metadata
        return traj


def _numeric(values: np.ndarray, name: str, path: Path) -> np.ndarray:
    if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)):
        raise ValueError(f"{path}: {name} must be numbers, got dtype {values.dtype}")
    return values


def _time_step(value: np.ndarray, path: Path) -> float:
    """``dt`` as a float: one finite number > 0 (s)."""
    if value.size != 1 or not (
        np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)
    ):
        raise ValueError(
            f"{path}: dt must be one number (the time between frames in s), got an array "
            f"of shape {list(value.shape)} and dtype {value.dtype}"
        )
    dt = float(value.reshape(()))
    if not (math.isfinite(dt) and dt > 0):
        raise ValueError(f"{path}: dt must be a positive time between frames (s), got {dt:g}")
    return dt


def _connectivity(
    cells: np.ndarray | None, corners: int, name: str, n: int, path: Path
) -> np.ndarray | None:
    """Checks ``[m, corners]`` integer vertex indices in ``[0, n)``; None passes."""
    if cells is None:
        return None
    if not np.issubdtype(cells.dtype, np.integer) or cells.ndim != 2 or cells.shape[1] != corners:
        raise ValueError(
            f"{path}: {name} must be integers of shape [m, {corners}], got "
            f"{list(cells.shape)} of dtype {cells.dtype}"
        )
    if cells.size and (cells.min() < 0 or cells.max() >= n):
        bad = int(cells.max()) if cells.max() >= n else int(cells.min())
        raise ValueError(
            f"{path}: {name} refer to vertex {bad} but positions have {n} vertices "
            f"(valid: 0..{n - 1}); the mesh arrays do not belong to these positions"
        )
    return cells


def _metadata(value: np.ndarray, path: Path) -> dict | None:
    try:
        out = json.loads(str(value.reshape(())))
    except (ValueError, TypeError):
        out = None
    if not isinstance(out, dict):
        raise ValueError(f"{path}: metadata must be a JSON object (a dict); write the file again")
    return out


def _float_dtype(array: np.ndarray) -> torch.dtype:
    """The torch dtype of a float array as stored (float64 stays float64), else the default."""
    if array.dtype == np.float64:
        return torch.float64
    return torch.get_default_dtype()
