"""Linear solvers for Newton and the adjoint: sparse LU and block-Jacobi PCG."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    pass


# ----------------------------------------------------------------------------- linear algebra
def _pcg(matvec, b, precond, tol: float, max_iter: int, truncate: bool):
    """Preconditioned CG for K y = b (flat-ready ``[nf, 3]`` tensors).

    With ``truncate`` (Newton steps) it stops at negative curvature and returns the iterate
    so far (or the preconditioned right-hand side on the first iteration).

    Returns:
        ``(y, iterations, relative residual, hit_negative_curvature)``.
    """
    y = torch.zeros_like(b)
    r = b.clone()
    z = precond(r)
    p = z.clone()
    rz = float((r * z).sum())
    b_norm = float(b.norm())
    if b_norm == 0.0:
        return y, 0, 0.0, False
    for it in range(1, max_iter + 1):
        kp = matvec(p)
        curvature = float((p * kp).sum())
        if curvature <= 0.0:
            if truncate:
                return (z if it == 1 else y), it, float(r.norm()) / b_norm, True
            return y, it, float(r.norm()) / b_norm, True
        alpha = rz / curvature
        y = y + alpha * p
        r = r - alpha * kp
        rel = float(r.norm()) / b_norm
        if rel <= tol:
            return y, it, rel, False
        z = precond(r)
        rz_new = float((r * z).sum())
        p = z + (rz_new / rz) * p
        rz = rz_new
    return y, max_iter, float(r.norm()) / b_norm, False


def _block_jacobi(blocks: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Inverse of the 3x3 diagonal blocks, with eigenvalues made positive (|lambda|, floored)."""
    sym = 0.5 * (blocks + blocks.transpose(1, 2))
    evals, evecs = torch.linalg.eigh(sym)
    floor = 1e-12 * float(evals.abs().max()) if evals.numel() else 1.0
    inv = evecs @ torch.diag_embed(1.0 / evals.abs().clamp_min(max(floor, 1e-300))) @ evecs.mT
    return lambda r: (inv @ r.unsqueeze(-1)).squeeze(-1)


def _factorize(k):
    from scipy.sparse.linalg import splu

    return splu(k, permc_spec="MMD_AT_PLUS_A")


def _mean_abs_diagonal(k) -> float:
    d = np.abs(k.diagonal())
    return float(d.mean()) if d.size else 1.0
