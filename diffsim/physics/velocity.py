"""The smooth velocity clamp."""

from __future__ import annotations

import torch


def clamp_speed(v: torch.Tensor, max_speed: float) -> torch.Tensor:
    """Smoothly limits speeds: v <- v_max tanh(|v| / v_max) v / |v|, ``[n, 3]``.

    Close to the identity for |v| << v_max (relative change about |v|^2 / (3 v_max^2)),
    never above v_max, and smooth: below |v| = 1e-4 v_max the factor tanh(r)/r is taken as
    1 - r^2/3 from r^2 directly, so value and gradient are exact at |v| = 0 (no sqrt(0)).
    """
    r2 = v.square().sum(dim=1, keepdim=True) / max_speed**2
    small = r2 < 1e-8
    r = torch.sqrt(torch.where(small, torch.ones_like(r2), r2))
    factor = torch.where(small, 1.0 - r2 / 3.0, torch.tanh(r) / r)
    return v * factor
