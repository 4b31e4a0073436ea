"""Elastic energy, forces and stresses of a tet mesh on the torch path (autograd of psi)."""

from __future__ import annotations

import torch

from diffsim.physics.materials import Material


def deformation_gradients(
    x: torch.Tensor, tets: torch.Tensor, dm_inv: torch.Tensor
) -> torch.Tensor:
    """F = Ds Dm^-1 per tet, ``[m, 3, 3]`` in the dtype of ``dm_inv``, from positions ``x [n, 3]``.

    The edges are differenced in the positions' dtype (float64 in a simulation, see the
    precision rule in docs/how-it-works.md) and then rounded to the working dtype.
    """
    corners = x[tets]
    ds = (corners[:, 1:] - corners[:, :1]).transpose(1, 2).to(dm_inv.dtype)
    return ds @ dm_inv


def elastic_energy(
    material: Material,
    x: torch.Tensor,
    tets: torch.Tensor,
    dm_inv: torch.Tensor,
    volumes: torch.Tensor,
) -> torch.Tensor:
    """Total elastic energy sum_e psi(F_e) V_e in J (scalar)."""
    return (material.energy_density(deformation_gradients(x, tets, dm_inv)) * volumes).sum()


def elastic_forces(
    material: Material,
    x: torch.Tensor,
    tets: torch.Tensor,
    dm_inv: torch.Tensor,
    volumes: torch.Tensor,
) -> torch.Tensor:
    """Elastic forces -dE/dx, ``[n, 3]`` in N, in the dtype of ``dm_inv``.

    When autograd is recording and anything upstream needs a gradient, the graph of the
    gradient is kept (``create_graph``) so the forces are differentiable in turn.
    """
    keep_graph = torch.is_grad_enabled() and (x.requires_grad or material.needs_grad)
    with torch.enable_grad():
        xr = x if x.requires_grad else x.detach().requires_grad_(True)
        energy = elastic_energy(material, xr, tets, dm_inv, volumes)
        (grad,) = torch.autograd.grad(energy, xr, create_graph=keep_graph)
    return -grad.to(dm_inv.dtype)


def first_piola_kirchhoff(material: Material, F: torch.Tensor) -> torch.Tensor:
    """P = dpsi/dF, ``[m, 3, 3]`` in Pa (detached)."""
    with torch.enable_grad():
        Fr = F.detach().requires_grad_(True)
        (P,) = torch.autograd.grad(material.energy_density(Fr).sum(), Fr)
    return P


def von_mises_stress(material: Material, F: torch.Tensor) -> torch.Tensor:
    """Von Mises equivalent of the Cauchy stress sigma = P F^T / J, ``[m]`` in Pa."""
    P = first_piola_kirchhoff(material, F)
    J = torch.linalg.det(F.detach())
    sigma = P @ F.detach().transpose(1, 2) / J[:, None, None]
    dev = sigma - sigma.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * torch.eye(
        3, dtype=F.dtype
    )
    return torch.sqrt(1.5 * dev.square().sum(dim=(1, 2)))


def determinants(m: torch.Tensor) -> torch.Tensor:
    """det M per 3x3 matrix ``[k, 3, 3]``: the triple product of its rows, as Warp's
    ``wp.determinant`` takes it (and faster on the CPU than an LU per matrix)."""
    r0, r1, r2 = m[:, 0], m[:, 1], m[:, 2]
    return (r0 * torch.linalg.cross(r1, r2)).sum(dim=1)


def inverse_rest_determinants(dm_inv: torch.Tensor) -> torch.Tensor:
    """det Dm^-1 = 1 / (6 V0) per tet, ``[m]`` (float64, detached): J = det(Ds) det Dm^-1."""
    return determinants(dm_inv.detach().double())


def volume_ratios(x: torch.Tensor, tets: torch.Tensor, dm_inv: torch.Tensor) -> torch.Tensor:
    """J = det F per tet, ``[m]`` (current over rest volume; <= 0 where a tet is inverted)."""
    return torch.linalg.det(deformation_gradients(x, tets, dm_inv))
