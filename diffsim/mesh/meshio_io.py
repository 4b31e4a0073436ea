"""Tet meshes in the formats meshio reads and writes: VTK (.vtu, .vtk), Medit (.mesh) and
TetGen (.node/.ele). meshio is an optional package (``pip install diffsim[meshing]``),
imported only here and only when such a file is read or written.

Body ids travel as the point field ``body_ids`` (VTK) or as the tets' region references
(``medit:ref``, ``tetgen:ref``: body b is reference b + 1), as :func:`read_meshio` reads
them back.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np

from diffsim.mesh.geometry import vertex_bodies
from diffsim.mesh.meshers import import_optional

# File suffixes read and written through meshio.
MESHIO_SUFFIXES = (".vtu", ".vtk", ".mesh", ".node", ".ele")
# Per-tet region references that become body ids, by format (meshio's cell-data names).
_REGION_KEYS = ("body_ids", "medit:ref", "tetgen:ref", "gmsh:physical", "CellEntityIds")


def meshio_module(what: str):
    """The meshio module, or an ImportError naming ``pip install diffsim[meshing]``."""
    return import_optional("meshio", what)


def read_meshio(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Reads the vertices and 4-node tets of a mesh file meshio understands.

    Args:
        path: a ``.vtu``, ``.vtk``, ``.mesh`` (Medit), ``.node`` or ``.ele`` (TetGen) file.

    Returns:
        ``(vertices [n, 3] float64, tets [m, 4] int64, body_ids [n] int64 or None)``; vertices
        no tet uses (e.g. of surface cells) are removed.

    Raises:
        ImportError: meshio is not installed (the message names the fix).
        ValueError: meshio cannot read the file, or it holds no tetrahedra.
    """
    path = Path(path)
    meshio = meshio_module(f"reading {path.suffix} files (TetMesh.load)")
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            mesh = meshio.read(path)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - meshio raises many types and exits
        reason = " ".join(said.getvalue().split()) or str(exc) or type(exc).__name__
        raise ValueError(f"{path}: meshio could not read it ({reason})") from None
    blocks = [i for i, block in enumerate(mesh.cells) if block.type == "tetra"]
    if not blocks:
        kinds = sorted({block.type for block in mesh.cells}) or ["none"]
        raise ValueError(
            f"{path}: the file holds no 4-node tetrahedra (cells: {', '.join(kinds)}); if it is "
            "a surface, tetrahedralize it with TetMesh.from_surface"
        )
    tets = np.concatenate([np.asarray(mesh.cells[i].data, dtype=np.int64) for i in blocks])
    vertices = np.asarray(mesh.points, dtype=np.float64)
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"{path}: expected 3-D points, got shape {list(vertices.shape)}")
    body_ids = None
    if "body_ids" in mesh.point_data:
        body_ids = np.asarray(mesh.point_data["body_ids"]).astype(np.int64).reshape(-1)
    else:
        for key in _REGION_KEYS:
            if key in mesh.cell_data:
                keys = np.concatenate([np.asarray(mesh.cell_data[key][i]) for i in blocks])
                body_ids = vertex_bodies(tets, keys.astype(np.int64).reshape(-1), len(vertices))
                break
    used = np.unique(tets)
    if len(used) < len(vertices):  # drop the vertices of other cells (surface triangles)
        remap = np.full(len(vertices), -1, dtype=np.int64)
        remap[used] = np.arange(len(used))
        vertices, tets = vertices[used], remap[tets]
        body_ids = None if body_ids is None else body_ids[used]
    return vertices, tets, body_ids


def write_meshio(
    path: str | Path,
    vertices: np.ndarray,
    tets: np.ndarray,
    body_ids: np.ndarray | None = None,
    point_data: dict[str, np.ndarray] | None = None,
    cell_data: dict[str, np.ndarray] | None = None,
) -> None:
    """Writes a tet mesh with meshio (the format from the suffix).

    Args:
        path: a ``.vtu``, ``.vtk``, ``.mesh``, ``.node`` or ``.ele`` file.
        vertices: ``[n, 3]`` positions in m.
        tets: ``[m, 4]`` vertex indices.
        body_ids: ``[n]`` body of each vertex, or None (one body).
        point_data: extra vertex fields (``[n]`` or ``[n, 3]``), VTK formats only.
        cell_data: extra tet fields (``[m]``), VTK formats only.

    Raises:
        ImportError: meshio is not installed (the message names the fix).
    """
    path = Path(path)
    meshio = meshio_module(f"writing {path.suffix} files")
    tets = np.asarray(tets, dtype=np.int64)
    points = dict(point_data or {})
    cells = {k: [np.asarray(v)] for k, v in (cell_data or {}).items()}
    suffix = path.suffix.lower()
    if body_ids is not None:
        body_ids = np.asarray(body_ids, dtype=np.int64)
        if suffix in (".vtu", ".vtk"):
            points["body_ids"] = body_ids
        else:
            key = "medit:ref" if suffix == ".mesh" else "tetgen:ref"
            cells[key] = [body_ids[tets[:, 0]] + 1]
    elif suffix == ".mesh":
        cells["medit:ref"] = [np.zeros(len(tets), dtype=np.int64)]
    mesh = meshio.Mesh(
        np.asarray(vertices, dtype=np.float64),
        [("tetra", tets)],
        point_data=points,
        cell_data=cells,
    )
    if suffix in (".node", ".ele"):
        meshio.write(path, mesh, file_format="tetgen")
    elif suffix == ".mesh":
        meshio.write(path, mesh, file_format="medit")
    else:
        meshio.write(path, mesh)
