"""Contact physics over time: a resting stack stays put, an elastic impact keeps its energy.

(A body flying freely with contact on keeps its speed to 1e-6 relative at 30 and 40 m/s,
on both backends, with no limited step: tests/test_contact_defaults.py
``test_a_cube_flying_freely_keeps_its_speed``.)
"""

from __future__ import annotations

import warnings

import pytest
import torch

import diffsim as ds

# ----------------------------------------------------------------- a resting stack
SETTLE_STEPS, HOLD_STEPS = 1000, 1000  # 1 s to settle, then 1 s held (dt = 1 ms)


def cube_stack(dtype: torch.dtype) -> ds.Simulator:
    """Three 0.1 m cubes in a column on the ground, 4 mm apart at the start (they settle
    onto each other within the first 0.1 s), friction on everywhere."""
    size, gap = 0.1, 0.004
    cubes = [
        ds.TetMesh.box(
            size=(size, size, size),
            resolution=3,
            origin=(-size / 2, gap / 2 + i * (size + gap), -size / 2),
        )
        for i in range(3)
    ]
    return ds.Simulator(
        ds.TetMesh.merge(cubes),
        ds.StableNeoHookean(youngs_modulus=5e4, poissons_ratio=0.4, density=500.0),
        dt=1e-3,
        substeps="auto",
        ground=0.0,
        damping=5.0,
        friction=0.5,
        contact=True,
        contact_friction=0.5,
        dtype=dtype,
    )


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_stack_of_three_cubes_stays_within_a_millimetre_once_settled(dtype):
    # Barrier pairs at the coincident edges of the aligned cubes push the top cube sideways
    # with 0.13 N (2.6% of its weight). With one friction pass per substep, which removes
    # 64% of a sticking slip, that steady load left a steady creep: 0.08, 1.57, 2.56 mm
    # (float32; float64 0.08, 0.85, 1.88 mm). Friction now iterates (FRICTION_PASSES,
    # contact/friction.py); measured with 4 passes: float32 0.09, 0.26, 0.39 mm, float64
    # 0.11, 0.32, 0.48 mm (8 passes: float32 0.14, 0.29, 0.31 mm). With the default
    # stiffness at rho = 1/8 (the cubes rest deeper in the barrier): float32 0.14, 0.85,
    # 0.66 mm (fused contact substeps, another order of force sums: 0.13, 1.09, 0.76),
    # float64 0.13, 0.24, 0.24 mm; with 8 passes float32 0.20, 0.35, 0.26 mm, float64 0.19,
    # 0.36, 0.27 mm.
    sim = cube_stack(dtype)
    with torch.no_grad():
        traj = sim.rollout(SETTLE_STEPS + HOLD_STEPS, sim.initial_state())
    x = traj.positions.double()
    assert torch.isfinite(x).all()
    body = torch.as_tensor(sim.mesh.body_ids)
    drifts = []
    for k in range(3):
        centroid = x[:, body == k].mean(dim=1)[SETTLE_STEPS:]
        drifts.append(float((centroid - centroid[0]).norm(dim=1).max()))
    print(
        f"{dtype}: centroid drift over 1 s after settling (mm):",
        [f"{d * 1e3:.3f}" for d in drifts],
    )
    # settled: the column stands (each cube about one size above the last)
    heights = [float(x[-1, body == k, 1].mean()) for k in range(3)]
    assert heights[0] < heights[1] < heights[2] < 0.3
    assert max(drifts) < 1e-3


# ----------------------------------------------------------------- an elastic impact
RADIUS, GAP, SPEED = 0.1, 0.03, 2.5  # m, m, m/s each (5 m/s relative)
IMPACT_STEPS = 80  # the balls meet at 6 ms, part by 55 ms, and are 0.1 m apart at 80 ms


