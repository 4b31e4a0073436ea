"""The torch side of the Warp contact kernels (:mod:`diffsim.kernels.contact`).

Converts tensors to Warp arrays and launches the kernels: the BVH broad phase, the barrier
forces and their vector-Jacobian products (the kernel's Warp adjoint), surface friction (a
``torch.autograd.Function`` whose backward runs the kernels' Warp adjoints), the pairs'
squared distances and the CCD step scales (the algorithm of :mod:`diffsim.contact.ccd`).
"""

import torch
import warp as wp

from diffsim.contact.ccd import (
    ABSOLUTE_ROUNDS,
    EQUALIZE_ROUNDS,
    MIN_GAP_FRACTION,
    SCALE_SLACK,
)
from diffsim.contact.distances import PARALLEL_FRACTION
from diffsim.kernels.contact import (
    EDGE_EDGE,
    POINT_TRIANGLE,
    contact_kernels,
)
from diffsim.kernels.runtime import init_warp

init_warp()

SCALARS = {torch.float32: wp.float32, torch.float64: wp.float64}


def kernels(dtype: torch.dtype):
    """The contact kernels for a torch dtype (float32 or float64)."""
    return contact_kernels(SCALARS[dtype])


def _vec3(t: torch.Tensor):
    vec3 = {torch.float32: wp.vec3f, torch.float64: wp.vec3d}[t.dtype]
    return wp.from_torch(t.contiguous(), dtype=vec3)


def _int32(t: torch.Tensor):
    return wp.from_torch(t.to(torch.int32).contiguous())


# Recorded launches by kernel and argument signature, shared by every candidate set (a
# new set re-points them instead of recording its own: the colliding spheres rebuild their
# set every 3-4 substeps).
_LAUNCHES: dict = {}


