"""Many worlds at once (Simulator(worlds=W)): every world equals the same world alone.

Float64, forward and gradients with respect to every per-world input (E, nu, density,
gravity, damping, initial positions and velocities, prescribed positions), with and
without checkpointing, on the torch backend, the Warp fused CPU path (one worker running
one world after another; two whose vertex ranges span worlds; three that run a world each)
and the Warp per-substep path (what CUDA runs). Contact acts within a world only. See
docs/worlds.md.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import diffsim as ds
from diffsim.backends import BACKENDS
from diffsim.backends.base import Backend
from diffsim.backends.warp import bridge as warp_bridge
from diffsim.backends.warp import fused as warp_fused
from tests.helpers import stacked_tori

F64 = torch.float64
W = 3
STEPS = 12
MESH = ds.TetMesh.box(size=(0.2, 0.1, 0.1), resolution=(3, 2, 1), origin=(0.0, 0.004, 0.0))
FIXED = [0, 1]
SETTINGS = dict(
    dt=2e-3,
    substeps=2,
    dtype=F64,
    max_speed=2.0,
    friction=0.5,
    ground_dhat=3e-3,
    ground_stiffness=1e6,
    fixed=FIXED,
)
PATHS = ["torch", "warp", "warp-split", "warp-worlds", "warp-substep"]
needs_warp = pytest.mark.skipif("warp" not in BACKENDS, reason="warp-lang is not installed")


def use_path(path: str, monkeypatch, splits: list | None = None) -> str:
    """The backend of a path, with the monkeypatches that select it; ``splits`` receives
    whether each fused launch split whole worlds between its workers."""
    if path == "torch":
        return "torch"
    if "warp" not in BACKENDS:
        pytest.skip("warp-lang is not installed")
    if path == "warp":  # one worker, one launch per world (one after another)
        monkeypatch.setenv("DIFFSIM_WARP_THREADS", "1")
        monkeypatch.setattr(warp_fused, "WORLD_GROUP_TETS", 1)
    if path in ("warp-split", "warp-worlds"):
        # Two workers whose vertex and tet ranges span worlds (meeting at barriers), or
        # three that run a whole world each, independently.
        monkeypatch.setenv("DIFFSIM_WARP_THREADS", "2" if path == "warp-split" else "3")
        monkeypatch.setattr(warp_fused, "MIN_TETS_PER_WORKER", 1)
        monkeypatch.setattr(warp_bridge, "MIN_TETS_PER_WORKER", 1)
    if splits is not None:
        by_world = warp_fused._by_world
        monkeypatch.setattr(
            warp_fused,
            "_by_world",
            lambda g, n: splits.append((n, by_world(g, n))) or by_world(g, n),
        )
    if path == "warp-substep":  # one Substep Function per substep, as on CUDA
        monkeypatch.setattr(BACKENDS["warp"], "advance", Backend.advance)
    return "warp"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def world_inputs(n_steps: int = STEPS) -> dict[str, torch.Tensor]:
    """Leaf tensors with a world axis: every input kind differs between the worlds."""
    gen = torch.Generator().manual_seed(0)
    n, k = MESH.n_vertices, len(FIXED)
    rest = torch.as_tensor(MESH.vertices, dtype=F64)
    lift = torch.linspace(0.0, 0.01, n_steps, dtype=F64)[:, None, None, None]
    noise = torch.randn((2, W, n, 3), generator=gen, dtype=F64)
    out = {
        "E": torch.tensor([1e4, 2.5e4, 6e3], dtype=F64),
        "nu": torch.tensor([0.3, 0.4, 0.2], dtype=F64),
        "density": torch.tensor([1000.0, 800.0, 1300.0], dtype=F64),
        "gravity": torch.tensor([[0, -9.81, 0], [1.0, -4.0, 0], [0, -15.0, 0.5]], dtype=F64),
        "damping": torch.tensor([0.3, 0.0, 1.5], dtype=F64),
        "x0": rest + 1e-3 * noise[0],
        "v0": torch.tensor([0.0, -0.6, 0.0], dtype=F64) + 0.1 * noise[1],
        "targets": rest[FIXED].expand(n_steps, W, k, 3)
        + lift * torch.tensor([1.0, 0.5, 0.0], dtype=F64),
    }
    return {name: t.requires_grad_(True) for name, t in out.items()}


def batched_and_alone(backend: str, checkpoint_every=None, steps: int = STEPS):
    """(batched trajectory, per-world trajectories alone, the inputs, their gradients of the
    same loss computed both ways)."""
    p = world_inputs(steps)
    gen = torch.Generator().manual_seed(1)
    weights = torch.randn((W, MESH.n_vertices, 3), generator=gen, dtype=F64)
    material = ds.StableNeoHookean(p["E"], p["nu"], p["density"])
    sim = ds.Simulator(
        MESH, material, gravity=p["gravity"], damping=p["damping"], worlds=W, backend=backend,
        **SETTINGS,
    )  # fmt: skip
    state = sim.initial_state(p["x0"], p["v0"])
    traj = sim.rollout(steps, state, checkpoint_every, fixed_positions=p["targets"])
    loss = (traj.positions[-1] * weights).sum() + traj.velocities[-1].square().sum()
    batched = torch.autograd.grad(loss, list(p.values()))
    alone, grads = [], [torch.zeros_like(t) for t in p.values()]
    for w in range(W):
        material = ds.StableNeoHookean(p["E"][w], p["nu"][w], p["density"][w])
        one = ds.Simulator(
            MESH, material, gravity=p["gravity"][w], damping=p["damping"][w], backend=backend,
            **SETTINGS,
        )  # fmt: skip
        t = one.rollout(
            steps, ds.State(p["x0"][w], p["v0"][w]), checkpoint_every, p["targets"][:, w]
        )
        alone.append(t)
        loss = (t.positions[-1] * weights[w]).sum() + t.velocities[-1].square().sum()
        for total, g in zip(grads, torch.autograd.grad(loss, list(p.values())), strict=True):
            total += g
    return traj, alone, dict(zip(p, batched, strict=True)), dict(zip(p, grads, strict=True))


@pytest.mark.parametrize("checkpoint_every", [None, 5])
@pytest.mark.parametrize("path", PATHS)
def test_each_world_equals_the_world_alone_forward_and_gradients(
    path, checkpoint_every, monkeypatch
):
    splits = []
    backend = use_path(path, monkeypatch, splits)
    traj, alone, batched, single = batched_and_alone(backend, checkpoint_every)
    # The fused launches split as intended (the worlds alone split their tets).
    expected = {
        "warp": {(1, True), (1, False)},
        "warp-split": {(2, False)},
        "warp-worlds": {(3, True), (3, False)},
    }
    if path in expected:
        assert set(splits) == expected[path]
    assert traj.positions.shape == (STEPS + 1, W, MESH.n_vertices, 3)
    assert traj.positions.dtype == F64 and traj.n_worlds == W
    for w in range(W):
        assert rel(traj.positions[:, w], alone[w].positions) <= 1e-12
        assert rel(traj.velocities[:, w], alone[w].velocities) <= 1e-12
    # The ground acted (the vertices came within its barrier) and the worlds differ.
    assert float(traj.positions[..., 1].min()) < 3e-3
    assert rel(traj.positions[-1, 0], traj.positions[-1, 1]) > 1e-3
    for name, g in batched.items():
        assert float(single[name].abs().max()) > 0, name
        assert rel(g, single[name]) <= 1e-12, (name, rel(g, single[name]))


@needs_warp
def test_warp_and_torch_batched_rollouts_agree():
    trajs = {}
    for backend in ("torch", "warp"):
        p = world_inputs()
        material = ds.StableNeoHookean(p["E"], p["nu"], p["density"])
        sim = ds.Simulator(
            MESH, material, gravity=p["gravity"], damping=p["damping"], worlds=W,
            backend=backend, **SETTINGS,
        )  # fmt: skip
        with torch.no_grad():
            trajs[backend] = sim.rollout(STEPS, sim.initial_state(p["x0"], p["v0"]))
    assert rel(trajs["warp"].positions, trajs["torch"].positions) <= 1e-10


@pytest.mark.parametrize("backend", ["torch", "warp"])
def test_parameter_shapes_per_world_per_tet_and_shared(backend):
    """E [W * m] (per world and tet, flattened: a material's constructor takes at most one
    dimension), nu [m] (per tet, every world), density [] and gravity [3] (every world)."""
    if backend not in BACKENDS:
        pytest.skip("warp-lang is not installed")
    m = MESH.n_tets
    gen = torch.Generator().manual_seed(2)
    E = 1e4 * (1 + torch.rand((W, m), generator=gen, dtype=F64))
    nu = 0.2 + 0.2 * torch.rand(m, generator=gen, dtype=F64)
    settings = dict(SETTINGS, backend=backend, damping=0.2)
    sim = ds.Simulator(MESH, ds.NeoHookean(E.reshape(-1), nu, 900.0), worlds=W, **settings)
    v0 = torch.tensor([0.0, -0.3, 0.0], dtype=F64)
    with torch.no_grad():
        traj = sim.rollout(8, sim.initial_state(velocities=v0))
        for w in range(W):
            one = ds.Simulator(MESH, ds.NeoHookean(E[w], nu, 900.0), **settings)
            alone = one.rollout(8, one.initial_state(velocities=v0))
            assert rel(traj.positions[:, w], alone.positions) <= 1e-12
    assert sim.coefficients().material.youngs_modulus.shape == (W * m,)
    with torch.no_grad():  # [W, m] through params= (no constructor in the way)
        again = sim.rollout(8, sim.initial_state(velocities=v0), params={"youngs_modulus": E})
    assert torch.equal(again.positions, traj.positions)


# ----------------------------------------------------------------- contact within worlds
def two_boxes() -> ds.TetMesh:
    a = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=2, origin=(-0.11, 0.0, 0.0))
    b = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=2, origin=(0.01, 0.03, 0.02))
    return ds.TetMesh.merge([a, b])


@pytest.mark.parametrize(
    "backend, checkpoint_every", [("torch", None), ("warp", None), ("warp", 5)]
)
def test_contact_acts_within_a_world_never_across(backend, checkpoint_every):
    """World 0: two boxes thrown at each other (they collide). World 1: the same boxes in
    the same place thrown apart, through world 0's bodies. World 2: the same as world 0,
    so it overlaps world 0 exactly. Each equals its world alone, forward and gradient
    (with checkpoints: the batched rollout recomputes its segments in the backward pass)."""
    if backend not in BACKENDS:
        pytest.skip("warp-lang is not installed")
    mesh = two_boxes()
    towards = torch.where(torch.as_tensor(mesh.body_ids == 0), 4.0, -4.0).to(F64)
    speeds = torch.stack([towards, -towards, towards])
    v0 = torch.zeros((3, mesh.n_vertices, 3), dtype=F64)
    v0[..., 0] = speeds
    E = torch.tensor([1e5, 1e5, 1e5], dtype=F64, requires_grad=True)
    settings = dict(
        dt=1e-3, substeps=2, gravity=(0.0, 0.0, 0.0), ground=None, contact=True,
        contact_friction=0.3, backend=backend, dtype=F64,
    )  # fmt: skip
    sim = ds.Simulator(mesh, ds.StableNeoHookean(E, 0.3, 1000.0), worlds=3, **settings)
    traj = sim.rollout(25, sim.initial_state(velocities=v0), checkpoint_every)
    weights = torch.randn(traj.positions.shape[1:], generator=torch.Generator().manual_seed(3))
    (grad,) = torch.autograd.grad((traj.positions[-1] * weights.to(F64)).sum(), E)
    contact = sim.model.contact
    single = torch.zeros_like(E)
    paths = {"fused_substeps": 0, "general_substeps": 0}
    for w in range(3):
        one = ds.Simulator(mesh, ds.StableNeoHookean(E[w], 0.3, 1000.0), **settings)
        alone = one.rollout(25, one.initial_state(velocities=v0[w]), checkpoint_every)
        assert rel(traj.positions[:, w], alone.positions) <= 1e-12
        single += torch.autograd.grad((alone.positions[-1] * weights[w].to(F64)).sum(), E)[0]
        if backend == "warp":
            for path in paths:
                paths[path] += one.backend.fused_contact.counts[path]
        closest = min(one.model.contact.min_distance(x) for x in alone.positions)
        if w != 1:
            assert closest < one.model.contact.dhat  # the boxes of worlds 0 and 2 met
    if backend == "warp":
        # Where contact acted, each world ran its own fused launches, as it does alone (the
        # worlds' launches stop where any world's contact-free block fails, so a few more).
        counts = sim.backend.fused_contact.counts
        assert counts["fused_substeps"] >= paths["fused_substeps"] > 0, (counts, paths)
        # (Handovers for steps beyond a set's reach depend on where launches start: a few.)
        assert counts["general_substeps"] <= 1.1 * paths["general_substeps"] + 5, (counts, paths)
    # (World 1's boxes never meet: E does not change its motion, its gradient is round-off.)
    assert rel(grad, single) <= 1e-12
    # Worlds 0 and 2 overlap at every frame (to round-off: where contact does not act, the
    # fused kernels may split their tets between threads differently) and never repel.
    assert rel(traj.positions[:, 0], traj.positions[:, 2]) <= 1e-12
    assert contact.min_distance(traj.positions[-1].reshape(-1, 3)) > 0
    # World 1's boxes move apart at their speed however close world 0's bodies come.
    assert float((traj.velocities[:, 1, :, 0] - speeds[1]).abs().max()) < 1e-9


@needs_warp
@pytest.mark.parametrize("dtype, tolerance", [(F64, 1e-12), (torch.float32, 1e-6)])
def test_worlds_in_contact_with_prescribed_vertices_per_tet_moduli_and_the_volume_limit(
    dtype, tolerance
):
    """A box held in place (every vertex prescribed) and another thrown at it, E per world
    and tet, the volume limit on: each world, run in its own fused contact launches, equals
    the world alone, forward and gradient, through checkpoints (float32, the default: to
    its rounding)."""
    mesh = two_boxes()
    held = torch.as_tensor(mesh.body_ids == 0)
    m, W = mesh.n_tets, 2
    gen = torch.Generator().manual_seed(4)
    E = (1e5 * (1 + torch.rand((W, m), generator=gen, dtype=dtype))).requires_grad_(True)
    v0 = torch.zeros((mesh.n_vertices, 3), dtype=dtype)
    v0[~held, 0] = -4.0
    settings = dict(
        dt=1e-3, substeps=2, gravity=(0.0, 0.0, 0.0), ground=None, fixed=held.numpy(),
        contact_friction=0.3, min_volume_ratio=0.2, dtype=dtype,
    )  # fmt: skip
    sim = ds.Simulator(mesh, ds.StableNeoHookean(E.reshape(-1), 0.3, 1000.0), worlds=W, **settings)
    traj = sim.rollout(20, sim.initial_state(velocities=v0), 7)
    (batched,) = torch.autograd.grad(traj.positions[-1][..., 0].sum(), E)
    assert sim.backend.fused_contact.counts["fused_substeps"] > 0
    for w in range(W):
        one = ds.Simulator(mesh, ds.StableNeoHookean(E[w], 0.3, 1000.0), **settings)
        alone = one.rollout(20, one.initial_state(velocities=v0), 7)
        (single,) = torch.autograd.grad(alone.positions[-1][:, 0].sum(), E)
        assert rel(traj.positions[:, w], alone.positions) <= tolerance
        assert float(single[w].abs().max()) > 0
        assert rel(batched[w], single[w]) <= tolerance
        closest = min(one.model.contact.min_distance(x) for x in alone.positions)
        assert closest < one.model.contact.dhat  # the thrown box reached the held one


@needs_warp
def test_worlds_of_a_real_mesh_in_the_default_configuration():
    """Two tori of ../shared/assets/torus.msh as users run them: float32, the ground on,
    default contact with friction, ``substeps="auto"``; one lies on the ground, the other
    is thrown down onto it at 4 m/s, a different E per world. The ground is touched, the
    tori collide and the step limit cuts steps in every world; each world equals the world
    alone, positions and the gradient of a loss with respect to E (float32: to its
    rounding)."""
    mesh = stacked_tori()
    E = torch.tensor([1e5, 3e5], requires_grad=True)
    settings = dict(dt=2e-3, substeps="auto", ground=0.0, contact_friction=0.5)
    sim = ds.Simulator(mesh, ds.StableNeoHookean(E, 0.3, 1000.0), worlds=2, **settings)
    assert sim.dtype == torch.float32 and sim.model.contact is not None
    steps = 40
    thrown = torch.zeros((mesh.n_vertices, 3))
    thrown[torch.as_tensor(mesh.body_ids == 1), 1] = -4.0
    with pytest.warns(ds.StabilityWarning):  # faster than the barrier stops
        traj = sim.rollout(steps, sim.initial_state(velocities=thrown))
    weights = torch.randn(traj.positions.shape[1:], generator=torch.Generator().manual_seed(5))
    (batched,) = torch.autograd.grad((traj.positions[-1] * weights).sum(), E)
    counts = dict(sim.backend.fused_contact.counts)
    print(f"{counts}; cut {sim.contact_steps_cut}; dE {batched.tolist()}")
    assert counts["fused_substeps"] > 0
    for w in range(2):
        # The worlds share the substep the stiffest needs.
        alone_settings = dict(settings, substeps=sim.model.substeps)
        one = ds.Simulator(mesh, ds.StableNeoHookean(E[w], 0.3, 1000.0), **alone_settings)
        with pytest.warns(ds.StabilityWarning):
            alone = one.rollout(steps, one.initial_state(velocities=thrown))
        (single,) = torch.autograd.grad((alone.positions[-1] * weights[w]).sum(), E)
        error = rel(traj.positions[:, w], alone.positions)
        print(f"world {w}: cut {one.contact_steps_cut}; positions {error:.1e}, "
              f"dE {float(single[w]):.6e} / {float(batched[w]):.6e}")  # fmt: skip
        assert one.contact_steps_cut > 0  # the step limit acted
        assert float(alone.positions[:, :, 1].min()) < one.model.ground.dhat  # on the ground
        closest = min(one.model.contact.min_distance(x) for x in alone.positions.detach())
        assert closest < one.model.contact.dhat  # the tori collided
        assert error <= 1e-6
        assert rel(batched[w], single[w]) <= 1e-4


def test_identical_overlapping_worlds_do_not_repel():
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=2, origin=(0.0, 0.2, 0.0))
    settings = dict(dt=1e-3, substeps=2, ground=None, contact=True, dtype=F64, backend="torch")
    sim = ds.Simulator(mesh, ds.StableNeoHookean(1e5, 0.3, 1000.0), worlds=2, **settings)
    one = ds.Simulator(mesh, ds.StableNeoHookean(1e5, 0.3, 1000.0), **settings)
    with torch.no_grad():
        traj = sim.rollout(10)
        alone = one.rollout(10)
    assert torch.equal(traj.positions[:, 0], alone.positions)
    assert torch.equal(traj.positions[:, 1], alone.positions)
    free_fall = -9.81 * 0.01 / 2 * 0.01
    assert float(traj.positions[-1, :, :, 1].mean() - mesh.vertices[:, 1].mean()) < free_fall
    energies = sim.energies(traj.state(-1))
    assert energies["contact"].shape == (2,) and float(energies["contact"].abs().max()) == 0


# ----------------------------------------------------------------- per-world set-up
def test_stable_step_and_mass_scaling_per_world():
    E = torch.tensor([1e4, 4e4, 1e3], dtype=F64)
    sim = ds.Simulator(MESH, ds.StableNeoHookean(E, 0.3, 1000.0), worlds=W, substeps="auto")
    alone = [ds.Simulator(MESH, ds.StableNeoHookean(float(e), 0.3, 1000.0)) for e in E]
    dts = [s.stable_dt for s in alone]
    assert [s.dt for s in sim.world_stable_steps] == pytest.approx(dts, rel=1e-12)
    assert sim.stable_dt == pytest.approx(min(dts), rel=1e-12)  # the stiffest world sets it
    assert sim.model.substeps == max(s.stable_step.substeps(1e-3) for s in alone)
    target = 1.2 * max(dts)
    sim = ds.Simulator(MESH, ds.StableNeoHookean(E, 0.3, 1000.0), worlds=W, mass_scaling=target)
    alone = [
        ds.Simulator(MESH, ds.StableNeoHookean(float(e), 0.3, 1000.0), mass_scaling=target)
        for e in E
    ]
    added = sim.model.added_mass.view(W, -1)
    for w in range(W):
        assert torch.allclose(added[w], alone[w].model.added_mass, rtol=1e-6, atol=0)
    assert sim.added_mass == pytest.approx(sum(s.added_mass for s in alone), rel=1e-6)


@pytest.mark.parametrize("backend", ["torch", "warp"])
def test_forces_and_energies_per_world(backend):
    if backend not in BACKENDS:
        pytest.skip("warp-lang is not installed")
    p = {k: v.detach() for k, v in world_inputs().items()}
    kw = dict(SETTINGS, backend=backend)
    sim = ds.Simulator(
        MESH, ds.StableNeoHookean(p["E"], p["nu"], p["density"]), gravity=p["gravity"],
        damping=p["damping"], worlds=W, **kw,
    )  # fmt: skip
    x = p["x0"].clone()
    x[..., 1] -= 0.0025  # some vertices inside the ground barrier
    f = sim.forces(x)
    energies = sim.energies(ds.State(x, p["v0"]))
    for w in range(W):
        one = sim.world(w)
        assert one.worlds is None and one.model.substeps == sim.model.substeps
        assert rel(f[w], one.forces(x[w])) <= 1e-12
        for name, value in one.energies(ds.State(x[w], p["v0"][w])).items():
            assert abs(float(energies[name][w] - value)) <= 1e-12 * max(abs(float(value)), 1.0)


def test_states_targets_and_trajectories_have_a_world_axis(tmp_path):
    n = MESH.n_vertices
    sim = ds.Simulator(MESH, ds.StableNeoHookean(1e4, 0.3, 1000.0), worlds=2, fixed=FIXED)
    state = sim.initial_state(velocities=(0.0, 0.1, 0.0))
    assert state.positions.shape == (2, n, 3) and state.velocities.shape == (2, n, 3)
    assert state.positions.dtype == F64 and state.velocities.dtype == torch.float32
    assert sim.initial_state(positions=MESH.vertices).positions.shape == (2, n, 3)
    moved = torch.as_tensor(MESH.vertices[FIXED]) + torch.tensor([[[1e-3, 0, 0]], [[0, 2e-3, 0]]])
    after = sim.step(state, fixed_positions=moved)  # [W, k, 3]: one target per world
    assert after.positions.shape == (2, n, 3)
    assert torch.equal(after.positions[:, FIXED], moved)
    traj = sim.rollout(3, state, fixed_positions=moved[0])  # [k, 3]: every world
    assert traj.positions.shape == (4, 2, n, 3) and traj.state(-1).positions.shape == (2, n, 3)
    one = traj.world(1)
    assert one.positions.shape == (4, n, 3) and one.n_worlds is None
    traj.save(tmp_path / "worlds.npz")
    loaded = ds.Trajectory.load(tmp_path / "worlds.npz")
    assert loaded.n_worlds == 2 and torch.equal(loaded.positions, traj.positions)
    # Without worlds nothing changes.
    plain = ds.Simulator(MESH, ds.StableNeoHookean(1e4, 0.3, 1000.0))
    assert plain.rollout(2).positions.shape == (3, n, 3) and plain.n_worlds == 1


def test_clear_errors_for_world_shapes_and_equilibrium():
    n, k, m = MESH.n_vertices, len(FIXED), MESH.n_tets
    mat = ds.StableNeoHookean(1e4, 0.3, 1000.0)
    with pytest.raises(ValueError, match="worlds must be None or an integer >= 1"):
        ds.Simulator(MESH, mat, worlds=0)
    with pytest.raises(ValueError, match=rf"\[\] \(all worlds\), \[3\] .*\[3, {m}\]"):
        ds.Simulator(MESH, ds.StableNeoHookean(torch.ones(2) * 1e4, 0.3), worlds=3)
    with pytest.raises(ValueError, match=r"world 1: youngs_modulus must be > 0"):
        bad = torch.tensor([1e4, -1.0, 1e4])
        ds.Simulator(MESH, mat, worlds=3).rollout(2, params={"youngs_modulus": bad})
    with pytest.raises(ValueError, match=r"gravity must have 3 components \(or \[3, 3\]"):
        ds.Simulator(MESH, mat, worlds=3, gravity=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="damping must be finite and >= 0 .* in every world"):
        ds.Simulator(MESH, mat, worlds=3, damping=torch.tensor([0.1, -1.0, 0.0]))
    sim = ds.Simulator(MESH, mat, worlds=3, fixed=FIXED)
    with pytest.raises(ValueError, match=rf"state positions must have shape \[3, {n}, 3\]"):
        sim.rollout(2, ds.State(torch.zeros(n, 3), torch.zeros(n, 3)))
    with pytest.raises(ValueError, match=r"fixed_positions must have shape .*\[2, 3, 2, 3\]"):
        sim.rollout(2, fixed_positions=torch.zeros(2, k, 3))
    with pytest.raises(ValueError, match=rf"positions must have shape \[3, {n}, 3\], \[{n}, 3\]"):
        sim.initial_state(positions=torch.zeros(2, n, 3))
    with pytest.raises(ValueError, match=r"vertices \[.*\] of world 2 start at or below"):
        x = torch.as_tensor(MESH.vertices).repeat(3, 1, 1)
        x[2, 5, 1] = -0.1
        sim.initial_state(positions=x)
    with pytest.raises(ValueError, match=r"equilibrium does not batch .*sim\.world\(w\)"):
        sim.equilibrium()
    with pytest.raises(ValueError, match="quasi_static does not batch"):
        sim.quasi_static(loads=[1.0])
    with pytest.raises(ValueError, match="unknown parameters"):
        sim.rollout(2, params={"stiffness": 1.0})
    with pytest.raises(ValueError, match=r"gravity must have shape \[3\] or \[3, 3\]"):
        sim.rollout(2, params={"gravity": torch.zeros(4, 3)})


def test_a_blow_up_names_its_world():
    E = torch.tensor([1e4, 1e10], dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ds.StabilityWarning)
        sim = ds.Simulator(MESH, ds.StableNeoHookean(E, 0.3, 1000.0), worlds=2, dtype=F64)
        x = sim.initial_state().positions.clone()
        x[1, 3] += 0.01
        with pytest.raises(ds.SimulationError, match=r"world 1"):
            sim.rollout(200, ds.State(x, torch.zeros_like(x, dtype=F64)))


def test_rollout_params_take_world_axes():
    E = torch.tensor([1e4, 2e4], dtype=F64, requires_grad=True)
    gravity = torch.tensor([[0.0, -9.81, 0.0], [0.0, 0.0, 0.0]], dtype=F64)
    mat = ds.StableNeoHookean(1e4, 0.3, 1000.0)
    sim = ds.Simulator(MESH, mat, worlds=2, dtype=F64, fixed=FIXED)  # world 0 sags
    traj = sim.rollout(5, params={"youngs_modulus": E, "gravity": gravity})
    traj.positions[-1].sum().backward()
    assert E.grad.shape == (2,) and abs(float(E.grad[0])) > 1e6 * abs(float(E.grad[1]))
    assert float((traj.positions[:, 1] - traj.positions[0, 1]).abs().max()) < 1e-15  # at rest
    assert float(traj.positions[-1, 0, :, 1].mean()) < float(traj.positions[0, 0, :, 1].mean())


def test_the_clamp_notice_counts_each_world_and_names_it():
    """One world of 64 clamped throughout: 1.6% of all vertex-frames, but all of its own."""
    sim = ds.Simulator(MESH, ds.StableNeoHookean(1e4, 0.3), worlds=64, max_speed=2.0, ground=None)
    v0 = torch.zeros((64, MESH.n_vertices, 3))
    v0[17, :, 0] = 1.5
    with pytest.warns(ds.StabilityWarning, match=r"100% of vertex-frames of world 17"):
        sim.rollout(3, sim.initial_state(velocities=v0))


def test_a_world_by_tet_material_field_can_be_passed_as_2d():
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=(1, 1, 1), origin=(0.0, 0.2, 0.0))
    E = torch.full((3, mesh.n_tets), 1e5, dtype=torch.float64)
    E[1] *= 2.0
    material = ds.StableNeoHookean(E, 0.3, 1000.0)  # [W, m] accepted at construction
    sim = ds.Simulator(mesh, material, worlds=3, dtype=torch.float64)
    assert sim.rollout(3).positions.shape == (4, 3, mesh.n_vertices, 3)
    with pytest.raises(ValueError, match=r"youngs_modulus must have shape \[\] or \[6\]"):
        ds.Simulator(mesh, material)  # without worlds a [W, m] field is refused
