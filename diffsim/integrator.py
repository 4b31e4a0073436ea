"""The symplectic Euler update given explicit forces: the one torch definition of a substep.

The torch backend uses it for every substep; the Warp backend fuses the same update into a
kernel and falls back to this function when surface contact is on.
"""

from __future__ import annotations

import torch

from diffsim.model import Model
from diffsim.velocity import clamp_speed


def symplectic_euler_update(
    model: Model,
    x: torch.Tensor,
    v: torch.Tensor,
    forces: torch.Tensor,
    mass: torch.Tensor,
    damping: torch.Tensor | float,
    x_fixed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One substep from the explicit forces (everything but the ground barrier).

    Args:
        model: the static model (substep, clamp, fixed vertices, ground, contact).
        x: positions ``[n, 3]`` (m).
        v: velocities ``[n, 3]`` (m/s).
        forces: explicit forces ``[n, 3]`` (N): elastic + gravity + surface contact.
        mass: lumped masses ``[n]`` (kg).
        damping: mass-proportional damping rate (1/s).
        x_fixed: positions ``[k, 3]`` of the fixed vertices at the end of the substep.

    Returns:
        ``(x_new, v_new)``, each ``[n, 3]``.
    """
    m = model
    h = m.substep_dt
    v = v + h * forces / mass[:, None]
    v = v / (1.0 + h * damping)
    if m.max_speed is not None:
        v = clamp_speed(v, m.max_speed)
    v = v * (~m.fixed_mask).to(x.dtype)[:, None]
    x_new = x + h * v
    if m.ground is not None:
        # The ground barrier, implicit per vertex; then friction from its normal force.
        # The new height is used as solved, not as x + h v, which could round onto the plane.
        y_new = m.ground.solve(x_new[:, 1], h)
        v = torch.stack([v[:, 0], (y_new - x[:, 1]) / h, v[:, 2]], dim=1)
        v = m.ground.apply_friction(v, torch.stack([x[:, 0], y_new, x[:, 2]], dim=1), h)
        x_new = torch.stack([x[:, 0] + h * v[:, 0], y_new, x[:, 2] + h * v[:, 2]], dim=1)
    if m.contact is not None:
        v = m.contact.apply_friction(v, x, mass, h)
        proposed = torch.stack([x[:, 0] + h * v[:, 0], x_new[:, 1], x[:, 2] + h * v[:, 2]], 1)
        x_new = m.contact.limit(x, proposed)
        v = (x_new - x) / h
    return x_new.index_put((m.fixed_indices,), x_fixed), v
