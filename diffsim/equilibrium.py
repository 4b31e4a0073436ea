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
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from diffsim.elasticity import elastic_energy

if TYPE_CHECKING:
    from diffsim.simulator import Simulator

LINEAR_SOLVERS = ("auto", "direct", "cg")
# "auto" uses the direct solver up to this many free degrees of freedom (and no surface contact).
DIRECT_MAX_DOFS = 200_000
# Hessian-vector products per vectorised (vmap) batch; bounds the batch's memory.
HVP_BATCH = 32
# Backends whose force VJP turned out not to support vmap (is_grads_batched), by name.
_BATCHED_HVP: dict[tuple[str, str], bool] = {}
# Armijo constant of the backtracking line search.
ARMIJO = 1e-4
# Line-search halvings before a Newton iteration gives up.
MAX_HALVINGS = 40
# A line-search step may close at most this fraction of a vertex's gap to the ground.
MAX_GAP_CLOSURE = 0.9


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


# ----------------------------------------------------------------------------- structure
class _Structure:
    """Sparsity of the free-DOF Hessian and the colourings used to recover it from HVPs."""

    def __init__(self, model) -> None:
        import scipy.sparse as sp

        n = model.n_vertices
        free = ~model.fixed_mask.cpu().numpy()
        self.free_indices = np.flatnonzero(free)
        nf = len(self.free_indices)
        local = np.full(n, -1, dtype=np.int64)
        local[self.free_indices] = np.arange(nf)
        tets = model.tets.cpu().numpy()
        rows = np.repeat(tets, 4, axis=1).reshape(-1)
        cols = np.tile(tets, (1, 4)).reshape(-1)
        keep = free[rows] & free[cols]
        a = sp.coo_matrix(
            (np.ones(int(keep.sum()), dtype=np.int8), (local[rows[keep]], local[cols[keep]])),
            shape=(nf, nf),
        ).tocsr()
        a = (a + sp.identity(nf, dtype=np.int8, format="csr")).astype(bool).tocsr()
        self.adjacency = a
        self.n_free = nf
        self.local = local
        self._d1: np.ndarray | None = None
        self._d2: np.ndarray | None = None
        self._contact: tuple[Any, Any, np.ndarray] | None = None

    @property
    def colors_distance1(self) -> np.ndarray:
        """Colours with no two adjacent free vertices alike (enough for the block diagonal)."""
        if self._d1 is None:
            self._d1 = _greedy_coloring(self.adjacency)
        return self._d1

    @property
    def colors_distance2(self) -> np.ndarray:
        """Colours with no two free vertices alike within two edges (enough for all of K)."""
        if self._d2 is None:
            self._d2 = _distance2_coloring(self.adjacency)
        return self._d2

    def with_contact(self, candidates) -> tuple[Any, np.ndarray]:
        """Pattern and distance-2 colours with the couplings of surface-contact candidates.

        Every candidate pair (point-triangle or edge-edge, four vertices) couples its four
        vertices; the result is cached until the candidate set changes.
        """
        import scipy.sparse as sp

        if self._contact is not None and self._contact[0] is candidates:
            return self._contact[1], self._contact[2]
        groups = torch.cat([candidates.point_triangle, candidates.edge_edge]).cpu().numpy()
        groups = self.local[groups.reshape(-1, 4)]
        rows = np.repeat(groups, 4, axis=1).reshape(-1)
        cols = np.tile(groups, (1, 4)).reshape(-1)
        keep = (rows >= 0) & (cols >= 0)
        nf = self.n_free
        extra = sp.coo_matrix(
            (np.ones(int(keep.sum()), dtype=np.int8), (rows[keep], cols[keep])), shape=(nf, nf)
        )
        pattern = (self.adjacency + extra.tocsr()).astype(bool).tocsr()
        colors = _distance2_coloring(pattern)
        self._contact = (candidates, pattern, colors)
        return pattern, colors


def _distance2_coloring(pattern) -> np.ndarray:
    a = pattern.astype(np.int32)
    return _greedy_coloring((a @ a).astype(bool).tocsr())


