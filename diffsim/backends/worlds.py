"""Surface contact of many worlds: one contact object per world, on its own vertices.

Worlds share nothing: each world's surfaces collide with that world's surfaces only, so two
worlds whose bodies overlap in space never feel each other. A contact object caches its
candidate pairs from its own vertices' motion and limits steps from their relative motion
(see :class:`diffsim.contact.SurfaceContact`); one object per world keeps both per world, so
a world's contact gives the numbers the same world gives alone.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch


class WorldContact:
    """The contact of W worlds of one replicated mesh (see :mod:`diffsim.sim.worlds`).

    Takes and returns tensors over all ``W * n`` vertices; world w's rows
    ``w * n .. (w + 1) * n - 1`` go to ``contacts[w]``. Other attributes (``dhat``,
    ``stiffness``, ``friction``, ...) are those of the first world's (all are the same).

    Args:
        contacts: one contact object per world, none used yet (each caches its own state).
        world_vertices: n, the vertices of one world.
    """

    def __init__(self, contacts: Sequence[Any], world_vertices: int) -> None:
        self.contacts = list(contacts)
        self.world_vertices = int(world_vertices)

    @classmethod
    def replicated(cls, contact: Any, worlds: int, world_vertices: int) -> WorldContact:
        """W independent copies of an unused contact object (the first is ``contact``)."""
        copies = [contact] + [copy.deepcopy(contact) for _ in range(worlds - 1)]
        return cls(copies, world_vertices)

    def __getattr__(self, name: str) -> Any:
        if name == "contacts":  # during deepcopy/pickle, before __init__
            raise AttributeError(name)
        return getattr(self.contacts[0], name)

    def _split(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return t.split(self.world_vertices)

    # ----------------------------------------------------------------- physics
    def forces(self, x: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
        """Barrier forces ``[W * n, 3]`` in N, each world's from its own surfaces."""
        parts = zip(self.contacts, self._split(x), self._split(mass), strict=True)
        return torch.cat([c.forces(xw, mw) for c, xw, mw in parts])

    def apply_friction(
        self, v: torch.Tensor, x: torch.Tensor, mass: torch.Tensor, h: float
    ) -> torch.Tensor:
        """Velocities ``[W * n, 3]`` after each world's surface friction over h seconds."""
        parts = zip(self.contacts, self._split(v), self._split(x), self._split(mass), strict=True)
        return torch.cat([c.apply_friction(vw, xw, mw, h) for c, vw, xw, mw in parts])

    def step_scales(self, x: torch.Tensor, x_new: torch.Tensor) -> torch.Tensor:
        """Per-vertex CCD step scales ``[W * n]`` (detached), each world's from its own pairs."""
        parts = zip(self.contacts, self._split(x), self._split(x_new), strict=True)
        return torch.cat([c.step_scales(xw, nw) for c, xw, nw in parts])

    def limit(self, x: torch.Tensor, x_new: torch.Tensor) -> torch.Tensor:
        """Positions after each world's CCD limit, ``[W * n, 3]``."""
        parts = zip(self.contacts, self._split(x), self._split(x_new), strict=True)
        return torch.cat([c.limit(xw, nw) for c, xw, nw in parts])

    def energies(self, x: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
        """Barrier energy of each world, ``[W]`` (J)."""
        parts = zip(self.contacts, self._split(x), self._split(mass), strict=True)
        return torch.stack([c.energy(xw, mw) for c, xw, mw in parts])

    def energy(self, x: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
        """Barrier energy of all worlds (J), a scalar."""
        return self.energies(x, mass).sum()

    def clear_over(self, frames: torch.Tensor, record: bool = True) -> bool:
        """Whether no world's contact would have acted over ``frames [S + 1, W * n, 3]``
        (see :meth:`SurfaceContact.clear_over`)."""
        parts = zip(self.contacts, frames.split(self.world_vertices, dim=1), strict=True)
        return all(c.clear_over(f, record) for c, f in parts)

    def min_distance(self, x: torch.Tensor) -> float:
        """The smallest distance (m) between surface primitives of one world, any world."""
        parts = zip(self.contacts, self._split(x), strict=True)
        return min((c.min_distance(xw) for c, xw in parts), default=math.inf)

    @property
    def timings(self) -> dict[str, float]:
        """The contact timings and counters, summed over the worlds."""
        total: dict[str, float] = defaultdict(float)
        for c in self.contacts:
            for key, value in c.timings.items():
                total[key] += value
        return total
