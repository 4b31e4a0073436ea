"""With contact on, the CPU Warp backend runs fused steps wherever contact does not act
(diffsim.backends.warp.contact_free): the same motion and gradients as substep-by-substep
contact, and the fused path really taken where nothing is near anything."""

from __future__ import annotations

import pytest
import torch

import diffsim as ds
from diffsim.backends.warp.contact_free import MAX_PREDICTION_BACKOFF
from diffsim.sim.state import State


def two_cubes(speed: float, dtype=torch.float64, gap: float = 0.05) -> ds.Simulator:
    """Two cubes (5 cm) flying at each other along x, ``gap`` apart, no gravity."""
    a = ds.TetMesh.box(size=(0.05, 0.05, 0.05), resolution=2, origin=(-0.05 - gap / 2, 0.1, 0))
    b = ds.TetMesh.box(size=(0.05, 0.05, 0.05), resolution=2, origin=(gap / 2, 0.12, 0.01))
    material = ds.StableNeoHookean(youngs_modulus=2e5, poissons_ratio=0.3, density=1000.0)
    return ds.Simulator(
        ds.TetMesh.merge([a, b]), material, dt=2e-3, substeps=8, gravity=(0, 0, 0),
        dtype=dtype, contact=True, contact_friction=0.3,
    )  # fmt: skip


def approaching(sim: ds.Simulator, speed: float) -> State:
    v = torch.zeros((sim.mesh.n_vertices, 3), dtype=sim.dtype)
    half = sim.mesh.n_vertices // 2
    v[:half, 0], v[half:, 0] = speed / 2, -speed / 2
    return sim.initial_state(velocities=v)


def substep_by_substep(sim: ds.Simulator) -> ds.Simulator:
    """The same simulator with the fused contact-free blocks turned off."""
    plain = sim.replace()
    plain.backend.contact_free.block = 0  # never tried: every step with contact
    plain.backend.contact_free._looks_clear = lambda *args: False
    return plain


def as_on_cuda(sim: ds.Simulator) -> None:
    """The CUDA path's blocks on the CPU: contact-free substeps launched one by one, and
    contact substeps by the per-stage kernels (no fused contact launches)."""
    sim.backend.contact_free.per_substep = True
    sim.backend.fused_contact.usable = lambda: False


