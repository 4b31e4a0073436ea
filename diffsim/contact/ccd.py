"""Conservative continuous collision limit: no step passes a surface through another.

The bound. Take a candidate pair with sides A and B (the point and the triangle, or the two
edges) at distance d_k at the step's start, and let every vertex move along its straight
step, ``x_i(tau) = x_i + tau y_i`` for tau in [0, 1]. The closest points are convex
combinations ``p = sum_A a_i x_i`` and ``q = sum_B b_j x_j``; since each side's weights sum
to one, for ANY common displacement c

    p(tau) - q(tau) = p(0) - q(0) + tau (sum_A a_i (y_i - c) - sum_B b_j (y_j - c)).

Taking the weights that are closest at tau gives ``d(tau) >= d_k - tau L_k`` with

    L_k(y, c) = max_{i in A} |y_i - c| + max_{j in B} |y_j - c|,

so the distance cannot fall below ``s d_k`` (s = ``MIN_GAP_FRACTION``) while
``L_k <= (1 - s) d_k``. Only the pair's relative motion counts (translation invariance): a
body flying or falling as a whole is never limited, however fast.

The choice of c: the mean of the pair's four displacements. It is zero relative motion for a
common translation (the case the absolute bound ``c = 0`` gets wrong: it slows any body
moving farther per substep than about half the distance between its own non-adjacent
surface elements); it is symmetric in the two sides and needs no closest-point weights
(which change along the step); and it is linear in the displacements, so scaling all four
of a pair's displacements by t scales L_k by exactly t, which the per-vertex scales below
rely on. It is within a factor 3 of the best c: any c gives L_k >= D/2 and the mean gives
L_k <= 3D/2, D the largest difference between two of the four displacements.

Per-vertex scales. A vertex moves ``alpha_i y_i``; pass 1 gives each pair
``t_k = min(1, (1 - s) d_k / L_k(y))`` (shrunk by the tiny ``SCALE_SLACK`` against rounding)
and each vertex the smallest t_k of its pairs. Where a pair's four vertices end with the
same scale a <= t_k its bound holds (L scales by a). Where they differ (a vertex held back
by another pair while its neighbours move on), the pair's relative motion can grow, so the
scales are verified at the actual displacements ``alpha_i y_i``. A pair that fails gets all
four scales set to their smallest (equal again, so it holds) for up to ``EQUALIZE_ROUNDS``
rounds, which spreads a limit through a fast body that hits something; pairs still failing
then take the absolute bound (c = 0), ``t_k = (1 - s) d_k / (max_A |y_i| + max_B |y_j|)``,
which holds for any scales no larger than t_k whatever the other vertices do, so such pairs
are settled for good; verification repeats until no pair fails (after ``ABSOLUTE_ROUNDS``
rounds every remaining pair takes the absolute bound). Every candidate pair then keeps
``d(tau) >= s d_k`` along the limited step. Pairs outside the candidate set are farther
apart than the broad-phase radius allows the limited motion to close (see
:class:`~diffsim.contact.surface_contact.SurfaceContact`), so they cannot meet. This is
the first iteration of additive CCD (Li et al. 2021) with per-vertex scales.

What the simulator does with the scales: it truncates the step to
``x + alpha * (x_proposed - x)``, with ``v *= alpha``; with time-of-impact splits on (off by
default, :func:`diffsim.backends.integrator.substep`) a step that would be cut is first
taken again in halves, recursively, and only a step of the shortest length is truncated.

Backward pass: the scales are computed from detached values; :func:`scales_with_gradient`
gives each limited vertex the derivative of the pair bound whose value it took, so the
truncated step is differentiated exactly while the same pairs bind. The splits, decided
from the same detached values, are constant (docs/contact.md).
"""

from __future__ import annotations

import torch

from diffsim.contact.candidates import Candidates
from diffsim.contact.potential import pair_distances

# A step keeps at least this fraction of every candidate pair's distance.
MIN_GAP_FRACTION = 0.1
# Pass-1 and absolute scales aim this fraction below the bound, so the verification (at the
# bound itself) never fails a pair on rounding.
SCALE_SLACK = 1e-4
# Verification rounds that equalize a failing pair's scales before the absolute bound.
EQUALIZE_ROUNDS = 8
# Verification rounds with the absolute bound before it is applied to every pair left.
ABSOLUTE_ROUNDS = 8


def _sides(candidates: Candidates, device) -> torch.Tensor:
    """``[k, 4]`` bool: True for side A (the point; the first edge)."""
    k1, k2 = len(candidates.point_triangle), len(candidates.edge_edge)
    pt = torch.tensor([True, False, False, False], device=device).expand(k1, 4)
    ee = torch.tensor([True, True, False, False], device=device).expand(k2, 4)
    return torch.cat([pt, ee])


def pair_reach(y: torch.Tensor, side_a: torch.Tensor, relative: bool = True) -> torch.Tensor:
    """``L_k [k]`` (m): the most a pair's distance can shrink along displacements ``y``.

    Args:
        y: ``[k, 4, 3]`` displacements of each pair's vertices.
        side_a: ``[k, 4]`` bool, True for the vertices of side A.
        relative: subtract the mean of the four displacements (else c = 0, absolute).
    """
    if relative:
        y = y - y.mean(dim=1, keepdim=True)
    r = y.norm(dim=2)
    zero = torch.zeros_like(r)
    return torch.where(side_a, r, zero).amax(dim=1) + torch.where(side_a, zero, r).amax(dim=1)


