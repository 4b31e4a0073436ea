"""The hand-written force VJP kernels against Warp's generated adjoint and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import warp as wp

import diffsim as ds
from diffsim.backends.warp.bridge import warp_scalar
from diffsim.kernels import grad_kernels_for, kernels_for
from diffsim.kernels.runtime import init_warp

MATERIALS = {"snh": 0, "nh": 1, "stvk": 2, "corotated": 3, "linear": 4}
CHUNK = 4


def _problem(dtype: torch.dtype, per_tet: bool, inverted: bool, seed: int) -> dict:
    """A deformed 2x2x2 box (48 tets): positions, rest data, Lame pairs and a cotangent."""
    rng = np.random.default_rng(seed)
    mesh = ds.TetMesh.box(size=(1.0, 1.0, 1.0), resolution=(2, 2, 2))
    rest = mesh.vertices
    stretch = np.eye(3) + 0.12 * rng.standard_normal((3, 3))
    x = rest @ stretch.T + 0.03 * rng.standard_normal(rest.shape)
    if inverted:  # move the centre vertex through its neighbours: inverts some tets
        centre = np.argmin(np.linalg.norm(rest - 0.5, axis=1))
        x[centre] += 0.9 * stretch @ np.array([0.5, 0.4, 0.3])
    m = mesh.n_tets
    n_par = m if per_tet else 1
    return {
        "x": torch.tensor(x, dtype=torch.float64),  # positions are float64 (precision rule)
        "dtype": dtype,
        "tets": torch.tensor(mesh.tets, dtype=torch.int32),
        "dm_inv": torch.tensor(mesh.dm_inv, dtype=dtype),
        "volume": torch.tensor(mesh.rest_volumes, dtype=dtype),
        "mu": torch.tensor(rng.uniform(0.5, 1.5, n_par), dtype=dtype),
        "lam": torch.tensor(rng.uniform(1.0, 4.0, n_par), dtype=dtype),
        "adj_f": torch.tensor(rng.standard_normal(x.shape), dtype=dtype),
        "per_tet": int(per_tet),
    }


def _jacobians(p: dict) -> np.ndarray:
    dm_inv = p["dm_inv"].double().numpy()
    x, tets = p["x"].double().numpy(), p["tets"].numpy()
    ds_ = np.stack([x[tets[:, k]] - x[tets[:, 0]] for k in (1, 2, 3)], axis=-1)
    return np.linalg.det(ds_ @ dm_inv)


def _args(p: dict, k, elements=None) -> list:
    """The kernels' leading arguments: positions, the tets' ``TetElements`` struct (of
    ``elements``' type, default ``k.TetElements``; Warp's generated adjoint accumulates
    into the ``.grad`` of its mu and lam) and the tet range."""
    el = (elements or k.TetElements)()
    el.tets = wp.from_torch(p["tets"], dtype=wp.vec4i)
    el.dm_inv = wp.from_torch(p["dm_inv"].contiguous(), dtype=k.mat33)
    el.volume = wp.from_torch(p["volume"].contiguous(), dtype=k.scalar)
    el.mu, el.lam = (
        wp.from_torch(p[n].clone(), dtype=k.scalar, requires_grad=elements is not None)
        for n in ("mu", "lam")
    )
    el.per_tet = p["per_tet"]
    return [wp.from_torch(p["x"].contiguous(), dtype=k.position), el, 0, p["tets"].shape[0], CHUNK]


def hand_vjp(p: dict, material: int) -> tuple[torch.Tensor, ...]:
    """(adj_x, adj_mu, adj_lam) from ``tet_force_vjp``."""
    init_warp()
    k = kernels_for(warp_scalar(p["dtype"]))
    adj_x = torch.zeros(p["x"].shape, dtype=p["dtype"])
    adj_mu, adj_lam = (torch.zeros_like(p[n]) for n in ("mu", "lam"))
    m = p["tets"].shape[0]
    wp.launch(
        k.tet_force_vjp[material],
        dim=(m + CHUNK - 1) // CHUNK,
        inputs=[
            *_args(p, k), wp.from_torch(p["adj_f"], dtype=k.vec3),
            wp.from_torch(adj_x, dtype=k.vec3), wp.from_torch(adj_mu, dtype=k.scalar),
            wp.from_torch(adj_lam, dtype=k.scalar),
        ],
        device="cpu",
    )  # fmt: skip
    return adj_x, adj_mu, adj_lam


def generated_adjoint(p: dict, material: int) -> tuple[torch.Tensor, ...]:
    """(adj_x, adj_mu, adj_lam) from Warp's adjoint of ``tet_forces`` (as warp_bridge runs it)."""
    init_warp()
    k = kernels_for(warp_scalar(p["dtype"]))
    adj_x = torch.zeros_like(p["x"])  # Warp's adjoint of float64 positions is float64
    m = p["tets"].shape[0]
    grad = grad_kernels_for(warp_scalar(p["dtype"]))
    args = _args(p, k, grad.TetElements)
    wp.launch(
        grad.tet_forces[material],
        dim=(m + CHUNK - 1) // CHUNK,
        inputs=args,
        outputs=[wp.from_torch(torch.zeros(p["x"].shape, dtype=p["dtype"]), dtype=k.vec3)],
        adj_inputs=[wp.from_torch(adj_x, dtype=k.position), grad.TetElements(), 0, 0, 0],
        adj_outputs=[wp.from_torch(p["adj_f"], dtype=k.vec3)],
        adjoint=True,
        device="cpu",
    )  # fmt: skip
    adj_mu, adj_lam = (wp.to_torch(a.grad) for a in (args[1].mu, args[1].lam))
    return adj_x.to(p["dtype"]), adj_mu, adj_lam


