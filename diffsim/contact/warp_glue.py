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
    query_edge_edge,
    query_vertex_face,
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


def _vec4(t: torch.Tensor):
    vec4 = {torch.float32: wp.vec4f, torch.float64: wp.vec4d}[t.dtype]
    return wp.from_torch(t.contiguous(), dtype=vec4)


def _int32(t: torch.Tensor):
    return wp.from_torch(t.to(torch.int32).contiguous())


def _boxes(x_wp, elements: torch.Tensor, dtype: torch.dtype, device: str):
    n = len(elements)
    lowers = wp.empty(n, dtype=wp.vec3, device=device)
    uppers = wp.empty(n, dtype=wp.vec3, device=device)
    if n:
        wp.launch(
            kernels(dtype).element_boxes,
            dim=n,
            inputs=[x_wp, _int32(elements), elements.shape[1]],
            outputs=[lowers, uppers],
            device=device,
        )
    return lowers, uppers


def _collect(kernel, dim: int, inputs: list, device: str, guess: int) -> torch.Tensor:
    """Runs a pair-writing query kernel, growing the output until every pair fits."""
    capacity = max(guess, 1024)
    while True:
        count = wp.zeros(1, dtype=wp.int32, device=device)
        out = wp.empty((capacity, 2), dtype=wp.int32, device=device)
        if dim:
            wp.launch(kernel, dim=dim, inputs=[*inputs, count, out], device=device)
        found = int(count.numpy()[0])
        if found <= capacity:
            return wp.to_torch(out)[:found].to(torch.int64)
        capacity = found