def _lower(alpha: torch.Tensor, pairs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """alpha with each pair's four vertices lowered to at most that pair's ``t [k]``."""
    return alpha.scatter_reduce(0, pairs.reshape(-1), t.repeat_interleave(4), reduce="amin")


def step_scales(x: torch.Tensor, x_new: torch.Tensor, candidates: Candidates) -> torch.Tensor:
    """Per-vertex step scales alpha ``[n]`` in (0, 1], detached, from the torch reference.

    Args:
        x: positions ``[n, 3]`` at the step's start (m).
        x_new: proposed positions ``[n, 3]`` (m).
        candidates: every pair that can come close along the step.
    """
    with torch.no_grad():
        x, dx = x.detach(), (x_new - x).detach()
        alpha = torch.ones(len(x), dtype=x.dtype, device=x.device)
        if candidates.n_pairs == 0:
            return alpha
        pairs = torch.cat([candidates.point_triangle, candidates.edge_edge])
        side_a = _sides(candidates, x.device)
        d_pt, d_ee = pair_distances(x, candidates)
        bound = (1 - MIN_GAP_FRACTION) * torch.cat([d_pt, d_ee]).clamp_min(0).sqrt()
        tiny = torch.finfo(x.dtype).tiny
        y = dx[pairs]
        aim = (1 - SCALE_SLACK) * bound
        t = (aim / pair_reach(y, side_a).clamp_min(tiny)).clamp(max=1.0)
        alpha = _lower(alpha, pairs, t)
        if bool((alpha == 1).all()):
            return alpha
        t_abs = (aim / pair_reach(y, side_a, relative=False).clamp_min(tiny)).clamp(max=1.0)
        settled = torch.zeros(len(pairs), dtype=torch.bool, device=x.device)
        for round_ in range(EQUALIZE_ROUNDS + ABSOLUTE_ROUNDS):
            moved = alpha[pairs, None] * y
            failing = (pair_reach(moved, side_a) > bound) & ~settled
            if not bool(failing.any()):
                return alpha
            if round_ < EQUALIZE_ROUNDS:
                smallest = alpha[pairs[failing]].amin(dim=1)
                alpha = _lower(alpha, pairs[failing], smallest)
            else:
                alpha = _lower(alpha, pairs[failing], t_abs[failing])
                settled |= failing
        left = ~settled
        return _lower(alpha, pairs[left], t_abs[left])


def scales_with_gradient(
    x: torch.Tensor, x_new: torch.Tensor, candidates: Candidates, alpha: torch.Tensor
) -> torch.Tensor:
    """The scales alpha ``[n]`` (from :func:`step_scales` or its Warp kernel), the same
    values, differentiable in x and x_new where a vertex is limited.

    Every scale below 1 is some pair's bound, ``t_k = (1 - s)(1 - slack) d_k / L_k`` with the
    relative or the absolute L_k (pass 1 gives a vertex its pairs' smallest; the rounds copy
    such values or set absolute ones), and stays that pair's while the same pairs bind. So
    each limited vertex takes, by value, the bound of a pair that has a limited vertex,
    recomputed with autograd (the distance at x and the displacements); a vertex whose value
    no bound matches to rounding (a step capped as a whole) keeps a constant scale.

    Args:
        x: positions ``[n, 3]`` at the step's start (m), differentiable.
        x_new: proposed positions ``[n, 3]`` (m), differentiable.
        candidates: the pairs the scales were computed from.
        alpha: the scales ``[n]`` (detached).
    """
    alpha = alpha.detach()
    limited = alpha < 1
    if candidates.n_pairs == 0 or not bool(limited.any()):
        return alpha
    pairs = torch.cat([candidates.point_triangle, candidates.edge_edge])
    binding = torch.nonzero(limited[pairs].any(dim=1)).flatten()
    near = candidates.subset(binding)
    pairs = torch.cat([near.point_triangle, near.edge_edge])
    side_a = _sides(near, x.device)
    d2 = torch.cat(pair_distances(x, near))
    tiny = torch.finfo(x.dtype).tiny
    aim = (1 - MIN_GAP_FRACTION) * (1 - SCALE_SLACK) * d2.clamp_min(tiny).sqrt()
    y = (x_new - x)[pairs]
    t = torch.cat(
        [
            aim / pair_reach(y, side_a).clamp_min(tiny),
            aim / pair_reach(y, side_a, relative=False).clamp_min(tiny),
        ]
    )
    values, order = torch.sort(t.detach())
    vertices = torch.nonzero(limited).flatten()
    a = alpha[vertices].to(values.dtype)
    at = torch.searchsorted(values, a).clamp(max=len(values) - 1)
    below = (at - 1).clamp(min=0)
    closer = (values[below] - a).abs() < (values[at] - a).abs()
    at = torch.where(closer, below, at)
    # The Warp kernels compute the same bounds in another order of operations: in float64
    # their values differ by up to about 1e-13 relative (displacements that nearly cancel).
    tolerance = max(1e3 * torch.finfo(values.dtype).eps, 1e-9)
    match = (values[at] - a).abs() <= tolerance * a
    # The values stay exactly those given (t - t.detach() is zero); the gradient is the bound's.
    out = alpha.to(t.dtype).index_add(0, vertices[match], (t - t.detach())[order[at[match]]])
    return out.to(alpha.dtype)


def limit_step(x: torch.Tensor, x_new: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``x + alpha (x_new - x)`` with the scales ``alpha [n]`` held constant."""
    return x + alpha.detach()[:, None] * (x_new - x)
