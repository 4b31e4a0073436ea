"""The fused CPU rollout kernel (diffsim/kernels/advance.py) against the per-substep path.

No-grad Warp rollouts on the CPU run whole blocks of steps in one launch per worker thread;
they must give the same numbers as the per-substep kernels (the same functions in the same
order), with one worker or two meeting at the spinning barrier.
"""

import threading

import pytest
import torch

import diffsim as ds
from diffsim.backends import BACKENDS
from diffsim.backends.base import Backend
from diffsim.backends.warp import bridge as warp_bridge
from diffsim.backends.warp import fused as warp_fused

pytestmark = pytest.mark.skipif("warp" not in BACKENDS, reason="warp-lang is not installed")

MESH = ds.TetMesh.box(size=(0.2, 0.1, 0.1), resolution=(6, 3, 3), origin=(0.0, 0.002, 0.0))
MATERIALS = [ds.StableNeoHookean, ds.NeoHookean, ds.StVK, ds.Corotated, ds.LinearElastic]


def split_small_meshes(monkeypatch) -> None:
    """Both the fused and the per-substep paths split even the small test meshes."""
    monkeypatch.setattr(warp_fused, "MIN_TETS_PER_WORKER", 1)
    monkeypatch.setattr(warp_bridge, "MIN_TETS_PER_WORKER", 1)


def make_sim(material_cls, dtype=torch.float64, **kwargs):
    settings = dict(
        dt=2e-3,
        substeps=3,
        dtype=dtype,
        damping=0.3,
        max_speed=2.0,
        friction=0.5,
        ground_dhat=3e-3,
        ground_stiffness=1e6,
        fixed=[0, 1, 2],
        backend="warp",
        contact=False,  # the elastic core's kernels (contact has its own tests)
    )
    settings.update(kwargs)
    return ds.Simulator(MESH, material_cls(youngs_modulus=1e4, poissons_ratio=0.3), **settings)


def moving_targets(sim, steps):
    start = sim.model.rest_positions[sim.model.fixed_indices]
    lift = torch.linspace(0.0, 0.01, steps, dtype=start.dtype)
    return start + lift[:, None, None] * torch.tensor([1.0, 1.0, 0.0], dtype=start.dtype)


def both_paths(sim, steps, monkeypatch):
    """(fused, per-substep) trajectories of the same no-grad rollout."""
    state = sim.initial_state(velocities=torch.full_like(sim.model.rest_positions, -0.05))
    targets = moving_targets(sim, steps)
    calls = []
    fused_advance = warp_fused.advance_steps
    monkeypatch.setattr(
        warp_fused, "advance_steps", lambda *a, **k: calls.append(1) or fused_advance(*a, **k)
    )
    fused = sim.rollout(steps, state=state, fixed_positions=targets)
    assert calls, "the fused kernel did not run"
    with monkeypatch.context() as m:
        m.setattr(type(sim.backend), "advance", Backend.advance)
        reference = sim.rollout(steps, state=state, fixed_positions=targets)
    return fused, reference


@pytest.mark.parametrize("material_cls", MATERIALS)
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_fused_rollout_equals_per_substep_kernels(material_cls, workers, monkeypatch):
    """Bitwise for one and two workers (the per-substep path splits the tets in two, so
    forces add up in the same order); to rounding for three (on two cores: the barrier
    then has to yield to a descheduled partner)."""
    monkeypatch.setenv("DIFFSIM_WARP_THREADS", str(workers))
    split_small_meshes(monkeypatch)
    sim = make_sim(material_cls)
    fused, reference = both_paths(sim, 40, monkeypatch)
    assert float(reference.positions[:, :, 1].min()) < sim.model.ground.dhat  # contact active
    if workers <= 2:
        assert torch.equal(fused.positions, reference.positions)
        assert torch.equal(fused.velocities, reference.velocities)
    else:
        assert torch.allclose(fused.positions, reference.positions, rtol=0, atol=1e-13)
        assert torch.allclose(fused.velocities, reference.velocities, rtol=0, atol=1e-11)
    targets = moving_targets(sim, 40)
    assert torch.equal(fused.positions[1:, sim.model.fixed_indices], targets)


def test_fused_rollout_float32_runs_in_blocks(monkeypatch):
    """Several blocks (the finiteness check runs between them), float32, two workers."""
    monkeypatch.setenv("DIFFSIM_WARP_THREADS", "2")
    split_small_meshes(monkeypatch)
    monkeypatch.setattr(ds.simulator, "FINITE_CHECK_WORK", MESH.n_tets * 3 * 7)  # 7 steps
    sim = make_sim(ds.StableNeoHookean, torch.float32)
    fused, reference = both_paths(sim, 30, monkeypatch)
    assert torch.equal(fused.positions, reference.positions)


