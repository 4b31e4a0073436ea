"""The volume limit (``Simulator(min_volume_ratio=...)``, diffsim.physics.volume_limit): no
step brings a tet below the floor, in the default configuration (float32, ground, contact)
on both backends and on the fused contact substeps; its gradients are those of the steps
actually taken."""

from __future__ import annotations

import warnings

import pytest
import torch
import warp as wp

import diffsim as ds
from diffsim.kernels.runtime import init_warp
from diffsim.kernels.volume_limit import first_crossing as warp_first_crossing
from diffsim.physics.elasticity import volume_ratios
from diffsim.physics.volume_limit import BISECTIONS, first_crossing
from tests.helpers import check_gradient


def soft_cube(floor: float | None, **settings) -> ds.Simulator:
    """The soft cube of issue #14 (E = 2e4 Pa, 10 cm, 1 cm above the ground), which a drop
    at 5 m/s inverts: defaults otherwise (float32, ground, contact, substeps="auto")."""
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=3, origin=(-0.05, 0.01, -0.05))
    material = ds.StableNeoHookean(youngs_modulus=2e4, poissons_ratio=0.3)
    return ds.Simulator(mesh, material, substeps="auto", min_volume_ratio=floor, **settings)


def lowest_ratio(sim: ds.Simulator, traj) -> float:
    m = sim.model
    return min(float(volume_ratios(x, m.tets, m.dm_inv.double()).min()) for x in traj.positions)


def drop(sim: ds.Simulator, steps: int = 30, speed: float = 5.0):
    return sim.rollout(steps, sim.initial_state(velocities=(0.0, -speed, 0.0)))


def random_crossings(count: int, floor: float):
    """Tets ``(f0, df, floors)`` that start at or above their floor and end below it."""
    gen = torch.Generator().manual_seed(0)
    f0 = torch.eye(3, dtype=torch.float64) + 0.3 * torch.randn(
        count, 3, 3, generator=gen, dtype=torch.float64
    )
    df = 1.5 * torch.randn(count, 3, 3, generator=gen, dtype=torch.float64)
    floors = torch.clamp(torch.linalg.det(f0), max=floor)
    crossing = (torch.linalg.det(f0) >= floors) & (torch.linalg.det(f0 + df) < floors)
    return f0[crossing], df[crossing], floors[crossing]


def test_first_crossing_is_the_first_root_of_the_cubic_in_torch_and_warp():
    f0, df, floors = random_crossings(4000, 0.2)
    t = first_crossing(f0, df, floors)
    # Brute force: the first sample below the floor on a fine grid.
    grid = torch.linspace(0.0, 1.0, 20001, dtype=torch.float64)
    ratios = torch.linalg.det(f0[:, None] + grid[None, :, None, None] * df[:, None])
    first_below = torch.argmax((ratios < floors[:, None]).to(torch.int8), dim=1)
    brute = grid[first_below - 1]
    # Tets whose ratio dips below the floor and comes back up within the step.
    returning = int((torch.linalg.det(f0 + df) >= floors).sum())
    init_warp()

    @wp.kernel
    def crossings(
        f0: wp.array(dtype=wp.mat33d),
        df: wp.array(dtype=wp.mat33d),
        floors: wp.array(dtype=wp.float64),
        out: wp.array(dtype=wp.float64),
    ):
        k = wp.tid()
        out[k] = warp_first_crossing(f0[k], df[k], floors[k], BISECTIONS)

    out = torch.zeros(len(t), dtype=torch.float64)
    wp.launch(
        crossings,
        dim=len(t),
        inputs=[wp.from_torch(f0, dtype=wp.mat33d), wp.from_torch(df, dtype=wp.mat33d),
                wp.from_torch(floors), wp.from_torch(out)],
        device="cpu",
    )  # fmt: skip
    grid_error = float((t - brute).abs().max())
    warp_error = float((out - t).abs().max())
    ends = torch.linalg.det(f0 + t[:, None, None] * df) - floors
    low, high = float(ends.min()), float(ends.max())
    print(f"{len(t)} tets: |t - grid| <= {grid_error:.2e} (grid 5e-5), |warp - torch| "
          f"{warp_error:.2e}, J(t) - floor in [{low:.2e}, {high:.2e}]")  # fmt: skip
    assert len(t) > 500 and returning == 0
    assert grid_error <= 5.1e-5  # the grid's spacing: t is the crossing the grid brackets
    assert low >= -1e-12 and high < 1e-9
    assert warp_error < 1e-12


