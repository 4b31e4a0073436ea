"""SurfaceContact: the contact object the simulator calls each substep."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from diffsim.contact import ccd, friction, potential
from diffsim.contact.candidates import (
    Candidates,
    SurfacePrimitives,
    farthest_offset,
    near_candidates,
    relative_offset,
)
from diffsim.contact.rest_gaps import (
    DHAT_FRACTION,
    RestGaps,
)
from diffsim.mesh import TetMesh

# The default stiffness makes one pair's barrier stiffness reach the explicit stability
# limit (h^2 omega^2 = 1) at this fraction of dhat. 1/8, not the 1/4 one pair allows: a
# vertex feels several pairs at once, and at 1/4 head-on balls gained up to 37% of their
# energy (docs/contact.md, "Default stiffness").
STABLE_GAP_FRACTION = 0.125
# With it, the barrier stops approach speeds up to about this fraction of dhat / h ...
STOPPING_FRACTION = 0.2
# ... and contact_speed sizes the substep to stop this many times the given speed.
SPEED_MARGIN = 2.0
# A candidate set holds while the offset since its anchor is below its reach R (it lists the
# pairs within dhat + 2 R), at least the margin: dhat, or more where the scene rule's dhat
# (DHAT_FRACTION) is larger (a small dhat would rebuild often), but not beyond this fraction
# of the surface's mean rest edge length, where the pairs listed per element grow fast (the
# Armadillo on its crease, dhat 0.18 mm, edges 4.8 mm: a 2.47 mm margin listed 466,000 pairs
# and cost 541 ms a step; 0.95 mm, 22,000 and 230 ms; 1.5 mm, 139,000 and 280 ms).
MARGIN_EDGE_FRACTION = 0.2
# A candidate set is built with room for at least this many steps of the last step's size
# (4 -> 8: the colliding spheres 0.69 -> 0.51 ms per substep, the knocked-over stack 0.98 ->
# 0.72 ms, the mat on the ball unchanged; 16 lists 10 times the pairs and costs more).
REBUILD_STEPS = 8
# ... and for up to this many while that room stays within MARGIN_EDGE_FRACTION of the mean
# surface edge, where few more pairs are listed (the colliding spheres at 12 substeps:
# 0.17-0.21 -> 0.16 ms a substep, rebuilt 32 -> 15 times; the mat on the ball 0.25-0.29 ->
# 0.22 ms; the bunny's and the Armadillo's margin is that cap already: unchanged). 24 -> 48
# (with NEAR_MIN_PAIRS 2000 -> 1000, side by side on a quiet machine): the colliding spheres
# at 14 substeps 0.124 / 0.214 -> 0.113 / 0.197 ms a substep forward / forward+backward,
# rebuilt 17 -> 11 times in the benchmark's window; cube_stack 0.42 -> 0.37 ms a frame,
# stack_knockover 2.07 -> 1.94; the other scenes unchanged.
ROOMY_REBUILD_STEPS = 48
# The Warp barrier and friction kernels look for the pairs within dhat only among the
# candidates within dhat + 2 R where they were last selected, R this many steps of the last
# step's size, selected again once the offset since exceeds R (the mat on the ball: about
# 100 of its 9,400 candidates, selected every 4-5 substeps; 8 steps reach the mat's own
# pairs across its thickness, at 2.2 dhat, and select thousands).
NEAR_STEPS = 4
# Candidate sets smaller than this take every pair in those kernels: selecting costs more
# than it saves (the kernels pass over 1,000 pairs in about 20 microseconds).
NEAR_MIN_PAIRS = 1000
# limit() first scales a whole step down (one factor for all vertices) so that no vertex
# moves farther than this fraction of the mesh diagonal relative to the others (the common
# motion subtracted; see relative_offset) ...
MAX_STEP_FRACTION = 0.1
# ... nor farther than this fraction of it in absolute terms; together they bound the broad
# phase's work.
MAX_TRANSLATION_FRACTION = 1.0
# A dynamics step moving vertices farther than this fraction of the scene's size relative to
# each other is a blow-up (CappedStep), not an impact: a stiff barrier's kick at deep
# penetration moves them a little beyond MAX_STEP_FRACTION, where the cap is a safety net.
BLOW_UP_FRACTION = 1.0
# ... and so are this many capped substeps in a row.
BLOW_UP_CAPS = 3
# clear_over measures at most this many pairs near contact per frame; more: not clear.
MAX_NEAR_PAIRS = 20_000


class CappedStep(RuntimeError):
    """A blow-up seen by the step limit: in dynamics, the limit would cap a substep as a
    whole (vertices moving farther than ``MAX_STEP_FRACTION`` of the scene's size relative
    to each other) ``BLOW_UP_CAPS`` substeps in a row, or one moving them farther than
    ``BLOW_UP_FRACTION`` of it. Capping it would hide the instability (the cap slows the
    motion), so the integrator raises this instead; the simulator turns it into a
    ``SimulationError``. A single capped substep (a stiff barrier's kick at deep
    penetration) is taken capped.

    Attributes:
        step: the step it happened in, counted from the first of the ``advance`` call
            that raised it.
        world: the world it happened in (None without worlds).
        relative: the step's relative offset (m), see :func:`relative_offset`.
        absolute: its largest displacement (m), an upper bound.
        scene_size: the scene's bounding-box diagonal at rest (m).
    """

    def __init__(
        self, world: int | None, relative: float, absolute: float, scene_size: float
    ) -> None:
        super().__init__("a substep moved surface vertices too far for the step limit")
        self.step = 0
        self.world, self.relative, self.absolute = world, relative, absolute
        self.scene_size = scene_size


@dataclass(frozen=True)
class FusedSets:
    """What substeps fused in one launch need of the candidate sets
    (:meth:`SurfaceContact.fused_sets`); distances in m, local positions in the working dtype.

    Attributes:
        arrays: the Warp form of the candidate set (``warp_glue.PairArrays``).
        rows: ``[r]`` int32 rows of ``arrays`` that can be within dhat while both sets hold.
        anchor: ``[n, 3]`` local positions the candidate set was built at; it holds while
            the positions' offset from them (see :func:`relative_offset`) is at most ``reach``.
        anchor_d2: ``[m]`` float64 squared distances of the candidates at the anchor.
        near_anchor, near_reach: the same for the rows (``inf``: all of the set's pairs),
            selected again at x with reach ``near_steps * last_step`` where they expire.
        closest: the candidates' smallest distance at the anchor (less rounding room).
        max_step, max_translation: steps beyond these are capped (relative offset, largest
            displacement).
    """

    arrays: object
    rows: torch.Tensor
    anchor: torch.Tensor
    anchor_d2: torch.Tensor
    reach: float
    near_anchor: torch.Tensor
    near_reach: float
    near_steps: float
    last_step: float
    closest: float
    max_step: float
    max_translation: float


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True if b views the same memory as a (held, so not reused) with no write since."""
    return (
        a.data_ptr() == b.data_ptr()
        and a._version == b._version
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


class SurfaceContact:
    """IPC barrier contact between and within bodies, with friction and a CCD step limit.

    Per substep the simulator calls :meth:`forces`, :meth:`apply_friction` and :meth:`limit`;
    :meth:`energy` serves the equilibrium solver and diagnostics. All are differentiable in
    positions, velocities and masses, except that candidate sets and CCD step scales are
    held constant in the backward pass.

    Candidates are cached: a set found at anchor positions x_a with radius ``dhat + 2 R``
    holds every pair that can come within dhat while the vertices' displacements from x_a,
    less a common displacement c (the centre of their bounding box, see
    :func:`relative_offset`), are at most R long,
    and every pair that can meet along a straight motion whose ends both satisfy this
    (the bound is convex along the motion). So it is reused until the vertices move farther
    relative to each other (a body flying as a whole never needs a new set) or a step would
    take them farther; R is at least ``margin`` and four times the last step's offset. The
    cache changes only speed, never results.

    Args:
        mesh: the tet mesh (its boundary surface collides).
        dhat: barrier activation distance (m).
        stiffness: kappa (1/(m^2 s^2)); pair k's energy is ``kappa * w_k * m_k * b``.
        friction: Coulomb coefficient mu between surfaces (>= 0).
        friction_velocity: eps_v (m/s).
        implementation: ``"warp"`` (kernels) or ``"torch"`` (reference) for the barrier
            forces and CCD scales.
        broad_phase: ``"bvh"`` (Warp BVH) or ``"brute"`` (all pairs, small meshes).
        split_levels: time-of-impact splits: a substep the step limit would cut is taken
            in halves, down to ``1 / 2**split_levels`` of it, before the shortest step is
            truncated (:func:`diffsim.backends.integrator.substep`); 0: truncated whole.
        margin: candidate-cache margin (m), the least reach of a candidate set; default
            the larger of dhat and the scene rule ``DHAT_FRACTION * diagonal`` (a small
            dhat would otherwise rebuild often), the latter at most ``MARGIN_EDGE_FRACTION``
            of the mean surface edge (a larger reach lists many more pairs).
        device: torch device.
        dtype: the working dtype of contact forces and distances (default: that of the
            masses or velocities passed in, else of the positions). Positions (float64 in a
            simulation) are taken relative to the rest shape's centroid and rounded to it,
            so float32 contact resolves motion to the scene's size, not to the distance
            from the origin.
    """

    def __init__(
        self,
        mesh: TetMesh,
        *,
        dhat: float,
        stiffness: float,
        friction: float = 0.0,
        friction_velocity: float = 1e-3,
        implementation: str = "warp",
        broad_phase: str = "bvh",
        split_levels: int = 0,
        margin: float | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        for name, value in (("contact_dhat", dhat), ("contact_stiffness", stiffness)):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if not (friction >= 0 and math.isfinite(friction)):
            raise ValueError(f"contact_friction must be >= 0, got {friction!r}")
        if not friction_velocity > 0:
            raise ValueError(f"contact_friction_velocity must be > 0, got {friction_velocity!r}")
        if implementation not in ("warp", "torch"):
            raise ValueError(
                f"unknown contact implementation {implementation!r}; use 'warp' or 'torch'"
            )
        if broad_phase not in ("bvh", "brute"):
            raise ValueError(f"unknown broad phase {broad_phase!r}; use 'bvh' or 'brute'")
        self.surface = SurfacePrimitives.from_mesh(mesh, device)
        self.dtype = dtype
        centroid = mesh.vertices.mean(axis=0)
        self.origin = torch.as_tensor(centroid, dtype=torch.float64, device=device)
        self.scene_size = float(np.linalg.norm(np.ptp(mesh.vertices, axis=0)))
        self.dhat = float(dhat)
        self.stiffness = float(stiffness)
        self.friction = float(friction)
        self.friction_velocity = float(friction_velocity)
        self.implementation = implementation
        self.broad_phase = broad_phase
        if not isinstance(split_levels, int) or not 0 <= split_levels <= 16:
            raise ValueError(f"split_levels must be an integer in [0, 16], got {split_levels!r}")
        self.split_levels = split_levels
        if margin is None:
            scene_rule = DHAT_FRACTION * self.scene_size
            margin = max(
                dhat, min(scene_rule, MARGIN_EDGE_FRACTION * self.surface.mean_edge_length)
            )
        self.margin = float(margin)
        self._roomy_reach = MARGIN_EDGE_FRACTION * self.surface.mean_edge_length
        self.timings: dict[str, float] = defaultdict(float)
        self._anchor: torch.Tensor | None = None
        self._reach = 0.0
        self._last_step = 0.0
        self._candidates: Candidates | None = None
        self._broad: dict = {}  # the broad phase's state per dtype (see near_candidates)
        # Runs the broad phase's query parts on several CPU threads (set by the Warp backend).
        self.launcher = None
        self._active: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (x, pair ids)
        # (positions selected at, reach, subset, last x it was asked at): see _near_set.
        self._near: tuple[torch.Tensor, float, Candidates, torch.Tensor] | None = None
        self._local = None  # (key, local positions) of the last local() call
        self._moved = None  # (local x, its offset from the anchor)
        self._closest = math.inf
        self._anchor_d2 = torch.zeros(0, dtype=torch.float64, device=self.origin.device)
        # (anchor, radius, candidates, their squared distances there as measured) of the
        # last set a broad phase built, for the sets filtered from it (see _rebuild).
        self._source: tuple | None = None
        self.last_cap = (1.0, 0.0, 0.0)  # step_scales' (scale, relative, absolute)
        self.caps_in_a_row = 0  # dynamics substeps capped as a whole, consecutively

    # ----------------------------------------------------------------- defaults
    @classmethod
    def for_simulation(
        cls,
        mesh: TetMesh,
        h: float,
        dhat: float | None,
        stiffness: float | None,
        friction: float,
        friction_velocity: float,
        backend: str,
        device: str | torch.device,
        dtype: torch.dtype = torch.float64,
        split_levels: int = 0,
    ) -> SurfaceContact:
        """The Simulator's contact: defaults from the scene, checked for a separated start.

        Raises ValueError where surfaces intersect or touch at rest; warns
        (:class:`ContactWarning`) where an explicit dhat puts pairs inside the barrier at
        rest, naming them.

        Args:
            mesh: the mesh at rest (its rest shape must be intersection-free).
            h: substep length (s), for the default stiffness.
            dhat, stiffness: None for the defaults (:meth:`default_dhat`,
                :meth:`default_stiffness`).
            friction, friction_velocity: mu and eps_v (m/s).
            backend: the simulator's backend; ``"torch"`` selects the torch reference.
            device: torch device.
            dtype: the simulator's working dtype.
            split_levels: time-of-impact splits (see the class), 0 for none.
        """
        implementation = "torch" if backend == "torch" else "warp"
        broad_phase = "bvh"
        try:
            import warp  # noqa: F401
        except ImportError:  # pragma: no cover - Warp is a dependency; degrade gracefully
            implementation, broad_phase = "torch", "brute"
        if dhat is not None and not (dhat > 0 and math.isfinite(dhat)):
            raise ValueError(f"contact_dhat must be a positive finite number, got {dhat!r}")
        surface = SurfacePrimitives.from_mesh(mesh, device)  # (0.5 s on the Armadillo)
        if broad_phase == "bvh":
            from diffsim.contact.intersections import check_intersection_free

            check_intersection_free(mesh, surface)
        explicit = None if dhat is None else float(dhat)
        gaps = RestGaps.of(mesh, explicit, device, broad_phase, surface)
        gaps.check_separated(gaps.scene_dhat if dhat is None else float(dhat))
        default = dhat is None
        if default:
            dhat = gaps.dhat
        else:
            dhat = float(dhat)
            gaps.warn_inside(dhat)
        stiffness = cls.default_stiffness(dhat, h) if stiffness is None else float(stiffness)
        contact = cls(
            mesh,
            dhat=dhat,
            stiffness=stiffness,
            friction=friction,
            friction_velocity=friction_velocity,
            implementation=implementation,
            broad_phase=broad_phase,
            split_levels=split_levels,
            device=device,
            dtype=dtype,
        )
        if default:
            gaps.warn_close_bodies(mesh.body_ids, contact.stopping_speed(h))
        return contact

    def check_separated(self, x: torch.Tensor) -> None:
        """Raises ValueError if two non-adjacent surface primitives touch or nearly touch."""
        x = self.local(x.to(torch.float64))
        c = self._candidates_at(x)
        d_pt, d_ee = potential.pair_distances(x.detach().to(torch.float64), c)
        gaps = RestGaps(
            torch.cat([d_pt, d_ee]).clamp_min(0).sqrt(),
            torch.cat([c.point_triangle, c.edge_edge]),
            len(d_pt),
            self.scene_size * DHAT_FRACTION,
        )
        gaps.check_separated(self.dhat)

    @staticmethod
    def default_dhat(mesh: TetMesh, device: str | torch.device = "cpu") -> float:
        """The default dhat (m): 0.5% of the bounding-box diagonal, but never more than
        ``REST_GAP_FRACTION`` of the smallest rest distance between colliding surface
        elements (one broad phase at rest; see :class:`RestGaps`)."""
        return RestGaps.of(mesh, None, device).dhat

    @staticmethod
    def default_stiffness(dhat: float, h: float) -> float:
        """kappa = rho^2 / (2 h^2 dhat^2), rho = 1/8: one pair's explicit steps are stable
        down to dhat/8.

        Near contact the barrier acceleration is about ``2 kappa dhat^4 / d``, whose
        stiffness ``2 kappa dhat^4 / d^2`` equals ``1 / h^2`` at d = rho dhat. The barrier then
        stops approach speeds up to about ``0.2 dhat / h`` before the gap falls below dhat/8.
        """
        return STABLE_GAP_FRACTION**2 / (2.0 * h**2 * dhat**2)

    @staticmethod
    def substep_for_speed(dhat: float, speed: float) -> float:
        """The longest substep (s) at which the default stiffness stops a pair closing at
        ``speed`` (m/s) elastically: ``STOPPING_FRACTION dhat / (SPEED_MARGIN speed)``.

        The barrier stops approaches up to about ``STOPPING_FRACTION dhat / h`` within its
        stable range (:meth:`default_stiffness`); faster ones are cut by the step limit and
        lose energy. Two balls meeting at 5 m/s (tests/test_contact_physics.py) keep 0.984,
        1.000, 1.001 and 0.999 of their energy (float64) with that speed limit 1, 1.5, 2 and
        3 times the approach speed. Surfaces sliding at ``speed`` then move a tenth of dhat
        a substep, well within the gap they rest at (0.3-0.9 dhat), which the step limit
        leaves whole: a block sliding on a slab at 1 m/s decelerates at mu g to 0.3%
        (tests/test_physics_textbook.py).
        """
        return STOPPING_FRACTION * dhat / (SPEED_MARGIN * speed)

    def stopping_speed(self, h: float) -> float:
        """About the fastest approach (m/s) the default barrier stops within its stable
        range at substeps of h (s): ``STOPPING_FRACTION dhat / h``."""
        return STOPPING_FRACTION * self.dhat / h

    def stable_substep(self) -> float:
        """The longest explicit substep (s) this barrier's stiffness bears down to gaps of
        dhat/8: ``STABLE_GAP_FRACTION / (dhat sqrt(2 kappa))``, the inverse of
        :meth:`default_stiffness` (so the default stiffness never sets a tighter limit)."""
        return STABLE_GAP_FRACTION / (self.dhat * math.sqrt(2.0 * self.stiffness))

    def local(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Positions ``[n, 3]`` relative to the rest centroid, in the working dtype (the
        contact terms depend only on differences, so gradients pass unchanged).

        The last result is reused for the same tensor (unchanged since, same grad mode), so
        the forces and the step limit of one substep convert the positions once.
        """
        dtype = dtype or self.dtype or x.dtype
        key = (x, x._version, dtype, torch.is_grad_enabled())
        cached = self._local
        if cached is not None and cached[0][0] is x and cached[0][1:] == key[1:]:
            return cached[1]
        out = (x - self.origin.to(x.dtype)).to(dtype)
        self._local = (key, out)
        return out

    # ----------------------------------------------------------------- candidates
    def candidates(self, x: torch.Tensor, x_new: torch.Tensor | None = None) -> Candidates:
        """Candidate pairs valid at positions x (and along the straight motion to x_new)."""
        return self._candidates_at(self.local(x), None if x_new is None else self.local(x_new))

    def _candidates_at(
        self, x: torch.Tensor, x_new: torch.Tensor | None = None, step: float | None = None
    ) -> Candidates:
        """:meth:`candidates` for positions already in :meth:`local` coordinates (``step``:
        the step's :func:`relative_offset` where the caller has it)."""
        with torch.no_grad():
            x = x.detach()
            fresh = self._anchor is None or self._anchor.shape != x.shape
            if x_new is None:
                step = 0.0
            elif step is None:
                step = relative_offset(x_new.detach() - x)
            # The offset of x_new is at most that of x plus the step's (boxes add).
            moved = 0.0 if fresh else self._moved_from_anchor(x) + step
            wanted = self._wanted_reach()
            stale = (
                fresh
                or moved > self._reach
                or (x_new is None and self._reach > 2.0 * wanted)  # shrink an oversized set
            )
            if stale:
                self._rebuild(x, max(wanted, 1.01 * step))
        return self._candidates

    def _wanted_reach(self) -> float:
        """The reach (m) a new candidate set is built with: room for ``REBUILD_STEPS`` more
        steps of the last accepted step's size before a rebuild, for up to
        ``ROOMY_REBUILD_STEPS`` while that stays within the edge cap, the margin at least."""
        step = self._last_step
        roomy = min(ROOMY_REBUILD_STEPS * step, self._roomy_reach)
        return max(self.margin, REBUILD_STEPS * step, roomy)

    def _moved_from_anchor(self, x: torch.Tensor) -> float:
        """:func:`farthest_offset` of local x from the anchor (m), reused while x is the same
        unchanged tensor (the forces and the step limit of one substep)."""
        cached = self._moved
        if cached is not None and _same_tensor(cached[0], x):
            return cached[1]
        moved = farthest_offset(x - self._anchor)
        self._moved = (x, moved)
        return moved

    def _rebuild(self, x: torch.Tensor, reach: float) -> None:
        """A new candidate set anchored at local x, valid for offsets up to ``reach`` (m).

        A set no larger than the last one a broad phase built, at the very positions it was
        built at (a contact substep shrinking the set a prediction just built there, the
        step limit growing it again at the same positions), is that set filtered by
        distance, without a broad phase: the same pairs in the same order (a tree query
        finds the pairs of a smaller box in the order it finds them for a larger one).
        """
        start = time.perf_counter()
        x = x.detach()
        radius = self.dhat + 2.0 * reach
        # The pairs really closer than the radius (boxes of neighbouring elements overlap
        # however far apart the elements are): the others cannot come within dhat, nor
        # meet, while the offsets stay within reach. The slack covers rounding.
        slack = 1e-6 * float(x.abs().max()) if len(x) else 0.0
        source = self._source
        if source is not None and radius <= source[1] and _same_values(source[0], x):
            c, d2 = _filtered(source[2], source[3], radius + slack)
            self._anchor = source[0]
            self.timings["filtered_rebuilds"] += 1
        else:
            c, d2 = near_candidates(
                self.surface,
                x,
                radius,
                radius + slack,
                self.broad_phase,
                self._broad,
                self.launcher,
            )
            self._anchor = x.clone()
            self._source = (self._anchor, radius, c, d2)
            self.timings["searches"] += 1
        self._reach = reach
        self._moved = None
        self._closest = math.inf  # the candidates' smallest distance at the anchor (m)
        # The candidates' squared distances at the anchor.
        self._anchor_d2 = d2.to(torch.float64)
        if len(d2):
            self._closest = float(d2.min().clamp_min(0).sqrt()) - slack
        self._candidates = c
        self._near = None
        self.timings["broad_phase"] += time.perf_counter() - start
        self.timings["rebuilds"] += 1

    def _closing(self, x: torch.Tensor, dx: torch.Tensor, needed: float) -> bool:
        """Whether some pair may come within ``needed`` (m) along the straight motion from
        local x by ``t dx``, t in [0, 1]: the boxes its two elements sweep come within
        ``needed`` on every axis, its distance at x less the most the motion can close it
        (:func:`.ccd.pair_reach`) is at most ``needed``. The Warp path queries trees of the
        swept boxes; the brute one takes every pair within ``needed`` plus twice the
        motion's offset at x (no farther pair can close that much). The candidate set is
        not changed. Its seconds count as a broad phase's."""
        start = time.perf_counter()
        if self.broad_phase == "bvh":
            from diffsim.contact.warp_broad_phase import BroadPhase

            broad = self._broad.get(x.dtype)
            if broad is None:
                broad = self._broad[x.dtype] = BroadPhase(self.surface, x.dtype)
            closing = broad.closing(x, dx, needed, self.launcher)
        else:
            pad = needed + 1e-6 * (float(x.abs().max()) + float(dx.abs().max()))
            within = pad + 2.0 * relative_offset(dx)
            c, d2 = near_candidates(self.surface, x, within, within, "brute")
            rows = torch.cat([c.point_triangle, c.edge_edge])
            side_a = ccd._sides(c, x.device)
            reach = ccd.pair_reach(dx[rows], side_a)  # the most dx can close each pair
            ends = torch.cat([x[rows], (x + dx)[rows]], dim=1).float()  # [k, 8, 3]
            a = torch.cat([side_a, side_a], dim=1)[..., None]
            big = torch.finfo(torch.float32).max
            gap = torch.maximum(
                ends.masked_fill(~a, big).amin(1) - ends.masked_fill(a, -big).amax(1),
                ends.masked_fill(a, big).amin(1) - ends.masked_fill(~a, -big).amax(1),
            )  # [k, 3]: the swept boxes' separation per axis
            closing = bool(((gap <= pad).all(dim=1) & _may_close(d2, reach, needed)).any())
        self.timings["broad_phase"] += time.perf_counter() - start
        self.timings["searches"] += 1
        return closing

    def _stage(self, name: str, start: float, broad_phase: float) -> None:
        """Adds the seconds since ``start`` to ``timings[name]``, less any broad phase run
        meanwhile (``broad_phase``: its total at start)."""
        spent = time.perf_counter() - start
        self.timings[name] += spent - (self.timings["broad_phase"] - broad_phase)

    def _all_farther_than(self, x: torch.Tensor, distance: float) -> bool:
        """True if every candidate pair is farther apart than ``distance`` (m) at local x:
        the closest pair at the anchor, less twice the offset since (see
        :func:`relative_offset`)."""
        return self._closest - 2.0 * self._moved_from_anchor(x.detach()) > distance

    def _rows_within(self, x: torch.Tensor, distance: float) -> torch.Tensor:
        """The rows (int64, ascending) of the candidates that can be closer than
        ``distance`` (m) at local x: those closer than that plus twice x's offset at the
        anchor (with room for the anchor distances' rounding in the working dtype)."""
        reach = distance + 2.0 * self._moved_from_anchor(x.detach())
        limit = reach * (1.0 + 1e-5) + 1e-12
        return torch.nonzero(self._anchor_d2 < limit**2).flatten()

    def _near_set(self, x: torch.Tensor) -> Candidates:
        """The subset of the candidates that can be within dhat at local x: those closer
        than dhat + 2 R at the positions where it was selected, kept while x's offset from
        them stays within R (``NEAR_STEPS`` steps of the last step's size when selected);
        all of them in a set of fewer than ``NEAR_MIN_PAIRS``."""
        if self._candidates.n_pairs < NEAR_MIN_PAIRS:
            return self._candidates
        x = x.detach()
        near = self._near
        if near is not None and near[0].shape == x.shape:
            if _same_tensor(near[3], x) or relative_offset(x - near[0]) <= near[1]:
                self._near = (*near[:3], x)  # x held: the next call at it checks nothing
                return near[2]
        reach = NEAR_STEPS * self._last_step
        within = self.dhat + 2.0 * reach
        rows = self._rows_within(x, within)  # the others are farther by the anchor's bound
        # Measured in the working dtype: room for its rounding.
        keep = self._warp_arrays(x).within(x, within * (1.0 + 1e-5) + 1e-12, rows)
        self._near = (x.clone(), reach, self._candidates.subset(keep), x)
        return self._near[2]

    def _warp_arrays(self, x: torch.Tensor):
        """The Warp arrays of the current candidate set (one per set and dtype, shared by
        the barrier, friction and the step limit, with their recorded launches)."""
        from diffsim.contact.warp_glue import pair_arrays

        return pair_arrays(self._candidates, x.dtype)

    # ----------------------------------------------------------------- physics
    def energy(self, x: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
        """Barrier energy (J), a scalar, twice differentiable (torch formulas on both paths)."""
        x = self.local(x, mass.dtype)
        c = self._candidates_at(x)
        if self._all_farther_than(x, self.dhat):
            # Nothing within dhat: the energy is zero near x, and so are its derivatives.
            return torch.zeros((), dtype=x.dtype, device=x.device)
        return potential.barrier_energy(x, mass, c, self.dhat, self.stiffness)

    def forces(self, x: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
        """Barrier forces ``[n, 3]`` in N (working dtype), differentiable in x and mass."""
        start, broad = time.perf_counter(), self.timings["broad_phase"]
        x = self.local(x, mass.dtype)
        self._candidates_at(x)  # the set the branches below use
        if self._all_farther_than(x, self.dhat):
            # Nothing within dhat: the barrier is zero near x (forces and their derivatives).
            f = torch.zeros_like(x)
            active = torch.zeros(0, dtype=torch.int64, device=x.device)
        elif self.implementation == "torch":
            # Only the pairs within dhat: the others add exact zeros, and their graph made
            # the equilibrium solver's Hessian products 9x slower (docs beam: 18 s -> 2 s).
            near = self._active_pairs(x)
            f = potential.barrier_forces(x, mass, near, self.dhat, self.stiffness)
            active = near.derived["index"]
        else:
            # Friction on this path takes the same near candidates and skips the inactive
            # ones itself (the kernels' active list at x), so no list is kept here.
            from diffsim.contact.warp_glue import pair_selection

            arrays, index = pair_selection(self._near_set(x), x.dtype)
            f = _WarpBarrierForces.apply(x, mass, self, arrays, index)
            active = None
        self._active = (x.detach(), active)
        self._stage("barrier", start, broad)
        return f

    def apply_friction(
        self, v: torch.Tensor, x: torch.Tensor, mass: torch.Tensor, h: float
    ) -> torch.Tensor:
        """Velocities ``[n, 3]`` after surface friction over a substep of h seconds."""
        if self.friction <= 0.0:
            return v
        start, broad = time.perf_counter(), self.timings["broad_phase"]
        x = self.local(x, v.dtype)
        # The Warp kernels select the pairs within dhat themselves among the near ones
        # (reusing the barrier's active list at the same x); the torch reference takes them
        # selected.
        self._candidates_at(x)
        c = self._near_set(x) if self.implementation == "warp" else self._active_pairs(x)
        v = friction.apply_friction(
            v,
            x,
            mass,
            h,
            c,
            self.dhat,
            self.stiffness,
            self.friction,
            self.friction_velocity,
            implementation=self.implementation,
        )
        self._stage("friction", start, broad)
        return v

    def active_pairs(self, x: torch.Tensor) -> Candidates:
        """The candidate pairs within dhat at positions ``x [n, 3]`` (m): the only pairs
        whose barrier (and its derivatives) is not zero there."""
        x = self.local(x.detach())
        with torch.no_grad():
            c = self._candidates_at(x)
            if self._all_farther_than(x, self.dhat):
                return c.subset(torch.zeros(0, dtype=torch.int64, device=x.device))
            return self._active_pairs(x)

    def _active_pairs(self, x: torch.Tensor) -> Candidates:
        """The candidates within dhat at local x (friction acts only there; constant indices)."""
        c = self._candidates_at(x)
        cached = self._active
        if cached is not None and cached[1] is not None and cached[0].shape == x.shape:
            if torch.equal(cached[0], x.detach()):
                return c.subset(cached[1])
        with torch.no_grad():
            d_pt, d_ee = potential.pair_distances(x.detach(), c)
            active = torch.nonzero(torch.cat([d_pt, d_ee]) < self.dhat**2).flatten()
        return c.subset(active)

    def fused_sets(self, x: torch.Tensor, step: float = 0.0) -> FusedSets:
        """The candidate sets at positions ``x [n, 3]`` (m) for substeps fused in one
        launch (:mod:`diffsim.kernels.contact_advance`), selected as the next substep's
        barrier forces would select them, with the bounds within which they hold; with
        ``step`` (m), the offset of a step from x that left the candidate set's reach,
        selected as its step limit would (a set that also holds for that step)."""
        from diffsim.contact.warp_glue import pair_selection

        start, broad = time.perf_counter(), self.timings["broad_phase"]
        with torch.no_grad():
            x = self.local(x.detach())
            if step > 0.0:
                self._candidates_at(x, x, step)
            else:
                self._candidates_at(x)
            near = self._near_set(x)
            arrays, index = pair_selection(near, x.dtype)
            if index is None:
                rows = torch.arange(arrays.n, dtype=torch.int32, device=x.device)
            else:
                rows = index.to(torch.int32)
            near_anchor, near_reach = self._anchor, math.inf
            if self._near is not None and near is self._near[2]:
                near_anchor, near_reach = self._near[0], self._near[1]
            self._stage("select", start, broad)
            return FusedSets(
                arrays=arrays,
                rows=rows.contiguous(),
                anchor=self._anchor,
                anchor_d2=self._anchor_d2,
                reach=self._reach,
                near_anchor=near_anchor,
                near_reach=near_reach,
                near_steps=float(NEAR_STEPS),
                last_step=self._last_step,
                closest=self._closest,
                max_step=MAX_STEP_FRACTION * self.scene_size,
                max_translation=MAX_TRANSLATION_FRACTION * self.scene_size,
            )

    def after_fused(
        self,
        substeps: int,
        relative: float,
        absolute: float,
        near: tuple | None,
        limited: int,
        splits: int = 0,
    ) -> None:
        """Records ``substeps`` taken by a fused launch (the last one's offset ``relative``
        and largest displacement ``absolute``, m) as the per-substep path would have;
        ``near``: the near rows the launch selected last, ``(local positions [n, 3] it
        selected them at, reach (m), rows [k] int64 ascending)``, by the rule of
        :meth:`_near_set`, which keeps them while they hold; ``limited``: the
        vertex-steps its step limit truncated; ``splits``: the steps it tried again at
        half their length (time of impact)."""
        self.timings["limited_vertex_steps"] += limited
        self.timings["truncated_vertex_steps"] += limited
        self.timings["split_substeps"] += splits
        if near is not None:
            anchor, reach, rows = near
            self._near = (anchor, reach, self._candidates.subset(rows), anchor)
        self._last_step = relative
        self.last_cap = (1.0, relative, absolute)
        self.caps_in_a_row = 0
        self._active = self._moved = self._local = None
        self.timings["fused_substeps"] += substeps

    def limit(self, x: torch.Tensor, x_new: torch.Tensor) -> torch.Tensor:
        """Positions after the conservative CCD limit (see :mod:`diffsim.contact.ccd`):
        ``x + alpha (x_new - x)`` with the scales of :meth:`step_scales` held constant."""
        alpha = self.step_scales(x, x_new)
        return ccd.limit_step(x, x_new, alpha.to(x.dtype))

    def step_scales(self, x: torch.Tensor, x_new: torch.Tensor) -> torch.Tensor:
        """Per-vertex step scales ``[n]`` in (0, 1] (detached) for the step x -> x_new.

        A step that moves some vertex farther than ``MAX_STEP_FRACTION`` of the mesh diagonal
        relative to the others, or ``MAX_TRANSLATION_FRACTION`` of it at all (a blow-up in
        dynamics, or a Newton step of the equilibrium solver), is first scaled down as a
        whole; then each vertex takes the CCD scale of its pairs (:mod:`.ccd`). Where the
        limited motion leaves the candidate set's reach (vertices held back while others
        move on), the set is rebuilt at x for it and the scales computed again.
        """
        start, broad = time.perf_counter(), self.timings["broad_phase"]
        x, x_new = self.local(x).detach(), self.local(x_new).detach()
        with torch.no_grad():
            dx = x_new - x
            scale, relative = 1.0, 0.0
            if len(x):
                lo, hi = torch.aminmax(dx, dim=0)
                relative = 0.5 * float((hi - lo).norm())  # relative_offset(dx)
                absolute = float(torch.maximum(lo.abs(), hi.abs()).norm())  # >= max |dx_i|
                scale = min(
                    1.0,
                    MAX_STEP_FRACTION * self.scene_size / max(relative, 1e-300),
                    MAX_TRANSLATION_FRACTION * self.scene_size / max(absolute, 1e-300),
                )
            # (scale, relative, absolute) of this call, for CappedStep.
            self.last_cap = (scale, relative, absolute if len(x) else 0.0)
            if scale < 1.0:
                dx, relative = scale * dx, scale * relative
                self.timings["capped_steps"] += 1
            self._candidates_at(x, x + dx, relative)
            alpha = self._scales(x, dx, relative)
            limited = 0 if alpha is None else int((alpha < 1).sum())
            if limited:
                # The limited motion must stay within the candidates' reach as well.
                if farthest_offset(x + alpha[:, None] * dx - self._anchor) > self._reach:
                    self._rebuild(x, max(self._reach, 1.01 * relative_offset(alpha[:, None] * dx)))
                    alpha = self._scales(x, dx, relative)
                    if alpha is not None and relative_offset(alpha[:, None] * dx) > self._reach:
                        # Covers any scales in [0, 1] (see relative_offset).
                        self._rebuild(x, 1.01 * relative_offset(dx, with_zero=True))
                        alpha = self._scales(x, dx, relative)
                    limited = 0 if alpha is None else int((alpha < 1).sum())
                if limited:
                    relative = relative_offset(alpha[:, None] * dx)
            self.timings["limited_vertex_steps"] += limited
            self._last_step = relative
            if alpha is None:
                alpha = torch.ones(len(x), dtype=x.dtype, device=x.device)
            if scale < 1.0:
                alpha = alpha * scale
        # The active pairs found by forces() may index a set rebuilt since (here, or by a
        # shrink at the next call): friction for a step tried again from the same x (a
        # time-of-impact split) finds them anew. (Otherwise forces() comes next anyway.)
        self._active = None
        self._stage("ccd", start, broad)
        return alpha

    def scales_with_gradient(
        self, x: torch.Tensor, x_new: torch.Tensor, alpha: torch.Tensor
    ) -> torch.Tensor:
        """The scales of the last :meth:`step_scales` call (for x -> x_new), the same
        values, differentiable in x and x_new where a vertex is limited by a pair's bound
        (:func:`.ccd.scales_with_gradient`); unchanged without a gradient to take."""
        if not torch.is_grad_enabled() or not (x.requires_grad or x_new.requires_grad):
            return alpha
        return ccd.scales_with_gradient(self.local(x), self.local(x_new), self._candidates, alpha)

    def _scales(self, x: torch.Tensor, dx: torch.Tensor, step: float) -> torch.Tensor | None:
        """The CCD scales ``[n]`` for the current candidates (local x, displacements dx whose
        :func:`relative_offset` is ``step``), or None where no vertex is limited for sure."""
        # Every pair's relative reach is at most 4 step (|dx_i - pair mean| <= 2 step);
        # where that is within every pair's aim, pass 1 limits nothing: skip it.
        keep = (1 - ccd.MIN_GAP_FRACTION) * (1 - ccd.SCALE_SLACK)
        if self._all_farther_than(x, 4.0 * step / keep):
            return None
        if self.implementation == "torch":
            return ccd.step_scales(x, x + dx, self._candidates)
        from diffsim.contact.warp_glue import step_scales

        # Only the pairs that some scales in [0, 1] of dx could bring within reach.
        rows = None
        if self._candidates.n_pairs >= NEAR_MIN_PAIRS:
            rows = self._rows_within(x, 4.0 * relative_offset(dx, with_zero=True) / keep)
        return step_scales(self._warp_arrays(x), x, dx, rows)

    def clear_over(
        self, frames: torch.Tensor, record: bool = True, most_measured: int | None = None
    ) -> bool:
        """Whether contact would have changed nothing over substeps computed without it.

        True if at every frame no pair of non-adjacent surface primitives is within dhat (so
        no barrier force and no friction acted), no step between frames could have been cut
        by the continuous collision limit (:meth:`step_scales` would have returned all ones)
        and no step was large enough to be capped: the substeps with contact would have
        moved the vertices the same way. A fused contact-free run is then exact.

        The bound: pair k is at least ``D_k - 2 offset(x - anchor)`` apart (see
        :func:`relative_offset`), D_k its distance at the anchor (pairs not listed are farther than
        the broad phase's radius). Pairs for which that does not settle it are measured at
        every frame, and their steps bounded as :mod:`.ccd` does. Where the frames go beyond
        the candidate set's reach, the elements are first swept along the straight paths
        from the first frame to the last (:meth:`_closing`, with twice the vertices' largest
        distance from those paths added to the distance asked for): bodies moving as a whole
        need no set that reaches along their motion.

        Args:
            frames: positions ``[S + 1, n, 3]`` (m) at the start of each of S substeps and
                after the last.
            record: a real run of substeps: take their size as the last step's (it sizes
                the next broad phase). False for a prediction (a guessed straight motion
                over a block): only the distances to dhat are asked, and no broad phase
                runs where pairs are near already.
            most_measured: where the candidates' distances at the anchor do not settle it,
                the near pairs are measured at every frame: at most this many pair-frames
                (None: no limit), else the answer is False (where substeps with contact
                cost little more than without, measuring thousands of pairs over a long
                block costs more than taking it with contact).

        Its seconds, less any broad phase run within, accumulate in ``timings["checks"]``.
        """
        if len(frames) < 2:
            return True
        start, broad = time.perf_counter(), self.timings["broad_phase"]
        try:
            with torch.no_grad():
                return self._clear_over(frames, record, most_measured)
        finally:
            self._stage("checks", start, broad)

    def _clear_over(
        self, frames: torch.Tensor, record: bool, most_measured: int | None = None
    ) -> bool:
        """:meth:`clear_over` (no autograd, at least two frames)."""
        # Local positions are frames - origin, in float64: the first frame and the near
        # pairs' vertices converted where they are used (the bounds' kernel reads any dtype).
        frames = frames.detach()
        first = frames[0].to(torch.float64)
        if self._anchor is None or self._anchor.shape != first.shape:
            self._candidates_at(self.local(first))
        # Otherwise the set is kept as it is (no shrink: the next contact substep does
        # that where needed); it is rebuilt below only where it does not reach.
        lo, hi, lo_step, hi_step, lo_anchor, hi_anchor, off_chord = self._frame_bounds(frames)
        block_moved = 0.5 * float((hi - lo).norm(dim=1).max())
        step = 0.5 * float((hi_step - lo_step).norm(dim=1).max())
        absolute = float(torch.maximum(lo_step.abs(), hi_step.abs()).norm(dim=1).max())
        if step > MAX_STEP_FRACTION * self.scene_size:
            return False
        if absolute > MAX_TRANSLATION_FRACTION * self.scene_size:
            return False
        keep = (1 - ccd.MIN_GAP_FRACTION) * (1 - ccd.SCALE_SLACK)
        # A prediction (record=False, a straight guess of a whole block's motion) asks
        # only for the pairs to stay beyond dhat: its "step" is no substep.
        needed = clear_distance(step if record else 0.0, self.dhat, self.scene_size)
        lo, hi = lo_anchor, hi_anchor
        moved = 0.5 * float((hi - lo).norm(dim=1).max())
        if self._listed_radius() - 2.0 * moved <= needed:
            now = 0.5 * float((hi[0] - lo[0]).norm())
            # Beyond the set: the elements swept along the straight paths from the first
            # frame to the last, each vertex at most ``off`` from its path, so each pair at
            # most 2 off closer than along the paths. A body moving as a whole needs no set
            # that reaches along its motion (for the colliding spheres' guess of five steps
            # such a set listed 20,000 pairs, 7.5 ms; the sweep takes about 1 ms).
            x = self.local(first)
            dx = (frames[-1].to(torch.float64) - first).to(x.dtype)
            if not record and self._listed_closing(x, dx, now, needed):
                return False  # a guess that a listed pair fails: no sweep
            # A guess takes the bound as the block's check does: measured along the guessed
            # motion instead, the pairs of spinning bodies passed guesses whose blocks then
            # failed their checks (the knocked-over stack: 23 failed tries in 600 steps).
            if not self._closing(x, dx, needed + 2.0 * float(off_chord.max())):
                self._last_step = step if record else self._last_step
                return True
            if not record:
                return False
            # A new set at the first frame that reaches, with room for twice that motion,
            # so that growing blocks rebuild rarely; its pairs are measured at every frame.
            self._rebuild(x, max(self._wanted_reach(), 2.0 * block_moved))
            lo, hi = self._frame_bounds(frames)[4:6]
            moved = 0.5 * float((hi - lo).norm(dim=1).max())
        if self._closest_listed() - 2.0 * moved > needed:
            self._last_step = step if record else self._last_step
            return True
        # The pairs near enough to matter, by their distances at the first frame (the
        # block's own motion is small next to the anchor's): measured at every frame.
        now = 0.5 * float((hi[0] - lo[0]).norm())  # the first frame's offset from the anchor
        near = self._near_pairs(needed + 2.0 * block_moved, first - self.origin, now)
        if near is None:
            return False
        near, d2_first = near
        if most_measured is not None and near.n_pairs * len(frames) > most_measured:
            return False
        if not near.n_pairs:
            self._last_step = step if record else self._last_step
            return True
        inside = 1.01 * self.dhat + 1e-6 * self.scene_size
        # Inside at the first frame already (in contact): the other frames change nothing
        # (the frames' distances below take the same square roots of the same values).
        if float(d2_first.min().clamp_min(0).sqrt()) <= inside:
            return False
        # Their vertices' local positions in every frame, the pairs renumbered to them.
        rows = torch.cat([near.point_triangle, near.edge_edge])
        vertices, rows = torch.unique(rows, return_inverse=True)
        local = frames[:, vertices].to(torch.float64) - self.origin  # [S + 1, m, 3]
        k1 = len(near.point_triangle)
        renumbered = Candidates(rows[:k1], rows[k1:], near.mollifier_eps)
        distances = _frame_distances(local, renumbered, self.broad_phase == "bvh")  # [S + 1, k]
        if float(distances.min()) <= inside:
            return False
        # Each step's L_k, the most it can close the pair (see .ccd), [S, k].
        steps = local[1:] - local[:-1]
        sides = ccd._sides(near, rows.device).repeat(len(steps), 1)
        reach = ccd.pair_reach(steps[:, rows].reshape(-1, 4, 3), sides).view(len(steps), -1)
        if record and bool((reach > 0.99 * keep * distances[:-1]).any()):
            return False
        self._last_step = step if record else self._last_step
        return True

    def _listed_closing(self, x: torch.Tensor, dx: torch.Tensor, now: float, needed: float) -> bool:
        """Whether a listed pair may come within ``needed`` (m) along the straight motion
        from local x by ``t dx``, t in [0, 1] (x, dx in the working dtype), by the bound of
        :meth:`_closing` (``now``: x's offset from the anchor, m): among the pairs the
        anchor's bound lets that close, one Warp pass (torch formulas on the brute path)."""
        # No pair closes more than twice the motion's offset; pair k is at least D_k - 2 now
        # apart at x (with room for the anchor distances' rounding).
        limit = (needed + 2.0 * relative_offset(dx) + 2.0 * now) * (1.0 + 1e-5) + 1e-12
        rows = torch.nonzero(self._anchor_d2 < limit**2).flatten()
        if not len(rows):
            return False
        c = self._candidates.subset(rows)
        pairs = torch.cat([c.point_triangle, c.edge_edge])
        if self.broad_phase == "bvh":
            from diffsim.contact.warp_broad_phase import any_closing

            return any_closing(x, dx, pairs, len(c.point_triangle), needed)
        d2 = torch.cat(potential.pair_distances(x, c))
        reach = ccd.pair_reach(dx[pairs], ccd._sides(c, x.device))
        return bool(_may_close(d2, reach, needed).any())

    def _frame_bounds(self, frames: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """For the local positions ``frames - origin`` (``frames [F, n, 3]``, read as
        float64): the componentwise bounds ``(lo, hi)`` over the vertices, per frame, of the
        positions less the first frame's ``[F, 3]``, of the steps between frames
        ``[F - 1, 3]`` and of the positions less the anchor's ``[F, 3]``, and per frame the
        largest distance ``[F]`` of a vertex from its straight path from the first frame to
        the last: one Warp kernel pass where Warp is there (and every position finite),
        else torch ops on the frames."""
        anchor = self._anchor.to(torch.float64)
        if self.broad_phase == "bvh" and frames.shape[1]:
            from diffsim.contact.warp_broad_phase import frame_offset_bounds

            bounds = frame_offset_bounds(frames, self.origin, anchor, self.launcher)
            if bounds is not None:
                return bounds
        local = frames.to(torch.float64) - self.origin
        lo, hi = torch.aminmax(local - local[0], dim=1)
        lo_step, hi_step = torch.aminmax(local[1:] - local[:-1], dim=1)
        lo_anchor, hi_anchor = torch.aminmax(local - anchor, dim=1)
        along = torch.linspace(0.0, 1.0, len(local), dtype=torch.float64, device=local.device)
        off = local - local[0] - along[:, None, None] * (local[-1] - local[0])
        off_chord = off.norm(dim=2).amax(dim=1)
        return lo, hi, lo_step, hi_step, lo_anchor, hi_anchor, off_chord

    def _listed_radius(self) -> float:
        """The broad phase's radius (m), less rounding: pairs farther apart at the anchor
        are not listed."""
        return (self.dhat + 2.0 * self._reach) * (1.0 - 1e-6)

    def _closest_listed(self) -> float:
        """The smallest distance (m) of any pair at the anchor."""
        return min(self._closest, self._listed_radius())

    def _near_pairs(
        self, within: float, x: torch.Tensor | None = None, now: float = 0.0
    ) -> tuple[Candidates, torch.Tensor] | None:
        """The candidates closer than ``within`` (m) at local x (default: at the anchor) and
        their squared distances there, or None if there are more than ``MAX_NEAR_PAIRS``
        (measuring them every frame would cost more than it saves). ``now``: x's
        :func:`relative_offset` from the anchor (m)."""
        d2, rows = self._measured(within, x, now)
        near = torch.nonzero(d2 < within**2).flatten()
        if len(near) > MAX_NEAR_PAIRS:
            return None
        index = near if rows is None else rows[near]
        return self._candidates.subset(index), d2[near]

    def _measured(
        self, within: float, x: torch.Tensor | None, now: float, most: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The squared distances at local x (default: at the anchor) of the candidates that
        may be closer than ``within`` (m) there, and their rows (None: every candidate, in
        order); ``now``: x's :func:`relative_offset` from the anchor (m). None where the
        Warp path would measure more than ``most`` of them."""
        if x is None:
            d2, rows = self._anchor_d2, None
        elif self.broad_phase == "bvh":  # Warp is there: its kernels are the faster ones
            from diffsim.contact.warp_broad_phase import squared_distances

            # Pair k is at least D_k - 2 now apart at x (D_k at the anchor, see relative_offset):
            # only the pairs that bound lets within are measured (with room for rounding,
            # the anchor's distances being in the working dtype); the same ones are found.
            limit = (within + 2.0 * now) * (1.0 + 1e-5) + 1e-12
            rows = torch.nonzero(self._anchor_d2 < limit**2).flatten()
            if most is not None and len(rows) > most:
                return None
            c = self._candidates
            k1 = len(c.point_triangle)
            pt, ee = rows[rows < k1], rows[rows >= k1] - k1
            d2 = squared_distances(x, c.point_triangle[pt], c.edge_edge[ee])
        else:
            d2, rows = torch.cat(potential.pair_distances(x, self._candidates)), None
        return d2, rows

    def apart(self, x: torch.Tensor, gap: float) -> bool:
        """Whether every pair of non-adjacent surface primitives is more than ``gap`` (m)
        apart at x: settled by the candidate set's bound where it can be (the closest pair
        at the anchor less twice the offset since, nothing measured), else by
        :meth:`min_distance`."""
        local = self.local(x).detach()
        with torch.no_grad():
            self._candidates_at(local)
            if self._closest_listed() - 2.0 * self._moved_from_anchor(local) > gap:
                return True
        return self.min_distance(x) > gap

    def min_distance(self, x: torch.Tensor) -> float:
        """The smallest distance (m) between non-adjacent surface primitives within reach."""
        x = self.local(x)
        c = self._candidates_at(x)
        if c.n_pairs == 0:
            return math.inf
        if self.broad_phase == "bvh":  # Warp is there: one kernel pass, the same values
            from diffsim.contact.warp_broad_phase import squared_distances

            d2 = squared_distances(x.detach(), c.point_triangle, c.edge_edge)
        else:
            d2 = torch.cat(potential.pair_distances(x.detach(), c))
        return float(d2.min().clamp_min(0).sqrt())


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b hold exactly the same values (and shape, dtype and device)."""
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and a.device == b.device
        and bool(torch.equal(a, b))
    )


def _filtered(
    candidates: Candidates, d2: torch.Tensor, within: float
) -> tuple[Candidates, torch.Tensor]:
    """The candidates whose squared distances ``d2`` (as the broad phase measured them, in
    the positions' dtype) are below ``within**2`` (m^2), compared as the broad phase
    compares them, and those distances."""
    keep = d2 < d2.new_tensor(within**2)
    k1 = len(candidates.point_triangle)
    pt, ee = keep[:k1], keep[k1:]
    subset = Candidates(
        candidates.point_triangle[pt], candidates.edge_edge[ee], candidates.mollifier_eps[ee]
    )
    return subset, d2[keep]


def _may_close(d2: torch.Tensor, reach: torch.Tensor, needed: float) -> torch.Tensor:
    """Per pair (bool ``[k]``): whether a pair at squared distance ``d2`` (m^2) that a motion
    can close by at most ``reach`` (m) may come within ``needed`` (m) along it (the torch
    twin of the ``closes`` kernel function in :mod:`diffsim.kernels.broad_phase`)."""
    return d2.clamp_min(0).sqrt() - reach <= needed


def clear_distance(step, dhat: float, scene_size: float):
    """The distance (m) beyond which a pair is neither within the barrier nor limited by a
    step whose :func:`relative_offset` is ``step`` (m; a float or a tensor of them): every pair's
    relative reach is at most 4 step (see :mod:`.ccd`). Plus 1% of dhat and rounding to the
    scene's size as safety. Used by :meth:`SurfaceContact.clear_over` and its worlds form."""
    keep = (1 - ccd.MIN_GAP_FRACTION) * (1 - ccd.SCALE_SLACK)
    reach = 4.0 * step / keep
    floor = reach.clamp(min=dhat) if isinstance(reach, torch.Tensor) else max(dhat, reach)
    return floor + 0.01 * dhat + 1e-6 * scene_size


def _frame_distances(frames: torch.Tensor, pairs: Candidates, warp: bool = False) -> torch.Tensor:
    """Distances (m) ``[F, k]`` of the pairs (point-triangle, then edge-edge) in each of the
    frames ``[F, n, 3]``: one Warp kernel (``warp``, where Warp is there), else one call of
    the torch formulas on the frames stacked as one set of F n vertices."""
    if warp:
        from diffsim.contact.warp_broad_phase import frame_distances

        rows = torch.cat([pairs.point_triangle, pairs.edge_edge])
        return frame_distances(frames, rows, len(pairs.point_triangle))
    f, n = frames.shape[:2]
    shift = (torch.arange(f, device=frames.device) * n)[:, None, None]
    stacked = Candidates(
        (pairs.point_triangle[None] + shift).reshape(-1, 4),
        (pairs.edge_edge[None] + shift).reshape(-1, 4),
        pairs.mollifier_eps.repeat(f),
    )
    d_pt, d_ee = potential.pair_distances(frames.reshape(-1, 3), stacked)
    d2 = torch.cat([d_pt.view(f, -1), d_ee.view(f, -1)], dim=1)
    return d2.clamp_min(0).sqrt()


class _WarpBarrierForces(torch.autograd.Function):
    """Barrier forces from the Warp kernel; backward by the kernel's Warp adjoint."""

    @staticmethod
    def forward(ctx, x, mass, contact: SurfaceContact, arrays, index):
        from diffsim.contact.warp_glue import forces_forward

        ctx.save_for_backward(x, mass)
        ctx.contact, ctx.arrays, ctx.index = contact, arrays, index
        return forces_forward(arrays, x.detach(), mass.detach(), *_constants(contact), index=index)

    @staticmethod
    def backward(ctx, grad_f):
        from diffsim.contact.warp_glue import forces_backward

        x, mass = ctx.saved_tensors
        gx, gm = forces_backward(
            ctx.arrays, x.detach(), mass.detach(), *_constants(ctx.contact), grad_f, ctx.index
        )
        return gx, gm, None, None, None


def _constants(contact: SurfaceContact) -> tuple[float, float, float]:
    floor = (potential.MIN_DISTANCE_FRACTION * contact.dhat) ** 2
    return contact.dhat, floor, contact.stiffness
