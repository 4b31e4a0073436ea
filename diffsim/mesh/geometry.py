"""Tet geometry on arrays: edge matrices, signed volumes, altitudes, grid tets, body ids.

Numpy (and torch where noted); the mesh layer's shared formulas, used by TetMesh, the
tetrahedralizer and the stable-step estimates.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

# The four faces opposite corners 0..3 of a tet.
_OPPOSITE_FACES = ((1, 2, 3), (0, 2, 3), (0, 1, 3), (0, 1, 2))


def mesh_arrays(vertices, tets) -> tuple[np.ndarray, np.ndarray]:
    """float64 vertices ``[n, 3]`` and int64 tets ``[m, 4]`` from arrays or tensors."""
    if isinstance(vertices, torch.Tensor):
        vertices = vertices.detach().cpu().numpy()
    v = np.asarray(vertices, dtype=np.float64)
    t = tets.detach().cpu().numpy() if isinstance(tets, torch.Tensor) else np.asarray(tets)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"vertices must have shape [n, 3], got {list(v.shape)}")
    if t.ndim != 2 or t.shape[1] != 4 or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"tets must be integer indices of shape [m, 4], got {list(t.shape)}")
    return v, t.astype(np.int64)


def edge_matrices(vertices, tets):
    """Edge matrices ``[x1-x0, x2-x0, x3-x0]`` as columns, ``[m, 3, 3]`` (numpy or torch)."""
    x = vertices[tets]
    d = x[:, 1:] - x[:, :1]
    return d.transpose(1, 2) if isinstance(d, torch.Tensor) else d.transpose(0, 2, 1)


def signed_volumes(vertices: np.ndarray, tets: np.ndarray) -> np.ndarray:
    """Signed volumes ``det(Dm) / 6``, ``[m]``; positive for positively oriented tets."""
    return np.linalg.det(edge_matrices(vertices, tets)) / 6.0


def grid_tets(cells: np.ndarray, res: np.ndarray) -> np.ndarray:
    """Six tets per grid cell (Freudenthal split along the main diagonal; conforming)."""
    ny, nz = res[1] + 1, res[2] + 1

    def vid(ijk):
        return (ijk[..., 0] * ny + ijk[..., 1]) * nz + ijk[..., 2]

    eye = np.eye(3, dtype=np.int64)
    tets = []
    for perm in itertools.permutations(range(3)):
        c0 = cells
        c1 = c0 + eye[perm[0]]
        c2 = c1 + eye[perm[1]]
        c3 = c2 + eye[perm[2]]
        tets.append(np.stack([vid(c0), vid(c1), vid(c2), vid(c3)], axis=1))
    return np.concatenate(tets)


def tet_volumes_and_areas(vertices, tets) -> tuple[np.ndarray, np.ndarray]:
    """Unsigned volumes and face areas of tets.

    Args:
        vertices: ``[n, 3]`` positions in m (array or tensor).
        tets: ``[m, 4]`` vertex indices.

    Returns:
        ``(volumes [m] in m^3, areas [m, 4] in m^2)``; ``areas[:, i]`` is the face opposite
        corner i.
    """
    v, t = mesh_arrays(vertices, tets)
    x = v[t]
    e1, e2, e3 = x[:, 1] - x[:, 0], x[:, 2] - x[:, 0], x[:, 3] - x[:, 0]
    volumes = np.abs(np.einsum("mi,mi->m", e1, np.cross(e2, e3))) / 6.0
    areas = np.empty((len(t), 4))
    for i, (a, b, c) in enumerate(_OPPOSITE_FACES):
        areas[:, i] = 0.5 * np.linalg.norm(np.cross(x[:, b] - x[:, a], x[:, c] - x[:, a]), axis=1)
    return volumes, areas


def tet_altitudes(vertices, tets) -> np.ndarray:
    """Smallest altitude of each tet: ``min_i 3 V / A_i`` over its four faces.

    Args:
        vertices: ``[n, 3]`` positions in m (array or tensor; detached).
        tets: ``[m, 4]`` vertex indices.

    Returns:
        ``[m]`` altitudes in m (0 for a degenerate tet).
    """
    volumes, areas = tet_volumes_and_areas(vertices, tets)
    with np.errstate(divide="ignore", invalid="ignore"):
        alt = 3.0 * volumes[:, None] / areas
    return np.nan_to_num(alt, nan=0.0, posinf=0.0).min(axis=1)


def vertex_bodies(tets: np.ndarray, keys: np.ndarray, n: int) -> np.ndarray | None:
    """Vertex body ids from per-tet body keys, or None (one body, or bodies sharing vertices).

    Args:
        tets: ``[m, 4]`` vertex indices.
        keys: ``[m]`` any integer label of each tet's body (a region or volume tag).
        n: the number of vertices.

    Returns:
        ``[n]`` bodies numbered 0, 1, ... in the order of the keys, or None where there is
        one key or a vertex is used by tets of two keys.
    """
    unique, body = np.unique(keys, return_inverse=True)
    if len(unique) < 2:
        return None
    body = body.reshape(-1)
    lo = np.full(n, len(unique), dtype=np.int64)
    hi = np.full(n, -1, dtype=np.int64)
    np.minimum.at(lo, tets, body[:, None])
    np.maximum.at(hi, tets, body[:, None])
    used = hi >= 0
    if np.any(lo[used] != hi[used]):
        return None
    return np.where(used, lo, 0)