class PairArrays:
    """Candidate pairs in Warp form: ``[k, 4]`` int32 vertex ids, kinds and mollifier eps."""

    def __init__(self, candidates, dtype: torch.dtype) -> None:
        pt, ee = candidates.point_triangle, candidates.edge_edge
        self.n = len(pt) + len(ee)
        device = pt.device
        self.pairs = torch.cat([pt, ee]).to(torch.int32).reshape(-1, 4).contiguous()
        self.kinds = torch.cat(
            [
                torch.full((len(pt),), POINT_TRIANGLE, dtype=torch.int32, device=device),
                torch.full((len(ee),), EDGE_EDGE, dtype=torch.int32, device=device),
            ]
        )
        self.eps = torch.cat(
            [torch.ones(len(pt), dtype=dtype, device=device), candidates.mollifier_eps.to(dtype)]
        )
        self._active = None  # (key, x, (list, count)) of the last active_at call

    def active_at(
        self, x: torch.Tensor, s_hat: float, index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pairs closer than ``sqrt(s_hat)`` (m) at positions x, among the rows ``index``
        (int64, default all): ``(list [k], count [1])`` int32 tensors, the pair ids in
        ``list[:count]``, written by one kernel pass (no sync).

        The last result is reused for the same unchanged tensors (the barrier forces and
        the friction of one substep, and the forces' backward right after).
        """
        x = x.detach().contiguous()
        key = (x.data_ptr(), x._version, x.shape, x.stride(), x.dtype, float(s_hat))
        if index is not None:
            index = index.contiguous()
            key += (index.data_ptr(), index._version, index.shape)
        cached = self._active
        if cached is not None and cached[0] == key:
            return cached[2]
        listed = self._listed_within(x, s_hat, index)
        # x and index are held so that their memory, and so the key, is not reused.
        self._active = (key, (x, index), listed)
        return listed

    def within(self, x: torch.Tensor, distance: float, index: torch.Tensor) -> torch.Tensor:
        """The rows (int64, ascending) among ``index`` of the pairs closer than
        ``distance`` (m) at x (a pass of the active-pair kernel; not cached)."""
        found, count = self._listed_within(x.detach().contiguous(), distance**2, index)
        return torch.sort(found[: int(count[0])].long()).values

    def _listed_within(
        self, x: torch.Tensor, s_hat: float, index: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass of the active-pair kernel (contiguous x): ``(list, count)``."""
        rows = self.n if index is None else len(index)
        count = torch.zeros(1, dtype=torch.int32, device=x.device)
        found = torch.empty(max(rows, 1), dtype=torch.int32, device=x.device)
        if rows:
            inputs = [x, self.pairs, self.kinds, float(s_hat), _parallel_fraction(x.dtype)]
            kern = kernels(x.dtype)
            if index is None:
                self.launch(kern.active_pairs, rows, inputs, [count, found])
            else:
                inputs.append(index.contiguous())
                self.launch(kern.active_pairs_in, rows, inputs, [count, found])
        return found, count

    def launch(
        self,
        kernel,
        dim: int,
        inputs: list,
        outputs: list,
        adj_inputs: list | None = None,
        adj_outputs: list | None = None,
    ) -> None:
        """Launches ``kernel`` (its adjoint where ``adj_inputs`` is given) on arguments that
        may be torch tensors (contiguous; wrapped as the kernel's argument type), Warp
        arrays, None or Python numbers.

        The launch is recorded on first use for its signature (the tensors' dtypes and shapes
        but their first dimension, the numbers' types, the arrays themselves), once for all
        candidate sets; later calls only re-point the recorded tensor arguments at the new
        tensors' memory and length, set the numbers (and the launch's dim), a microsecond
        each instead of the tens of microseconds that wrapping and packing every argument
        costs.
        """
        if dim == 0:
            return
        adjoint = adj_inputs is not None
        args = [*inputs, *outputs, *((adj_inputs or []) + (adj_outputs or []))]
        key = (kernel, adjoint, *map(_signature, args))
        recorded = _LAUNCHES.get(key)
        if recorded is None:
            recorded = self._record(kernel, dim, args, adjoint, len(inputs) + len(outputs))
            _LAUNCHES[key] = recorded
        launch, tensors, numbers, recorded_dim = recorded
        params = launch.params
        for slot in tensors:
            param, t = params[slot + 1], args[slot]
            param.data = t.data_ptr()
            param.shape[0] = t.shape[0]
        for slot in numbers:
            params[slot + 1].value = args[slot]
        if recorded_dim != dim:
            launch.set_dim(dim)
            recorded[3] = dim
        launch.launch()

    def _record(self, kernel, dim: int, args: list, adjoint: bool, n_forward: int):
        types = [a.type for a in kernel.adj.args]
        types = types + types if adjoint else types
        wrapped = [
            wp.from_torch(a, dtype=t.dtype) if isinstance(a, torch.Tensor) else a
            for a, t in zip(args, types, strict=True)
        ]
        launch = wp.launch(
            kernel,
            dim=dim,
            inputs=wrapped[:n_forward],
            adj_inputs=wrapped[n_forward:],
            adjoint=adjoint,
            device=str(self.pairs.device),
            record_cmd=True,
        )
        tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        numbers = [i for i, a in enumerate(args) if isinstance(a, (int, float))]
        return [launch, tensors, numbers, dim]


def _listed(count: torch.Tensor, arrays: PairArrays) -> int:
    """Threads for a kernel over an active list: its length on the CPU (read for free), so
    no thread runs for nothing (an adjoint thread zeroes all its adjoint variables first,
    whether or not it exits early); on a GPU every row, so nothing waits for the count."""
    return int(count[0]) if count.device.type == "cpu" else arrays.n


def _signature(arg):
    """What a recorded launch fixes about an argument (tensors: their dtype and shape but
    the first dimension)."""
    if isinstance(arg, torch.Tensor):
        if not arg.is_contiguous() or arg.dim() == 0:
            raise ValueError("Warp launch arguments must be contiguous tensors of dim >= 1")
        return (arg.shape[1:], arg.dtype, arg.device)
    if isinstance(arg, (int, float)):
        return type(arg)  # the value is set at each launch
    if arg is None:
        return arg
    return id(arg)


def pair_arrays(candidates, dtype: torch.dtype) -> PairArrays:
    """The :class:`PairArrays` of a candidate set, built once per set and dtype (kept in
    ``candidates.derived``)."""
    cache = candidates.derived
    arrays = cache.get(dtype)
    if arrays is None:
        arrays = cache[dtype] = PairArrays(candidates, dtype)
    return arrays


def pair_selection(candidates, dtype: torch.dtype) -> tuple[PairArrays, torch.Tensor | None]:
    """``(arrays, index)``: the pairs of a candidate set as rows ``index`` of the arrays of
    its parent set, where it is a subset (``Candidates.subset``; the kernels then run over
    the parent's arrays, recorded once, instead of new ones per subset), else its own arrays
    and None (all rows)."""
    parent = candidates.derived.get("parent")
    if parent is None:
        return pair_arrays(candidates, dtype), None
    return pair_arrays(parent, dtype), candidates.derived["index"]


def _parallel_fraction(dtype: torch.dtype) -> float:
    return PARALLEL_FRACTION[dtype]


def _force_inputs(
    arrays: "PairArrays", x, mass, dhat: float, floor: float, kappa: float, index
) -> list:
    return [
        x.detach().contiguous(),
        mass.detach().contiguous(),
        arrays.pairs,
        arrays.kinds,
        arrays.eps,
        *arrays.active_at(x, dhat**2, index),
        float(dhat**2),
        float(floor),
        float(kappa),
        _parallel_fraction(x.dtype),
    ]


def forces_forward(
    arrays: PairArrays,
    x: torch.Tensor,
    mass: torch.Tensor,
    dhat: float,
    floor: float,
    kappa: float,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Barrier forces ``[n, 3]`` (no autograd) of the pairs (its rows ``index``, default
    all) within dhat."""
    f = torch.zeros_like(x)
    if arrays.n:
        inputs = _force_inputs(arrays, x, mass, dhat, floor, kappa, index)
        dim = _listed(inputs[6], arrays)
        arrays.launch(kernels(x.dtype).barrier_forces, dim, inputs, [f])
    return f


def forces_backward(
    arrays: PairArrays,
    x: torch.Tensor,
    mass: torch.Tensor,
    dhat: float,
    floor: float,
    kappa: float,
    grad_f: torch.Tensor,
    index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vector-Jacobian products of the forces: ``(grad_x [n, 3], grad_mass [n])``."""
    grad_x = torch.zeros_like(x)
    grad_m = torch.zeros_like(mass)
    if arrays.n:
        inputs = _force_inputs(arrays, x, mass, dhat, floor, kappa, index)
        adj_inputs = [grad_x, grad_m, None, None, None, None, None, *inputs[7:]]
        kernel = kernels(x.dtype).barrier_forces
        dim = _listed(inputs[6], arrays)
        arrays.launch(kernel, dim, inputs, [torch.zeros_like(x)], adj_inputs, [grad_f.contiguous()])
    return grad_x, grad_m


def squared_distances(arrays: PairArrays, x: torch.Tensor) -> torch.Tensor:
    """Squared distances ``[k]`` (m^2) of the pairs (as ``contact.potential.pair_distances``,
    point-triangle pairs first; no autograd)."""
    d2 = torch.empty(arrays.n, dtype=x.dtype, device=x.device)
    if arrays.n:
        inputs = [x.detach().contiguous(), arrays.pairs, arrays.kinds]
        inputs.append(_parallel_fraction(x.dtype))
        arrays.launch(kernels(x.dtype).pair_distances, arrays.n, inputs, [d2])
    return d2


def step_scales(
    arrays: PairArrays, x: torch.Tensor, dx: torch.Tensor, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-vertex CCD step scales ``[n]`` (the algorithm of :mod:`diffsim.contact.ccd`)
    from the pairs (its rows ``rows``, default all: the others must be unable to limit any
    scaled step).

    One kernel launch when no vertex is limited (the usual case); otherwise one more per
    verification round, each followed by a read of the failing-pair count.
    """
    alpha = torch.ones(len(x), dtype=x.dtype, device=x.device)
    pairs, kinds = arrays.pairs, arrays.kinds
    if rows is not None:
        pairs, kinds = pairs[rows], kinds[rows]
    n = len(pairs)
    if not n:
        return alpha
    kern = kernels(x.dtype)
    dx = dx.detach().contiguous()
    bound = torch.empty(n, dtype=x.dtype, device=x.device)
    t_abs = torch.empty_like(bound)
    inputs = [x.detach().contiguous(), dx, pairs, kinds]
    inputs += [float(MIN_GAP_FRACTION), float(SCALE_SLACK), _parallel_fraction(x.dtype)]
    arrays.launch(kern.step_scales, n, inputs, [alpha, bound, t_abs])
    if bool((alpha == 1).all()):
        return alpha
    settled = torch.zeros(n, dtype=torch.int32, device=x.device)
    failing = torch.zeros(1, dtype=torch.int32, device=x.device)

    def round_(mode: int) -> torch.Tensor:
        out = alpha.clone()
        failing.zero_()
        inputs = [dx, pairs, kinds, bound, t_abs, alpha, mode, settled]
        arrays.launch(kern.verify_scales, n, inputs, [out, failing])
        return out

    for r in range(EQUALIZE_ROUNDS + ABSOLUTE_ROUNDS):
        out = round_(0 if r < EQUALIZE_ROUNDS else 1)
        if int(failing[0]) == 0:
            return alpha
        alpha = out
    return round_(2)


def friction(
    v: torch.Tensor,
    x: torch.Tensor,
    mass: torch.Tensor,
    arrays: PairArrays,
    h: float,
    dhat: float,
    floor: float,
    kappa: float,
    mu: float,
    eps_v: float,
    index: torch.Tensor | None = None,
    passes: int = 1,
) -> torch.Tensor:
    """Velocities ``[n, 3]`` after one substep h of surface friction over the pairs of
    ``arrays`` (its rows ``index``, default all) within dhat, in ``passes`` passes (the
    formulas of :mod:`diffsim.contact.friction`); differentiable in v, x and mass (backward:
    the kernels' Warp adjoints, in reverse). x, v and mass share one dtype; ``floor`` is the
    squared-distance floor (m^2)."""
    constants = (h * mu, dhat, floor, kappa, eps_v, int(passes))
    return _WarpFriction.apply(v, x, mass, arrays, index, constants)


def _geometry_inputs(arrays: PairArrays, x, mass, active, constants) -> list:
    h_mu, dhat, floor, kappa = constants[:4]
    return [
        x.contiguous(),
        mass.contiguous(),
        arrays.pairs,
        arrays.kinds,
        arrays.eps,
        *active,
        float(dhat**2),
        float(floor),
        float(kappa),
        _parallel_fraction(x.dtype),
        float(h_mu),
    ]


def _per_pair(rows: int, v: torch.Tensor, width: int = 0) -> torch.Tensor:
    """A zeroed per-pair buffer ``[rows]`` or ``[rows, width]`` (rows: the active list's
    order, as many as the kernels' threads)."""
    shape = (rows, width) if width else (rows,)
    return torch.zeros(shape, dtype=v.dtype, device=v.device)


def _geometry_buffers(dim: int, v: torch.Tensor) -> list:
    """Zeroed lagged pair terms of ``dim`` listed pairs: weights ``[dim, 4]``, coef
    ``[dim, 4]``, normal ``[dim, 3]``, m_eff ``[dim]``, limit ``[dim]``."""
    return [
        _per_pair(dim, v, 4),
        _per_pair(dim, v, 4),
        _per_pair(dim, v, 3),
        _per_pair(dim, v),
        _per_pair(dim, v),
    ]


class _WarpFriction(torch.autograd.Function):
    """Surface friction by kernels: the lagged pair terms once, then per pass the pairs'
    impulses and vertex loads and the capped, relaxed update; backward by their Warp
    adjoints, in reverse order (every pass's inputs are kept)."""

    @staticmethod
    def forward(ctx, v, x, mass, arrays: PairArrays, index, constants: tuple):
        v, x, mass = v.detach(), x.detach(), mass.detach()
        if not (v.dtype == x.dtype == mass.dtype):
            raise TypeError(
                f"friction: v, x and mass dtypes differ: {v.dtype}, {x.dtype}, {mass.dtype}"
            )
        ctx.empty = not arrays.n
        if ctx.empty:
            return v.clone()
        kern = kernels(v.dtype)
        eps_v, passes = constants[4], constants[5]
        active = arrays.active_at(x, constants[1] ** 2, index)
        dim = _listed(active[1], arrays)
        geometry = _geometry_buffers(dim, v)
        inputs = _geometry_inputs(arrays, x, mass, active, constants)
        arrays.launch(kern.friction_geometry, dim, inputs, geometry)
        weights, coef, normal, m_eff, limit = geometry
        velocities, totals, loads, impulses = [v.contiguous()], [_per_pair(dim, v, 3)], [], []
        for _ in range(passes):
            load, impulse = (
                torch.zeros(len(v), dtype=v.dtype, device=v.device),
                _per_pair(dim, v, 3),
            )
            slip_inputs = [arrays.pairs, *active, weights, normal, m_eff, limit]
            arrays.launch(
                kern.friction_slip, dim, [*slip_inputs, velocities[-1], eps_v], [load, impulse]
            )
            out, total = velocities[-1].clone(), _per_pair(dim, v, 3)
            apply_inputs = [arrays.pairs, *active, coef, limit, impulse, load, totals[-1]]
            arrays.launch(kern.friction_apply, dim, apply_inputs, [total, out])
            velocities.append(out)
            totals.append(total)
            loads.append(load)
            impulses.append(impulse)
        ctx.arrays, ctx.constants, ctx.passes = arrays, constants, passes
        ctx.save_for_backward(
            x, mass, *active, *geometry, *velocities[:-1], *totals[:-1], *loads, *impulses
        )
        return velocities[-1]

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.empty:
            return grad_out, None, None, None, None, None
        passes, arrays, constants = ctx.passes, ctx.arrays, ctx.constants
        saved = list(ctx.saved_tensors)
        x, mass, active, count = saved[:4]
        geometry = saved[4:9]
        weights, coef, normal, m_eff, limit = geometry
        velocities, totals, loads, impulses = (
            saved[9 + p * passes : 9 + (p + 1) * passes] for p in range(4)
        )
        kern = kernels(x.dtype)
        dim = _listed(count, arrays)
        adj_v = grad_out.contiguous().clone()
        adj_total = _per_pair(dim, adj_v, 3)
        adj_geometry = _geometry_buffers(dim, adj_v)  # accumulated over the passes
        adj_weights, adj_coef, adj_normal, adj_m_eff, adj_limit = adj_geometry
        scratch_total, scratch_v = _per_pair(dim, adj_v, 3), torch.zeros_like(adj_v)
        scratch_load = torch.zeros(len(adj_v), dtype=x.dtype, device=x.device)
        scratch_impulse = _per_pair(dim, adj_v, 3)
        eps_v = constants[4]
        for p in reversed(range(passes)):
            # The update's adjoint (its forward replay writes into scratch buffers); the
            # velocities pass through it (v_out starts as a copy of v).
            adj_impulse, adj_total_in = _per_pair(dim, adj_v, 3), _per_pair(dim, adj_v, 3)
            adj_load = torch.zeros(len(adj_v), dtype=x.dtype, device=x.device)
            arrays.launch(
                kern.friction_apply,
                dim,
                [arrays.pairs, active, count, coef, limit, impulses[p], loads[p], totals[p]],
                [scratch_total, scratch_v],
                [None, None, None, adj_coef, adj_limit, adj_impulse, adj_load, adj_total_in],
                [adj_total, adj_v],
            )
            # The slip's adjoint adds to the velocities' cotangent.
            adj_v_in = adj_v.clone()
            arrays.launch(
                kern.friction_slip,
                dim,
                [arrays.pairs, active, count, weights, normal, m_eff, limit, velocities[p]]
                + [eps_v],
                [scratch_load, scratch_impulse],
                [None, None, None, adj_weights, adj_normal, adj_m_eff, adj_limit, adj_v_in]
                + [eps_v],
                [adj_load, adj_impulse],
            )
            adj_v, adj_total = adj_v_in, adj_total_in
        grad_x, grad_m = torch.zeros_like(x), torch.zeros_like(mass)
        inputs = _geometry_inputs(arrays, x, mass, (active, count), constants)
        arrays.launch(
            kern.friction_geometry,
            dim,
            inputs,
            _geometry_buffers(dim, adj_v),
            [grad_x, grad_m, None, None, None, None, None, *inputs[7:]],
            adj_geometry,
        )
        return adj_v, grad_x, grad_m, None, None, None
