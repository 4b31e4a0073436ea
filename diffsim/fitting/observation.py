"""Observed trajectories: the target of a fit, its ``.npz`` format and its checks.

An observation holds positions of some vertices (all, or a few markers) at some instants.
The ``.npz`` file has these arrays (only ``positions`` is required):

- ``positions`` ``[F, k, 3]`` float, metres: observed positions. ``NaN`` marks a point not
  seen in that frame (occlusion); it is left out of the loss.
- ``indices`` ``[k]`` int: the mesh vertex of each observed point (markers). Without it
  the observation covers every vertex in order (``k`` = the scene's vertex count).
- when each frame was seen, one of (first found wins):
  ``frames`` ``[F]`` int, the simulation step of each frame (0 = the initial state);
  ``times`` ``[F]`` float, seconds from the initial state (frames need not fall on
  simulation steps: the simulation is interpolated linearly between steps);
  ``stride`` int, frame ``i`` is step ``i * stride``;
  ``dt`` float, frame ``i`` is at time ``i * dt`` (s). Default: stride 1.
- ``weights`` ``[k]`` or ``[F, k]`` float >= 0: per-point (and per-frame) loss weights,
  e.g. inverse variances of a tracker.
- ``initial_positions`` ``[n, 3]`` and ``initial_velocities`` ``[n, 3]`` float (optional): the
  start state of the recorded motion (every vertex of the scene, m and m/s), for fits to
  several recordings that each start differently. Velocities default to zero.

What :meth:`diffsim.Trajectory.save` writes (``positions``, ``times``, ``dt``, ...) is a
valid observation of every vertex at every step, so ``diffsim run --out traj.npz`` makes a
fitting target directly.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# A time within this fraction of a step from a simulation step counts as that step.
STEP_SNAP = 1e-6


# Optional arrays of the ``.npz`` besides the frame timing (read and written as they are).
_OPTIONAL = ("indices", "weights", "initial_positions", "initial_velocities")


class ObservationError(ValueError):
    """An observation is malformed or does not match the scene; the message says how to fix it."""


@dataclass
class Observation:
    """Observed positions of some vertices at some instants.

    Attributes:
        positions: ``[F, k, 3]`` float64 in m; NaN marks a missing point.
        indices: ``[k]`` vertex indices of the observed points, or None for all vertices.
        frames: ``[F]`` simulation steps of the frames, or None (then times or stride).
        times: ``[F]`` frame times in s, or None.
        stride: simulation steps between frames when neither frames nor times are given.
        weights: ``[k]`` or ``[F, k]`` non-negative loss weights, or None (all 1).
        initial_positions: ``[n, 3]`` positions (m) of every vertex at step 0, or None: the
            recording's own start state (a fit uses it unless it is given a state).
        initial_velocities: ``[n, 3]`` velocities (m/s) at step 0, or None (zero); only
            with ``initial_positions``.
    """

    positions: np.ndarray
    indices: np.ndarray | None = None
    frames: np.ndarray | None = None
    times: np.ndarray | None = None
    stride: int = 1
    weights: np.ndarray | None = None
    initial_positions: np.ndarray | None = None
    initial_velocities: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.positions = _as_float(self.positions, "positions")
        if self.positions.ndim != 3 or self.positions.shape[2] != 3:
            raise ObservationError(
                f"positions must have shape [frames, points, 3], got {list(self.positions.shape)}"
            )
        n_frames, k = self.positions.shape[:2]
        if n_frames == 0 or k == 0:
            raise ObservationError(
                f"positions must hold at least one frame and one point, got "
                f"{list(self.positions.shape)}"
            )
        if np.isinf(self.positions).any():
            raise ObservationError("positions contain inf; mark missing points with NaN instead")
        if np.isnan(self.positions).all():
            raise ObservationError("every observed position is NaN: nothing to fit")
        if self.indices is not None:
            self.indices = _as_int(self.indices, "indices")
            if self.indices.shape != (k,):
                raise ObservationError(
                    f"indices must have shape [{k}] (one vertex per observed point), "
                    f"got {list(self.indices.shape)}"
                )
            if (self.indices < 0).any():
                raise ObservationError(f"indices must be >= 0, got {self.indices.min()}")
            if len(np.unique(self.indices)) != k:
                raise ObservationError("indices repeat a vertex; each marker needs its own vertex")
        if self.frames is not None:
            self.frames = _as_int(self.frames, "frames")
            _check_sequence(self.frames, n_frames, "frames")
        if self.times is not None:
            self.times = _as_float(self.times, "times")
            if not np.isfinite(self.times).all():
                raise ObservationError("times must be finite")
            _check_sequence(self.times, n_frames, "times")
        if isinstance(self.stride, bool) or int(self.stride) != self.stride or self.stride < 1:
            raise ObservationError(f"stride must be an integer >= 1, got {self.stride!r}")
        self.stride = int(self.stride)
        if self.weights is not None:
            self.weights = _as_float(self.weights, "weights")
            if self.weights.shape not in ((k,), (n_frames, k)):
                raise ObservationError(
                    f"weights must have shape [{k}] (per point) or [{n_frames}, {k}] "
                    f"(per frame and point), got {list(self.weights.shape)}"
                )
            if not np.isfinite(self.weights).all() or (self.weights < 0).any():
                raise ObservationError("weights must be finite and >= 0")
            if not (self.weights > 0).any():
                raise ObservationError("all weights are 0: nothing to fit")
        self._check_start()

    def _check_start(self) -> None:
        if self.initial_velocities is not None and self.initial_positions is None:
            raise ObservationError("initial_velocities need initial_positions (the start state)")
        for name in ("initial_positions", "initial_velocities"):
            value = getattr(self, name)
            if value is None:
                continue
            value = _as_float(value, name)
            if value.ndim != 2 or value.shape[1] != 3:
                raise ObservationError(
                    f"{name} must have shape [vertices, 3] (every vertex of the scene), "
                    f"got {list(value.shape)}"
                )
            if not np.isfinite(value).all():
                raise ObservationError(f"{name} must be finite")
            setattr(self, name, value)
        if self.initial_velocities is not None and (
            self.initial_velocities.shape != self.initial_positions.shape
        ):
            raise ObservationError(
                f"initial_velocities {list(self.initial_velocities.shape)} and initial_positions "
                f"{list(self.initial_positions.shape)} differ in shape"
            )

    @property
    def has_start(self) -> bool:
        """Whether the observation carries its own start state (``initial_positions``)."""
        return self.initial_positions is not None

    # ----------------------------------------------------------------- shape
    @property
    def n_frames(self) -> int:
        return self.positions.shape[0]

    @property
    def n_points(self) -> int:
        return self.positions.shape[1]

    def steps(self, dt: float) -> np.ndarray:
        """Fractional simulation step of each frame, ``[F]``, for a simulator step ``dt`` (s)."""
        if self.frames is not None:
            return self.frames.astype(np.float64)
        if self.times is not None:
            s = self.times / dt
            near = np.round(s)
            return np.where(np.abs(s - near) < STEP_SNAP, near, s)
        return np.arange(self.n_frames, dtype=np.float64) * self.stride

    def steps_needed(self, dt: float) -> int:
        """Rollout length (steps) that covers the last frame."""
        return int(math.ceil(self.steps(dt)[-1]))

    def check(self, n_vertices: int, dt: float, steps: int | None = None) -> None:
        """Checks that this observation fits a scene.

        Args:
            n_vertices: the scene's vertex count.
            dt: the simulator's step (s).
            steps: the rollout length, or None to allow any.

        Raises:
            ObservationError: point count, marker index or frame time does not match.
        """
        if self.indices is None and self.n_points != n_vertices:
            raise ObservationError(
                f"the target has {self.n_points} points per frame but the scene has {n_vertices} "
                f"vertices; a target of all vertices must match the scene's mesh, and a marker "
                f"target needs 'indices' naming the vertex of each point"
            )
        if self.indices is not None and (self.indices >= n_vertices).any():
            bad = self.indices[self.indices >= n_vertices]
            raise ObservationError(
                f"marker indices {bad[:8].tolist()} are out of range for a scene with "
                f"{n_vertices} vertices (valid: 0..{n_vertices - 1})"
            )
        if self.has_start and self.initial_positions.shape[0] != n_vertices:
            raise ObservationError(
                f"the target's start state has {self.initial_positions.shape[0]} vertices but "
                f"the scene has {n_vertices}; initial_positions must cover every vertex"
            )
        last = self.steps(dt)[-1]
        if steps is not None and last > steps:
            raise ObservationError(
                f"the target's last frame is at step {last:g} (t = {last * dt:.4g} s) but the "
                f"rollout has {steps} steps (dt = {dt:g} s); run more steps or trim the target"
            )

    # ----------------------------------------------------------------- comparison
    def predict(self, positions: torch.Tensor, dt: float) -> torch.Tensor:
        """Simulated positions at the observed frames and points, ``[F, k, 3]``.

        Args:
            positions: a rollout's positions ``[T + 1, n, 3]`` (differentiable).
            dt: the simulator's step (s).
        """
        s = torch.as_tensor(self.steps(dt), dtype=positions.dtype, device=positions.device)
        lo = torch.floor(s).long().clamp(max=positions.shape[0] - 1)
        hi = torch.clamp(lo + 1, max=positions.shape[0] - 1)
        frac = (s - lo.to(s.dtype))[:, None, None]
        pts = positions if self.indices is None else positions[:, torch.as_tensor(self.indices)]
        if bool((frac == 0).all()):
            return pts[lo]
        return pts[lo] * (1.0 - frac) + pts[hi] * frac

    def targets(
        self, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Observed positions with missing points zeroed, and weights with those points 0.

        Returns:
            ``(positions [F, k, 3], weights [F, k])``.
        """
        seen = ~np.isnan(self.positions).any(axis=2)
        w = (
            np.ones(seen.shape)
            if self.weights is None
            else np.broadcast_to(self.weights, seen.shape)
        )
        w = np.where(seen, w, 0.0)
        x = np.where(seen[..., None], self.positions, 0.0)
        as_t = dict(dtype=dtype, device=device)
        return torch.as_tensor(x, **as_t), torch.as_tensor(w, **as_t)

    def first_frames(self, n: int) -> Observation:
        """A copy with only the first ``n`` frames (for fitting a prefix of the motion)."""
        if not 1 <= n <= self.n_frames:
            raise ObservationError(f"n must be in [1, {self.n_frames}], got {n}")
        weights = self.weights
        if weights is not None and weights.ndim == 2:
            weights = weights[:n]
        return Observation(
            self.positions[:n],
            indices=self.indices,
            frames=None if self.frames is None else self.frames[:n],
            times=None if self.times is None else self.times[:n],
            stride=self.stride,
            weights=weights,
            initial_positions=self.initial_positions,
            initial_velocities=self.initial_velocities,
        )

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_trajectory(
        cls,
        trajectory,
        indices=None,
        stride: int = 1,
        noise: float = 0.0,
        seed: int = 0,
        with_start: bool = False,
    ) -> Observation:
        """An observation of a (simulated) trajectory: synthetic targets for tests and demos.

        Args:
            trajectory: a :class:`diffsim.Trajectory`.
            indices: marker vertices ``[k]``, or None for all vertices.
            stride: keep every ``stride``-th frame.
            noise: standard deviation (m) of Gaussian noise added to every coordinate.
            seed: random seed of the noise.
            with_start: also keep the trajectory's first state (every vertex, without
                noise) as the observation's start state.
        """
        start = {}
        if with_start:
            start = {
                "initial_positions": trajectory.positions[0].detach().cpu().double().numpy(),
                "initial_velocities": trajectory.velocities[0].detach().cpu().double().numpy(),
            }
        x = trajectory.positions.detach().cpu().double().numpy()[::stride]
        if indices is not None:
            indices = _as_int(indices, "indices")
            x = x[:, indices]
        if noise > 0:
            x = x + np.random.default_rng(seed).normal(0.0, noise, x.shape)
        frames = np.arange(0, trajectory.positions.shape[0], stride)
        return cls(x, indices=indices, frames=frames, **start)

    @classmethod
    def load(cls, path: str | Path) -> Observation:
        """Reads an observation ``.npz`` (or a file written by ``Trajectory.save``).

        Raises:
            FileNotFoundError: no such file.
            ObservationError: an array is missing or has the wrong shape or values.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"target file not found: {path}")
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            data = None
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ObservationError(
                f"{path}: not an .npz archive; a target is written by diffsim run SCENE.py "
                "--out FILE.npz, Trajectory.save or Observation.save"
            )
        with data:
            if "positions" not in data.files:
                raise ObservationError(
                    f"{path}: no 'positions' array (found {sorted(data.files)}); an observation "
                    f"needs positions [frames, points, 3]"
                )
            try:
                arrays = {k: data[k] for k in (*_OPTIONAL, "frames", "times") if k in data}
                stride = data["stride"] if "stride" in data.files else 1
                positions = data["positions"]
                dt = data["dt"] if "dt" in data.files else None
            except Exception:  # pickled Python objects (refused), a damaged member
                raise ObservationError(
                    f"{path}: an array in it cannot be read (damaged, or Python objects); "
                    "write the target again"
                ) from None
            stride = _scalar(stride, "stride", path)
            if not {"frames", "times", "stride"} & set(data.files) and dt is not None:
                step = _scalar(dt, "dt", path)
                if not (math.isfinite(step) and step > 0):
                    raise ObservationError(f"{path}: dt must be a positive time (s), got {step:g}")
                arrays["times"] = np.arange(len(positions)) * step
        if "frames" in arrays:
            arrays.pop("times", None)
        try:
            return cls(positions, stride=stride, **arrays)
        except ObservationError as exc:
            raise ObservationError(f"{path}: {exc}") from exc

    def save(self, path: str | Path) -> None:
        """Writes the ``.npz`` described in this module's docstring."""
        arrays: dict[str, np.ndarray] = {"positions": self.positions}
        for name in (*_OPTIONAL, "frames", "times"):
            value = getattr(self, name)
            if value is not None:
                arrays[name] = value
        if self.frames is None and self.times is None:
            arrays["stride"] = np.asarray(self.stride)
        np.savez(path, **arrays)

    def __repr__(self) -> str:
        what = "all vertices" if self.indices is None else f"{self.n_points} markers"
        return f"Observation({self.n_frames} frames of {what})"


def _scalar(value, name: str, path: Path) -> float:
    """One number read from an ``.npz`` (``stride``, ``dt``)."""
    arr = np.asarray(value)
    if arr.size != 1 or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise ObservationError(
            f"{path}: {name} must be one number, got shape {list(arr.shape)} of {arr.dtype}"
        )
    return float(arr.reshape(()))


def _as_float(value, name: str) -> np.ndarray:
    arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ObservationError(f"{name} must be numeric, got dtype {arr.dtype}")
    return arr.astype(np.float64)


def _as_int(value, name: str) -> np.ndarray:
    arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ObservationError(f"{name} must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _check_sequence(values: np.ndarray, n_frames: int, name: str) -> None:
    if values.shape != (n_frames,):
        raise ObservationError(
            f"{name} must have shape [{n_frames}] (one per frame of positions), "
            f"got {list(values.shape)}"
        )
    if (values < 0).any():
        raise ObservationError(f"{name} must be >= 0 (0 is the initial state)")
    if (np.diff(values) <= 0).any():
        raise ObservationError(f"{name} must be strictly increasing")
