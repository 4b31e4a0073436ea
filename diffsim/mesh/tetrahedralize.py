"""Closed triangle surface -> tetrahedra, with no dependency beyond numpy.

The built-in method is a body-fitted grid: the cells of a regular grid over the surface's
bounding box whose centres lie inside the surface (by the generalized winding number,
robust to small defects) are kept, each split into 6 tets, and boundary vertices are then
moved onto the surface wherever that inverts no tet (see ``TetMesh._project_surface``).
It gives well-shaped tets of one size; it does not resolve features smaller than a cell.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np


def voxel_tets(
    inside: Callable[[np.ndarray], np.ndarray], bounds: np.ndarray, resolution: int
) -> tuple[np.ndarray, np.ndarray]:
    """Tets of the grid cells whose centres satisfy ``inside``.

    Args:
        inside: maps points ``[k, 3]`` to a boolean mask ``[k]``.
        bounds: ``[[xmin, ymin, zmin], [xmax, ymax, zmax]]``.
        resolution: cells along the longest side.

    Returns:
        ``(vertices [n, 3], tets [m, 4])`` with unused grid vertices removed.
    """
    from diffsim.mesh.geometry import grid_tets

    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    lo, hi = np.asarray(bounds, dtype=np.float64)
    h = (hi - lo).max() / resolution
    res = np.maximum(1, np.ceil((hi - lo) / h - 1e-9).astype(np.int64))
    lo = (lo + hi) / 2 - res * h / 2
    cells = np.stack(np.meshgrid(*[np.arange(r) for r in res], indexing="ij"), -1).reshape(-1, 3)
    keep = inside(lo + (cells + 0.5) * h)
    if not keep.any():
        raise ValueError("no grid cell lies inside the surface; raise the resolution")
    tets = grid_tets(cells[keep], res)
    axes = [lo[i] + h * np.arange(res[i] + 1) for i in range(3)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    used, tets = np.unique(tets, return_inverse=True)
    return grid[used], tets.reshape(-1, 4)


def winding_number(vertices: np.ndarray, faces: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Generalized winding number of a triangle surface at ``points`` (1 inside, 0 outside).

    Van Oosterom and Strackee's solid-angle formula summed over the triangles. Corners are
    laid out ``[3, f]`` and points taken a few at a time, so the temporaries stay in cache
    (6 times faster than ``[k, f, 3]`` blocks of 256 points on a 6k-triangle surface).

    Args:
        vertices: ``[n, 3]`` surface vertices.
        faces: ``[f, 3]`` triangles.
        points: ``[k, 3]`` query points.

    Returns:
        ``[k]`` winding numbers.
    """
    tri = np.asarray(vertices, dtype=np.float64)[faces]
    corners = [np.ascontiguousarray(tri[:, i].T) for i in range(3)]  # 3 x [3, f]
    total = np.zeros(len(points))
    for start in range(0, len(points), 8):
        p = points[start : start + 8, :, None]  # [8, 3, 1]
        a, b, c = (corner[None] - p for corner in corners)  # [8, 3, f] each
        la, lb, lc = (np.sqrt((e * e).sum(axis=1)) for e in (a, b, c))
        det = (
            a[:, 0] * (b[:, 1] * c[:, 2] - b[:, 2] * c[:, 1])
            + a[:, 1] * (b[:, 2] * c[:, 0] - b[:, 0] * c[:, 2])
            + a[:, 2] * (b[:, 0] * c[:, 1] - b[:, 1] * c[:, 0])
        )
        den = (
            la * lb * lc
            + (a * b).sum(axis=1) * lc
            + (b * c).sum(axis=1) * la
            + (c * a).sum(axis=1) * lb
        )
        total[start : start + 8] = 2.0 * np.arctan2(det, den).sum(axis=1)
    return total / (4.0 * np.pi)


def closest_points_on_surface(
    vertices: np.ndarray, faces: np.ndarray, points: np.ndarray
) -> np.ndarray:
    """Closest point on a triangle surface to each of ``points``.

    Exact: a point's closest triangle lies within its distance to the nearest surface
    vertex plus the largest triangle radius of its centre, so only the triangles whose
    centres a k-d tree finds in that ball are tested (16 times faster than testing all on
    a 6k-triangle surface, the same points).

    Args:
        vertices: ``[n, 3]`` surface vertices.
        faces: ``[f, 3]`` triangles.
        points: ``[k, 3]`` query points.

    Returns:
        ``[k, 3]`` closest surface points.
    """
    from scipy.spatial import cKDTree  # lazily: scipy is heavy to import

    tri = np.asarray(vertices, dtype=np.float64)[faces]
    centres = tri.mean(axis=1)
    reach = np.linalg.norm(tri - centres[:, None], axis=2).max() + 1e-12
    to_vertex, _ = cKDTree(tri.reshape(-1, 3)).query(points)
    candidates = cKDTree(centres).query_ball_point(points, to_vertex * (1 + 1e-9) + reach)
    out = np.empty_like(points, dtype=np.float64)
    for i, (p, near) in enumerate(zip(points, candidates, strict=True)):
        t = tri[np.asarray(near, dtype=np.int64)]
        q = _closest_on_triangles(p[None], t[:, 0], t[:, 1], t[:, 2])
        out[i] = q[np.argmin(np.linalg.norm(q - p, axis=1))]
    return out


