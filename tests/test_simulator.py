"""Physics and behaviour of the Simulator on the torch reference backend."""

import numpy as np
import pytest
import torch

import diffsim as ds

BOX = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=(2, 2, 2), origin=(0.0, 0.2, 0.0))


def make_sim(mesh=BOX, material=None, **kwargs):
    kwargs.setdefault("backend", "torch")
    return ds.Simulator(mesh, material or ds.StableNeoHookean(2e4, 0.3, 1000.0), **kwargs)


def squeezed_state(sim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = sim.model.rest_positions + 0.005 * torch.randn(
        sim.model.rest_positions.shape, generator=gen, dtype=sim.dtype
    )
    v = 0.3 * torch.randn(x.shape, generator=gen, dtype=sim.dtype)
    return sim.initial_state(positions=x, velocities=v)


def test_momentum_is_conserved_without_external_forces():
    sim = make_sim(gravity=(0, 0, 0), ground=None, dtype=torch.float64)
    state = squeezed_state(sim)
    mass = sim.coefficients().mass[:, None]
    traj = sim.rollout(200, state=state)
    momentum = (mass * traj.velocities).sum(dim=1)
    assert torch.allclose(momentum, momentum[0].expand_as(momentum), atol=1e-12)


def test_energy_drift_is_bounded_without_damping():
    sim = make_sim(ground=None, dtype=torch.float64, dt=5e-4)
    state = squeezed_state(sim)
    traj = sim.rollout(400, state=state)
    totals = torch.stack([sim.energies(traj.state(i))["total"] for i in range(0, 401, 20)])
    scale = sim.energies(state)["elastic"] + sim.energies(state)["kinetic"]
    # Symplectic Euler: the energy oscillates (a few %) but does not drift.
    assert (totals - totals[0]).abs().max() < 0.05 * scale
    assert abs(totals[-5:].mean() - totals[:5].mean()) < 0.01 * scale


def test_damping_dissipates_energy():
    sim = make_sim(ground=None, gravity=(0, 0, 0), damping=20.0, dtype=torch.float64)
    state = squeezed_state(sim)
    traj = sim.rollout(200, state=state)
    start, end = sim.energies(state)["total"], sim.energies(traj.state())["total"]
    assert end < 0.2 * start


def test_fixed_vertices_never_move_and_follow_prescribed_paths():
    fixed = np.flatnonzero(BOX.vertices[:, 0] == 0.0)
    sim = make_sim(fixed=fixed, ground=None)
    traj = sim.rollout(50)
    assert torch.equal(traj.positions[:, fixed], traj.positions[:1, fixed].expand(51, -1, -1))
    assert (traj.velocities[:, fixed] == 0).all()
    free = np.setdiff1d(np.arange(BOX.n_vertices), fixed)
    assert (traj.positions[-1, free, 1] < traj.positions[0, free, 1]).all()  # the rest sags
    path = (
        torch.as_tensor(BOX.vertices[fixed], dtype=torch.float32)
        + torch.linspace(0, 0.05, 50)[:, None, None]
    )
    traj = sim.rollout(50, fixed_positions=path)
    assert torch.allclose(traj.positions[1:, fixed], path.double())
    mask = np.zeros(BOX.n_vertices, dtype=bool)
    mask[fixed] = True
    assert torch.equal(
        make_sim(fixed=mask, ground=None).rollout(5).positions,
        make_sim(fixed=fixed, ground=None).rollout(5).positions,
    )


@pytest.mark.parametrize("speed", [1.0, 30.0, 1000.0])
def test_fast_drop_never_ends_below_the_ground(speed):
    sim = make_sim(ground=0.0)
    state = sim.initial_state(velocities=(0.0, -speed, 0.0))
    traj = sim.rollout(100, state=state)
    assert torch.isfinite(traj.positions).all()
    assert (traj.positions[..., 1] > 0.0).all()


def test_ground_holds_a_resting_body():
    mesh = BOX.placed_on(0.0, gap=0.001)
    sim = make_sim(mesh, ground=0.0, damping=10.0)
    traj = sim.rollout(600)
    assert (traj.positions[..., 1] > 0).all()
    assert traj.velocities[-1].abs().max() < 0.05
    assert traj.positions[-1, :, 1].min() < sim.model.ground.dhat


def test_friction_slows_sliding():
    mesh = BOX.placed_on(0.0, gap=0.0005)
    slide = (1.0, 0.0, 0.0)
    distance = {}
    for mu in (0.0, 0.5):
        sim = make_sim(mesh, ground=0.0, friction=mu, friction_velocity=0.01)
        traj = sim.rollout(150, state=sim.initial_state(velocities=slide))
        distance[mu] = float(traj.positions[-1, :, 0].mean() - traj.positions[0, :, 0].mean())
    assert distance[0.5] < 0.8 * distance[0.0]


def test_velocity_clamp_bounds_speeds():
    sim = make_sim(ground=None, max_speed=2.0)
    traj = sim.rollout(20, state=sim.initial_state(velocities=(10.0, 0.0, 0.0)))
    assert traj.velocities[1:].norm(dim=-1).max() <= 2.0
    slow = make_sim(ground=None, gravity=(0, 0, 0), max_speed=100.0)
    traj = slow.rollout(1, state=slow.initial_state(velocities=(0.1, 0.0, 0.0)))
    assert torch.allclose(traj.velocities[1, :, 0], torch.tensor(0.1), rtol=1e-5)


def test_clamp_is_smooth_at_zero_velocity():
    from diffsim.physics.velocity import clamp_speed

    v = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
    out = clamp_speed(v, 1.0)
    (grad,) = torch.autograd.grad(out.sum(), v)
    assert (
        torch.equal(out, v)
        and torch.isfinite(grad).all()
        and torch.allclose(grad, torch.ones_like(grad))
    )


def test_substeps_split_the_step():
    one = make_sim(ground=None, dt=2e-3, substeps=2).rollout(10)
    two = make_sim(ground=None, dt=1e-3).rollout(20)
    assert torch.allclose(one.positions[-1], two.positions[-1], atol=1e-6)


def test_float64_and_step_match_rollout():
    sim = make_sim(dtype=torch.float64)
    traj = sim.rollout(3)
    assert traj.positions.dtype == torch.float64
    state = sim.initial_state()
    for _ in range(3):
        state = sim.step(state)
    assert torch.equal(state.positions, traj.positions[-1])


def test_user_material_runs_on_torch_backend():
    class Soft(ds.Material):
        def energy_density(self, F):
            mu, lam = self.lame()
            J = torch.linalg.det(F)
            return (
                0.5 * mu * (F.square().sum((1, 2)) - 3)
                - mu * torch.log(J)
                + 0.5 * lam * torch.log(J) ** 2
            )

    with pytest.warns(ds.BackendWarning, match="torch backend"):
        sim = ds.Simulator(BOX, Soft(), backend="warp")
    assert sim.backend_name == "torch"
    assert torch.isfinite(sim.rollout(5).positions).all()


def test_model_is_not_mutated_by_steps():
    sim = make_sim()
    before = {k: v.clone() for k, v in vars(sim.model).items() if isinstance(v, torch.Tensor)}
    sim.rollout(10)
    for k, v in before.items():
        assert torch.equal(getattr(sim.model, k), v)


def test_energies_report_every_term():
    sim = make_sim(mesh=BOX.placed_on(0.0, gap=1e-4))
    energies = sim.energies(sim.initial_state())
    # "contact": the surface barrier, on by default (zero here: nothing is near anything).
    assert set(energies) == {"kinetic", "elastic", "gravitational", "barrier", "contact", "total"}
    assert energies["contact"] == 0
    assert energies["barrier"] > 0 and energies["kinetic"] == 0


def test_nan_raises_simulation_error():
    sim = make_sim(material=ds.NeoHookean(1e9, 0.3, 1.0), ground=None, dt=0.1)
    with pytest.raises(ds.SimulationError, match="step"):
        sim.rollout(10, state=squeezed_state(sim))


def test_trajectory_save_load(tmp_path):
    traj = make_sim().rollout(4)
    traj.save(tmp_path / "t.npz")
    back = ds.Trajectory.load(tmp_path / "t.npz")
    assert torch.equal(back.positions, traj.positions) and back.dt == traj.dt
    assert (back.surface_faces == BOX.surface_faces).all()
    with pytest.raises(FileNotFoundError):
        ds.Trajectory.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="missing"):
        ds.Trajectory.load(tmp_path / "bad.npz")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"dt": 0.0}, ValueError, "dt must be a positive"),
        ({"dt": float("nan")}, ValueError, "dt must be a positive"),
        ({"substeps": 0}, ValueError, "substeps"),
        ({"backend": "jax"}, ValueError, "unknown backend"),
        ({"dtype": torch.float16}, ValueError, "dtype"),
        ({"gravity": (0, -9.81)}, ValueError, "gravity must have 3"),
        ({"gravity": (0, float("nan"), 0)}, ValueError, "gravity must be finite"),
        ({"fixed": [0, 999]}, ValueError, "outside \\[0, 27\\)"),
        ({"fixed": np.zeros(5, dtype=bool)}, ValueError, "mask must have shape \\[27\\]"),
        ({"fixed": [0.5]}, ValueError, "indices"),
        ({"damping": -1.0}, ValueError, "damping"),
        ({"max_speed": 0.0}, ValueError, "max_speed"),
        ({"friction": -0.1}, ValueError, "friction"),
        ({"ground": 0.25}, ValueError, "not above the ground"),
        ({"ground_dhat": -1.0}, ValueError, "ground_dhat"),
    ],
)
def test_bad_simulator_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        make_sim(**kwargs)


