"""Surface primitives, excluded pairs and the broad phase that finds candidate contact pairs.

A candidate is a point-triangle pair ``(p, a, b, c)`` (a surface vertex and a boundary
triangle) or an edge-edge pair ``(p0, p1, q0, q1)`` (two boundary edges). As in the IPC
Toolkit, a point is never paired with a triangle it is a corner of, and two edges sharing a
vertex are never paired; nor are the sliver pairs (:func:`sliver_pairs`: joined by a flat
tet, which holds them apart). Every other pair, within a body or between bodies, may
collide.

The broad phase returns every pair whose axis-aligned bounding boxes lie closer than a
radius r along every axis, a superset of the pairs closer than r. Two implementations:
``"bvh"`` (Warp BVHs over the triangle and edge boxes, queried per vertex and per edge;
scales to large meshes) and ``"brute"`` (all pairs in blocked torch ops, for small meshes
and as the reference). :func:`near_candidates` keeps only the pairs really closer than a
distance, with their squared distances: on the ``"bvh"`` path the queries measure the
pairs they find (:mod:`diffsim.contact.warp_broad_phase`), so the box overlaps, most of
them far apart, are never listed. Candidate sets are integer data: constant in the
backward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from diffsim.contact.distances import (
    edge_edge_distance,
    mollifier_threshold,
    point_triangle_distance,
)
from diffsim.mesh import TetMesh

# Rows of the all-pairs test processed at a time by the brute-force broad phase.
BRUTE_BLOCK = 512
# A pair joined by a tet edge and closer at rest than this fraction of that edge is a
# sliver pair, not a candidate (see sliver_pairs).
SLIVER_FRACTION = 0.25


def relative_offset(d: torch.Tensor, with_zero: bool = False) -> float:
    """How far (m) displacements ``d [n, 3]`` move the vertices relative to each other.

    An upper bound on ``max_i |d_i - c|`` for c the centre of the displacements' bounding box
    (half its diagonal): every pair's distance changes by at most twice this (translation
    invariance: any common c is valid), so a body moving as a whole, however far, has
    offset ~0. One reduction over d. With ``with_zero`` the box also holds 0, which bounds
    the offset of any scaled displacements ``alpha_i d_i`` with alpha_i in [0, 1].
    """
    if not len(d):
        return 0.0
    lo, hi = torch.aminmax(d, dim=0)
    if with_zero:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    return 0.5 * float((hi - lo).norm())


def farthest_offset(d: torch.Tensor) -> float:
    """How far (m) the farthest vertex moves relative to the common motion: ``max_i |d_i -
    c|`` for displacements ``d [n, 3]`` and c the centre of their bounding box.

    At most :func:`relative_offset` (by up to sqrt(3) where no vertex moves to a corner of
    the box: a spinning body's by sqrt(2)), and a bound of the same kind: every pair's
    distance changes by at most twice it. The candidate set's validity is measured with it
    (the fused contact kernel the same way, :mod:`diffsim.kernels.contact_advance`).
    """
    if not len(d):
        return 0.0
    lo, hi = torch.aminmax(d, dim=0)
    return float((d - 0.5 * (lo + hi)).norm(dim=1).max())


@dataclass(frozen=True)
class SurfacePrimitives:
    """The contact surface of a mesh.

    Attributes:
        vertices: ``[v]`` indices of the surface vertices.
        faces: ``[f, 3]`` boundary triangles (vertex indices).
        edges: ``[e, 2]`` boundary edges (sorted vertex indices).
        rest_positions: ``[n, 3]`` float64 rest positions of all vertices (for mollifiers).
        neighbours: ``[m]`` int64 keys ``a * n + b`` (ascending) of the ordered pairs of
            distinct vertices that are corners of a common tet (see :func:`sliver_pairs`).
    """

    vertices: torch.Tensor
    faces: torch.Tensor
    edges: torch.Tensor
    rest_positions: torch.Tensor
    neighbours: torch.Tensor

    @classmethod
    def from_mesh(cls, mesh: TetMesh, device: str | torch.device = "cpu") -> SurfacePrimitives:
        """The boundary surface of ``mesh`` (all bodies)."""
        tets = torch.as_tensor(mesh.tets, device=device)
        n = mesh.n_vertices
        i, j = torch.triu_indices(4, 4, 1, device=device)
        a, b = tets[:, i].flatten(), tets[:, j].flatten()
        keys = torch.unique(torch.cat([a * n + b, b * n + a]))
        return cls(
            vertices=torch.as_tensor(mesh.surface_vertices, device=device),
            faces=torch.as_tensor(mesh.surface_faces, device=device),
            edges=torch.as_tensor(mesh.surface_edges, device=device),
            rest_positions=torch.as_tensor(mesh.vertices, dtype=torch.float64, device=device),
            neighbours=keys,
        )

    @property
    def mean_edge_length(self) -> float:
        """The boundary edges' mean rest length (m); 0 without edges."""
        if not len(self.edges):
            return 0.0
        ends = self.rest_positions[self.edges]
        return float((ends[:, 1] - ends[:, 0]).norm(dim=-1).mean())


@dataclass(frozen=True)
class Candidates:
    """Candidate contact pairs, as vertex indices.

    Attributes:
        point_triangle: ``[k1, 4]`` int64 rows ``(p, a, b, c)``.
        edge_edge: ``[k2, 4]`` int64 rows ``(p0, p1, q0, q1)``.
        mollifier_eps: ``[k2]`` float64 mollifier thresholds eps_x from rest positions.
        derived: values derived from the set, kept with it and not part of its value: its
            Warp arrays per dtype (:func:`diffsim.contact.warp_glue.pair_arrays`), and for a
            :meth:`subset` its ``"parent"`` and ``"index"`` (so the Warp kernels can run
            over the parent's arrays instead of building new ones).
    """

    point_triangle: torch.Tensor
    edge_edge: torch.Tensor
    mollifier_eps: torch.Tensor
    derived: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def n_pairs(self) -> int:
        return len(self.point_triangle) + len(self.edge_edge)

    def subset(self, index: torch.Tensor) -> Candidates:
        """The pairs at ``index`` (into the point-triangle pairs, then the edge-edge pairs)."""
        k1 = len(self.point_triangle)
        pt, ee = index[index < k1], index[index >= k1] - k1
        subset = Candidates(self.point_triangle[pt], self.edge_edge[ee], self.mollifier_eps[ee])
        subset.derived.update(parent=self, index=index)
        return subset

    @classmethod
    def from_rows(
        cls, surface: SurfacePrimitives, point_triangle: torch.Tensor, edge_edge: torch.Tensor
    ) -> Candidates:
        """Candidates from ``[k1, 4]`` rows ``(p, a, b, c)`` and ``[k2, 4]`` rows
        ``(p0, p1, q0, q1)`` of vertex ids (int64), with the edge pairs' mollifier eps."""
        eps = mollifier_threshold(*surface.rest_positions[edge_edge].unbind(1))
        return cls(point_triangle, edge_edge, eps)

    @classmethod
    def from_pairs(
        cls, surface: SurfacePrimitives, vertex_face: torch.Tensor, edge_edge: torch.Tensor
    ) -> Candidates:
        """Candidates from ``[k1, 2]`` (surface-vertex index, face) and ``[k2, 2]`` edge pairs.

        Args:
            surface: the primitives the indices refer to.
            vertex_face: rows (index into ``surface.vertices``, index into ``surface.faces``).
            edge_edge: rows (index into ``surface.edges``, index into ``surface.edges``).
        """
        pt = torch.cat(
            [surface.vertices[vertex_face[:, 0], None], surface.faces[vertex_face[:, 1]]], 1
        )
        ee = torch.cat([surface.edges[edge_edge[:, 0]], surface.edges[edge_edge[:, 1]]], 1)
        return cls.from_rows(surface, pt.reshape(-1, 4), ee.reshape(-1, 4))


def excluded_vertex_face(surface: SurfacePrimitives, vertex_face: torch.Tensor) -> torch.Tensor:
    """``[k]`` bool: True where the vertex is a corner of the face."""
    v = surface.vertices[vertex_face[:, 0]]
    return (surface.faces[vertex_face[:, 1]] == v[:, None]).any(dim=1)


def excluded_edge_edge(surface: SurfacePrimitives, edge_edge: torch.Tensor) -> torch.Tensor:
    """``[k]`` bool: True where the two edges are the same or share a vertex."""
    a, b = surface.edges[edge_edge[:, 0]], surface.edges[edge_edge[:, 1]]
    return (a[:, :, None] == b[:, None, :]).any(dim=(1, 2))


def tie_lengths(surface: SurfacePrimitives, rows: torch.Tensor, point_triangle: bool):
    """``[k]`` float64: the rest length (m) of the shortest tet edge from a vertex of one
    element of the pair to a vertex of the other (rows ``[k, 4]``: ``(p, a, b, c)`` or
    ``(p0, p1, q0, q1)``); inf where the elements are not joined by a tet."""
    n = len(surface.rest_positions)
    split = 1 if point_triangle else 2
    ends = torch.cartesian_prod(torch.arange(split), torch.arange(split, 4)).to(rows.device)
    a, b = rows[:, ends[:, 0]], rows[:, ends[:, 1]]
    lengths = torch.full(a.shape, math.inf, dtype=torch.float64, device=rows.device)
    table = surface.neighbours
    if len(table):
        keys = a * n + b
        tied = table[torch.searchsorted(table, keys).clamp_max(len(table) - 1)] == keys
        rest = surface.rest_positions
        lengths[tied] = (rest[a[tied]] - rest[b[tied]]).norm(dim=-1)
    return lengths.amin(dim=1)


def sliver_pairs(surface: SurfacePrimitives, rows: torch.Tensor, point_triangle: bool):
    """``[k]`` bool: the sliver pairs, which are not candidates: joined by a tet edge (from
    a vertex of one element to a vertex of the other) and closer at rest than
    ``SLIVER_FRACTION`` of the shortest such edge.

    A real mesh has them where a flat tet lies at its surface (the bunny's closest pair, 40
    microns apart, is one; its closest other pair is 0.84 mm apart): the tet between them
    holds them apart (its elasticity, and the volume limit), and a barrier on them would
    make dhat follow the mesh's worst tet instead of the distances between its parts.
    Pairs across a tet of reasonable shape stay candidates: a coarse box's faces, a thin
    mat's two sides (joined by its thickness).
    """
    lengths = tie_lengths(surface, rows, point_triangle)
    out = torch.isfinite(lengths)
    if bool(out.any()):
        rest = surface.rest_positions - surface.rest_positions.mean(dim=0)
        corners = rest[rows[out]].unbind(1)
        d2 = point_triangle_distance(*corners) if point_triangle else edge_edge_distance(*corners)
        out[out.clone()] = d2 < (SLIVER_FRACTION * lengths[out]).square()
    return out


def _boxes(x: torch.Tensor, elements: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    corners = x[elements]
    return corners.amin(dim=1), corners.amax(dim=1)


def _overlapping(lo_a, hi_a, lo_b, hi_b, radius: float, upper_only: bool) -> torch.Tensor:
    """``[k, 2]`` index pairs (i in a, j in b) of boxes closer than radius along every axis."""
    found = []
    for start in range(0, len(lo_a), BRUTE_BLOCK):
        stop = min(start + BRUTE_BLOCK, len(lo_a))
        near = (
            (lo_a[start:stop, None] <= hi_b[None] + radius)
            & (lo_b[None] <= hi_a[start:stop, None] + radius)
        ).all(dim=-1)
        if upper_only:
            rows = torch.arange(start, stop, device=lo_a.device)[:, None]
            near &= torch.arange(len(lo_b), device=lo_a.device)[None] > rows
        i, j = torch.nonzero(near, as_tuple=True)
        found.append(torch.stack([i + start, j], dim=1))
    if not found:
        return torch.zeros((0, 2), dtype=torch.int64, device=lo_a.device)
    return torch.cat(found)


def brute_force_candidates(
    surface: SurfacePrimitives, x: torch.Tensor, radius: float
) -> Candidates:
    """All pairs whose boxes lie within ``radius`` (m), by blocked all-pairs tests."""
    x = x.detach()
    p = x[surface.vertices]
    lo_f, hi_f = _boxes(x, surface.faces)
    vf = _overlapping(p, p, lo_f, hi_f, radius, upper_only=False)
    vf = vf[~excluded_vertex_face(surface, vf)]
    lo_e, hi_e = _boxes(x, surface.edges)
    ee = _overlapping(lo_e, hi_e, lo_e, hi_e, radius, upper_only=True)
    ee = ee[~excluded_edge_edge(surface, ee)]
    c = Candidates.from_pairs(surface, vf, ee)
    keep_pt = ~sliver_pairs(surface, c.point_triangle, True)
    keep_ee = ~sliver_pairs(surface, c.edge_edge, False)
    return Candidates(c.point_triangle[keep_pt], c.edge_edge[keep_ee], c.mollifier_eps[keep_ee])


def find_candidates(
    surface: SurfacePrimitives, x: torch.Tensor, radius: float, method: str = "bvh"
) -> Candidates:
    """Candidate pairs closer than ``radius`` (m) at positions ``x [n, 3]``.

    Args:
        surface: the contact surface.
        x: positions (detached internally: the candidate set is constant in the backward pass).
        radius: box separation below which a pair is a candidate.
        method: ``"bvh"`` (Warp) or ``"brute"`` (torch all-pairs).
    """
    if method == "brute":
        return brute_force_candidates(surface, x, radius)
    if method == "bvh":
        return near_candidates(surface, x, radius, math.inf)[0]
    raise ValueError(f"unknown broad phase {method!r}; use 'bvh' or 'brute'")


def near_candidates(
    surface: SurfacePrimitives,
    x: torch.Tensor,
    radius: float,
    within: float,
    method: str = "bvh",
    cache: dict | None = None,
    launcher=None,
) -> tuple[Candidates, torch.Tensor]:
    """The candidate pairs (:func:`find_candidates` with ``radius``) closer than ``within``
    (m) at ``x``, and their squared distances ``[k]`` (x's dtype, point-triangle first).

    The ``"bvh"`` method measures the pairs inside its queries
    (:class:`~diffsim.contact.warp_broad_phase.BroadPhase`, kept in ``cache`` per dtype
    between calls; ``launcher``: runs its queries' parts on several CPU threads), with the
    formulas of the ``pair_distances`` kernel; ``"brute"`` measures them with the torch
    reference.
    """
    x = x.detach()
    if method == "bvh":
        from diffsim.contact.warp_broad_phase import BroadPhase

        cache = {} if cache is None else cache
        broad = cache.get(x.dtype)
        if broad is None:
            broad = cache[x.dtype] = BroadPhase(surface, x.dtype)
        scale = float(x.abs().max()) if len(x) else 1.0
        pad = float(radius) + 1e-6 * scale
        pt, ee, d2_pt, d2_ee, eps = broad.near(x, pad, within, launcher)
        return Candidates(pt, ee, eps), torch.cat([d2_pt, d2_ee])
    c = find_candidates(surface, x, radius, method)
    pt, ee = c.point_triangle, c.edge_edge
    d2 = torch.cat(
        [point_triangle_distance(*x[pt].unbind(1)), edge_edge_distance(*x[ee].unbind(1))]
    )
    keep = d2 < within**2
    if not bool(keep.all()):
        c, d2 = c.subset(torch.nonzero(keep).flatten()), d2[keep]
    return c, d2
