"""Dynamic data: the state a step takes and returns, and recorded trajectories."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class State:
    """Positions and velocities of all vertices.

    Attributes:
        positions: ``[n, 3]`` in m.
        velocities: ``[n, 3]`` in m/s.
    """

    positions: torch.Tensor
    velocities: torch.Tensor

    def detach(self) -> State:
        return State(self.positions.detach(), self.velocities.detach())


@dataclass
class Trajectory:
    """A recorded rollout: one frame per step, the initial state first.

    Attributes:
        positions: ``[T + 1, n, 3]`` in m (keeps its autograd graph).
        velocities: ``[T + 1, n, 3]`` in m/s.
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

    def state(self, frame: int = -1) -> State:
        """The state at one frame."""
        return State(self.positions[frame], self.velocities[frame])

    def save(self, path: str | Path) -> None:
        """Writes an ``.npz`` with positions, velocities, dt, times and the mesh arrays."""
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
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype | None = None) -> Trajectory:
        """Reads a file written by :meth:`save`.

        Raises:
            FileNotFoundError: no such file.
            ValueError: a required array is missing or shapes disagree.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"trajectory file not found: {path}")
        with np.load(path) as data:
            missing = {"positions", "dt"} - set(data.files)
            if missing:
                raise ValueError(f"{path}: not a diffsim trajectory, missing {sorted(missing)}")
            positions = data["positions"]
            if positions.ndim != 3 or positions.shape[2] != 3:
                raise ValueError(
                    f"{path}: positions must be [frames, n, 3], got {list(positions.shape)}"
                )
            velocities = (
                data["velocities"] if "velocities" in data.files else np.zeros_like(positions)
            )
            if velocities.shape != positions.shape:
                raise ValueError(
                    f"{path}: velocities {velocities.shape} differ from positions {positions.shape}"
                )
            tets = data["tets"] if "tets" in data.files else None
            faces = data["surface_faces"] if "surface_faces" in data.files else None
            dt = float(data["dt"])
        dtype = dtype or torch.get_default_dtype()
        return cls(
            torch.as_tensor(positions, dtype=dtype),
            torch.as_tensor(velocities, dtype=dtype),
            dt,
            tets,
            faces,
        )
