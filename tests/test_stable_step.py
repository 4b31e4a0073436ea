"""The stable-step estimate, auto substeps and mass scaling (diffsim.physics.stable_step)."""

import math

import numpy as np
import pytest
import torch

import diffsim as ds
from diffsim.physics.materials import lame_parameters
from diffsim.physics.stable_step import (
    SAFETY_FACTOR,
    auto_substeps,
    dilatational_wave_speed,
    mass_scaling,
    stable_step,
    tet_altitudes,
    tet_stable_steps,
    vertex_stable_steps,
)

from .helpers import asset

E, NU, RHO = 1e5, 0.4, 1000.0


def regular_tet(edge: float) -> np.ndarray:
    return (
        edge
        * np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=np.float64)
        / np.sqrt(8.0)
    )


def jittered_box() -> ds.TetMesh:
    """A box whose interior vertices are moved at random: tets of many shapes and sizes."""
    mesh = ds.TetMesh.box(size=(0.2, 0.2, 0.2), resolution=4)
    v = mesh.vertices.copy()
    inside = np.flatnonzero(((v > 1e-9) & (v < 0.2 - 1e-9)).all(axis=1))
    v[inside] += np.random.default_rng(1).uniform(-0.015, 0.015, (len(inside), 3))
    return ds.TetMesh(v, mesh.tets)


def test_altitudes_of_a_regular_tet_and_of_the_unit_corner_tet():
    alt = tet_altitudes(regular_tet(0.3), np.array([[0, 1, 2, 3]]))
    assert alt == pytest.approx([0.3 * math.sqrt(2.0 / 3.0)], rel=1e-12)
    corner = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1.0]], requires_grad=True)
    # the smallest altitude is from the origin to the face x + y + z = 1
    assert tet_altitudes(corner, torch.tensor([[0, 1, 2, 3]])) == pytest.approx([3**-0.5])


def test_wave_speed_formula_and_per_tet_fields():
    mu, lam = lame_parameters(E, NU)
    c = dilatational_wave_speed(E, NU, RHO)
    assert isinstance(c, float)
    assert c == pytest.approx(math.sqrt((lam + 2 * mu) / RHO), rel=1e-12)
    # E (1 - nu) / ((1 + nu)(1 - 2 nu)) is the P-wave modulus
    assert c == pytest.approx(math.sqrt(E * (1 - NU) / ((1 + NU) * (1 - 2 * NU)) / RHO))
    mesh = jittered_box()
    youngs = torch.full((mesh.n_tets,), E, dtype=torch.float64, requires_grad=True)
    youngs = youngs * torch.where(torch.arange(mesh.n_tets) % 2 == 0, 1.0, 4.0)
    speeds = dilatational_wave_speed(youngs, NU, torch.tensor(RHO))
    assert speeds.shape == (mesh.n_tets,)
    steps = tet_stable_steps(mesh.vertices, mesh.tets, youngs, NU, RHO)
    plain = tet_stable_steps(mesh.vertices, mesh.tets, E, NU, RHO)
    assert np.allclose(steps, plain * np.where(np.arange(mesh.n_tets) % 2 == 0, 1.0, 0.5))
    assert np.allclose(plain, SAFETY_FACTOR * tet_altitudes(mesh.vertices, mesh.tets) / c)
    with pytest.raises(ValueError, match="per-tet material fields must have shape"):
        tet_stable_steps(mesh.vertices, mesh.tets, np.full(3, E), NU, RHO)
    with pytest.raises(ValueError, match="poissons_ratio must be in"):
        dilatational_wave_speed(E, 0.5, RHO)