def test_fused_rollout_reports_the_step_that_blew_up():
    sim = make_sim(ds.NeoHookean, ground=None, dt=0.05, substeps=1, max_speed=None, fixed=None)
    x = sim.model.rest_positions.clone()
    x[0] += 0.05  # a squashed corner: the stiff, undamped response diverges
    with pytest.raises(ds.SimulationError, match=r"step \d+ produced non-finite positions"):
        sim.rollout(200, state=sim.initial_state(x))


def test_a_helper_that_fails_to_launch_releases_the_other_worker(monkeypatch):
    """The helper's launch raises: the spinning worker is told to stop at once and the error
    reaches the caller. With no spin limit to fall back on, a lost abort would hang."""
    monkeypatch.setenv("DIFFSIM_WARP_THREADS", "2")
    split_small_meshes(monkeypatch)
    monkeypatch.setattr(warp_fused, "SPIN_LIMIT", 1 << 62)
    sim = make_sim(ds.StableNeoHookean)
    real_launch = warp_fused.wp.launch
    recorded, outcome = [], []

    class Broken:
        def launch(self):
            raise OSError("the helper could not launch")

    def launch(kernel, *args, **kwargs):
        if kwargs.get("record_cmd"):
            recorded.append(kernel)
            if len(recorded) == 2:  # the second worker's launch
                return Broken()
        return real_launch(kernel, *args, **kwargs)

    def run() -> None:
        try:
            sim.rollout(3)
        except OSError as error:
            outcome.append(error)

    monkeypatch.setattr(warp_fused.wp, "launch", launch)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the first worker kept waiting for the failed helper"
    assert outcome and "could not launch" in str(outcome[0])


def test_a_worker_that_never_arrives_raises_instead_of_hanging(monkeypatch):
    """The barrier gives up after SPIN_LIMIT spins when the second worker never starts."""

    class OnlyFirst:
        threads = 2

        def run(self, first, *others):
            first()

    split_small_meshes(monkeypatch)
    monkeypatch.setattr(warp_fused, "SPIN_LIMIT", 10_000)
    sim = make_sim(ds.StableNeoHookean)
    sim.backend.launcher = OnlyFirst()
    with pytest.raises(RuntimeError, match="DIFFSIM_WARP_THREADS=1"):
        sim.rollout(3)


def rollout_gradients(backend, steps=12):
    """Gradients of a rollout loss through 3 substeps per step and moving fixed vertices."""
    dtype = torch.float64
    params = {
        "E": torch.linspace(8e3, 1.2e4, MESH.n_tets, dtype=dtype),
        "nu": torch.tensor(0.3, dtype=dtype),
        "density": torch.tensor(900.0, dtype=dtype),
        "gravity": torch.tensor([0.5, -9.81, 0.2], dtype=dtype),
        "damping": torch.tensor(0.3, dtype=dtype),
    }
    for t in params.values():
        t.requires_grad_(True)
    material = ds.StableNeoHookean(params["E"], params["nu"], params["density"])
    sim = ds.Simulator(
        MESH, material, dt=2e-3, substeps=3, dtype=dtype, damping=params["damping"],
        gravity=params["gravity"], max_speed=2.0, friction=0.5, ground_dhat=3e-3,
        ground_stiffness=1e6, fixed=[0, 1, 2], backend=backend, contact=False,
    )  # fmt: skip
    x0 = sim.model.rest_positions.clone().requires_grad_(True)
    v0 = torch.full_like(x0, -0.05).requires_grad_(True)
    targets = moving_targets(sim, steps).requires_grad_(True)
    traj = sim.rollout(steps, state=sim.initial_state(x0, v0), fixed_positions=targets)
    weights = torch.randn(traj.positions.shape, generator=torch.Generator().manual_seed(4))
    loss = (traj.positions * weights.to(dtype)).sum() + traj.velocities[-1].square().sum()
    named = {**params, "x0": x0, "v0": v0, "targets": targets}
    return dict(zip(named, torch.autograd.grad(loss, list(named.values())), strict=True))


