"""The torch reference backend: forces by autograd of the energy, any material."""

from __future__ import annotations

import torch

from diffsim.backends.base import Backend
from diffsim.elasticity import elastic_forces
from diffsim.model import Coefficients
from diffsim.velocity import clamp_speed


class TorchBackend(Backend):
    """Symplectic Euler in plain torch ops; the reference for every other backend."""

    name = "torch"

    def forces(self, c: Coefficients, x: torch.Tensor) -> torch.Tensor:
        f = self._explicit_forces(c, x)
        ground = self.model.ground
        if ground is not None:
            lift = c.mass * ground.normal_acceleration(x)
            f = f + torch.stack([torch.zeros_like(lift), lift, torch.zeros_like(lift)], dim=1)
        return f

    def _explicit_forces(self, c: Coefficients, x: torch.Tensor) -> torch.Tensor:
        """Elastic + gravity + surface contact: every force except the ground barrier."""
        m = self.model
        f = elastic_forces(c.material, x, m.tets, m.dm_inv, m.rest_volumes)
        f = f + c.mass[:, None] * c.gravity
        if m.contact is not None:
            f = f + m.contact.forces(x, c.mass)
        return f

    def substep(self, c: Coefficients, x, v, x_fixed):
        m = self.model
        h = m.substep_dt
        v = v + h * self._explicit_forces(c, x) / c.mass[:, None]
        v = v / (1.0 + h * c.damping)
        if m.max_speed is not None:
            v = clamp_speed(v, m.max_speed)
        free = (~m.fixed_mask).to(x.dtype)[:, None]
        v = v * free
        x_new = x + h * v
        if m.ground is not None:
            # The ground barrier, implicit per vertex; then friction from its normal force.
            # The new height is used as solved, not as x + h v, which could round onto the plane.
            y_new = m.ground.solve(x_new[:, 1], h)
            v = torch.stack([v[:, 0], (y_new - x[:, 1]) / h, v[:, 2]], dim=1)
            v = m.ground.apply_friction(v, torch.stack([x[:, 0], y_new, x[:, 2]], dim=1), h)
            x_new = torch.stack([x[:, 0] + h * v[:, 0], y_new, x[:, 2] + h * v[:, 2]], dim=1)
        if m.contact is not None:
            v = m.contact.apply_friction(v, x, c.mass, h)
            x_new = m.contact.limit(
                x, torch.stack([x[:, 0] + h * v[:, 0], x_new[:, 1], x[:, 2] + h * v[:, 2]], 1)
            )
            v = (x_new - x) / h
        x_new = x_new.index_put((m.fixed_indices,), x_fixed)
        return x_new, v
