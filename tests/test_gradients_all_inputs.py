"""One float64 finite-difference check with every differentiable input kind at once.

Ground contact, friction, surface contact between two bodies, a fixed vertex on a prescribed
path, damping and checkpointing all act in the same rollout, on both backends; each input
kind is checked along a random direction against central differences. Also
``torch.autograd.gradcheck`` on a short rollout.
"""

import pytest
import torch

import diffsim as ds

STEPS = 16
LOWER = ds.TetMesh.box(size=(0.1, 0.04, 0.1), resolution=(2, 1, 2), origin=(0.0, 8e-4, 0.0))
# 3.5 mm above the lower box, just outside the surface barrier (dhat 3 mm), falling into it
# slowly enough that the CCD step limit never acts (gradients hold it constant).
UPPER = ds.TetMesh.box(size=(0.06, 0.04, 0.06), resolution=(1, 1, 1), origin=(0.02, 0.0443, 0.02))
MESH = ds.TetMesh.merge([LOWER, UPPER])
FIXED = [int(LOWER.vertices[:, 0].argmax())]  # a corner of the lower box, on a path
CENTROIDS = torch.tensor(MESH.vertices[MESH.tets].mean(axis=1))


class FieldNet(torch.nn.Module):
    """A neural field: Young's modulus per tet from the tet centroid."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(3, 4, dtype=torch.float64)
        self.out = torch.nn.Linear(4, 1, dtype=torch.float64)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return 3e4 * (1.0 + 0.3 * torch.tanh(self.out(torch.tanh(self.layer(20.0 * c))))[:, 0])


class ScaledNeoHookean(ds.NeoHookean):
    """A user's material with its own parameter (a stiffness scale), torch path only."""

    def __init__(self, scale: torch.Tensor, *args) -> None:
        super().__init__(*args)
        self.scale = scale  # a plain tensor attribute: found without being declared

    def energy_density(self, F):
        return self.scale * super().energy_density(F)


