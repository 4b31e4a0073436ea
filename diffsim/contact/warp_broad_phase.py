"""The torch side of the broad-phase kernels (:mod:`diffsim.kernels.broad_phase`).

:class:`BroadPhase` finds the candidate pairs of one contact surface closer than a distance,
with their squared distances, in two BVH queries that measure the pairs they find (so no
list of box overlaps is built, converted and measured in torch). It keeps everything that
does not change between calls: the element index arrays, the element box arrays, the
positions buffer, the outputs (grown when a query finds more rows than they hold) and the
recorded kernel launches. A call copies the positions in, computes the boxes, refits (or
builds, both at once on two CPU threads where the Warp backend has them) the two trees and
runs the two queries, each as interleaved parts that run on the two threads at once: a few
launches, no argument packing.

The trees are refit, not built anew, while the surface moves as a whole or deforms a
little: a build costs 20-30 times a refit (0.27 + 0.44 ms against 0.014 ms for the mat on
the ball's 1,148 faces and 1,722 edges). They are built anew where the surface has deformed
by more than ``REBUILD_FRACTION`` of its mean rest edge length since the last build (the
:func:`~diffsim.contact.candidates.relative_offset` bound, which a common motion leaves at 0),
where a refit tree's boxes would overlap many more of their neighbours. A tree finds a
query element's pairs in the order of its topology, which a refit keeps; that order is the
order in which the barrier, friction and their adjoints sum into the vertices, so it
changes only at a build, a deterministic point of the rollout (with an infinite ``within``
the queries are :func:`~diffsim.contact.candidates.find_candidates`).
"""

from __future__ import annotations

import functools

import torch
import warp as wp

from diffsim.contact.candidates import SLIVER_FRACTION, relative_offset
from diffsim.contact.distances import MOLLIFIER_FRACTION, PARALLEL_FRACTION
from diffsim.kernels.broad_phase import SliverRule, broad_phase_kernels
from diffsim.kernels.contact import EDGE_EDGE, POINT_TRIANGLE, contact_kernels
from diffsim.kernels.runtime import init_warp

init_warp()

SCALARS = {torch.float32: wp.float32, torch.float64: wp.float64}
VEC3 = {torch.float32: wp.vec3f, torch.float64: wp.vec3d}
# The trees are built anew once the surface has deformed this fraction of its mean rest edge
# length since their last build (refit in between).
REBUILD_FRACTION = 0.5
# Primitives per leaf of the trees: a build costs less and a query about the same as with
# one (the colliding spheres' broad phase with a build 1.6 -> 1.3 ms, the mat on the ball's
# 3.0 -> 2.1 ms; with a refit 0.75 and 1.75 ms either way).
LEAF_SIZE = 4
# A query runs as this many interleaved parts on the CPU, on as many threads where the
# backend has them (the rows are the same however many threads run the parts).
PARTS = 2
# ... on threads at once only where they query at least this many elements (vertices and
# edges), and the frames' bounds only over at least this many vertex-frames: a hand-over to
# another thread costs about 80 microseconds, a query element about 0.5 and a vertex-frame
# about 0.016.
SPLIT_ELEMENTS = 1024
SPLIT_VERTEX_FRAMES = 32768