def forces(p: dict, material: int) -> torch.Tensor:
    """Elastic forces ``[n, 3]`` from the forward kernel."""
    init_warp()
    k = kernels_for(warp_scalar(p["dtype"]))
    f = torch.zeros(p["x"].shape, dtype=p["dtype"])
    m = p["tets"].shape[0]
    wp.launch(
        k.tet_forces_chunked[material],
        dim=(m + CHUNK - 1) // CHUNK,
        inputs=[*_args(p, k), wp.from_torch(f, dtype=k.vec3)],
        device="cpu",
    )
    return f


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = max(float(b.abs().max()), 1e-300)
    return float((a - b).abs().max()) / scale


CASES = [
    (name, per_tet, inverted)
    for name in MATERIALS
    for per_tet in (False, True)
    for inverted in ((False, True) if name == "snh" else (False,))
]


@pytest.mark.parametrize(("name", "per_tet", "inverted"), CASES)
def test_matches_generated_adjoint_float64(name, per_tet, inverted):
    p = _problem(torch.float64, per_tet, inverted, seed=MATERIALS[name] + 10 * per_tet)
    if inverted:
        J = _jacobians(p)
        assert (J < 0).any() and (J > 0).any(), "the scene should invert some tets, not all"
    else:
        assert (_jacobians(p) > 0.2).all(), "the scene should be well conditioned"
    mine = hand_vjp(p, MATERIALS[name])
    ref = generated_adjoint(p, MATERIALS[name])
    for label, a, b in zip(("adj_x", "adj_mu", "adj_lam"), mine, ref, strict=True):
        assert float(b.abs().max()) > 0, f"{label}: the reference is zero, nothing is tested"
        assert _rel(a, b) < 1e-10, f"{name} {label}: relative error {_rel(a, b):.2e}"


@pytest.mark.parametrize(("name", "per_tet", "inverted"), CASES)
def test_matches_generated_adjoint_float32(name, per_tet, inverted):
    p = _problem(torch.float32, per_tet, inverted, seed=MATERIALS[name] + 10 * per_tet + 1)
    mine = hand_vjp(p, MATERIALS[name])
    ref = generated_adjoint(p, MATERIALS[name])
    for label, a, b in zip(("adj_x", "adj_mu", "adj_lam"), mine, ref, strict=True):
        assert _rel(a, b) < 1e-4, f"{name} {label}: relative error {_rel(a, b):.2e}"


@pytest.mark.parametrize("name", MATERIALS)
def test_matches_finite_differences(name):
    """Independent of Warp's adjoint: central differences of the forward forces (float64)."""
    material = MATERIALS[name]
    p = _problem(torch.float64, True, name == "snh", seed=7)
    adj_x, adj_mu, adj_lam = hand_vjp(p, material)
    gen = torch.Generator().manual_seed(3)
    h = 1e-6

    def fd(key: str, direction: torch.Tensor) -> float:
        plus, minus = dict(p), dict(p)
        plus[key], minus[key] = p[key] + h * direction, p[key] - h * direction
        df = (forces(plus, material) - forces(minus, material)) / (2 * h)
        return float((df * p["adj_f"]).sum())

    for key, adj in (("x", adj_x), ("mu", adj_mu), ("lam", adj_lam)):
        direction = torch.randn(p[key].shape, generator=gen, dtype=torch.float64)
        analytic, numeric = float((adj * direction).sum()), fd(key, direction)
        assert abs(analytic - numeric) < 1e-6 * max(abs(numeric), 1.0), (
            f"{name} adj_{key}: {analytic:.12g} vs FD {numeric:.12g}"
        )
