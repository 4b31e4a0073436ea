"""The equilibrium problem on one simulator: free forces, energy, Hessian products and assembly."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from diffsim.physics.elasticity import elastic_energy

if TYPE_CHECKING:
    from diffsim.simulator import Simulator
from diffsim.equilibrium.sparsity import _Structure

# Hessian-vector products per vectorised (vmap) batch; bounds the batch's memory.
HVP_BATCH = 32


# Backends whose force VJP turned out not to support vmap (is_grads_batched), by name.
_BATCHED_HVP: dict[tuple[str, str], bool] = {}


# A line-search step may close at most this fraction of a vertex's gap to the ground.
MAX_GAP_CLOSURE = 0.9


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
        """The pattern of K at x (mesh + the surface-contact pairs within dhat, the only ones
        whose barrier has a Hessian there) and its distance-2 colours."""
        contact = getattr(self.model, "contact", None)
        active = None if contact is None else contact.active_pairs(x)
        if active is None or active.n_pairs == 0:
            return self.structure.adjacency, self.structure.colors_distance2
        return self.structure.with_contact(active)

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
