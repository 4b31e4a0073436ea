"""The surface barrier potential and its forces (torch reference).

Pair k (point-triangle or edge-edge) at squared distance d_k^2 contributes
``kappa * w_k * m_k * b(d_k^2, dhat^2)``, with b the IPC log barrier
(:func:`diffsim.physics.barrier.barrier`), m_k the edge-edge mollifier (1 for point-triangle pairs)
and w_k the smallest mass of the pair's four vertices, so that, as for the ground, the
barrier's acceleration of any vertex, and so the explicit stability limit, does not depend
on mesh resolution or density, even where a light vertex meets heavy ones.
"""

from __future__ import annotations

import torch

from diffsim.contact.candidates import Candidates
from diffsim.contact.distances import (
    edge_edge_cross_squared,
    edge_edge_distance,
    edge_edge_mollifier,
    point_triangle_distance,
)
from diffsim.physics.barrier import barrier

# Squared distances are floored at (this fraction of dhat)^2 so log() never sees 0.
MIN_DISTANCE_FRACTION = 1e-6


def pair_distances(x: torch.Tensor, candidates: Candidates) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distances (m^2) of the point-triangle ``[k1]`` and edge-edge ``[k2]`` pairs."""
    pt, ee = candidates.point_triangle, candidates.edge_edge
    d_pt = point_triangle_distance(*x[pt].unbind(1))
    d_ee = edge_edge_distance(*x[ee].unbind(1))
    return d_pt, d_ee


def pair_barriers(
    x: torch.Tensor, candidates: Candidates, dhat: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mollified barriers ``m_k b(d_k^2, dhat^2)`` (m^4) of the ``[k1]`` and ``[k2]`` pairs."""
    d_pt, d_ee = pair_distances(x, candidates)
    floor = (MIN_DISTANCE_FRACTION * dhat) ** 2
    b_pt = barrier(d_pt.clamp_min(floor), dhat**2)
    b_ee = barrier(d_ee.clamp_min(floor), dhat**2)
    ee = candidates.edge_edge
    if len(ee):
        cross = edge_edge_cross_squared(*x[ee].unbind(1))
        b_ee = b_ee * edge_edge_mollifier(cross, candidates.mollifier_eps.to(x.dtype))
    return b_pt, b_ee


def smallest_mass(mass4: torch.Tensor) -> torch.Tensor:
    """``[k]`` smallest of each row of ``[k, 4]`` masses (ties: the later entry takes the
    gradient, as in the Warp kernel)."""
    a = torch.where(mass4[:, 0] < mass4[:, 1], mass4[:, 0], mass4[:, 1])
    b = torch.where(mass4[:, 2] < mass4[:, 3], mass4[:, 2], mass4[:, 3])
    return torch.where(a < b, a, b)


def pair_weights(mass: torch.Tensor, candidates: Candidates) -> tuple[torch.Tensor, torch.Tensor]:
    """Mass weights w_k (kg): the smallest mass of each pair's four vertices."""
    return (
        smallest_mass(mass[candidates.point_triangle]),
        smallest_mass(mass[candidates.edge_edge]),
    )


def barrier_energy(
    x: torch.Tensor, mass: torch.Tensor, candidates: Candidates, dhat: float, stiffness: float
) -> torch.Tensor:
    """Total surface barrier energy (J), a differentiable scalar."""
    b_pt, b_ee = pair_barriers(x, candidates, dhat)
    w_pt, w_ee = pair_weights(mass, candidates)
    return stiffness * ((w_pt * b_pt).sum() + (w_ee * b_ee).sum())


def barrier_forces(
    x: torch.Tensor, mass: torch.Tensor, candidates: Candidates, dhat: float, stiffness: float
) -> torch.Tensor:
    """Barrier forces -dE/dx, ``[n, 3]`` in N; differentiable in x and mass when recording."""
    keep_graph = torch.is_grad_enabled() and (x.requires_grad or mass.requires_grad)
    with torch.enable_grad():
        xr = x if x.requires_grad else x.detach().requires_grad_(True)
        energy = barrier_energy(xr, mass, candidates, dhat, stiffness)
        if not energy.requires_grad:  # no candidates
            return torch.zeros_like(x)
        (grad,) = torch.autograd.grad(energy, xr, create_graph=keep_graph)
    return -grad
