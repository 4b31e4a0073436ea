"""float64 finite-difference checks of rollout gradients, with ground contact and friction on."""

import pytest
import torch

import diffsim as ds

from .helpers import check_gradient

STEPS = 25
MESH = ds.TetMesh.box(size=(0.1, 0.05, 0.05), resolution=(2, 1, 1), origin=(0.0, 0.0012, 0.0))
FIXED = [int(MESH.vertices[:, 1].argmax())]  # one top vertex, driven along a prescribed path
X0 = torch.tensor(MESH.vertices)


def rollout_loss(
    *,
    E=2e4,
    nu=0.3,
    density=1000.0,
    gravity=(0.0, -9.81, 0.0),
    damping=0.5,
    x0=None,
    v0=(0.2, -0.05, 0.1),
    fixed_positions=None,
    checkpoint_every=None,
    backend="torch",
):
    material = ds.StableNeoHookean(E, nu, density)
    sim = ds.Simulator(
        MESH,
        material,
        dt=2e-3,
        gravity=gravity if isinstance(gravity, torch.Tensor) else torch.tensor(gravity),
        damping=damping,
        fixed=FIXED,
        ground=0.0,
        ground_dhat=3e-3,
        ground_stiffness=3e8,
        friction=0.4,
        friction_velocity=0.05,
        max_speed=5.0,
        backend=backend,
        dtype=torch.float64,
    )
    state = sim.initial_state(positions=x0, velocities=v0)
    if fixed_positions is None:
        start = X0[FIXED]
        path = torch.linspace(0, 1, STEPS, dtype=torch.float64)[:, None, None] * torch.tensor(
            [0.01, 0.0, 0.0]
        )
        fixed_positions = start + path
    traj = sim.rollout(
        STEPS, state=state, fixed_positions=fixed_positions, checkpoint_every=checkpoint_every
    )
    weights = torch.linspace(0.5, 1.5, MESH.n_vertices, dtype=torch.float64)[:, None]
    return (weights * traj.positions[-1]).square().sum() + (
        traj.velocities[-1] * weights
    ).sum() * 1e-2


def test_scene_has_active_ground_contact():
    sim = ds.Simulator(MESH, ds.StableNeoHookean(), ground=0.0, ground_dhat=3e-3, backend="torch")
    assert (torch.tensor(MESH.vertices[:, 1]) < 3e-3).any()
    assert sim.model.ground is not None


@pytest.mark.parametrize(
    ("name", "make_loss", "point", "eps"),
    [
        ("youngs_modulus", lambda p: rollout_loss(E=p), torch.tensor(2e4), 1.0),
        (
            "youngs_modulus_per_tet",
            lambda p: rollout_loss(E=p),
            torch.full((MESH.n_tets,), 2e4),
            1.0,
        ),
        ("poissons_ratio", lambda p: rollout_loss(nu=p), torch.tensor(0.3), 1e-6),
        ("density", lambda p: rollout_loss(density=p), torch.tensor(1000.0), 1e-3),
        (
            "density_per_tet",
            lambda p: rollout_loss(density=p),
            torch.full((MESH.n_tets,), 1000.0),
            1e-3,
        ),
        ("gravity", lambda p: rollout_loss(gravity=p), torch.tensor([0.0, -9.81, 0.0]), 1e-6),
        ("damping", lambda p: rollout_loss(damping=p), torch.tensor(0.5), 1e-6),
        ("initial_positions", lambda p: rollout_loss(x0=p), X0, 1e-7),
        (
            "initial_velocities",
            lambda p: rollout_loss(v0=p),
            torch.full((MESH.n_vertices, 3), 0.05),
            1e-6,
        ),
        (
            "prescribed_positions",
            lambda p: rollout_loss(fixed_positions=p),
            X0[FIXED].expand(STEPS, 1, 3).clone(),
            1e-7,
        ),
    ],
)
def test_rollout_gradient_matches_finite_differences(name, make_loss, point, eps):
    check_gradient(make_loss, point.to(torch.float64), eps=eps, rtol=1e-5)


def test_checkpointing_changes_no_gradient():
    inputs = {
        "E": torch.full((MESH.n_tets,), 2e4, dtype=torch.float64, requires_grad=True),
        "gravity": torch.tensor([0.0, -9.81, 0.0], dtype=torch.float64, requires_grad=True),
        "v0": torch.full((MESH.n_vertices, 3), 0.05, dtype=torch.float64, requires_grad=True),
        "damping": torch.tensor(0.5, dtype=torch.float64, requires_grad=True),
    }
    plain = torch.autograd.grad(rollout_loss(**inputs), list(inputs.values()))
    for k in (1, 4, 7, STEPS):
        checkpointed = torch.autograd.grad(
            rollout_loss(**inputs, checkpoint_every=k), list(inputs.values())
        )
        for a, b in zip(plain, checkpointed, strict=True):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_checkpointed_values_equal_plain_values():
    a = rollout_loss()
    b = rollout_loss(checkpoint_every=6)
    assert torch.equal(a.detach(), b.detach())