def head_on_spheres(
    dtype: torch.dtype, substeps, contact_speed: float | None = None
) -> tuple[ds.Simulator, ds.State]:
    """Two elastic balls thrown head-on at each other: no damping, no friction, no
    gravity, no ground."""
    mesh = ds.TetMesh.merge(
        [
            ds.TetMesh.sphere(RADIUS, 5, (-RADIUS - GAP / 2, 0.0, 0.0)),
            ds.TetMesh.sphere(RADIUS, 5, (RADIUS + GAP / 2, 0.0, 0.0)),
        ]
    )
    sim = ds.Simulator(
        mesh,
        ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.4, density=1000.0),
        dt=1e-3,
        substeps=substeps,
        gravity=(0.0, 0.0, 0.0),
        ground=None,
        contact=True,
        contact_friction=0.0,
        contact_speed=contact_speed,
        dtype=dtype,
    )
    v = torch.zeros((mesh.n_vertices, 3), dtype=dtype)
    v[:, 0] = torch.where(torch.as_tensor(mesh.body_ids == 0), SPEED, -SPEED)
    return sim, sim.initial_state(velocities=v)


def energy_kept(dtype: torch.dtype, substeps, contact_speed: float | None = None) -> float:
    """Total energy (kinetic + elastic + contact) after the impact over before it."""
    sim, state = head_on_spheres(dtype, substeps, contact_speed)
    before = float(sim.energies(state)["total"])
    with torch.no_grad():
        traj = sim.rollout(IMPACT_STEPS, state)
    assert torch.isfinite(traj.positions).all()
    contact = sim.model.contact
    assert min(contact.min_distance(x) for x in traj.positions) < contact.dhat  # they met
    after = sim.energies(ds.State(traj.positions[-1], traj.velocities[-1]))
    assert float(after["contact"]) == 0.0  # and parted
    ratio = float(after["total"]) / before
    h = sim.model.substep_dt
    print(
        f"{dtype}, h = {h:.3g} s (the barrier stops {contact.stopping_speed(h):.2f} m/s against "
        f"{2 * SPEED} m/s): energy after/before {ratio:.4f}, "
        f"{contact.timings['limited_vertex_steps']:.0f} limited vertex-steps"
    )
    return ratio


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_head_on_elastic_spheres_keep_their_energy_at_the_automatic_substep(dtype):
    # contact_speed=5 m/s: substeps="auto" takes 20 (h = 50 us, 0.2 dhat/h = 10.2 m/s)
    # where the elastic estimate alone takes 2 (0.5 ms, 1.0 m/s: the step limit stops the
    # balls and they keep about 3/4 of their energy). Measured: 1.0007 / 1.0008 (float32 /
    # float64).
    sim, _ = head_on_spheres(dtype, "auto", contact_speed=2 * SPEED)
    assert sim.model.substeps > head_on_spheres(dtype, "auto")[0].model.substeps
    ratio = energy_kept(dtype, "auto", contact_speed=2 * SPEED)
    assert 0.95 <= ratio <= 1.05


def test_an_impact_faster_than_the_barrier_stops_warns_and_says_what_to_do():
    sim, state = head_on_spheres(torch.float64, "auto")  # 2 substeps: 1.0 m/s, 5 m/s impact
    with pytest.warns(ds.StabilityWarning, match="contact_speed=v"):
        with torch.no_grad():
            sim.rollout(IMPACT_STEPS, state)
    assert sim.model.contact.timings["truncated_vertex_steps"] > 0  # the limit did act
    with pytest.warns(ds.StabilityWarning, match="substeps >= 20"):
        head_on_spheres(torch.float64, 2, contact_speed=2 * SPEED)
    with pytest.raises(ValueError, match="contact_speed"):
        ds.Simulator(
            ds.TetMesh.box(), ds.StableNeoHookean(1e5, 0.4, 1000.0), contact=False,
            contact_speed=1.0,
        )  # fmt: skip