@pytest.mark.parametrize("backend", ["warp", "torch"])
def test_a_soft_cube_dropped_at_5_m_s_keeps_every_tet_above_the_floor(backend):
    # Without the limit the drop inverts tets (the mechanism must have something to do).
    with pytest.warns(ds.StabilityWarning, match="inverted"):
        free = drop(soft_cube(None, backend=backend))
    sim = soft_cube(0.2, backend=backend)
    with pytest.warns(ds.StabilityWarning, match="volume limit cut"):
        traj = drop(sim)
    low = lowest_ratio(sim, traj)
    counts = sim.model.volume_limit.counts
    print(f"{backend}: lowest J {lowest_ratio(sim, free):.3f} without, {low:.6f} with; {counts}")
    assert lowest_ratio(sim, free) < 0.0
    assert counts["limited_vertex_steps"] > 0 and counts["cancelled_substeps"] == 0
    assert sim.volume_steps_cut == counts["limited_vertex_steps"]
    assert low >= 0.2 - 1e-8 and not sim.inversions
    assert torch.isfinite(traj.positions).all()
    assert float(traj.positions[:, :, 1].min()) > 0.0  # on the ground, never through it
    assert float(traj.positions[-1, :, 1].max()) < 0.11  # it landed
    if backend == "warp":
        assert sim.backend.fused_contact.counts["fused_substeps"] > 0  # checked in the launch


