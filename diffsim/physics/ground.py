"""Ground plane contact: IPC barrier, lagged smooth friction and the no-tunnelling rule.

The ground is the plane y = height. Each vertex i at gap d_i = y_i - height contributes
the barrier energy ``kappa * m_i * b(d_i^2, dhat^2)``: scaling by the vertex mass makes the
barrier's acceleration, and so the explicit stability limit, independent of mesh density.
See docs/how-it-works.md for the derivation and the default stiffness.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffsim.physics.barrier import barrier, barrier_derivative

# Gaps are floored at this fraction of dhat inside the barrier, so log() never sees 0.
MIN_GAP_FRACTION = 1e-6
# The acceleration (m/s^2) the default barrier stiffness is sized for.
STANDARD_GRAVITY = 9.81


@dataclass(frozen=True)
class Ground:
    """A horizontal ground plane with barrier contact and optional friction.

    Attributes:
        height: the plane's y coordinate (m).
        dhat: barrier activation distance (m).
        stiffness: kappa (1/(m^2 s^2)); the barrier acceleration is
            ``kappa * 2 d * (-db/ds)`` at gap d.
        friction: Coulomb coefficient mu (>= 0; 0 disables friction).
        friction_velocity: eps_v (m/s), the slip speed below which friction is smoothed.
    """

    height: float
    dhat: float
    stiffness: float
    friction: float = 0.0
    friction_velocity: float = 1e-3

    @staticmethod
    def default_stiffness(dhat: float) -> float:
        """kappa for which the barrier holds 4 g at a gap of dhat / 4, g = STANDARD_GRAVITY.

        The default does not depend on the simulation's gravity, which is a differentiable
        input: a stiffness derived from it would make the forward pass depend on gravity in
        a way the backward pass cannot see. Under much stronger gravity, set the stiffness.
        """
        g = STANDARD_GRAVITY
        s, s_hat = (dhat / 4) ** 2, dhat**2
        d = s - s_hat
        db = -2.0 * d * math.log(s / s_hat) - d * d / s
        return 4.0 * g / (2.0 * (dhat / 4) * -db)

    def gap(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Signed distances to the plane, ``[n]`` (m), differenced in the positions' dtype
        (float64 in a simulation) and then rounded to ``dtype`` where given."""
        d = x[:, 1] - self.height
        return d if dtype is None else d.to(dtype)

    def _squared_gap(self, d: torch.Tensor) -> torch.Tensor:
        floor = (MIN_GAP_FRACTION * self.dhat) ** 2
        return torch.clamp(d**2, min=floor)

    def energy(self, x: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
        """Barrier energy (J), a scalar, in the dtype of ``mass``."""
        d = self.gap(x, mass.dtype)
        return self.stiffness * (mass * barrier(self._squared_gap(d), self.dhat**2)).sum()

    def normal_acceleration(self, d: torch.Tensor) -> torch.Tensor:
        """Barrier force per unit mass along +y at gaps ``d [n]`` (m), ``[n]`` (m/s^2), >= 0."""
        return -self.stiffness * 2.0 * d * barrier_derivative(self._squared_gap(d), self.dhat**2)

    def apply_friction(self, v: torch.Tensor, d: torch.Tensor, h: float) -> torch.Tensor:
        """Smooth Coulomb friction, integrated implicitly in the tangential velocity.

        The friction force on vertex i is ``-mu * lambda_i * f1(|u|) / |u| * u`` with u the
        tangential velocity, lambda_i the barrier's normal force at the gaps ``d`` (the
        simulator passes the end-of-step gaps from :meth:`solve`) and f1 the IPC smoothing
        (``2y/eps - y^2/eps^2`` below eps, 1 above).
        Dividing u by ``1 + h * mu * lambda_i/m_i * f1(|u|)/|u|`` can only slow a vertex,
        never reverse it, so friction is stable at any time step.
        """
        if self.friction <= 0.0:
            return v
        normal = self.normal_acceleration(d)
        tangential = torch.stack([v[:, 0], torch.zeros_like(v[:, 1]), v[:, 2]], dim=1)
        speed = torch.sqrt(tangential.square().sum(dim=1) + (1e-6 * self.friction_velocity) ** 2)
        eps = self.friction_velocity
        slope = torch.where(speed < eps, 2.0 / eps - speed / eps**2, 1.0 / speed)
        scale = 1.0 / (1.0 + h * self.friction * normal * slope)
        return v - (1.0 - scale)[:, None] * tangential

    def solve(
        self,
        d_pred: torch.Tensor,
        h: float,
        roots: Callable[[torch.Tensor, float], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Gaps after the step, with the barrier integrated implicitly per vertex.

        The ground barrier is separable: vertex i feels only its own gap. So instead of an
        explicit barrier force (which a fast vertex can drive arbitrarily deep, then be
        kicked out of), each vertex solves the scalar backward-Euler equation
        ``d' = d_pred + h^2 a(d')`` for its new gap d', with d_pred the gap after the
        explicit update and a(d) the barrier acceleration. The left side minus the right
        is increasing in d' and goes to -inf as d' -> 0, so the root is unique and positive:
        no vertex ever ends a step on or below the plane, whatever its speed. Where
        d_pred >= dhat the root is d_pred itself. The velocity then changes by the
        barrier's impulse, ``h a(d')``, only where it acts (see ``integrator``).

        The root is found without a graph (safeguarded Newton), then one Newton step with
        the graph attached gives exact first derivatives, dd'/dd_pred = 1 / (1 - h^2 a'(d')).

        Args:
            d_pred: ``[n]`` gaps after the explicit update, ``y + h v - height`` (m).
            h: the substep in s.
            roots: another way to find the roots (the Warp backend's kernel, the same loop):
                predicted gaps ``[k]`` inside the barrier and h -> the roots ``[k]``.

        Returns:
            ``[n]`` gaps, all > 0.
        """
        active = d_pred < self.dhat
        if not bool(active.any()):
            return d_pred
        min_gap = MIN_GAP_FRACTION * self.dhat
        with torch.no_grad():
            target = d_pred[active].detach()
            d = self.roots(target, h) if roots is None else roots(target.contiguous(), h)
            slope = 1.0 - h * h * self._acceleration_slope(d)
            accel = self._acceleration(d)
        # One Newton step on the graph: same value, exact first derivatives.
        d_new = d - (d - d_pred[active] - h * h * accel) / slope
        d_new = torch.clamp(d_new, min=min_gap)
        return d_pred.masked_scatter(active, d_new)

    def roots(self, target: torch.Tensor, h: float) -> torch.Tensor:
        """The roots d' of ``d' = target + h^2 a(d')`` for predicted gaps ``target [k]``
        inside the barrier (m), to 8 ulp: safeguarded Newton in [min gap, dhat], no graph."""
        min_gap = MIN_GAP_FRACTION * self.dhat
        with torch.no_grad():
            lo = torch.full_like(target, min_gap)
            hi = torch.full_like(target, self.dhat)
            d = torch.clamp(target, min_gap, self.dhat)
            tol = 8.0 * torch.finfo(d.dtype).eps
            for _ in range(80):
                push = h * h * self._acceleration(d)
                phi = d - target - push
                done = phi.abs() <= tol * (d + target.abs() + push)
                if bool(done.all()):
                    break
                lo = torch.where(phi < 0, d, lo)
                hi = torch.where(phi >= 0, d, hi)
                newton = d - phi / (1.0 - h * h * self._acceleration_slope(d))
                inside = (newton >= lo) & (newton <= hi)
                d = torch.where(done, d, torch.where(inside, newton, 0.5 * (lo + hi)))
        return d

    def _acceleration(self, d: torch.Tensor) -> torch.Tensor:
        """Barrier acceleration a(d) = -kappa 2 d b'(d^2) (m/s^2), for gaps d > 0."""
        return -self.stiffness * 2.0 * d * barrier_derivative(d * d, self.dhat**2)

    def _acceleration_slope(self, d: torch.Tensor) -> torch.Tensor:
        """da/dd = -kappa (2 b'(s) + 4 d^2 b''(s)), s = d^2 (<= 0)."""
        s, s_hat = d * d, self.dhat**2
        active = s < s_hat
        s = torch.where(active, s, torch.full_like(s, s_hat))
        r = s - s_hat
        log = torch.log(s / s_hat)
        db = -2.0 * r * log - r * r / s
        d2b = -2.0 * log - 4.0 * r / s + r * r / (s * s)
        return torch.where(
            active, -self.stiffness * (2.0 * db + 4.0 * s * d2b), torch.zeros_like(s)
        )
