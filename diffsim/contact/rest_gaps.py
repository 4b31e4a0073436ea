"""The close pairs of a mesh's surface at rest, and the default dhat they allow.

A pair that starts closer than dhat is pushed apart from the first substep: a thin part
inflates, a real mesh whose surface nearly touches itself somewhere explodes. So the
default dhat is the smaller of ``DHAT_FRACTION`` of the bounding-box diagonal and
``REST_GAP_FRACTION`` of the smallest rest distance between surface elements that collide
(one broad phase at rest; the sliver pairs of
:func:`~diffsim.contact.candidates.sliver_pairs` never collide and do not count).
:class:`RestGaps` finds those pairs, checks that no two surfaces touch at the start and
warns (:class:`ContactWarning`) where an explicit dhat puts pairs inside the barrier.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from diffsim.contact import potential
from diffsim.contact.candidates import SurfacePrimitives, find_candidates
from diffsim.mesh import TetMesh

# Default barrier activation distance, as a fraction of the bounding-box diagonal ...
DHAT_FRACTION = 5e-3
# ... and never more than this fraction of the smallest rest distance between surface
# elements that collide (a thin part's thickness, two bodies' gap; not the sliver pairs of
# candidates.sliver_pairs, which never collide), so that at rest every pair
# is at least 1 / REST_GAP_FRACTION barrier widths apart and feels no force.
REST_GAP_FRACTION = 0.5
# Pairs named in the warning for an explicit dhat above the rest gaps.
WARN_PAIRS = 3
# A default dhat below this fraction of the scene rule, set by the gap between two bodies
# (where they were placed, not a part's thickness), warns.
CLOSE_BODIES_FRACTION = 0.1


class ContactWarning(UserWarning):
    """Surface contact is set up so that it changes the physics (e.g. surfaces start inside
    the barrier, so a body at rest does not stay at rest); the message names the pairs.

    Filter it like any warning: ``warnings.simplefilter("ignore", ContactWarning)``.
    """


class RestGaps:
    """The close pairs of surface elements at rest that collide (non-adjacent, not sliver
    pairs), and the dhat they allow.

    Attributes:
        distances: ``[k]`` float64 rest distances (m) of the pairs found, ascending.
        pairs: ``[k, 4]`` their vertex ids (point-triangle ``(p, a, b, c)`` or edge-edge
            ``(p0, p1, q0, q1)``).
        kinds: ``[k]`` bool, True for point-triangle pairs.
        radius: the search radius (m): every pair closer than it is listed.
        scene_dhat: ``DHAT_FRACTION * diagonal`` (m), the bounding-box rule.
        dhat: the default dhat (m): ``min(scene_dhat, REST_GAP_FRACTION * distances.min())``.
    """

    def __init__(
        self,
        distances: torch.Tensor,
        pairs: torch.Tensor,
        n_point_triangle: int,
        scene_dhat: float,
        radius: float = math.inf,
    ) -> None:
        kinds = torch.arange(len(pairs), device=pairs.device) < n_point_triangle
        order = torch.argsort(distances)
        self.distances, self.pairs, self.kinds = distances[order], pairs[order], kinds[order]
        self.scene_dhat = float(scene_dhat)
        self.radius = float(radius)
        self.dhat = self.scene_dhat
        if len(self.distances):
            self.dhat = min(self.dhat, REST_GAP_FRACTION * float(self.distances[0]))

    @classmethod
    def of(
        cls,
        mesh: TetMesh,
        dhat: float | None = None,
        device: str | torch.device = "cpu",
        broad_phase: str = "bvh",
        surface: SurfacePrimitives | None = None,
    ) -> RestGaps:
        """The pairs closer than ``DHAT_FRACTION * diagonal / REST_GAP_FRACTION`` (the rest
        gaps that can lower the default) or than an explicit ``dhat`` (m), at rest
        (``surface``: the mesh's, where the caller has built it)."""
        diagonal = float(np.linalg.norm(np.ptp(mesh.vertices, axis=0)))
        scene_dhat = DHAT_FRACTION * diagonal
        radius = max(scene_dhat / REST_GAP_FRACTION, dhat or 0.0)
        surface = SurfacePrimitives.from_mesh(mesh, device) if surface is None else surface
        centroid = mesh.vertices.mean(axis=0)
        x = torch.as_tensor(mesh.vertices - centroid, dtype=torch.float64, device=device)
        c = find_candidates(surface, x, radius, broad_phase)
        d_pt, d_ee = potential.pair_distances(x, c)
        distances = torch.cat([d_pt, d_ee]).clamp_min(0).sqrt()
        pairs = torch.cat([c.point_triangle, c.edge_edge])
        near = distances < radius
        n_pt = int(near[: len(d_pt)].sum())
        return cls(distances[near], pairs[near], n_pt, scene_dhat, radius)

    def describe(self, count: int) -> str:
        """The ``count`` closest pairs, e.g. ``point-triangle (3, 7, 8, 9) 0.04 mm apart``."""
        if not len(self.distances):
            return f"no pair closer than {1e3 * self.radius:.3g} mm"
        parts = []
        for k in range(min(count, len(self.distances))):
            kind = "point-triangle" if bool(self.kinds[k]) else "edge-edge"
            ids = tuple(self.pairs[k].tolist())
            parts.append(f"{kind} {ids} {1e3 * float(self.distances[k]):.3g} mm apart")
        return ", ".join(parts)

    def check_separated(self, dhat: float) -> None:
        """Raises ValueError if a pair is no farther apart than ``MIN_DISTANCE_FRACTION``
        of dhat (m): touching surfaces."""
        floor = potential.MIN_DISTANCE_FRACTION * dhat
        if len(self.distances) and float(self.distances[0]) <= floor:
            kind = "point-triangle" if bool(self.kinds[0]) else "edge-edge"
            raise ValueError(
                f"surfaces touch at the start: {kind} pair {self.pairs[0].tolist()} is "
                f"{float(self.distances[0]):.3g} m apart; separate the bodies (e.g. a gap of "
                f"at least dhat = {dhat:.3g} m)"
            )

    def warn_inside(self, dhat: float) -> None:
        """Warns (:class:`ContactWarning`) if pairs start inside a barrier of width dhat (m)."""
        inside = int((self.distances < dhat).sum())
        if not inside:
            return
        warnings.warn(
            f"contact_dhat = {dhat:.3g} m: {inside} pair(s) of non-adjacent surface elements "
            f"start inside the barrier ({self.describe(WARN_PAIRS)}); the barrier pushes them "
            f"apart, so a body at rest will not stay at rest. The default for this mesh is "
            f"{self.dhat:.3g} m (0.5% of its diagonal, at most {REST_GAP_FRACTION:g} of the "
            f"closest rest gap); use it (contact_dhat=None) or a smaller one unless the "
            f"squeeze is intended",
            ContactWarning,
            stacklevel=4,
        )

    def warn_close_bodies(self, body_ids: np.ndarray, stopping_speed: float) -> None:
        """Warns (:class:`ContactWarning`) where the default dhat is below
        ``CLOSE_BODIES_FRACTION`` of the scene rule because two bodies start that close.

        Args:
            body_ids: ``[n]`` body of each vertex (``TetMesh.body_ids``).
            stopping_speed: the approach speed (m/s) the default barrier stops at the
                simulator's substep, for the message.
        """
        if not len(self.distances) or self.dhat >= CLOSE_BODIES_FRACTION * self.scene_dhat:
            return
        bodies = sorted({int(b) for b in np.asarray(body_ids)[self.pairs[0].cpu().numpy()]})
        if len(bodies) < 2:
            return  # a thin part or a fold of one body: its geometry sets dhat
        gap = float(self.distances[0])
        warnings.warn(
            f"bodies {bodies[0]} and {bodies[1]} start {1e3 * gap:.3g} mm apart "
            f"({self.describe(1)}), which sets the default contact_dhat to "
            f"{1e3 * self.dhat:.3g} mm, {self.dhat / self.scene_dhat:.2g} of the "
            f"{1e3 * self.scene_dhat:.3g} mm the scene's size allows: the barrier then stops "
            f"approaches only up to about {stopping_speed:.3g} m/s at this substep, and the "
            f"step limit cuts faster ones (they lose energy). Place the bodies at least "
            f"{1e3 * self.scene_dhat / REST_GAP_FRACTION:.3g} mm apart for the full dhat, "
            f"or pass contact_dhat (pairs closer than it start inside the barrier)",
            ContactWarning,
            stacklevel=4,
        )
