"""The tetrahedralizers behind ``TetMesh.from_surface(..., method=...)``.

- ``"voxel"`` (default, no dependency): the body-fitted grid of
  :mod:`diffsim.mesh.tetrahedralize`; well-shaped tets of one size, features below a cell
  are lost.
- ``"tetwild"``: fTetWild through the ``pytetwild`` package. It remeshes the surface inside
  a small envelope around it, so thin or skinny input triangles (scans) give no slivers.
  The slowest (a minute for a 6k-triangle bunny on two cores).
- ``"tetgen"``: TetGen through the ``tetgen`` package (Delaunay refinement). Fast, keeps the
  input triangles as they are, so a surface with skinny triangles gives slivers and a small
  stable step; use it on clean (e.g. CAD or remeshed) surfaces.

docs/time-steps.md compares them (time, tet count, smallest altitude, stable step). The
optional packages install with ``pip install diffsim[meshing]`` (pytetwild) and
``pip install diffsim[tetgen]`` (TetGen is AGPL-licensed); each is imported only when its
method is used.
"""

from __future__ import annotations

import importlib
import os
import tempfile

import numpy as np

METHODS = ("voxel", "tetwild", "tetgen")
# The install commands named by the error for a missing optional package.
MESHING_EXTRA = "pip install diffsim[meshing]"
INSTALL = {"tetgen": "pip install diffsim[tetgen]"}
# TetGen's quality bounds: radius-edge ratio and minimum dihedral angle (degrees), the
# values its documentation suggests for a good mesh that still finishes quickly.
TETGEN_MIN_RATIO = 1.5
TETGEN_MIN_DIHEDRAL = 10.0
# fTetWild's envelope: the output surface stays within this fraction of the bounding-box
# diagonal of the input surface (its default).
TETWILD_EPSILON = 1e-3


def check_method(method: str) -> None:
    """Raises ValueError unless ``method`` is one of :data:`METHODS`."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def surface_arrays(surface) -> tuple[np.ndarray, np.ndarray]:
    """``(vertices [n, 3] float64, faces [f, 3] int64)`` of a closed triangle surface.

    Args:
        surface: a ``trimesh.Trimesh`` or any object with ``vertices`` and ``faces`` (and,
            optionally, ``is_watertight``).

    Raises:
        TypeError: not a surface.
        ValueError: wrong shapes, or not closed.
    """
    if not (hasattr(surface, "vertices") and hasattr(surface, "faces")):
        raise TypeError(
            "surface must be a trimesh.Trimesh (or an object with vertices and faces) or the "
            f"path of a surface file, got {type(surface).__name__}"
        )
    vertices = np.asarray(surface.vertices, dtype=np.float64)
    faces = np.asarray(surface.faces, dtype=np.int64)
    if vertices.ndim != 2 or vertices.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError("surface must have vertices [n, 3] and triangle faces [f, 3]")
    if not getattr(surface, "is_watertight", True):
        raise ValueError(
            "the surface is not closed (watertight); repair it first, e.g. with "
            "trimesh.repair.fill_holes"
        )
    return vertices, faces


def target_edge(vertices: np.ndarray, resolution: int) -> float:
    """The target tet edge length (m): the longest bounding-box side / ``resolution``."""
    if not (isinstance(resolution, (int, np.integer)) and resolution >= 1):
        raise ValueError(f"resolution must be an integer >= 1, got {resolution!r}")
    return float(np.ptp(vertices, axis=0).max()) / int(resolution)


def import_optional(module: str, method: str):
    """Imports an optional meshing package, or raises an ImportError naming the fix.

    Args:
        module: the package's import name (``"tetgen"``, ``"pytetwild"``, ``"meshio"``).
        method: what needs it, for the message (e.g. ``'from_surface(method="tetgen")'``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = getattr(exc, "name", None)
        if missing and missing != module:  # the package is there but one of its imports is not
            raise ImportError(
                f"{method} needs {module}, which could not import {missing!r} ({exc}); "
                f"pip install {missing}"
            ) from exc
        raise ImportError(
            f"{method} needs the optional package {module!r}: "
            f"{INSTALL.get(module, MESHING_EXTRA)} (or pip install {module})"
        ) from exc


def tetgen_tets(vertices: np.ndarray, faces: np.ndarray, resolution: int):
    """Tets of a closed surface by TetGen (quality Delaunay refinement).

    Args:
        vertices: ``[n, 3]`` surface vertices in m.
        faces: ``[f, 3]`` triangles.
        resolution: tets are at most the volume of a regular tet whose edge is the longest
            bounding-box side / ``resolution``; the surface's own triangles (kept) may
            make them smaller.

    Returns:
        ``(vertices [k, 3], tets [m, 4])``.
    """
    tetgen = import_optional("tetgen", 'from_surface(method="tetgen")')
    edge = target_edge(vertices, resolution)
    generator = tetgen.TetGen(vertices, np.ascontiguousarray(faces, dtype=np.int32))
    try:
        out = generator.tetrahedralize(
            quality=True,
            minratio=TETGEN_MIN_RATIO,
            mindihedral=TETGEN_MIN_DIHEDRAL,
            fixedvolume=True,
            maxvolume=edge**3 / (6.0 * np.sqrt(2.0)),
        )
    except RuntimeError as exc:  # self-intersecting or otherwise invalid input
        raise ValueError(f"TetGen failed on the surface ({exc}); try method='tetwild'") from exc
    return np.asarray(out[0], dtype=np.float64), np.asarray(out[1], dtype=np.int64)


def tetwild_tets(vertices: np.ndarray, faces: np.ndarray, resolution: int, threads: int = 0):
    """Tets of a closed surface by fTetWild (envelope-bounded remeshing, no slivers).

    Args:
        vertices: ``[n, 3]`` surface vertices in m.
        faces: ``[f, 3]`` triangles.
        resolution: the target edge length is the longest bounding-box side /
            ``resolution`` (features may refine it locally).
        threads: threads fTetWild uses (0: all cores).

    Returns:
        ``(vertices [k, 3], tets [m, 4])``.
    """
    pytetwild = import_optional("pytetwild", 'from_surface(method="tetwild")')
    edge = target_edge(vertices, resolution)
    # fTetWild writes a scratch file (__tracked_surface.stl) into the working directory:
    # run it in a temporary one so that nothing is left beside the user's files.
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)
        try:
            v, t = pytetwild.tetrahedralize(
                vertices,
                np.ascontiguousarray(faces, dtype=np.int32),
                edge_length_abs=edge,
                epsilon=TETWILD_EPSILON,
                num_threads=threads,
            )
        finally:
            os.chdir(here)
    if len(t) == 0:
        raise ValueError("fTetWild produced no tets; is the surface closed?")
    return np.asarray(v, dtype=np.float64), np.asarray(t, dtype=np.int64)
