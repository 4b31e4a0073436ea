"""Static equilibrium: convergence, physics checks and float64 gradient checks of the adjoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffsim as ds
from diffsim.equilibrium import EquilibriumError

F64 = torch.float64
TIGHT = 1e-11  # relative force residual for the finite-difference solves


def cantilever(E=2e5, nu=0.3, density=1000.0, per_tet=False, backend="torch", **kwargs):
    """A 15 cm beam clamped at x = 0, sagging under gravity; no ground (60 tets)."""
    mesh = ds.TetMesh.box(size=(0.15, 0.03, 0.03), resolution=(5, 2, 1))
    if per_tet:
        E = torch.full((mesh.n_tets,), E, dtype=F64)
    material = ds.StableNeoHookean(youngs_modulus=E, poissons_ratio=nu, density=density)
    fixed = np.flatnonzero(mesh.vertices[:, 0] < 1e-9)
    return ds.Simulator(
        mesh, material, fixed=fixed, ground=None, backend=backend, dtype=F64, **kwargs
    )


def pressed_box(backend: str = "torch") -> ds.Simulator:
    """A 4 cm box whose top face is held (and may be pushed) over the ground (48 tets)."""
    mesh = ds.TetMesh.box(size=(0.04, 0.04, 0.04), resolution=2).placed_on(0.0, gap=0.001)
    top = np.flatnonzero(mesh.vertices[:, 1] > mesh.vertices[:, 1].max() - 1e-9)
    material = ds.StableNeoHookean(youngs_modulus=2e4, poissons_ratio=0.3, density=1000.0)
    return ds.Simulator(mesh, material, fixed=top, ground=0.0, backend=backend, dtype=F64)


def pushed_top(sim: ds.Simulator, depth: float = 0.0025) -> torch.Tensor:
    """The top face moved down by ``depth`` (m): the bottom is pressed onto the ground."""
    x = sim.model.rest_positions[sim.model.fixed_indices].clone()
    x[:, 1] -= depth
    return x


def directional_fd(loss_of, p: torch.Tensor, direction: torch.Tensor, h: float = 1e-5):
    """Central difference of loss_of at p along direction (already scaled to p)."""
    with torch.no_grad():
        return (loss_of(p + h * direction) - loss_of(p - h * direction)) / (2 * h)


def check_gradient(sim, name, value, *, seed=0, weights=None, **kwargs):
    """Adjoint directional derivative vs central finite differences for one input."""
    gen = torch.Generator().manual_seed(seed)
    w = (
        torch.randn(sim.model.n_vertices, 3, generator=gen, dtype=F64)
        if weights is None
        else weights
    )

    def solve(p, **extra):
        args = dict(kwargs)
        if name == "fixed_positions":
            args["fixed_positions"] = p
        else:
            args["params"] = {name: p}
        return sim.equilibrium(tol=TIGHT, **args, **extra)

    p = value.detach().clone().requires_grad_(True)
    x_star = solve(p)
    loss = (w * x_star).sum()
    (grad,) = torch.autograd.grad(loss, p)
    direction = torch.randn(p.shape, generator=gen, dtype=F64)
    if name == "youngs_modulus":
        direction = direction * p.detach()  # relative perturbation of a positive field
    else:
        direction = direction * max(float(p.detach().abs().max()), 1e-2)
    warm = x_star.detach()
    fd = directional_fd(lambda q: (w * solve(q, x0=warm)).sum(), p, direction)
    analytic = (grad * direction).sum()
    assert torch.isfinite(grad).all()
    print(f"{name}: relative error {abs(float(analytic - fd)) / abs(float(fd)):.2e}")
    assert abs(float(analytic - fd)) <= 1e-5 * abs(float(fd)) + 1e-12, (
        f"{name}: adjoint {float(analytic):.10g} vs finite differences {float(fd):.10g}"
    )
    return grad


# ----------------------------------------------------------------------------- forward solves
@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_cantilever_reaches_balance(solver):
    sim = cantilever()
    x, info = sim.equilibrium(linear_solver=solver, return_info=True)
    assert info.converged and info.residual <= 1e-8 and info.linear_solver == solver
    f = sim.forces(x)
    free = ~sim.model.fixed_mask
    assert float(f[free].norm()) <= 1e-7 * info.load
    assert torch.equal(
        x[sim.model.fixed_indices], sim.model.rest_positions[sim.model.fixed_indices]
    )
    assert float(x[:, 1].min()) < -1e-3  # it sags


def test_direct_and_cg_agree():
    sim = cantilever()
    x_direct = sim.equilibrium(linear_solver="direct")
    x_cg = sim.equilibrium(linear_solver="cg")
    assert torch.allclose(x_direct, x_cg, atol=1e-9)


def test_non_convergence_is_reported():
    sim = cantilever()
    with pytest.raises(EquilibriumError, match="residual"):
        sim.equilibrium(max_iter=1)
    x, info = sim.equilibrium(max_iter=1, strict=False, return_info=True)
    assert not info.converged and info.residual > 1e-8 and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="return_info"):
        sim.equilibrium(strict=False)


def test_bad_inputs_are_rejected():
    sim = cantilever()
    k = len(sim.model.fixed_indices)
    with pytest.raises(ValueError, match="fixed_positions"):
        sim.equilibrium(fixed_positions=torch.zeros(k + 1, 3, dtype=F64))
    with pytest.raises(ValueError, match="linear_solver"):
        sim.equilibrium(linear_solver="qr")
    with pytest.raises(ValueError, match="unknown parameters"):
        sim.equilibrium(params={"stiffness": 1.0})
    with pytest.raises(ValueError, match="youngs_modulus"):
        sim.equilibrium(params={"youngs_modulus": torch.tensor(-1.0, dtype=F64)})
    box = pressed_box()
    below = pushed_top(box, depth=0.05)
    with pytest.raises(ValueError, match="ground"):
        box.equilibrium(fixed_positions=below)


def test_pressed_box_stays_above_the_ground():
    sim = pressed_box()
    x, info = sim.equilibrium(fixed_positions=pushed_top(sim), return_info=True)
    assert info.converged
    gaps = x[:, 1] - sim.model.ground.height
    assert float(gaps.min()) > 0.0
    assert float(gaps.min()) < sim.model.ground.dhat  # the barrier carries load


def test_equilibrium_matches_damped_rollout_rest_state():
    # Mass-proportional damping near critical for the first bending mode: rest in 0.5 s.
    sim = cantilever(damping=50.0, dt=5e-4)
    x_static = sim.equilibrium()
    with torch.no_grad():
        traj = sim.rollout(steps=1000)
    x_dynamic, speed = traj.positions[-1], traj.velocities[-1].norm(dim=1).max()
    sag = abs(float(x_static[:, 1].min()))
    assert sag > 5e-3
    assert float(speed) < 1e-5
    assert float((x_dynamic - x_static).abs().max()) < 1e-4 * sag


def test_cantilever_matches_euler_bernoulli():
    """Tip deflection w = q L^4 / (8 E I) of a slender, lightly loaded beam (nu = 0).

    Linear tets lock in bending: with n cells through the thickness, 1/w is linear in 1/n^2
    (docs/equilibrium.md). The n = 2 and n = 3 meshes extrapolated to n -> infinity must
    match the beam theory within 3%, and the raw deflections must approach it from below.
    """
    length, side, E, rho, g = 0.3, 0.03, 1e9, 1000.0, 9.81
    q, inertia = rho * g * side**2, side**4 / 12
    theory = q * length**4 / (8 * E * inertia)
    deflections = {}
    for n in (2, 3):
        mesh = ds.TetMesh.beam(length=length, width=side, height=side, cells_per_width=n)
        fixed = np.flatnonzero(mesh.vertices[:, 0] < 1e-9)
        material = ds.StableNeoHookean(youngs_modulus=E, poissons_ratio=0.0, density=rho)
        sim = ds.Simulator(mesh, material, fixed=fixed, ground=None, backend="torch", dtype=F64)
        x = sim.equilibrium()
        tip = mesh.vertices[:, 0] > length - 1e-9
        deflections[n] = -float((x[tip, 1] - sim.model.rest_positions[tip, 1]).mean())
    assert 0.5 * theory < deflections[2] < deflections[3] < theory
    extrapolated = 5.0 / (9.0 / deflections[3] - 4.0 / deflections[2])
    assert abs(extrapolated / theory - 1.0) < 0.03, (deflections, extrapolated, theory)


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize(
    "name,value",
    [
        ("youngs_modulus", torch.tensor(2e5, dtype=F64)),
        ("poissons_ratio", torch.tensor(0.3, dtype=F64)),
        ("density", torch.tensor(1000.0, dtype=F64)),
        ("gravity", torch.tensor([0.5, -9.81, 0.3], dtype=F64)),
    ],
)
def test_gradient_global_parameters_without_ground(name, value):
    check_gradient(cantilever(), name, value)


def test_gradient_per_tet_youngs_modulus_without_ground():
    sim = cantilever(per_tet=True)
    gen = torch.Generator().manual_seed(1)
    E = 2e5 * (1.0 + 0.5 * torch.rand(sim.model.n_tets, generator=gen, dtype=F64))
    grad = check_gradient(sim, "youngs_modulus", E)
    assert grad.shape == (sim.model.n_tets,)


def test_gradient_prescribed_positions_without_ground():
    sim = cantilever()
    x_fixed = sim.model.rest_positions[sim.model.fixed_indices].clone()
    x_fixed[:, 1] += 0.01  # lifted clamp, so the free part and the clamp both matter
    check_gradient(sim, "fixed_positions", x_fixed)


@pytest.mark.parametrize(
    "name,value",
    [
        ("youngs_modulus", torch.tensor(2e4, dtype=F64)),
        ("poissons_ratio", torch.tensor(0.3, dtype=F64)),
        ("density", torch.tensor(1000.0, dtype=F64)),
        ("gravity", torch.tensor([0.0, -9.81, 0.0], dtype=F64)),
        ("fixed_positions", None),
    ],
)
def test_gradients_with_ground_contact(name, value):
    sim = pressed_box()
    top = pushed_top(sim)
    if name == "fixed_positions":
        check_gradient(sim, name, top)
    else:
        check_gradient(sim, name, value, fixed_positions=top)


def test_gradient_of_external_forces():
    sim = cantilever()
    gen = torch.Generator().manual_seed(2)
    load = 0.01 * torch.randn(sim.model.n_vertices, 3, generator=gen, dtype=F64)
    load = load.requires_grad_(True)
    w = torch.randn(sim.model.n_vertices, 3, generator=gen, dtype=F64)
    x = sim.equilibrium(external_forces=load, tol=TIGHT)
    (grad,) = torch.autograd.grad((w * x).sum(), load)
    direction = 0.01 * torch.randn(load.shape, generator=gen, dtype=F64)
    fd = directional_fd(
        lambda q: (w * sim.equilibrium(external_forces=q, tol=TIGHT, x0=x.detach())).sum(),
        load,
        direction,
    )
    assert abs(float((grad * direction).sum() - fd)) <= 1e-5 * abs(float(fd))


def test_gradient_reaches_a_neural_field():
    """E from a small MLP of tet centroids: the adjoint reaches the network's weights."""
    sim = cantilever(per_tet=True)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    net = net.to(F64)
    centroids = sim.model.rest_positions[sim.model.tets].mean(dim=1)

    def loss_of_net():
        E = 2e5 * torch.exp(0.3 * torch.tanh(net(centroids / 0.12).squeeze(-1)))
        return sim.equilibrium(params={"youngs_modulus": E}, tol=TIGHT)[:, 1].sum()

    loss = loss_of_net()
    params = list(net.parameters())
    grads = torch.autograd.grad(loss, params)
    weight, grad = params[0], grads[0]
    direction = torch.randn_like(weight)
    h = 1e-5
    with torch.no_grad():
        weight += h * direction
        up = loss_of_net()
        weight -= 2 * h * direction
        down = loss_of_net()
        weight += h * direction
    fd = (up - down) / (2 * h)
    assert abs(float((grad * direction).sum() - fd)) <= 1e-5 * abs(float(fd)) + 1e-14


