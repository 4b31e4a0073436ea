"""The Warp backend: fused Warp kernels forward, hand-derived adjoint kernels backward.

On the CPU, blocks of steps run in one launch per worker thread (``advance`` forward,
``retreat`` backward). Elsewhere a substep is one launch of the per-tet force kernel and
one of the fused vertex update (gravity, damping, clamp, fixed mask, implicit ground
barrier, friction, prescribed positions), and its backward the adjoints of both. With
surface contact, torch ops wrap the Warp forces. See docs/backends.md.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from types import SimpleNamespace

import torch

from diffsim.backends.base import Backend
from diffsim.backends.integrator import substep as integrator_substep
from diffsim.sim.model import POSITION_DTYPE, Coefficients, Model

try:
    import warp as wp
except ImportError as error:  # pragma: no cover - warp-lang is a dependency
    raise ImportError("the Warp backend needs warp-lang: pip install warp-lang") from error

from diffsim.backends.warp import bridge, fused
from diffsim.backends.warp.contact_free import ContactFreeBlocks
from diffsim.backends.warp.contact_steps import FusedContactSteps
from diffsim.backends.warp.threads import SplitLauncher, one_torch_thread
from diffsim.backends.warp.world_contact_steps import WorldContactSteps
from diffsim.kernels import kernels_for
from diffsim.kernels.runtime import init_warp

# The default thread count is capped here: beyond it, memory bandwidth and the barriers
# eat the gain on the meshes we measure (override with DIFFSIM_WARP_THREADS).
MAX_DEFAULT_THREADS = 8


def cpu_threads() -> int:
    """Threads the CPU kernels are split over: ``DIFFSIM_WARP_THREADS`` (a positive
    integer), else the cores this process may use, at most ``MAX_DEFAULT_THREADS``."""
    value = os.environ.get("DIFFSIM_WARP_THREADS")
    if value is not None:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(
                f"DIFFSIM_WARP_THREADS must be a positive integer (1 = one thread), got {value!r}"
            )
        return int(value)
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_THREADS))


class WarpBackend(Backend):
    """Fast kernels for the built-in materials, on the device of the model's tensors.

    :meth:`prepare` raises ``ValueError`` for a material without a kernel (the Simulator
    picks the torch backend for those before it gets here).
    """

    name = "warp"

    def __init__(self, model: Model) -> None:
        super().__init__(model)
        init_warp()
        self.kernels = kernels_for(bridge.warp_scalar(model.dtype))
        device = wp.device_from_torch(model.device)
        k = self.kernels
        tets = model.tets.to(torch.int32).contiguous()
        dm_inv = model.dm_inv.contiguous()
        volume = model.rest_volumes.contiguous()
        slot = torch.full((model.n_vertices,), -1, dtype=torch.int32, device=model.device)
        n_fixed = len(model.fixed_indices)
        slot[model.fixed_indices] = torch.arange(n_fixed, dtype=torch.int32, device=model.device)
        self.fixed_slot = wp.from_torch(slot, dtype=wp.int32)  # VertexCoefficients.fixed_slot
        # TetElements' arrays (a Warp struct holds Warp arrays, not descriptors).
        self.tet_arrays = (
            wp.from_torch(tets, dtype=wp.vec4i),
            wp.from_torch(dm_inv, dtype=k.mat33),
            wp.from_torch(volume, dtype=k.scalar),
        )
        self.geometry = bridge.Geometry(
            kernels=k,
            device=device,
            n_vertices=model.n_vertices,
            n_tets=model.n_tets,
            tets=bridge.wrap(tets, wp.vec4i),
            dm_inv=bridge.wrap(dm_inv, k.mat33),
            volume=bridge.wrap(volume, k.scalar),
            n_fixed=n_fixed,
            fixed_indices=model.fixed_indices,
            substeps=model.substeps,
            chunk=64 if device.is_cpu else 1,
            torch_device=model.device,
            owners=[tets, dm_inv, volume, slot],
            worlds=model.n_worlds,
        )
        # Buffers every prepared set of coefficients shares: step_fast leaves f_a and f_b at
        # zero, the others are scratch within one call.
        threads = cpu_threads() if device.is_cpu else 1
        self.launcher = SplitLauncher.shared(threads) if threads > 1 else None
        if model.contact is not None:  # the broad phase's queries run split on the threads
            for contact in getattr(model.contact, "contacts", [model.contact]):
                contact.launcher = self.launcher
        self.scratch = self._scratch(threads)
        self.contact_free = ContactFreeBlocks(self)
        # Fused contact substeps: of the one world, or of each world in its own launches.
        if model.worlds is None:
            self.fused_contact = FusedContactSteps(self)
        else:
            self.fused_contact = WorldContactSteps(self)

    # ----------------------------------------------------------------- coefficients
    def prepare(self, coeffs: Coefficients) -> bridge.WarpCoefficients:
        """Lame constants, masses, gravity and damping as tensors and Warp views.

        With worlds (``model.worlds``), gravity ``[W, 3]`` and damping ``[W]`` are one row per
        world; the kernels find vertex i's world as ``i // model.world_vertices``.
        """
        m = self.model
        material = coeffs.material
        material_id = material.kernel_id
        if material_id is None:
            raise ValueError(
                f"{type(material).__name__} has no Warp kernel; use backend='torch' "
                f"(Simulator(backend='warp') picks it automatically)"
            )
        mu, lam = material.kernel_lame()
        as_t = dict(dtype=m.dtype, device=m.device)
        mu, lam = torch.as_tensor(mu, **as_t), torch.as_tensor(lam, **as_t)
        per_tet = int(mu.dim() == 1 or lam.dim() == 1)
        shape = (m.n_tets,) if per_tet else (1,)
        mu, lam = mu.expand(shape).contiguous(), lam.expand(shape).contiguous()
        mass = coeffs.mass.contiguous()
        # One gravity [3] and damping rate per world (one world without a world axis).
        gravity = coeffs.gravity.to(**as_t).contiguous()
        damping = torch.as_tensor(coeffs.damping, **as_t).reshape(-1)
        return self.wrap_coefficients(
            coeffs, (mu, lam, mass, gravity, damping), per_tet, material_id
        )

    def wrap_coefficients(
        self, coeffs: Coefficients, inputs: tuple, per_tet: int, material_id: int
    ) -> bridge.WarpCoefficients:
        """The kernels' form of ``inputs`` ``(mu, lam, mass, gravity, damping)`` (shapes as
        :class:`~diffsim.backends.warp.bridge.WarpCoefficients` lists them, contiguous; graphs
        kept) with the model's ground, substep and speed clamp."""
        m = self.model
        mu, lam, mass, gravity, damping = inputs
        k = self.kernels
        arrays = (
            bridge.wrap(mu.detach(), k.scalar),
            bridge.wrap(lam.detach(), k.scalar),
            bridge.wrap(mass.detach(), k.scalar),
            bridge.wrap(gravity.detach().view(-1, 3), k.vec3),
            bridge.wrap(damping.detach(), k.scalar),
        )
        ground = m.ground
        settings = k.VertexUpdate()
        settings.h = m.substep_dt
        settings.has_ground = int(ground is not None)
        settings.height = ground.height if ground else 0.0
        settings.dhat = ground.dhat if ground else 1.0
        settings.kappa = ground.stiffness if ground else 0.0
        settings.friction = ground.friction if ground else 0.0
        settings.eps_v = ground.friction_velocity if ground else 1.0
        settings.max_speed = m.max_speed if m.max_speed is not None else 0.0
        vertex = k.VertexCoefficients()
        vertex.mass = wp.from_torch(mass.detach(), dtype=k.scalar)
        vertex.gravity = wp.from_torch(gravity.detach().view(-1, 3), dtype=k.vec3)
        vertex.damping = wp.from_torch(damping.detach(), dtype=k.scalar)
        vertex.fixed_slot = self.fixed_slot
        vertex.world_size = m.world_vertices
        elements = k.TetElements()
        elements.tets, elements.dm_inv, elements.volume = self.tet_arrays
        elements.mu = wp.from_torch(mu.detach(), dtype=k.scalar)
        elements.lam = wp.from_torch(lam.detach(), dtype=k.scalar)
        elements.per_tet = per_tet
        return bridge.WarpCoefficients(
            coeffs=coeffs,
            inputs=(mu, lam, mass, gravity, damping),
            arrays=arrays,
            per_tet=per_tet,
            material=material_id,
            settings=settings,
            vertex=vertex,
            elements=elements,
            scratch=self.scratch,
        )

    def _scratch(self, threads: int) -> SimpleNamespace:
        m, vec3 = self.model, self.kernels.vec3
        t = {
            name: torch.zeros((m.n_vertices, 3), dtype=m.dtype, device=m.device)
            for name in ("f_a", "f_b", "f_back", "adj_f", "out_v", "out_f")
        }
        t["dummy"] = torch.zeros((1, 3), dtype=m.dtype, device=m.device)
        t["dummy_rows"] = torch.zeros((1, 1, 3), dtype=m.dtype, device=m.device)
        positions = dict(dtype=POSITION_DTYPE, device=m.device)
        t["out_x"] = torch.zeros((m.n_vertices, 3), **positions)
        t["dummy_position"] = torch.zeros((1, 3), **positions)
        t["dummy_position_rows"] = torch.zeros((1, 1, 3), **positions)
        # Per-worker force (and backward: HVP) buffers of the fused kernels.
        t["worker_forces"] = torch.zeros((threads, m.n_vertices, 3), dtype=m.dtype, device=m.device)
        views = {
            f"{name}_w": bridge.wrap(value, vec3)
            for name, value in t.items()
            if value.dtype == m.dtype
        }
        # The fused steps' unused volume-limit arguments.
        t["dummy_ratios"] = torch.zeros(1, dtype=torch.float64, device=m.device)
        t["dummy_flag"] = torch.zeros(1, dtype=torch.int32, device=m.device)
        return SimpleNamespace(**t, **views)

    def running(self) -> AbstractContextManager:
        """Torch on one thread while the simulator runs steps
        (:func:`.threads.one_torch_thread`)."""
        return one_torch_thread()

    # ----------------------------------------------------------------- physics
    def forces(self, prepared: bridge.WarpCoefficients, x: torch.Tensor) -> torch.Tensor:
        """Elastic + gravity + ground barrier (+ surface contact) forces ``[n, 3]`` in N.

        Differentiable in x and the coefficients; the VJP in x is a Hessian-vector product.
        """
        w, m = prepared, self.model
        x = self._positions(x)
        mu, lam, mass, gravity, _ = w.inputs
        f = bridge.Forces.apply(self.geometry, w, True, x, mu, lam, mass, gravity)
        if m.contact is not None:
            f = f + m.contact.forces(x, mass)
        return f

    def elastic_energy(self, prepared: bridge.WarpCoefficients, x: torch.Tensor) -> torch.Tensor:
        """Total elastic energy (J), a differentiable scalar."""
        mu, lam = prepared.inputs[:2]
        return bridge.ElasticEnergy.apply(self.geometry, prepared, self._positions(x), mu, lam)

    def substep(self, prepared, x, v, x_fixed):
        w, m = prepared, self.model
        x, v = self._positions(x), self._checked(v)
        x_fixed = x_fixed.to(dtype=POSITION_DTYPE).contiguous()
        if m.contact is not None or m.volume_limit is not None:
            return self._substep_in_torch(w, x, v, x_fixed)
        if not torch.is_grad_enabled() or not any(
            t.requires_grad for t in (x, v, x_fixed, *w.inputs)
        ):
            return bridge.substep_forward(self.geometry, w, x, v, x_fixed, self.launcher)
        return bridge.Substep.apply(self.geometry, w, self.launcher, x, v, x_fixed, *w.inputs)

    def advance(self, prepared, x, v, targets, out=None):
        """Whole steps. On the CPU they run in one launch of the fused kernel per worker
        thread (:func:`diffsim.backends.warp.fused.advance_steps`), through the
        :class:`~diffsim.backends.warp.fused.Steps` Function when a gradient is needed; with
        surface contact, wherever contact does not act (:mod:`.contact_free`)."""
        m, w = self.model, prepared
        if m.contact is not None:
            # Without contact where it turns out not to act, else substep by substep with it.
            return self.contact_free.advance(prepared, x, v, targets, out)
        if not self.geometry.device.is_cpu or m.volume_limit is not None:
            # (Without contact, the volume limit's steps run in torch around Warp forces.)
            return super().advance(prepared, x, v, targets, out)
        x, v = self._positions(x), self._checked(v)
        targets = targets.to(POSITION_DTYPE).contiguous()
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, v, targets, *w.inputs)):
            return fused.Steps.apply(self.geometry, w, self.launcher, x, v, targets, *w.inputs)
        if out is None:
            out = (x.new_empty((len(targets), *x.shape)), v.new_empty((len(targets), *v.shape)))
        fused.advance_steps(self.geometry, w, x, v, targets, out, self.launcher)
        return out

    def _substep_in_torch(self, w, x, v, x_fixed):
        # Torch ops around the Warp forces: the same update as TorchBackend.substep, with
        # its time-of-impact splits (integrator.substep adds the surface contact forces)
        # and the volume limit.
        m = self.model
        mu, lam, mass, gravity, _ = w.inputs

        def forces(y: torch.Tensor) -> torch.Tensor:
            return bridge.Forces.apply(self.geometry, w, False, y, mu, lam, mass, gravity)

        damping = m.per_vertex(w.coeffs.damping)
        return integrator_substep(
            m, x, v, x_fixed, forces, mass, damping, ground_roots=self._ground_roots
        )

    def _ground_roots(self, target: torch.Tensor, h: float) -> torch.Tensor:
        """:meth:`Ground.solve`'s roots for the predicted gaps ``target [k]`` (m), by the
        kernel the fused update uses: one launch instead of a torch loop of Newton steps."""
        ground, k = self.model.ground, self.kernels
        out = torch.empty_like(target)
        wp.launch(
            k.ground_roots,
            dim=len(target),
            inputs=[bridge.wrap(target, k.scalar), h, ground.dhat, ground.stiffness],
            outputs=[bridge.wrap(out, k.scalar)],
            device=self.geometry.device,
            stream=self.geometry.stream(),
            record_tape=False,
        )
        return out

    def _checked(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        m = self.model
        if t.shape != (m.n_vertices, 3):
            raise ValueError(f"expected a tensor of shape [{m.n_vertices}, 3], got {list(t.shape)}")
        if t.device != m.device:
            raise ValueError(f"tensor on {t.device}, but the simulator runs on {m.device}")
        return t.to(dtype or m.dtype).contiguous()

    def _positions(self, x: torch.Tensor) -> torch.Tensor:
        return self._checked(x, POSITION_DTYPE)
