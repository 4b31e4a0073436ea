"""The Hessian's sparsity: the free-vertex structure, distance-2 colouring, and a cache."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from diffsim.simulator import Simulator


# ----------------------------------------------------------------------------- structure
class _Structure:
    """Sparsity of the free-DOF Hessian and the colourings used to recover it from HVPs."""

    def __init__(self, model) -> None:
        import scipy.sparse as sp

        n = model.n_vertices
        free = ~model.fixed_mask.cpu().numpy()
        self.free_indices = np.flatnonzero(free)
        nf = len(self.free_indices)
        local = np.full(n, -1, dtype=np.int64)
        local[self.free_indices] = np.arange(nf)
        tets = model.tets.cpu().numpy()
        rows = np.repeat(tets, 4, axis=1).reshape(-1)
        cols = np.tile(tets, (1, 4)).reshape(-1)
        keep = free[rows] & free[cols]
        a = sp.coo_matrix(
            (np.ones(int(keep.sum()), dtype=np.int8), (local[rows[keep]], local[cols[keep]])),
            shape=(nf, nf),
        ).tocsr()
        a = (a + sp.identity(nf, dtype=np.int8, format="csr")).astype(bool).tocsr()
        self.adjacency = a
        self.n_free = nf
        self.local = local
        self._d1: np.ndarray | None = None
        self._d2: np.ndarray | None = None
        self._contact: tuple[Any, Any, np.ndarray] | None = None

    @property
    def colors_distance1(self) -> np.ndarray:
        """Colours with no two adjacent free vertices alike (enough for the block diagonal)."""
        if self._d1 is None:
            self._d1 = _greedy_coloring(self.adjacency)
        return self._d1

    @property
    def colors_distance2(self) -> np.ndarray:
        """Colours with no two free vertices alike within two edges (enough for all of K)."""
        if self._d2 is None:
            self._d2 = _distance2_coloring(self.adjacency)
        return self._d2

    def with_contact(self, candidates) -> tuple[Any, np.ndarray]:
        """Pattern and distance-2 colours with the couplings of surface-contact candidates.

        Every candidate pair (point-triangle or edge-edge, four vertices) couples its four
        vertices; the result is cached until the candidate set changes.
        """
        import scipy.sparse as sp

        if self._contact is not None and self._contact[0] is candidates:
            return self._contact[1], self._contact[2]
        groups = torch.cat([candidates.point_triangle, candidates.edge_edge]).cpu().numpy()
        groups = self.local[groups.reshape(-1, 4)]
        rows = np.repeat(groups, 4, axis=1).reshape(-1)
        cols = np.tile(groups, (1, 4)).reshape(-1)
        keep = (rows >= 0) & (cols >= 0)
        nf = self.n_free
        extra = sp.coo_matrix(
            (np.ones(int(keep.sum()), dtype=np.int8), (rows[keep], cols[keep])), shape=(nf, nf)
        )
        pattern = (self.adjacency + extra.tocsr()).astype(bool).tocsr()
        colors = _distance2_coloring(pattern)
        self._contact = (candidates, pattern, colors)
        return pattern, colors


def _distance2_coloring(pattern) -> np.ndarray:
    a = pattern.astype(np.int32)
    return _greedy_coloring((a @ a).astype(bool).tocsr())


def _greedy_coloring(graph) -> np.ndarray:
    """Greedy colouring of a symmetric CSR pattern (the diagonal is ignored)."""
    n = graph.shape[0]
    colors = np.full(n, -1, dtype=np.int64)
    indptr, indices = graph.indptr, graph.indices
    for v in range(n):
        used = colors[indices[indptr[v] : indptr[v + 1]]]
        used = used[used >= 0]
        if used.size == 0:
            colors[v] = 0
            continue
        mark = np.zeros(int(used.max()) + 2, dtype=bool)
        mark[used] = True
        colors[v] = int(np.argmin(mark))
    return colors


_STRUCTURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _structure(sim: Simulator) -> _Structure:
    """The sparsity and colourings of a simulator's scene, computed once per simulator."""
    cached = _STRUCTURES.get(sim)
    if cached is None:
        cached = _STRUCTURES[sim] = _Structure(sim.model)
    return cached
