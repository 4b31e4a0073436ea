"""The Simulator: builds the model, advances states and records differentiable rollouts."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from diffsim.backends import BACKENDS
from diffsim.backends.integrator import SPLIT_LEVELS
from diffsim.backends.warp.setup import check_device
from diffsim.checkpoint import run_segment
from diffsim.contact.potential import MIN_DISTANCE_FRACTION
from diffsim.mesh import TetMesh
from diffsim.physics.elasticity import (
    deformation_gradients,
    elastic_energy,
    inverse_rest_determinants,
    volume_ratios,
)
from diffsim.physics.ground import Ground
from diffsim.physics.materials import PARAMETER_BOUNDS, Material, StableNeoHookean
from diffsim.physics.stable_step import (
    MassScaling,
    StableStep,
    auto_substeps,
    exceeds,
    mass_scaling,
    stable_step,
)
from diffsim.physics.volume_limit import VolumeLimit
from diffsim.sim import worlds as layout
from diffsim.sim.model import POSITION_DTYPE, Coefficients, Model, lumped_mass
from diffsim.sim.state import State, Trajectory

# Default ground barrier activation distance, as a fraction of the mesh's bounding-box diagonal.
GROUND_DHAT_FRACTION = 5e-3
# No-grad rollouts run (and check for blow-ups) in blocks of about this many tet-substeps.
FINITE_CHECK_WORK = 1_000_000
# The strain notice (a torch pass over every tet, about the cost of this many fused
# substeps) runs on a no-grad rollout's block only after at least this many substeps since
# the last one, and on its last block, so that it never costs more than a few percent.
STRAIN_CHECK_SUBSTEPS = 200


class SimulationError(RuntimeError):
    """A step produced non-finite values; the message names the step and the likely fix."""


class StabilityWarning(UserWarning):
    """A limiter changed the physics, or the run is near its stability limit (with numbers).

    Filter it like any warning: ``warnings.simplefilter("ignore", ds.StabilityWarning)``.
    """


class BackendWarning(UserWarning):
    """The simulator runs on another backend than the one asked for (and says why)."""


# A start state whose closest surface pair is at or within this fraction of contact dhat is
# refused (surfaces touching or overlapping): the barrier's distance floor, below which it
# no longer tells distances apart. Any larger gap is a state the barrier works in; surfaces
# pressed hard come far inside it (the Armadillo on its crease: 3e-4 dhat), and a rollout
# must go on from any state a rollout made (1e-3 dhat refused the Armadillo at frame 250).
MIN_START_GAP_FRACTION = MIN_DISTANCE_FRACTION
# The speed clamp is reported when more than this share of vertex-frames move faster than
# CLAMP_NOTICE_SPEED * max_speed (where tanh(r)/r < 0.92: velocities changed by > 8%).
CLAMP_NOTICE_SHARE = 0.02
CLAMP_NOTICE_SPEED = 0.5
# Tets whose volume ratio J leaves this range are "strained far beyond the material's range".
STRAIN_NOTICE_RANGE = (0.1, 10.0)
# contact_speed taking more than this many times the substeps elasticity needs is worth a
# word (a speed in mm/s passed as m/s): the scenes' named speeds take 3-10 times.
SPEED_SUBSTEPS_NOTICE = 100
# Inverted tets are counted at every frame, exactly: one Warp launch per block of frames
# evaluates J of every tet at every frame (cheaper than one elastic force pass, so a few
# percent of a frame's substeps), INVERSION_CHUNK tets per Warp thread on the CPU (which
# amortises Warp's per-thread call overhead). On a device Warp does not run on, torch
# counts them, in windows of about INVERSION_WINDOW tet-frames.
INVERSION_CHUNK = 256
INVERSION_WINDOW = 1 << 18
# Blocks of at least this many tet-frames (about 1.5 ms on one thread) are split between the
# Warp backend's CPU threads (a hand-over costs about 80 microseconds).
INVERSION_SPLIT = 1 << 18


@dataclass(frozen=True)
class Inversions:
    """Inverted tets (volume ratio J = det F <= 0) in the frames of a simulator's last
    rollout or step (:attr:`Simulator.inversions`), or of several joined (:meth:`join`).

    Frame k is the state after step k (``trajectory.positions[k]``); frame 0, the start
    state, is not counted. Tet indices are in a world's own numbering (``[0, m)``).

    Attributes:
        counts: inverted tets at frames 1..T, ``[T]`` int64, or ``[T, W]`` with worlds.
        dt: time per frame in s.
        first_frame: the first frame with an inverted tet, or None if there is none.
        first_world: the world inverted at ``first_frame`` (the first of them; 0 without
            worlds), or None.
        first_tets: the tets inverted at ``first_frame`` in ``first_world``.
        min_volume_ratio: the most negative J (<= 0) seen, or None.
        worst_frame: the frame of ``min_volume_ratio``, or None.
        worst_world: its world, or None.
        worst_tet: its tet, or None.
    """

    counts: torch.Tensor
    dt: float
    first_frame: int | None = None
    first_world: int | None = None
    first_tets: list[int] = field(default_factory=list)
    min_volume_ratio: float | None = None
    worst_frame: int | None = None
    worst_world: int | None = None
    worst_tet: int | None = None

    def __bool__(self) -> bool:
        return self.first_frame is not None

    @property
    def frames(self) -> int:
        """T, the frames counted."""
        return len(self.counts)

    @property
    def max_per_frame(self) -> int:
        """The most tets inverted at one frame in one world (0 if none)."""
        return int(self.counts.max()) if self.counts.numel() else 0

    @property
    def frames_affected(self) -> int:
        """Frames with an inverted tet in some world."""
        return int((self.counts.reshape(self.frames, -1) > 0).any(dim=1).sum())

    @property
    def worlds_affected(self) -> list[int]:
        """The worlds with an inverted tet at some frame (``[0]`` or ``[]`` without worlds)."""
        per_world = self.counts.reshape(self.frames, -1).sum(dim=0)
        return torch.nonzero(per_world).flatten().tolist()

    def summary(self) -> str:
        """One line for a report: ``"none"``, or the most per frame, the frames affected,
        the first (time, tets, world) and the most negative J."""
        if not self:
            return "none"
        world = "" if self.counts.dim() == 1 else f" of world {self.first_world}"
        return (
            f"up to {self.max_per_frame} per frame in {self.frames_affected} of {self.frames} "
            f"frames, first at frame {self.first_frame} (t = {self.first_frame * self.dt:.4g} s;"
            f" tets {self.first_tets[:8]}{world}), most negative J {self.min_volume_ratio:.3g}"
        )

    @classmethod
    def join(cls, records: Sequence[Inversions]) -> Inversions:
        """The record of consecutive rollouts (each starting where the last ended) as one."""
        if not records:
            raise ValueError("join needs at least one record")
        offset, first, worst = 0, None, None
        for r in records:
            if r and first is None:
                first = (r.first_frame + offset, r.first_world, r.first_tets)
            if r and (worst is None or r.min_volume_ratio < worst[0]):
                worst = (r.min_volume_ratio, r.worst_frame + offset, r.worst_world, r.worst_tet)
            offset += r.frames
        out = cls(torch.cat([r.counts for r in records]), records[0].dt)
        if first is None:
            return out
        return cls(out.counts, out.dt, *first, *worst)


class _InversionLog:
    """The record being written during a rollout (counts by frame; first and worst)."""

    def __init__(self, frames: int, worlds: int | None, dt: float) -> None:
        self.counts = torch.zeros(
            (frames, *(() if worlds is None else (worlds,))), dtype=torch.long
        )
        self.dt = dt
        self.first: tuple[int, int, list[int]] | None = None
        self.worst: tuple[float, int, int, int] | None = None

    def record(self) -> Inversions:
        first = (None, None, []) if self.first is None else self.first
        worst = (None, None, None, None) if self.worst is None else self.worst
        return Inversions(self.counts.clone(), self.dt, *first, *worst)


class _InversionCheck:
    """Inverted tets (J = det F <= 0) of frames ``[K, N, 3]`` (read as float64): how many
    per frame and world, and the lowest J per frame, by the Warp kernels of
    :func:`diffsim.kernels.inversion.inversion_kernels` (torch where Warp does not run on
    the device); and J of every tet at one frame, in torch by the same formula (the triple
    product of the edges, in the kernel's order, times det Dm^-1)."""

    def __init__(self, model: Model) -> None:
        self.tets = model.tets  # [M, 4], the replicated mesh with worlds
        self.n_tets = len(model.tets)
        self.n_worlds = model.n_worlds
        self.det_dm_inv = inverse_rest_determinants(model.dm_inv)  # 1 / (6 V0) [M]
        self.device = model.device
        self.kernels: dict | None = None  # per positions' dtype, where Warp runs
        if self.device.type in ("cpu", "cuda"):
            import warp as wp

            from diffsim.kernels import inversion
            from diffsim.kernels.runtime import init_warp

            init_warp()
            self.vec3 = {torch.float32: wp.vec3f, torch.float64: wp.vec3d}
            self.kernels = {t: inversion.inversion_kernels(v) for t, v in self.vec3.items()}
            self.tets_i32 = self.tets.to(torch.int32).contiguous()  # the owners of the views
            self.det_dm_inv = self.det_dm_inv.contiguous()
            self.wp_device = wp.device_from_torch(self.device)
            self.static = (
                wp.from_torch(self.tets_i32, dtype=wp.vec4i),
                wp.from_torch(self.det_dm_inv, dtype=wp.float64),
            )

    def __call__(self, xs: torch.Tensor, launcher=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(counts [K, W] int64, lowest [K] float64)`` of frames ``xs [K, N, 3]`` (float32
        or float64, read as float64): the inverted tets per frame and world, the lowest J of
        an inverted tet per frame (+inf at frames without one); on the frames' device.
        ``launcher``: splits the frames between its CPU threads where there are many."""
        if self.kernels is None or xs.device != self.device or xs.dtype not in self.kernels:
            return self._torch_counts(xs.to(torch.float64))
        import warp as wp

        K, M, W = len(xs), self.n_tets, self.n_worlds
        xs = xs.detach().contiguous()
        counts = torch.zeros((K, W), dtype=torch.int32, device=xs.device)
        lowest = torch.full((K,), math.inf, dtype=torch.float64, device=xs.device)
        chunk, stream = self._launch_settings()
        kernel = self.kernels[xs.dtype].count_inverted
        parts = 1
        if launcher is not None and self.device.type == "cpu" and K * M >= INVERSION_SPLIT:
            parts = min(launcher.threads, K)

        def frames(first: int, last: int):
            def run() -> None:
                positions = wp.from_torch(xs[first:last], dtype=self.vec3[xs.dtype])
                inputs = [positions, *self.static, M // W, chunk]
                outputs = [wp.from_torch(counts[first:last]), wp.from_torch(lowest[first:last])]
                dim = (last - first, (M + chunk - 1) // chunk)
                wp.launch(kernel, dim, inputs + outputs, device=self.wp_device, stream=stream)

            return run

        jobs = [frames(K * i // parts, K * (i + 1) // parts) for i in range(parts)]
        if parts > 1:
            launcher.run(*jobs)
        else:
            jobs[0]()
        return counts.long(), lowest

    def _launch_settings(self) -> tuple[int, object]:
        """Tets per thread and the Warp stream (torch's current one on a GPU)."""
        import warp as wp

        if self.device.type == "cpu":
            return INVERSION_CHUNK, None
        return 1, wp.stream_from_torch(self.device)

    def _torch_counts(self, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        window = max(1, INVERSION_WINDOW // self.n_tets)
        counts, lowest = [], []
        for c in range(0, len(xs), window):
            J = self._det(self._edges(xs[c : c + window], self.tets)) * self.det_dm_inv
            inverted = J <= 0
            counts.append(inverted.view(len(J), self.n_worlds, -1).sum(dim=2))
            lowest.append(torch.where(inverted, J, math.inf).amin(dim=1))
        return torch.cat(counts), torch.cat(lowest)

    def volume_ratios(self, x: torch.Tensor) -> torch.Tensor:
        """J of every tet at positions ``x [N, 3]`` (float32 or float64, read as float64),
        ``[M]``, by the arithmetic that counted them."""
        if self.kernels is None or x.device != self.device or x.dtype not in self.kernels:
            x = x.to(torch.float64)
            return self._det(self._edges(x[None], self.tets))[0] * self.det_dm_inv
        import warp as wp

        J = torch.empty(self.n_tets, dtype=torch.float64, device=x.device)
        chunk, stream = self._launch_settings()
        positions = wp.from_torch(x.detach().contiguous(), dtype=self.vec3[x.dtype])
        inputs = [positions, *self.static, chunk]
        dim = (self.n_tets + chunk - 1) // chunk
        wp.launch(
            self.kernels[x.dtype].volume_ratios, dim, [*inputs, wp.from_torch(J)],
            device=self.wp_device, stream=stream,
        )  # fmt: skip
        return J

    @staticmethod
    def _edges(xs: torch.Tensor, tets: torch.Tensor) -> torch.Tensor:
        """Edges x1 - x0, x2 - x0, x3 - x0 of the given tets, ``[3 (coordinate), K, 3
        (edge), S]`` (coordinates first: the arithmetic runs on contiguous rows)."""
        corners = xs.permute(2, 0, 1).index_select(2, tets.T.flatten())
        corners = corners.view(3, len(xs), 4, len(tets))
        return corners[:, :, 1:] - corners[:, :, :1]

    @staticmethod
    def _det(e: torch.Tensor) -> torch.Tensor:
        """det [e0 e1 e2] of edges ``[3, K, 3, S]``: six times the signed volume, ``[K, S]``."""
        (ax, bx, cx), (ay, by, cy), (az, bz, cz) = (e[i].unbind(1) for i in range(3))
        return ax * (by * cz - bz * cy) + ay * (bz * cx - bx * cz) + az * (bx * cy - by * cx)


class Simulator:
    """Explicit, differentiable FEM simulation of a tet mesh.

    Symplectic Euler per substep: v += h f(x) / m, friction, damping, velocity clamp,
    fixed-vertex mask, x += h v with the ground's no-tunnelling rule. See docs/how-it-works.md.

    Args:
        mesh: the tet mesh (several bodies via :meth:`TetMesh.merge`).
        material: a :class:`Material`; its tensor parameters keep their graphs.
        dt: time per step (one recorded frame) in s.
        substeps: substeps per step, each of dt / substeps; ``"auto"`` picks the fewest that
            keep the substep below the mesh's estimated stable substep (:attr:`stable_dt`).
            A fixed number above the estimate gives a :class:`StabilityWarning`.
        mass_scaling: a target substep in s, or None. Adds mass to the vertices of tets whose
            stable substep is below it, so that each meets it (:attr:`added_mass`; gravity
            acts on the added mass and the scaled region's highest frequencies slow down;
            see docs/time-steps.md). Off by default.
        gravity: ``(gx, gy, gz)`` in m/s^2, floats or a tensor ``[3]`` (differentiable).
        ground: height (m) of the ground plane y = ground, or None for no ground.
        fixed: prescribed vertices: a bool mask ``[n]`` or an index list.
        damping: mass-proportional damping rate in 1/s (float or tensor ``[]``).
        max_speed: v_max of the smooth tanh velocity clamp in m/s, or None for no clamp.
        min_volume_ratio: a floor in (0, 1) for every tet's volume ratio J (current over
            rest volume), or None (off, the default). Where a step would bring a tet below
            it (below its own J, for a tet already under the floor), the step is cut per
            vertex, velocities alike: tets never invert, at the price of the energy those
            steps lose (counted, with a warning). For soft bodies under loads their mesh
            cannot resolve (docs/time-steps.md, "The volume limit").
        backend: ``"warp"`` (fast kernels) or ``"torch"`` (reference; any material).
        dtype: ``torch.float32`` or ``torch.float64``.
        device: torch device of all tensors (``"cpu"``, ``"cuda"``).
        ground_dhat: barrier activation distance (m); default 0.5% of the bounding-box diagonal.
        ground_stiffness: barrier stiffness kappa (1/(m^2 s^2)); default holds 4 g at dhat/4.
        friction: Coulomb coefficient with the ground (>= 0).
        friction_velocity: eps_v in m/s, the friction smoothing speed.
        contact: surfaces collide with each other and themselves (IPC barrier, friction
            and a continuous collision check), on by default: every simulation is
            intersection-free unless ``contact=False``. Where nothing is near anything it
            costs little (see docs/contact.md).
        contact_dhat: surface barrier activation distance (m); default the smaller of 0.5%
            of the bounding-box diagonal and half the smallest rest distance between
            surface elements that collide (not adjacent, not joined by a flat tet;
            docs/contact.md).
        contact_stiffness: surface barrier kappa (1/(m^2 s^2)); default stable for explicit
            substeps down to dhat/8 (:meth:`SurfaceContact.default_stiffness`).
        contact_speed: the fastest relative speed of surfaces in contact (m/s), at which
            impacts should keep their energy and sliding should not be braked, or None.
            With ``substeps="auto"`` the substep is also short enough for the default
            barrier to stop that approach speed, and for surfaces sliding that fast to
            move less than a tenth of dhat a substep
            (:meth:`SurfaceContact.substep_for_speed`); a fixed substep too long for it
            gives a :class:`StabilityWarning`. Faster impacts and sliding are stopped by
            the step limit and lose energy (a warning says so when it happens;
            docs/contact.md).
        contact_friction: Coulomb coefficient between surfaces (>= 0).
        contact_friction_velocity: eps_v in m/s for surface friction.
        contact_time_of_impact: where the step limit would cut a substep, take it in
            halves (recursively, down to 1/64 of it) instead of truncating it, so that
            impacts faster than the barrier stops keep their energy and sliding is not
            braked; off by default: where closings are crushed deeper than the barrier
            stops at any step (a resting load on a thin crease) every substep is then
            taken in many steps (docs/contact.md, "Time of impact").
        worlds: W > 0 to simulate W worlds at once (one replicated mesh, every kernel over
            all of them), or None for one world with no world axis. With worlds, E, nu and
            density may be ``[]``, ``[W]``, ``[m]`` or ``[W, m]``, gravity ``[3]`` or
            ``[W, 3]``, damping ``[]`` or ``[W]``; states are ``[W, n, 3]`` and trajectories
            ``[T + 1, W, n, 3]``; each world equals the same world simulated alone, and
            contact acts within a world only. See docs/worlds.md.
    """

    def __init__(
        self,
        mesh: TetMesh,
        material: Material,
        *,
        dt: float = 1e-3,
        substeps: int | str = 1,
        mass_scaling: float | None = None,
        gravity: Sequence[float] | torch.Tensor = (0.0, -9.81, 0.0),
        ground: float | None = 0.0,
        fixed=None,
        damping: float | torch.Tensor = 0.0,
        max_speed: float | None = None,
        min_volume_ratio: float | None = None,
        backend: str = "warp",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        ground_dhat: float | None = None,
        ground_stiffness: float | None = None,
        friction: float = 0.0,
        friction_velocity: float = 1e-3,
        contact: bool = True,
        contact_dhat: float | None = None,
        contact_stiffness: float | None = None,
        contact_speed: float | None = None,
        contact_friction: float = 0.0,
        contact_friction_velocity: float = 1e-3,
        contact_time_of_impact: bool = False,
        worlds: int | None = None,
    ) -> None:
        # The settings as given (a value: Simulator.replace builds a new one from them).
        self.settings = {k: v for k, v in locals().items() if k not in ("self", "mesh", "material")}
        if not isinstance(mesh, TetMesh):
            raise TypeError(f"mesh must be a diffsim.TetMesh, got {type(mesh).__name__}")
        if not isinstance(material, Material):
            raise TypeError(f"material must be a diffsim.Material, got {type(material).__name__}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        _check_positive("dt", dt)
        if substeps != "auto" and (not isinstance(substeps, int) or substeps < 1):
            raise ValueError(f'substeps must be an integer >= 1 or "auto", got {substeps!r}')
        if mass_scaling is not None:
            _check_positive("mass_scaling", mass_scaling)
        if max_speed is not None:
            _check_positive("max_speed", max_speed)
        volume_limit = None if min_volume_ratio is None else VolumeLimit(min_volume_ratio)
        if friction < 0 or not math.isfinite(friction):
            raise ValueError(f"friction must be >= 0, got {friction}")
        _check_positive("friction_velocity", friction_velocity)
        if contact_speed is not None:
            _check_positive("contact_speed", contact_speed)
            if not contact:
                raise ValueError("contact_speed sizes the surface contact's substep: it needs "
                                 "contact=True (or leave it None)")  # fmt: skip
        if not isinstance(contact_time_of_impact, bool):
            raise TypeError(
                f"contact_time_of_impact must be True or False, got {contact_time_of_impact!r}"
            )
        if contact_time_of_impact and not contact:
            raise ValueError("contact_time_of_impact splits the surface contact's substeps: "
                             "it needs contact=True (or leave it False)")  # fmt: skip
        self.worlds = layout.check_worlds(worlds)
        self.mesh = mesh
        _validate_material(material, mesh.n_tets, self.worlds)
        # Per world: the mass scaling and stable-step estimate of its parameters; the
        # substep follows the smallest estimate (that of the replicated mesh).
        per_world = _per_world(mesh, material, self.worlds, mass_scaling)
        self.world_mass_scalings = tuple(scaling for scaling, _ in per_world)
        self.world_stable_steps = tuple(estimate for _, estimate in per_world)
        self.mass_scaling = self.world_mass_scalings[0] if self.worlds is None else None
        self.stable_step = min(self.world_stable_steps, key=lambda s: s.dt)
        substeps = self._choose_substeps(dt, substeps, material)
        self.material = material
        self.dtype = dtype
        self.device = check_device(device)
        self.gravity = _as_vector("gravity", gravity, dtype, self.device, self.worlds)
        self.damping = damping
        self._check_damping()
        fixed_mask = _fixed_mask(fixed, mesh.n_vertices)
        ground_model = None
        if ground is not None:
            ground_model = self._make_ground(
                ground, ground_dhat, ground_stiffness, friction, friction_velocity
            )
        contact_model = None
        if contact:
            from diffsim.contact import SurfaceContact

            contact_model = SurfaceContact.for_simulation(
                mesh, dt / substeps, contact_dhat, contact_stiffness, contact_friction,
                contact_friction_velocity, backend, self.device, dtype,
                SPLIT_LEVELS if contact_time_of_impact else 0,
            )  # fmt: skip
            if contact_speed is not None:
                substeps = self._substeps_for_speed(
                    dt, substeps, contact_model, contact_speed, contact_stiffness is None
                )
            h_contact = contact_model.stable_substep()
            if exceeds(dt / substeps, h_contact):  # only a stiffness the user set
                warnings.warn(
                    f"the substep {dt / substeps:.3g} s is above the surface barrier's stable "
                    f"substep {h_contact:.3g} s (contact_stiffness = {contact_model.stiffness:.3g}"
                    f", dhat = {contact_model.dhat:.3g} m): lower contact_stiffness, leave it "
                    "at its default (sized from the substep), or use more substeps",
                    StabilityWarning,
                    stacklevel=2,
                )
            if self.worlds is not None:
                from diffsim.backends.worlds import WorldContact

                contact_model = WorldContact.replicated(contact_model, self.worlds, mesh.n_vertices)
        self.model = self._build_model(
            fixed_mask, dt, substeps, max_speed, ground_model, contact_model, volume_limit
        )
        self._warned: set[str] = set()
        self._truncated_seen = 0  # vertex-steps the step limit cut, at the last check
        self._inversion_check: _InversionCheck | None = None  # built at the first check
        self._inversion_log = _InversionLog(0, self.worlds, self.model.dt)
        self.backend_name = self._choose_backend(backend, material)
        self.backend = BACKENDS[self.backend_name](self.model)

    def _build_model(
        self, fixed_mask, dt, substeps, max_speed, ground, contact, volume_limit
    ) -> Model:
        """The model; with worlds, of the replicated mesh (:mod:`diffsim.sim.worlds`)."""
        mesh, worlds, device = self.mesh, self.worlds, self.device
        as_t = dict(dtype=self.dtype, device=device)
        added = None
        if any(s is not None for s in self.world_mass_scalings):
            added = torch.cat(
                [
                    torch.as_tensor(s.added_mass, **as_t)
                    if s is not None
                    else torch.zeros(mesh.n_vertices, **as_t)
                    for s in self.world_mass_scalings
                ]
            )
        fixed = torch.as_tensor(np.flatnonzero(fixed_mask), device=device)
        tets = torch.as_tensor(mesh.tets, device=device)
        return Model(
            mesh=mesh,
            rest_positions=layout.replicate(
                torch.as_tensor(mesh.vertices, dtype=POSITION_DTYPE, device=device), worlds
            ),
            tets=layout.replicate_indices(tets, worlds, mesh.n_vertices),
            dm_inv=layout.replicate(torch.as_tensor(mesh.dm_inv, **as_t), worlds),
            rest_volumes=layout.replicate(torch.as_tensor(mesh.rest_volumes, **as_t), worlds),
            fixed_mask=layout.replicate(torch.as_tensor(fixed_mask, device=device), worlds),
            fixed_indices=layout.replicate_indices(fixed, worlds, mesh.n_vertices),
            dt=float(dt),
            substeps=substeps,
            max_speed=None if max_speed is None else float(max_speed),
            ground=ground,
            contact=contact,
            added_mass=added,
            worlds=worlds,
            volume_limit=volume_limit,
        )

    def replace(self, **changes) -> Simulator:
        """A new simulator with some constructor arguments changed (this one is unchanged).

        Args:
            **changes: any argument of :class:`Simulator`, ``mesh`` and ``material``
                included, e.g. ``sim.replace(dt=5e-4, material=ds.NeoHookean(2e5, 0.3))``.
        """
        unknown = set(changes) - set(self.settings) - {"mesh", "material"}
        if unknown:
            raise ValueError(
                f"unknown Simulator arguments {sorted(unknown)}; "
                f"known: {sorted(['mesh', 'material', *self.settings])}"
            )
        mesh = changes.pop("mesh", self.mesh)
        material = changes.pop("material", self.material)
        return Simulator(mesh, material, **{**self.settings, **changes})

    # ----------------------------------------------------------------- time steps
    @property
    def stable_dt(self) -> float:
        """The mesh's estimated stable substep in s (with any added mass); see
        :attr:`stable_step` for the tets that set it. Not part of any graph."""
        return self.stable_step.dt

    @property
    def added_mass(self) -> float:
        """Mass added by ``mass_scaling`` in kg (0 without it), summed over the worlds."""
        return sum(0.0 if s is None else s.total_added for s in self.world_mass_scalings)

    def _choose_substeps(self, dt: float, substeps, material: Material) -> int:
        estimate = self.stable_step
        if substeps == "auto":
            return estimate.substeps(dt)
        if material.kernel_id is not None and exceeds(dt / substeps, estimate.dt):
            warnings.warn(
                f"the substep {dt / substeps:.3g} s (dt = {dt:g} s / {substeps} substeps) is "
                f"above the mesh's {estimate.describe(dt)}",
                StabilityWarning,
                stacklevel=3,
            )
        return substeps

    def _substeps_for_speed(
        self, dt: float, substeps: int, contact, speed: float, default_stiffness: bool
    ) -> int:
        """The substeps with ``contact_speed``: more where "auto" needs them (the default
        stiffness follows the shorter substep), a warning where a fixed count is short."""
        h_speed = contact.substep_for_speed(contact.dhat, speed)
        needed = auto_substeps(dt, h_speed)
        if needed <= substeps:
            return substeps
        if self.settings["substeps"] != "auto":
            warnings.warn(
                f"the substep {dt / substeps:.3g} s is too long for the surface barrier to "
                f"stop approaches at contact_speed = {speed:g} m/s (dhat = {contact.dhat:.3g} "
                f'm): use substeps >= {needed} or substeps="auto"; faster impacts lose '
                "energy to the step limit",
                StabilityWarning,
                stacklevel=3,
            )
            return substeps
        if needed > SPEED_SUBSTEPS_NOTICE * substeps:
            from diffsim.contact import ContactWarning

            warnings.warn(
                f"contact_speed = {speed:g} m/s takes {needed} substeps per step of {dt:g} s "
                f"(h = {dt / needed:.3g} s; elasticity needs {substeps}) for the barrier "
                f"(dhat = {contact.dhat:.3g} m) to stop it; check that the speed is in m/s, "
                "or allow a larger contact_dhat where the geometry does (docs/contact.md)",
                ContactWarning,
                stacklevel=3,
            )
        if default_stiffness:
            contact.stiffness = contact.default_stiffness(contact.dhat, dt / needed)
        return needed

    # ----------------------------------------------------------------- set-up helpers
    def _make_ground(self, height, dhat, stiffness, friction, friction_velocity) -> Ground:
        height = float(height)
        if not math.isfinite(height):
            raise ValueError(f"ground must be a finite height or None, got {height}")
        if dhat is None:
            dhat = GROUND_DHAT_FRACTION * float(np.linalg.norm(np.ptp(self.mesh.vertices, axis=0)))
        _check_positive("ground_dhat", dhat)
        lowest = int(np.argmin(self.mesh.vertices[:, 1]))
        if self.mesh.vertices[lowest, 1] <= height:
            raise ValueError(
                f"vertex {lowest} (y = {self.mesh.vertices[lowest, 1]:.4g}) is not above the "
                f"ground at y = {height:g}; lift the mesh, "
                f"e.g. mesh.placed_on({height:g}, gap=0.01)"
            )
        if stiffness is None:
            # Independent of the (differentiable) gravity input on purpose: see Ground.
            stiffness = Ground.default_stiffness(dhat)
        _check_positive("ground_stiffness", stiffness)
        return Ground(
            height, float(dhat), float(stiffness), float(friction), float(friction_velocity)
        )

    def _choose_backend(self, backend: str, material: Material) -> str:
        if backend not in ("warp", "torch"):
            raise ValueError(f"unknown backend {backend!r}; use 'warp' or 'torch'")
        if backend == "warp" and "warp" not in BACKENDS:
            warnings.warn(
                "the Warp backend is unavailable (pip install warp-lang); running on the "
                "torch backend",
                BackendWarning,
                stacklevel=3,
            )
            return "torch"
        if backend == "warp" and material.kernel_id is None:
            warnings.warn(
                f"{type(material).__name__} has no Warp kernel; running on the torch backend "
                "(pass backend='torch' to say so and silence this)",
                BackendWarning,
                stacklevel=3,
            )
            return "torch"
        return backend

    def _check_damping(self) -> None:
        _check_damping(self.damping, self.worlds)

    @property
    def n_worlds(self) -> int:
        """W, the worlds simulated at once (1 without a world axis)."""
        return 1 if self.worlds is None else self.worlds

    def world(self, index: int) -> Simulator:
        """A single-world simulator of world ``index`` (no world axis): its material
        parameters, gravity and damping (graphs kept), and this simulator's substeps.

        What does not batch runs there (:meth:`equilibrium`), and each world's result equals
        that simulator's (docs/worlds.md).
        """
        if self.worlds is None:
            raise ValueError("this simulator has no worlds (worlds=None); it is its own world")
        if not 0 <= index < self.worlds:
            raise ValueError(f"world index {index} is outside [0, {self.worlds})")
        material = _world_materials(self.mesh, self.material, self.worlds)[index]
        gravity, damping = self.gravity, torch.as_tensor(self.damping)
        settings = {**self.settings, "worlds": None, "substeps": self.model.substeps}
        return Simulator(
            self.mesh,
            material,
            **{
                **settings,
                "gravity": gravity[index] if gravity.dim() == 2 else gravity,
                "damping": damping[index] if damping.dim() == 1 else self.damping,
            },
        )

    # ----------------------------------------------------------------- parameters
    def parameters(self) -> dict[str, torch.Tensor]:
        """Differentiable inputs of a rollout by name, in the simulator's dtype: every tensor
        of the material (:meth:`Material.differentiable_tensors`, so a user's own parameters
        are found with nothing declared), gravity and damping."""
        as_t = dict(dtype=self.dtype, device=self.device)
        params = {
            k: torch.as_tensor(v, **as_t) for k, v in self.material.differentiable_tensors().items()
        }
        for name, value in (("gravity", self.gravity), ("damping", self.damping)):
            if name in params:
                raise ValueError(
                    f"the material has a tensor named {name!r}, which the simulator uses for "
                    f"its own {name}; rename the material's attribute"
                )
            params[name] = torch.as_tensor(value, **as_t)
        return params

    def _parameters_with(self, overrides: dict | None) -> dict[str, torch.Tensor]:
        """:meth:`parameters` with some replaced by name (cast to the simulator's dtype)."""
        params = self.parameters()
        if not overrides:
            return params
        unknown = set(overrides) - set(params)
        if unknown:
            raise ValueError(f"unknown parameters {sorted(unknown)}; known: {sorted(params)}")
        as_t = dict(dtype=self.dtype, device=self.device)
        for name, value in overrides.items():
            params[name] = torch.as_tensor(value, **as_t)
        names = [n for n in overrides if n in self.material.parameter_names]
        if names:
            material = self.material.replace(**{n: params[n] for n in names})
            _validate_material(material, self.mesh.n_tets, self.worlds)
        if "damping" in overrides:
            _check_damping(params["damping"], self.worlds)
        if "gravity" in overrides:
            layout.world_vector("gravity", params["gravity"], self.worlds, 3)
        return params

    def coefficients(self, params: dict[str, torch.Tensor] | None = None) -> Coefficients:
        """Material with bound parameters, masses, gravity and damping (differentiable)."""
        params = self.parameters() if params is None else params
        names = self.material.differentiable_tensors().keys()
        material = self.material.with_tensors({k: params[k] for k in names})
        if self.worlds is None:
            return Coefficients(
                material=material,
                mass=lumped_mass(self.model, params["density"]),
                gravity=params["gravity"],
                damping=params["damping"],
            )
        # Worlds: the parameters on the replicated mesh (per tet, or one value for all).
        W, m = self.worlds, self.mesh.n_tets
        spread = {}
        for name in material.parameter_names:
            value = getattr(material, name)
            if isinstance(value, torch.Tensor) and value.dim():
                spread[name] = layout.tet_values(name, value, W, m)
        material = material.replace(**spread) if spread else material
        return Coefficients(
            material=material,
            mass=lumped_mass(self.model, material.density),
            gravity=params["gravity"].expand(W, 3),
            damping=params["damping"].expand(W),
        )

    # ----------------------------------------------------------------- states
    def initial_state(self, positions=None, velocities=None) -> State:
        """A state; positions default to the rest shape and velocities to zero.

        Positions are float64 whatever the simulator's dtype (the precision rule, see
        docs/how-it-works.md); velocities are in the simulator's dtype.

        Args:
            positions: ``[n, 3]`` or None; with worlds also ``[W, n, 3]`` (``[n, 3]``: the
                same in every world).
            velocities: ``[n, 3]``, ``[3]`` (the same for every vertex) or None; with worlds
                also ``[W, n, 3]``.

        Returns:
            A :class:`State`, ``[n, 3]`` each, or ``[W, n, 3]`` with worlds.
        """
        if self.worlds is not None:
            return self._world_initial_state(positions, velocities)
        n = self.model.n_vertices
        x = (
            self.model.rest_positions.clone()
            if positions is None
            else self._vertex_tensor("positions", positions, POSITION_DTYPE)
        )
        if velocities is None:
            v = torch.zeros((n, 3), dtype=self.dtype, device=self.device)
        else:
            v = torch.as_tensor(velocities, dtype=self.dtype, device=self.device)
            if v.shape == (3,):
                v = v.expand(n, 3)
            v = self._vertex_tensor("velocities", v)
        if self.model.ground is not None:
            below = torch.nonzero(x.detach()[:, 1] <= self.model.ground.height).flatten()
            if len(below):
                raise ValueError(
                    f"vertices {below[:8].tolist()} start at or below the ground "
                    f"(y = {self.model.ground.height:g}); lift them"
                )
        if positions is not None:
            self._check_intersection_free(x, self.model.contact, "in the initial positions")
        return State(x, v)

    def _check_intersection_free(self, x: torch.Tensor, contact, where: str) -> None:
        """Raises ValueError where surfaces cross at positions ``x [n, 3]`` (surface contact
        on, with the Warp broad phase; :mod:`diffsim.contact.intersections`)."""
        if getattr(contact, "broad_phase", None) != "bvh":
            return
        from diffsim.contact.intersections import check_intersection_free

        check_intersection_free(self.mesh, contact.surface, x.detach(), where)

    def _world_initial_state(self, positions, velocities) -> State:
        W, n = self.worlds, self.mesh.n_vertices
        if positions is None:
            x = self.model.rest_positions.view(W, n, 3).clone()
        else:
            x = self._world_tensor("positions", positions, POSITION_DTYPE)
        if velocities is None:
            v = torch.zeros((W, n, 3), dtype=self.dtype, device=self.device)
        else:
            v = self._world_tensor("velocities", velocities, self.dtype, vector=True)
        ground = self.model.ground
        if ground is not None:
            below = torch.nonzero(x.detach()[..., 1].flatten() <= ground.height).flatten()
            if len(below):
                world, vertices = layout.locate(below, n)
                raise ValueError(
                    f"vertices {vertices[:8]} of world {world} start at or below the ground "
                    f"(y = {ground.height:g}); lift them"
                )
        if positions is not None and self.model.contact is not None:
            for w, contact in enumerate(getattr(self.model.contact, "contacts", [])):
                where = f"in the initial positions of world {w}"
                self._check_intersection_free(x[w], contact, where)
        return State(x, v)

    def _world_tensor(self, name: str, value, dtype: torch.dtype, vector: bool = False):
        """``[W, n, 3]`` from ``[W, n, 3]``, ``[n, 3]`` (every world) or, with ``vector``,
        ``[3]`` (every vertex of every world); checked, graph kept."""
        W, n = self.worlds, self.mesh.n_vertices
        t = torch.as_tensor(value, device=self.device)
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
        t = t.to(dtype)
        allowed = [(W, n, 3), (n, 3)] + ([(3,)] if vector else [])
        if tuple(t.shape) not in allowed:
            text = ", ".join(str(list(a)) for a in allowed)
            raise ValueError(f"{name} must have shape {text} (worlds={W}), got {list(t.shape)}")
        if not torch.isfinite(t.detach()).all():
            raise ValueError(f"{name} contain NaN or inf")
        return t if t.shape == (W, n, 3) else t.expand(W, n, 3).contiguous()

    def _vertex_tensor(self, name: str, value, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = torch.as_tensor(value, device=self.device)
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
        t = t.to(dtype or self.dtype)
        if t.shape != (self.model.n_vertices, 3):
            raise ValueError(
                f"{name} must have shape [{self.model.n_vertices}, 3], got {list(t.shape)}"
            )
        if not torch.isfinite(t.detach()).all():
            raise ValueError(f"{name} contain NaN or inf")
        return t

    def _fixed_targets(self, fixed_positions, steps: int, x0: torch.Tensor) -> torch.Tensor:
        """Prescribed positions at the end of each step, ``[steps, k, 3]`` (with worlds,
        ``[steps, W * k, 3]``, world by world, from ``x0 [W * n, 3]``)."""
        idx = self.model.fixed_indices
        k = len(idx)
        if fixed_positions is None:
            return x0[idx].unsqueeze(0).expand(steps, k, 3)
        t = torch.as_tensor(fixed_positions, device=self.device)
        if not t.is_floating_point():
            raise ValueError(f"fixed_positions must be floating point, got {t.dtype}")
        t = t.to(POSITION_DTYPE)
        if self.worlds is not None:
            return self._world_targets(t, steps)
        if t.shape == (k, 3):
            return t.unsqueeze(0).expand(steps, k, 3)
        if t.dim() == 3 and t.shape[1:] == (k, 3) and t.shape[0] >= steps:
            return t[:steps]
        raise ValueError(
            f"fixed_positions must have shape [{k}, 3] (constant) or [{steps}, {k}, 3] "
            f"(one per step, for the {k} fixed vertices), got {list(t.shape)}"
        )

    def _world_targets(self, t: torch.Tensor, steps: int) -> torch.Tensor:
        """``[steps, W * k, 3]`` from ``[k, 3]``, ``[W, k, 3]`` or ``[steps', W, k, 3]``."""
        W = self.worlds
        k = len(self.model.fixed_indices) // W
        if t.shape in ((k, 3), (W, k, 3)):
            return t.expand(W, k, 3).reshape(1, W * k, 3).expand(steps, W * k, 3)
        if t.dim() == 4 and t.shape[1:] == (W, k, 3) and t.shape[0] >= steps:
            return t[:steps].reshape(steps, W * k, 3)
        raise ValueError(
            f"fixed_positions must have shape [{k}, 3] (constant, every world), [{W}, {k}, 3] "
            f"(constant, per world) or [{steps}, {W}, {k}, 3] (one per step and world, for "
            f"the {k} fixed vertices), got {list(t.shape)}"
        )

    # ----------------------------------------------------------------- time stepping
    def step(self, state: State, fixed_positions=None) -> State:
        """Advances one step (``substeps`` substeps); differentiable.

        Args:
            state: the current state (``[W, n, 3]`` with worlds).
            fixed_positions: ``[k, 3]`` positions of the fixed vertices at the end of the step
                (default: where they are now); with worlds also ``[W, k, 3]``.
        """
        x, v = self._state_tensors(state)
        targets = self._fixed_targets(fixed_positions, 1, x)
        self._inversion_log = _InversionLog(1, self.worlds, self.model.dt)
        xs, vs = self._run(x, v, targets, list(self.parameters().values()), 0)
        return State(self._unflatten(xs[-1]), self._unflatten(vs[-1]))

    def rollout(
        self,
        steps: int,
        state: State | None = None,
        checkpoint_every: int | None = None,
        fixed_positions=None,
        params: dict[str, torch.Tensor] | None = None,
    ) -> Trajectory:
        """Runs ``steps`` steps and records every frame; differentiable.

        Args:
            steps: number of steps (frames after the first).
            state: start state (default: :meth:`initial_state`).
            checkpoint_every: K > 0 to checkpoint segments of K steps (memory O(T/K + K)
                steps instead of O(T); same gradients), or None.
            fixed_positions: ``[k, 3]`` or ``[steps, k, 3]`` prescribed positions; with
                worlds ``[k, 3]``, ``[W, k, 3]`` or ``[steps, W, k, 3]``.
            params: overrides of :meth:`parameters` by name for this rollout only (tensors
                keep their graphs; e.g. ``{"youngs_modulus": net(centroids)}``): the
                simulator itself is never changed. With worlds, the shapes the constructor
                takes (e.g. ``{"youngs_modulus": E}`` with E ``[W]``).

        Returns:
            A :class:`Trajectory` with positions and velocities ``[steps + 1, n, 3]``, or
            ``[steps + 1, W, n, 3]`` with worlds.
        """
        if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        steps = int(steps)
        if checkpoint_every is not None and (
            not isinstance(checkpoint_every, numbers.Integral) or checkpoint_every < 1
        ):
            raise ValueError(
                f"checkpoint_every must be a positive integer or None, got {checkpoint_every!r}"
            )
        checkpoint_every = None if checkpoint_every is None else int(checkpoint_every)
        state = self.initial_state() if state is None else state
        x, v = self._state_tensors(state)
        targets = self._fixed_targets(fixed_positions, steps, x)
        named = self._parameters_with(params)
        self._check_start(x, v, targets, named)
        self._inversion_log = _InversionLog(steps, self.worlds, self.model.dt)
        params = list(named.values())
        if not torch.is_grad_enabled() or not any(
            t.requires_grad for t in (x, v, targets, *params)
        ):
            # Nothing to differentiate: write frames straight into preallocated buffers.
            with torch.no_grad():
                positions = x.new_empty((steps + 1, *x.shape))
                velocities = v.new_empty((steps + 1, *v.shape))
                positions[0], velocities[0] = x, v
                self._run(x, v, targets, params, 0, out=(positions[1:], velocities[1:]))
            return self._trajectory(positions, velocities)
        positions, velocities = [x.unsqueeze(0)], [v.unsqueeze(0)]
        segment = checkpoint_every or max(steps, 1)
        use_checkpoint = checkpoint_every is not None
        for start in range(0, steps, segment):
            seg_targets = targets[start : start + segment]
            if use_checkpoint:
                runner = self._segment_runner(start)
                xs, vs = run_segment(runner, x, v, seg_targets, params)
            else:
                xs, vs = self._run(x, v, seg_targets, params, start)
            positions.append(xs)
            velocities.append(vs)
            x, v = xs[-1], vs[-1]
            if use_checkpoint:  # the next segment saves a copy, not a view keeping xs alive
                x, v = x.clone(), v.clone()
        return self._trajectory(torch.cat(positions), torch.cat(velocities))

    def _check_start(self, x, v, targets, params: dict[str, torch.Tensor]) -> None:
        """Checks a rollout's inputs before any step runs (detached values, not the graph):
        finite start state and prescribed positions above the ground, surfaces apart with
        contact on, and material values in range (an optimiser step can push a leaf out of
        range in place), so that trouble is named here instead of blamed on the time step."""
        m = self.model
        with torch.no_grad():
            for name, t in (("positions", x), ("velocities", v)):
                bad = torch.nonzero(~torch.isfinite(t.detach()).all(dim=-1)).flatten()
                if len(bad):
                    raise ValueError(
                        f"the start state's {name} contain NaN or inf (vertices "
                        f"{bad[:8].tolist()}); make states with sim.initial_state()"
                    )
            if len(m.fixed_indices) and not bool(torch.isfinite(targets.detach()).all()):
                raise ValueError("fixed_positions contain NaN or inf")
            if m.ground is not None:
                below = torch.nonzero(x.detach()[:, 1] <= m.ground.height).flatten()
                if len(below):
                    raise ValueError(
                        f"vertices {below[:8].tolist()} of the start state are at or below "
                        f"the ground (y = {m.ground.height:g}); lift them above it"
                    )
                if len(m.fixed_indices) and bool(
                    (targets.detach()[..., 1] <= m.ground.height).any()
                ):
                    raise ValueError(
                        f"fixed_positions go at or below the ground (y = {m.ground.height:g}); "
                        "keep prescribed vertices above it"
                    )
            if m.contact is not None:
                # ... or within what the working dtype resolves at the scene's size.
                size = float((x.detach() - m.contact.origin).abs().max())
                eps = torch.finfo(self.dtype).eps
                touch = max(MIN_START_GAP_FRACTION * m.contact.dhat, eps * size)
                if not m.contact.apart(x.detach(), touch):
                    gap = m.contact.min_distance(x.detach())
                    raise ValueError(
                        f"surfaces touch or overlap in the start state (closest pair "
                        f"{gap:.3g} m apart, contact dhat {m.contact.dhat:.3g} m); separate "
                        "the bodies before the rollout"
                    )
            for name in self.material.parameter_names:
                value = params[name].detach()
                lo, hi, text = PARAMETER_BOUNDS[name]
                bad = ~((value > lo) & (value < hi))
                if bool(bad.any()):
                    raise ValueError(
                        f"{name} must be {text}, got {float(value[bad].flatten()[0]):g} "
                        "(changed after the simulator was built? an optimiser step can push a "
                        "parameter out of range: clamp it or fit its logarithm)"
                    )
            _check_damping(params["damping"], self.worlds)

    def _state_tensors(self, state: State) -> tuple[torch.Tensor, torch.Tensor]:
        """The state's positions (float64) and velocities (working dtype); with worlds,
        flattened to the replicated mesh's ``[W * n, 3]``."""
        x, v = state.positions.to(POSITION_DTYPE), state.velocities.to(self.dtype)
        if self.worlds is None:
            return x, v
        if not torch.is_grad_enabled():  # a view made without grad mode confuses autograd
            x, v = x.detach(), v.detach()
        shape = (self.worlds, self.mesh.n_vertices, 3)
        for name, t in (("positions", x), ("velocities", v)):
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"state {name} must have shape {list(shape)} (worlds={self.worlds}), got "
                    f"{list(t.shape)}; make states with initial_state"
                )
        return x.reshape(-1, 3), v.reshape(-1, 3)

    def _unflatten(self, t: torch.Tensor) -> torch.Tensor:
        """``[..., W * n, 3]`` as ``[..., W, n, 3]`` with worlds (a view); else unchanged."""
        if self.worlds is None:
            return t
        return t.view(*t.shape[:-2], self.worlds, self.mesh.n_vertices, 3)

    def _trajectory(self, positions: torch.Tensor, velocities: torch.Tensor) -> Trajectory:
        return Trajectory(
            self._unflatten(positions),
            self._unflatten(velocities),
            self.model.dt,
            self.mesh.tets,
            self.mesh.surface_faces,
        )

    def _segment_runner(self, first_step: int):
        def runner(x, v, targets, params):
            return self._run(x, v, targets, params, first_step)

        return runner

    def _run(self, x, v, targets, params, first_step: int, out=None):
        """Runs len(targets) steps from (x, v) with the given parameter tensors.

        Returns the frames stacked, ``([K, n, 3], [K, n, 3])``; with ``out`` (two
        preallocated ``[K, n, 3]`` buffers, no-grad runs only) writes them there instead,
        in blocks of steps, so that a blow-up stops the run early.
        """
        with self.backend.running():
            return self._run_in(x, v, targets, params, first_step, out)

    def _run_in(self, x, v, targets, params, first_step: int, out=None):
        names = list(self.parameters())
        coeffs = self.coefficients(dict(zip(names, params, strict=True)))
        prepared = self.backend.prepare(coeffs)
        if out is None:
            xs, vs = self._advance(prepared, x, v, targets, first_step)
            self._check_finite(xs, first_step)
            self._check_limiters(xs, vs, first_step=first_step)
            return xs, vs
        block = max(1, FINITE_CHECK_WORK // (self.model.n_tets * self.model.substeps))
        since = 0  # substeps since the last strain check
        for b in range(0, len(targets), block):
            frames = (out[0][b : b + block], out[1][b : b + block])
            self._advance(prepared, x, v, targets[b : b + block], first_step + b, frames)
            self._check_finite(frames[0], first_step + b)
            since += len(frames[0]) * self.model.substeps
            strain = since >= STRAIN_CHECK_SUBSTEPS or b + block >= len(targets)
            self._check_limiters(*frames, strain=strain, first_step=first_step + b)
            since = 0 if strain else since
            x, v = frames[0][-1], frames[1][-1]
        return out

    def _advance(self, prepared, x, v, targets, first_step: int, out=None):
        """``backend.advance``, with a step the surface contact would cap as a whole (a
        blow-up, :class:`~diffsim.contact.CappedStep`) raised as a SimulationError."""
        from diffsim.contact.surface_contact import CappedStep

        try:
            return self.backend.advance(prepared, x, v, targets, out)
        except CappedStep as capped:
            where = "" if capped.world is None else f" in world {capped.world}"
            raise SimulationError(
                f"step {first_step + capped.step} blew up{where}: a substep moved surface "
                f"vertices {capped.relative:.3g} m relative to each other ({capped.absolute:.3g}"
                f" m at most; the scene is {capped.scene_size:.3g} m across), the motion of "
                f"an instability, not of contact; {self._blow_up_advice()}"
            ) from None

    def _check_limiters(
        self, xs: torch.Tensor, vs: torch.Tensor, strain: bool = True, first_step: int = 0
    ) -> None:
        """Warns (once per kind) where the speed clamp acts on a large share of vertices or
        tets are strained far beyond any material's range: what an unclamped run would have
        raised as a blow-up. Reads detached frames ``[K, n, 3]``; not part of the graph.
        The strain is read at the last frame, and only with ``strain``. Inverted tets are
        counted at every frame (frames ``first_step + 1 ..`` of the rollout; see
        :attr:`inversions`)."""
        if not len(xs):
            return
        m = self.model
        with torch.no_grad():
            self._count_inversions(xs.detach(), first_step)
            if m.contact is not None and "impact" not in self._warned:
                self._check_truncated(m)
            if m.volume_limit is not None and "volume" not in self._warned:
                self._check_volume_limit(m)
            if m.max_speed is not None and "clamp" not in self._warned:
                fast = vs.detach().norm(dim=2) > CLAMP_NOTICE_SPEED * m.max_speed
                # The share of each world's vertex-frames (one world without worlds).
                shares = fast.view(len(fast), m.n_worlds, -1).double().mean(dim=(0, 2))
                world = int(shares.argmax())
                share = float(shares[world])
                where = "" if self.worlds is None else f" of world {world}"
                if share > CLAMP_NOTICE_SHARE:
                    self._warn(
                        "clamp",
                        f"the tanh speed clamp (max_speed = {m.max_speed:g} m/s) is acting on "
                        f"{100 * share:.0f}% of vertex-frames{where} (speeds above "
                        f"{CLAMP_NOTICE_SPEED * m.max_speed:g} m/s, changed by more than 8%); "
                        f"this usually hides an unstable substep (h = {m.substep_dt:.3g} s): "
                        f"use a smaller dt or more substeps, or raise max_speed",
                    )
            if strain and "strain" not in self._warned:
                # The counting check's J (one Warp pass where Warp runs), set up above.
                J = self._inversion_check.volume_ratios(xs[-1].detach())
                lo, hi = STRAIN_NOTICE_RANGE
                bad = torch.nonzero((J < lo) | (J > hi)).flatten()
                if len(bad):
                    self._warn(
                        "strain",
                        f"{len(bad)} tets are strained far beyond the material's range "
                        f"(volume ratios from {float(J.min()):.3g} to {float(J.max()):.3g}; "
                        f"{self._name_items('tets', bad, self.mesh.n_tets)}); an unstable "
                        f"substep (h = "
                        f"{m.substep_dt:.3g} s) or a clamp hiding one is the usual cause: use "
                        f"a smaller dt or more substeps",
                    )

    @property
    def contact_steps_cut(self) -> int:
        """Vertex-steps the continuous collision limit has cut so far (all worlds; 0
        without surface contact): where surfaces closed faster than the barrier stops them
        at this substep, slid along each other within it about as fast, or were pressed
        deep into it. Those steps lost energy."""
        contact = self.model.contact
        if contact is None:
            return 0
        contacts = getattr(contact, "contacts", [contact])
        return int(sum(c.timings["truncated_vertex_steps"] for c in contacts))

    def _check_truncated(self, m: Model) -> None:
        """Warns once when the CCD step limit has cut steps (:attr:`contact_steps_cut`)."""
        truncated = self.contact_steps_cut
        if truncated <= self._truncated_seen:
            return
        self._truncated_seen = truncated
        c = getattr(m.contact, "contacts", [m.contact])[0]
        self._warn(
            "impact",
            f"the continuous collision limit cut {truncated} vertex-steps, where surfaces "
            f"closed faster than the barrier stops them at this substep (about "
            f"{c.stopping_speed(m.substep_dt):.3g} m/s with dhat = {c.dhat:.3g} m"
            f", h = {m.substep_dt:.3g} s), slid along each other within it about that "
            f"fast, or were pressed deep into it; those steps lost energy. For impacts or "
            f'sliding at up to v m/s pass contact_speed=v with substeps="auto" '
            f"(docs/contact.md)",
        )

    @property
    def volume_steps_cut(self) -> int:
        """Vertex-steps the volume limit (``min_volume_ratio``) has cut so far (0 without
        it): where a step would have brought a tet below the floor. Those steps lost
        energy."""
        limit = self.model.volume_limit
        return 0 if limit is None else limit.counts["limited_vertex_steps"]

    def _check_volume_limit(self, m: Model) -> None:
        """Warns once when the volume limit has cut steps (:attr:`volume_steps_cut`)."""
        counts = m.volume_limit.counts
        if not counts["limited_vertex_steps"]:
            return
        cancelled = counts["cancelled_substeps"]
        self._warn(
            "volume",
            f"the volume limit cut {counts['limited_vertex_steps']} vertex-steps in "
            f"{counts['limited_substeps']} substep{'s' if counts['limited_substeps'] > 1 else ''}"
            + (
                f" (and left {cancelled} substeps untaken, where it and the continuous "
                "collision limit did not settle on a step)"
                if cancelled
                else ""
            )
            + f", where tets would have been compressed below J = "
            f"{m.volume_limit.min_ratio:g} of their rest volume; those steps lost energy. "
            f"The material is too soft for the loads its mesh carries there (h = "
            f"{m.substep_dt:.3g} s): a stiffer material, a finer mesh or more substeps "
            '(docs/time-steps.md, "The volume limit")',
        )

    def _count_inversions(self, xs: torch.Tensor, first_step: int) -> None:
        """Counts the inverted tets of frames ``[K, N, 3]`` (steps ``first_step + 1 ..``)
        into the rollout's record, and warns once per simulator when there are some."""
        if self._inversion_check is None:
            self._inversion_check = _InversionCheck(self.model)
        check, log, m_tets = self._inversion_check, self._inversion_log, self.mesh.n_tets
        counts, lowest = check(xs, getattr(self.backend, "launcher", None))
        counts = counts.cpu()
        if first_step < len(log.counts):
            rows = counts[: len(log.counts) - first_step]
            log.counts[first_step : first_step + len(rows)] = rows if self.worlds else rows[:, 0]
        hit = torch.nonzero(counts.sum(dim=1)).flatten()
        if not len(hit):
            return
        # The tets themselves, in torch, at the first frame with some and at the worst.
        k = int(hit[0])
        if log.first is None or first_step + k + 1 < log.first[0]:
            J = check.volume_ratios(xs[k])
            world, tets = layout.locate(torch.nonzero(J <= 0).flatten(), m_tets)
            log.first = (first_step + k + 1, world, tets)
        lowest = lowest.cpu()
        k = int(lowest.argmin())
        if log.worst is None or float(lowest[k]) < log.worst[0]:
            J = check.volume_ratios(xs[k])
            tet = int(J.argmin())
            low = float(J[tet])
            if log.worst is None or low < log.worst[0]:
                log.worst = (low, first_step + k + 1, tet // m_tets, tet % m_tets)
        if log.first is not None and "inversion" not in self._warned:
            self._warn_inversions(log)

    def _warn_inversions(self, log: _InversionLog) -> None:
        frame, world, tets = log.first
        m = self.model
        where = "" if self.worlds is None else f" of world {world}"
        counts = log.counts.reshape(len(log.counts), -1)
        if self.material.kernel_id == StableNeoHookean.kernel:
            tolerant = "StableNeoHookean (this material) tolerates inverted tets, but"
        else:
            tolerant = "StableNeoHookean tolerates inverted tets (others may blow up), but"
        self._warned.add("inversion")
        warnings.warn(
            f"{int(counts[frame - 1].max())} tets inverted (volume ratio J <= 0) at frame "
            f"{frame} (t = {frame * m.dt:.4g} s) of the rollout (tets {tets[:8]}{where}); the "
            f"most negative J so far is {log.worst[0]:.3g}. Inverted tets are not physical: "
            f"use a smaller dt or more substeps (now {m.substeps} of {m.substep_dt:.3g} s; "
            f'substeps="auto" picks enough for the mesh), a stiffer material or a gentler '
            f"impact, or keep every tet above a volume ratio with min_volume_ratio (e.g. "
            f"0.1: steps that would go below are cut); {tolerant} its results there are not "
            "physical. Counts per frame: sim.inversions",
            StabilityWarning,
            stacklevel=6,  # the caller of rollout or step
        )

    def _warn(self, kind: str, message: str) -> None:
        self._warned.add(kind)
        warnings.warn(message, StabilityWarning, stacklevel=4)

    def _check_finite(self, frames: torch.Tensor, first_step: int) -> None:
        """Raises SimulationError at the first of the frames ``[K, n, 3]`` that is not finite."""
        # Positions suffice: a non-finite velocity makes x + h v non-finite in the same step.
        # A sum is finite only if every term is (inf - inf is NaN), so one reduction and no
        # mask; the elementwise test runs only when the sum is not (it may overflow).
        frames = frames.detach()
        if bool(torch.isfinite(frames.sum())) or bool(torch.isfinite(frames).all()):
            return
        finite = torch.isfinite(frames).all(dim=2)
        k = int(torch.nonzero(~finite.all(dim=1))[0])
        bad = torch.nonzero(~finite[k]).flatten()
        bad = self._name_items("vertices", bad, self.mesh.n_vertices)
        advice = self._blow_up_advice()
        raise SimulationError(
            f"step {first_step + k} produced non-finite positions ({bad}); {advice}"
        )

    def _blow_up_advice(self) -> str:
        """What to change after a blow-up: the substep against the stable estimate."""
        m = self.model
        h = m.substep_dt
        if exceeds(h, self.stable_dt):
            return f"the substep {h:.3g} s is above the {self.stable_step.describe(m.dt)}"
        advice = (
            f"the substep {h:.3g} s is within the estimated stable substep "
            f"{self.stable_dt:.3g} s, so large deformation or contact likely drove it: "
            "try a smaller dt or more substeps"
        )
        if m.max_speed is None:
            advice += ", or set max_speed"
        if self.material.kernel_id != StableNeoHookean.kernel:
            advice += ", or use StableNeoHookean, which tolerates inverted tets"
        return advice

    def _name_items(self, kind: str, indices: torch.Tensor, per_world: int) -> str:
        """``"tets [3, 5]"`` (at most 8), with worlds ``"tets [3, 5] of world 2"`` (the
        first world named, in its own numbering), for messages."""
        if self.worlds is None:
            return f"{kind} {indices[:8].tolist()}"
        world, local = layout.locate(indices, per_world)
        return f"{kind} {local[:8]} of world {world}"

    # ----------------------------------------------------------------- statics
    def equilibrium(self, **kwargs) -> torch.Tensor | tuple:
        """Static equilibrium ``[n, 3]``, differentiable by one adjoint solve.

        See :func:`diffsim.equilibrium.equilibrium` for the options. Does not batch over
        worlds: with worlds, solve each with ``sim.world(w).equilibrium(...)``.
        """
        from diffsim.equilibrium import equilibrium

        self._single_world("equilibrium")
        return equilibrium(self, **kwargs)

    def quasi_static(self, **kwargs) -> torch.Tensor | tuple:
        """Equilibria ``[T, n, 3]`` along a stepped loading path (warm-started, differentiable).

        See :func:`diffsim.equilibrium.quasi_static` for the options. Does not batch over
        worlds (see :meth:`equilibrium`).
        """
        from diffsim.equilibrium import quasi_static

        self._single_world("quasi_static")
        return quasi_static(self, **kwargs)

    def _single_world(self, what: str) -> None:
        if self.worlds is not None:
            raise ValueError(
                f"{what} does not batch over worlds (worlds={self.worlds}); solve each world "
                f"with its own simulator: sim.world(w).{what}(...) for w in range(sim.n_worlds)"
            )

    # ----------------------------------------------------------------- diagnostics
    def forces(self, positions: torch.Tensor) -> torch.Tensor:
        """Total conservative force ``[n, 3]`` in N (elastic + gravity + ground barrier);
        with worlds, of positions ``[W, n, 3]``, ``[W, n, 3]``."""
        prepared = self.backend.prepare(self.coefficients())
        if self.worlds is None:
            return self.backend.forces(prepared, positions)
        x = torch.as_tensor(positions, device=self.device).to(POSITION_DTYPE)
        shape = (self.worlds, self.mesh.n_vertices, 3)
        if tuple(x.shape) != shape:
            raise ValueError(f"positions must have shape {list(shape)}, got {list(x.shape)}")
        return self._unflatten(self.backend.forces(prepared, x.reshape(-1, 3)))

    @property
    def inversions(self) -> Inversions:
        """Inverted tets (J <= 0) at every frame of the last :meth:`rollout` or :meth:`step`
        (an :class:`Inversions`: counts per frame, ``[T]`` or ``[T, W]``, the first frame,
        world and tets, the most negative J). Not part of any graph."""
        return self._inversion_log.record()

    def inverted_tets(self, state: State) -> torch.Tensor | list[torch.Tensor]:
        """Tets whose volume ratio J = det F is <= 0 in ``state`` (inverted or flat).

        Args:
            state: a state, ``[n, 3]`` (``[W, n, 3]`` with worlds).

        Returns:
            Their indices ``[k]`` (int64), or with worlds a list of W such tensors, each in
            its world's numbering (``len(...)`` counts them). Not part of any graph.
        """
        x, _ = self._state_tensors(state)
        m = self.model
        with torch.no_grad():
            J = volume_ratios(x.detach().to(POSITION_DTYPE), m.tets, m.dm_inv.double())
        if self.worlds is None:
            return torch.nonzero(J <= 0).flatten()
        return [torch.nonzero(Jw <= 0).flatten() for Jw in J.view(self.worlds, -1)]

    def energies(self, state: State) -> dict[str, torch.Tensor]:
        """Kinetic, elastic, gravitational, barrier (and surface "contact") energies (J), total;
        with worlds, ``[W]`` each (one per world)."""
        if self.worlds is not None:
            return self._world_energies(state)
        c = self.coefficients()
        m = self.model
        x, v = state.positions, state.velocities
        out = {
            "kinetic": 0.5 * (c.mass * v.square().sum(dim=1)).sum(),
            "elastic": elastic_energy(c.material, x, m.tets, m.dm_inv, m.rest_volumes),
            "gravitational": -(c.mass[:, None] * x * c.gravity).sum(),
            "barrier": m.ground.energy(x, c.mass) if m.ground is not None else x.new_zeros(()),
        }
        if m.contact is not None:
            out["contact"] = m.contact.energy(x, c.mass)  # surface barrier
        out["total"] = sum(out.values())
        return out

    def _world_energies(self, state: State) -> dict[str, torch.Tensor]:
        c, m = self.coefficients(), self.model
        W, n = self.worlds, self.mesh.n_vertices
        x, v = self._state_tensors(state)
        x = x.to(POSITION_DTYPE)
        F = deformation_gradients(x, m.tets, m.dm_inv)
        density = c.material.energy_density(F) * m.rest_volumes
        g = m.per_vertex(c.gravity)
        out = {
            "kinetic": 0.5 * (c.mass * v.square().sum(dim=1)).view(W, n).sum(1),
            "elastic": density.view(W, -1).sum(1),
            "gravitational": -(c.mass[:, None] * x * g).view(W, -1).sum(1),
        }
        if m.ground is not None:
            parts = zip(x.split(n), c.mass.split(n), strict=True)
            out["barrier"] = torch.stack([m.ground.energy(xw, mw) for xw, mw in parts])
        else:
            out["barrier"] = c.mass.new_zeros(W)
        if m.contact is not None:
            out["contact"] = m.contact.energies(x, c.mass)
        out["total"] = sum(out.values())
        return out

    def __repr__(self) -> str:
        worlds = "" if self.worlds is None else f", worlds={self.worlds}"
        return (
            f"Simulator({self.mesh!r}, {self.material!r}, dt={self.model.dt:g}, "
            f"substeps={self.model.substeps}, backend={self.backend_name!r}, "
            f"dtype={self.dtype}{worlds})"
        )


def _check_damping(d, worlds: int | None = None) -> None:
    data = d.detach() if isinstance(d, torch.Tensor) else torch.tensor(float(d))
    if worlds is not None and data.shape == (worlds,):
        if not bool(torch.isfinite(data).all()) or bool((data < 0).any()):
            raise ValueError(f"damping must be finite and >= 0 (1/s) in every world, got {d}")
        return
    if data.dim() != 0 or not torch.isfinite(data) or data < 0:
        shapes = "a finite scalar" if worlds is None else f"a finite scalar or [{worlds}] tensor"
        raise ValueError(f"damping must be {shapes} >= 0 (1/s), got {d}")


def _check_positive(name: str, value) -> None:
    try:
        ok = float(value) > 0 and math.isfinite(float(value))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _as_vector(name: str, value, dtype, device, worlds: int | None = None) -> torch.Tensor:
    t = value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.float64)
    one_per_world = worlds is not None and t.shape == (worlds, 3)
    if t.shape != (3,) and not one_per_world:
        per_world = "" if worlds is None else f" (or [{worlds}, 3], one per world)"
        raise ValueError(f"{name} must have 3 components{per_world}, got shape {list(t.shape)}")
    if not torch.isfinite(t.detach()).all():
        raise ValueError(f"{name} must be finite, got {t.tolist()}")
    return t.to(dtype=dtype, device=device)


def _fixed_mask(fixed, n: int) -> np.ndarray:
    """A bool mask [n] from a mask, an index list, or None."""
    if fixed is None:
        return np.zeros(n, dtype=bool)
    arr = fixed.detach().cpu().numpy() if isinstance(fixed, torch.Tensor) else np.asarray(fixed)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise ValueError(f"a fixed mask must have shape [{n}], got {list(arr.shape)}")
        return arr.copy()
    if arr.size == 0:
        return np.zeros(n, dtype=bool)
    if not np.issubdtype(arr.dtype, np.integer) or arr.ndim != 1:
        raise ValueError("fixed must be a bool mask [n] or a 1-D list of vertex indices")
    bad = arr[(arr < 0) | (arr >= n)]
    if len(bad):
        raise ValueError(f"fixed vertex indices {bad[:8].tolist()} are outside [0, {n})")
    mask = np.zeros(n, dtype=bool)
    mask[arr] = True
    return mask


def _validate_material(material: Material, n_tets: int, worlds: int | None) -> None:
    """:meth:`Material.validate`, with worlds for each world's share of the parameters."""
    if worlds is None:
        material.validate(n_tets)
        return
    for name in material.parameter_names:
        value = getattr(material, name)
        if isinstance(value, torch.Tensor):
            layout.parameter_kind(name, value.shape, worlds, n_tets)
    if not _varies(material, n_tets, worlds):
        material.validate(n_tets)
        return
    for w in range(worlds):
        try:
            _world_material(material, w, worlds, n_tets).validate(n_tets)
        except ValueError as error:
            raise ValueError(f"world {w}: {error}") from None


def _varies(material: Material, n_tets: int, worlds: int | None) -> bool:
    """True if some physical parameter has a world axis."""
    if worlds is None:
        return False
    return any(
        layout.has_world_axis(name, value, worlds, n_tets)
        for name, value in material.physical_parameters().items()
    )


def _world_material(material: Material, w: int, worlds: int, n_tets: int) -> Material:
    """World w's material: its share of each physical parameter (graphs kept)."""
    values = {
        name: layout.world_value(name, value, w, worlds, n_tets)
        for name, value in material.physical_parameters().items()
        if layout.has_world_axis(name, value, worlds, n_tets)
    }
    return material.replace(**values) if values else material


def _world_materials(mesh: TetMesh, material: Material, worlds: int | None) -> list[Material]:
    """One material per world (the material itself without worlds)."""
    if not _varies(material, mesh.n_tets, worlds):
        return [material] * (1 if worlds is None else worlds)
    return [_world_material(material, w, worlds, mesh.n_tets) for w in range(worlds)]


def _per_world(
    mesh: TetMesh, material: Material, worlds: int | None, target: float | None
) -> tuple[tuple[MassScaling | None, StableStep], ...]:
    """(mass scaling, stable-step estimate) of each world, computed once where no
    parameter has a world axis."""

    def estimate(m: Material) -> tuple[MassScaling | None, StableStep]:
        scaling = _scaled_mass(mesh, m, target)
        return scaling, _stable_step(mesh, m, scaling)

    if not _varies(material, mesh.n_tets, worlds):
        return (estimate(material),) * (1 if worlds is None else worlds)
    return tuple(estimate(m) for m in _world_materials(mesh, material, worlds))


def _physical(material: Material) -> list:
    """E, nu and density as detached numpy values (floats or per-tet arrays)."""
    out = []
    for name in ("youngs_modulus", "poissons_ratio", "density"):
        value = material.physical_parameters()[name]
        out.append(
            value.detach().cpu().double().numpy() if isinstance(value, torch.Tensor) else value
        )
    return out


def _scaled_mass(mesh: TetMesh, material: Material, target: float | None) -> MassScaling | None:
    if target is None:
        return None
    return mass_scaling(mesh.vertices, mesh.tets, *_physical(material), target_dt=float(target))


def _stable_step(mesh: TetMesh, material: Material, scaling: MassScaling | None) -> StableStep:
    added = None if scaling is None else scaling.added_mass
    return stable_step(mesh.vertices, mesh.tets, *_physical(material), added_mass=added)
