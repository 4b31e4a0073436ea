"""Static simulation data (the model) and the per-rollout differentiable coefficients."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from diffsim.mesh import TetMesh
from diffsim.physics.ground import Ground
from diffsim.physics.materials import Material
from diffsim.physics.volume_limit import VolumeLimit

# Positions are float64 in every configuration: the precision rule (docs/how-it-works.md).
# Forces, velocities and parameters use the simulator's dtype (float32 by default).
POSITION_DTYPE = torch.float64


@dataclass(frozen=True)
class Model:
    """What does not change during a rollout: rest shape, masks, settings. Never mutated.

    Attributes:
        mesh: the tet mesh (numpy, float64).
        rest_positions: ``[n, 3]`` float64 (``POSITION_DTYPE``).
        tets: ``[m, 4]`` int64.
        dm_inv: ``[m, 3, 3]`` inverse rest edge matrices, in the simulator's dtype.
        rest_volumes: ``[m]`` in m^3.
        fixed_mask: ``[n]`` bool, True where a vertex is prescribed.
        fixed_indices: ``[k]`` int64, the prescribed vertices.
        dt: time per step (frame) in s; each step runs ``substeps`` substeps of dt/substeps.
        substeps: substeps per step.
        max_speed: tanh velocity clamp v_max in m/s, or None.
        ground: ground plane settings, or None.
        contact: surface contact between and within bodies (barrier, friction, continuous
            collision limit), or None. See :mod:`diffsim.contact`.
        added_mass: ``[n]`` mass (kg) added to each vertex by mass scaling, or None.
        volume_limit: the volume step limit (no step brings a tet's volume ratio below
            its floor; :mod:`diffsim.physics.volume_limit`), or None.
        worlds: the number of worlds W simulated at once, or None (one world, no world
            axis). With worlds, the arrays above describe one replicated mesh: W copies of
            ``mesh``, world-major (world w owns vertices ``w * n_w .. (w + 1) * n_w - 1`` and
            tets ``w * m_w .. (w + 1) * m_w - 1``, n_w and m_w those of ``mesh``), so
            ``n_vertices`` is ``W * n_w`` and the prescribed vertices are listed world by
            world. See docs/worlds.md.
    """

    mesh: TetMesh
    rest_positions: torch.Tensor
    tets: torch.Tensor
    dm_inv: torch.Tensor
    rest_volumes: torch.Tensor
    fixed_mask: torch.Tensor
    fixed_indices: torch.Tensor
    dt: float
    substeps: int
    max_speed: float | None
    ground: Ground | None
    contact: Any = None
    added_mass: torch.Tensor | None = None
    worlds: int | None = None
    volume_limit: VolumeLimit | None = None

    @property
    def n_worlds(self) -> int:
        """W: the number of worlds (1 without a world axis)."""
        return 1 if self.worlds is None else self.worlds

    @property
    def world_vertices(self) -> int:
        """Vertices per world (all of them without a world axis)."""
        return self.n_vertices // self.n_worlds

    @property
    def world_tets(self) -> int:
        """Tets per world (all of them without a world axis)."""
        return self.n_tets // self.n_worlds

    def world(self, w: int, contact: Any = None) -> Model:
        """World w alone: a model without a world axis on that world's rows and tets
        (views), with ``contact`` (the world's own contact object) as its surface contact."""
        n, m = self.world_vertices, self.world_tets
        k = len(self.fixed_indices) // self.n_worlds
        rows, tets = slice(w * n, (w + 1) * n), slice(w * m, (w + 1) * m)
        return replace(
            self,
            rest_positions=self.rest_positions[rows],
            tets=self.tets[tets] - w * n,
            dm_inv=self.dm_inv[tets],
            rest_volumes=self.rest_volumes[tets],
            fixed_mask=self.fixed_mask[rows],
            fixed_indices=self.fixed_indices[w * k : (w + 1) * k] - w * n,
            contact=contact,
            added_mass=None if self.added_mass is None else self.added_mass[rows],
            worlds=None,
        )

    def per_vertex(self, values: torch.Tensor) -> torch.Tensor:
        """Per-world values ``[W, ...]`` repeated for each world's vertices, ``[n, ...]``;
        without a world axis, the values unchanged (a single gravity ``[3]`` or damping
        ``[]`` broadcasts). Differentiable: gradients sum back to the worlds."""
        if self.worlds is None:
            return values
        return values.repeat_interleave(self.world_vertices, dim=0)

    @property
    def substep_dt(self) -> float:
        return self.dt / self.substeps

    @property
    def dtype(self) -> torch.dtype:
        """The working dtype of forces, velocities and parameters."""
        return self.dm_inv.dtype

    @property
    def device(self) -> torch.device:
        return self.rest_positions.device

    @property
    def n_vertices(self) -> int:
        return self.rest_positions.shape[0]

    @property
    def n_tets(self) -> int:
        return self.tets.shape[0]


@dataclass
class Coefficients:
    """Differentiable per-rollout quantities derived from the parameters.

    Attributes:
        material: the material with its parameters as tensors (graphs kept).
        mass: ``[n]`` lumped vertex masses in kg.
        gravity: ``[3]`` in m/s^2; with worlds ``[W, 3]``, one row per world.
        damping: ``[]`` mass-proportional damping rate in 1/s; with worlds ``[W]``.
    """

    material: Material
    mass: torch.Tensor
    gravity: torch.Tensor
    damping: torch.Tensor


def lumped_mass(model: Model, density) -> torch.Tensor:
    """Lumped masses ``[n]`` (kg) from a density (float, or tensor [] or [m]), differentiable."""
    density = torch.as_tensor(density, dtype=model.dtype, device=model.device)
    share = (density * model.rest_volumes / 4.0).expand(model.n_tets)
    mass = torch.zeros(model.n_vertices, dtype=model.dtype, device=model.device)
    mass = mass.index_add(0, model.tets.reshape(-1), share.repeat_interleave(4))
    return mass if model.added_mass is None else mass + model.added_mass
