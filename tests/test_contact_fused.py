"""Where surface contact acts, the CPU Warp backend takes many substeps per launch
(diffsim.backends.warp.contact_steps, diffsim.kernels.contact_advance): the motion of the
general substep-by-substep path, with every mechanism acting (barrier, surface friction,
ground, prescribed vertices, the step limit's fallbacks, new candidate sets)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import diffsim as ds
from diffsim.backends.warp import contact_steps
from tests.helpers import asset, stacked_tori, tumbling_cubes


def dragged_blocks(dtype: torch.dtype) -> tuple[ds.Simulator, torch.Tensor]:
    """A block lying on the ground with a smaller one dropped on it; after 20 steps the
    lower block is dragged along x and z by its left face (prescribed vertices), over
    the ground (ground friction), carrying the upper one (surface friction)."""
    top = ds.TetMesh.box(size=(0.04, 0.02, 0.04), resolution=2, origin=(-0.02, 0.022, -0.02))
    bottom = ds.TetMesh.box(size=(0.08, 0.02, 0.08), resolution=2, origin=(-0.04, 0.0002, -0.04))
    mesh = ds.TetMesh.merge([top, bottom])
    x = torch.as_tensor(mesh.vertices[:, 0])
    fixed = torch.nonzero(x < -0.0399).flatten()
    material = ds.StableNeoHookean(youngs_modulus=3e4, poissons_ratio=0.3, density=1000.0)
    sim = ds.Simulator(
        mesh, material, dt=2e-3, substeps=6, ground=0.0, dtype=dtype, fixed=fixed,
        contact=True, contact_friction=0.8, friction=0.3,
    )  # fmt: skip
    steps = 60
    start = torch.as_tensor(mesh.vertices[fixed.numpy()], dtype=torch.float64)
    t = torch.arange(1, steps + 1, dtype=torch.float64)[:, None, None] * sim.model.dt
    drag = torch.tensor([0.3, 0.0, -0.2], dtype=torch.float64)  # m/s
    path = start + drag * torch.clamp(t - 20 * sim.model.dt, min=0.0)
    return sim, path


def general(sim: ds.Simulator) -> ds.Simulator:
    """The same simulator with the fused contact substeps turned off."""
    plain = sim.replace()
    plain.backend.fused_contact.usable = lambda: False
    return plain


def limited_runs(sim: ds.Simulator, state, steps: int) -> tuple:
    """The fused and the general path from ``state`` where the step limit cuts (each warns):
    ``(fused, reference, the fused path's counts, the general simulator, max |dx| (m))``."""
    with pytest.warns(ds.StabilityWarning):  # the impact is faster than the barrier stops
        fused = sim.rollout(steps, state)
    counts = dict(sim.backend.fused_contact.counts)
    plain = general(sim)
    with pytest.warns(ds.StabilityWarning):
        reference = plain.rollout(steps, state)
    error = float((fused.positions - reference.positions).abs().max())
    print(f"{counts}; cut {sim.contact_steps_cut}; max |x_fused - x_general| {error:.2e} m")
    return fused, reference, counts, plain, error


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_contact_substeps_give_the_motion_of_the_general_path(dtype):
    sim, path = dragged_blocks(dtype)
    fused = sim.rollout(len(path), fixed_positions=path)
    counts = dict(sim.backend.fused_contact.counts)
    plain = general(sim)
    reference = plain.rollout(len(path), fixed_positions=path)
    n_top = 27  # the upper block's vertices come first
    moved = float((reference.positions[-1] - reference.positions[0]).abs().max())
    error = float((fused.positions - reference.positions).abs().max())
    v_error = float((fused.velocities - reference.velocities).abs().max())
    carried = reference.positions[-1, :n_top].mean(0) - reference.positions[20, :n_top].mean(0)
    print(f"{dtype}: {counts}; max |x_fused - x_general| {error:.2e} m, |v| {v_error:.2e} m/s, "
          f"motion {moved:.2e} m, upper block carried {(1e3 * carried).tolist()} mm")  # fmt: skip
    in_contact = sim.backend.contact_free.counts["contact_steps"] * sim.model.substeps
    assert counts["fused_substeps"] > 0.8 * in_contact > 0  # the fused path ran
    assert counts["beyond_reach"] > 0  # new candidate sets were built for steps, and went on
    assert plain.backend.fused_contact.counts["fused_substeps"] == 0
    assert sim.model.contact.active_pairs(fused.positions[-1]).n_pairs > 0  # in contact
    assert float(fused.positions[:, n_top:, 1].min()) < sim.model.ground.dhat  # on the ground
    # Surface friction carried the upper block along x and z (the drag moved 24 and 16 mm).
    assert float(carried[0]) > 2e-3 and float(carried[2]) < -2e-3
    assert torch.equal(fused.positions[-1, sim.model.fixed_indices], path[-1])  # prescribed
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    assert error < tolerance * max(moved, 1.0) * 100
    assert not sim.inversions and not plain.inversions


def test_limited_steps_are_truncated_in_the_launch_as_on_the_general_path():
    """Two cubes meeting at 6 m/s: the continuous collision check limits vertices in many
    substeps; the fused launches truncate them as the general path does (pass 1, the
    verification rounds), the same vertex-steps, the same motion."""
    a = ds.TetMesh.box(size=(0.05, 0.05, 0.05), resolution=2, origin=(-0.06, 0.1, 0))
    b = ds.TetMesh.box(size=(0.05, 0.05, 0.05), resolution=2, origin=(0.01, 0.11, 0.01))
    material = ds.StableNeoHookean(youngs_modulus=2e5, poissons_ratio=0.3, density=1000.0)
    sim = ds.Simulator(
        ds.TetMesh.merge([a, b]), material, dt=2e-3, substeps=8, gravity=(0, 0, 0),
        dtype=torch.float64, contact=True,
    )  # fmt: skip
    v = torch.zeros((sim.mesh.n_vertices, 3), dtype=torch.float64)
    half = sim.mesh.n_vertices // 2
    v[:half, 0], v[half:, 0] = 3.0, -3.0
    state = sim.initial_state(velocities=v)
    _, _, counts, plain, error = limited_runs(sim, state, 12)
    # Nearly all in the launches (a truncated step leaving the candidates' reach goes to
    # the general path, which builds a set for it).
    assert counts["limited_vertex_steps"] > 0.9 * sim.contact_steps_cut > 0
    assert counts["general_substeps"] < 0.1 * counts["fused_substeps"]
    assert sim.contact_steps_cut == plain.contact_steps_cut
    assert error < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_substep_does_not_depend_on_the_candidate_set_earlier_calls_left(dtype):
    """Two cubes meeting head-on at 2 m/s with friction (the scene benchmarks/check_cuda.py
    compares on a GPU), one substep per step: every step from a state of the torch
    reference's rollout, once by a simulator that took the earlier ones (its candidate set
    built at an older anchor) and once by a fresh one, on the fused path the CPU takes.
    The step limit acts here. The cubes' edges are parallel up to rounding: their distances
    at an older anchor were once overestimated (1.5 mm measured 3.8 mm), the step limit
    skipped that pair, and the step after 108 went 4.8e-5 m beyond the reference (float32:
    6.9e-8 m; now 1.5e-9, its rounding)."""
    a = ds.TetMesh.box(size=(0.05,) * 3, resolution=2, origin=(-0.075, 0.1, 0.0))
    b = ds.TetMesh.box(size=(0.05,) * 3, resolution=2, origin=(0.025, 0.11, 0.01))
    material = ds.StableNeoHookean(youngs_modulus=2e5, poissons_ratio=0.3, density=1000.0)

    def cubes(backend: str) -> ds.Simulator:
        return ds.Simulator(
            ds.TetMesh.merge([a, b]), material, dt=2.5e-4, substeps=1, gravity=(0, 0, 0),
            backend=backend, dtype=dtype, contact=True, contact_friction=0.3,
        )  # fmt: skip

    reference = cubes("torch")
    v = torch.zeros((reference.mesh.n_vertices, 3), dtype=dtype)
    half = reference.mesh.n_vertices // 2
    v[:half, 0], v[half:, 0] = 1.0, -1.0
    with torch.no_grad():
        frames = reference.rollout(130, reference.initial_state(velocities=v))
    states = [ds.State(x, u) for x, u in zip(frames.positions, frames.velocities, strict=True)]
    one = cubes("torch")
    along = cubes("warp")
    worst = worst_fresh = 0.0
    kept = 0  # steps that ran on a set built at an earlier state
    with torch.no_grad():
        for k, state in enumerate(states[:-1]):
            want = one.step(state).positions
            worst = max(worst, float((along.step(state).positions - want).abs().max()))
            contact = along.model.contact
            kept += not torch.equal(contact._anchor, contact.local(state.positions))
            if 100 <= k < 120:  # where the step limit acts (fresh simulators cost more)
                fresh = cubes("warp").step(state).positions
                worst_fresh = max(worst_fresh, float((fresh - want).abs().max()))
    print(f"largest gap to the reference: {worst:.3g} m along ({kept} steps on an older set), "
          f"{worst_fresh:.3g} m fresh")  # fmt: skip
    assert along.contact_steps_cut > 0 and along.backend.fused_contact.counts["fused_substeps"]
    assert kept > len(states) / 2
    tolerance = 1e-12 if dtype == torch.float64 else 1e-8
    assert worst < tolerance and worst_fresh < tolerance


def test_the_step_limit_measures_only_the_pairs_a_step_can_limit():
    """A small cube thrown at 4 m/s against a block resting on another, on the ground: the
    step limit's rows by the anchor distances (any pair within 4 times the fastest relative
    step) include the resting interface; the launches measure only the pairs whose own
    vertices' steps could limit them, with the general path's scales: the same cut
    vertex-steps and the same motion, bit for bit (the Armadillo on its crease: 5.6 times
    fewer pairs measured, 2 times less launch time at frame 250)."""
    top = ds.TetMesh.box(size=(0.04, 0.02, 0.04), resolution=2, origin=(-0.02, 0.0212, -0.02))
    bottom = ds.TetMesh.box(size=(0.08, 0.02, 0.08), resolution=3, origin=(-0.04, 0.0002, -0.04))
    thrown = ds.TetMesh.box(size=(0.01, 0.01, 0.01), resolution=1, origin=(-0.045, 0.026, -0.005))
    mesh = ds.TetMesh.merge([top, bottom, thrown])
    material = ds.StableNeoHookean(youngs_modulus=3e4, poissons_ratio=0.3, density=1000.0)
    sim = ds.Simulator(
        mesh, material, dt=1e-3, substeps=4, ground=0.0, dtype=torch.float64, contact=True
    )
    v = torch.zeros((mesh.n_vertices, 3), dtype=torch.float64)
    on_thrown = torch.as_tensor(mesh.body_ids == 2)
    v[on_thrown, 0] = 4.0
    state = sim.initial_state(velocities=v)
    fused, _, counts, plain, error = limited_runs(sim, state, 30)
    assert float(fused.positions[-1, on_thrown, 0].mean()) < -0.05  # it hit and bounced back
    assert counts["fused_substeps"] > 100 and sim.contact_steps_cut > 0  # the limit cut
    assert counts["ccd_rows"] < 0.75 * counts["ccd_candidates"]  # fewer pairs measured
    assert sim.contact_steps_cut == plain.contact_steps_cut
    assert error < 1e-12


def test_near_rows_hold_every_pair_within_dhat_as_a_cube_slides_and_tumbles(monkeypatch):
    """A cube thrown sliding and tumbling over another (friction on), the near subset
    acting on a set of any size: fused launches run on subsets, and their motion is the
    general path's (a pair within dhat outside the rows would miss its barrier force and
    friction)."""
    from diffsim.contact import surface_contact

    monkeypatch.setattr(surface_contact, "NEAR_MIN_PAIRS", 0)
    launches = {"all": 0, "subsets": 0}
    select = surface_contact.SurfaceContact.fused_sets

    def counted(self, x, step=0.0):
        sets = select(self, x, step)
        launches["all"] += 1
        launches["subsets"] += int(len(sets.rows) < sets.arrays.n)
        return sets

    monkeypatch.setattr(surface_contact.SurfaceContact, "fused_sets", counted)
    sim, state = tumbling_cubes(torch.float64)
    fused = sim.rollout(40, state)
    counts = dict(sim.backend.fused_contact.counts)
    plain = general(sim)
    reference = plain.rollout(40, state)
    error = float((fused.positions - reference.positions).abs().max())
    print(f"{counts}, {launches}; max |x_fused - x_general| {error:.2e} m")
    assert launches["subsets"] > 0 and counts["fused_substeps"] > 100  # the subsets acted
    assert float(reference.positions[-1, sim.mesh.n_vertices // 2 :, 0].mean()) > 0.03  # slid
    assert error < 1e-12


@pytest.mark.filterwarnings("ignore::diffsim.StabilityWarning")
def test_a_blow_up_in_contact_is_raised_as_on_the_general_path():
    """The lower block, dragged, carries the upper one; the material is then made 100
    times stiffer at the same substep, and the step limit sees a blow-up: the fused path
    hands the capped substeps to the general path, which raises it at the same step."""
    sim, path = dragged_blocks(torch.float32)
    state = sim.rollout(25, fixed_positions=path[:25]).state(-1)
    messages = []
    for fused in (True, False):
        stiff = ds.Simulator(
            sim.mesh, ds.StableNeoHookean(youngs_modulus=3e6, poissons_ratio=0.3, density=1000.0),
            dt=2e-3, substeps=6, ground=0.0, fixed=sim.model.fixed_indices, contact=True,
            contact_friction=0.8, friction=0.3, dtype=torch.float32,
        )  # fmt: skip
        if not fused:
            stiff.backend.fused_contact.usable = lambda: False
        with pytest.raises(ds.SimulationError, match="blew up") as raised:
            stiff.rollout(30, state, fixed_positions=path[25:55])
        messages.append(str(raised.value).split(":")[0])
        if fused:
            assert stiff.backend.fused_contact.counts["capped"] > 0
    assert messages[0] == messages[1]


def _gradients(sim: ds.Simulator, state, path: torch.Tensor) -> tuple[float, dict]:
    """A loss on the last positions and an earlier velocity frame, and its gradients with
    respect to the initial velocities, the prescribed positions and every parameter."""
    dtype = sim.dtype
    v0 = state.velocities.clone().requires_grad_(True)
    targets = path.clone().requires_grad_(True)
    params = {
        name: torch.as_tensor(value, dtype=dtype).clone().requires_grad_(True)
        for name, value in sim.parameters().items()
    }
    traj = sim.rollout(
        len(path), ds.State(state.positions, v0), fixed_positions=targets, params=params
    )
    weights = torch.linspace(0.0, 1.0, sim.mesh.n_vertices, dtype=torch.float64)
    loss = (traj.positions[-1][:, 0] * weights).sum() + traj.velocities[-3][:, 1].sum()
    loss.backward()
    grads = {"velocities": v0.grad, "fixed_positions": targets.grad}
    grads.update({name: p.grad for name, p in params.items()})
    return float(loss), grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_contact_gradients_are_those_of_the_general_path(dtype):
    """The dragged blocks, from a state in contact: the gradients through the fused
    launches' adjoint (barrier, both frictions, ground, prescribed vertices, every
    parameter) are the general path's, to rounding."""
    sim, path = dragged_blocks(dtype)
    state = sim.rollout(15, fixed_positions=path[:15]).state(-1)
    before = dict(sim.backend.fused_contact.counts)
    loss, grads = _gradients(sim, state, path[15:45])
    counts = {k: v - before[k] for k, v in sim.backend.fused_contact.counts.items()}
    plain = general(sim)
    plain_loss, plain_grads = _gradients(plain, state, path[15:45])
    errors = {
        name: float((g - plain_grads[name]).abs().max() / plain_grads[name].abs().max())
        for name, g in grads.items()
    }
    print(f"{dtype}: {counts}; loss {loss:.12e} / {plain_loss:.12e}; relative errors", errors)
    assert counts["fused_substeps"] > 0.8 * 30 * sim.model.substeps  # the fused path ran
    assert sim.model.contact.active_pairs(state.positions).n_pairs > 0  # in contact
    tolerance = 1e-10 if dtype == torch.float64 else 1e-3
    assert max(errors.values()) < tolerance


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_contact_gradients_through_limited_steps_are_those_of_the_general_path(dtype):
    """Two cubes meeting at 2 m/s, the step limit cutting substeps: a differentiable
    launch truncates them itself (its adjoint takes the gradient of the pair bound each
    limited vertex's scale came from) and hands none to the general path; the gradients
    are the general path's (whose scales carry the same bounds' gradients)."""
    a = ds.TetMesh.box(size=(0.05, 0.05, 0.05), resolution=2, origin=(-0.052, 0.1, 0))
    b = ds.TetMesh.box(size=(0.05, 0.05, 0.05), resolution=2, origin=(0.002, 0.105, 0.01))
    material = ds.StableNeoHookean(youngs_modulus=2e4, poissons_ratio=0.3, density=1000.0)
    sim = ds.Simulator(
        ds.TetMesh.merge([a, b]), material, dt=2e-3, substeps=4, gravity=(0, -9.8, 0),
        dtype=dtype, contact=True, contact_friction=0.5,
    )  # fmt: skip
    n = sim.mesh.n_vertices
    v = torch.zeros((n, 3), dtype=dtype)
    v[: n // 2, 0], v[n // 2 :, 0] = 0.3, -0.3
    results = []
    for fused in (True, False):
        s = sim.replace()
        if not fused:
            s.backend.fused_contact.usable = lambda: False
        v0 = v.clone().requires_grad_(True)
        with pytest.warns(ds.StabilityWarning):
            traj = s.rollout(8, s.initial_state(velocities=v0))
        (traj.positions[-1][:, 0].square().sum() + traj.velocities[-1].sum()).backward()
        results.append((v0.grad, dict(s.backend.fused_contact.counts), s.contact_steps_cut))
    (fused_grad, counts, cut), (plain_grad, _, plain_cut) = results
    error = float((fused_grad - plain_grad).abs().max() / plain_grad.abs().max())
    print(f"{dtype}: {counts}; cut {cut}; relative error {error:.2e}")
    assert counts["limited_vertex_steps"] == cut == plain_cut > 0  # the limit acted, fused
    assert counts["limited"] == 0 and counts["general_substeps"] == 0
    assert error < (1e-10 if dtype == torch.float64 else 1e-3)


def test_gradients_through_near_rows_selected_within_the_launches(monkeypatch):
    """The tumbling cube, the near subset acting on a set of any size: differentiable
    launches select near rows again inside and keep each set for the adjoint; the
    gradients are the general path's."""
    from diffsim.contact import surface_contact

    monkeypatch.setattr(surface_contact, "NEAR_MIN_PAIRS", 0)
    sim, state = tumbling_cubes(torch.float64)
    with torch.no_grad():
        state = sim.rollout(6, state).state(-1)  # sliding over the lower cube
    results = []
    for fused in (True, False):
        s = sim.replace()
        if not fused:
            s.backend.fused_contact.usable = lambda: False
        v0 = state.velocities.clone().requires_grad_(True)
        traj = s.rollout(10, ds.State(state.positions, v0))
        (traj.positions[-1][:, 0].square().sum() + traj.velocities[-2].sum()).backward()
        results.append((v0.grad, dict(s.backend.fused_contact.counts)))
    (fused_grad, counts), (plain_grad, _) = results
    error = float((fused_grad - plain_grad).abs().max() / plain_grad.abs().max())
    print(f"{counts}; relative error {error:.2e}")
    assert counts["near_selections"] > 0 and counts["fused_substeps"] > 20
    assert error < 1e-10


def test_a_real_mesh_in_the_default_configuration_takes_the_fused_path():
    """Two tori of ../shared/assets/torus.msh, float32, ground on, default contact (dhat,
    stiffness, substeps) with friction: one lies on the ground, the other is thrown down
    onto it at 4 m/s. The fused launches carry the impact (the step limit cutting steps, as
    the default does at this speed) and the resting contact, with the general path's
    motion."""
    mesh = stacked_tori()
    material = ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.3, density=1000.0)
    sim = ds.Simulator(
        mesh, material, dt=2e-3, substeps="auto", ground=0.0, contact_friction=0.5
    )  # fmt: skip
    assert sim.dtype == torch.float32
    thrown = torch.zeros((mesh.n_vertices, 3))
    thrown[torch.as_tensor(mesh.body_ids == 1), 1] = -4.0
    start = sim.initial_state(velocities=thrown)
    with pytest.warns(ds.StabilityWarning):
        fused = sim.rollout(60, start)
    counts = dict(sim.backend.fused_contact.counts)
    plain = general(sim)
    with pytest.warns(ds.StabilityWarning):
        reference = plain.rollout(60, start)
    error = float((fused.positions - reference.positions).abs().max())
    print(f"{counts}; cut {sim.contact_steps_cut}; max |x_fused - x_general| {error:.2e} m")
    assert counts["fused_substeps"] > 1000 and counts["limited_vertex_steps"] > 0
    # A truncated step that leaves the candidate set's reach is held back with the offset
    # the caller measures the same way: it builds a set and launches again, never handing
    # the substep to the general path (with a bound of its own, 152 substeps went there).
    assert counts["general_substeps"] == 0
    assert sim.contact_steps_cut == plain.contact_steps_cut
    closest = min(sim.model.contact.min_distance(x) for x in fused.positions)
    assert closest < sim.model.contact.dhat  # the tori collided
    assert float(fused.positions[:, :, 1].min()) < sim.model.ground.dhat  # on the ground
    assert error < 1e-6


def test_a_spinning_body_keeps_its_candidate_set_until_a_vertex_leaves_its_reach():
    """A torus of ../shared/assets/torus.msh spinning about its axis at 5 rad/s (float32,
    no ground, zero gravity), every substep in the fused launches. A rotation by theta moves
    a vertex at radius r by 2 r sin(theta / 2) relative to the centre, but moves none to a
    corner of the displacements' bounding box, whose half-diagonal is sqrt(2) times that:
    the candidate set, valid while no vertex has moved its reach R relative to the common
    motion, must last a turn of 2 asin(R / 2 r) (measured: 37 sets in 0.6 rad against 36.3
    expected; with the half-diagonal as the measure, 52)."""
    torus = ds.TetMesh.load(asset("torus.msh")).centered().scaled_to(0.2)
    rest = torch.as_tensor(torus.vertices, dtype=torch.float64)
    axis = int(torch.argmin(rest.amax(0) - rest.amin(0)))
    material = ds.StableNeoHookean(youngs_modulus=1e6, poissons_ratio=0.3, density=1000.0)
    sim = ds.Simulator(
        torus, material, dt=2e-3, substeps="auto", ground=None, gravity=(0.0, 0.0, 0.0)
    )
    assert sim.dtype == torch.float32 and sim.model.contact is not None
    spin = torch.zeros(3, dtype=torch.float64)
    spin[axis] = 5.0
    velocities = torch.linalg.cross(spin.expand_as(rest), rest).to(sim.dtype)
    b = sim.backend

    def fused_only(prepared, x, v, targets, out=None):  # no contact-free blocks
        xs, vs = b.fused_contact.advance(prepared, x, v, targets)
        out[0].copy_(xs)
        out[1].copy_(vs)
        return out

    b.contact_free.advance = fused_only
    steps = 60
    sim.rollout(steps, sim.initial_state(velocities=velocities))
    contact, counts = sim.model.contact, b.fused_contact.counts
    radius = float(rest[:, [i for i in range(3) if i != axis]].norm(dim=1).max())
    turn = 5.0 * steps * sim.model.dt
    expected = turn / (2.0 * math.asin(contact._reach / (2.0 * radius)))
    sets = contact.timings["searches"]
    print(f"{sets:.0f} candidate sets in {turn:.2f} rad, {expected:.1f} expected; {counts}")
    assert counts["fused_substeps"] == steps * sim.model.substeps
    assert counts["general_substeps"] == 0
    assert 10 < expected <= sets <= 1.05 * expected + 2


@pytest.mark.parametrize(
    "dtype, threads", [(torch.float64, 2), (torch.float32, 2), (torch.float64, 3)]
)
def test_workers_share_a_launch_s_tets_with_the_motion_and_gradients_of_one(
    dtype, threads, monkeypatch
):
    """A mesh of more than a few hundred tets runs its fused launches on the backend's CPU
    threads: the main one takes everything but the others' shares of the tet forces
    (forward) and of their vector-Jacobian products (backward). Two 10 cm cubes of 6,144
    tets, one sliding and tumbling over the other (friction, fixed bottom): the same motion
    and gradients (initial velocities, prescribed positions, every parameter) on two
    threads (and three, as a machine with more cores runs them) as on one, to the rounding
    of the split sums (the tets shuffled, so that every thread adds into most vertices)."""
    from diffsim.backends.warp import contact_steps

    monkeypatch.setenv("DIFFSIM_WARP_THREADS", str(threads))

    lower = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=8)
    # Turned a little: with the cubes' grids aligned, vertices slide along the feature
    # boundaries of the faces below and edges stay parallel, where the barrier's Hessian
    # jumps (the distance is C1 there, as in the IPC Toolkit), so float32's rounding of the
    # split sums (1e-8 m) changed which side a pair was on and the gradients by 0.4%.
    c, s = math.cos(0.05), math.sin(0.05)
    turn = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    upper = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=8, origin=(-0.05, 0.0, -0.05))
    upper = upper.transformed(rotation=turn, translation=(0.05, 0.103, 0.05))
    merged = ds.TetMesh.merge([lower, upper])
    order = torch.randperm(merged.n_tets, generator=torch.Generator().manual_seed(0)).numpy()
    mesh = ds.TetMesh(merged.vertices, merged.tets[order])
    material = ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.3, density=1000.0)
    fixed = mesh.vertices[:, 1] < 1e-6
    v = torch.zeros((mesh.n_vertices, 3), dtype=dtype)
    v[mesh.n_vertices // 2 :] = torch.tensor([1.0, -0.3, 0.4], dtype=dtype)
    steps = 12
    runs = []
    for per_worker in (10**9, contact_steps.MIN_TETS_PER_CONTACT_WORKER):
        monkeypatch.setattr(contact_steps, "MIN_TETS_PER_CONTACT_WORKER", per_worker)
        sim = ds.Simulator(
            mesh, material, dt=2e-3, substeps=4, fixed=fixed, ground=None,
            contact_friction=0.3, dtype=dtype,
        )  # fmt: skip
        state = sim.rollout(3, sim.initial_state(velocities=v)).state(-1)
        path = state.positions[sim.model.fixed_indices].expand(steps, -1, -1)
        with torch.no_grad():
            motion = sim.rollout(steps, state).positions
        loss, grads = _gradients(sim, state, path.to(torch.float64))
        workers = len(sim.backend.fused_contact._team(dtype).bounds)
        counts = dict(sim.backend.fused_contact.counts)
        runs.append((workers, motion, grads, counts))
        assert sim.model.contact.active_pairs(motion[-1]).n_pairs > 0  # in contact
    (one, x_one, g_one, counts), (many, x_two, g_two, _) = runs
    moved = float((x_two - x_one).abs().max())
    errors = {
        name: float((g - g_one[name]).abs().max() / g_one[name].abs().max())
        for name, g in g_two.items()
    }
    print(f"{mesh.n_tets} tets, {dtype}: {counts}; |x_2 - x_1| {moved:.1e} m; gradients", errors)
    assert (one, many) == (1, threads)
    assert counts["fused_substeps"] > 0.8 * (steps + 3) * 4 * 2  # fused, forward and backward
    assert moved < (1e-12 if dtype == torch.float64 else 1e-5)
    assert max(errors.values()) < (1e-10 if dtype == torch.float64 else 1e-4)


def test_a_contact_worker_that_never_arrives_raises_instead_of_hanging(monkeypatch):
    """The fused contact launch's barrier gives up after SPIN_LIMIT spins when its other
    worker never starts, and the rollout raises with the way out."""
    from diffsim.backends.warp import contact_steps
    from diffsim.contact import warp_broad_phase

    class OnlyFirst:
        threads = 2

        def run(self, first, *others):
            first()

    monkeypatch.setattr(contact_steps, "SPIN_LIMIT", 10_000)
    monkeypatch.setattr(contact_steps, "MIN_TETS_PER_CONTACT_WORKER", 100)
    # The launcher's only other users, the broad phase's parts, stay on one thread.
    monkeypatch.setattr(warp_broad_phase, "SPLIT_ELEMENTS", 10**9)
    monkeypatch.setattr(warp_broad_phase, "SPLIT_VERTEX_FRAMES", 10**9)
    sim, state = tumbling_cubes(torch.float64)
    sim.backend.launcher = sim.model.contact.launcher = OnlyFirst()
    with pytest.raises(RuntimeError, match="DIFFSIM_WARP_THREADS=1"):
        sim.rollout(10, state)
    assert len(sim.backend.fused_contact._team(torch.float64).bounds) == 2


@pytest.mark.parametrize("cuts_per_vertex", [None, 1])
def test_gradients_through_an_impact_the_limit_cuts_agree_with_finite_differences(
    cuts_per_vertex, monkeypatch
):
    """Two boxes thrown together at 6 m/s (float64, the default substep, no contact_speed):
    the step limit cuts hundreds of vertex-steps, all inside the fused launches; the
    gradient with respect to the initial velocities agrees with central differences along
    a random direction (also where the launches' records of truncated vertices fill up and
    the next launch goes on). The velocities carry a little noise: boxes moving as rigid
    translates of the same grid give many pairs exactly the same bound, where the rollout
    has a kink (on the 10 cm boxes of resolution 3, one-sided slopes 10% apart) and no
    derivative to check."""
    boxes = [
        ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=2, origin=origin)
        for origin in ((-0.11, 0.0, 0.0), (0.01, 0.03, 0.02))
    ]
    mesh = ds.TetMesh.merge(boxes)
    material = ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.3, density=1000.0)
    sim = ds.Simulator(
        mesh, material, dt=1e-3, substeps=4, gravity=(0.0, 0.0, 0.0), ground=None,
        dtype=torch.float64,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    v = torch.zeros((mesh.n_vertices, 3), dtype=torch.float64)
    v[:, 0] = torch.where(torch.as_tensor(mesh.body_ids == 0), 3.0, -3.0)
    v += 0.05 * torch.randn(v.shape, generator=generator, dtype=torch.float64)
    weights = torch.linspace(0.0, 1.0, mesh.n_vertices, dtype=torch.float64)
    direction = torch.randn(v.shape, generator=generator, dtype=torch.float64)
    if cuts_per_vertex is not None:
        monkeypatch.setattr(contact_steps, "CUTS_PER_VERTEX", cuts_per_vertex)

    def loss(v0: torch.Tensor) -> torch.Tensor:
        traj = sim.rollout(10, sim.initial_state(velocities=v0))
        return (traj.positions[-1][:, 0] * weights).sum() + traj.velocities[-1][:, 1].sum()

    v0 = v.clone().requires_grad_(True)
    with pytest.warns(ds.StabilityWarning):
        loss(v0).backward()
    counts = dict(sim.backend.fused_contact.counts)
    cut = sim.contact_steps_cut
    gradient = float((v0.grad * direction).sum())
    eps = 1e-7
    with torch.no_grad():
        fd = float((loss(v + eps * direction) - loss(v - eps * direction)) / (2 * eps))
    error = abs(gradient - fd) / abs(fd)
    print(f"{counts}; cut {cut}; gradient {gradient:.10f}, central difference {fd:.10f}, "
          f"relative error {error:.2e}")  # fmt: skip
    assert cut > 100 and counts["limited"] == 0 and counts["general_substeps"] == 0
    assert (counts["records_full"] > 0) == (cuts_per_vertex is not None)
    assert error < 1e-6


def test_gradients_through_a_real_mesh_impact_in_the_default_configuration():
    """A torus (../shared/assets/torus.msh) thrown at 4 m/s onto another lying on the
    ground, friction on, the default dhat and substeps: the step limit cuts 1,668
    vertex-steps, all in the fused launches. d loss / d ln E (float32, the default, and
    float64) agrees with central differences of float64 rollouts."""
    mesh = stacked_tori()
    weights = torch.randn(
        (mesh.n_vertices, 3), generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    thrown = torch.zeros((mesh.n_vertices, 3), dtype=torch.float64)
    thrown[torch.as_tensor(mesh.body_ids == 1), 1] = -4.0

    def run(E: torch.Tensor) -> tuple[torch.Tensor, ds.Simulator]:
        sim = ds.Simulator(
            mesh, ds.StableNeoHookean(E, 0.3, 1000.0), dt=2e-3, substeps=26, ground=0.0,
            contact_friction=0.5, dtype=E.dtype,
        )  # fmt: skip
        traj = sim.rollout(25, sim.initial_state(velocities=thrown.to(E.dtype)))
        return (traj.positions[-1] * weights).sum(), sim

    gradients = {}
    for dtype in (torch.float32, torch.float64):
        E = torch.tensor(1e5, dtype=dtype, requires_grad=True)
        with pytest.warns(ds.StabilityWarning):
            loss, sim = run(E)
        loss.backward()
        gradients[dtype] = 1e5 * float(E.grad)
        counts = sim.backend.fused_contact.counts
        assert sim.contact_steps_cut > 1000 and counts["general_substeps"] == 0
    eps = 1e-6
    with torch.no_grad(), pytest.warns(ds.StabilityWarning):
        up, _ = run(torch.tensor(1e5 * (1 + eps), dtype=torch.float64))
        down, _ = run(torch.tensor(1e5 * (1 - eps), dtype=torch.float64))
    fd = float((up - down) / (2 * eps))
    errors = {str(dtype): abs(g - fd) / abs(fd) for dtype, g in gradients.items()}
    print(f"d loss / d ln E {gradients}, central difference {fd:.8f}; relative errors {errors}")
    assert errors["torch.float64"] < 1e-4 and errors["torch.float32"] < 2e-3
