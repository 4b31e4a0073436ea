"""Conservative continuous collision limit: no step passes a surface through another.

For a candidate pair at distance d_k (at the step's start), the closest-point distance
along a linear motion of its vertices can shrink at most as fast as
``L_k = max_{i in A} |dx_i| + max_{j in B} |dx_j|`` (A, B the pair's two sides: the point
and the triangle, or the two edges), because each closest point is a convex combination
of its side's vertices. Scaling the step of every vertex of the pair by
``t_k = min(1, (1 - s) d_k / L_k)`` therefore keeps the distance above ``s d_k > 0`` over
the whole step (s = ``MIN_GAP_FRACTION``). Each vertex takes the smallest t_k of the pairs it
belongs to; since every vertex of pair k then moves at most t_k of its full step, the bound
still holds with per-vertex scales. Pairs outside the candidate set are farther apart than
the broad-phase radius, which exceeds the motion (see :class:`SurfaceContact`), so they
cannot meet during the step. This is the first iteration of additive CCD (Li et al. 2021)
with per-vertex instead of global scaling.

Backward pass: the scales are held constant (computed from detached values), so
``x_new = x + alpha * (x_proposed - x)`` is differentiated as a fixed linear blend.
"""

from __future__ import annotations

import torch

from diffsim.contact.candidates import Candidates
from diffsim.contact.potential import pair_distances

# A step keeps at least this fraction of every candidate pair's distance.
MIN_GAP_FRACTION = 0.1


def step_scales(x: torch.Tensor, x_new: torch.Tensor, candidates: Candidates) -> torch.Tensor:
    """Per-vertex step scales alpha ``[n]`` in (0, 1], detached, from the torch reference."""
    with torch.no_grad():
        x, dx = x.detach(), (x_new - x).detach()
        alpha = torch.ones(len(x), dtype=x.dtype, device=x.device)
        d_pt, d_ee = pair_distances(x, candidates)
        speed = dx.norm(dim=1)
        for pairs, d2, split in (
            (candidates.point_triangle, d_pt, 1),
            (candidates.edge_edge, d_ee, 2),
        ):
            if not len(pairs):
                continue
            s = speed[pairs]
            reach = s[:, :split].amax(dim=1) + s[:, split:].amax(dim=1)
            d = d2.clamp_min(0).sqrt()
            limit = (1 - MIN_GAP_FRACTION) * d / reach.clamp_min(torch.finfo(x.dtype).tiny)
            t = limit.clamp(max=1.0).repeat_interleave(4)
            alpha = alpha.scatter_reduce(0, pairs.reshape(-1), t, reduce="amin")
    return alpha


def limit_step(x: torch.Tensor, x_new: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``x + alpha (x_new - x)`` with the scales ``alpha [n]`` held constant."""
    return x + alpha.detach()[:, None] * (x_new - x)
