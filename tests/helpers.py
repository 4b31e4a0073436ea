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
