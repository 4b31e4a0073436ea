"""Fused contact substeps of many worlds: each world in its own launches.

With worlds (:mod:`diffsim.sim.worlds`) each world has its own surface contact
(:class:`~diffsim.backends.worlds.WorldContact`): its own candidate sets, its own step
limit, its own decisions where a launch stops. So where contact acts, each world's steps
run exactly as the world alone runs them: in the fused contact launches of
:mod:`.contact_steps`, one world after another, each through a single-world Warp backend
on that world's rows, its prescribed vertices and its coefficients (slices of the batched
ones, so gradients sum back to them through autograd). Where contact acts in no world, the
worlds still run together, in the contact-free blocks of :mod:`.contact_free`.
"""

from __future__ import annotations

from collections import Counter

import torch

from diffsim.backends.warp.bridge import WarpCoefficients
from diffsim.backends.warp.contact_steps import runs_fused
from diffsim.contact.surface_contact import CappedStep
from diffsim.sim.model import Coefficients


class WorldContactSteps:
    """``FusedContactSteps`` for a model with worlds (the same ``usable``, ``advance`` and
    ``counts``).

    Args:
        backend: the :class:`~diffsim.backends.warp.backend.WarpBackend` of the worlds.
    """

    def __init__(self, backend) -> None:
        self.backend = backend
        self._worlds: list | None = None  # one single-world WarpBackend per world
        # Per-world coefficients of the last prepared set, by whether a gradient was on
        # (a checkpoint's recomputation needs slices with the graph kept).
        self._prepared: tuple[WarpCoefficients | None, dict] = (None, {})

    def usable(self) -> bool:
        """Whether every world's contact can run fused: on the CPU, by the Warp contact
        kernels, without time-of-impact splits."""
        device = self.backend.geometry.device
        contacts = getattr(self.backend.model.contact, "contacts", None)
        return contacts is not None and all(runs_fused(c, device) for c in contacts)

    @property
    def counts(self) -> dict[str, int]:
        """The fused contact counts, summed over the worlds."""
        total: Counter = Counter()
        for world in self._worlds or []:
            total.update(world.fused_contact.counts)
        return dict(total)

    def advance(
        self, prepared: WarpCoefficients, x: torch.Tensor, v: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``len(targets)`` steps of every world from ``(x, v)`` (``[W * n, 3]``; targets
        ``[K, W * k, 3]``, the prescribed vertices world by world): the frames
        ``([K, W * n, 3], [K, W * n, 3])``, differentiable as each world's are.

        Raises:
            CappedStep: a world's blow-up, with ``world`` set to that world.
        """
        m = self.backend.model
        n, W = m.world_vertices, m.n_worlds
        k = len(m.fixed_indices) // W
        xs, vs = [], []
        for w, (backend, coefficients) in enumerate(
            zip(self._world_backends(), self._world_coefficients(prepared), strict=True)
        ):
            rows = slice(w * n, (w + 1) * n)
            try:
                frames = backend.fused_contact.advance(
                    coefficients, x[rows], v[rows], targets[:, w * k : (w + 1) * k]
                )
            except CappedStep as capped:
                capped.world = w
                raise
            xs.append(frames[0])
            vs.append(frames[1])
        return torch.cat(xs, dim=1), torch.cat(vs, dim=1)

    def _world_backends(self) -> list:
        """One single-world Warp backend per world (made on first use): the world's rows
        and tets of the model, its own contact object."""
        if self._worlds is None:
            b, m = self.backend, self.backend.model
            self._worlds = [
                type(b)(m.world(w, contact)) for w, contact in enumerate(m.contact.contacts)
            ]
        return self._worlds

    def _world_coefficients(self, prepared: WarpCoefficients) -> list[WarpCoefficients]:
        """Each world's share of ``prepared``: its Lame constants (where per tet), masses,
        gravity and damping, as views of the batched tensors."""
        last, made = self._prepared
        if last is not prepared:
            made = {}
            self._prepared = (prepared, made)
        grad = torch.is_grad_enabled()
        if grad not in made:
            m = self.backend.model
            n, t = m.world_vertices, m.world_tets
            mu, lam, mass, gravity, damping = prepared.inputs
            shares = []
            for w, backend in enumerate(self._world_backends()):
                rows, tets = slice(w * n, (w + 1) * n), slice(w * t, (w + 1) * t)
                if prepared.per_tet:
                    mu_w, lam_w = mu[tets], lam[tets]
                else:
                    mu_w, lam_w = mu, lam
                inputs = (mu_w, lam_w, mass[rows], gravity[w], damping[w : w + 1])
                coeffs = Coefficients(prepared.coeffs.material, mass[rows], gravity[w], damping[w])
                shares.append(
                    backend.wrap_coefficients(coeffs, inputs, prepared.per_tet, prepared.material)
                )
            made[grad] = shares
        return made[grad]