def _greedy_coloring(graph) -> np.ndarray:
    """Greedy colouring of a symmetric CSR pattern (the diagonal is ignored)."""
    n = graph.shape[0]
    colors = np.full(n, -1, dtype=np.int64)
    indptr, indices = graph.indptr, graph.indices
    for v in range(n):
        used = colors[indices[indptr[v] : indptr[v + 1]]]
        used = used[used >= 0]
        if used.size == 0:
            colors[v] = 0
            continue
        mark = np.zeros(int(used.max()) + 2, dtype=bool)
        mark[used] = True
        colors[v] = int(np.argmin(mark))
    return colors


# ----------------------------------------------------------------------------- the problem
class _Problem:
    """One static problem: fixed coefficients, prescribed positions and external forces.

    Positions are full ``[n, 3]`` tensors; the unknowns are their free rows.
    """

    def __init__(self, sim: Simulator, params, x_fixed, f_ext, structure: _Structure) -> None:
        self.sim = sim
        self.model = sim.model
        self.backend = sim.backend
        self.coeffs = sim.coefficients(params)
        self.prepared = self.backend.prepare(self.coeffs)
        self.x_fixed = x_fixed
        self.f_ext = f_ext
        self.structure = structure
        self.free = torch.as_tensor(structure.free_indices, device=x_fixed.device)
        self.hvp_count = 0

    def with_fixed(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_put((self.model.fixed_indices,), self.x_fixed)

    def forces(self, x: torch.Tensor) -> torch.Tensor:
        """Total force ``[n, 3]`` (conservative + external)."""
        f = self.backend.forces(self.prepared, x)
        return f if self.f_ext is None else f + self.f_ext

    def energy(self, x: torch.Tensor) -> tuple[float, float]:
        """Total potential energy (J) and the sum of its terms' magnitudes (its round-off scale)."""
        m, c = self.model, self.coeffs
        terms = [
            elastic_energy(c.material, x, m.tets, m.dm_inv, m.rest_volumes),
            -(c.mass[:, None] * x * c.gravity).sum(),
        ]
        if m.ground is not None:
            terms.append(m.ground.energy(x, c.mass))
        if getattr(m, "contact", None) is not None:
            terms.append(m.contact.energy(x, c.mass))
        if self.f_ext is not None:
            terms.append(-(self.f_ext * x).sum())
        values = [float(t) for t in terms]
        return sum(values), sum(abs(v) for v in values)

    def load_scale(self, f: torch.Tensor) -> float:
        """|load| (N): weight, external forces and reactions at fixed vertices, the largest."""
        c = self.coeffs
        scales = [float((c.mass[:, None] * c.gravity).norm())]
        if self.f_ext is not None:
            scales.append(float(self.f_ext.norm()))
        if len(self.model.fixed_indices):
            scales.append(float(f[self.model.fixed_indices].norm()))
        return max(max(scales), 1e-30)

    def hessian_operator(self, x: torch.Tensor) -> _Hessian:
        """K = -df_free/dx_free at x, applied by Hessian-vector products (one graph, reused)."""
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            f = self.backend.forces(self.prepared, xr)
        return _Hessian(self, f, xr)

    def colored_products(self, hvp: _Hessian, colors: np.ndarray) -> torch.Tensor:
        """``[n_colors, 3, nf, 3]``: K times the indicator of each colour and axis."""
        nf = self.structure.n_free
        n_colors = int(colors.max()) + 1 if nf else 0
        w = torch.zeros(n_colors, 3, nf, 3, dtype=self.x_fixed.dtype, device=self.free.device)
        c = torch.as_tensor(colors, device=self.free.device)
        rows = torch.arange(nf, device=self.free.device)
        for d in range(3):
            w[c, d, rows, d] = 1.0
        return hvp.batch(w.reshape(-1, nf, 3)).reshape(n_colors, 3, nf, 3)

    def block_diagonal(self, hvp) -> torch.Tensor:
        """The 3x3 diagonal blocks of K, ``[nf, 3, 3]`` (row a, column d)."""
        colors = self.structure.colors_distance1
        products = self.colored_products(hvp, colors)  # [C, d, i, a]
        idx = torch.as_tensor(colors, device=products.device)
        rows = torch.arange(len(colors), device=products.device)
        return products[idx, :, rows, :].transpose(1, 2)

    def sparsity(self, x: torch.Tensor) -> tuple[Any, np.ndarray]:
        """The pattern of K at x (mesh + surface-contact candidates) and its distance-2 colours."""
        contact = getattr(self.model, "contact", None)
        if contact is None:
            return self.structure.adjacency, self.structure.colors_distance2
        return self.structure.with_contact(contact.candidates(x))

    def assemble(self, hvp: _Hessian):
        """K over the free DOFs as a scipy CSC matrix (float64), symmetrised."""
        import scipy.sparse as sp

        pattern, colors = self.sparsity(hvp.xr.detach())
        products = self.colored_products(hvp, colors).detach().cpu().numpy().astype(np.float64)
        pattern = pattern.tocoo()
        i, j = pattern.row, pattern.col
        a = np.arange(3)
        vals = products[
            colors[j][:, None, None], a[None, None, :], i[:, None, None], a[None, :, None]
        ]
        shape = (len(i), 3, 3)  # [pair, row axis, column axis]
        rows = np.broadcast_to(3 * i[:, None, None] + a[None, :, None], shape)
        cols = np.broadcast_to(3 * j[:, None, None] + a[None, None, :], shape)
        n3 = 3 * self.structure.n_free
        k = sp.coo_matrix((vals.ravel(), (rows.ravel(), cols.ravel())), shape=(n3, n3)).tocsr()
        return (0.5 * (k + k.T)).tocsc()

    def step_limit(self, x: torch.Tensor, d_full: torch.Tensor) -> float:
        """The largest step length <= 1 that closes at most 90% of any ground gap."""
        ground = self.model.ground
        if ground is None:
            return 1.0
        gap = ground.gap(x)
        closing = d_full[:, 1] < 0
        if not bool(closing.any()):
            return 1.0
        alpha = (MAX_GAP_CLOSURE * gap[closing] / -d_full[closing, 1]).min()
        return min(1.0, float(alpha))


class _Hessian:
    """Products with K = -df_free/dx_free through the backend's force VJP (K is symmetric)."""

    def __init__(self, problem: _Problem, f: torch.Tensor, xr: torch.Tensor) -> None:
        self.problem = problem
        self.f = f
        self.xr = xr

    def __call__(self, w_free: torch.Tensor) -> torch.Tensor:
        """K w for ``w [nf, 3]``."""
        free = self.problem.free
        w = torch.zeros_like(self.xr).index_put((free,), w_free)
        (g,) = torch.autograd.grad(self.f, self.xr, w, retain_graph=True)
        self.problem.hvp_count += 1
        return -g[free]

    def batch(self, w_free: torch.Tensor) -> torch.Tensor:
        """K w for a batch ``[B, nf, 3]``, vectorised (vmap) where the backend allows it."""
        free = self.problem.free
        out = []
        for chunk in torch.split(w_free, HVP_BATCH):
            w = chunk.new_zeros(len(chunk), *self.xr.shape)
            w[:, free] = chunk
            key = (self.problem.backend.name, type(self.problem.coeffs.material).__name__)
            if _BATCHED_HVP.get(key, True):
                try:
                    (g,) = torch.autograd.grad(
                        self.f, self.xr, w, retain_graph=True, is_grads_batched=True
                    )
                    self.problem.hvp_count += len(chunk)
                    out.append(-g[:, free])
                    continue
                except (RuntimeError, NotImplementedError):
                    # A backend whose force VJP cannot be vmapped: fall back to a loop.
                    _BATCHED_HVP[key] = False
            out.append(torch.stack([self(c) for c in chunk]))
        return torch.cat(out) if out else w_free.clone()


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


_STRUCTURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _structure(sim: Simulator) -> _Structure:
    """The sparsity and colourings of a simulator's scene, computed once per simulator."""
    cached = _STRUCTURES.get(sim)
    if cached is None:
        cached = _STRUCTURES[sim] = _Structure(sim.model)
    return cached


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