def assert_matches_torch(got: dict) -> None:
    for name, g in rollout_gradients("torch").items():
        err = float((got[name] - g).abs().max() / g.abs().max())
        assert err < 1e-10, (name, err)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_fused_rollout_gradients_match_torch(workers, monkeypatch):
    """The Steps Function (fused forward, fused reverse sweep) against torch."""
    monkeypatch.setenv("DIFFSIM_WARP_THREADS", str(workers))
    split_small_meshes(monkeypatch)
    calls = []
    retreat = warp_fused.retreat_steps
    monkeypatch.setattr(
        warp_fused, "retreat_steps", lambda *a, **k: calls.append(1) or retreat(*a, **k)
    )
    got = rollout_gradients("warp")
    assert calls, "the fused reverse sweep did not run"
    assert_matches_torch(got)


def test_per_substep_gradients_match_torch(monkeypatch):
    """The Substep Function (the path CUDA takes) against torch, on the CPU."""
    monkeypatch.setenv("DIFFSIM_WARP_THREADS", "2")
    split_small_meshes(monkeypatch)
    from diffsim.backends.warp.backend import WarpBackend

    monkeypatch.setattr(WarpBackend, "advance", Backend.advance)
    calls = []
    backward = warp_bridge.Substep.backward
    monkeypatch.setattr(
        warp_bridge.Substep, "backward", staticmethod(lambda *a: calls.append(1) or backward(*a))
    )
    got = rollout_gradients("warp")
    assert calls, "the per-substep Function did not run"
    assert_matches_torch(got)


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_bad_thread_count_is_rejected(value, monkeypatch):
    monkeypatch.setenv("DIFFSIM_WARP_THREADS", value)
    with pytest.raises(ValueError, match="DIFFSIM_WARP_THREADS must be a positive integer"):
        make_sim(ds.StableNeoHookean)


@pytest.mark.parametrize("max_speed", [None, 2.0])
def test_sticking_friction_gradients_match_torch(max_speed):
    """From rest, so contact speeds pass through the static-friction branch (|u| < eps_v)
    of the hand-derived vertex adjoint; with and without the speed clamp."""
    dtype = torch.float64
    out = {}
    for backend in ("torch", "warp"):
        E = torch.tensor(1e4, dtype=dtype, requires_grad=True)
        sim = ds.Simulator(
            MESH, ds.StableNeoHookean(E, 0.3, 1000.0), dt=2e-3, substeps=2, dtype=dtype,
            friction=0.8, ground_dhat=3e-3, ground_stiffness=1e6, max_speed=max_speed,
            gravity=torch.tensor([0.02, -9.81, 0.0], dtype=dtype), backend=backend,
            contact=False,
        )  # fmt: skip
        x0 = sim.model.rest_positions.clone().requires_grad_(True)
        v0 = torch.zeros_like(x0).requires_grad_(True)
        traj = sim.rollout(30, state=sim.initial_state(x0, v0))
        slow = traj.velocities[:, :, [0, 2]].norm(dim=2) < sim.model.ground.friction_velocity
        assert (slow & (traj.positions[:, :, 1] < 3e-3)).any()  # static friction in contact
        weights = torch.randn(traj.positions.shape, generator=torch.Generator().manual_seed(3))
        loss = (traj.positions * weights.to(dtype)).sum() + traj.velocities[-1].square().sum()
        out[backend] = torch.autograd.grad(loss, [E, x0, v0])
    for got, ref in zip(out["warp"], out["torch"], strict=True):
        assert float((got - ref).abs().max() / ref.abs().max()) < 1e-10


def test_torch_runs_one_thread_while_the_warp_backend_works(monkeypatch):
    """Torch's OpenMP threads spin after each parallel op and take the cores from the Warp
    workers (spheres_collide ran 1.4-1.66 times slower with torch's default threads on two
    cores): the steps, the simulator's checks between them and the backward launches run
    with one torch thread, restored after."""
    seen = []

    def recording(function):
        def wrapper(*args, **kwargs):
            seen.append((function.__name__, torch.get_num_threads()))
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(warp_fused, "advance_steps", recording(warp_fused.advance_steps))
    monkeypatch.setattr(warp_fused, "retreat_steps", recording(warp_fused.retreat_steps))
    # The simulator's own checks between blocks of steps, too.
    check = recording(ds.Simulator._check_finite)
    monkeypatch.setattr(ds.Simulator, "_check_finite", check)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        sim = make_sim(ds.StableNeoHookean, torch.float32)
        v0 = torch.zeros(MESH.n_vertices, 3, requires_grad=True)
        traj = sim.rollout(3, state=sim.initial_state(velocities=v0))
        assert torch.get_num_threads() == 2
        traj.positions[-1][:, 1].sum().backward()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert {name for name, _ in seen} == {"advance_steps", "retreat_steps", "_check_finite"}
    assert all(threads == 1 for _, threads in seen), seen
