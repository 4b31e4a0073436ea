"""The Warp backend against the torch reference: forces, energies, steps, rollouts, gradients.

Parity is the contract (DESIGN.md): float64 to 1e-10 relative, float32 to 1e-4.
"""

import pytest
import torch

import diffsim as ds
from diffsim.backends import BACKENDS

from .helpers import check_gradient

pytestmark = pytest.mark.skipif("warp" not in BACKENDS, reason="warp-lang is not installed")

MATERIALS = [ds.StableNeoHookean, ds.NeoHookean, ds.StVK, ds.Corotated, ds.LinearElastic]
MESH = ds.TetMesh.box(size=(0.2, 0.1, 0.1), resolution=(2, 1, 1), origin=(0.0, 0.002, 0.0))
FIXED = [int(MESH.vertices[:, 1].argmax())]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def make_sims(material, dtype=torch.float64, mesh=MESH, **kwargs):
    settings = dict(
        dt=1e-3,
        dtype=dtype,
        damping=0.3,
        max_speed=2.0,
        friction=0.5,
        ground_dhat=3e-3,
        ground_stiffness=1e6,
        fixed=FIXED if mesh is MESH else None,
    )
    settings.update(kwargs)
    return {b: ds.Simulator(mesh, material, backend=b, **settings) for b in ("torch", "warp")}


