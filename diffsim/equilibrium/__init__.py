"""Static equilibrium by Newton's method, differentiated with one adjoint solve.

The equilibrium x* minimises the total potential energy over the free vertices (elastic +
gravity + ground barrier [+ surface contact] - external work), with the fixed vertices at
their prescribed positions. Newton's method with a backtracking line search finds it; the
linear systems are solved either by a sparse direct factorisation of the Hessian
(assembled from Hessian-vector products with a distance-2 colouring) or by block-Jacobi
preconditioned conjugate gradients on Hessian-vector products. Only the backend's
``prepare`` and ``forces`` are used (plus the torch energy for the line search), so the
same code runs on every backend.

The backward pass uses the implicit function theorem: with K the Hessian over the free
degrees of freedom at x*, one solve ``K lambda = dL/dx*`` and one vector-Jacobian product
of the free forces with ``lambda`` give the gradient for every input (material fields,
density, gravity, prescribed positions, external forces). See docs/equilibrium.md.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from diffsim.equilibrium.adjoint import _Equilibrium, _Solver
from diffsim.equilibrium.info import EquilibriumError, EquilibriumInfo, _Options

if TYPE_CHECKING:
    from diffsim.simulator import Simulator

__all__ = ["EquilibriumError", "EquilibriumInfo", "equilibrium", "quasi_static"]

LINEAR_SOLVERS = ("auto", "direct", "cg")
# "auto" uses the direct solver up to this many free degrees of freedom (and no surface contact).
DIRECT_MAX_DOFS = 200_000


# ----------------------------------------------------------------------------- public API
def equilibrium(
    sim: Simulator,
    *,
    params: dict[str, Any] | None = None,
    fixed_positions: torch.Tensor | None = None,
    external_forces: torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
    tol: float | None = None,
    max_iter: int = 100,
    linear_solver: str = "auto",
    cg_max_iter: int = 5000,
    adjoint_tol: float | None = None,
    strict: bool = True,
    return_info: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, EquilibriumInfo]:
    """Static equilibrium x* of a simulator's scene, differentiable by one adjoint solve.

    Args:
        sim: the simulator (mesh, material, gravity, ground, fixed vertices, backend).
        params: overrides of :meth:`Simulator.parameters` by name (e.g. a per-tet
            ``youngs_modulus`` from a neural network); tensors keep their graphs.
        fixed_positions: ``[k, 3]`` positions of the fixed vertices (default: rest).
        external_forces: ``[n, 3]`` extra constant forces in N (a load), or None.
        x0: ``[n, 3]`` start positions (default: rest); the fixed rows are replaced.
        tol: relative force residual |f_free| / |load| to reach; default 1e-8 in float64,
            1e-4 in float32. |load| is the largest of the total weight, the external forces
            and the reactions at the fixed vertices.
        max_iter: Newton iterations at most.
        linear_solver: ``"direct"`` (assembled Hessian, sparse LU), ``"cg"`` (block-Jacobi
            PCG on Hessian-vector products) or ``"auto"`` (direct unless surface contact is on).
        cg_max_iter: CG iterations per solve at most.
        adjoint_tol: relative residual of the adjoint CG solve; default 1e-10 / 1e-5.
        strict: raise :class:`EquilibriumError` on non-convergence (default); with False,
            return the last iterate and a flag (needs ``return_info=True``).
        return_info: also return an :class:`EquilibriumInfo`.

    Returns:
        Positions ``[n, 3]`` (fixed rows = ``fixed_positions``), and the info if asked.
    """
    if linear_solver not in LINEAR_SOLVERS:
        raise ValueError(f"linear_solver must be one of {LINEAR_SOLVERS}, got {linear_solver!r}")
    if not strict and not return_info:
        raise ValueError("strict=False needs return_info=True, so the convergence flag is seen")
    if not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be an integer >= 0, got {max_iter!r}")
    for name, value in (("tol", tol), ("adjoint_tol", adjoint_tol)):
        if value is not None and not (float(value) > 0 and math.isfinite(float(value))):
            raise ValueError(
                f"{name} must be a positive relative residual (e.g. 1e-8), got {value!r}"
            )
    model = sim.model
    f64 = sim.dtype == torch.float64
    if linear_solver == "auto":
        large = 3 * int((~model.fixed_mask).sum()) > DIRECT_MAX_DOFS
        linear_solver = "cg" if large else "direct"
    opts = _Options(
        tol=float(tol) if tol is not None else (1e-8 if f64 else 1e-4),
        max_iter=max_iter,
        linear_solver=linear_solver,
        cg_max_iter=int(cg_max_iter),
        adjoint_tol=float(adjoint_tol) if adjoint_tol is not None else (1e-10 if f64 else 1e-5),
    )
    all_params = sim.parameters()
    if params is not None:
        unknown = set(params) - set(all_params)
        if unknown:
            raise ValueError(f"unknown parameters {sorted(unknown)}; known: {sorted(all_params)}")
        for k, v in params.items():
            all_params[k] = torch.as_tensor(v, dtype=sim.dtype, device=sim.device)
        sim.material.replace(**{k: all_params[k] for k in sim.material.parameter_names}).validate(
            model.n_tets
        )
    names = list(all_params)
    x_fixed = _fixed(sim, fixed_positions)
    f_ext = _external(sim, external_forces)
    # The static solve works in the simulator's dtype (no increments accumulate over time).
    start = model.rest_positions.to(sim.dtype) if x0 is None else sim._vertex_tensor("x0", x0)
    solver = _Solver(sim, names, start.detach(), opts)
    x = _Equilibrium.apply(solver, x_fixed, f_ext, *all_params.values())
    info = solver.info
    if not info.converged and strict:
        raise EquilibriumError(
            (f"{info.message}. " if info.message else "")
            + f"Newton's method stopped after {info.iterations} iterations at a relative force "
            f"residual of {info.residual:.3g} (tol {opts.tol:g}, load {info.load:.3g} N); raise "
            f"max_iter, loosen tol, or approach the load in steps with quasi_static()"
        )
    return (x, info) if return_info else x


def quasi_static(
    sim: Simulator,
    *,
    fixed_positions: torch.Tensor | None = None,
    external_forces: torch.Tensor | None = None,
    steps: int | None = None,
    params: dict[str, Any] | None = None,
    x0: torch.Tensor | None = None,
    return_info: bool = False,
    **options: Any,
) -> torch.Tensor | tuple[torch.Tensor, list[EquilibriumInfo]]:
    """A loading path: one equilibrium per load step, each warm-started from the last.

    Args:
        sim: the simulator.
        fixed_positions: ``[T, k, 3]`` prescribed positions per step, or ``[k, 3]``, or None.
        external_forces: ``[T, n, 3]`` external forces per step, or ``[n, 3]``, or None.
        steps: T, needed only when neither argument has a step axis.
        params: as in :func:`equilibrium`.
        x0: start positions of the first solve (default: rest).
        return_info: also return the list of :class:`EquilibriumInfo`.
        **options: passed to :func:`equilibrium` (tol, linear_solver, ...).

    Returns:
        Positions ``[T, n, 3]``, differentiable with respect to every load step and parameter.
        The warm start is held constant in the backward pass: each equilibrium is a function
        of its own loads only (exact for elastic, frictionless problems on one branch).
    """
    fp = None if fixed_positions is None else torch.as_tensor(fixed_positions)
    fe = None if external_forces is None else torch.as_tensor(external_forces)
    # Per-step sequences have a leading step axis; the shapes are checked per solve.
    lengths = [t.shape[0] for t in (fp, fe) if t is not None and t.dim() == 3]
    if steps is None:
        if not lengths:
            raise ValueError(
                "give steps=T, or fixed_positions [T, k, 3] / external_forces [T, n, 3]"
            )
        steps = lengths[0]
    if any(length != steps for length in lengths):
        raise ValueError(f"load sequences must all have {steps} steps, got {lengths}")
    xs, infos = [], []
    start = x0
    for t in range(steps):
        fp_t = None if fp is None else (fp[t] if fp.dim() == 3 else fp)
        fe_t = None if fe is None else (fe[t] if fe.dim() == 3 else fe)
        x, info = equilibrium(
            sim,
            params=params,
            fixed_positions=fp_t,
            external_forces=fe_t,
            x0=start,
            return_info=True,
            **options,
        )
        xs.append(x)
        infos.append(info)
        start = x.detach()
    out = torch.stack(xs)
    return (out, infos) if return_info else out


def _fixed(sim: Simulator, fixed_positions) -> torch.Tensor:
    idx = sim.model.fixed_indices
    if fixed_positions is None:
        return sim.model.rest_positions[idx].to(sim.dtype)
    t = torch.as_tensor(fixed_positions, device=sim.device)
    if not t.is_floating_point() or t.shape != (len(idx), 3):
        raise ValueError(
            f"fixed_positions must be a float tensor [{len(idx)}, 3] (one row per fixed vertex), "
            f"got {t.dtype} {list(t.shape)}"
        )
    t = t.to(sim.dtype)
    if not torch.isfinite(t.detach()).all():
        raise ValueError("fixed_positions contain NaN or inf")
    return t


def _external(sim: Simulator, external_forces) -> torch.Tensor | None:
    if external_forces is None:
        return None
    n = sim.model.n_vertices
    t = torch.as_tensor(external_forces, device=sim.device)
    if not t.is_floating_point() or t.shape != (n, 3):
        raise ValueError(
            f"external_forces must be a float tensor [{n}, 3] in N, got {list(t.shape)}"
        )
    t = t.to(sim.dtype)
    if not torch.isfinite(t.detach()).all():
        raise ValueError("external_forces contain NaN or inf")
    return t