class _Part:
    """One part of a pair-writing query (every ``stride``-th query element from ``first``):
    its output buffers and recorded launch."""

    def __init__(self, query: _Query, first: int, capacity: int) -> None:
        self.query, self.first = query, first
        self.count = torch.zeros(1, dtype=torch.int32, device=query.device)
        self.allocate(capacity)

    def allocate(self, capacity: int) -> None:
        q = self.query
        self.pairs = torch.empty((capacity, 4), dtype=torch.int32, device=q.device)
        self.d2 = torch.empty(capacity, dtype=q.dtype, device=q.device)
        outputs = [wp.from_torch(self.count), wp.from_torch(self.pairs)]
        outputs.append(wp.from_torch(self.d2, dtype=SCALARS[q.dtype]))
        self.eps = None
        if q.with_eps:
            self.eps = torch.empty(capacity, dtype=torch.float64, device=q.device)
            outputs.append(wp.from_torch(self.eps))
        inputs = [q.inputs[0], self.first, q.stride, *q.inputs[1:]]
        dim = (q.dim - self.first + q.stride - 1) // q.stride
        self.launch = wp.launch(
            q.kernel, dim=dim, inputs=inputs, outputs=outputs, device=str(q.device), record_cmd=True
        )

    def run(self) -> None:
        """Runs the part with the query's current inputs."""
        for index, value in self.query.changed.items():
            self.launch.set_param_at_index(index + 2 if index else 0, value)
        self.count.zero_()
        self.launch.launch()

    def fits(self) -> bool:
        """Whether the last run's rows all fit; if not, grows the outputs for a rerun."""
        found = int(self.count[0])
        if found <= len(self.pairs):
            return True
        self.allocate(max(found + found // 2, 2 * len(self.pairs)))
        return False


class _Query:
    """One pair-writing query, in ``PARTS`` interleaved parts on the CPU (one on CUDA): the
    parts' rows, concatenated, are the same whether they ran on one thread or several."""

    def __init__(
        self,
        kernel,
        dim: int,
        inputs: list,
        dtype: torch.dtype,
        device,
        capacity: int,
        with_eps: bool = False,
    ) -> None:
        self.kernel, self.dim, self.inputs, self.with_eps = kernel, dim, inputs, with_eps
        self.dtype, self.device = dtype, device
        self.stride = PARTS if torch.device(device).type == "cpu" else 1
        self.changed: dict[int, object] = {}
        self.parts = [_Part(self, first, capacity) for first in range(min(self.stride, dim))]

    def set(self, params: dict[int, object]) -> None:
        """Sets the inputs that changed since the last call (``params``, by index)."""
        for index, value in params.items():
            self.inputs[index] = value
        self.changed = params

    def found(self) -> tuple:
        """The last run's rows ``[k, 4]`` (int64), squared distances ``[k]`` and, with eps,
        mollifier thresholds ``[k]``: the parts' in order."""
        counts = [int(part.count[0]) for part in self.parts]
        parts = list(zip(self.parts, counts, strict=True))
        rows = torch.cat([p.pairs[:k] for p, k in parts]).to(torch.int64)
        d2 = torch.cat([p.d2[:k] for p, k in parts])
        if not self.with_eps:
            return rows, d2
        return rows, d2, torch.cat([p.eps[:k] for p, k in parts])


def _run_parts(queries: list[_Query], launcher) -> None:
    """Runs every part of the queries, part i of each on thread i of the launcher at once
    (one hand-over for all queries; without a launcher one by one), and again those whose
    rows did not fit until all fit."""
    todo = [part for query in queries for part in query.parts]
    while todo:
        groups: dict[int, list[_Part]] = {}
        for part in todo:
            groups.setdefault(part.first, []).append(part)
        _run_jobs([functools.partial(_run_all, group) for group in groups.values()], launcher)
        for query in queries:
            query.changed = {}
        todo = [part for part in todo if not part.fits()]  # grown, recorded anew: rerun


def _run_jobs(jobs: list, launcher) -> None:
    """Runs the jobs at once on the launcher's threads where it has enough of them (and
    there are several jobs), else one after another on this thread."""
    if launcher is not None and 1 < len(jobs) <= launcher.threads:
        launcher.run(*jobs)
    else:
        for job in jobs:
            job()


def _build_tree(tree: list) -> None:
    """Builds ``[tree, lowers, uppers]``'s tree anew over its boxes."""
    tree[0] = wp.Bvh(tree[1], tree[2], leaf_size=LEAF_SIZE)


def _run_all(parts: list[_Part]) -> None:
    for part in parts:
        part.run()


class BroadPhase:
    """The candidate pairs of a contact surface closer than a distance (Warp BVH queries).

    Args:
        surface: the :class:`~diffsim.contact.candidates.SurfacePrimitives`.
        dtype: the positions' dtype (float32 or float64); distances are measured in it.
    """

    def __init__(self, surface, dtype: torch.dtype) -> None:
        device = surface.rest_positions.device
        self.surface, self.dtype, self.device = surface, dtype, device
        n = len(surface.rest_positions)
        self.x = torch.zeros((n, 3), dtype=dtype, device=device)
        x_wp = wp.from_torch(self.x, dtype=VEC3[dtype])
        self._held = []  # int32 copies the Warp arrays point into
        vertices = self._int32(surface.vertices)
        faces, edges = self._int32(surface.faces), self._int32(surface.edges)
        # The sliver pairs are left out (candidates.sliver_pairs): each vertex's tet
        # neighbours, sorted (CSR), and the rest positions about their centroid.
        keys = surface.neighbours
        starts = torch.arange(n + 1, dtype=torch.int64, device=device) * n
        offsets = self._int32(torch.searchsorted(keys, starts))
        neighbours = self._int32(keys % n if len(keys) else torch.zeros(1, dtype=torch.int64))
        rest = (surface.rest_positions - surface.rest_positions.mean(dim=0)).contiguous()
        self._held.append(rest)
        rule = SliverRule()
        rule.offsets, rule.neighbours = offsets, neighbours
        rule.rest = wp.from_torch(rest, dtype=wp.vec3d)
        rule.fraction = SLIVER_FRACTION
        boxes = contact_kernels(SCALARS[dtype]).element_boxes
        kern = broad_phase_kernels(SCALARS[dtype])
        fraction = PARALLEL_FRACTION[dtype]
        self._box_launches, self._queries = [], []
        self._kern, self._fraction, self._rule = kern, fraction, rule
        self._vertices, self._faces, self._edges = vertices, faces, edges
        self._closing: list | None = None  # the swept test's launches (see closing)
        self._built_at: torch.Tensor | None = None  # the positions of the trees' last build
        self.builds = 0  # how many times the trees were built (refit in between)
        self._rebuild_offset = REBUILD_FRACTION * surface.mean_edge_length
        guess = max(1024, 8 * n)
        self._face_tree = self._edge_tree = None
        if len(surface.faces) and len(surface.vertices):
            lowers, uppers = self._boxes(boxes, x_wp, faces, 3)
            self._face_tree = [None, lowers, uppers]
            inputs = [0, x_wp, vertices, faces, 0.0, 0.0, fraction, rule]
            query = _Query(
                kern.near_vertex_face, len(surface.vertices), inputs, dtype, device, guess
            )
            self._queries.append((self._face_tree, query))
        if len(surface.edges) > 1:
            lowers, uppers = self._boxes(boxes, x_wp, edges, 2)
            self._edge_tree = [None, lowers, uppers]
            # Mollifier thresholds eps = (MOLLIFIER_FRACTION l_a^2) l_b^2 from rest lengths,
            # the products of contact.distances.mollifier_threshold.
            rest = surface.rest_positions[surface.edges]
            length2 = (rest[:, 1] - rest[:, 0]).square().sum(-1).contiguous()
            scaled = (MOLLIFIER_FRACTION * length2).contiguous()
            self._held += [length2, scaled]
            inputs = [0, x_wp, lowers, uppers, edges, wp.from_torch(scaled)]
            inputs += [wp.from_torch(length2), 0.0, 0.0, fraction, rule]
            query = _Query(
                kern.near_edge_edge, len(surface.edges), inputs, dtype, device, guess, True
            )
            self._queries.append((self._edge_tree, query))

    def _int32(self, t: torch.Tensor):
        t = t.to(torch.int32).contiguous()
        self._held.append(t)
        return wp.from_torch(t)

    def _boxes(self, kernel, x_wp, elements, corners: int):
        """Box arrays of the elements and the recorded launch that fills them from x."""
        n = elements.shape[0]
        lowers = wp.empty(n, dtype=wp.vec3, device=str(self.device))
        uppers = wp.empty(n, dtype=wp.vec3, device=str(self.device))
        launch = wp.launch(
            kernel,
            dim=n,
            inputs=[x_wp, elements, corners],
            outputs=[lowers, uppers],
            device=str(self.device),
            record_cmd=True,
        )
        self._box_launches.append(launch)
        return lowers, uppers

    def near(
        self, x: torch.Tensor, pad: float, within: float, launcher=None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The point-triangle rows ``(p, a, b, c)`` and edge-edge rows ``(p0, p1, q0, q1)``
        (``[k, 4]`` int64) of the pairs whose boxes lie within ``pad`` (m) along every
        axis (boxes in float32) and whose squared distance at ``x`` is below ``within**2``,
        their squared distances (x's dtype) and the edge pairs' mollifier thresholds
        (float64, as :func:`~diffsim.contact.distances.mollifier_threshold`): ``(pt, ee,
        d2_pt, d2_ee, eps)``. ``launcher``: runs the queries' parts on its CPU threads at
        once (a :class:`~diffsim.backends.warp.threads.SplitLauncher`)."""
        self.x.copy_(x)
        for launch in self._box_launches:
            launch.launch()
        empty = torch.zeros((0, 4), dtype=torch.int64, device=self.device)
        none = torch.zeros(0, dtype=torch.float64, device=self.device)
        found = [(empty, self.x.new_zeros(0)), (empty, self.x.new_zeros(0), none)]
        within2 = float(within) ** 2
        build = (
            self._built_at is None
            or relative_offset(self.x - self._built_at) > self._rebuild_offset
        )
        queries = [query for _, query in self._queries]
        if sum(query.dim for query in queries) < SPLIT_ELEMENTS:
            launcher = None
        if build:
            self._built_at = self.x.clone()
            self.builds += 1
            # The two trees at once, on two threads where the backend has them.
            _run_jobs([functools.partial(_build_tree, tree) for tree, _ in self._queries], launcher)
        for tree, query in self._queries:
            params = {}
            if build:
                params[0] = tree[0].id
            else:
                tree[0].refit()
            offset = 0 if tree is self._face_tree else 3  # near_edge_edge: boxes, lengths
            params[4 + offset] = float(pad)
            params[5 + offset] = within2
            query.set(params)
        _run_parts(queries, launcher)
        for tree, query in self._queries:
            found[0 if tree is self._face_tree else 1] = query.found()
        (pt, d2_pt), (ee, d2_ee, eps) = found
        return pt, ee, d2_pt, d2_ee, eps

    def closing(self, x: torch.Tensor, dx: torch.Tensor, needed: float, launcher=None) -> bool:
        """Whether some pair (not sharing a vertex, not a sliver pair) may come within
        ``needed`` (m) along the straight motion ``x + t dx``, t in [0, 1] (``x, dx [n, 3]``
        in the set's dtype): its distance at x less the most the motion can close it (the
        bound of :func:`~diffsim.contact.ccd.pair_reach`) is at most ``needed``.

        The trees are refit over the boxes the elements sweep (the next :meth:`near`
        refits them to its positions), so a body moving as a whole finds only its
        neighbouring elements, not every pair within its motion. ``launcher``: as
        :meth:`near`."""
        if self._face_tree is None and self._edge_tree is None:
            return False
        if self._closing is None:
            self._closing = self._closing_launches()
        swept, queries, count = self._closing
        self.x.copy_(x)
        self.dx.copy_(dx)
        for launch in swept:
            launch.launch()
        scale = float(x.abs().max()) + float(dx.abs().max()) if len(x) else 1.0
        pad = float(needed) + 1e-6 * scale  # the boxes are float32
        for tree, parts in queries:
            if tree[0] is None:  # no near() yet: a tree that the next one builds anew
                tree[0] = wp.Bvh(tree[1], tree[2], leaf_size=LEAF_SIZE)
            else:
                tree[0].refit()
            for launch in parts:
                args = len(launch.kernel.adj.args)  # .., pad, needed, fraction, rule, count
                launch.set_param_at_index(0, tree[0].id)
                launch.set_param_at_index(args - 5, pad)
                launch.set_param_at_index(args - 4, float(needed))
        count.zero_()
        jobs = [
            functools.partial(_launch_all, [parts[i] for _, parts in queries if i < len(parts)])
            for i in range(max(len(parts) for _, parts in queries))
        ]
        elements = sum(
            (self._vertices if t is self._face_tree else self._edges).shape[0] for t, _ in queries
        )
        _run_jobs(jobs, launcher if elements >= SPLIT_ELEMENTS else None)
        return int(count[0]) > 0

    def _closing_launches(self) -> tuple:
        """The recorded launches of :meth:`closing`: the swept boxes, the queries' parts
        (with their trees) and their shared counter."""
        device, kern = str(self.device), self._kern
        self.dx = torch.zeros_like(self.x)
        x_wp = wp.from_torch(self.x, dtype=VEC3[self.dtype])
        dx_wp = wp.from_torch(self.dx, dtype=VEC3[self.dtype])
        count = torch.zeros(1, dtype=torch.int32, device=self.device)
        swept, queries = [], []
        stride = PARTS if self.device.type == "cpu" else 1
        zero = SCALARS[self.dtype](0.0)
        for tree, elements, corners in (
            (self._face_tree, self._faces, 3),
            (self._edge_tree, self._edges, 2),
        ):
            if tree is None:
                continue
            swept.append(
                wp.launch(
                    kern.swept_boxes,
                    dim=elements.shape[0],
                    inputs=[x_wp, dx_wp, elements, corners],
                    outputs=[tree[1], tree[2]],
                    device=device,
                    record_cmd=True,
                )
            )
            if tree is self._face_tree:
                kernel, dim = kern.closing_vertex_face, self._vertices.shape[0]
                middle = [x_wp, dx_wp, self._vertices, self._faces]
            else:
                kernel, dim = kern.closing_edge_edge, self._edges.shape[0]
                middle = [x_wp, dx_wp, tree[1], tree[2], self._edges]
            parts = []
            for first in range(min(stride, dim)):
                inputs = [0, first, stride, *middle, 0.0, zero, self._fraction, self._rule]
                parts.append(
                    wp.launch(
                        kernel,
                        dim=(dim - first + stride - 1) // stride,
                        inputs=inputs,
                        outputs=[wp.from_torch(count)],
                        device=device,
                        record_cmd=True,
                    )
                )
            queries.append((tree, parts))
        return swept, queries, count


def _launch_all(launches: list) -> None:
    for launch in launches:
        launch.launch()


class _Launcher:
    """Recorded launches of the checks' kernels: recorded on first use per kernel and
    argument layout (tensors' dtypes and ranks, the numbers), then re-pointed at each call's
    tensors (data, shape, strides), a few microseconds instead of the ~100 that wrapping and
    packing every argument anew costs on the CPU."""

    def __init__(self) -> None:
        self._recorded: dict = {}

    def __call__(self, kernel, dim: tuple, args: list, device: torch.device) -> None:
        if not all(dim):
            return
        key = (kernel, str(device), *(_layout(a) for a in args))
        recorded = self._recorded.get(key)
        if recorded is None:
            types = [a.type for a in kernel.adj.args]
            wrapped = [
                wp.from_torch(a, dtype=t.dtype) if isinstance(a, torch.Tensor) else a
                for a, t in zip(args, types, strict=True)
            ]
            launch = wp.launch(kernel, dim=dim, inputs=wrapped, device=str(device), record_cmd=True)
            recorded = self._recorded[key] = [launch, dim]
        launch = recorded[0]
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                param = launch.params[i + 1]
                param.data = a.data_ptr()
                size = a.element_size()
                for d in range(param.ndim):
                    param.shape[d] = a.shape[d]
                    param.strides[d] = a.stride(d) * size
        if recorded[1] != dim:
            launch.set_dim(dim)
            recorded[1] = dim
        launch.launch()


def _layout(arg):
    """What a recorded launch fixes about an argument."""
    if isinstance(arg, torch.Tensor):
        return (arg.dim(), arg.dtype, arg.device)
    if isinstance(arg, (int, float)):
        return arg
    return tuple(float(v) for v in arg)  # a Warp vector


_launch = _Launcher()


def frame_distances(frames: torch.Tensor, pairs: torch.Tensor, n_point_triangle: int):
    """Distances (m) ``[F, k]`` of the pairs ``[k, 4]`` (the first ``n_point_triangle``
    point-triangle rows, then edge-edge rows) in each of the frames ``[F, n, 3]``, by the
    formulas of the ``pair_distances`` kernel."""
    return _measure(frames, pairs, n_point_triangle, root=1)


def squared_distances(x: torch.Tensor, point_triangle: torch.Tensor, edge_edge: torch.Tensor):
    """Squared distances ``[k1 + k2]`` (m^2) at ``x [n, 3]`` of the point-triangle pairs
    ``[k1, 4]`` and then the edge-edge pairs ``[k2, 4]`` (vertex ids), by the formulas of the
    ``pair_distances`` kernel (the same values: a few of a set's pairs measured without the
    others)."""
    pairs = torch.cat([point_triangle, edge_edge])
    return _measure(x[None], pairs, len(point_triangle), root=0)[0]


def _measure(frames: torch.Tensor, pairs: torch.Tensor, n_point_triangle: int, root: int):
    f, dtype, device = len(frames), frames.dtype, frames.device
    out = torch.empty((f, len(pairs)), dtype=dtype, device=device)
    kinds = torch.full((len(pairs),), EDGE_EDGE, dtype=torch.int32, device=device)
    kinds[:n_point_triangle] = POINT_TRIANGLE
    args = [frames.contiguous(), pairs.to(torch.int32).contiguous(), kinds]
    args += [PARALLEL_FRACTION[dtype], root, out]
    _launch(broad_phase_kernels(SCALARS[dtype]).frame_distances, (f, len(pairs)), args, device)
    return out


def any_closing(
    x: torch.Tensor, dx: torch.Tensor, pairs: torch.Tensor, n_point_triangle: int, needed: float
) -> bool:
    """Whether any of the pairs ``[k, 4]`` (the first ``n_point_triangle`` point-triangle
    rows, then edge-edge rows) may come within ``needed`` (m) along the straight motion
    ``x + t dx``, t in [0, 1] (``x, dx [n, 3]``, one dtype), by the bound of
    :meth:`BroadPhase.closing`, in one kernel pass."""
    if not len(pairs):
        return False
    device = x.device
    kinds = torch.full((len(pairs),), EDGE_EDGE, dtype=torch.int32, device=device)
    kinds[:n_point_triangle] = POINT_TRIANGLE
    count = torch.zeros(1, dtype=torch.int32, device=device)
    args = [pairs.to(torch.int32).contiguous(), kinds, x.contiguous(), dx.contiguous()]
    args += [float(needed), PARALLEL_FRACTION[x.dtype], count]
    _launch(broad_phase_kernels(SCALARS[x.dtype]).pairs_closing, (len(pairs),), args, device)
    return int(count[0]) > 0


def frame_offset_bounds(
    frames: torch.Tensor, origin: torch.Tensor, anchor: torch.Tensor, launcher=None
):
    """For local positions ``frames [F, n, 3] - origin`` (frames float32 or float64, read
    as float64): the componentwise bounds ``(lo, hi)`` (float64) over the vertices, per
    frame, of the positions less the first frame's ``[F, 3]``, of the steps between frames
    ``[F - 1, 3]`` and of the positions less ``anchor [n, 3]`` (float64) ``[F, 3]`` (the
    values ``torch.aminmax`` gives on the same differences in float64), and per frame the
    largest distance ``[F]`` of a vertex from its straight path from the first frame to the
    last (at the fraction ``f / (F - 1)`` of it), in one pass; None where a position is not
    finite. ``launcher``: splits the frames between its CPU threads (every other frame
    each)."""
    f, device = len(frames), frames.device
    out = torch.empty((6, f, 3), dtype=torch.float64, device=device)
    off_chord = torch.empty(f, dtype=torch.float64, device=device)
    bad = torch.zeros(1, dtype=torch.int32, device=device)
    origin = wp.vec3d(*origin.tolist())
    args = [frames.contiguous(), origin, anchor.contiguous(), *out, off_chord, bad]
    kernel = broad_phase_kernels(SCALARS[frames.dtype]).frame_bounds
    split = launcher is not None and device.type == "cpu" and f > 1
    parts = launcher.threads if split and f * frames.shape[1] >= SPLIT_VERTEX_FRAMES else 1
    jobs = [
        functools.partial(
            _launch, kernel, ((f - i + parts - 1) // parts,), [i, parts, *args], device
        )
        for i in range(min(parts, f))
    ]
    _run_jobs(jobs, launcher)
    if int(bad[0]):
        return None
    lo0, hi0, los, his, loa, hia = out
    return lo0, hi0, los[: f - 1], his[: f - 1], loa, hia, off_chord