def test_bad_types_and_states():
    with pytest.raises(TypeError, match="TetMesh"):
        ds.Simulator(np.zeros((4, 3)), ds.StableNeoHookean())
    with pytest.raises(TypeError, match="Material"):
        ds.Simulator(BOX, "rubber")
    sim = make_sim()
    with pytest.raises(ValueError, match="positions must have shape"):
        sim.initial_state(positions=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="velocities must have shape"):
        sim.initial_state(velocities=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        sim.initial_state(velocities=torch.full((27, 3), float("nan")))
    with pytest.raises(ValueError, match="below the ground"):
        sim.initial_state(positions=sim.model.rest_positions - 1.0)
    with pytest.raises(ValueError, match="steps"):
        sim.rollout(-1)
    with pytest.raises(ValueError, match="checkpoint_every"):
        sim.rollout(3, checkpoint_every=0)
    fixed = make_sim(fixed=[0, 1])
    with pytest.raises(ValueError, match="fixed_positions must have shape"):
        fixed.rollout(3, fixed_positions=torch.zeros(3, 3))


def test_rollout_params_override_without_changing_the_simulator():
    sim = make_sim(ground=0.0)
    E = torch.tensor(3e4, requires_grad=True)
    traj = sim.rollout(20, params={"youngs_modulus": E, "damping": torch.tensor(0.5)})
    other = sim.replace(material=ds.StableNeoHookean(3e4, 0.3, 1000.0), damping=0.5)
    assert torch.allclose(traj.positions, other.rollout(20).positions)
    traj.positions[-1, :, 1].mean().backward()
    assert E.grad is not None and E.grad != 0
    assert float(sim.material.youngs_modulus) != 3e4 and sim.damping == 0.0
    with pytest.raises(ValueError, match="unknown parameters"):
        sim.rollout(2, params={"stiffness": 1.0})
    with pytest.raises(ValueError, match="damping must be"):
        sim.rollout(2, params={"damping": float("inf")})


def test_replace_builds_a_new_simulator():
    sim = make_sim(ground=0.0)
    faster = sim.replace(dt=5e-4, substeps=2)
    assert faster.model.dt == 5e-4 and faster.model.substeps == 2 and sim.model.dt != 5e-4
    assert faster.model.ground.height == sim.model.ground.height
    with pytest.raises(ValueError, match="unknown Simulator arguments"):
        sim.replace(stiffness=1.0)


def test_rollout_inputs_are_checked_before_any_step():
    sim = make_sim(ground=0.0)
    state = sim.initial_state()
    below = ds.State(state.positions.clone(), state.velocities)
    below.positions[0, 1] = -1e-3
    with pytest.raises(ValueError, match="vertices \\[0\\] of the start state are at or below"):
        sim.rollout(2, state=below)
    bad = ds.State(state.positions, state.velocities.clone())
    bad.velocities[3, 0] = float("nan")
    with pytest.raises(ValueError, match="the start state's velocities contain NaN"):
        sim.rollout(2, state=bad)
    fixed = make_sim(ground=0.0, fixed=[0])
    x0 = fixed.initial_state().positions[[0]]
    with pytest.raises(ValueError, match="fixed_positions go at or below the ground"):
        fixed.rollout(2, fixed_positions=x0 - torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="fixed_positions contain NaN"):
        fixed.rollout(2, fixed_positions=x0 * float("nan"))
    E = torch.tensor(2e4, requires_grad=True)
    leaf = make_sim(BOX, ds.StableNeoHookean(E, 0.3, 1000.0))
    with torch.no_grad():
        E.fill_(-5.0)  # an optimiser step gone wrong, in place
    with pytest.raises(ValueError, match="youngs_modulus must be > 0 Pa, got -5"):
        leaf.rollout(2)
    assert len(sim.rollout(np.int64(3)).positions) == 4  # numpy integers are integers


def test_a_rollout_goes_on_from_pairs_pressed_closer_than_a_thousandth_of_dhat():
    # Pressed hard, surfaces come far inside the barrier: the Armadillo on its crease has
    # pairs at 3e-4 dhat (frame 140) and 8e-4 dhat (frame 250). A rollout must go on from
    # any state a rollout made (diffsim run and the viewer roll out in chunks); before, a
    # start state closer than 1e-3 dhat was refused as "touching" and the Armadillo stopped
    # at frame 250. Refused now: pairs at the barrier's distance floor (1e-6 dhat) or closer,
    # or closer than the working dtype resolves at the scene's size.
    from diffsim.contact.potential import MIN_DISTANCE_FRACTION

    a = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=(1, 1, 1), origin=(0.0, 0.2, 0.0))
    b = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=(1, 1, 1), origin=(0.02, 0.35, 0.01))
    mesh = ds.TetMesh.merge([a, b])
    # (dtype, gap in dhat, refused): float32 (the default) resolves about 3e-8 m here, so the
    # floor (1e-9 m) is checked in float64, and exact touching in float32.
    cases = [
        (torch.float32, 5e-4, False),
        (torch.float64, 5e-4, False),
        (torch.float64, 0.5 * MIN_DISTANCE_FRACTION, True),
        (torch.float32, 0.0, True),
    ]
    for dtype, gap, refused in cases:
        sim = ds.Simulator(mesh, ds.StableNeoHookean(1e5, 0.3), contact=True, dtype=dtype)
        dhat = sim.model.contact.dhat
        x = sim.initial_state().positions.clone()
        x[a.n_vertices :, 1] -= 0.05 - gap * dhat  # the upper box's bottom at the gap
        closest = sim.model.contact.min_distance(x)
        assert closest == pytest.approx(gap * dhat, rel=0.05, abs=1e-8)  # float32: rounding
        if refused:
            # A state made directly (initial_state may refuse it first: at gap 0 the box
            # sinks into the other by a rounding, a crossing).
            state = ds.State(x, torch.zeros((len(x), 3), dtype=dtype))
            with pytest.raises(ValueError, match="surfaces touch or overlap in the start state"):
                sim.rollout(1, state=state)
            continue
        start = sim.initial_state(positions=x)
        with torch.no_grad():
            traj = sim.rollout(5, state=start)
        assert torch.isfinite(traj.positions).all()
        assert min(sim.model.contact.min_distance(p) for p in traj.positions) > 0.0


@pytest.mark.parametrize("offset", [(0.0, 0.0), (0.02, 0.01)])
def test_overlapping_bodies_are_refused_at_the_start(offset):
    """The upper box sunk 5 cm into the lower one. Moved across (edges through faces),
    initial_state finds the crossings; with the grids lined up the overlap is coplanar faces
    and collinear edges, at distance 0, which the rollout's start check refuses."""
    dx, dz = offset
    a = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=(1, 1, 1), origin=(0.0, 0.2, 0.0))
    b = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=(1, 1, 1), origin=(dx, 0.35, dz))
    sim = ds.Simulator(ds.TetMesh.merge([a, b]), ds.StableNeoHookean(1e5, 0.3), contact=True)
    x = sim.initial_state().positions.clone()
    x[a.n_vertices :, 1] -= 0.1
    if dx:
        with pytest.raises(ValueError, match="intersect in the initial positions: bodies 0 and"):
            sim.initial_state(positions=x)
    else:
        with pytest.raises(ValueError, match="surfaces touch or overlap in the start state"):
            sim.rollout(1, state=sim.initial_state(positions=x))