def test_two_soft_cubes_meeting_at_50_m_s_stay_above_the_floor_and_apart():
    """Issue #14's head-on soft cubes (E = 1e5 Pa; there J -2.66 at 50 m/s): the defaults with
    a floor of 0.1 keep every tet above it and the surfaces apart at every frame and between
    frames (ipctk), with the collision limit and the volume limit both acting."""
    ipctk = pytest.importorskip("ipctk")
    a = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=3, origin=(-0.11, 0.5, -0.05))
    b = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=3, origin=(0.01, 0.5, -0.05))
    mesh = ds.TetMesh.merge([a, b])
    material = ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.3)
    n = mesh.n_vertices
    v = torch.zeros((n, 3))
    v[: n // 2, 0], v[n // 2 :, 0] = 25.0, -25.0
    lowest = {}
    for floor in (None, 0.1):
        sim = ds.Simulator(
            mesh, material, substeps="auto", gravity=(0, 0, 0), ground=None,
            min_volume_ratio=floor,
        )  # fmt: skip
        with pytest.warns(ds.StabilityWarning):
            traj = sim.rollout(40, sim.initial_state(velocities=v))
        lowest[floor] = lowest_ratio(sim, traj)
    print(f"lowest J {lowest}; volume limit cut {sim.volume_steps_cut}, collision limit "
          f"{sim.contact_steps_cut} vertex-steps")  # fmt: skip
    assert lowest[None] < 0.0  # without the floor they invert
    assert lowest[0.1] >= 0.1 - 1e-8 and not sim.inversions
    assert sim.volume_steps_cut > 0 and sim.contact_steps_cut > 0
    assert float(traj.positions[-1, : n // 2, 0].mean()) < float(
        traj.positions[-1, n // 2 :, 0].mean()
    )
    cmesh = ipctk.CollisionMesh.build_from_full_mesh(
        mesh.vertices, mesh.surface_edges, mesh.surface_faces
    )
    x = traj.positions.numpy()
    for i in range(len(x)):
        assert not ipctk.has_intersections(cmesh, cmesh.vertices(x[i])), f"frame {i}"
        if i:
            before, after = cmesh.vertices(x[i - 1]), cmesh.vertices(x[i])
            assert ipctk.is_step_collision_free(cmesh, before, after), f"step {i}"


def two_contact_workers(monkeypatch) -> None:
    """Fused contact launches of these small meshes on two threads (the second flags the
    tets of its half that the limit's first round cuts, and adds their forces)."""
    from diffsim.backends.warp import contact_steps

    monkeypatch.setattr(contact_steps, "MIN_TETS_PER_CONTACT_WORKER", 50)


@pytest.mark.parametrize("workers", [1, 2])
def test_the_fused_contact_substeps_limit_as_the_general_path_does(workers, monkeypatch):
    if workers == 2:
        two_contact_workers(monkeypatch)
    sim = soft_cube(0.2, dtype=torch.float64)
    plain = sim.replace()
    plain.backend.fused_contact.usable = lambda: False
    with pytest.warns(ds.StabilityWarning):
        fused, general = drop(sim), drop(plain)
    error = float((fused.positions - general.positions).abs().max())
    counts, plain_counts = sim.model.volume_limit.counts, plain.model.volume_limit.counts
    print(f"fused {counts}, general {plain_counts}; max |x_fused - x_general| {error:.2e} m")
    assert sim.backend.fused_contact.counts["fused_substeps"] > 0
    assert plain.backend.fused_contact.counts["fused_substeps"] == 0
    assert len(sim.backend.fused_contact._team(torch.float64).bounds) == workers
    assert counts == plain_counts and counts["limited_vertex_steps"] > 0
    assert error < 1e-10


@pytest.mark.parametrize("workers", [1, 2])
def test_the_fused_turns_of_both_limits_take_the_general_path_steps(workers, monkeypatch):
    """The 50 m/s soft cubes in float64 (floor 0.1): where the volume limit cuts and the step
    limit then shortens the step again, the launch takes more turns, each measuring only
    the tets with a corner the step limit moved (the others passed at that step already).
    From the same states, each step equals the general path's, which measures every tet in
    every turn (the trajectories of the two paths drift apart over many such steps, at
    rounding level, hence one step at a time). On one thread or two."""
    if workers == 2:
        two_contact_workers(monkeypatch)
    a = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=3, origin=(-0.11, 0.5, -0.05))
    b = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=3, origin=(0.01, 0.5, -0.05))
    mesh = ds.TetMesh.merge([a, b])
    n = mesh.n_vertices
    v = torch.zeros((n, 3), dtype=torch.float64)
    v[: n // 2, 0], v[n // 2 :, 0] = 25.0, -25.0
    sim = ds.Simulator(
        mesh, ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.3), substeps="auto",
        gravity=(0, 0, 0), ground=None, min_volume_ratio=0.1, dtype=torch.float64,
    )  # fmt: skip
    plain = sim.replace()
    plain.backend.fused_contact.usable = lambda: False
    state, worst = sim.initial_state(velocities=v), 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ds.StabilityWarning)
        for _ in range(12):
            fused = sim.rollout(1, state).state(-1)
            general = plain.rollout(1, state).state(-1)
            worst = max(worst, float((fused.positions - general.positions).abs().max()))
            state = fused
    counts = sim.backend.fused_contact.counts
    limits = (sim.model.volume_limit.counts, plain.model.volume_limit.counts)
    print(f"{counts}; volume limit {limits}; worst step |x_fused - x_general| {worst:.2e} m")
    assert counts["volume_turns"] > 0 and counts["fused_substeps"] > 0  # turns in launches
    assert len(sim.backend.fused_contact._team(torch.float64).bounds) == workers
    assert limits[0] == limits[1]
    assert worst < 1e-12


