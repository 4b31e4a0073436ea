"""substeps="auto", mass scaling and the stable-step messages, through the Simulator."""

import warnings

import pytest

import diffsim as ds

from .helpers import asset

MATERIAL = ds.StableNeoHookean(1e5, 0.4, 1000.0)


def bunny() -> ds.TetMesh:
    return ds.TetMesh.load(asset("bunny.msh")).centered().scaled_to(0.3).placed_on(0.0, gap=0.02)


def test_bunny_with_auto_substeps_falls_at_g():
    """The reference bunny (a sliver tet) runs at dt = 1e-3 with substeps="auto" in float32
    and falls at g over the first 20 ms."""
    sim = ds.Simulator(bunny(), MATERIAL, dt=1e-3, substeps="auto")
    assert sim.model.substeps == -(-1e-3 // sim.stable_dt)
    assert sim.model.substep_dt <= sim.stable_dt
    traj = sim.rollout(20)
    v = traj.velocities[-1, :, 1].double().mean().item()
    err = abs(v / (-9.81 * 0.02) - 1)
    steps = sim.model.substeps
    print(f"bunny: stable {sim.stable_dt:.3g} s, {steps} substeps, v error {err:.1e}")
    assert err < 0.01


def test_substep_above_the_estimate_warns_with_the_numbers():
    with pytest.warns(ds.StabilityWarning, match=r"estimated stable substep .* set by tets \["):
        ds.Simulator(bunny(), MATERIAL, dt=1e-3, substeps=4)


def test_mass_scaling_reaches_the_target_and_gravity_acts_on_the_added_mass():
    mesh = bunny()
    sim = ds.Simulator(mesh, MATERIAL, dt=1e-3, substeps="auto", mass_scaling=1e-4)
    assert sim.stable_dt >= 1e-4 * (1 - 1e-9)
    assert sim.model.substeps == 10
    assert 0 < sim.added_mass < 0.02 * sim.mass_scaling.mass
    mass = sim.coefficients().mass.double()
    assert float(mass.sum()) == pytest.approx(sim.mass_scaling.mass + sim.added_mass, rel=1e-5)
    weight = sim.forces(sim.model.rest_positions)[:, 1].double().sum()
    assert float(weight) == pytest.approx(-9.81 * float(mass.sum()), rel=1e-4)


def test_blow_up_message_compares_the_substep_with_the_estimate():
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=(2, 2, 2), origin=(0.0, 0.2, 0.0))
    with pytest.warns(ds.StabilityWarning):
        sim = ds.Simulator(mesh, ds.StableNeoHookean(1e8, 0.3, 1000.0), dt=3e-4, ground=None)
    with pytest.raises(ds.SimulationError, match="above the estimated stable substep") as info:
        sim.rollout(200, state=sim.initial_state(velocities=(0.0, -1.0, 0.0)))
    assert "use StableNeoHookean" not in str(info.value)
    assert 'substeps="auto"' in str(info.value)


def test_blow_up_at_the_mass_scaled_substep_is_not_called_above_the_estimate():
    """substeps="auto" with mass_scaling runs exactly at the estimate (up to rounding: 5e-5
    s came out 1 ulp below it). A blow-up there must not be told to use the substeps it
    already uses; the advice names what is left (smaller dt, max_speed, the material)."""
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=(4, 4, 4), origin=(0.0, 0.2, 0.0))
    sim = ds.Simulator(
        mesh, ds.NeoHookean(1e8, 0.4, 1000.0), dt=1e-3, substeps="auto", mass_scaling=5e-5,
        ground=None,
    )  # fmt: skip
    assert sim.model.substeps == 20 and sim.stable_dt < sim.model.substep_dt  # 1 ulp
    x = sim.model.rest_positions.clone()
    x[0] += 0.04  # a corner pushed through its tets: NeoHookean is undefined there
    with pytest.raises(ds.SimulationError, match="within the estimated stable substep") as info:
        sim.rollout(20, state=sim.initial_state(x))
    print(info.value)
    assert "above" not in str(info.value)


def test_surface_barrier_limit_warns_only_for_a_stiffness_set_by_hand():
    a = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=(2, 2, 2), origin=(0.0, 0.2, 0.0))
    b = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=(2, 2, 2), origin=(0.0, 0.35, 0.0))
    scene = ds.TetMesh.merge([a, b])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ds.StabilityWarning)
        sim = ds.Simulator(scene, MATERIAL, dt=1e-3, substeps="auto", contact=True)
    h = sim.model.substep_dt
    assert sim.model.contact.stable_substep() == pytest.approx(h)  # the default is sized to h
    with pytest.warns(ds.StabilityWarning, match="surface barrier's stable substep"):
        ds.Simulator(
            scene, MATERIAL, dt=1e-3, substeps="auto", contact=True, contact_stiffness=1e12
        )
