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

from diffsim.contact.surface_contact import (
    MAX_STEP_FRACTION,
    MAX_TRANSLATION_FRACTION,
    clear_distance,
)


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

    def clear_over(
        self, frames: torch.Tensor, record: bool = True, most_measured: int | None = None
    ) -> bool:
        """Whether no world's contact would have acted over ``frames [S + 1, W * n, 3]``
        (see :meth:`SurfaceContact.clear_over`; ``most_measured`` per world).

        The common case is settled for all worlds at once: each world's pairs are at least
        its closest distance at its anchor, less twice its vertices' offset from the anchor
        (reductions over all worlds in one op); only the worlds that bound does not clear
        are checked one by one, pair by pair.
        """
        contacts, n = self.contacts, self.world_vertices
        first = self.contacts[0]
        f = frames.detach().to(torch.float64).view(len(frames), len(contacts), n, 3)
        with torch.no_grad():
            if any(c._anchor is None or c._anchor.shape != (n, 3) for c in contacts):
                for c, fw in zip(contacts, f[0], strict=True):
                    c._candidates_at(c.local(fw))
            anchors = torch.stack([c._anchor for c in contacts]).to(torch.float64)
            lo, hi = torch.aminmax(f - first.origin - anchors, dim=2)  # [S + 1, W, 3]
            moved = 0.5 * (hi - lo).norm(dim=2).amax(dim=0)  # [W]
            lo, hi = torch.aminmax(f[1:] - f[:-1], dim=2)
            step = 0.5 * (hi - lo).norm(dim=2).amax(dim=0)
            absolute = torch.maximum(lo.abs(), hi.abs()).norm(dim=2).amax(dim=0)
            needed = clear_distance(step, first.dhat, first.scene_size)
            closest = moved.new_tensor([c._closest_listed() for c in contacts])
            radius = moved.new_tensor([c._listed_radius() for c in contacts])
            clear = (
                (closest - 2.0 * moved > needed)
                & (radius - 2.0 * moved > needed)
                & (step <= MAX_STEP_FRACTION * first.scene_size)
                & (absolute <= MAX_TRANSLATION_FRACTION * first.scene_size)
            )
        for w in torch.nonzero(~clear).flatten().tolist():
            if not contacts[w].clear_over(frames[:, w * n : (w + 1) * n], record, most_measured):
                return False
        if record:
            for c, s in zip(contacts, step.tolist(), strict=True):
                c._last_step = s
        return True

    def apart(self, x: torch.Tensor, gap: float) -> bool:
        """Whether in every world all surface primitives are more than ``gap`` (m) apart."""
        parts = zip(self.contacts, self._split(x), strict=True)
        return all(c.apart(xw, gap) for c, xw in parts)

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