def bvh_candidates(surface, x: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertex-face ``[k1, 2]`` and edge-edge ``[k2, 2]`` candidate index pairs (Warp BVH).

    Boxes are built in float32 and padded by ``radius`` plus a relative slack that covers the
    float32 rounding of the coordinates.
    """
    device = str(x.device)
    dtype = x.dtype
    x_wp = _vec3(x)
    scale = float(x.abs().max()) if len(x) else 1.0
    pad = float(radius) + 1e-6 * scale
    f_lo, f_hi = _boxes(x_wp, surface.faces, dtype, device)
    e_lo, e_hi = _boxes(x_wp, surface.edges, dtype, device)
    v_lo, v_hi = _boxes(x_wp, surface.vertices[:, None], dtype, device)
    vf = torch.zeros((0, 2), dtype=torch.int64, device=x.device)
    ee = torch.zeros((0, 2), dtype=torch.int64, device=x.device)
    if len(surface.faces) and len(surface.vertices):
        bvh_f = wp.Bvh(f_lo, f_hi)
        inputs = [bvh_f.id, v_lo, v_hi, _int32(surface.vertices), _int32(surface.faces), pad]
        vf = _collect(query_vertex_face, len(surface.vertices), inputs, device, 8 * len(x))
    if len(surface.edges) > 1:
        bvh_e = wp.Bvh(e_lo, e_hi)
        inputs = [bvh_e.id, e_lo, e_hi, _int32(surface.edges), pad]
        ee = _collect(query_edge_edge, len(surface.edges), inputs, device, 8 * len(x))
    return vf, ee


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
        self.wp_pairs = wp.from_torch(self.pairs)
        self.wp_kinds = wp.from_torch(self.kinds)
        self.wp_eps = wp.from_torch(self.eps)


def pair_arrays(candidates, dtype: torch.dtype) -> PairArrays:
    """The :class:`PairArrays` of a candidate set, built once per set and dtype (kept in
    ``candidates.warp_cache``)."""
    cache = candidates.warp_cache
    arrays = cache.get(dtype)
    if arrays is None:
        arrays = cache[dtype] = PairArrays(candidates, dtype)
    return arrays


def _parallel_fraction(dtype: torch.dtype) -> float:
    return PARALLEL_FRACTION[dtype]


def _force_inputs(arrays: "PairArrays", x, mass, dhat: float, floor: float, kappa: float) -> list:
    scalar = SCALARS[x.dtype]
    return [
        _vec3(x),
        wp.from_torch(mass.contiguous()),
        arrays.wp_pairs,
        arrays.wp_kinds,
        arrays.wp_eps,
        scalar(dhat**2),
        scalar(floor),
        scalar(kappa),
        scalar(_parallel_fraction(x.dtype)),
    ]


def forces_forward(
    arrays: PairArrays, x: torch.Tensor, mass: torch.Tensor, dhat: float, floor: float, kappa: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Barrier forces ``[n, 3]`` and per-pair energies ``[k]`` (no autograd)."""
    f = torch.zeros_like(x)
    energy = torch.zeros(arrays.n, dtype=x.dtype, device=x.device)
    if arrays.n:
        wp.launch(
            kernels(x.dtype).barrier_forces,
            dim=arrays.n,
            inputs=_force_inputs(arrays, x, mass, dhat, floor, kappa),
            outputs=[_vec3(f), wp.from_torch(energy)],
            device=str(x.device),
        )
    return f, energy


def forces_backward(
    arrays: PairArrays,
    x: torch.Tensor,
    mass: torch.Tensor,
    dhat: float,
    floor: float,
    kappa: float,
    grad_f: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vector-Jacobian products of the forces: ``(grad_x [n, 3], grad_mass [n])``."""
    grad_x = torch.zeros_like(x)
    grad_m = torch.zeros_like(mass)
    if arrays.n:
        inputs = _force_inputs(arrays, x, mass, dhat, floor, kappa)
        adj_inputs = [_vec3(grad_x), wp.from_torch(grad_m), None, None, None, *inputs[5:]]
        f = torch.zeros_like(x)
        energy = torch.zeros(arrays.n, dtype=x.dtype, device=x.device)
        adj_energy = torch.zeros_like(energy)
        wp.launch(
            kernels(x.dtype).barrier_forces,
            dim=arrays.n,
            inputs=inputs,
            outputs=[_vec3(f), wp.from_torch(energy)],
            adj_inputs=adj_inputs,
            adj_outputs=[_vec3(grad_f.contiguous()), wp.from_torch(adj_energy)],
            adjoint=True,
            device=str(x.device),
        )
    return grad_x, grad_m


def squared_distances(arrays: PairArrays, x: torch.Tensor) -> torch.Tensor:
    """Squared distances ``[k]`` (m^2) of the pairs (as ``contact.potential.pair_distances``,
    point-triangle pairs first; no autograd)."""
    d2 = torch.empty(arrays.n, dtype=x.dtype, device=x.device)
    if arrays.n:
        scalar = SCALARS[x.dtype]
        wp.launch(
            kernels(x.dtype).pair_distances,
            dim=arrays.n,
            inputs=[
                _vec3(x.detach()),
                arrays.wp_pairs,
                arrays.wp_kinds,
                scalar(_parallel_fraction(x.dtype)),
            ],
            outputs=[wp.from_torch(d2)],
            device=str(x.device),
        )
    return d2


def step_scales(arrays: PairArrays, x: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Per-vertex CCD step scales ``[n]`` (the algorithm of :mod:`diffsim.contact.ccd`).

    One kernel launch when no vertex is limited (the usual case); otherwise one more per
    verification round, each followed by a read of the failing-pair count.
    """
    alpha = torch.ones(len(x), dtype=x.dtype, device=x.device)
    if not arrays.n:
        return alpha
    device = str(x.device)
    scalar = SCALARS[x.dtype]
    kern = kernels(x.dtype)
    dx_wp = _vec3(dx.detach())
    bound = torch.empty(arrays.n, dtype=x.dtype, device=x.device)
    t_abs = torch.empty_like(bound)
    bound_wp, t_abs_wp = wp.from_torch(bound), wp.from_torch(t_abs)
    wp.launch(
        kern.step_scales,
        dim=arrays.n,
        inputs=[
            _vec3(x.detach()),
            dx_wp,
            arrays.wp_pairs,
            arrays.wp_kinds,
            scalar(MIN_GAP_FRACTION),
            scalar(SCALE_SLACK),
            scalar(_parallel_fraction(x.dtype)),
        ],
        outputs=[wp.from_torch(alpha), bound_wp, t_abs_wp],
        device=device,
    )
    if bool((alpha == 1).all()):
        return alpha
    settled = torch.zeros(arrays.n, dtype=torch.int32, device=x.device)
    failing = torch.zeros(1, dtype=torch.int32, device=x.device)
    settled_wp, failing_wp = wp.from_torch(settled), wp.from_torch(failing)

    def round_(mode: int) -> torch.Tensor:
        out = alpha.clone()
        failing.zero_()
        wp.launch(
            kern.verify_scales,
            dim=arrays.n,
            inputs=[
                dx_wp,
                arrays.wp_pairs,
                arrays.wp_kinds,
                bound_wp,
                t_abs_wp,
                wp.from_torch(alpha),
                mode,
                settled_wp,
            ],
            outputs=[wp.from_torch(out), failing_wp],
            device=device,
        )
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
) -> torch.Tensor:
    """Velocities ``[n, 3]`` after one substep h of surface friction over the pairs of
    ``arrays`` within dhat (the formulas of :mod:`diffsim.contact.friction`); differentiable
    in v, x and mass (backward: the kernels' Warp adjoints). x, v and mass share one dtype;
    ``floor`` is the squared-distance floor (m^2)."""
    return _WarpFriction.apply(v, x, mass, arrays, (h * mu, dhat, floor, kappa, eps_v))


def _friction_inputs(arrays: PairArrays, x, v, mass, constants) -> list:
    h_mu, dhat, floor, kappa, eps_v = constants
    scalar = SCALARS[x.dtype]
    return [
        _vec3(x),
        _vec3(v),
        wp.from_torch(mass.contiguous()),
        arrays.wp_pairs,
        arrays.wp_kinds,
        arrays.wp_eps,
        scalar(dhat**2),
        scalar(floor),
        scalar(kappa),
        scalar(_parallel_fraction(x.dtype)),
        scalar(h_mu),
        scalar(eps_v),
    ]


def _friction_buffers(arrays: PairArrays, v: torch.Tensor) -> tuple:
    """Zeroed pass-1 outputs: load ``[n]``, coef ``[k, 4]``, impulse ``[k, 3]``, active ``[k]``."""
    return (
        torch.zeros(len(v), dtype=v.dtype, device=v.device),
        torch.zeros((arrays.n, 4), dtype=v.dtype, device=v.device),
        torch.zeros((arrays.n, 3), dtype=v.dtype, device=v.device),
        torch.zeros(arrays.n, dtype=torch.int32, device=v.device),
    )


def _friction_outputs(load, coef, impulse, active) -> list:
    return [wp.from_torch(load), _vec4(coef), _vec3(impulse), wp.from_torch(active)]


class _WarpFriction(torch.autograd.Function):
    """Surface friction by two kernels (per-pair impulses and loads, then the relaxed
    shares); backward by their Warp adjoints, in reverse order."""

    @staticmethod
    def forward(ctx, v, x, mass, arrays: PairArrays, constants: tuple):
        v, x, mass = v.detach(), x.detach(), mass.detach()
        if not (v.dtype == x.dtype == mass.dtype):
            raise TypeError(
                f"friction: v, x and mass dtypes differ: {v.dtype}, {x.dtype}, {mass.dtype}"
            )
        out = v.clone()
        ctx.empty = not arrays.n
        if ctx.empty:
            return out
        kern = kernels(v.dtype)
        device = str(v.device)
        buffers = _friction_buffers(arrays, v)
        wp.launch(
            kern.friction_pairs,
            dim=arrays.n,
            inputs=_friction_inputs(arrays, x, v, mass, constants),
            outputs=_friction_outputs(*buffers),
            device=device,
        )
        load, coef, impulse, active = buffers
        wp.launch(
            kern.friction_apply,
            dim=arrays.n,
            inputs=[arrays.wp_pairs, wp.from_torch(active), _vec4(coef), _vec3(impulse)]
            + [wp.from_torch(load)],
            outputs=[_vec3(out)],
            device=device,
        )
        ctx.arrays, ctx.constants = arrays, constants
        ctx.save_for_backward(v, x, mass, *buffers)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.empty:
            return grad_out, None, None, None, None
        v, x, mass, load, coef, impulse, active = ctx.saved_tensors
        arrays = ctx.arrays
        kern = kernels(v.dtype)
        device = str(v.device)
        grad_out = grad_out.contiguous()
        # Pass 2's adjoint: cotangents of the impulses, share weights and loads.
        adj_load, adj_coef, adj_impulse, _ = _friction_buffers(arrays, v)
        scratch = torch.zeros_like(v)
        wp.launch(
            kern.friction_apply,
            dim=arrays.n,
            inputs=[arrays.wp_pairs, wp.from_torch(active), _vec4(coef), _vec3(impulse)]
            + [wp.from_torch(load)],
            outputs=[_vec3(scratch)],
            adj_inputs=[None, None, _vec4(adj_coef), _vec3(adj_impulse), wp.from_torch(adj_load)],
            adj_outputs=[_vec3(grad_out)],
            adjoint=True,
            device=device,
        )
        # Pass 1's adjoint (its forward replay writes into scratch buffers).
        grad_x, grad_v, grad_m = torch.zeros_like(x), torch.zeros_like(v), torch.zeros_like(mass)
        inputs = _friction_inputs(arrays, x, v, mass, ctx.constants)
        wp.launch(
            kern.friction_pairs,
            dim=arrays.n,
            inputs=inputs,
            outputs=_friction_outputs(*_friction_buffers(arrays, v)),
            adj_inputs=[_vec3(grad_x), _vec3(grad_v), wp.from_torch(grad_m), None, None, None]
            + inputs[6:],
            adj_outputs=[wp.from_torch(adj_load), _vec4(adj_coef), _vec3(adj_impulse), None],
            adjoint=True,
            device=device,
        )
        return grad_v + grad_out, grad_x, grad_m, None, None
