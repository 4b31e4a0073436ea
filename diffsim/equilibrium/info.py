"""Results and errors of an equilibrium solve, and its options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


class EquilibriumError(RuntimeError):
    """Newton's method (or the adjoint solve) did not reach the requested residual."""


@dataclass
class EquilibriumInfo:
    """How a static solve went.

    Attributes:
        converged: whether the relative force residual reached ``tol``.
        iterations: Newton iterations taken.
        residual: the final relative force residual |f_free| / |load|.
        load: the load scale |load| in N that the residual is relative to.
        hessian_products: Hessian-vector products used (assembly, preconditioner, CG).
        linear_iterations: CG iterations (cg) or factorisations (direct).
        history: the relative residual before each iteration and at the end.
        linear_solver: the linear solver used ("direct" or "cg").
        message: why Newton stopped early (a failed line search), or "".
    """

    converged: bool
    iterations: int
    residual: float
    load: float
    hessian_products: int = 0
    linear_iterations: int = 0
    history: list[float] = field(default_factory=list)
    linear_solver: str = ""
    message: str = ""


@dataclass(frozen=True)
class _Options:
    tol: float
    max_iter: int
    linear_solver: str
    cg_max_iter: int
    adjoint_tol: float
