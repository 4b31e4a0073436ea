"""Whether surfaces intersect: the check that a contact simulation starts intersection-free.

Surface contact keeps surfaces apart; it cannot separate surfaces that already pass through
each other (the barrier holds them where they are, and the step limit then cuts every step
near the crossing). Two bodies merged so that they overlap, or a mesh whose surface crosses
itself, are bad input: :func:`check_intersection_free` raises a ValueError that names a
crossing (an edge of one surface through a triangle of the other) and the fix, once, at
set-up. The crossings are found by :func:`surface_crossings` with the kernel of
:mod:`diffsim.kernels.intersections` (a BVH over the triangles, exact float64 tests).
"""

from __future__ import annotations

import numpy as np
import torch
import warp as wp

from diffsim.contact.candidates import SurfacePrimitives
from diffsim.kernels.intersections import edge_face_crossings
from diffsim.kernels.runtime import init_warp
from diffsim.mesh import TetMesh

# Crossings listed (the count is exact).
LISTED = 16


def surface_crossings(surface: SurfacePrimitives, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """The boundary edges that pass through boundary triangles sharing no vertex with them.

    Args:
        surface: the contact surface.
        x: positions ``[n, 3]`` (m).

    Returns:
        ``(count, rows)``: how many (edge, triangle) crossings, and up to ``LISTED`` of them
        as ``[k, 2]`` int64 rows of indices into ``surface.edges`` and ``surface.faces``.
    """
    none = torch.zeros((0, 2), dtype=torch.int64)
    if not len(surface.edges) or not len(surface.faces):
        return 0, none
    init_warp()
    x = x.detach().to("cpu", torch.float64)
    x = (x - x.mean(dim=0)).contiguous()
    faces = surface.faces.to("cpu", torch.int32).contiguous()
    edges = surface.edges.to("cpu", torch.int32).contiguous()
    corners = x[faces.long()]
    # float32 boxes, padded past their rounding.
    pad = 1e-6 * max(float(x.abs().max()), 1e-30)
    lowers = wp.array(corners.amin(dim=1).float().numpy() - pad, dtype=wp.vec3, device="cpu")
    uppers = wp.array(corners.amax(dim=1).float().numpy() + pad, dtype=wp.vec3, device="cpu")
    tree = wp.Bvh(lowers, uppers)
    count = wp.zeros(1, dtype=wp.int32, device="cpu")
    found = wp.zeros((LISTED, 2), dtype=wp.int32, device="cpu")
    wp.launch(
        edge_face_crossings,
        dim=len(edges),
        inputs=[
            tree.id, wp.from_torch(x, dtype=wp.vec3d), wp.from_torch(edges),
            wp.from_torch(faces), pad, count, found,
        ],
        device="cpu",
    )  # fmt: skip
    n = int(count.numpy()[0])
    rows = torch.as_tensor(found.numpy()[: min(n, LISTED)], dtype=torch.int64)
    # The CPU runs the threads in order; sorted anyway, so the message is reproducible.
    if len(rows):
        rows = rows[torch.argsort(rows[:, 0] * len(surface.faces) + rows[:, 1])]
    return n, rows if len(rows) else none


def check_intersection_free(
    mesh: TetMesh,
    surface: SurfacePrimitives | None = None,
    positions: torch.Tensor | None = None,
    where: str = "at rest",
) -> None:
    """Raises ValueError where the mesh's surfaces intersect, naming a crossing, the bodies
    it joins (``mesh.body_ids``) and the fix.

    Args:
        mesh: the mesh, all bodies (its rest shape is checked unless ``positions`` given).
        surface: its contact surface (built from the mesh where not given).
        positions: ``[n, 3]`` positions to check instead of the rest shape (m).
        where: what is checked, for the message (e.g. ``"in the initial positions of world
            1"``).
    """
    surface = SurfacePrimitives.from_mesh(mesh) if surface is None else surface
    x = torch.as_tensor(mesh.vertices if positions is None else positions, dtype=torch.float64)
    n, rows = surface_crossings(surface, x)
    if not n:
        return
    edge = surface.edges[int(rows[0, 0])].tolist()
    face = surface.faces[int(rows[0, 1])].tolist()
    bodies = np.asarray(mesh.body_ids)
    body_edge, body_face = int(bodies[edge[0]]), int(bodies[face[0]])
    if body_edge != body_face:
        what = f"bodies {body_edge} and {body_face} overlap"
        fix = (
            "move them apart (before merging: TetMesh.transformed, placed_on) so that no "
            "two bodies overlap"
        )
    else:
        what = f"the surface of body {body_edge} passes through itself"
        fix = (
            "repair the mesh (e.g. tetrahedralize its surface again with pytetwild)"
            if positions is None
            else "start from positions where it does not"
        )
    raise ValueError(
        f"surfaces intersect {where}: {what} (surface edge {tuple(edge)} passes through "
        f"triangle {tuple(face)}; {n} such crossing(s)). Surface contact keeps surfaces "
        f"apart but cannot pull apart surfaces that start inside each other: {fix}, or "
        f"pass contact=False"
    )
