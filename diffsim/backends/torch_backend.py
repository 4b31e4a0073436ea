"""The torch reference backend: forces by autograd of the energy, any material.

Worlds (``model.worlds``) need nothing of their own: the model is one replicated mesh, and
per-world gravity and damping are repeated per vertex (:meth:`Model.per_vertex`).
"""

from __future__ import annotations

import torch

from diffsim.backends.base import Backend
from diffsim.backends.integrator import symplectic_euler_update
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
        m = self.model
        f = elastic_forces(c.material, x, m.tets, m.dm_inv, m.rest_volumes)
        f = f + c.mass[:, None] * m.per_vertex(c.gravity)
        if m.contact is not None:
            f = f + m.contact.forces(x, c.mass)
        return f

    def substep(self, c: Coefficients, x, v, x_fixed):
        forces = self._explicit_forces(c, x)
        damping = self.model.per_vertex(c.damping)
        return symplectic_euler_update(self.model, x, v, forces, c.mass, damping, x_fixed)
