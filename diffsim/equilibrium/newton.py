"""Newton's method with a backtracking line search on the total potential energy."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    pass
from diffsim.equilibrium.info import EquilibriumError, EquilibriumInfo, _Options
from diffsim.equilibrium.linear_solvers import _block_jacobi, _factorize, _mean_abs_diagonal, _pcg
from diffsim.equilibrium.problem import _Problem

# Armijo constant of the backtracking line search.
ARMIJO = 1e-4


# Line-search halvings before a Newton iteration gives up.
MAX_HALVINGS = 40


# ----------------------------------------------------------------------------- Newton
def _newton(
    problem: _Problem, x0: torch.Tensor, opts: _Options
) -> tuple[torch.Tensor, EquilibriumInfo]:
    """Minimises the potential energy over the free DOFs from x0 (detached, fixed rows set)."""
    free = problem.free
    x = problem.with_fixed(x0)
    info = EquilibriumInfo(False, 0, math.inf, 0.0, linear_solver=opts.linear_solver)
    if problem.structure.n_free == 0:
        info.converged, info.residual = True, 0.0
        return x, info
    if problem.model.ground is not None:
        low = torch.nonzero(problem.model.ground.gap(x) <= 0).flatten()
        if len(low):
            raise ValueError(
                f"vertices {low[:8].tolist()} start at or below the ground; lift the start "
                f"positions (x0) or the prescribed positions above "
                f"y = {problem.model.ground.height:g}"
            )
    energy, scale = problem.energy(x)
    if not math.isfinite(energy):
        raise EquilibriumError(
            "the potential energy is not finite at the start positions (an inverted tet with a "
            "material undefined there?); start from a valid shape (x0) or use StableNeoHookean"
        )
    for it in range(opts.max_iter + 1):
        f_full = problem.forces(x)
        f = f_full[free]
        info.load = problem.load_scale(f_full)
        info.residual = float(f.norm()) / info.load
        info.history.append(info.residual)
        if not math.isfinite(info.residual):
            raise EquilibriumError(f"the forces became non-finite at Newton iteration {it}")
        if info.residual <= opts.tol:
            info.converged, info.iterations = True, it
            break
        if it == opts.max_iter:
            info.iterations = it
            break
        d = _newton_direction(problem, x, f, info, opts)
        noise = _energy_noise(problem, x, f_full, energy, scale)
        step = _line_search(problem, x, d, f, energy, noise)
        if step is None:
            info.iterations = it
            info.message = (
                f"the line search found no energy decrease at Newton iteration {it}; the "
                f"problem may have no stable equilibrium (an unconstrained rigid motion under "
                f"load?)"
            )
            break
        x, energy, scale = step
    info.hessian_products = problem.hvp_count
    return x, info


def _newton_direction(problem: _Problem, x, f, info: EquilibriumInfo, opts: _Options):
    """A descent direction ``[nf, 3]``: a Newton step on K (regularised where indefinite)."""
    hvp = problem.hessian_operator(x)
    if opts.linear_solver == "direct":
        k = problem.assemble(hvp)
        b = f.detach().reshape(-1).cpu().numpy().astype(np.float64)
        diag = _mean_abs_diagonal(k)
        # A tiny shift keeps rigid (null) modes of K from producing huge steps; larger shifts
        # (Levenberg-Marquardt) are tried where the Newton step is not a descent direction.
        import scipy.sparse as sp

        eye = sp.identity(k.shape[0], format="csc")
        for shift in (1e-10, 1e-6, 1e-4, 1e-2, 1.0):
            info.linear_iterations += 1
            try:
                step = _factorize((k + shift * diag * eye).tocsc()).solve(b)
            except RuntimeError:  # exactly singular: try a larger shift
                continue
            descent = step @ b > 1e-12 * np.linalg.norm(step) * np.linalg.norm(b)
            if np.all(np.isfinite(step)) and descent:
                return torch.as_tensor(step, dtype=f.dtype, device=f.device).reshape(-1, 3)
        return f / diag
    precond = _block_jacobi(problem.block_diagonal(hvp))
    forcing = min(0.5, math.sqrt(max(info.residual, 0.0)))
    step, iters, _, _ = _pcg(hvp, f.detach(), precond, forcing, opts.cg_max_iter, truncate=True)
    info.linear_iterations += iters
    if float((step * f).sum()) <= 0.0:
        step = precond(f.detach())
    return step


def _energy_noise(problem: _Problem, x, f_full, energy: float, scale: float) -> float:
    """The round-off level of energy differences near x (J), measured.

    Energy terms such as mu/2 (I_C - 3) cancel within each tet, so differences below
    ~eps * mu * volume cannot be resolved. The noise is read off a random perturbation of
    relative size ~1e3 eps, whose first-order change f . delta is subtracted.
    """
    eps = torch.finfo(x.dtype).eps
    gen = torch.Generator(device=x.device).manual_seed(0)
    delta = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
    delta = delta * (1e3 * eps * float(x.abs().max().clamp_min(1e-3)))
    delta[problem.model.fixed_indices] = 0.0
    if problem.model.ground is not None:
        delta[:, 1] = delta[:, 1].abs()  # never towards the ground
    e_pert, _ = problem.energy(x + delta)
    measured = abs(e_pert - energy + float((f_full * delta).sum()))
    return 10.0 * max(measured, 100.0 * eps * scale)


def _line_search(problem: _Problem, x, d_free, f, energy: float, noise: float):
    """Backtracking (Armijo) on the energy, with ground and contact step limits.

    Energy changes within ``noise`` (J, round-off) count as no change.

    Returns:
        ``(x_new, energy, energy_scale)``, or None if no step length decreases the energy.
    """
    d = torch.zeros_like(x).index_put((problem.free,), d_free)
    alpha = problem.step_limit(x, d)
    contact = getattr(problem.model, "contact", None)
    slope = float((f * d_free).sum())  # -dE/dalpha at alpha = 0
    eps = torch.finfo(x.dtype).eps
    for _ in range(MAX_HALVINGS):
        x_new = x + alpha * d
        if contact is not None:
            limited = contact.limit(x, x_new)
            # The filter scales each vertex's step; any scale below 1 counts as a cut.
            cut = float((limited - x_new).abs().max())
            if cut > 1e-6 * alpha * float(d.abs().max()) + 10.0 * eps * float(x.abs().max()):
                alpha *= 0.5
                continue
        e_new, s_new = problem.energy(x_new)
        if math.isfinite(e_new) and e_new <= energy - ARMIJO * alpha * slope + noise:
            return x_new, e_new, s_new
        alpha *= 0.5
    return None
