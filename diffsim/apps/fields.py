"""Scalar fields for colouring a body: energy density, von Mises stress, speed, displacement.

Tet fields (energy density, stress) are computed per tet and averaged to the vertices,
weighted by rest volume, so that a surface can be coloured smoothly. Everything here is
for display: values are detached numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from diffsim.physics.elasticity import deformation_gradients, von_mises_stress
from diffsim.physics.materials import Material

# Field name -> (unit, needs a material).
FIELDS: dict[str, tuple[str, bool]] = {
    "speed": ("m/s", False),
    "displacement": ("m", False),
    "energy_density": ("J/m^3", True),
    "von_mises": ("Pa", True),
}


@dataclass
class FieldContext:
    """What the fields need besides the current positions.

    Attributes:
        rest_positions: ``[n, 3]`` rest (reference) positions in m.
        tets: ``[m, 4]`` connectivity, or None (then only vertex fields exist).
        material: the material for energy and stress, or None.
        dm_inv: ``[m, 3, 3]`` inverse rest edge matrices (computed from the rest shape if None).
        rest_volumes: ``[m]`` rest volumes (computed if None).
    """

    rest_positions: np.ndarray
    tets: np.ndarray | None = None
    material: Material | None = None
    dm_inv: np.ndarray | None = None
    rest_volumes: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.rest_positions = np.asarray(self.rest_positions, dtype=np.float64)
        if self.tets is not None:
            from diffsim.mesh.geometry import edge_matrices, signed_volumes

            self.tets = np.asarray(self.tets, dtype=np.int64)
            if self.dm_inv is None:
                self.dm_inv = np.linalg.inv(edge_matrices(self.rest_positions, self.tets))
            if self.rest_volumes is None:
                self.rest_volumes = signed_volumes(self.rest_positions, self.tets)

    @classmethod
    def from_simulator(cls, sim) -> FieldContext:
        """The context of a :class:`diffsim.Simulator` (its mesh and material)."""
        mesh = sim.mesh
        return cls(mesh.vertices, mesh.tets, sim.material, mesh.dm_inv, mesh.rest_volumes)

    def available(self) -> list[str]:
        """Names of the fields this context can compute."""
        has_tet_data = self.tets is not None and self.material is not None
        return [name for name, (_, needs) in FIELDS.items() if has_tet_data or not needs]


def tet_field(name: str, context: FieldContext, positions: np.ndarray | torch.Tensor) -> np.ndarray:
    """A per-tet field ``[m]``: ``"energy_density"`` (J/m^3) or ``"von_mises"`` (Pa)."""
    if name not in ("energy_density", "von_mises"):
        raise ValueError(f"{name!r} is not a tet field; use 'energy_density' or 'von_mises'")
    if context.tets is None or context.material is None:
        raise ValueError(f"field {name!r} needs the mesh's tets and a material (load the scene)")
    x = torch.as_tensor(_numpy(positions), dtype=torch.float64)
    F = deformation_gradients(
        x, torch.as_tensor(context.tets), torch.as_tensor(context.dm_inv, dtype=torch.float64)
    )
    material = _float64_material(context.material)
    with torch.no_grad():
        if name == "energy_density":
            values = material.energy_density(F)
        else:
            values = von_mises_stress(material, F)
    return values.detach().numpy()


def tets_to_vertices(values: np.ndarray, context: FieldContext) -> np.ndarray:
    """Volume-weighted average of per-tet values ``[m]`` at each vertex, ``[n]``."""
    n = len(context.rest_positions)
    weights = np.abs(context.rest_volumes)
    total = np.zeros(n)
    weight = np.zeros(n)
    np.add.at(total, context.tets, (values * weights)[:, None])
    np.add.at(weight, context.tets, weights[:, None])
    return total / np.maximum(weight, np.finfo(np.float64).tiny)


def vertex_field(
    name: str,
    context: FieldContext,
    positions: np.ndarray | torch.Tensor,
    velocities: np.ndarray | torch.Tensor | None = None,
) -> np.ndarray:
    """A field at the vertices ``[n]`` for colouring.

    Args:
        name: one of :data:`FIELDS`: ``"speed"`` (m/s), ``"displacement"`` (m, from the rest
            positions), ``"energy_density"`` (J/m^3) or ``"von_mises"`` (Pa), the last two
            averaged from the tets.
        context: rest shape, tets and material.
        positions: ``[n, 3]`` current positions (m).
        velocities: ``[n, 3]`` current velocities (m/s), needed for ``"speed"``.
    """
    if name not in FIELDS:
        raise ValueError(f"unknown field {name!r}; choose from {list(FIELDS)}")
    x = _numpy(positions)
    if name == "speed":
        if velocities is None:
            raise ValueError("field 'speed' needs velocities")
        return np.linalg.norm(_numpy(velocities), axis=1)
    if name == "displacement":
        return np.linalg.norm(x - context.rest_positions, axis=1)
    return tets_to_vertices(tet_field(name, context, x), context)


def _numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


def _float64_material(material: Material) -> Material:
    """A copy whose tensor parameters are detached float64 CPU tensors."""
    values = {
        k: v.detach().cpu().double() if isinstance(v, torch.Tensor) else v
        for k, v in material.physical_parameters().items()
    }
    return material.replace(**values)
