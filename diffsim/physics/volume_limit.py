"""The volume step limit: steps truncated per vertex so that no tet's volume ratio falls
below a floor (``Simulator(min_volume_ratio=...)``).

An explicit step moves each vertex by ``dx``; a tet with corners moving along their steps,
scaled by t, has the volume ratio

    J(t) = det(F0 + t dF) = det(Ds(x) + t Ds(dx)) det(Dm^-1),  F0 = Ds(x) Dm^-1,

a cubic in t (measured as the determinant of the edge matrices, scaled by det Dm^-1 =
1 / (6 V0)). A tet *fails* where its ratio at the step's end is below its floor
``min(J(0), floor)``: a tet already below the floor may not go lower, one above it may not
cross it. The limit gives each vertex a scale alpha in [0, 1] (the step becomes
``x + alpha dx``, the velocity ``alpha v``, the inelastic correction of the continuous
collision limit) in rounds: every failing tet finds the first t at which its ratio, along
its corners' current scaled steps, reaches its floor, and its corners' scales are
multiplied by that t (a corner shared by several failing tets takes the smallest). A
corner whose scale drops changes its other tets' steps, so the rounds repeat until no tet
fails; after ``ROUNDS`` rounds a failing tet's corners stop (t = 0: a tet whose corners
all stop keeps its start shape, which does not fail), so the rounds end. The first
crossing of a cubic is found exactly: between its critical points it is monotone, so the
first monotone piece whose end lies below the floor holds it, and bisection finds it.

The rounds are decided on detached values; the scales then carry the gradient of the
crossings that set them (:func:`volume_step_scales`), so gradients through a limited step
are those of the step taken (docs/time-steps.md, "The volume limit").
"""

from __future__ import annotations

import math

import torch

from diffsim.physics.elasticity import determinants, inverse_rest_determinants

# Rounds of scaling before failing tets' corners are stopped outright (see above).
ROUNDS = 8
# Bisection steps for the first crossing on a monotone piece: 2^-48 of the step, below
# float64 resolution of the scale.
BISECTIONS = 48
# A tet fails where its end ratio is below its floor by more than this (rounding between
# the cubic and the determinant must not make a tet that the last round fixed fail again).
SLACK = 1e-9


class VolumeLimit:
    """The volume step limit of a simulation and its counts (mutable, like the contact's
    timings).

    Args:
        min_ratio: the smallest volume ratio J (current over rest volume) a step may bring
            a tet to, in (0, 1).

    Attributes:
        counts: ``limited_vertex_steps`` (vertex-steps whose scale was below 1),
            ``limited_substeps`` (substeps it cut) and ``cancelled_substeps`` (substeps
            where it and the continuous collision limit did not agree on a step within
            ``LIMIT_ALTERNATIONS`` turns, taken as no move; see
            :func:`diffsim.backends.integrator.substep`).
    """

    def __init__(self, min_ratio: float) -> None:
        try:
            ratio = float(min_ratio)
        except (TypeError, ValueError):
            ratio = math.nan
        if not 0.0 < ratio < 1.0:
            raise ValueError(
                f"min_volume_ratio must be in (0, 1) (a volume ratio J a step may not go "
                f"below, e.g. 0.1), got {min_ratio}"
            )
        self.min_ratio = ratio
        self.counts = {"limited_vertex_steps": 0, "limited_substeps": 0, "cancelled_substeps": 0}

    def scales(
        self, x: torch.Tensor, dx: torch.Tensor, tets: torch.Tensor, dm_inv: torch.Tensor
    ) -> torch.Tensor | None:
        """:func:`volume_step_scales` with this floor."""
        return volume_step_scales(x, dx, tets, dm_inv, self.min_ratio)

    def record(self, limited: int) -> None:
        """Counts a substep in which it cut ``limited`` vertices' steps (none: nothing)."""
        if limited:
            self.counts["limited_vertex_steps"] += limited
            self.counts["limited_substeps"] += 1


