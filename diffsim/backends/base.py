"""The backend interface: one substep of symplectic Euler, and the forces it uses."""

from __future__ import annotations

from typing import Any

import torch

from diffsim.model import Coefficients, Model


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