@pytest.mark.parametrize("speed,per_substep", [(0.5, False), (2.0, True)])
def test_fused_blocks_give_the_motion_of_contact_substeps(speed, per_substep):
    """per_substep: the CUDA path's contact-free blocks (one kernel launch per substep).
    Where contact substeps run fused (CPU), a block is tried only where it can pay for its
    checks (2 x SUBSTEPS_PER_CHECK substeps, 8 steps here), which the prediction clears
    only for slow relative motion: 0.5 m/s."""
    sim = two_cubes(speed)
    if per_substep:
        as_on_cuda(sim)
    steps = int(0.05 / speed / sim.model.dt) + 25  # they meet, and press for 25 steps
    fused = sim.rollout(steps, approaching(sim, speed))
    counts = sim.backend.contact_free.counts
    plain = substep_by_substep(sim)
    reference = plain.rollout(steps, approaching(plain, speed))
    error = float((fused.positions - reference.positions).abs().max())
    print(f"speed {speed} m/s: {counts}, max |x_fused - x_contact| = {error:.2e} m")
    assert counts["fused_steps"] > 0 and counts["contact_steps"] > 0  # both paths acted
    assert plain.backend.contact_free.counts["fused_steps"] == 0
    # They met: the cubes were pushed back (the barrier acted).
    assert float(reference.velocities[-1][: sim.mesh.n_vertices // 2, 0].mean()) < speed / 2 * 0.9
    assert error < 1e-10


@pytest.mark.parametrize("per_substep", [False, True])
def test_fused_blocks_give_the_gradients_of_contact_substeps(per_substep):
    sim = two_cubes(0.5)
    if per_substep:
        as_on_cuda(sim)
    plain = substep_by_substep(sim)
    grads = []
    for s in (sim, plain):
        v0 = approaching(s, 0.5).velocities.clone().requires_grad_(True)
        traj = s.rollout(60, State(s.initial_state().positions, v0))
        (traj.positions[-1][:, 0] ** 2).sum().backward()
        grads.append(v0.grad)
    assert sim.backend.contact_free.counts["fused_steps"] > 0
    error = float((grads[0] - grads[1]).norm() / grads[1].norm())
    print(f"relative gradient difference {error:.2e}")
    assert error < 1e-9


def test_bodies_that_part_return_to_the_fused_path_within_the_prediction_backoff():
    """While pressed together the prediction is not asked every step (it keeps failing);
    once the cubes have bounced apart, steps run fused again within the backoff."""
    sim = two_cubes(2.0, gap=0.02)
    as_on_cuda(sim)  # fused contact: steps one at a time do not pay for their checks
    counts = sim.backend.contact_free.counts
    contact, state = sim.model.contact, approaching(sim, 2.0)
    paths = []  # per step: (ran with contact, the cubes' gap after it in dhat)
    for _ in range(60):
        ran = counts["contact_steps"]
        state = sim.rollout(1, state).state(-1)
        paths.append((counts["contact_steps"] > ran, contact.min_distance(state.positions)))
    touched = [k for k, (_, gap) in enumerate(paths) if gap < contact.dhat]
    parted = next(k for k in range(touched[-1], 60) if paths[k][1] > 2 * contact.dhat)
    late = [k for k in range(parted, 60) if paths[k][0]]
    print(
        f"touched steps {touched[0]}..{touched[-1]}, parted at {parted}, contact steps "
        f"after: {late}, {counts}"
    )
    assert touched and counts["skipped_predictions"] > 0  # they met; the backoff acted
    assert len(late) <= MAX_PREDICTION_BACKOFF and parted < 50
    # A rollout from another state (apart) asks at once, whatever the last one left.
    sim.backend.contact_free.wait = MAX_PREDICTION_BACKOFF
    fused = counts["fused_steps"]
    sim.rollout(1, approaching(sim, 2.0))
    assert counts["fused_steps"] == fused + 1


def test_nothing_near_anything_runs_fused_in_float32():
    """Default dtype, ground on: a cube dropped on the ground never leaves the fused path
    (ground contact is in the fused kernel; no surface pair comes near)."""
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=3).placed_on(0.0, gap=0.02)
    material = ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.3, density=1000.0)
    sim = ds.Simulator(mesh, material, dt=1e-3, substeps=8, ground=0.0, contact=True)
    traj = sim.rollout(150)
    counts = sim.backend.contact_free.counts
    print(counts)
    assert float(traj.positions[:, :, 1].min()) < 1e-3  # it landed
    # All fused, bar a step or two after a block that did not pay for its checks
    # (SUBSTEPS_PER_CHECK), which run with contact.
    assert counts["contact_steps"] <= 2 and counts["fused_steps"] >= 148


def cube_pair(resolution: int, xs: tuple[float, float]) -> ds.Simulator:
    """Two 5 cm cubes with their low corners at x = xs, in zero gravity."""
    cubes = [
        ds.TetMesh.box(size=(0.05,) * 3, resolution=resolution, origin=(x, 0.1, 0)) for x in xs
    ]
    material = ds.StableNeoHookean(2e5, 0.3, 1000.0)
    return ds.Simulator(ds.TetMesh.merge(cubes), material, dt=2e-3, substeps=8, gravity=(0, 0, 0))