def test_vertex_steps_bound_the_tet_steps_and_stable_step_reports_the_limit():
    mesh = jittered_box()
    tet_steps = tet_stable_steps(mesh.vertices, mesh.tets, E, NU, RHO)
    vsteps = vertex_stable_steps(mesh.vertices, mesh.tets, E, NU, RHO)
    # a vertex's step is a weighted mean of its tets' steps
    lo = np.full(mesh.n_vertices, np.inf)
    hi = np.zeros(mesh.n_vertices)
    np.minimum.at(lo, mesh.tets, tet_steps[:, None])
    np.maximum.at(hi, mesh.tets, tet_steps[:, None])
    assert (vsteps >= lo * (1 - 1e-12)).all() and (vsteps <= hi * (1 + 1e-12)).all()
    est = stable_step(mesh.vertices, mesh.tets, E, NU, RHO)
    assert est.dt == pytest.approx(vsteps.min()) and est.tet_dt == pytest.approx(tet_steps.min())
    assert est.dt >= est.tet_dt
    assert est.limiting_vertices[0] == np.argmin(vsteps)
    assert np.isin(est.limiting_vertices[0], mesh.tets[est.limiting_tets]).all()
    by_tet = stable_step(mesh.vertices, mesh.tets, E, NU, RHO, method="tet")
    assert by_tet.dt == est.tet_dt
    assert list(by_tet.limiting_tets) == list(np.argsort(tet_steps)[:5])
    text = est.describe(dt=1e-3)
    assert f"{est.dt:.3g} s" in text and str(int(est.limiting_tets[0])) in text
    assert 'substeps="auto"' in text and "mass_scaling=" in text and "smaller dt" in text
    assert f"needs {auto_substeps(1e-3, est.dt)} substeps" in text
    assert 'substeps="auto"' in str(by_tet)


def test_auto_substeps():
    assert auto_substeps(1e-3, 1e-4) == 10  # 1e-3 / 1e-4 is 10.000000000000002
    assert auto_substeps(1e-3, 3e-4) == 4
    assert auto_substeps(1e-5, 1e-4) == 1
    with pytest.raises(ValueError, match="finite and > 0"):
        auto_substeps(1e-3, 0.0)


def blows_up(mesh: ds.TetMesh, h: float, backend: str, steps: int = 300, density=RHO) -> bool:
    """Runs ``steps`` substeps of h from small random velocities; True on a blow-up."""
    sim = ds.Simulator(
        mesh,
        ds.StableNeoHookean(E, NU, density),
        dt=h,
        substeps=1,
        ground=None,
        gravity=(0.0, 0.0, 0.0),
        backend=backend,
    )
    gen = torch.Generator().manual_seed(0)
    v0 = 1e-3 * torch.randn(mesh.n_vertices, 3, generator=gen)
    try:
        traj = sim.rollout(steps=steps, state=sim.initial_state(velocities=v0))
    except ds.SimulationError:
        return True
    speed = traj.velocities.norm(dim=2).amax(dim=1)
    return bool(speed.max() > 10 * speed[0])  # growth without NaN yet is a blow-up too


@pytest.mark.parametrize("backend", ["warp", "torch"])
@pytest.mark.filterwarnings("ignore::diffsim.StabilityWarning")
def test_estimate_is_below_the_measured_blow_up_on_a_box(backend):
    # Measured: this box blows up above 1.85 x the estimate (its linear limit; docs/time-steps.md).
    mesh = ds.TetMesh.box(size=(0.3, 0.3, 0.3), resolution=4)
    est = stable_step(mesh.vertices, mesh.tets, E, NU, RHO)
    assert not blows_up(mesh, 0.9 * est.dt, backend)
    assert not blows_up(mesh, 1.5 * est.dt, backend)
    assert blows_up(mesh, 2.5 * est.dt, backend)
    sim = ds.Simulator(
        mesh,
        ds.StableNeoHookean(E, NU, RHO),
        dt=4.0 * est.dt,
        ground=None,
        gravity=(0.0, 0.0, 0.0),
        backend=backend,
    )
    v0 = 1e-3 * torch.randn(mesh.n_vertices, 3, generator=torch.Generator().manual_seed(0))
    # Contact on (the default) sees the blow-up first, as steps it would have to cap.
    with pytest.raises(ds.SimulationError, match="non-finite|blew up"):
        sim.rollout(steps=300, state=sim.initial_state(velocities=v0))


@pytest.mark.filterwarnings("ignore::diffsim.StabilityWarning")
def test_estimate_is_below_the_measured_blow_up_on_the_bunny():
    mesh = ds.TetMesh.load(asset("bunny.msh")).centered().scaled_to(0.3)
    est = stable_step(mesh.vertices, mesh.tets, E, NU, RHO)
    # Measured limit 2.02 x the vertex estimate and 13.7 x the per-tet one.
    assert est.dt > 6 * est.tet_dt
    assert not blows_up(mesh, est.dt, "warp")
    assert blows_up(mesh, 2.5 * est.dt, "warp")


