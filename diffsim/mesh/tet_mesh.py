"""Tetrahedral meshes: validation, rest-shape data, surfaces, builders and file I/O."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffsim.mesh import gmsh_io
from diffsim.mesh.geometry import edge_matrices, grid_tets, signed_volumes, tet_altitudes

# Tets whose volume is below this fraction of the mean tet volume count as degenerate.
DEGENERATE_VOLUME_FRACTION = 1e-9
# Moving boundary vertices onto a curved surface may shrink a tet to at most this fraction
# of its grid volume; smaller tets would force a much smaller explicit time step.
MIN_PROJECTED_VOLUME_FRACTION = 0.25
# A tet whose longest edge exceeds this many times its smallest altitude counts as a sliver
# in TetMesh.quality() (a regular tet has sqrt(3/2) = 1.22, a box cell's tets sqrt(6) = 2.45).
SLIVER_ASPECT_RATIO = 10.0
# Triangle-surface file formats: TetMesh.load tetrahedralizes them (TetMesh.from_surface).
SURFACE_SUFFIXES = (".stl", ".obj", ".ply", ".off", ".glb", ".gltf")


class TetMesh:
    """A validated tetrahedral mesh, possibly of several bodies.

    Vertices are float64 and tets int64 numpy arrays; the mesh is static data and never
    holds autograd graphs. Tets are positively oriented: ``det([x1-x0, x2-x0, x3-x0]) > 0``.

    Args:
        vertices: ``[n, 3]`` rest positions in metres (array or tensor, finite floats).
        tets: ``[m, 4]`` vertex indices (integers in ``[0, n)``).
        fix_orientation: if True, inverted tets are re-oriented by swapping two corners;
            if False (default), an inverted tet is an error.
        allow_unused_vertices: if False (default), vertices no tet uses are an error.
        body_ids: ``[n]`` body index of each vertex (set by :meth:`merge`); default all 0.

    Raises:
        ValueError: wrong shapes or dtypes, non-finite coordinates, indices out of range,
            repeated corners, unused vertices, degenerate or inverted tets. The message names
            the offending indices and the fix.
    """

    def __init__(
        self,
        vertices,
        tets,
        *,
        fix_orientation: bool = False,
        allow_unused_vertices: bool = False,
        body_ids=None,
    ) -> None:
        vertices = _as_numpy(vertices, "vertices")
        tets = _as_numpy(tets, "tets")
        if vertices.ndim != 2 or vertices.shape[1] != 3:
            raise ValueError(f"vertices must have shape [n, 3], got {list(vertices.shape)}")
        if tets.ndim != 2 or tets.shape[1] != 4:
            raise ValueError(f"tets must have shape [m, 4], got {list(tets.shape)}")
        if not np.issubdtype(vertices.dtype, np.floating):
            raise ValueError(f"vertices must be floating point, got dtype {vertices.dtype}")
        if not np.issubdtype(tets.dtype, np.integer):
            raise ValueError(
                f"tets must hold integer indices, got dtype {tets.dtype}; "
                "convert with tets.astype(np.int64)"
            )
        if len(tets) == 0:
            raise ValueError("the mesh has no tets")
        bad = np.flatnonzero(~np.isfinite(vertices).all(axis=1))
        if len(bad):
            raise ValueError(f"vertices {_first(bad)} have non-finite (NaN or inf) coordinates")
        self.vertices = vertices.astype(np.float64)
        tets = tets.astype(np.int64)
        n = len(self.vertices)
        bad = np.flatnonzero(((tets < 0) | (tets >= n)).any(axis=1))
        if len(bad):
            raise ValueError(
                f"tets {_first(bad)} refer to vertex indices outside [0, {n}) "
                f"(e.g. tet {bad[0]} = {tets[bad[0]].tolist()}); indices are 0-based"
            )
        sorted_corners = np.sort(tets, axis=1)
        bad = np.flatnonzero((sorted_corners[:, 1:] == sorted_corners[:, :-1]).any(axis=1))
        if len(bad):
            raise ValueError(f"tets {_first(bad)} repeat a vertex; each tet needs 4 distinct ones")
        if not allow_unused_vertices:
            unused = np.setdiff1d(np.arange(n), tets.ravel())
            if len(unused):
                raise ValueError(
                    f"vertices {_first(unused)} are used by no tet; remove them "
                    "(TetMesh.compact) or pass allow_unused_vertices=True"
                )
        volumes = signed_volumes(self.vertices, tets)
        scale = np.abs(volumes).mean()
        bad = np.flatnonzero(np.abs(volumes) <= DEGENERATE_VOLUME_FRACTION * scale)
        if len(bad):
            raise ValueError(
                f"tets {_first(bad)} are degenerate (near-zero volume, e.g. {volumes[bad[0]]:.3g} "
                f"m^3); remove them or remesh"
            )
        inverted = np.flatnonzero(volumes < 0)
        if len(inverted):
            if not fix_orientation:
                raise ValueError(
                    f"tets {_first(inverted)} are inverted (negative volume); pass "
                    "fix_orientation=True to re-orient them by swapping their last two corners"
                )
            tets[inverted] = tets[inverted][:, [0, 1, 3, 2]]
        self.tets = tets
        if body_ids is None:
            body_ids = np.zeros(n, dtype=np.int64)
        body_ids = np.asarray(body_ids, dtype=np.int64)
        if body_ids.shape != (n,):
            raise ValueError(f"body_ids must have shape [{n}], got {list(body_ids.shape)}")
        self.body_ids = body_ids
        self._surface: tuple[np.ndarray, np.ndarray] | None = None

    # ----------------------------------------------------------------- properties
    @property
    def n_vertices(self) -> int:
        return len(self.vertices)

    @property
    def n_tets(self) -> int:
        return len(self.tets)

    @property
    def n_bodies(self) -> int:
        return int(self.body_ids.max()) + 1

    @property
    def rest_volumes(self) -> np.ndarray:
        """Rest volume of each tet, ``[m]`` in m^3."""
        return signed_volumes(self.vertices, self.tets)

    @property
    def dm_inv(self) -> np.ndarray:
        """Inverse rest edge matrices ``Dm^-1``, ``[m, 3, 3]``; F = Ds Dm^-1."""
        return np.linalg.inv(edge_matrices(self.vertices, self.tets))

    @property
    def surface_faces(self) -> np.ndarray:
        """Boundary triangles ``[f, 3]``, ordered so normals point outward."""
        return self._boundary()[0]

    @property
    def surface_edges(self) -> np.ndarray:
        """Unique edges of the boundary triangles ``[e, 2]`` (sorted pairs)."""
        return self._boundary()[1]

    @property
    def surface_vertices(self) -> np.ndarray:
        """Indices of the vertices on the boundary surface."""
        return np.unique(self.surface_faces)

    @property
    def bounds(self) -> np.ndarray:
        """Axis-aligned bounding box ``[[xmin, ymin, zmin], [xmax, ymax, zmax]]``."""
        return np.stack([self.vertices.min(axis=0), self.vertices.max(axis=0)])

    def lumped_masses(self, density: float | np.ndarray) -> np.ndarray:
        """Lumped vertex masses ``[n]`` in kg: density * volume / 4 to each corner."""
        share = np.broadcast_to(np.asarray(density, dtype=np.float64), (self.n_tets,))
        share = share * self.rest_volumes / 4.0
        masses = np.zeros(self.n_vertices)
        np.add.at(masses, self.tets, share[:, None])
        return masses

    def _boundary(self) -> tuple[np.ndarray, np.ndarray]:
        if self._surface is None:
            t = self.tets
            # Each face listed with the orientation that points out of its tet.
            faces = np.concatenate(
                [t[:, [0, 2, 1]], t[:, [0, 1, 3]], t[:, [0, 3, 2]], t[:, [1, 2, 3]]]
            )
            key = np.sort(faces, axis=1)
            _, inverse, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
            boundary = faces[counts[inverse.ravel()] == 1]
            edges = np.sort(boundary[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
            self._surface = (boundary, np.unique(edges, axis=0))
        return self._surface

    # ----------------------------------------------------------------- transforms
    def transformed(
        self,
        *,
        scale: float | Sequence[float] = 1.0,
        rotation: np.ndarray | None = None,
        translation: Sequence[float] = (0.0, 0.0, 0.0),
    ) -> TetMesh:
        """A copy with vertices mapped as ``R @ (scale * x) + translation``.

        A rotation must be proper (det +1); a negative scale along an odd number of axes
        mirrors the mesh and the tets are re-oriented.
        """
        v = self.vertices * np.asarray(scale, dtype=np.float64)
        if rotation is not None:
            rotation = np.asarray(rotation, dtype=np.float64)
            if rotation.shape != (3, 3) or not np.allclose(rotation @ rotation.T, np.eye(3)):
                raise ValueError("rotation must be a 3x3 orthogonal matrix")
            v = v @ rotation.T
        v = v + np.asarray(translation, dtype=np.float64)
        if np.ndim(scale) == 0 and float(scale) > 0 and np.isfinite(v).all():
            # A similarity: every check of the constructor (indices, orientation, the
            # degeneracy test relative to the mean volume) gives the same answer, so
            # skip them (they cost more than the transform on big meshes).
            out = copy.copy(self)
            out.vertices = v
            return out
        return TetMesh(v, self.tets, fix_orientation=True, body_ids=self.body_ids)

    def centered(self) -> TetMesh:
        """A copy translated so the bounding-box centre is at the origin."""
        return self.transformed(translation=-self.bounds.mean(axis=0))

    def scaled_to(self, height: float, axis: int = 1) -> TetMesh:
        """A copy scaled uniformly so its extent along ``axis`` is ``height`` metres."""
        extent = np.ptp(self.vertices[:, axis])
        return self.transformed(scale=height / extent)

    def placed_on(self, ground: float = 0.0, gap: float = 0.0, axis: int = 1) -> TetMesh:
        """A copy translated along ``axis`` so its lowest vertex is ``gap`` above ``ground``."""
        shift = np.zeros(3)
        shift[axis] = ground + gap - self.vertices[:, axis].min()
        return self.transformed(translation=shift)

    # ----------------------------------------------------------------- builders
    @classmethod
    def box(
        cls,
        size: Sequence[float] = (1.0, 1.0, 1.0),
        resolution: int | Sequence[int] = (4, 4, 4),
        origin: Sequence[float] = (0.0, 0.0, 0.0),
    ) -> TetMesh:
        """An axis-aligned box of hexahedral cells, each split into 6 tets.

        Args:
            size: edge lengths (x, y, z) in metres.
            resolution: cells along each axis (an int for all three).
            origin: the box's minimum corner.
        """
        res = np.broadcast_to(np.asarray(resolution, dtype=np.int64), (3,))
        size_arr = np.asarray(size, dtype=np.float64)
        if np.any(res < 1):
            raise ValueError(f"resolution must be >= 1 along each axis, got {res.tolist()}")
        if size_arr.shape != (3,) or np.any(~(size_arr > 0)):
            raise ValueError(f"size must be three positive lengths, got {list(size)}")
        axes = [np.linspace(0.0, s, r + 1) for s, r in zip(size_arr, res, strict=True)]
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
        cells = np.stack(np.meshgrid(*[np.arange(r) for r in res], indexing="ij"), -1)
        tets = grid_tets(cells.reshape(-1, 3), res)
        return cls(grid + np.asarray(origin, dtype=np.float64), tets, fix_orientation=True)

    @classmethod
    def beam(
        cls,
        length: float = 1.0,
        width: float = 0.1,
        height: float = 0.1,
        cells_per_width: int = 2,
        origin: Sequence[float] = (0.0, 0.0, 0.0),
    ) -> TetMesh:
        """A beam along x with a ``width`` (z) by ``height`` (y) cross-section."""
        h = min(width, height) / cells_per_width
        res = [max(1, round(length / h)), max(1, round(height / h)), max(1, round(width / h))]
        return cls.box(size=(length, height, width), resolution=res, origin=origin)

    @classmethod
    def sphere(
        cls,
        radius: float = 0.5,
        resolution: int = 8,
        center: Sequence[float] = (0.0, 0.0, 0.0),
    ) -> TetMesh:
        """A ball: grid cells inside the sphere, boundary vertices projected onto it.

        Args:
            radius: in metres.
            resolution: cells across the diameter.
            center: the ball's centre.
        """
        from diffsim.mesh.tetrahedralize import voxel_tets

        def inside(points: np.ndarray) -> np.ndarray:
            return np.linalg.norm(points, axis=1) < radius

        vertices, tets = voxel_tets(inside, np.array([[-radius] * 3, [radius] * 3]), resolution)
        mesh = cls(vertices, tets, fix_orientation=True)
        mesh = mesh._project_surface(lambda p: p * (radius / np.linalg.norm(p, axis=1))[:, None])
        return mesh.transformed(translation=center)

    @classmethod
    def from_surface(cls, surface, resolution: int = 16, method: str = "voxel") -> TetMesh:
        """Tetrahedralizes a closed triangle surface.

        Methods (:mod:`diffsim.mesh.meshers`; compared in docs/time-steps.md):

        - ``"voxel"`` (default, no dependency): the grid cells whose centres lie inside the
          surface (generalized winding number), boundary vertices moved onto the surface
          where that inverts no tet (:mod:`diffsim.mesh.tetrahedralize`). Well-shaped tets
          of one size; features below a cell are lost.
        - ``"tetwild"``: fTetWild (package ``pytetwild``): remeshes the surface within a
          small envelope, so skinny input triangles give no slivers; the slowest.
        - ``"tetgen"``: TetGen (package ``tetgen``): fast, keeps the input triangles, so
          skinny ones become slivers; for clean surfaces.

        The optional packages install with ``pip install diffsim[meshing]`` (pytetwild) and
        ``pip install diffsim[tetgen]``.

        Args:
            surface: a closed ``trimesh.Trimesh`` (or any object with ``vertices`` and
                ``faces``), or the path of a surface file trimesh reads (.stl, .obj, .ply,
                .off, ...).
            resolution: grid cells (voxel) or target tet edges (tetwild, tetgen) along the
                longest side of the bounding box.
            method: ``"voxel"``, ``"tetwild"`` or ``"tetgen"``.

        Raises:
            FileNotFoundError: ``surface`` is a path to no file.
            TypeError: ``surface`` is neither a path nor a surface.
            ValueError: an unknown method, the surface is not closed, or the file holds no
                triangles.
            ImportError: the method's optional package is not installed (the message
                names the ``pip install`` that adds it).
        """
        from diffsim.mesh import meshers
        from diffsim.mesh.tetrahedralize import load_surface, tetrahedralize_surface

        meshers.check_method(method)
        if isinstance(surface, (str, Path)):
            surface = load_surface(surface)
        if method == "voxel":
            vertices, tets, project = tetrahedralize_surface(surface, resolution)
            return cls(vertices, tets, fix_orientation=True)._project_surface(project)
        vertices, faces = meshers.surface_arrays(surface)
        make = meshers.tetgen_tets if method == "tetgen" else meshers.tetwild_tets
        vertices, tets = make(vertices, faces, resolution)
        used, tets = np.unique(tets, return_inverse=True)  # drop unused (input) vertices
        return cls(vertices[used], tets.reshape(-1, 4), fix_orientation=True)

    def _project_surface(self, project) -> TetMesh:
        """Moves boundary vertices to ``project(points)`` where no tet inverts."""
        surf = self.surface_vertices
        target = self.vertices.copy()
        target[surf] = project(self.vertices[surf])
        blend = np.ones(self.n_vertices)
        for _ in range(20):
            v = self.vertices + blend[:, None] * (target - self.vertices)
            vol = signed_volumes(v, self.tets)
            bad = vol <= MIN_PROJECTED_VOLUME_FRACTION * np.abs(self.rest_volumes)
            if not bad.any():
                return TetMesh(v, self.tets, body_ids=self.body_ids)
            blend[np.unique(self.tets[bad])] *= 0.5
        return self

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        resolution: int | None = None,
        method: str | None = None,
        **kwargs,
    ) -> TetMesh:
        """Loads a tet mesh file, or tetrahedralizes a surface file.

        Formats, by suffix:

        - ``.msh``: Gmsh ASCII 4.1 or 2.2; its volumes become bodies
          (:func:`diffsim.mesh.gmsh_io.read_msh_bodies`).
        - ``.npz``: diffsim's own (vertices, tets, body ids).
        - ``.vtu``, ``.vtk`` (VTK), ``.mesh`` (Medit), ``.node``/``.ele`` (TetGen): through
          meshio, an optional package (``pip install diffsim[meshing]``).
        - ``.stl``, ``.obj``, ``.ply``, ``.off``, ... (a closed triangle surface):
          tetrahedralized by :meth:`from_surface` (``resolution`` 16 and ``method``
          ``"voxel"`` unless given).

        Args:
            path: the file.
            resolution: for a surface file, as in :meth:`from_surface`.
            method: for a surface file, as in :meth:`from_surface`.
            **kwargs: for a tet mesh file, passed to the constructor (``fix_orientation``,
                ``allow_unused_vertices``, ``body_ids``).

        Raises:
            FileNotFoundError: no such file.
            ValueError: an unknown format, a malformed file, or ``resolution``/``method``
                for a tet mesh file.
            ImportError: meshio (or the meshing method's package) is not installed.
        """
        from diffsim.mesh.meshio_io import MESHIO_SUFFIXES, read_meshio

        path = Path(path)
        suffix = path.suffix.lower()
        if suffix in SURFACE_SUFFIXES:
            if kwargs:
                raise ValueError(
                    f"{path} is a surface: TetMesh.load takes resolution= and method= for it, "
                    f"not {sorted(kwargs)}"
                )
            return cls.from_surface(
                path,
                resolution=16 if resolution is None else resolution,
                method="voxel" if method is None else method,
            )
        if resolution is not None or method is not None:
            raise ValueError(
                f"{path}: resolution= and method= apply to surface files "
                f"({', '.join(SURFACE_SUFFIXES)}), not to a tet mesh"
            )
        if suffix not in (".msh", ".npz", *MESHIO_SUFFIXES):
            raise ValueError(
                f"{path}: unknown mesh format {path.suffix!r}; use a tet mesh "
                f"({', '.join(('.msh', '.npz', *MESHIO_SUFFIXES))}) or a closed surface "
                f"({', '.join(SURFACE_SUFFIXES)})"
            )
        if not path.is_file():
            raise FileNotFoundError(f"mesh file not found: {path}")
        if suffix == ".npz":
            with np.load(path) as data:
                missing = {"vertices", "tets"} - set(data.files)
                if missing:
                    raise ValueError(f"{path}: not a diffsim mesh file, missing {sorted(missing)}")
                body_ids = data["body_ids"] if "body_ids" in data.files else None
                return cls(data["vertices"], data["tets"], body_ids=body_ids, **kwargs)
        if suffix == ".msh":
            vertices, tets, body_ids = gmsh_io.read_msh_bodies(path)
        else:
            vertices, tets, body_ids = read_meshio(path)
        if body_ids is not None and "body_ids" not in kwargs:
            kwargs["body_ids"] = body_ids
        return cls(vertices, tets, **kwargs)

    def save(self, path: str | Path) -> None:
        """Saves the mesh; the format comes from the suffix.

        ``.msh`` (Gmsh 4.1 ASCII, bodies as volumes) and ``.npz`` (diffsim's own) need
        nothing more; ``.vtu``, ``.vtk``, ``.mesh`` and ``.node``/``.ele`` need meshio
        (``pip install diffsim[meshing]``). All keep the body ids (:meth:`load` reads them
        back).

        Raises:
            ValueError: an unknown suffix.
            ImportError: meshio is needed and not installed.
        """
        from diffsim.mesh.meshio_io import MESHIO_SUFFIXES, write_meshio

        path = Path(path)
        suffix = path.suffix.lower()
        body_ids = self.body_ids if self.n_bodies > 1 else None
        if suffix == ".msh":
            gmsh_io.write_msh(path, self.vertices, self.tets, body_ids)
        elif suffix == ".npz":
            np.savez(path, vertices=self.vertices, tets=self.tets, body_ids=self.body_ids)
        elif suffix in MESHIO_SUFFIXES:
            write_meshio(path, self.vertices, self.tets, body_ids)
        else:
            raise ValueError(
                f"{path}: unknown mesh format {path.suffix!r}; use "
                f"{', '.join(('.msh', '.npz', *MESHIO_SUFFIXES))}"
            )

    @staticmethod
    def merge(meshes: Sequence[TetMesh]) -> TetMesh:
        """One mesh holding several bodies; vertex ``body_ids`` tell them apart."""
        if not meshes:
            raise ValueError("merge needs at least one mesh")
        vertices, tets, body_ids = [], [], []
        offset, body = 0, 0
        for mesh in meshes:
            vertices.append(mesh.vertices)
            tets.append(mesh.tets + offset)
            body_ids.append(mesh.body_ids + body)
            offset += mesh.n_vertices
            body += mesh.n_bodies
        return TetMesh(
            np.concatenate(vertices), np.concatenate(tets), body_ids=np.concatenate(body_ids)
        )

    def quality(self, sliver_ratio: float = SLIVER_ASPECT_RATIO) -> MeshQuality:
        """Shape measures of the rest tets: altitudes, aspect ratios and slivers.

        The smallest altitude sets the explicit time step (see
        :func:`diffsim.physics.stable_step.stable_step` and docs/time-steps.md).

        Args:
            sliver_ratio: aspect ratio above which a tet counts as a sliver.

        Returns:
            A :class:`MeshQuality`; ``print`` it for a table.
        """
        altitudes = tet_altitudes(self.vertices, self.tets)
        x = self.vertices[self.tets]
        longest = np.max(
            [
                np.linalg.norm(x[:, i] - x[:, j], axis=1)
                for i, j in itertools.combinations(range(4), 2)
            ],
            axis=0,
        )
        ratios = longest / altitudes
        worst = int(np.argmin(altitudes))
        return MeshQuality(
            min_altitude=float(altitudes[worst]),
            min_altitude_tet=worst,
            altitudes=altitudes,
            aspect_ratios=ratios,
            slivers=np.flatnonzero(ratios > sliver_ratio),
            sliver_ratio=float(sliver_ratio),
        )

    def compact(self) -> TetMesh:
        """A copy without the vertices that no tet uses."""
        used = np.unique(self.tets)
        remap = np.full(self.n_vertices, -1)
        remap[used] = np.arange(len(used))
        return TetMesh(self.vertices[used], remap[self.tets], body_ids=self.body_ids[used])

    def __repr__(self) -> str:
        return (
            f"TetMesh(n_vertices={self.n_vertices}, n_tets={self.n_tets}, n_bodies={self.n_bodies})"
        )


@dataclass(frozen=True)
class MeshQuality:
    """Tet shape measures from :meth:`TetMesh.quality`.

    Attributes:
        min_altitude: the smallest tet altitude (vertex to opposite face) in m.
        min_altitude_tet: the tet that has it.
        altitudes: ``[m]`` smallest altitude of each tet in m.
        aspect_ratios: ``[m]`` longest edge / smallest altitude of each tet (a regular tet
            has sqrt(3/2) = 1.22; flat and needle-like tets have large ones).
        slivers: tets whose aspect ratio exceeds ``sliver_ratio``, ascending.
        sliver_ratio: the threshold used.
    """

    min_altitude: float
    min_altitude_tet: int
    altitudes: np.ndarray = field(repr=False)
    aspect_ratios: np.ndarray = field(repr=False)
    slivers: np.ndarray = field(repr=False)
    sliver_ratio: float = SLIVER_ASPECT_RATIO

    @property
    def n_tets(self) -> int:
        return len(self.altitudes)

    @property
    def worst_tet(self) -> int:
        """The tet with the largest aspect ratio."""
        return int(np.argmax(self.aspect_ratios))

    def __str__(self) -> str:
        r = self.aspect_ratios
        p50, p99 = np.percentile(r, [50, 99])
        worst = self.worst_tet
        n_s = len(self.slivers)
        rows = [
            ("tets", f"{self.n_tets}"),
            (
                "smallest altitude",
                f"{self.min_altitude:.3g} m (tet {self.min_altitude_tet}); "
                f"median {np.median(self.altitudes):.3g} m",
            ),
            (
                "aspect ratio",
                f"median {p50:.3g}, 99th percentile {p99:.3g}, max {r[worst]:.3g} (tet {worst})",
            ),
            (
                f"slivers (ratio > {self.sliver_ratio:g})",
                f"{n_s} ({100.0 * n_s / self.n_tets:.2g}%)"
                + (f": tets {_first(self.slivers)}" if n_s else ""),
            ),
        ]
        width = max(len(name) for name, _ in rows)
        lines = ["mesh quality (aspect ratio = longest edge / smallest altitude; regular 1.22)"]
        return "\n".join(lines + [f"  {name:<{width}}  {value}" for name, value in rows])


def _as_numpy(value, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as exc:  # noqa: BLE001 - re-raised with a clear message
        raise ValueError(f"{name} could not be converted to an array: {exc}") from exc


def _first(indices: np.ndarray, limit: int = 8) -> str:
    shown = ", ".join(str(int(i)) for i in indices[:limit])
    more = f", ... ({len(indices)} in all)" if len(indices) > limit else ""
    return f"[{shown}{more}]"
