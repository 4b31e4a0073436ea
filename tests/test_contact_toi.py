"""Time-of-impact substeps (``contact_time_of_impact=True``): where the continuous collision
limit would cut a substep, it is taken in halves instead
(diffsim.backends.integrator.substep), so no energy is lost to the
limit and gradients are exact wherever both sides of a finite difference take the same
steps. Two 5 cm cubes thrown head-on at 1 m/s relative, dhat 0.73 mm, 0.25 ms substeps: the
barrier alone stops about 0.2 dhat / h = 0.58 m/s, so the limit acts.
"""

from __future__ import annotations

import pytest
import torch

import diffsim as ds
from diffsim.backends import BACKENDS
from diffsim.sim.state import State

F64 = torch.float64
SPEED = 1.0  # m/s, relative: the cubes start 2 cm apart and meet at about 20 ms
needs_warp = pytest.mark.skipif("warp" not in BACKENDS, reason="warp-lang is not installed")
BOTH = ["torch", pytest.param("warp", marks=needs_warp)]


def two_cubes(
    backend: str = "torch", E=1e5, dtype=F64, worlds: int | None = None, splits: bool = True
):
    a = ds.TetMesh.box(size=(0.05, 0.05, 0.05), resolution=2, origin=(-0.06, 0.0, 0.0))
    b = ds.TetMesh.box(size=(0.05, 0.05, 0.05), resolution=2, origin=(0.01, 0.01, 0.005))
    return ds.Simulator(
        ds.TetMesh.merge([a, b]), ds.StableNeoHookean(E, 0.3, 1000.0), dt=1e-3, substeps=4,
        gravity=(0.0, 0.0, 0.0), ground=None, contact=True, contact_friction=0.0,
        backend=backend, dtype=dtype, worlds=worlds, contact_time_of_impact=splits,
    )  # fmt: skip


def head_on(sim: ds.Simulator, speed) -> torch.Tensor:
    """Initial velocities ``[n, 3]``: the cubes at ``speed`` (m/s, a tensor or a float)
    towards each other along x."""
    body = torch.as_tensor(sim.mesh.body_ids == 0)
    direction = torch.zeros((sim.mesh.n_vertices, 3), dtype=sim.dtype)
    direction[:, 0] = torch.where(body, 0.5, -0.5)
    return speed * direction


def record_limits(contact) -> list[int]:
    """A list that gets, for every step the integrator proposes, the number of vertices the
    limit would cut: equal lists mean equal splits and truncations."""
    log: list[int] = []
    scales = contact.step_scales

    def recorded(x, x_new):
        alpha = scales(x, x_new)
        log.append(int((alpha < 1).sum()))
        return alpha

    contact.step_scales = recorded
    return log


def energy_kept(backend: str, steps: int = 80, splits: bool = True) -> tuple[float, dict]:
    """Total energy after the impact (the cubes apart again) over before it."""
    sim = two_cubes(backend, splits=splits)
    state = sim.initial_state(velocities=head_on(sim, SPEED))
    before = float(sim.energies(state)["total"])
    with torch.no_grad():
        traj = sim.rollout(steps, state)
    after = sim.energies(State(traj.positions[-1], traj.velocities[-1]))
    contact = sim.model.contact
    assert float(after["contact"]) == 0.0  # they parted
    assert min(contact.min_distance(x) for x in traj.positions) > 0
    return float(after["total"]) / before, contact.timings


@pytest.mark.parametrize("backend", BOTH)
def test_an_impact_the_limit_acts_on_keeps_its_energy(backend):
    kept, timings = energy_kept(backend)
    kept_before, before = energy_kept(backend, splits=False)  # the default
    print(
        f"{backend}: energy after/before {kept_before:.4f} truncating "
        f"({before['truncated_vertex_steps']:.0f} truncated vertex-steps), {kept:.4f} with "
        f"time-of-impact splits ({timings['split_substeps']:.0f} splits, "
        f"{timings['truncated_vertex_steps']:.0f} truncated)"
    )
    assert before["truncated_vertex_steps"] > 0 and before["split_substeps"] == 0
    assert timings["split_substeps"] > 0  # the limit acted, and was split
    assert timings["truncated_vertex_steps"] == 0  # never down to the shortest step
    assert kept_before < 0.85  # measured 0.812: the limit took 19% of the energy
    assert kept > 0.95  # measured 0.961 (the explicit barrier's own error is the rest)


