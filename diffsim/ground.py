"""Ground plane contact: IPC barrier, lagged smooth friction and the no-tunnelling rule.

The ground is the plane y = height. Each vertex i at gap d_i = y_i - height contributes
the barrier energy ``kappa * m_i * b(d_i^2, dhat^2)``: scaling by the vertex mass makes the
barrier's acceleration, and so the explicit stability limit, independent of mesh density.
See docs/how-it-works.md for the derivation and the default stiffness.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffsim.barrier import barrier, barrier_derivative

# A step may close at most this fraction of a vertex's gap to the plane.
MAX_GAP_CLOSURE = 0.9
# Gaps are floored at this fraction of dhat inside the barrier, so log() never sees 0.
MIN_GAP_FRACTION = 1e-6


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
    def default_stiffness(dhat: float, gravity: float) -> float:
        """kappa for which the barrier holds 4 g at a gap of dhat / 4 (g = |gravity| or 9.81)."""
        g = gravity if gravity > 0 else 9.81
        s, s_hat = (dhat / 4) ** 2, dhat**2
        d = s - s_hat
        db = -2.0 * d * math.log(s / s_hat) - d * d / s
        return 4.0 * g / (2.0 * (dhat / 4) * -db)

    def gap(self, x: torch.Tensor) -> torch.Tensor:
        """Signed distances to the plane, ``[n]`` (m)."""
        return x[:, 1] - self.height

    def _squared_gap(self, x: torch.Tensor) -> torch.Tensor:
        floor = (MIN_GAP_FRACTION * self.dhat) ** 2
        return torch.clamp(self.gap(x) ** 2, min=floor)

    def energy(self, x: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
        """Barrier energy (J), a scalar."""
        return self.stiffness * (mass * barrier(self._squared_gap(x), self.dhat**2)).sum()

    def normal_acceleration(self, x: torch.Tensor) -> torch.Tensor:
        """Barrier force per unit mass along +y, ``[n]`` (m/s^2), >= 0."""
        d = self.gap(x)
        return -self.stiffness * 2.0 * d * barrier_derivative(self._squared_gap(x), self.dhat**2)

    def apply_friction(self, v: torch.Tensor, x: torch.Tensor, h: float) -> torch.Tensor:
        """Lagged smooth Coulomb friction, integrated implicitly in the tangential velocity.

        The friction force on vertex i is ``-mu * lambda_i * f1(|u|) / |u| * u`` with u the
        tangential velocity, lambda_i the barrier's normal force (lagged: from the current
        positions) and f1 the IPC smoothing (``2y/eps - y^2/eps^2`` below eps, 1 above).
        Dividing u by ``1 + h * mu * lambda_i/m_i * f1(|u|)/|u|`` can only slow a vertex,
        never reverse it, so friction is stable at any time step.
        """
        if self.friction <= 0.0:
            return v
        normal = self.normal_acceleration(x)
        tangential = torch.stack([v[:, 0], torch.zeros_like(v[:, 1]), v[:, 2]], dim=1)
        speed = torch.sqrt(tangential.square().sum(dim=1) + (1e-6 * self.friction_velocity) ** 2)
        eps = self.friction_velocity
        slope = torch.where(speed < eps, 2.0 / eps - speed / eps**2, 1.0 / speed)
        scale = 1.0 / (1.0 + h * self.friction * normal * slope)
        return v - (1.0 - scale)[:, None] * tangential

    def limit(self, x: torch.Tensor, x_new: torch.Tensor) -> torch.Tensor:
        """The no-tunnelling rule: a step closes at most 90% of each vertex's gap.

        Since every gap starts positive, it stays positive after any step, at any speed.
        """
        floor = self.height + (1.0 - MAX_GAP_CLOSURE) * self.gap(x)
        y = torch.maximum(x_new[:, 1], floor)
        return torch.stack([x_new[:, 0], y, x_new[:, 2]], dim=1)
