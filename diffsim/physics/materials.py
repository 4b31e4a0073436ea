"""Hyperelastic materials, each defined by its energy density psi(F), written once in torch.

Materials are ``torch.nn.Module``s. Their parameters are floats or tensors of shape ``[]``
or ``[n_tets]``; a tensor keeps its autograd graph, so gradients reach whatever produced
it (a leaf, a neural network). Forces on the torch path are minus the autograd gradient of
the total energy; the Warp kernels implement the same first Piola-Kirchhoff stresses
analytically, for the classes that name a ``kernel``.
"""

from __future__ import annotations

import copy
import math

import torch


class Material(torch.nn.Module):
    """Base class: a hyperelastic energy density psi(F) with (E, nu, density), a torch Module.

    As in NEML2, a material is a ``torch.nn.Module``: ``named_parameters()``, ``.to()``,
    ``state_dict()`` and ``torch.optim`` work as for any Module, and submodules (a neural
    field, say) are found like any other. The simulator differentiates every floating-point
    tensor the material holds (:meth:`differentiable_tensors`): Parameters, buffers, and
    plain tensor attributes alike, so a user's material needs only
    :meth:`energy_density` and its parameters, with nothing declared.

    E, nu and density may be floats or tensors of shape ``[]`` or ``[n_tets]``. A float is
    stored as a buffer; a tensor is stored as given (the same object: a leaf keeps receiving
    its ``.grad``, a network's output keeps its graph); an ``nn.Parameter`` is registered
    as a parameter.

    Args:
        youngs_modulus: E in Pa, > 0.
        poissons_ratio: nu, in (-1, 0.5).
        density: in kg/m^3, > 0.
    """

    #: The physical parameters, by name (what fitting, scenes and the viewer address).
    parameter_names: tuple[str, ...] = ("youngs_modulus", "poissons_ratio", "density")
    #: The Warp kernel implementing this class's stress, set by the built-in classes only
    #: (a subclass that overrides ``energy_density`` runs on the torch path).
    kernel: int | None = None

    def __init__(
        self,
        youngs_modulus: float | torch.Tensor = 1e5,
        poissons_ratio: float | torch.Tensor = 0.3,
        density: float | torch.Tensor = 1000.0,
    ) -> None:
        super().__init__()
        self.set_value("youngs_modulus", youngs_modulus)
        self.set_value("poissons_ratio", poissons_ratio)
        self.set_value("density", density)
        self.validate()

    def set_value(self, name: str, value: float | torch.Tensor) -> None:
        """Stores a parameter: a Parameter as a parameter, a tensor (graph kept) or a float
        (as a float64 tensor) as a buffer."""
        if isinstance(value, torch.nn.Parameter):
            self._buffers.pop(name, None)
            self.register_parameter(name, value)
        elif isinstance(value, torch.Tensor):
            self._parameters.pop(name, None)
            self.register_buffer(name, value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            self._parameters.pop(name, None)
            self.register_buffer(name, torch.tensor(float(value), dtype=torch.float64))
        else:
            raise ValueError(f"{name} must be a float or a tensor, got {type(value).__name__}")

    # ----------------------------------------------------------------- the physics
    def energy_density(self, F: torch.Tensor) -> torch.Tensor:
        """Energy per unit rest volume psi(F) in J/m^3.

        Args:
            F: deformation gradients ``[M, 3, 3]``.

        Returns:
            ``[M]`` energy densities.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement energy_density(F)")

    def forward(self, F: torch.Tensor) -> torch.Tensor:
        """The Module call: :meth:`energy_density`."""
        return self.energy_density(F)

    def lame(self) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """Lame parameters (mu, lambda) in Pa from (E, nu), as used by psi."""
        return lame_parameters(self.youngs_modulus, self.poissons_ratio)

    def kernel_lame(self) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """The (mu, lambda) the Warp kernel of :attr:`kernel_id` takes (default: :meth:`lame`)."""
        return self.lame()

    @property
    def kernel_id(self) -> int | None:
        """The Warp kernel id implementing this material's stress, or None (torch path only).

        A subclass of a built-in that overrides ``energy_density`` gets None.
        """
        for cls in type(self).__mro__:
            if "kernel" in vars(cls):
                if cls.kernel is not None and type(self).energy_density is cls.energy_density:
                    return cls.kernel
                return None
        return None

    # ----------------------------------------------------------------- parameters
    def physical_parameters(self) -> dict[str, torch.Tensor]:
        """The named physical parameters (``parameter_names``), graphs kept."""
        return {name: getattr(self, name) for name in self.parameter_names}

    def differentiable_tensors(self) -> dict[str, torch.Tensor]:
        """Every floating-point tensor of the material and its submodules, by dotted name.

        Parameters, buffers and plain tensor attributes (``self.c = torch.tensor(...,
        requires_grad=True)``) alike: these are the material's inputs to a rollout.
        """
        out: dict[str, torch.Tensor] = {}
        for prefix, module in self.named_modules():
            dot = f"{prefix}." if prefix else ""
            own = {**module._parameters, **module._buffers}
            own.update(
                (k, v)
                for k, v in vars(module).items()
                if isinstance(v, torch.Tensor) and not k.startswith("_")
            )
            for name, value in own.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    out[dot + name] = value
        return out

    @property
    def needs_grad(self) -> bool:
        """True if any tensor of the material requires a gradient (the material says so)."""
        return any(t.requires_grad for t in self.differentiable_tensors().values())

    def with_tensors(self, values: dict[str, torch.Tensor]) -> Material:
        """A copy with tensors replaced by dotted name (:meth:`differentiable_tensors`).

        The copy shares everything else; the original is not modified (checkpointing and
        fitting substitute their own tensors this way).
        """
        clone = _shallow_copy(self)
        for name, value in values.items():
            owner = clone
            *path, leaf = name.split(".")
            for part in path:
                child = _shallow_copy(owner._modules[part])
                owner._modules[part] = child
                owner = child
            if leaf in owner._parameters:
                owner._parameters[leaf] = value
            elif leaf in owner._buffers:
                owner._buffers[leaf] = value
            elif isinstance(vars(owner).get(leaf), torch.Tensor):
                owner.__dict__[leaf] = value
            else:
                raise ValueError(f"{type(self).__name__} has no tensor {name!r}")
        return clone

    def replace(self, **values) -> Material:
        """A copy with some physical parameters replaced (floats or tensors)."""
        unknown = set(values) - set(self.parameter_names)
        if unknown:
            raise ValueError(
                f"unknown material parameters {sorted(unknown)}; "
                f"{type(self).__name__} has {list(self.parameter_names)}"
            )
        clone = _shallow_copy(self)
        for name, value in values.items():
            clone.set_value(name, value)
        return clone

    def validate(self, n_tets: int | None = None) -> None:
        """Checks parameter values and shapes.

        Raises:
            ValueError: a NaN, E <= 0, nu outside (-1, 0.5), density <= 0, or a tensor whose
                shape is neither ``[]`` nor ``[n_tets]``.
        """
        for name in self.parameter_names:
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                if not value.is_floating_point():
                    raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")
                # Without n_tets (at construction) a leading world axis is allowed too:
                # [W] or [W, n_tets], checked against the mesh by Simulator(worlds=W).
                too_many = value.dim() > (1 if n_tets is not None else 2)
                if too_many or (n_tets is not None and value.dim() == 1 and len(value) != n_tets):
                    expected = (
                        f"[] or [{n_tets}]"
                        if n_tets is not None
                        else "[] or [n_tets] (or [W] / [W, n_tets] for Simulator(worlds=W))"
                    )
                    raise ValueError(f"{name} must have shape {expected}, got {list(value.shape)}")
                data = value.detach()
            elif isinstance(value, (int, float)):
                data = torch.tensor(float(value))
            else:
                raise ValueError(f"{name} must be a float or a tensor, got {type(value).__name__}")
            if torch.isnan(data).any():
                raise ValueError(f"{name} contains NaN")
            if name in PARAMETER_BOUNDS:
                lo, hi, text = PARAMETER_BOUNDS[name]
                bad = ~((data > lo) & (data < hi))
                if bad.any():
                    where = (
                        ""
                        if data.dim() == 0
                        else f" at tets {bad.nonzero().flatten()[:8].tolist()}"
                    )
                    raise ValueError(
                        f"{name} must be {text}, got {data[bad].flatten()[0].item():g}{where}"
                    )

    def extra_repr(self) -> str:
        def show(v):
            if isinstance(v, torch.Tensor):
                return f"tensor{list(v.shape)}" if v.dim() else f"{v.item():g}"
            return f"{v:g}"

        return ", ".join(f"{k}={show(v)}" for k, v in self.physical_parameters().items())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


# The open bounds of the physical parameters (lower, upper, how the error states them).
PARAMETER_BOUNDS = {
    "youngs_modulus": (0.0, math.inf, "> 0 Pa"),
    "poissons_ratio": (-1.0, 0.5, "in (-1, 0.5)"),
    "density": (0.0, math.inf, "> 0 kg/m^3"),
}


def _shallow_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of a Module sharing its tensors, with its own parameter/buffer/module tables."""
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = dict(module._modules)
    return clone


def lame_parameters(youngs_modulus, poissons_ratio):
    """(mu, lambda) from Young's modulus E and Poisson's ratio nu (tensors or floats)."""
    E, nu = youngs_modulus, poissons_ratio
    mu = E / (2.0 * (1.0 + nu))
    lam = E * nu / ((1.0 + nu) * (1.0 - 2.0 * nu))
    return mu, lam


def _expand(value, F: torch.Tensor):
    """A per-tet parameter as a tensor broadcastable against ``[M]``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype=F.dtype, device=F.device)
    return value


def _invariants(F: torch.Tensor):
    """I_C = |F|_F^2 and J = det F."""
    return F.square().sum(dim=(-2, -1)), torch.linalg.det(F)


class StableNeoHookean(Material):
    """Stable Neo-Hookean (Smith, de Goes and Kim 2018).

    psi = mu'/2 (I_C - 3) - mu'/2 log((I_C + 1) / 4) + lambda'/2 [(J - alpha)^2 - (1 - alpha)^2],
    with alpha = 1 + 3 mu' / (4 lambda'), and mu' = 4/3 mu, lambda' = lambda + 5/6 mu so that
    small strains match linear elasticity with (E, nu). The constants make psi(I) = 0.
    Defined for inverted tets (J <= 0).
    """

    kernel = 0  # the kernel ids index the tables of diffsim/kernels (SNH, NH, STVK, ...)

    def kernel_lame(self):
        """(mu', lambda') = (4/3 mu, lambda + 5/6 mu), the constants psi is written in."""
        mu, lam = self.lame()
        return 4.0 / 3.0 * mu, lam + 5.0 / 6.0 * mu

    def energy_density(self, F: torch.Tensor) -> torch.Tensor:
        mu_s, lam_s = self.kernel_lame()
        mu_s, lam_s = _expand(mu_s, F), _expand(lam_s, F)
        ic, J = _invariants(F)
        alpha = 1.0 + 0.75 * mu_s / lam_s
        volume_term = (J - alpha) ** 2 - (1.0 - alpha) ** 2
        return (
            0.5 * mu_s * (ic - 3.0)
            - 0.5 * mu_s * torch.log((ic + 1.0) / 4.0)
            + 0.5 * lam_s * volume_term
        )


class NeoHookean(Material):
    """Compressible Neo-Hookean: psi = mu/2 (I_C - 3) - mu log J + lambda/2 (log J)^2.

    Undefined for inverted tets (J <= 0); a step that inverts one raises an error.
    """

    kernel = 1

    def energy_density(self, F: torch.Tensor) -> torch.Tensor:
        mu, lam = self.lame()
        mu, lam = _expand(mu, F), _expand(lam, F)
        ic, J = _invariants(F)
        log_j = torch.log(J)
        return 0.5 * mu * (ic - 3.0) - mu * log_j + 0.5 * lam * log_j**2


class StVK(Material):
    """St. Venant-Kirchhoff: psi = mu |E|^2 + lambda/2 tr(E)^2, E = (F^T F - I) / 2."""

    kernel = 2

    def energy_density(self, F: torch.Tensor) -> torch.Tensor:
        mu, lam = self.lame()
        mu, lam = _expand(mu, F), _expand(lam, F)
        eye = torch.eye(3, dtype=F.dtype, device=F.device)
        strain = 0.5 * (F.transpose(-1, -2) @ F - eye)
        trace = strain.diagonal(dim1=-2, dim2=-1).sum(-1)
        return mu * strain.square().sum(dim=(-2, -1)) + 0.5 * lam * trace**2


class Corotated(Material):
    """Fixed corotated (Stomakhin et al. 2012): psi = mu |F - R|^2 + lambda/2 (J - 1)^2.

    R is the rotation of the polar decomposition F = R S (det R = +1, so for an inverted
    tet S has one negative entry), differentiated with the closed form of dR/dF.
    """

    kernel = 3

    def energy_density(self, F: torch.Tensor) -> torch.Tensor:
        mu, lam = self.lame()
        mu, lam = _expand(mu, F), _expand(lam, F)
        R = polar_rotation(F)
        J = torch.linalg.det(F)
        return mu * (F - R).square().sum(dim=(-2, -1)) + 0.5 * lam * (J - 1.0) ** 2


class LinearElastic(Material):
    """Small-strain linear elasticity: psi = mu |eps|^2 + lambda/2 tr(eps)^2, eps = sym(F) - I.

    Not rotation invariant: use it for small displacements and rotations only.
    """

    kernel = 4

    def energy_density(self, F: torch.Tensor) -> torch.Tensor:
        mu, lam = self.lame()
        mu, lam = _expand(mu, F), _expand(lam, F)
        eye = torch.eye(3, dtype=F.dtype, device=F.device)
        eps = 0.5 * (F + F.transpose(-1, -2)) - eye
        trace = eps.diagonal(dim1=-2, dim2=-1).sum(-1)
        return mu * eps.square().sum(dim=(-2, -1)) + 0.5 * lam * trace**2


class _PolarRotation(torch.autograd.Function):
    """R of F = R S with det R = +1; backward by the closed form, itself differentiable."""

    @staticmethod
    def forward(ctx, F):
        U, _, Vh = torch.linalg.svd(F)
        sign = torch.sign(torch.linalg.det(U @ Vh))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        U = torch.cat([U[..., :2], U[..., 2:] * sign[..., None, None]], dim=-1)
        R = U @ Vh
        ctx.save_for_backward(F, R)
        return R

    @staticmethod
    def backward(ctx, grad_R):
        F, R = ctx.saved_tensors
        return polar_rotation_vjp(F, R, grad_R)


def polar_rotation(F: torch.Tensor) -> torch.Tensor:
    """Rotation of the polar decomposition, ``[M, 3, 3] -> [M, 3, 3]``, twice differentiable."""
    return _PolarRotation.apply(F)


def polar_rotation_vjp(F: torch.Tensor, R: torch.Tensor, grad_R: torch.Tensor) -> torch.Tensor:
    """Vector-Jacobian product of the polar rotation, ``<G, dR/dF>``.

    With S = R^T F (symmetric), a variation dR = R K(w) satisfies A w = b where
    A = tr(S) I - S and b = axial(R^T dF - dF^T R). Then <G, dR> = g . w with
    g = axial(M - M^T), M = R^T G, so <G, dR> = (A^-1 g) . b = <R K(A^-1 g), dF>.
    Written with torch ops so it can be differentiated again (Hessian-vector products).
    """
    S = R.transpose(-1, -2) @ F
    S = 0.5 * (S + S.transpose(-1, -2))
    eye = torch.eye(3, dtype=F.dtype, device=F.device)
    A = S.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None] * eye - S
    M = R.transpose(-1, -2) @ grad_R
    g = _axial(M - M.transpose(-1, -2))
    y = torch.linalg.solve(A, g.unsqueeze(-1)).squeeze(-1)
    return R @ _skew(y)


def _axial(W: torch.Tensor) -> torch.Tensor:
    """Axial vector w of a skew matrix W = K(w) (takes half the antisymmetric part)."""
    return 0.5 * torch.stack(
        [W[..., 2, 1] - W[..., 1, 2], W[..., 0, 2] - W[..., 2, 0], W[..., 1, 0] - W[..., 0, 1]], -1
    )


def _skew(w: torch.Tensor) -> torch.Tensor:
    """Skew matrix K(w) with K(w) v = w x v."""
    zero = torch.zeros_like(w[..., 0])
    return torch.stack(
        [
            torch.stack([zero, -w[..., 2], w[..., 1]], -1),
            torch.stack([w[..., 2], zero, -w[..., 0]], -1),
            torch.stack([-w[..., 1], w[..., 0], zero], -1),
        ],
        -2,
    )