def test_guesses_search_only_where_the_listed_pairs_do_not_settle_them():
    """A guess (a straight motion of two cubes, 1 mm apart, towards each other) whose
    listed pairs close is answered "not clear" without a search (no broad phase, no sweep).
    From 21 mm apart, where the set lists nothing between them, guesses beyond its reach
    sweep once: clear for one cube moving 1 cm sideways, not clear for the two meeting."""
    from diffsim.contact.surface_contact import SurfaceContact

    sim = cube_pair(4, (-0.05, 0.001))
    contact = sim.model.contact
    x = torch.as_tensor(sim.mesh.vertices, dtype=torch.float64)
    body = torch.as_tensor(sim.mesh.body_ids)
    towards = torch.zeros_like(x)
    towards[:, 0] = torch.where(body == 0, 1.0, -1.0).to(x.dtype)
    contact.candidates(x)  # the set at the start
    print(f"dhat {contact.dhat:.3g} m, listed {contact._candidates.n_pairs}")
    assert contact._candidates.n_pairs > 0  # the facing pairs are listed
    searches = contact.timings["searches"]
    assert not contact.clear_over(torch.stack([x, x + 0.01 * towards]), record=False)
    assert contact.timings["searches"] == searches  # settled by the listed pairs
    # The listed pairs' test (one Warp pass) gives the torch formulas' answers.
    brute = SurfaceContact(sim.mesh, dhat=contact.dhat, stiffness=1.0, broad_phase="brute")
    brute.candidates(x)
    local = contact.local(x)
    for dx, answer in ((0.01 * towards, True), (0.01 * towards.abs(), False)):
        for c in (contact, brute):
            assert c._listed_closing(local, dx.to(local.dtype), 0.0, contact.dhat) == answer
    apart = x - 0.01 * towards
    contact.candidates(apart)  # a new set there (no pair between the cubes)
    sideways = torch.zeros_like(x)
    sideways[body == 0, 1] = 0.01
    searches = contact.timings["searches"]
    assert contact.clear_over(torch.stack([apart, apart + sideways]), record=False)
    assert not contact.clear_over(torch.stack([apart, apart + 0.0105 * towards]), record=False)
    assert contact.timings["searches"] == searches + 2  # a sweep each


def test_a_prediction_of_wild_relative_motion_builds_no_huge_candidate_set():
    """A guessed block in which vertices move more than a surface edge relative to each
    other (the Armadillo's flapping crease vertices once asked for a 49 mm reach: 138
    million pairs) is answered "not clear" by sweeping the elements' boxes along it,
    without a candidate set over that reach."""
    sim = cube_pair(6, (-0.1, 0.05))
    contact = sim.model.contact
    x = torch.as_tensor(sim.mesh.vertices, dtype=torch.float64)
    assert contact.clear_over(torch.stack([x, x]), record=False)  # at rest: clear
    edge = contact.surface.mean_edge_length
    # Offsets up to 1.2 edges (half the box diagonal), below the cap on a step's size.
    shake = (torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) - 0.5) * 1.4 * edge
    rebuilds = contact.timings["rebuilds"]
    assert not contact.clear_over(torch.stack([x, x + shake]), record=False)
    assert contact.timings["rebuilds"] == rebuilds  # no set was built for that motion


@pytest.mark.parametrize("name", ["cube_drop", "sphere_bounce"])
def test_contact_free_tries_pay_for_their_checks(name):
    """Where contact substeps run fused, a contact-free try (prediction and check, each a
    search for pairs over a path where the candidate set does not reach: a broad phase or a
    sweep) is made only where it can cover SUBSTEPS_PER_CHECK substeps per search: a body
    bouncing on the ground and ringing, whose relative motion keeps the predicted blocks
    short, searches at most once per SUBSTEPS_PER_CHECK substeps over its whole run in its
    checks. Before the rule, scenes/cube_drop.py asked 585 times in 2,000 substeps
    (sphere_bounce 1,121) and ran 5 times slower than with fused contact alone."""
    from pathlib import Path

    from diffsim.apps.scene import load_scene
    from diffsim.backends.warp import contact_free

    scene = load_scene(Path(__file__).resolve().parents[1] / "scenes" / f"{name}.py")
    sim = scene.build()
    contact, calls, searches = sim.model.contact, [], []
    clear_over = contact.clear_over

    def counted(*args, **kwargs):
        before = contact.timings["searches"]
        clear = clear_over(*args, **kwargs)
        calls.append(1)
        searches.append(contact.timings["searches"] - before)
        return clear

    contact.clear_over = counted
    with torch.no_grad():
        traj = sim.rollout(scene.steps, scene.initial_state(sim))
    substeps = scene.steps * sim.model.substeps
    counts = sim.backend.contact_free.counts
    print(
        f"{name}: {len(calls)} checks, {sum(searches):g} searches in {substeps} substeps, {counts}"
    )
    assert float(traj.positions[:, :, 1].min()) - sim.model.ground.height < 1e-3  # it landed
    assert counts["fused_steps"] > 0  # blocks that pay are still tried
    assert sum(searches) * contact_free.SUBSTEPS_PER_CHECK <= substeps
