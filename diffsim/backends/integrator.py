"""The symplectic Euler update given explicit forces: the one torch definition of a substep.

The torch backend uses it for every substep; the Warp backend fuses the same update into a
kernel and falls back to this function when surface contact is on.
"""

from __future__ import annotations

import torch

from diffsim.physics.velocity import clamp_speed
from diffsim.sim.model import Model


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

    Precision rule: positions are float64 and the increment ``h v`` (in the working dtype)
    is added to them in float64, so no increment is lost however small the substep or far
    the body from the origin. Velocities are never recomputed from position differences:
    they change by the forces, and where a contact acts, by its own impulse.

    Args:
        model: the static model (substep, clamp, fixed vertices, ground, contact).
        x: positions ``[n, 3]`` (m), float64.
        v: velocities ``[n, 3]`` (m/s), working dtype.
        forces: explicit forces ``[n, 3]`` (N): elastic + gravity + surface contact.
        mass: lumped masses ``[n]`` (kg).
        damping: mass-proportional damping rate (1/s): ``[]``, or ``[n]`` per vertex (worlds).
        x_fixed: positions ``[k, 3]`` of the fixed vertices at the end of the substep.

    Returns:
        ``(x_new, v_new)``, each ``[n, 3]`` (float64 and working dtype).
    """
    m = model
    h = m.substep_dt
    v = v + h * forces / mass[:, None]
    if isinstance(damping, torch.Tensor) and damping.dim() == 1:
        damping = damping[:, None]
    v = v / (1.0 + h * damping)
    if m.max_speed is not None:
        v = clamp_speed(v, m.max_speed)
    v = v * (~m.fixed_mask).to(v.dtype)[:, None]
    if m.contact is not None:
        # Surface friction (lagged: from the barrier at x) acts on all three components
        # before the ground solve, so it does not depend on the scene's orientation.
        v = m.contact.apply_friction(v, x, mass, h)
    x_new = x + h * v
    if m.ground is not None:
        x_new, v = _ground_contact(m.ground, x, v, h)
    if m.contact is not None:
        # The continuous collision limit: a vertex whose step is cut keeps the same
        # fraction of its velocity.
        alpha = m.contact.step_scales(x, x_new)
        x_new = x + alpha.to(x.dtype)[:, None] * (x_new - x)
        v = v * alpha.to(v.dtype)[:, None]
    return x_new.index_put((m.fixed_indices,), x_fixed.to(x_new.dtype)), v


def _ground_contact(ground, x: torch.Tensor, v: torch.Tensor, h: float):
    """The implicit ground barrier and friction; returns ``(x_new, v_new)``.

    Where a vertex's predicted gap is inside the barrier, its new gap d' is solved
    implicitly (:meth:`Ground.solve`), its height is ``height + d'`` (never on or below the
    plane) and its vertical velocity gains the barrier's impulse ``h a(d')``; friction then
    acts on the tangential velocity. Elsewhere the step is the free one.
    """
    d_pred = ground.gap(x, v.dtype) + h * v[:, 1]
    active = d_pred < ground.dhat
    if not bool(active.any()):
        return x + h * v, v
    d_new = ground.solve(d_pred, h)
    normal = ground.normal_acceleration(d_new)
    v = torch.stack([v[:, 0], v[:, 1] + h * normal, v[:, 2]], dim=1)
    v = ground.apply_friction(v, d_new, h)
    step = x + h * v
    y_new = torch.where(active, ground.height + d_new.to(x.dtype), step[:, 1])
    return torch.stack([step[:, 0], y_new, step[:, 2]], dim=1), v
