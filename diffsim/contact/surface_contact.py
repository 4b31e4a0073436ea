"""SurfaceContact: the contact object the simulator calls each substep."""

from __future__ import annotations

import math
import time
from collections import defaultdict

import numpy as np
import torch

from diffsim.contact import ccd, friction, potential
from diffsim.contact.candidates import Candidates, SurfacePrimitives, find_candidates
from diffsim.mesh import TetMesh

# Default barrier activation distance, as a fraction of the bounding-box diagonal.
DHAT_FRACTION = 5e-3
# The default stiffness makes the barrier's stiffness reach the explicit stability limit
# (h^2 omega^2 = 1) at this fraction of dhat; see docs/contact.md.
STABLE_GAP_FRACTION = 0.25
# A candidate set is built with room for at least this many steps of the last step's size.
REBUILD_STEPS = 4
# limit() first scales a whole step down (one factor for all vertices) so that no vertex
# moves farther than this fraction of the mesh diagonal, which bounds the broad phase's work.
MAX_STEP_FRACTION = 0.1


class SurfaceContact:
    """IPC barrier contact between and within bodies, with friction and a CCD step limit.

    Per substep the simulator calls :meth:`forces`, :meth:`apply_friction` and :meth:`limit`;
    :meth:`energy` serves the equilibrium solver and diagnostics. All are differentiable in
    positions, velocities and masses, except that candidate sets and CCD step scales are
    held constant in the backward pass.

    Candidates are cached: a set found at anchor positions x_a with radius ``dhat + 2 margin``
    holds every pair that can come within dhat while no vertex is farther than ``margin``
    from x_a, so it is reused until some vertex moves farther (or a proposed step would take
    it farther). The cache changes only speed, never results.

    Args:
        mesh: the tet mesh (its boundary surface collides).
        dhat: barrier activation distance (m).
        stiffness: kappa (1/(m^2 s^2)); pair k's energy is ``kappa * w_k * m_k * b``.
        friction: Coulomb coefficient mu between surfaces (>= 0).
        friction_velocity: eps_v (m/s).
        implementation: ``"warp"`` (kernels) or ``"torch"`` (reference) for the barrier
            forces and CCD scales.
        broad_phase: ``"bvh"`` (Warp BVH) or ``"brute"`` (all pairs, small meshes).
        margin: candidate-cache margin (m); default dhat.
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
        self.margin = float(dhat if margin is None else margin)
        self.timings: dict[str, float] = defaultdict(float)
        self._anchor: torch.Tensor | None = None
        self._reach = 0.0
        self._last_step = 0.0
        self._candidates: Candidates | None = None
        self._arrays = None
        self._active: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (x, pair ids)

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
    ) -> SurfaceContact:
        """The Simulator's contact: defaults from the scene, checked for a separated start.

        Args:
            mesh: the mesh at rest (its rest shape must be intersection-free).
            h: substep length (s), for the default stiffness.
            dhat, stiffness: None for the defaults.
            friction, friction_velocity: mu and eps_v.
            backend: the simulator's backend; ``"torch"`` selects the torch reference.
            device: torch device.
            dtype: the simulator's working dtype.
        """
        dhat = cls.default_dhat(mesh) if dhat is None else float(dhat)
        stiffness = cls.default_stiffness(dhat, h) if stiffness is None else float(stiffness)
        implementation = "torch" if backend == "torch" else "warp"
        broad_phase = "bvh"
        try:
            import warp  # noqa: F401
        except ImportError:  # pragma: no cover - Warp is a dependency; degrade gracefully
            implementation, broad_phase = "torch", "brute"
        contact = cls(
            mesh,
            dhat=dhat,
            stiffness=stiffness,
            friction=friction,
            friction_velocity=friction_velocity,
            implementation=implementation,
            broad_phase=broad_phase,
            device=device,
            dtype=dtype,
        )
        contact.check_separated(torch.as_tensor(mesh.vertices, device=device))
        return contact

    def check_separated(self, x: torch.Tensor) -> None:
        """Raises ValueError if two non-adjacent surface primitives touch or nearly touch."""
        x = self.local(x.to(torch.float64))
        c = self._candidates_at(x)
        d_pt, d_ee = potential.pair_distances(x.detach().to(torch.float64), c)
        d = torch.cat([d_pt, d_ee])
        floor = (potential.MIN_DISTANCE_FRACTION * self.dhat) ** 2
        if len(d) and float(d.min()) <= floor:
            k = int(d.argmin())
            pair = torch.cat([c.point_triangle, c.edge_edge])[k].tolist()
            kind = "point-triangle" if k < len(c.point_triangle) else "edge-edge"
            raise ValueError(
                f"surfaces touch at the start: {kind} pair {pair} is {float(d[k].sqrt()):.3g} m "
                f"apart; separate the bodies (e.g. a gap of at least dhat = {self.dhat:.3g} m)"
            )

    @staticmethod
    def default_dhat(mesh: TetMesh) -> float:
        """dhat = 0.5% of the bounding-box diagonal (m)."""
        return DHAT_FRACTION * float(np.linalg.norm(np.ptp(mesh.vertices, axis=0)))

    @staticmethod
    def default_stiffness(dhat: float, h: float) -> float:
        """kappa = rho^2 / (2 h^2 dhat^2), rho = 1/4: stable explicit steps down to dhat/4.

        Near contact the barrier acceleration is about ``2 kappa dhat^4 / d``, whose
        stiffness ``2 kappa dhat^4 / d^2`` equals ``1 / h^2`` at d = rho dhat. The barrier then
        stops approach speeds up to about ``0.4 dhat / h`` before the gap falls below dhat/4.
        """
        return STABLE_GAP_FRACTION**2 / (2.0 * h**2 * dhat**2)

    def local(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Positions ``[n, 3]`` relative to the rest centroid, in the working dtype (the
        contact terms depend only on differences, so gradients pass unchanged)."""
        return (x - self.origin.to(x.dtype)).to(dtype or self.dtype or x.dtype)

    # ----------------------------------------------------------------- candidates
    def candidates(self, x: torch.Tensor, x_new: torch.Tensor | None = None) -> Candidates:
        """Candidate pairs valid at positions x (and along the straight motion to x_new)."""
        return self._candidates_at(self.local(x), None if x_new is None else self.local(x_new))

    def _candidates_at(self, x: torch.Tensor, x_new: torch.Tensor | None = None) -> Candidates:
        """:meth:`candidates` for positions already in :meth:`local` coordinates."""
        with torch.no_grad():
            x = x.detach()
            moved = 0.0
            if self._anchor is not None and self._anchor.shape == x.shape:
                moved = float((x - self._anchor).norm(dim=1).max())
                if x_new is not None:
                    moved = max(moved, float((x_new.detach() - self._anchor).norm(dim=1).max()))
            step = 0.0 if x_new is None else float((x_new.detach() - x).norm(dim=1).max())
            # Room for a few more steps of the last accepted step's size before a rebuild.
            wanted = max(self.margin, REBUILD_STEPS * self._last_step)
            stale = (
                self._candidates is None
                or self._anchor.shape != x.shape
                or moved > self._reach
                or (x_new is None and self._reach > 2.0 * wanted)  # shrink an oversized set
            )
            if stale:
                start = time.perf_counter()
                self._reach = max(wanted, 1.01 * step)
                self._anchor = x.clone()
                radius = self.dhat + 2.0 * self._reach
                self._candidates = find_candidates(self.surface, x, radius, self.broad_phase)
                self._arrays = None
                self.timings["broad_phase"] += time.perf_counter() - start
                self.timings["rebuilds"] += 1
        return self._candidates

    def _warp_arrays(self, x: torch.Tensor):
        from diffsim.kernels.contact import PairArrays

        if self._arrays is None or self._arrays.eps.dtype != x.dtype:
            self._arrays = PairArrays(self._candidates, x.dtype)
        return self._arrays

    # ----------------------------------------------------------------- physics
    def energy(self, x: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
        """Barrier energy (J), a scalar, twice differentiable (torch formulas on both paths)."""
        x = self.local(x, mass.dtype)
        c = self._candidates_at(x)
        return potential.barrier_energy(x, mass, c, self.dhat, self.stiffness)

    def forces(self, x: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
        """Barrier forces ``[n, 3]`` in N (working dtype), differentiable in x and mass."""
        x = self.local(x, mass.dtype)
        c = self._candidates_at(x)
        start = time.perf_counter()
        if self.implementation == "torch":
            f = potential.barrier_forces(x, mass, c, self.dhat, self.stiffness)
            active = None
        else:
            energies = []
            f = _WarpBarrierForces.apply(x, mass, self, self._warp_arrays(x), energies)
            active = torch.nonzero(energies[0] != 0).flatten()
        self._active = (x.detach(), active)
        self.timings["barrier"] += time.perf_counter() - start
        return f

    def apply_friction(
        self, v: torch.Tensor, x: torch.Tensor, mass: torch.Tensor, h: float
    ) -> torch.Tensor:
        """Velocities ``[n, 3]`` after surface friction over a substep of h seconds."""
        if self.friction <= 0.0:
            return v
        x = self.local(x, v.dtype)
        c = self._active_pairs(x)
        start = time.perf_counter()
        v = friction.apply_friction(
            v, x, mass, h, c, self.dhat, self.stiffness, self.friction, self.friction_velocity
        )
        self.timings["friction"] += time.perf_counter() - start
        return v

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

    def limit(self, x: torch.Tensor, x_new: torch.Tensor) -> torch.Tensor:
        """Positions after the conservative CCD limit (see :mod:`diffsim.contact.ccd`):
        ``x + alpha (x_new - x)`` with the scales of :meth:`step_scales` held constant."""
        alpha = self.step_scales(x, x_new)
        return ccd.limit_step(x, x_new, alpha.to(x.dtype))

    def step_scales(self, x: torch.Tensor, x_new: torch.Tensor) -> torch.Tensor:
        """Per-vertex step scales ``[n]`` in (0, 1] (detached) for the step x -> x_new.

        A step that moves some vertex farther than ``MAX_STEP_FRACTION`` of the mesh diagonal
        (a blow-up in dynamics, or a Newton step of the equilibrium solver) is first scaled
        down as a whole; then each vertex takes the CCD scale of its pairs.
        """
        x, x_new = self.local(x).detach(), self.local(x_new).detach()
        with torch.no_grad():
            longest = float((x_new - x).norm(dim=1).max()) if len(x) else 0.0
            cap = MAX_STEP_FRACTION * self.scene_size
            scale = 1.0
            if longest > cap:
                scale = cap / longest
                x_new = x + scale * (x_new - x)
                self.timings["capped_steps"] += 1
            c = self._candidates_at(x, x_new)
            start = time.perf_counter()
            if self.implementation == "torch":
                alpha = ccd.step_scales(x, x_new, c)
            else:
                from diffsim.kernels.contact import step_scales

                alpha = step_scales(self._warp_arrays(x), x, x_new - x)
            self.timings["limited_vertex_steps"] += int((alpha < 1).sum())
            moved = (x_new - x) * alpha[:, None]
            self._last_step = float(moved.norm(dim=1).max()) if len(x) else 0.0
            self.timings["ccd"] += time.perf_counter() - start
        return alpha * scale

    def min_distance(self, x: torch.Tensor) -> float:
        """The smallest distance (m) between non-adjacent surface primitives within reach."""
        x = self.local(x)
        c = self._candidates_at(x)
        if c.n_pairs == 0:
            return math.inf
        d_pt, d_ee = potential.pair_distances(x.detach(), c)
        return float(torch.cat([d_pt, d_ee]).min().sqrt())


class _WarpBarrierForces(torch.autograd.Function):
    """Barrier forces from the Warp kernel; backward by the kernel's Warp adjoint."""

    @staticmethod
    def forward(ctx, x, mass, contact: SurfaceContact, arrays, energies: list):
        from diffsim.kernels.contact import forces_forward

        ctx.save_for_backward(x, mass)
        ctx.contact, ctx.arrays = contact, arrays
        f, energy = forces_forward(arrays, x.detach(), mass.detach(), *_constants(contact))
        energies.append(energy)  # per-pair energies for the caller (not differentiated)
        return f

    @staticmethod
    def backward(ctx, grad_f):
        from diffsim.kernels.contact import forces_backward

        x, mass = ctx.saved_tensors
        gx, gm = forces_backward(
            ctx.arrays, x.detach(), mass.detach(), *_constants(ctx.contact), grad_f
        )
        return gx, gm, None, None, None


def _constants(contact: SurfaceContact) -> tuple[float, float, float]:
    floor = (potential.MIN_DISTANCE_FRACTION * contact.dhat) ** 2
    return contact.dhat, floor, contact.stiffness
