"""Smoothed, lagged IPC friction between surfaces (torch; shared by both implementations).

For an active pair k with closest-point weights c_k (``[1, -beta_a, -beta_b, -beta_c]`` for
a point and triangle, ``[1 - s, s, -(1 - t), -t]`` for two edges), the relative velocity is
``v_k = sum_i c_ki v_i``, the normal n_k points between the closest points and the slip is
``u_k = (I - n_k n_k^T) v_k``. The friction force is ``-mu lambda_k f1(|u_k|) / |u_k| u_k``
with lambda_k the pair's barrier force magnitude and f1 the IPC smoothing
(``2y/eps_v - y^2/eps_v^2`` below eps_v, 1 above). Lambda, n and c are lagged: evaluated
at the substep's positions. As for the ground, the slip is reduced by the fraction
``stop_k = 1 - 1 / (1 + gamma_k)``, gamma_k = ``h mu lambda_k f1/|u| / m_eff`` with
``m_eff = 1 / sum_i c_ki^2 / m_i``, which can stop a slip but never reverse it.

The substep's friction is solved in FRICTION_PASSES passes over the active pairs, the lagged
terms (lambda, n, c, m_eff) computed once. Each pass takes the slips at the current
velocities, and each pair proposes the impulse ``m_eff stop_k u_k``. Pairs sharing a vertex
act together (Jacobi): where the fractions of slip they remove add up to more than 1 at a
vertex (sticking), each pair's proposal is divided by the largest such sum among its four
vertices (one factor per pair, so the pair's impulse sums to zero over its vertices and
momentum is kept). The proposal is added to the pair's impulse so far, which is capped at
the Coulomb limit ``h mu lambda_k`` (scaled back onto the ball of that radius), and the
vertices take ``-c_ki / m_i`` times the change. A sticking slip shrinks geometrically pass
after pass (a single pass removed about 64% of a sticking slip in a stack of cubes, so a
steady sideways load left a steady creep); a sliding pair reaches its cap in the first
passes and stays there, so sliding contact is Coulomb: the passes never apply the sliding
impulse twice.
A fixed number of passes keeps the solve differentiable (nothing detached; the Warp path
runs the kernels' adjoints in reverse).
"""

from __future__ import annotations

import torch

from diffsim.contact.candidates import Candidates
from diffsim.contact.distances import (
    edge_edge_cross_squared,
    edge_edge_mollifier,
    edge_edge_parameters,
    point_triangle_weights,
)
from diffsim.contact.potential import MIN_DISTANCE_FRACTION, smallest_mass
from diffsim.physics.barrier import barrier_derivative

# Passes per substep: the three-cube stack (tests/test_contact_physics.py) creeps 4.09,
# 1.24, 0.59, 0.39 mm over 1 s (top cube, float32) at 1, 2, 3, 4 passes. With the barrier's
# default stiffness at rho = 1/8 (cubes resting deeper) 4 passes left float32 creeping 0.85
# to 1.09 mm (the order of the force sums decides) against 0.24 mm in float64; 8 passes:
# 0.20, 0.35, 0.26 mm (float32) and 0.19, 0.36, 0.27 mm (float64), float32 as float64.
# The fused contact substeps pay nothing for them; the per-substep path, a few launches.
FRICTION_PASSES = 8


def _pair_geometry(x: torch.Tensor, candidates: Candidates):
    """Per pair: vertex ids [k, 4], weights c [k, 4], separation p - q [k, 3], mollifier [k]."""
    pt, ee = candidates.point_triangle, candidates.edge_edge
    beta, _ = point_triangle_weights(*x[pt].unbind(1))
    c_pt = torch.cat([torch.ones_like(beta[:, :1]), -beta], dim=1)
    s, t, _ = edge_edge_parameters(*x[ee].unbind(1))
    c_ee = torch.stack([1 - s, s, -(1 - t), -t], dim=1)
    ids = torch.cat([pt, ee])
    weights = torch.cat([c_pt, c_ee])
    sep = (weights[:, :, None] * x[ids]).sum(dim=1)
    mol = torch.ones(len(pt), dtype=x.dtype, device=x.device)
    if len(ee):
        cross = edge_edge_cross_squared(*x[ee].unbind(1))
        mol_ee = edge_edge_mollifier(cross, candidates.mollifier_eps.to(x.dtype))
    else:
        mol_ee = torch.zeros(0, dtype=x.dtype, device=x.device)
    return ids, weights, sep, torch.cat([mol, mol_ee])