def test_mass_scaling_per_tet_meets_the_target_and_matches_the_formula():
    mesh = jittered_box()
    rho = np.linspace(800.0, 1200.0, mesh.n_tets)  # a per-tet density field
    steps = tet_stable_steps(mesh.vertices, mesh.tets, E, NU, rho)
    target = float(np.median(steps))
    scaling = mass_scaling(mesh.vertices, mesh.tets, E, NU, rho, target, method="tet")
    added, scaled = scaling  # unpacks as a pair
    assert list(scaled) == list(np.flatnonzero(steps < target)) and len(scaled) > 0
    # the scaled tets meet the target with their raised density; the others are unchanged
    new_rho = rho * scaling.density_factor
    new_steps = tet_stable_steps(mesh.vertices, mesh.tets, E, NU, new_rho)
    assert np.allclose(new_steps[scaled], target)
    untouched = np.setdiff1d(np.arange(mesh.n_tets), scaled)
    assert (scaling.density_factor[untouched] == 1.0).all()
    assert (new_steps[untouched] == steps[untouched]).all()
    # added tet mass rho V ((target / h)^2 - 1), a quarter to each corner
    tet_added = rho * mesh.rest_volumes * ((target / steps) ** 2 - 1.0)
    expected = np.zeros(mesh.n_vertices)
    np.add.at(expected, mesh.tets[scaled], tet_added[scaled, None] / 4.0)
    assert np.allclose(added, expected)
    assert np.allclose(mesh.lumped_masses(new_rho), mesh.lumped_masses(rho) + added)
    assert scaling.total_added == pytest.approx(tet_added[scaled].sum())
    assert scaling.fraction == pytest.approx(scaling.total_added / (rho * mesh.rest_volumes).sum())
    assert "mass scaling (tet)" in scaling.describe()


def test_mass_scaling_per_vertex_meets_the_target_with_less_mass():
    mesh = jittered_box()
    est = stable_step(mesh.vertices, mesh.tets, E, NU, RHO)
    target = 1.5 * est.dt
    by_vertex = mass_scaling(mesh.vertices, mesh.tets, E, NU, RHO, target)
    by_tet = mass_scaling(mesh.vertices, mesh.tets, E, NU, RHO, target, method="tet")
    before = vertex_stable_steps(mesh.vertices, mesh.tets, E, NU, RHO)
    after = vertex_stable_steps(
        mesh.vertices, mesh.tets, E, NU, RHO, added_mass=by_vertex.added_mass
    )
    assert (after >= target * (1 - 1e-9)).all()
    assert np.allclose(after[by_vertex.scaled_vertices], target)
    assert list(by_vertex.scaled_vertices) == list(np.flatnonzero(before < target))
    assert (by_vertex.added_mass[before >= target] == 0).all()
    rescaled = stable_step(mesh.vertices, mesh.tets, E, NU, RHO, added_mass=by_vertex.added_mass)
    assert rescaled.dt == pytest.approx(target)
    assert 0 < by_vertex.total_added < by_tet.total_added
    # the per-tet scaling meets the per-vertex target too
    with_tet = vertex_stable_steps(
        mesh.vertices, mesh.tets, E, NU, RHO, added_mass=by_tet.added_mass
    )
    assert (with_tet >= target * (1 - 1e-9)).all()


@pytest.mark.filterwarnings("ignore::diffsim.StabilityWarning")
def test_mass_scaled_mesh_runs_at_the_target():
    mesh = jittered_box()
    est = stable_step(mesh.vertices, mesh.tets, E, NU, RHO)
    target = 3.0 * est.dt
    scaling = mass_scaling(mesh.vertices, mesh.tets, E, NU, RHO, target, method="tet")
    density = torch.tensor(RHO * scaling.density_factor)  # float64: no rounding below h
    assert blows_up(mesh, target, "warp")
    assert not blows_up(mesh, target, "warp", density=density)