def inputs(backend: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x0 = torch.tensor(MESH.vertices)
    v0 = torch.zeros_like(x0)
    v0[:, 0] = 0.15
    v0[LOWER.n_vertices :, 1] = -0.2  # the upper box moves down into the lower's barrier
    path = x0[FIXED] + torch.linspace(0, 1, STEPS)[:, None, None] * torch.tensor([0.0, 0.0, 2e-3])
    values = {
        "nu": torch.tensor(0.3),
        "density": torch.tensor(1000.0),
        "E per tet": 1.0 + 0.1 * torch.rand(MESH.n_tets, generator=gen),  # times the network
        "gravity": torch.tensor([0.3, -9.81, 0.1]),
        "damping": torch.tensor(0.5),
        "x0": x0,
        "v0": v0,
        "prescribed": path,
    }
    if backend == "torch":
        values["user parameter"] = torch.tensor(1.1)
    return {k: v.to(torch.float64) for k, v in values.items()}


def rollout_loss(values: dict[str, torch.Tensor], net: FieldNet, backend: str, check=False):
    E = net(CENTROIDS) * values["E per tet"]
    if backend == "torch":
        material = ScaledNeoHookean(values["user parameter"], E, values["nu"], values["density"])
    else:
        material = ds.NeoHookean(E, values["nu"], values["density"])
    sim = ds.Simulator(
        MESH, material, dt=2e-3, substeps=2, gravity=values["gravity"],
        damping=values["damping"], fixed=FIXED, ground=0.0, ground_dhat=2e-3,
        friction=0.4, contact=True, contact_dhat=3e-3, contact_friction=0.3,
        backend=backend, dtype=torch.float64,
    )  # fmt: skip
    assert sim.backend_name == backend
    state = ds.State(values["x0"], values["v0"])
    traj = sim.rollout(STEPS, state=state, checkpoint_every=5, fixed_positions=values["prescribed"])
    if check:  # every mechanism acted
        x = traj.positions.detach()
        assert float(x[..., 1].min()) < sim.model.ground.dhat, "ground not touched"
        closest = min(sim.model.contact.min_distance(frame) for frame in x)
        assert closest < sim.model.contact.dhat, "no surface contact"
        assert sim.model.contact.timings["limited_vertex_steps"] == 0
    return (
        traj.positions[-1].square().sum() + 0.3 * traj.velocities[-1].square().sum()
        + traj.positions[:, :, 0].mean()
    )  # fmt: skip


@pytest.mark.parametrize("backend", ["warp", "torch"])
def test_every_input_kind_against_finite_differences(backend):
    net = FieldNet()
    values = inputs(backend)
    leaves = {k: v.clone().requires_grad_(True) for k, v in values.items()}
    loss = rollout_loss(leaves, net, backend, check=True)
    grads = torch.autograd.grad(loss, [*leaves.values(), *net.parameters()])
    gen = torch.Generator().manual_seed(2)
    directions = {
        k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in values.items()
    }
    directions["v0"][FIXED] = 0.0  # a fixed vertex's velocity is masked: no gradient
    errors = {}
    for i, (name, value) in enumerate(values.items()):
        d = directions[name]
        scale = float(value.abs().max()) or 1.0
        eps = 1e-6 * scale / float(d.abs().max())
        if name == "x0":
            # Positions inside stiff barriers: the loss curves sharply, and on warp its slope
            # jumps by 1e-3 relative about 1e-9 m either side of x0 (measured on a grid of
            # 5e-10 m; likely a pair's closest features changing, where the squared distance
            # is only C1). 2e-10 m stays between the jumps; round-off is 1e-9 relative.
            eps = 2e-10
        if name == "damping":  # a small derivative: round-off dominates below 1e-5
            eps = 1e-5
        with torch.no_grad():
            up = float(rollout_loss({**values, name: value + eps * d}, net, backend))
            down = float(rollout_loss({**values, name: value - eps * d}, net, backend))
        fd = (up - down) / (2 * eps)
        analytic = float((grads[i] * d).sum())
        errors[name] = abs(analytic - fd) / max(abs(fd), 1e-12)
    # The network's weights, together.
    params = list(net.parameters())
    d_net = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    eps = 1e-6
    with torch.no_grad():
        for p, d in zip(params, d_net, strict=True):
            p += eps * d
        up = float(rollout_loss(values, net, backend))
        for p, d in zip(params, d_net, strict=True):
            p -= 2 * eps * d
        down = float(rollout_loss(values, net, backend))
        for p, d in zip(params, d_net, strict=True):
            p += eps * d
    fd = (up - down) / (2 * eps)
    analytic = sum(float((g * d).sum()) for g, d in zip(grads[len(values) :], d_net, strict=True))
    errors["network weights"] = abs(analytic - fd) / max(abs(fd), 1e-12)
    print(backend, {k: f"{v:.1e}" for k, v in errors.items()})
    bad = {k: v for k, v in errors.items() if not v < 1e-6}
    assert not bad, f"relative errors above 1e-6: {bad}"


def test_gradcheck_short_rollout():
    """torch.autograd.gradcheck (float64) through a 3-step rollout with ground and friction."""
    mesh = ds.TetMesh.box(size=(0.05, 0.05, 0.05), resolution=(1, 1, 1), origin=(0.0, 5e-4, 0.0))

    def run(E, v0):
        sim = ds.Simulator(
            mesh, ds.StableNeoHookean(E, 0.3, 1000.0), dt=1e-3, ground=0.0, ground_dhat=1e-3,
            friction=0.5, damping=0.1, dtype=torch.float64,
        )  # fmt: skip
        traj = sim.rollout(3, state=sim.initial_state(velocities=v0))
        return traj.positions[-1], traj.velocities[-1]

    E = torch.tensor(2e4, dtype=torch.float64, requires_grad=True)
    v0 = torch.tensor([0.2, -0.1, 0.05], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(run, (E, v0), eps=1e-6, atol=1e-8, rtol=1e-6)