# Central differences' steps (relative): their own error goes as eps^2 with the impact's
# large curvature (1 m/s, speed: 5.9e-5, 5.9e-7, 2.7e-8 at 1e-5, 1e-6, 1e-7; 2 m/s: 5.3e-3,
# 5.5e-5, 6.1e-7 at 1e-6, 1e-7, 1e-8), down to rounding.
FD_EPS = {SPEED: (1e-7, 1e-6), 2.0: (1e-8, 1e-7)}


def fd_check(backend: str, speed: float = SPEED, steps: int = 40, splits: bool = True):
    """Autograd and central differences of a loss at the last frame with respect to the
    closing speed and E; both sides must take the same steps as the run itself."""
    weights = torch.randn((250, 3), generator=torch.Generator().manual_seed(0), dtype=F64)

    def run(speed, E):
        sim = two_cubes(backend, E, splits=splits)
        log = record_limits(sim.model.contact)
        state = State(sim.initial_state().positions, head_on(sim, speed))
        traj = sim.rollout(steps, state)
        return (traj.positions[-1] * weights[: sim.mesh.n_vertices]).sum(), log, sim

    values = [torch.tensor(speed, dtype=F64), torch.tensor(1e5, dtype=F64)]
    leaves = [t.clone().requires_grad_(True) for t in values]
    loss, log, sim = run(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    errors = {}
    for i, name in enumerate(("speed", "E")):
        eps = FD_EPS[speed][i] * float(values[i])
        # Each side taped as the gradient's run is, so that it takes the same path: the
        # Warp backend's differentiable launches hand every cut substep to the general
        # path, whose step limit the logs record.
        shifted = [t.clone().requires_grad_(True) for t in values]
        shifted[i] = (values[i] + eps).requires_grad_(True)
        plus, log_plus, _ = run(*shifted)
        shifted[i] = (values[i] - eps).requires_grad_(True)
        minus, log_minus, _ = run(*shifted)
        assert log_plus == log_minus == log  # both sides took the same steps
        fd = float(plus.detach() - minus.detach()) / (2 * eps)
        errors[name] = abs(float(grads[i]) - fd) / abs(fd)
        print(f"{backend} d loss/d {name}: autograd {float(grads[i]):.7e}, FD {fd:.7e}")
    fused = getattr(sim.backend, "fused_contact", None)
    return errors, sim.model.contact.timings, fused.counts if fused else {}


@pytest.mark.parametrize("backend", BOTH)
def test_gradients_through_split_substeps_match_finite_differences(backend):
    errors, timings, counts = fd_check(backend)
    print(f"{backend}: relative errors {errors}")
    if backend == "warp":  # the fused launches handed the split substeps to the general path
        assert counts["fused_substeps"] > 0 and counts["split"] > 0
    assert timings["split_substeps"] > 0 and timings["truncated_vertex_steps"] == 0
    assert errors["speed"] < 1e-6 and errors["E"] < 1e-6  # measured 1.3e-7 and 4.8e-7 (warp)


@pytest.mark.parametrize("backend", BOTH)
def test_gradients_through_truncated_shortest_steps_match_finite_differences(backend):
    """At 2 m/s the splits reach 1/64 of the substep and the limit truncates there: the
    truncation's scales are differentiated as the pair bounds that set them."""
    errors, timings, _ = fd_check(backend, 2.0)
    print(f"{backend} at 2 m/s: relative errors {errors}")
    assert timings["split_substeps"] > 0 and timings["truncated_vertex_steps"] > 0
    assert errors["speed"] < 2e-5 and errors["E"] < 2e-5  # measured 2.5e-6 and 4.9e-7 (warp)


def test_truncating_whole_substeps_has_the_gradient_of_its_bounds():
    """With no splits (the default), truncated substeps have exact gradients too (before,
    with the scales constant: 3.2 and 0.73 off, the speed's of the wrong sign)."""
    errors, timings, _ = fd_check("torch", splits=False)
    print(f"truncating: relative errors {errors}")
    assert timings["truncated_vertex_steps"] > 0 and timings["split_substeps"] == 0
    assert errors["speed"] < 1e-6 and errors["E"] < 1e-6  # measured 1.1e-8 and 5.7e-9


@pytest.mark.parametrize("backend", BOTH)
def test_a_world_that_splits_leaves_the_other_worlds_as_they_are_alone(backend):
    """World 0 meets at 1 m/s (its substeps split), world 1 at 0.3 m/s (the barrier alone
    stops it) and world 2 flies apart: each equals its world alone, forward and gradient."""
    speeds = [SPEED, 0.3, -0.5]
    E = torch.tensor([1e5, 2e5, 1e5], dtype=F64, requires_grad=True)
    sim = two_cubes(backend, E, worlds=3)
    one = two_cubes(backend)
    v0 = torch.stack([head_on(one, s) for s in speeds])
    steps = 40
    traj = sim.rollout(steps, sim.initial_state(velocities=v0))
    weights = torch.randn(traj.positions.shape[1:], generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad((traj.positions[-1] * weights.to(F64)).sum(), E)
    splits = [c.timings["split_substeps"] for c in sim.model.contact.contacts]
    print(f"{backend}: splits per world {splits}")
    assert splits[0] > 0 and splits[1] == splits[2] == 0
    single = torch.zeros_like(E)
    for w in range(3):
        one = two_cubes(backend, E[w])
        alone = one.rollout(steps, one.initial_state(velocities=v0[w]))
        assert one.model.contact.timings["split_substeps"] == splits[w]
        error = (traj.positions[:, w] - alone.positions).detach().abs().max()
        assert float(error) <= 1e-12 * float(alone.positions.detach().abs().max())
        single += torch.autograd.grad((alone.positions[-1] * weights[w].to(F64)).sum(), E)[0]
    assert float((grad - single).abs().max()) <= 1e-12 * float(single.abs().max())


@pytest.mark.parametrize("speed", [SPEED, 4.0])
def test_the_default_float32_configuration_runs_through_the_impact(speed):
    """The default backend and dtype, time of impact asked for; at 4 m/s the splits reach
    the shortest step and it is truncated, still without NaN or a surface passing another."""
    a = ds.TetMesh.box(size=(0.05, 0.05, 0.05), resolution=2, origin=(-0.06, 0.0, 0.0))
    b = ds.TetMesh.box(size=(0.05, 0.05, 0.05), resolution=2, origin=(0.01, 0.01, 0.005))
    sim = ds.Simulator(
        ds.TetMesh.merge([a, b]), ds.StableNeoHookean(1e5, 0.3, 1000.0), dt=1e-3,
        substeps=2, gravity=(0.0, 0.0, 0.0), ground=None, contact_time_of_impact=True,
    )  # fmt: skip
    assert sim.dtype == torch.float32
    v0 = head_on(sim, speed).requires_grad_(True)
    traj = sim.rollout(60, State(sim.initial_state().positions, v0))
    (traj.positions[-1][:, 0].sum()).backward()
    contact = sim.model.contact
    print(f"float32 at {speed} m/s: {dict(contact.timings)}")
    assert contact.timings["split_substeps"] > 0
    assert torch.isfinite(traj.positions).all() and torch.isfinite(traj.velocities).all()
    assert torch.isfinite(v0.grad).all()
    assert min(contact.min_distance(x) for x in traj.positions) > 0


@needs_warp
@pytest.mark.parametrize(("dtype", "speed"), [(F64, SPEED), (F64, 2.0), (torch.float32, SPEED)])
def test_the_fused_launches_split_as_the_general_path_does(dtype, speed):
    """On the CPU the Warp backend splits a cut substep inside its fused launches, forces
    recomputed at each step's start, the shortest steps truncated: the same steps (splits,
    truncated vertex-steps) and the same motion as the general path. At 2 m/s the splits
    reach the shortest step."""
    runs = []
    for fused in (True, False):
        sim = two_cubes("warp", dtype=dtype)
        if not fused:
            sim.backend.fused_contact.usable = lambda: False
        with torch.no_grad():
            traj = sim.rollout(40, sim.initial_state(velocities=head_on(sim, speed)))
        runs.append((traj, dict(sim.model.contact.timings), sim.backend.fused_contact.counts))
    (fused, timings, counts), (general, general_timings, _) = runs
    error = float((fused.positions - general.positions).abs().max())
    v_error = float((fused.velocities - general.velocities).abs().max())
    keys = ("split_substeps", "truncated_vertex_steps")
    print(
        f"{dtype} at {speed} m/s: fused {[timings[k] for k in keys]}, general "
        f"{[general_timings[k] for k in keys]}; {counts}; max |dx| {error:.2e} m, "
        f"|dv| {v_error:.2e} m/s"
    )
    assert timings["split_substeps"] > 0  # the limit acted, and the launches split
    assert counts["fused_substeps"] > 100 and counts["general_substeps"] == 0
    if dtype == F64:
        assert [timings[k] for k in keys] == [general_timings[k] for k in keys]
        assert (timings["truncated_vertex_steps"] > 0) == (speed > SPEED)
        assert error < 1e-12 and v_error < 1e-10
    else:
        assert error < 1e-6 and v_error < 1e-3


def test_time_of_impact_is_asked_for_and_checked():
    """Off by default (docs/contact.md, "Time of impact": it costs where closings are
    crushed); on, 6 levels in every world; a clear error for a non-bool or without
    contact."""
    assert two_cubes(splits=False).model.contact.split_levels == 0
    sim = two_cubes(worlds=2)
    assert [c.split_levels for c in sim.model.contact.contacts] == [6, 6]
    box = ds.TetMesh.box(size=(0.05, 0.05, 0.05), resolution=1, origin=(0.0, 0.01, 0.0))
    material = ds.StableNeoHookean(1e5, 0.3, 1000.0)
    assert ds.Simulator(box, material).model.contact.split_levels == 0
    with pytest.raises(TypeError, match="contact_time_of_impact must be True or False"):
        ds.Simulator(box, material, contact_time_of_impact=1)
    with pytest.raises(ValueError, match="needs contact=True"):
        ds.Simulator(box, material, contact=False, contact_time_of_impact=True)


@needs_warp
def test_split_steps_in_a_launch_with_two_workers_keep_the_other_workers_forces():
    """The head-on balls (2,552 tets: the tet forces shared by two CPU workers, whose rows
    are read once per set of forces): a step tried again shorter reuses all the elastic
    forces, so the fused launches take the general path's steps (the same splits and
    truncations) and motion: equal to rounding (4e-19 m at step 11), which the impact
    amplifies about tenfold a step to 1e-5 m by step 40. (Before: 3.8e-4 m apart after one
    step, the balls gaining 11% of their energy instead of 1.6%.)"""
    from tests.test_contact_physics import IMPACT_STEPS, head_on_spheres

    runs = []
    for fused in (True, False):
        sim, state = head_on_spheres(F64, 5)
        sim = sim.replace(contact_time_of_impact=True)
        if not fused:
            sim.backend.fused_contact.usable = lambda: False
        before = float(sim.energies(state)["total"])
        with torch.no_grad(), pytest.warns(ds.StabilityWarning):  # 5 m/s: the limit cuts
            traj = sim.rollout(IMPACT_STEPS, state)
        after = float(sim.energies(State(traj.positions[-1], traj.velocities[-1]))["total"])
        runs.append((traj, after / before, sim))
    (fused, kept, sim), (general, kept_general, plain) = runs
    workers = len(sim.backend.fused_contact._team(F64).bounds)
    error = float((fused.positions[:20] - general.positions[:20]).abs().max())
    print(f"{workers} workers; energy kept {kept:.4f} fused, {kept_general:.4f} general; "
          f"max |dx| {error:.2e} m; {sim.backend.fused_contact.counts}")  # fmt: skip
    keys = ("split_substeps", "truncated_vertex_steps")
    steps = [[s.model.contact.timings[k] for k in keys] for s in (sim, plain)]
    assert steps[0] == steps[1] and steps[0][0] > 0
    assert sim.backend.fused_contact.counts["fused_substeps"] > 300
    assert workers == 2 or sim.backend.launcher is None or sim.backend.launcher.threads < 2
    assert error < 1e-12  # the first 20 steps, through the start of the impact
    assert abs(kept - kept_general) < 1e-3 and 0.95 < kept < 1.05
