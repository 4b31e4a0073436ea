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
        m = self.model
        f = elastic_forces(c.material, x, m.tets, m.dm_inv, m.rest_volumes)
        f = f + c.mass[:, None] * c.gravity
        if m.ground is not None:
            lift = c.mass * m.ground.normal_acceleration(x)
            f = f + torch.stack([torch.zeros_like(lift), lift, torch.zeros_like(lift)], dim=1)
        if m.contact is not None:
            f = f + m.contact.forces(x, c.mass)
        return f

    def substep(self, c: Coefficients, x, v, x_fixed):
        m = self.model
        h = m.substep_dt
        v = v + h * self.forces(c, x) / c.mass[:, None]
        if m.ground is not None:
            v = m.ground.apply_friction(v, x, h)
        if m.contact is not None:
            v = m.contact.apply_friction(v, x, c.mass, h)
        v = v / (1.0 + h * c.damping)
        if m.max_speed is not None:
            v = clamp_speed(v, m.max_speed)
        free = (~m.fixed_mask).to(x.dtype)[:, None]
        v = v * free
        x_new = x + h * v
        if m.ground is not None or m.contact is not None:
            if m.ground is not None:
                x_new = m.ground.limit(x, x_new)
            if m.contact is not None:
                x_new = m.contact.limit(x, x_new)
            v = (x_new - x) / h
        x_new = x_new.index_put((m.fixed_indices,), x_fixed)
        return x_new, v
