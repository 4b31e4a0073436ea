"""The implicit adjoint: one linear solve gives the gradient of the equilibrium."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from diffsim.simulator import Simulator
from diffsim.equilibrium.info import EquilibriumError, EquilibriumInfo, _Options
from diffsim.equilibrium.linear_solvers import _block_jacobi, _factorize, _mean_abs_diagonal, _pcg
from diffsim.equilibrium.newton import _newton
from diffsim.equilibrium.problem import _Problem
from diffsim.equilibrium.sparsity import _structure


# ----------------------------------------------------------------------------- adjoint
def _adjoint_solve(problem: _Problem, x: torch.Tensor, g: torch.Tensor, opts: _Options):
    """lambda ``[nf, 3]`` with K(x) lambda = g, K the unprojected Hessian at x."""
    hvp = problem.hessian_operator(x)
    if float(g.norm()) == 0.0:
        return torch.zeros_like(g)
    if opts.linear_solver == "direct":
        k = problem.assemble(hvp)
        b = g.detach().reshape(-1).cpu().numpy().astype(np.float64)
        try:
            lam = _factorize(k).solve(b)
        except RuntimeError:  # exactly singular (unconstrained rigid modes)
            import scipy.sparse as sp

            shift = 1e-12 * _mean_abs_diagonal(k) * sp.identity(k.shape[0], format="csc")
            lam = _factorize((k + shift).tocsc()).solve(b)
        lam_t = torch.as_tensor(lam, dtype=g.dtype, device=g.device).reshape(-1, 3)
        rel = float((hvp(lam_t) - g).norm() / g.norm())
    else:
        precond = _block_jacobi(problem.block_diagonal(hvp))
        lam_t, _, rel, _ = _pcg(hvp, g.detach(), precond, opts.adjoint_tol, opts.cg_max_iter, False)
    if not rel <= max(opts.adjoint_tol, 1e3 * torch.finfo(g.dtype).eps) * 10:
        raise EquilibriumError(
            f"the adjoint solve K lambda = dL/dx reached a relative residual of {rel:.3g} only; "
            f"the equilibrium may be singular (unconstrained rigid motion) or unstable"
        )
    return lam_t


class _Equilibrium(torch.autograd.Function):
    """x* = argmin E(x; params, x_fixed, f_ext); backward by one adjoint solve."""

    @staticmethod
    def forward(ctx, solver, x_fixed, f_ext, *params):
        problem = solver.problem(params, x_fixed, f_ext)
        with torch.no_grad():
            x, info = _newton(problem, solver.x0, solver.options)
        solver.info = info
        ctx.solver = solver
        ctx.save_for_backward(x, x_fixed, *params)
        return x

    @staticmethod
    def backward(ctx, grad_x):
        solver = ctx.solver
        saved = list(ctx.saved_tensors)
        x = saved.pop(0)
        x_fixed = saved.pop(0)
        params = saved
        need = ctx.needs_input_grad
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(n) for t, n in zip(params, need[3:], strict=True)]
            xf = x_fixed.detach().requires_grad_(need[1])
            problem = solver.problem(leaves, xf, None)
            free = problem.free
            g = grad_x[free]
            lam = _adjoint_solve(problem, x.detach(), g, solver.options)
            inputs = [t for t in [xf, *leaves] if t.requires_grad]
            grads: dict[int, torch.Tensor | None] = {}
            if inputs:
                f_free = problem.forces(problem.with_fixed(x.detach()))[free]
                out = torch.autograd.grad(f_free, inputs, lam, allow_unused=True)
                grads = {id(t): gt for t, gt in zip(inputs, out, strict=True)}
        grad_fixed = None
        if need[1]:
            direct = grad_x[problem.model.fixed_indices]
            grad_fixed = direct if grads.get(id(xf)) is None else direct + grads[id(xf)]
        grad_ext = None
        if need[2]:
            grad_ext = torch.zeros_like(grad_x).index_put((free,), lam)
        grad_params = [
            (None if grads.get(id(t)) is None else grads[id(t)]) if t.requires_grad else None
            for t in leaves
        ]
        return (None, grad_fixed, grad_ext, *grad_params)


class _Solver:
    """Holds what the autograd function needs besides tensors."""

    def __init__(self, sim: Simulator, names: list[str], x0: torch.Tensor, options: _Options):
        self.sim = sim
        self.names = names
        self.x0 = x0
        self.options = options
        self.structure = _structure(sim)
        self.info: EquilibriumInfo | None = None

    def problem(self, params, x_fixed, f_ext) -> _Problem:
        named = dict(zip(self.names, params, strict=True))
        return _Problem(self.sim, named, x_fixed, f_ext, self.structure)
