"""The backend interface: one substep of symplectic Euler, and the forces it uses."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from diffsim.contact.surface_contact import CappedStep
from diffsim.sim.model import Coefficients, Model


class Backend:
    """Computes forces and advances the state by one substep. Never mutates the model.

    A backend is created per simulator; ``prepare`` is called once per rollout (or per
    checkpointed segment) with the differentiable coefficients, and its result is passed
    to every ``substep``. All outputs must be differentiable with respect to the inputs
    through torch autograd.
    """

    name = "base"

    def __init__(self, model: Model) -> None:
        self.model = model

    def running(self) -> AbstractContextManager:
        """The context the simulator runs its steps in (default: none; the Warp backend
        runs torch on one thread meanwhile)."""
        return nullcontext()

    def prepare(self, coeffs: Coefficients) -> Any:
        """Backend-specific form of the coefficients (default: unchanged)."""
        return coeffs

    def forces(self, prepared: Any, x: torch.Tensor) -> torch.Tensor:
        """Total conservative force ``[n, 3]`` in N: elastic + gravity + ground barrier."""
        raise NotImplementedError

    def substep(
        self, prepared: Any, x: torch.Tensor, v: torch.Tensor, x_fixed: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One substep of length ``model.substep_dt``.

        Args:
            prepared: the result of :meth:`prepare`.
            x: positions ``[n, 3]``.
            v: velocities ``[n, 3]``.
            x_fixed: positions ``[k, 3]`` of the fixed vertices at the end of the substep.

        Returns:
            ``(x_new, v_new)``, each ``[n, 3]``.
        """
        raise NotImplementedError

    def advance(
        self,
        prepared: Any,
        x: torch.Tensor,
        v: torch.Tensor,
        targets: torch.Tensor,
        out: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``len(targets)`` steps of ``model.substeps`` substeps each.

        Args:
            prepared: the result of :meth:`prepare`.
            x: positions ``[n, 3]`` at the start.
            v: velocities ``[n, 3]`` at the start.
            targets: ``[K, k, 3]`` positions of the fixed vertices at the end of each step,
                reached linearly over its substeps.
            out: two ``[K, n, 3]`` buffers to write the frames into (no-grad runs only).

        Returns:
            The positions and velocities after each step, ``([K, n, 3], [K, n, 3])``
            (``out`` where given).
        """
        substeps = self.model.substeps
        idx = self.model.fixed_indices
        xs, vs = [], []
        for i in range(len(targets)):
            start = x[idx]
            for j in range(substeps):
                x_fixed = start + (targets[i] - start) * ((j + 1) / substeps)
                try:
                    x, v = self.substep(prepared, x, v, x_fixed)
                except CappedStep as capped:
                    capped.step = i  # the step it blew up in, for the message
                    raise
            if out is not None:
                out[0][i].copy_(x)
                out[1][i].copy_(v)
            else:
                xs.append(x)
                vs.append(v)
        if out is not None:
            return out
        if not xs:
            empty = x.new_zeros((0, *x.shape))
            return empty, empty
        return torch.stack(xs), torch.stack(vs)