def test_adjoint_matches_direct_and_cg():
    sim = cantilever()
    E = torch.tensor(2e5, dtype=F64, requires_grad=True)
    grads = []
    for solver in ("direct", "cg"):
        x = sim.equilibrium(params={"youngs_modulus": E}, linear_solver=solver, tol=TIGHT)
        grads.append(torch.autograd.grad(x[:, 1].sum(), E)[0])
    assert torch.allclose(grads[0], grads[1], rtol=1e-7)


def test_gradient_of_a_box_resting_on_the_ground():
    """No fixed vertices: the ground holds y; x, z and the y-rotation are free (rigid modes).

    The loss depends on heights only, so the adjoint system is consistent and solvable.
    """
    mesh = ds.TetMesh.box(size=(0.04, 0.04, 0.04), resolution=2).placed_on(0.0, gap=0.001)
    material = ds.StableNeoHookean(youngs_modulus=2e4, poissons_ratio=0.3, density=1000.0)
    sim = ds.Simulator(mesh, material, ground=0.0, backend="torch", dtype=F64)
    weights = torch.zeros(sim.model.n_vertices, 3, dtype=F64)
    weights[:, 1] = torch.linspace(0.5, 1.5, sim.model.n_vertices, dtype=F64)
    check_gradient(sim, "youngs_modulus", torch.tensor(2e4, dtype=F64), weights=weights)