def deformed(sim, scale=0.01, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = sim.model.rest_positions
    return x + scale * torch.randn(x.shape, generator=gen, dtype=x.dtype) * 0.1


@pytest.mark.parametrize("material_cls", MATERIALS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forces_and_energy_parity(material_cls, dtype):
    sims = make_sims(material_cls(youngs_modulus=1e4, poissons_ratio=0.35), dtype)
    assert sims["warp"].backend_name == "warp"
    x = deformed(sims["torch"])
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    f = {b: s.forces(x) for b, s in sims.items()}
    assert rel(f["warp"], f["torch"]) < tol
    warp = sims["warp"].backend
    energy = warp.elastic_energy(warp.prepare(sims["warp"].coefficients()), x)
    reference = sims["torch"].energies(ds.State(x, torch.zeros_like(x)))["elastic"]
    assert abs(float(energy - reference)) <= tol * abs(float(reference))


@pytest.mark.parametrize("material_cls", MATERIALS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_force_vjp_is_the_torch_hessian_product(material_cls, dtype):
    """forces() is differentiable: its VJP (an HVP) and parameter gradients match torch."""
    out = {}
    for backend in ("torch", "warp"):
        E = torch.full((MESH.n_tets,), 1e4, dtype=dtype, requires_grad=True)
        sim = make_sims(material_cls(youngs_modulus=E, poissons_ratio=0.35), dtype)[backend]
        x = deformed(sim).requires_grad_(True)
        w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
        out[backend] = torch.autograd.grad(sim.forces(x), (x, E), w)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for a, b in zip(out["warp"], out["torch"], strict=True):
        assert rel(a, b) < tol


def test_corotated_derivative_is_finite_at_identity():
    """At F = I the singular values repeat; the closed-form dR keeps the HVP well defined."""
    sims = make_sims(ds.Corotated(youngs_modulus=1e4, poissons_ratio=0.3))
    out = {}
    for b, sim in sims.items():
        x = sim.model.rest_positions.clone().requires_grad_(True)
        w = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
        (out[b],) = torch.autograd.grad(sim.forces(x), x, w)
    assert torch.isfinite(out["warp"]).all()
    assert rel(out["warp"], out["torch"]) < 1e-10


def test_corotated_inverted_tet_uses_the_proper_rotation():
    sims = make_sims(ds.Corotated(youngs_modulus=1e4, poissons_ratio=0.3), fixed=None)
    x = deformed(sims["torch"], 0.05)
    x[:, 1] = 0.3 - 0.8 * x[:, 1]  # mirrored and squashed: every tet inverted (det F < 0)
    f = {b: s.forces(x) for b, s in sims.items()}
    assert rel(f["warp"], f["torch"]) < 1e-10


def rollout(sim, steps=100, checkpoint_every=None, params=None):
    x0 = deformed(sim, 0.01)
    v0 = torch.zeros_like(x0)
    v0[:, 0] = 0.3
    return sim.rollout(steps, state=sim.initial_state(x0, v0), checkpoint_every=checkpoint_every)


@pytest.mark.parametrize("material_cls", MATERIALS)
def test_rollout_parity_with_ground_and_friction(material_cls):
    sims = make_sims(material_cls(youngs_modulus=1e4, poissons_ratio=0.3))
    traj = {b: rollout(s) for b, s in sims.items()}
    ground = sims["torch"].model.ground
    assert float(traj["torch"].positions[:, :, 1].min()) < ground.dhat  # contact is active
    assert rel(traj["warp"].positions, traj["torch"].positions) < 1e-10
    assert rel(traj["warp"].velocities, traj["torch"].velocities) < 1e-10


def test_rollout_parity_float32():
    sims = make_sims(ds.StableNeoHookean(youngs_modulus=1e4, poissons_ratio=0.3), torch.float32)
    traj = {b: rollout(s, steps=30) for b, s in sims.items()}
    assert rel(traj["warp"].positions, traj["torch"].positions) < 1e-4


def gradients(backend, material_cls, steps=40, checkpoint_every=None, mesh=MESH, per_tet_nu=False):
    """Gradients of a rollout loss for every differentiable input (E per tet, nu global,
    or E global and nu per tet)."""
    dtype = torch.float64
    inputs = {
        "E": torch.linspace(8e3, 1.2e4, mesh.n_tets, dtype=dtype),
        "nu": torch.tensor(0.3, dtype=dtype),
    }
    if per_tet_nu:
        inputs = {
            "E": torch.tensor(1e4, dtype=dtype),
            "nu": torch.linspace(0.25, 0.35, mesh.n_tets, dtype=dtype),
        }
    inputs |= {
        "density": torch.tensor(900.0, dtype=dtype),
        "gravity": torch.tensor([0.5, -9.81, 0.2], dtype=dtype),
        "damping": torch.tensor(0.3, dtype=dtype),
    }
    for t in inputs.values():
        t.requires_grad_(True)
    material = material_cls(inputs["E"], inputs["nu"], inputs["density"])
    sim = make_sims(material, mesh=mesh, gravity=inputs["gravity"], damping=inputs["damping"])[
        backend
    ]
    x0 = deformed(sim, 0.01).requires_grad_(True)
    v0 = torch.full_like(x0, 0.1).requires_grad_(True)
    k = len(sim.model.fixed_indices)
    path = x0.detach()[sim.model.fixed_indices] + 0.001 * torch.arange(steps)[:, None, None]
    path = path.requires_grad_(True)
    traj = sim.rollout(
        steps,
        state=sim.initial_state(x0, v0),
        checkpoint_every=checkpoint_every,
        fixed_positions=path if k else None,
    )
    gen = torch.Generator().manual_seed(3)
    weights = torch.randn(traj.positions.shape, generator=gen, dtype=dtype)
    loss = (traj.positions * weights).sum() + traj.velocities[-1].square().sum()
    named = {**inputs, "x0": x0, "v0": v0, **({"fixed_positions": path} if k else {})}
    grads = torch.autograd.grad(loss, list(named.values()))
    return dict(zip(named, grads, strict=True))


@pytest.mark.parametrize("material_cls", MATERIALS)
def test_rollout_gradients_match_torch(material_cls):
    ref, got = gradients("torch", material_cls), gradients("warp", material_cls)
    for name, g in ref.items():
        assert rel(got[name], g) < 1e-10, name


def test_gradients_for_per_tet_poisson_ratio_and_global_youngs_modulus():
    ref = gradients("torch", ds.StableNeoHookean, steps=20, per_tet_nu=True)
    got = gradients("warp", ds.StableNeoHookean, steps=20, per_tet_nu=True)
    for name, g in ref.items():
        assert rel(got[name], g) < 1e-10, name


def test_checkpointing_gives_the_same_gradients_on_warp():
    plain = gradients("warp", ds.StableNeoHookean)
    check = gradients("warp", ds.StableNeoHookean, checkpoint_every=7)
    for name, g in plain.items():
        assert rel(check[name], g) < 1e-12, name


def test_two_thread_split_matches_torch(monkeypatch):
    """A mesh large enough for the 2-thread split of the force launch and its adjoint."""
    monkeypatch.setenv("DIFFSIM_WARP_THREADS", "2")
    mesh = ds.TetMesh.box(size=(0.3, 0.15, 0.15), resolution=(12, 6, 6), origin=(0.0, 0.01, 0.0))
    assert mesh.n_tets >= 2048
    ref = gradients("torch", ds.StableNeoHookean, steps=5, mesh=mesh)
    got = gradients("warp", ds.StableNeoHookean, steps=5, mesh=mesh)
    for name, g in ref.items():
        assert rel(got[name], g) < 1e-10, name


@pytest.mark.parametrize("name", ["E", "x0"])
def test_warp_rollout_gradient_matches_finite_differences(name):
    """float64 central differences of a Warp rollout with ground contact and friction."""
    dtype = torch.float64

    def loss(value):
        E = value if name == "E" else torch.tensor(1e4, dtype=dtype)
        material = ds.StableNeoHookean(E, 0.3, 1000.0)
        sim = make_sims(material)["warp"]
        x0 = value if name == "x0" else deformed(sim, 0.01)
        traj = sim.rollout(30, state=sim.initial_state(x0, torch.full_like(x0, 0.1)))
        return traj.positions[-1].square().sum() + traj.positions[:, :, 1].mean()

    if name == "E":
        check_gradient(loss, torch.tensor(1e4, dtype=dtype), eps=1.0, rtol=1e-5)
    else:
        sim = make_sims(ds.StableNeoHookean(1e4, 0.3, 1000.0))["warp"]
        check_gradient(loss, deformed(sim, 0.01), eps=1e-7, rtol=1e-5)


def test_user_material_falls_back_to_torch():
    class Custom(ds.StableNeoHookean):
        def energy_density(self, F):
            return super().energy_density(F) * 1.5

    with pytest.warns(ds.BackendWarning, match="no Warp kernel"):
        sim = ds.Simulator(MESH, Custom(), backend="warp")
    assert sim.backend_name == "torch"


def test_kernels_are_not_rebuilt_for_new_meshes_or_parameters():
    import warp as wp

    from diffsim.kernels import kernels_for

    kernels = kernels_for(wp.float64)
    module = kernels.tet_forces_chunked[2].module
    make_sims(ds.StVK(youngs_modulus=2e4))["warp"].rollout(2)
    loaded = dict(module.execs)
    other = ds.TetMesh.box(resolution=(1, 2, 1), origin=(0.0, 0.05, 0.0))
    make_sims(ds.StVK(youngs_modulus=3e4, poissons_ratio=0.2), mesh=other)["warp"].rollout(2)
    assert kernels_for(wp.float64) is kernels
    assert dict(module.execs) == loaded  # the same compiled module objects, nothing reloaded


def test_surface_contact_path_matches_torch():
    """With surface contact on, torch ops wrap the Warp forces; values and gradients match."""
    a = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=(1, 1, 1), origin=(0.0, 0.01, 0.0))
    b = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=(1, 1, 1), origin=(0.02, 0.113, 0.02))
    mesh = ds.TetMesh.merge([a, b])
    out = {}
    for backend in ("torch", "warp"):
        E = torch.tensor(1e4, dtype=torch.float64, requires_grad=True)
        sim = ds.Simulator(
            mesh,
            ds.StableNeoHookean(E, 0.3, 1000.0),
            dtype=torch.float64,
            backend=backend,
            contact=True,
            contact_friction=0.3,
            friction=0.3,
            ground_stiffness=1e6,
        )
        assert sim.model.contact is not None
        v0 = torch.zeros(mesh.n_vertices, 3, dtype=torch.float64)
        v0[a.n_vertices :, 1] = -1.0
        traj = sim.rollout(30, state=sim.initial_state(velocities=v0))
        (grad,) = torch.autograd.grad(traj.positions[-1].square().sum(), E)
        out[backend] = (traj.positions, grad)
    assert rel(out["warp"][0], out["torch"][0]) < 1e-10
    assert rel(out["warp"][1], out["torch"][1]) < 1e-10


def test_float32_rollout_gradients_match_torch():
    """The contract's float32 tolerance (1e-4) for the gradients of a 100-step rollout with
    ground contact and friction. (Both float32 runs differ from float64 by far more: the
    contact makes this rollout sensitive, and each backend follows its rounding.)"""
    dtype = torch.float32
    out = {}
    for backend in ("torch", "warp"):
        E = torch.tensor(1e4, dtype=dtype, requires_grad=True)
        sim = make_sims(ds.StableNeoHookean(E, 0.3, 1000.0), dtype)[backend]
        x0 = deformed(sim, 0.01).requires_grad_(True)
        v0 = torch.zeros_like(x0)
        v0[:, 0] = 0.3
        v0.requires_grad_(True)
        traj = sim.rollout(100, state=sim.initial_state(x0, v0))
        weights = torch.randn(traj.positions.shape, generator=torch.Generator().manual_seed(3))
        loss = (traj.positions * weights).sum() + traj.velocities[-1].square().sum()
        out[backend] = torch.autograd.grad(loss, [E, x0, v0])
    for got, ref in zip(out["warp"], out["torch"], strict=True):
        assert rel(got, ref) < 1e-4


def test_the_ground_roots_kernel_is_the_torch_loop_where_surface_contact_acts():
    # Where surface contact acts, the Warp backend runs the torch update around its kernels,
    # and the ground's implicit step finds its roots with the fused update's kernel (one
    # launch) instead of Ground.roots' torch loop (two cubes resting on the ground: 2.1x
    # faster per substep). The same loop, so the same roots: to a few ulp for gaps across
    # the barrier, and a float64 rollout with ground and surface contact acting together is
    # the same to the last bit (measured: identical).
    cubes = [
        ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=2, origin=(0.0, 0.002 + 0.104 * i, 0.0))
        for i in range(2)
    ]
    material = ds.StableNeoHookean(5e4, 0.4, 500.0)
    for dtype in (torch.float64, torch.float32):
        sim = ds.Simulator(
            ds.TetMesh.merge(cubes), material, dt=1e-3, substeps="auto", ground=0.0,
            contact=True, backend="warp", dtype=dtype,
        )  # fmt: skip
        ground, h = sim.model.ground, sim.model.substep_dt
        target = torch.linspace(-0.5, 0.999, 301, dtype=dtype) * ground.dhat
        kernel, loop = sim.backend._ground_roots(target, h), ground.roots(target, h)
        assert (loop > 0).all() and (loop <= ground.dhat).all()
        assert ((kernel - loop).abs() <= 64 * torch.finfo(dtype).eps * loop).all()
    runs = []
    for roots in ("kernel", "loop"):
        sim = ds.Simulator(
            ds.TetMesh.merge(cubes), material, dt=1e-3, substeps="auto", ground=0.0,
            contact=True, backend="warp", dtype=torch.float64,
        )  # fmt: skip
        if roots == "loop":
            sim.backend._ground_roots = None
        with torch.no_grad():
            traj = sim.rollout(120)
        contact = sim.model.contact
        assert sim.backend.contact_free.counts["contact_steps"] > 0  # surface contact acted
        assert min(contact.min_distance(x) for x in traj.positions) < contact.dhat
        assert float(traj.positions[..., 1].min()) < ground.dhat  # on the ground's barrier
        runs.append(traj.positions)
    assert torch.equal(runs[0], runs[1])