def test_contact_free_steps_the_limit_would_cut_are_taken_with_contact(monkeypatch):
    """A soft cube squeezed by its own inward velocities (2 m/s at the faces) in empty space,
    contact on, nothing near anything: the fused contact-free steps check the floor in their
    launch, and the steps that would go below it are taken again with contact (which cuts
    them), as the torch backend's general path takes every step. Blocks of any length are
    tried (no SUBSTEPS_PER_CHECK rule), so the short ones here run fused."""
    from diffsim.backends.warp import contact_free

    monkeypatch.setattr(contact_free, "SUBSTEPS_PER_CHECK", 0)
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=3, origin=(-0.05, -0.05, -0.05))
    material = ds.StableNeoHookean(youngs_modulus=2e4, poissons_ratio=0.3)
    v = -2.0 * torch.as_tensor(mesh.vertices, dtype=torch.float32) / 0.05
    runs = {}
    for backend in ("warp", "torch"):
        sim = ds.Simulator(
            mesh, material, substeps="auto", gravity=(0, 0, 0), ground=None,
            min_volume_ratio=0.5, backend=backend,
        )  # fmt: skip
        with pytest.warns(ds.StabilityWarning, match="volume limit cut"):
            runs[backend] = (sim, sim.rollout(20, sim.initial_state(velocities=v)))
    (sim, traj), (reference, ref_traj) = runs["warp"], runs["torch"]
    blocks = sim.backend.contact_free.counts
    error = float((traj.positions - ref_traj.positions).abs().max())
    print(f"{blocks}; {sim.model.volume_limit.counts}; |x_warp - x_torch| {error:.2e} m")
    assert blocks["fused_steps"] > 0 and blocks["failed_tries"] > 0  # the check acted
    assert sim.contact_steps_cut == 0  # no surfaces came near: the volume limit cut them
    assert sim.model.volume_limit.counts == reference.model.volume_limit.counts
    assert sim.volume_steps_cut > 0 and lowest_ratio(sim, traj) >= 0.5 - 1e-8
    assert error < 1e-5  # float32 forces on two backends


def test_without_surface_contact_the_limit_holds_as_well():
    sim = soft_cube(0.2, contact=False)
    with pytest.warns(ds.StabilityWarning, match="volume limit cut"):
        traj = drop(sim)
    assert sim.model.volume_limit.counts["limited_vertex_steps"] > 0
    assert lowest_ratio(sim, traj) >= 0.2 - 1e-8 and not sim.inversions


@pytest.mark.parametrize(
    ("backend", "contact"), [("warp", False), ("torch", False), ("warp", True)]
)
def test_gradients_through_limited_steps_match_finite_differences(backend, contact):
    """float64: d loss / d initial velocity through a drop whose steps the limit cuts: the
    derivative of the steps taken (the crossings by the implicit function theorem), not of
    a limit held constant. The velocities are uneven: a symmetric drop gives tets equal
    crossings at shared corners, where the smallest scale is not differentiable."""
    sim = soft_cube(0.5, dtype=torch.float64, backend=backend, contact=contact)
    n = sim.mesh.n_vertices
    uneven = torch.Generator().manual_seed(5)
    base = 0.3 * torch.randn((n, 3), generator=uneven, dtype=torch.float64)
    base[:, 1] -= 3.0
    weights = torch.linspace(0.5, 1.5, n, dtype=torch.float64)

    def loss(v0: torch.Tensor) -> torch.Tensor:
        traj = sim.rollout(12, sim.initial_state(velocities=v0))
        return (weights * traj.positions[-1][:, 1]).sum() + traj.velocities[-1][:, 0].sum()

    with pytest.warns(ds.StabilityWarning):
        errors = [check_gradient(loss, base, eps=1e-7, rtol=1e-5, seed=s) for s in range(3)]
    counts = sim.model.volume_limit.counts
    print(f"{backend}: relative errors {[f'{e:.1e}' for e in errors]}; {counts}")
    assert counts["limited_vertex_steps"] > 0