def test_float32_solve_and_gradient_match_float64():
    E64 = torch.tensor(2e5, dtype=F64, requires_grad=True)
    x64 = cantilever().equilibrium(params={"youngs_modulus": E64})
    (g64,) = torch.autograd.grad(x64[:, 1].sum(), E64)
    mesh = ds.TetMesh.box(size=(0.15, 0.03, 0.03), resolution=(5, 2, 1))
    fixed = np.flatnonzero(mesh.vertices[:, 0] < 1e-9)
    E32 = torch.tensor(2e5, requires_grad=True)
    sim = ds.Simulator(
        mesh,
        ds.StableNeoHookean(youngs_modulus=E32),
        fixed=fixed,
        ground=None,
        backend="torch",
        dtype=torch.float32,
    )
    x32, info = sim.equilibrium(return_info=True)
    (g32,) = torch.autograd.grad(x32[:, 1].sum(), E32)
    assert info.converged and x32.dtype == torch.float32
    assert torch.allclose(x32.double(), x64.detach(), atol=1e-5)
    assert abs(float(g32) / float(g64) - 1.0) < 1e-3


def stacked_boxes(backend: str = "torch") -> tuple[ds.Simulator, torch.Tensor]:
    """A small box pressed 1.2 mm onto a larger one (surface contact), and the clamp targets."""
    low = ds.TetMesh.box(size=(0.04, 0.02, 0.04), resolution=(2, 1, 2))
    up = ds.TetMesh.box(
        size=(0.03, 0.02, 0.03), resolution=(2, 1, 2), origin=(0.005, 0.0205, 0.005)
    )
    mesh = ds.TetMesh.merge([low, up])
    y = mesh.vertices[:, 1]
    fixed = np.flatnonzero((y < 1e-9) | (y > y.max() - 1e-9))
    material = ds.StableNeoHookean(youngs_modulus=2e4, poissons_ratio=0.3, density=1000.0)
    sim = ds.Simulator(
        mesh, material, fixed=fixed, ground=None, contact=True, backend=backend, dtype=F64
    )
    top = sim.model.rest_positions[sim.model.fixed_indices].clone()
    top[top[:, 1] > 0.03, 1] -= 0.0012
    return sim, top


