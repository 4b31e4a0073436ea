"""The torch reference backend: forces by autograd of the energy, any material.

Worlds (``model.worlds``) need nothing of their own: the model is one replicated mesh, and
per-world gravity and damping are repeated per vertex (:meth:`Model.per_vertex`).
"""

from __future__ import annotations

import torch

from diffsim.backends import integrator
from diffsim.backends.base import Backend
from diffsim.physics.elasticity import elastic_forces
from diffsim.sim.model import Coefficients


class TorchBackend(Backend):
    """Symplectic Euler in plain torch ops; the reference for every other backend."""

    name = "torch"

    def forces(self, c: Coefficients, x: torch.Tensor) -> torch.Tensor:
        f = self._explicit_forces(c, x)
        ground = self.model.ground
        if ground is not None:
            lift = c.mass * ground.normal_acceleration(ground.gap(x, c.mass.dtype))
            f = f + torch.stack([torch.zeros_like(lift), lift, torch.zeros_like(lift)], dim=1)
        return f

    def _explicit_forces(self, c: Coefficients, x: torch.Tensor) -> torch.Tensor:
        """Elastic + gravity + surface contact: every force except the ground barrier."""
        f = self._body_forces(c, x)
        if self.model.contact is not None:
            f = f + self.model.contact.forces(x, c.mass)
        return f

    def _body_forces(self, c: Coefficients, x: torch.Tensor) -> torch.Tensor:
        """Elastic + gravity."""
        m = self.model
        f = elastic_forces(c.material, x, m.tets, m.dm_inv, m.rest_volumes)
        return f + c.mass[:, None] * m.per_vertex(c.gravity)

    def substep(self, c: Coefficients, x, v, x_fixed):
        # Surface contact (and its time-of-impact splits) is the integrator's.
        damping = self.model.per_vertex(c.damping)
        forces = lambda y: self._body_forces(c, y)  # noqa: E731
        return integrator.substep(self.model, x, v, x_fixed, forces, c.mass, damping)