def test_with_worlds_each_world_is_limited_as_it_is_alone():
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=3, origin=(-0.05, 0.01, -0.05))
    material = ds.StableNeoHookean(youngs_modulus=torch.tensor([2e4, 1e5]), poissons_ratio=0.3)
    sim = ds.Simulator(mesh, material, substeps="auto", worlds=2, min_volume_ratio=0.2)
    with pytest.warns(ds.StabilityWarning, match="volume limit cut"):
        traj = drop(sim)
    alone = soft_cube(0.2)
    with pytest.warns(ds.StabilityWarning, match="volume limit cut"):
        reference = drop(alone)
    error = float((traj.positions[:, 0] - reference.positions).abs().max())
    print(f"world 0 against alone: {error:.2e} m; {sim.model.volume_limit.counts}")
    assert sim.model.volume_limit.counts == alone.model.volume_limit.counts
    assert error < 1e-6  # float32 forces on two paths (the worlds' general, alone fused)
    assert not sim.inversions


@pytest.mark.parametrize("backend", ["warp", "torch"])
def test_gradients_where_both_limits_cut_in_turn_match_finite_differences(backend):
    """Two soft cubes pressed together at 3 m/s each with a high floor (0.6): the collision
    limit and the volume limit both cut, in turns on the same steps; float64 gradients of
    the steps taken against central differences."""
    a = ds.TetMesh.box(size=(0.05, 0.05, 0.05), resolution=2, origin=(-0.052, 0.1, 0))
    b = ds.TetMesh.box(size=(0.05, 0.05, 0.05), resolution=2, origin=(0.002, 0.105, 0.01))
    material = ds.StableNeoHookean(youngs_modulus=2e4, poissons_ratio=0.3, density=1000.0)
    sim = ds.Simulator(
        ds.TetMesh.merge([a, b]), material, dt=2e-3, substeps=4, dtype=torch.float64,
        ground=None, min_volume_ratio=0.6, backend=backend,
    )  # fmt: skip
    n = sim.mesh.n_vertices
    v = 0.05 * torch.randn((n, 3), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    v[: n // 2, 0] += 3.0
    v[n // 2 :, 0] -= 3.0

    def loss(v0: torch.Tensor) -> torch.Tensor:
        traj = sim.rollout(10, sim.initial_state(velocities=v0))
        return traj.positions[-1][:, 0].square().sum() + traj.velocities[-1].sum()

    with pytest.warns(ds.StabilityWarning):
        errors = [check_gradient(loss, v, eps=1e-7, rtol=1e-5, seed=s) for s in range(3)]
    counts = sim.model.volume_limit.counts
    print(f"{backend}: relative errors {[f'{e:.1e}' for e in errors]}; {counts}; collision "
          f"limit {sim.contact_steps_cut} vertex-steps")  # fmt: skip
    assert counts["limited_vertex_steps"] > 0 and sim.contact_steps_cut > 0
    assert counts["cancelled_substeps"] == 0


@pytest.mark.parametrize("value", [0.0, 1.0, -0.1, 1.5, float("nan"), "0.1x", [0.1]])
def test_a_floor_outside_0_1_is_refused_with_the_option_named(value):
    with pytest.raises(ValueError, match=r"min_volume_ratio must be in \(0, 1\)"):
        soft_cube(value)


SCENE = """
import diffsim as ds

STEPS = 30

def build():
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=3, origin=(-0.05, 0.01, -0.05))
    material = ds.StableNeoHookean(youngs_modulus=2e4, poissons_ratio=0.3)
    return ds.Simulator(mesh, material, substeps="auto", min_volume_ratio=0.2)

def initial_state(sim):
    return sim.initial_state(velocities=(0.0, -5.0, 0.0))
"""


def test_the_run_summary_reports_the_volume_limit(tmp_path, capsys):
    from diffsim.apps import cli

    path = tmp_path / "drop.py"
    path.write_text(SCENE)
    assert cli.main(["run", str(path)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "StabilityWarning: the volume limit cut" in captured.out + captured.err
    line = next(line for line in out.splitlines() if "volume limit" in line)
    print(line)
    assert "J >= 0.2; it cut 335 vertex-steps in 17 substeps (they lost energy)" in line
    assert "inverted tets: none" in out
