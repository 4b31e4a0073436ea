"""The IPC log barrier, the one contact potential of diffsim (torch reference)."""

from __future__ import annotations

import torch


def barrier(s: torch.Tensor, s_hat: float | torch.Tensor) -> torch.Tensor:
    """IPC barrier b(s, s_hat) = -(s - s_hat)^2 ln(s / s_hat) for 0 < s < s_hat, else 0.

    Args:
        s: squared distances (m^2), any shape; must be > 0.
        s_hat: squared activation distance dhat^2 (m^2).

    Returns:
        Barrier values (m^4), same shape as ``s``. C2-continuous at ``s_hat``.
    """
    active = s < s_hat
    s_safe = torch.where(active, s, torch.full_like(s, s_hat))
    return torch.where(
        active, -((s_safe - s_hat) ** 2) * torch.log(s_safe / s_hat), torch.zeros_like(s)
    )


def barrier_derivative(s: torch.Tensor, s_hat: float | torch.Tensor) -> torch.Tensor:
    """db/ds = -2 (s - s_hat) ln(s / s_hat) - (s - s_hat)^2 / s inside, 0 outside (<= 0)."""
    active = s < s_hat
    s_safe = torch.where(active, s, torch.full_like(s, s_hat))
    d = s_safe - s_hat
    value = -2.0 * d * torch.log(s_safe / s_hat) - d * d / s_safe
    return torch.where(active, value, torch.zeros_like(s))