def test_gradient_with_surface_contact_between_two_boxes():
    """A small box pressed onto a larger one: the surface barrier carries the load.

    The direct solver's Hessian pattern includes the contact candidates' couplings.
    """
    sim, top = stacked_boxes()
    x, info = sim.equilibrium(fixed_positions=top, return_info=True)
    assert info.converged and info.linear_solver == "direct"
    assert 0.0 < sim.model.contact.min_distance(x) < sim.model.contact.dhat
    weights = torch.zeros(sim.model.n_vertices, 3, dtype=F64)
    weights[:, 1] = 1.0
    check_gradient(
        sim, "youngs_modulus", torch.tensor(2e4, dtype=F64), weights=weights, fixed_positions=top
    )


# ----------------------------------------------------------------------------- loading path
def test_quasi_static_path_is_differentiable_through_every_step():
    sim = pressed_box()
    steps = 3
    depths = torch.linspace(0.0, 0.0025, steps, dtype=F64)
    base = sim.model.rest_positions[sim.model.fixed_indices]
    path = base.unsqueeze(0).repeat(steps, 1, 1)
    path[:, :, 1] -= depths[:, None]
    path = path.requires_grad_(True)
    E = torch.tensor(2e4, dtype=F64, requires_grad=True)
    xs, infos = sim.quasi_static(
        fixed_positions=path, params={"youngs_modulus": E}, tol=TIGHT, return_info=True
    )
    assert xs.shape == (steps, sim.model.n_vertices, 3)
    assert all(i.converged for i in infos)
    # Each step equals an independent solve: the warm start changes nothing but speed.
    alone = sim.equilibrium(fixed_positions=path[-1].detach(), tol=TIGHT)
    assert torch.allclose(xs[-1].detach(), alone, atol=1e-10)
    loss = xs[:, :, 1].sum()
    g_path, g_E = torch.autograd.grad(loss, (path, E))
    assert (g_path.abs().sum(dim=(1, 2)) > 0).all()  # every step's load gets a gradient
    h = 1e-5 * 2e4
    with torch.no_grad():
        up = sim.quasi_static(fixed_positions=path, params={"youngs_modulus": E + h}, tol=TIGHT)
        down = sim.quasi_static(fixed_positions=path, params={"youngs_modulus": E - h}, tol=TIGHT)
    fd = (up[:, :, 1].sum() - down[:, :, 1].sum()) / (2 * h)
    assert abs(float(g_E - fd)) <= 1e-5 * abs(float(fd))