def load_surface(path: str | Path):
    """Reads a triangle surface file with trimesh (.stl, .obj, .ply, .off, ...).

    Args:
        path: the surface file.

    Returns:
        A ``trimesh.Trimesh`` (the scene's meshes concatenated).

    Raises:
        FileNotFoundError: no such file.
        ValueError: trimesh cannot read it, or it holds no triangles.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"surface file not found: {path}")
    if path.suffix.lower() in (".msh", ".npz", ".vtu", ".vtk", ".mesh", ".node", ".ele"):
        raise ValueError(f"{path} is a tet mesh file: load it with TetMesh.load({str(path)!r})")
    import trimesh  # lazily: only surface input needs it

    try:
        surface = trimesh.load(path, force="mesh")
    except Exception as exc:  # noqa: BLE001 - trimesh raises many types; re-raised clearly
        raise ValueError(f"{path}: trimesh could not read it as a surface ({exc})") from exc
    if len(getattr(surface, "faces", ())) == 0:
        raise ValueError(f"{path}: the file holds no triangles")
    return surface


def tetrahedralize_surface(surface, resolution: int):
    """Grid tets inside a closed surface and the projection onto that surface.

    Args:
        surface: an object with ``vertices [n, 3]`` and triangle ``faces [f, 3]`` (a
            ``trimesh.Trimesh``).
        resolution: grid cells along the longest side of the bounding box.

    Returns:
        ``(vertices, tets, project)`` where ``project(points)`` gives closest surface points.

    Raises:
        TypeError: not a surface.
        ValueError: the surface is not closed.
    """
    from diffsim.mesh.meshers import surface_arrays

    vertices, faces = surface_arrays(surface)
    bounds = np.stack([vertices.min(axis=0), vertices.max(axis=0)])

    def inside(points: np.ndarray) -> np.ndarray:
        return np.abs(winding_number(vertices, faces, points)) > 0.5

    tet_vertices, tets = voxel_tets(inside, bounds, resolution)
    return tet_vertices, tets, lambda p: closest_points_on_surface(vertices, faces, p)


def _closest_on_triangles(p, a, b, c):
    """Closest points on triangles (a, b, c) to p, broadcasting over leading dims.

    Ericson, Real-Time Collision Detection, 5.1.5, written branch-free with masks.
    """
    ab, ac, ap = b - a, c - a, p - a
    d1 = (ab * ap).sum(-1)
    d2 = (ac * ap).sum(-1)
    bp = p - b
    d3 = (ab * bp).sum(-1)
    d4 = (ac * bp).sum(-1)
    cp = p - c
    d5 = (ab * cp).sum(-1)
    d6 = (ac * cp).sum(-1)
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = 1.0 / (va + vb + vc)
        v = vb * denom
        w = vc * denom
        result = a + ab * v[..., None] + ac * w[..., None]  # inside the face
        t_ab = d1 / (d1 - d3)
        t_ac = d2 / (d2 - d6)
        t_bc = (d4 - d3) / ((d4 - d3) + (d5 - d6))
    region_bc = (va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0)
    result = np.where(region_bc[..., None], b + (c - b) * t_bc[..., None], result)
    region_ac = (vb <= 0) & (d2 >= 0) & (d6 <= 0)
    result = np.where(region_ac[..., None], a + ac * t_ac[..., None], result)
    region_ab = (vc <= 0) & (d1 >= 0) & (d3 <= 0)
    result = np.where(region_ab[..., None], a + ab * t_ab[..., None], result)
    result = np.where(((d6 >= 0) & (d5 <= d6))[..., None], c, result)
    result = np.where(((d3 >= 0) & (d4 <= d3))[..., None], b, result)
    result = np.where(((d1 <= 0) & (d2 <= 0))[..., None], a, result)
    return np.broadcast_to(result, np.broadcast_shapes(p.shape, a.shape)).copy()