def volume_step_scales(
    x: torch.Tensor,
    dx: torch.Tensor,
    tets: torch.Tensor,
    dm_inv: torch.Tensor,
    floor: float,
) -> torch.Tensor | None:
    """Per-vertex scales ``[n]`` (float64) of the step ``x -> x + dx`` that keep every tet's
    volume ratio at or above ``min(its ratio at x, floor)``; None where the whole step keeps
    them (no scale below 1).

    The rounds are decided on detached values. Where autograd records and x or dx needs a
    gradient, the scales are then rebuilt with it: each crossing t of a round as
    ``t - (J(t) - floor) / J'(t)`` with J(t) recomputed with its graph (the value t; the
    derivative of the root by the implicit function theorem), so the scales are the exact
    derivative of the rounds actually taken.

    Args:
        x: positions ``[n, 3]`` (m) at the step's start (float64).
        dx: the step ``[n, 3]`` (m).
        tets: ``[m, 4]`` vertex ids.
        dm_inv: ``[m, 3, 3]`` inverse rest edge matrices.
        floor: the smallest volume ratio a step may bring a tet to, in (0, 1).
    """
    rounds = []  # (failing tets, their crossings t) of each round
    with torch.no_grad():
        x0, step = x.detach().double(), dx.detach().double()
        # J = det(Ds Dm^-1) = c det(Ds), c = det Dm^-1 = 1 / (6 V0): the crossings are those
        # of det(Ds) with floor / c, without a matrix product per tet.
        c = inverse_rest_determinants(dm_inv)
        d0 = _edge_matrices(x0, tets)
        floors = torch.clamp(c * determinants(d0), max=floor)
        targets = floors / c
        alpha = torch.ones(len(x), dtype=torch.float64, device=x.device)
        dd = _edge_matrices(step, tets)
        ends = determinants(d0 + dd)  # det(Ds) of each tet at the end of its current step
        # After ROUNDS rounds each round stops at least one more vertex (a failing tet has
        # one that still moves), so the rounds end within ROUNDS + n.
        for round_ in range(ROUNDS + len(x) + 1):
            failing = torch.nonzero(c * ends < floors - SLACK).flatten()
            if not len(failing):
                break
            if round_ < ROUNDS:
                t = first_crossing(d0[failing], dd[failing], targets[failing])
            else:
                t = torch.zeros(len(failing), dtype=torch.float64, device=x.device)
            rounds.append((failing, t))
            scaled = _scaled(alpha, tets[failing], t)
            # Only the tets of the corners whose scale dropped change their steps.
            touched = torch.nonzero((scaled < alpha)[tets].any(dim=1)).flatten()
            alpha = scaled
            dd[touched] = _edge_matrices(alpha[:, None] * step, tets[touched])
            ends[touched] = determinants(d0[touched] + dd[touched])
    if not rounds:
        return None
    if not (torch.is_grad_enabled() and (x.requires_grad or dx.requires_grad)):
        return alpha
    x, dx = x.double(), dx.double()
    alpha = torch.ones(len(x), dtype=torch.float64, device=x.device)
    for failing, t in rounds:
        corners = tets[failing]
        if bool((t > 0.0).any()):
            d0 = _edge_matrices(x, corners)
            dd = _edge_matrices(alpha[:, None] * dx, corners)
            scale = c[failing]
            floors = torch.clamp(scale * determinants(d0), max=floor)
            gap = scale * determinants(d0 + t[:, None, None] * dd) - floors
            with torch.no_grad():
                slope = scale * _det_slope(d0, dd, t)
            t = torch.where(t > 0.0, t - (gap - gap.detach()) / slope, t)
        alpha = _scaled(alpha, corners, t)
    return alpha