def apply_friction(
    v: torch.Tensor,
    x: torch.Tensor,
    mass: torch.Tensor,
    h: float,
    candidates: Candidates,
    dhat: float,
    stiffness: float,
    mu: float,
    eps_v: float,
    implementation: str = "torch",
    passes: int | None = None,
) -> torch.Tensor:
    """Velocities ``[n, 3]`` after one substep h (s) of surface friction; differentiable.

    ``passes`` (default :data:`FRICTION_PASSES`) is the number of friction passes.

    ``implementation`` is ``"torch"`` (these formulas, the reference) or ``"warp"`` (the
    same formulas in Warp kernels over every candidate pair, inactive ones skipped in the
    kernel; backward by their Warp adjoints; x and mass are taken in v's dtype).
    """
    if implementation not in ("torch", "warp"):
        raise ValueError(
            f"unknown friction implementation {implementation!r}; use 'torch' or 'warp'"
        )
    passes = FRICTION_PASSES if passes is None else int(passes)
    if mu <= 0.0 or candidates.n_pairs == 0 or passes <= 0:
        return v
    if implementation == "warp":
        from diffsim.contact.warp_glue import friction, pair_selection

        floor = (MIN_DISTANCE_FRACTION * dhat) ** 2
        arrays, index = pair_selection(candidates, v.dtype)
        x, mass = x.to(v.dtype), mass.to(v.dtype)
        args = (v, x, mass, arrays, h, dhat, floor, stiffness, mu, eps_v, index, passes)
        return friction(*args)
    ids, c, sep, mol = _pair_geometry(x, candidates)
    d2 = sep.square().sum(dim=1)
    active = d2 < dhat**2
    if not bool(active.any()):
        return v
    ids, c, sep, mol, d2 = ids[active], c[active], sep[active], mol[active], d2[active]
    floor = (MIN_DISTANCE_FRACTION * dhat) ** 2
    d2 = d2.clamp_min(floor)
    w = smallest_mass(mass[ids])
    # |dE/dd| = kappa w m 2 d |b'(d^2)|: the pair's normal force in N.
    normal_force = -stiffness * w * mol * 2.0 * d2.sqrt() * barrier_derivative(d2, dhat**2)
    n = sep / d2.sqrt()[:, None]
    m_eff = 1.0 / (c.square() / mass[ids]).sum(dim=1)
    weights = c / mass[ids]  # the shares of a pair's impulse, per vertex (1/kg)
    limit = h * mu * normal_force  # the Coulomb limit of a pair's |impulse| (kg m/s)
    total = torch.zeros_like(sep)  # each pair's impulse so far (kg m/s)
    flat = ids.reshape(-1)
    for _ in range(passes):
        v_rel = (c[:, :, None] * v[ids]).sum(dim=1)
        u = v_rel - (v_rel * n).sum(dim=1, keepdim=True) * n
        speed = torch.sqrt(u.square().sum(dim=1) + (1e-6 * eps_v) ** 2)
        slope = torch.where(speed < eps_v, 2.0 / eps_v - speed / eps_v**2, 1.0 / speed)
        gamma = limit * slope / m_eff
        stop = 1.0 - 1.0 / (1.0 + gamma)  # the fraction of the slip each pair removes
        load = torch.zeros(len(v), dtype=v.dtype, device=v.device)
        load = load.index_add(0, flat, stop[:, None].expand(-1, 4).reshape(-1))
        relax = 1.0 / torch.clamp(load[ids].max(dim=1).values, min=1.0)
        trial = total + (relax * m_eff * stop)[:, None] * u
        q2 = trial.square().sum(dim=1)
        over = q2 > limit.square()
        scale = torch.where(over, limit / torch.sqrt(torch.where(over, q2, 1.0)), 1.0)
        after = scale[:, None] * trial
        step = after - total
        total = after
        share = weights[:, :, None] * step[:, None, :]
        v = v.index_add(0, flat, -share.reshape(-1, 3))
    return v
