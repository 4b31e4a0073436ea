"""Zero-copy torch <-> Warp bridge and the autograd Functions of the Warp backend.

Each Function runs Warp kernels forward on the tensors' memory and, in backward, launches
their hand-derived adjoint kernels (``force_vjp.py``, ``integrate_vertex_vjp``; Warp's
generated adjoints only for ``Forces`` and ``ElasticEnergy``). :class:`Substep` runs one
substep (the CUDA path; on the CPU, blocks of steps run fused, see
:mod:`diffsim.backends.warp.fused`) and saves x, v and the elastic forces (no graph, no other
intermediate). Parameters (Lame constants, masses, gravity, damping) are wrapped once
per rollout segment in :class:`WarpCoefficients`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
import warp as wp
from torch.autograd.function import once_differentiable

from diffsim.backends.warp.threads import MIN_TETS_PER_WORKER, one_torch_thread
from diffsim.kernels import grad_kernels_for
from diffsim.sim.model import Coefficients

_templates: dict = {}


def warp_scalar(dtype: torch.dtype) -> Any:
    """The Warp scalar type of a torch float dtype (the kernels' types)."""
    scalars = {torch.float32: wp.float32, torch.float64: wp.float64}
    if dtype not in scalars:
        raise ValueError(f"Warp kernels exist for float32 and float64, not {dtype}")
    return scalars[dtype]


def torch_dtype(scalar: Any) -> torch.dtype:
    """The torch dtype of a Warp scalar type."""
    return {wp.float32: torch.float32, wp.float64: torch.float64}[scalar]


def wrap(t: torch.Tensor, dtype: Any) -> Any:
    """A Warp array descriptor aliasing a contiguous tensor (no copy).

    The first wrap of a given (dtype, shape, device) goes through ``wp.from_torch``, which
    checks the layout; later ones copy that descriptor and set its data pointer, which
    costs about a microsecond instead of tens (this runs several times per substep).
    """
    key = (dtype, t.shape, t.dtype, t.device)
    template = _templates.get(key)
    if template is None or not t.is_contiguous():
        desc = wp.from_torch(t, dtype=dtype, requires_grad=False, return_ctype=True)
        if t.is_contiguous():
            _templates[key] = type(desc).from_buffer_copy(desc)
        return desc
    desc = type(template).from_buffer_copy(template)
    desc.data = t.data_ptr()
    return desc


@dataclass
class Geometry:
    """Static per-mesh arrays shared by every rollout: torch owners and their Warp views."""

    kernels: SimpleNamespace
    device: Any
    n_vertices: int
    n_tets: int
    tets: Any
    dm_inv: Any
    volume: Any
    n_fixed: int
    fixed_indices: Any
    substeps: int
    chunk: int = 1
    torch_device: Any = None
    owners: list = field(default_factory=list)
    worlds: int = 1  # W copies of one mesh, world-major (diffsim.sim.worlds)

    def stream(self) -> Any:
        """The Warp stream of torch's current CUDA stream (None on the CPU), so Warp
        launches are ordered with the torch ops that produce and consume their tensors."""
        if self.torch_device is None or self.torch_device.type != "cuda":
            return None
        return wp.stream_from_torch(self.torch_device)


@dataclass
class WarpCoefficients:
    """The per-rollout coefficients in the form the kernels take.

    Attributes:
        coeffs: the torch coefficients they came from.
        inputs: ``(mu, lam, mass, gravity, damping)`` torch tensors (graphs kept) that the
            autograd Functions take as inputs; mu and lam are ``[1]`` or ``[m]``, gravity
            ``[3]`` (one world) or ``[W, 3]``, damping ``[1]`` or ``[W]``.
        arrays: Warp views of the same five tensors (detached).
        per_tet: 1 where mu and lam are per tet, else 0.
        material: the kernel id of the material.
        settings: the vertex update's settings (a ``VertexUpdate`` Warp struct: substep,
            ground, friction, speed clamp).
        vertex: the per-vertex coefficients (a ``VertexCoefficients`` Warp struct: masses,
            gravity, damping, fixed slots), aliasing the same tensors as ``arrays``.
        elements: the tets and their Lame constants (a ``TetElements`` Warp struct: the
            geometry's arrays and mu, lam of ``arrays``).
        scratch: the backend's reusable force buffers (torch tensors and Warp views).
        launches: the recorded forward launches, made on first use.
    """

    coeffs: Coefficients
    inputs: tuple
    arrays: tuple
    per_tet: int
    material: int
    settings: Any
    vertex: Any
    elements: Any
    scratch: SimpleNamespace
    launches: SimpleNamespace | None = None


class RecordedLaunch:
    """A recorded Warp launch whose array arguments are re-pointed at new tensors cheaply.

    Per substep only the data pointers of x, v and the outputs change (shapes do not), so
    instead of packing every argument again, the recorded argument's pointer is replaced.
    """

    def __init__(self, kernel, dim: int, args: list, device, stream=None) -> None:
        self.launch = wp.launch(kernel, dim=dim, inputs=args, device=device, record_cmd=True)
        self.stream = stream

    def point(self, name: str, t: torch.Tensor) -> None:
        """Points array argument ``name`` at tensor ``t`` (same shape and dtype as recorded)."""
        self.launch.params[self._index(name) + 1].data = t.data_ptr()

    def set(self, name: str, value: int) -> None:
        """Sets the scalar argument ``name``."""
        self.launch.set_param_at_index_from_ctype(self._index(name), value)

    def _index(self, name: str) -> int:
        return [arg.label for arg in self.launch.kernel.adj.args].index(name)

    def __call__(self) -> None:
        self.launch.launch(self.stream)


def forward_launches(g: Geometry, w: WarpCoefficients, threads: int) -> SimpleNamespace:
    """The recorded launches of one forward substep: tet forces (per thread) and the update."""
    k, s = g.kernels, w.scratch
    mu, lam, mass, gravity, damping = w.arrays
    chunk, m = g.chunk, g.n_tets

    def slot(t: torch.Tensor) -> Any:
        # A descriptor of its own: RecordedLaunch.point mutates it in place.
        return wrap(t, k.vec3)

    def position_slot(t: torch.Tensor) -> Any:
        return wrap(t, k.position)

    bounds = [0, m] if threads == 1 or m < 2 * MIN_TETS_PER_WORKER else [0, m // 2, m]
    outputs = [s.f_a_w, s.f_b_w]
    tets = [
        RecordedLaunch(
            k.tet_forces_chunked[w.material],
            (stop - start + chunk - 1) // chunk,
            [
                position_slot(s.out_x),
                w.elements,
                start,
                stop,
                chunk,
                out,
            ],
            g.device,
            g.stream(),
        )
        for start, stop, out in zip(bounds[:-1], bounds[1:], outputs, strict=False)
    ]
    step = RecordedLaunch(
        k.step_fast,
        g.n_vertices,
        [
            position_slot(s.out_x), slot(s.out_v), s.f_a_w, s.f_b_w, w.vertex,
            position_slot(s.dummy_position), w.settings, 0, slot(s.f_back),
            position_slot(s.out_x), slot(s.out_v),
        ],
        g.device,
        g.stream(),
    )  # fmt: skip
    return SimpleNamespace(tets=tets, step=step)


def substep_forward(g: Geometry, w: WarpCoefficients, x, v, x_fixed, launcher=None, save=False):
    """One substep on tensors (no autograd): returns new ``(x_new, v_new)`` tensors.

    With ``save``, also returns the elastic forces at x (the backward pass reuses them).
    """
    launches = w.launches
    if launches is None:
        threads = 2 if launcher is not None else 1
        launches = w.launches = forward_launches(g, w, threads)
    x_new = torch.empty_like(x)
    v_new = torch.empty_like(v)
    for tet_launch in launches.tets:
        tet_launch.point("x", x)
    if len(launches.tets) == 1:
        launches.tets[0]()
    else:
        launcher.run(launches.tets[0], launches.tets[1])
    step = launches.step
    step.point("x", x)
    step.point("v", v)
    if g.n_fixed:
        step.point("x_fixed", x_fixed)
    step.point("x_new", x_new)
    step.point("v_new", v_new)
    if save:
        f_el = torch.empty_like(v)
        step.set("save", 1)
        step.point("f_saved", f_el)
        step()
        step.set("save", 0)
        return x_new, v_new, f_el
    step()
    return x_new, v_new


def _launch_tets(g: Geometry, w: WarpCoefficients, x, out) -> None:
    """Elastic forces of all tets accumulated into ``out`` (one thread)."""
    chunk = g.chunk
    wp.launch(
        g.kernels.tet_forces_chunked[w.material],
        dim=(g.n_tets + chunk - 1) // chunk,
        inputs=[x, w.elements, 0, g.n_tets, chunk, out],
        device=g.device,
        stream=g.stream(),
        record_tape=False,
    )


def _elastic_forces_into(g: Geometry, w: WarpCoefficients, xw, out: torch.Tensor) -> Any:
    out.zero_()
    ow = wrap(out, g.kernels.vec3)
    _launch_tets(g, w, xw, ow)
    return ow


def _tet_adjoint(g: Geometry, w: WarpCoefficients, xw, adj_f_w, adj_x, adj_mu, adj_lam, launcher):
    """Accumulates the force kernel's VJP (an HVP) into adj_x, adj_mu and adj_lam.

    The hand-derived ``tet_force_vjp`` kernels (diffsim/kernels/force_vjp.py) compute what
    Warp's generated adjoint of the force kernel would, at about a third of its cost. With a
    launcher, the tets are split between two threads; each half accumulates into its own
    vertex (and global-parameter) buffers, summed afterwards.
    """
    k = g.kernels
    chunk, m = g.chunk, g.n_tets

    def part(start, stop, ax, amu, alam) -> None:
        wp.launch(
            k.tet_force_vjp[w.material],
            dim=(stop - start + chunk - 1) // chunk,
            inputs=[
                xw, w.elements, start, stop, chunk, adj_f_w, wrap(ax, k.vec3), amu, alam,
            ],
            device=g.device,
            stream=g.stream(),
            record_tape=False,
        )  # fmt: skip

    amu, alam = wrap(adj_mu, k.scalar), wrap(adj_lam, k.scalar)
    if launcher is None or m < 2 * MIN_TETS_PER_WORKER:
        part(0, m, adj_x, amu, alam)
        return
    half = m // 2
    adj_x2 = torch.zeros_like(adj_x)
    if w.per_tet:  # disjoint tet ranges: both halves may share the per-tet buffers
        amu2, alam2, adj_mu2, adj_lam2 = amu, alam, None, None
    else:
        adj_mu2, adj_lam2 = torch.zeros_like(adj_mu), torch.zeros_like(adj_lam)
        amu2, alam2 = wrap(adj_mu2, k.scalar), wrap(adj_lam2, k.scalar)
    launcher.run(
        lambda: part(0, half, adj_x, amu, alam), lambda: part(half, m, adj_x2, amu2, alam2)
    )
    adj_x += adj_x2
    if adj_mu2 is not None:
        adj_mu += adj_mu2
        adj_lam += adj_lam2


def _parameter_cotangents(w: WarpCoefficients) -> SimpleNamespace:
    """Zeroed accumulators for the cotangents of (mu, lam, mass, gravity, damping)."""
    mu, lam, mass, gravity, damping = w.inputs
    return SimpleNamespace(
        mu=torch.zeros_like(mu),
        lam=torch.zeros_like(lam),
        mass=torch.zeros_like(mass),
        gravity=torch.zeros_like(gravity),
        damping=torch.zeros_like(damping),
    )


def _substep_adjoint(g, w, launcher, x, v, x_fixed, f_el, grad_x, grad_v, acc) -> tuple:
    """The adjoint of one substep from its saved inputs and elastic forces.

    Adds the parameter cotangents to ``acc`` and returns ``(adj_x, adj_v, adj_x_fixed)``,
    the cotangents of the substep's x, v and prescribed positions (``adj_x_fixed`` is a
    dummy where no vertex is fixed).
    """
    k, vec3, s = g.kernels, g.kernels.vec3, w.scratch
    # Cotangents are in the kernels' type, positions' too (torch casts them back).
    adj_x, adj_v = torch.empty_like(v), torch.empty_like(v)
    adj_xf = torch.zeros(x_fixed.shape, dtype=v.dtype, device=v.device) if g.n_fixed else s.dummy
    grad_x = grad_x.to(v.dtype).contiguous()
    xw = wrap(x, k.position)
    adj_f_w = wrap(s.adj_f, vec3)
    wp.launch(
        k.step_vjp,
        dim=g.n_vertices,
        inputs=[
            xw, wrap(v, vec3), wrap(f_el, vec3), w.vertex, w.settings, wrap(grad_x, vec3),
            wrap(grad_v, vec3), wrap(adj_x, vec3),
            wrap(adj_v, vec3), adj_f_w, wrap(acc.mass, k.scalar),
            wrap(acc.gravity.view(-1, 3), vec3), wrap(acc.damping, k.scalar), wrap(adj_xf, vec3),
        ],
        device=g.device,
        stream=g.stream(),
        record_tape=False,
    )  # fmt: skip
    _tet_adjoint(g, w, xw, adj_f_w, adj_x, acc.mu, acc.lam, launcher)
    return adj_x, adj_v, adj_xf


class Substep(torch.autograd.Function):
    """(x, v, x_fixed, mu, lam, mass, gravity, damping) -> (x_new, v_new) on Warp kernels."""

    @staticmethod
    def forward(ctx, g, w, launcher, x, v, x_fixed, mu, lam, mass, gravity, damping):
        ctx.g, ctx.w, ctx.launcher = g, w, launcher
        x_new, v_new, f_el = substep_forward(g, w, x, v, x_fixed, launcher, save=True)
        ctx.save_for_backward(x, v, x_fixed, f_el)
        return x_new, v_new

    @staticmethod
    @once_differentiable
    @one_torch_thread()
    def backward(ctx, grad_x, grad_v):
        g, w = ctx.g, ctx.w
        x, v, x_fixed, f_el = ctx.saved_tensors
        grad_x = torch.zeros_like(v) if grad_x is None else grad_x.contiguous()
        grad_v = torch.zeros_like(v) if grad_v is None else grad_v.contiguous()
        acc = _parameter_cotangents(w)
        adj_x, adj_v, adj_xf = _substep_adjoint(
            g, w, ctx.launcher, x, v, x_fixed, f_el, grad_x, grad_v, acc
        )
        return (
            None, None, None, adj_x, adj_v, adj_xf if g.n_fixed else torch.zeros_like(x_fixed),
            acc.mu, acc.lam, acc.mass, acc.gravity, acc.damping,
        )  # fmt: skip


def _total_forces_inputs(w: WarpCoefficients, xw, f_el, with_ground: bool) -> list:
    """The input list of the ``total_forces`` kernel (its forward launch and its adjoint)."""
    st = w.settings
    has_ground = st.has_ground if with_ground else 0
    return [
        xw, f_el, w.arrays[2], w.arrays[3], w.vertex.world_size, has_ground, st.height,
        st.dhat, st.kappa,
    ]  # fmt: skip


class Forces(torch.autograd.Function):
    """(x, mu, lam, mass, gravity) -> elastic + gravity (+ ground barrier) forces ``[n, 3]``."""

    @staticmethod
    def forward(ctx, g, w, with_ground, x, mu, lam, mass, gravity):
        ctx.g, ctx.w, ctx.with_ground = g, w, with_ground
        ctx.save_for_backward(x)
        k, vec3, s = g.kernels, g.kernels.vec3, w.scratch
        xw = wrap(x, k.position)
        f_el = _elastic_forces_into(g, w, xw, s.f_back)
        f = torch.empty(x.shape, dtype=torch_dtype(k.scalar), device=x.device)
        inputs = _total_forces_inputs(w, xw, f_el, ctx.with_ground)
        wp.launch(
            grad_kernels_for(k.scalar).total_forces,
            dim=g.n_vertices,
            inputs=inputs,
            outputs=[wrap(f, vec3)],
            device=g.device,
            stream=g.stream(),
            record_tape=False,
        )
        return f

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_f):
        g, w = ctx.g, ctx.w
        (x,) = ctx.saved_tensors
        k, vec3, s = g.kernels, g.kernels.vec3, w.scratch
        mu, lam, mass, gravity, _ = w.inputs
        adj_x_ground = torch.zeros_like(x)  # float64, like the positions Warp differentiates
        adj_x = torch.zeros(x.shape, dtype=torch_dtype(k.scalar), device=x.device)
        adj_mass, adj_g = torch.zeros_like(mass), torch.zeros_like(gravity)
        adj_mu, adj_lam = torch.zeros_like(mu), torch.zeros_like(lam)
        xw = wrap(x, k.position)
        f_el = s.f_back_w  # any values: the adjoint of the linear f_el term does not read them
        grad_f = grad_f.contiguous()  # kept alive here: the launch holds only its pointer
        s.adj_f.zero_()
        adj_x_w, adj_f_w = wrap(adj_x_ground, k.position), wrap(s.adj_f, vec3)
        inputs = _total_forces_inputs(w, xw, f_el, ctx.with_ground)
        wp.launch(
            grad_kernels_for(k.scalar).total_forces,
            dim=g.n_vertices,
            inputs=inputs,
            outputs=[s.out_f_w],
            adj_inputs=[
                adj_x_w, adj_f_w, wrap(adj_mass, k.scalar), wrap(adj_g.view(-1, 3), vec3),
                0, 0, 0, 0, 0,
            ],
            adj_outputs=[wrap(grad_f, vec3)],
            adjoint=True,
            device=g.device,
            stream=g.stream(),
            record_tape=False,
        )  # fmt: skip
        _tet_adjoint(g, w, xw, adj_f_w, adj_x, adj_mu, adj_lam, None)
        return None, None, None, adj_x + adj_x_ground, adj_mu, adj_lam, adj_mass, adj_g


class ElasticEnergy(torch.autograd.Function):
    """(x, mu, lam) -> total elastic energy (J), a scalar."""

    @staticmethod
    def forward(ctx, g, w, x, mu, lam):
        ctx.g, ctx.w = g, w
        ctx.save_for_backward(x)
        k = g.kernels
        energy = torch.empty(g.n_tets, dtype=torch_dtype(k.scalar), device=x.device)
        wp.launch(
            grad_kernels_for(k.scalar).tet_energy[w.material],
            dim=g.n_tets,
            inputs=[wrap(x, k.position), g.tets, g.dm_inv, g.volume, *w.arrays[:2]],
            outputs=[w.per_tet, wrap(energy, k.scalar)],
            device=g.device,
            stream=g.stream(),
            record_tape=False,
        )
        return energy.sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_e):
        g, w = ctx.g, ctx.w
        (x,) = ctx.saved_tensors
        k = g.kernels
        mu, lam = w.inputs[:2]
        adj_x, adj_mu, adj_lam = torch.zeros_like(x), torch.zeros_like(mu), torch.zeros_like(lam)
        adj_energy = grad_e.to(torch_dtype(k.scalar)).expand(g.n_tets).contiguous()
        scratch = torch.empty(g.n_tets, dtype=torch_dtype(k.scalar), device=x.device)
        wp.launch(
            grad_kernels_for(k.scalar).tet_energy[w.material],
            dim=g.n_tets,
            inputs=[wrap(x, k.position), g.tets, g.dm_inv, g.volume, *w.arrays[:2], w.per_tet],
            outputs=[wrap(scratch, k.scalar)],
            adj_inputs=[
                wrap(adj_x, k.position), None, None, None, wrap(adj_mu, k.scalar),
                wrap(adj_lam, k.scalar), 0,
            ],
            adj_outputs=[wrap(adj_energy, k.scalar)],
            adjoint=True,
            device=g.device,
            stream=g.stream(),
            record_tape=False,
        )  # fmt: skip
        return None, None, adj_x, adj_mu, adj_lam