def test_a_contact_speed_that_takes_a_hundred_times_the_substeps_says_so():
    # A speed in mm/s passed as m/s: 5000 "m/s" would take 20,000 substeps of each 1 ms
    # step, without a word. The scene's own 5 m/s takes 20, ten times elasticity's 2: quiet.
    mesh = ds.TetMesh.merge([ds.TetMesh.box(size=(0.1,) * 3, resolution=2, origin=(x, 0, 0))
                             for x in (0.0, 0.2)])  # fmt: skip
    material = ds.StableNeoHookean(1e5, 0.4, 1000.0)
    elastic = ds.Simulator(mesh, material, dt=1e-3, substeps="auto", ground=None).model.substeps
    with pytest.warns(ds.ContactWarning, match=r"contact_speed = 5000 m/s takes \d+ substeps"):
        sim = ds.Simulator(mesh, material, dt=1e-3, substeps="auto", ground=None,
                           contact_speed=5000.0)  # fmt: skip
    assert sim.model.substeps > 100 * elastic  # it still does what was asked
    with warnings.catch_warnings():
        warnings.simplefilter("error", ds.ContactWarning)
        ds.Simulator(mesh, material, dt=1e-3, substeps="auto", ground=None, contact_speed=5.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_head_on_elastic_spheres_keep_their_energy_when_the_barrier_can_stop_them(dtype):
    # 20 substeps (h = 50 us): 0.2 dhat/h = 10 m/s, twice the approach speed, so the
    # barrier, not the step limit, stops the balls (docs/contact.md, choosing parameters).
    ratio = energy_kept(dtype, 20)
    assert 0.95 <= ratio <= 1.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("substeps", [15, 30])
def test_head_on_elastic_spheres_do_not_gain_energy_with_more_substeps(dtype, substeps):
    # 15 and 30 substeps: 0.75 and 1.5 times what contact_speed=5 picks. More substeps must
    # not make the impact less elastic. The default stiffness follows the substep
    # (kappa ~ 1 / h^2); sized for one pair's stability at dhat/4 (rho = 1/4) the explicit
    # barrier gained 1.19 / 1.18 (float32 / float64) at 15 substeps and 1.08 / 1.37 at 20,
    # with its closest gap at 0.6 dhat: a vertex feels several pairs at once. At dhat/8
    # (rho = 1/8, docs/contact.md "Default stiffness"): 1.0006 / 1.0001 at 15 substeps,
    # 0.9995 / 0.9993 at 30, no step cut.
    ratio = energy_kept(dtype, substeps)
    assert 0.97 <= ratio <= 1.03


TWO_BALLS_SCENE = """
import torch
import diffsim as ds

STEPS = 40

def build():
    mesh = ds.TetMesh.merge([ds.TetMesh.sphere(0.1, 3, (-0.115, 0, 0)),
                             ds.TetMesh.sphere(0.1, 3, (0.115, 0, 0))])
    material = ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.4, density=1000.0)
    return ds.Simulator(mesh, material, substeps="auto", gravity=(0, 0, 0), ground=None,
                        contact_speed=CONTACT_SPEED)

def initial_state(sim):
    v = torch.zeros((sim.mesh.n_vertices, 3))
    v[:, 0] = torch.where(torch.as_tensor(sim.mesh.body_ids == 0), 2.5, -2.5)
    return sim.initial_state(velocities=v)
"""


@pytest.mark.parametrize("contact_speed", [None, 5.0])
def test_the_run_summary_says_what_the_step_limit_cut(tmp_path, capsys, contact_speed):
    import warnings

    from diffsim.apps import cli

    path = tmp_path / "balls.py"
    path.write_text(TWO_BALLS_SCENE.replace("CONTACT_SPEED", str(contact_speed)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ds.StabilityWarning)
        assert cli.main(["run", str(path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "surface contact" in line]
    print(lines)
    assert len(lines) == 1 and "the barrier stops approaches up to" in lines[0]
    if contact_speed is None:  # 5 m/s against about 2 m/s: cut, and said so
        assert "impacts lost energy" in lines[0]
    else:
        assert lines[0].endswith("cut 0 vertex-steps")
