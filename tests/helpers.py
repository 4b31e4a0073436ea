"""Shared test helpers: small meshes and finite-difference checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"


def asset(name: str) -> Path:
    """Path of a mesh in ../shared/assets, or skip the test where that folder is absent."""
    path = ASSETS / name
    if not path.is_file():
        pytest.skip(f"{path} not found (the shared assets live beside the checkout)")
    return path


def build_scene(scene):
    """``scene.build()``, or skip the test where the scene needs ../shared/assets and that
    folder is absent (the scene says so in a SceneError caused by a FileNotFoundError)."""
    from diffsim.apps.scene import SceneError

    try:
        return scene.build()
    except SceneError as exc:
        missing = isinstance(exc.__cause__, FileNotFoundError)
        if missing and "shared/assets" in str(exc) and not ASSETS.is_dir():
            pytest.skip(f"{scene.path.name} needs {ASSETS}")
        raise


def directional_fd(fn, x: torch.Tensor, direction: torch.Tensor, eps: float) -> float:
    """Central finite difference of scalar fn along direction at x (float64)."""
    with torch.no_grad():
        return float((fn(x + eps * direction) - fn(x - eps * direction)) / (2 * eps))


def check_gradient(
    fn, x: torch.Tensor, eps: float = 1e-6, rtol: float = 1e-5, seed: int = 0
) -> float:
    """Compares autograd with a central FD along a random direction; returns the relative error."""
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    xr = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(xr), xr)
    analytic = float((grad * direction).sum())
    numeric = directional_fd(fn, x.detach(), direction, eps)
    err = abs(analytic - numeric) / max(abs(numeric), 1e-12)
    assert err < rtol, (
        f"gradient mismatch: autograd {analytic:.10g} vs FD {numeric:.10g} (rel {err:.2e})"
    )
    return err


def tumbling_cubes(dtype: torch.dtype):
    """A 10 cm cube thrown sliding and tumbling (1, -0.3, 0.4 m/s) over another whose
    bottom is fixed, 3 mm above it, friction 0.3, no ground: ``(simulator, state)``."""
    import diffsim as ds

    lower = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=4)
    upper = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=4, origin=(0.0, 0.103, 0.0))
    material = ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.3, density=1000.0)
    mesh = ds.TetMesh.merge([lower, upper])
    sim = ds.Simulator(
        mesh, material, dt=2e-3, substeps=4, fixed=mesh.vertices[:, 1] < 1e-6, ground=None,
        contact_friction=0.3, dtype=dtype,
    )  # fmt: skip
    v = torch.zeros((sim.mesh.n_vertices, 3), dtype=dtype)
    v[sim.mesh.n_vertices // 2 :] = torch.tensor([1.0, -0.3, 0.4], dtype=dtype)
    return sim, sim.initial_state(velocities=v)


def stacked_tori(drop: float = 0.012):
    """Two tori of ../shared/assets/torus.msh, 0.1 m across, lying flat: one on the ground
    (0.5 mm above it), the other offset across its ring with its underside ``drop`` (m)
    above the first one's top, so that it falls onto the first one's rim. They start apart
    (intersection-free)."""
    import numpy as np

    import diffsim as ds

    flat = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])  # x-y plane -> x-z
    torus = ds.TetMesh.load(asset("torus.msh")).centered().scaled_to(0.1)
    lower = torus.transformed(rotation=flat).placed_on(0.0, gap=0.0005)
    top = float(lower.vertices[:, 1].max())
    upper = torus.transformed(rotation=flat, translation=(0.03, 0.0, 0.01))
    return ds.TetMesh.merge([lower, upper.placed_on(0.0, gap=top + drop)])