# ----------------------------------------------------------------------------- backends
@pytest.mark.parametrize("scene", ["cantilever", "pressed_box", "stacked_boxes"])
def test_warp_backend_matches_torch(scene):
    """Same equilibrium and adjoint gradient with Hessian products from Warp kernel adjoints."""
    from diffsim.backends import BACKENDS

    if "warp" not in BACKENDS:
        pytest.skip("the Warp backend is not available (warp-lang not installed)")
    results = {}
    for backend in ("torch", "warp"):
        top = None
        if scene == "cantilever":
            sim = cantilever(backend=backend)
        elif scene == "pressed_box":
            sim = pressed_box(backend)
            top = pushed_top(sim)
        else:
            sim, top = stacked_boxes(backend)
        assert sim.backend_name == backend
        E = torch.tensor(2e5 if scene == "cantilever" else 2e4, dtype=F64, requires_grad=True)
        x = sim.equilibrium(params={"youngs_modulus": E}, fixed_positions=top, tol=TIGHT)
        (grad,) = torch.autograd.grad(x[:, 1].sum(), E)
        results[backend] = (x.detach(), grad)
    assert torch.allclose(results["warp"][0], results["torch"][0], atol=1e-12)
    assert torch.allclose(results["warp"][1], results["torch"][1], rtol=1e-8)


def test_quasi_static_load_ramp():
    sim = cantilever()
    tip = torch.as_tensor(sim.mesh.vertices[:, 0] > 0.15 - 1e-9)
    unit = torch.zeros(sim.model.n_vertices, 3, dtype=F64)
    unit[tip, 1] = -0.05 / int(tip.sum())
    scale = torch.tensor([0.5, 1.0, 1.5], dtype=F64, requires_grad=True)
    loads = scale[:, None, None] * unit
    xs = sim.quasi_static(external_forces=loads, tol=TIGHT)
    sags = [float(x[:, 1].min()) for x in xs.detach()]
    assert sags[0] > sags[1] > sags[2]  # more load, more sag
    (grad,) = torch.autograd.grad(xs[:, :, 1].sum(), scale)
    assert (grad < 0).all()  # pushing harder lowers every step
    with pytest.raises(ValueError, match="steps"):
        sim.quasi_static(external_forces=unit)


@pytest.mark.parametrize("tol", [-1.0, 0.0, float("nan")])
def test_a_tolerance_that_cannot_be_met_is_refused_at_once(tol):
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=(1, 1, 1))
    sim = ds.Simulator(mesh, ds.StableNeoHookean(1e5, 0.3), ground=None, fixed=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="tol must be a positive"):
        sim.equilibrium(tol=tol)