def _scaled(alpha: torch.Tensor, corners: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The scales after a round: each corner ``[k, 4]`` of a failing tet takes the smallest
    of its scale and its scale times its tets' crossings ``t [k]``."""
    scaled = (alpha[corners] * t[:, None]).reshape(-1)
    return alpha.scatter_reduce(0, corners.reshape(-1), scaled, "amin")


def _det_slope(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """d/dt det(a + t b) at t: tr(adj(a + t b) b)."""
    return _adjugate_trace(a + t[:, None, None] * b, b)


def _adjugate_trace(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """tr(adj(A) B) per pair of 3x3 matrices ``[k, 3, 3]``."""
    return (_adjugate(a) * b.transpose(1, 2)).sum(dim=(1, 2))


def first_crossing(f0: torch.Tensor, df: torch.Tensor, floors: torch.Tensor) -> torch.Tensor:
    """The first t in [0, 1] with ``det(f0 + t df) = floors`` for matrices ``[k, 3, 3]`` whose
    determinant starts at or above its floor and ends below it (float64): the largest t
    found whose value is not below the floor, to within 2^-BISECTIONS."""
    c0 = determinants(f0)
    c1, c2 = _adjugate_trace(f0, df), _adjugate_trace(df, f0)
    c3 = determinants(df)

    def ratio(t: torch.Tensor) -> torch.Tensor:
        return ((c3 * t + c2) * t + c1) * t + c0

    # The critical points, roots of 3 c3 t^2 + 2 c2 t + c1, where real and inside (0, 1)
    # (else 0: a breakpoint that adds no piece).
    a, b = 3.0 * c3, 2.0 * c2
    disc = b * b - 4.0 * a * c1
    root = torch.sqrt(torch.clamp(disc, min=0.0))
    quadratic = (a != 0.0) & (disc >= 0.0)
    linear = (a == 0.0) & (b != 0.0)
    two_a = torch.where(a == 0.0, torch.ones_like(a), 2.0 * a)
    r1 = torch.where(quadratic, (-b - root) / two_a, torch.zeros_like(a))
    r2 = torch.where(quadratic, (-b + root) / two_a, torch.zeros_like(a))
    r1 = torch.where(linear, -c1 / torch.where(linear, b, torch.ones_like(b)), r1)
    r2 = torch.where(linear, r1, r2)
    r1 = torch.where((r1 > 0.0) & (r1 < 1.0), r1, torch.zeros_like(r1))
    r2 = torch.where((r2 > 0.0) & (r2 < 1.0), r2, torch.zeros_like(r2))
    p1, p2 = torch.minimum(r1, r2), torch.maximum(r1, r2)
    # The piece [lo, hi] that holds the first crossing.
    # (A breakpoint at 0 is the start, at or above the floor by assumption.)
    first, second = (p1 > 0.0) & (ratio(p1) < floors), (p2 > 0.0) & (ratio(p2) < floors)
    hi = torch.where(first, p1, torch.where(second, p2, torch.ones_like(p2)))
    lo = torch.where(first, torch.zeros_like(p1), torch.where(second, p1, p2))
    for _ in range(BISECTIONS):
        mid = 0.5 * (lo + hi)
        keeps = ratio(mid) >= floors
        lo = torch.where(keeps, mid, lo)
        hi = torch.where(keeps, hi, mid)
    return lo


def _edge_matrices(x: torch.Tensor, tets: torch.Tensor) -> torch.Tensor:
    """Ds = [x1 - x0, x2 - x0, x3 - x0] per tet, ``[m, 3, 3]`` (edges as columns)."""
    corners = x[tets]
    return (corners[:, 1:] - corners[:, :1]).transpose(1, 2)


def _adjugate(m: torch.Tensor) -> torch.Tensor:
    """adj(M) per 3x3 matrix ``[k, 3, 3]`` (M adj(M) = det(M) I; defined where M is singular)."""
    c0, c1, c2 = m[:, :, 0], m[:, :, 1], m[:, :, 2]
    # Rows of adj(M) are the cross products of M's columns: adj = [c1 x c2; c2 x c0; c0 x c1].
    return torch.stack(
        [torch.linalg.cross(c1, c2), torch.linalg.cross(c2, c0), torch.linalg.cross(c0, c1)],
        dim=1,
    )
