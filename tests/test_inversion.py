"""Inverted tets (J <= 0) are counted at every frame, reported once, and never hidden."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import diffsim as ds
from diffsim.apps import cli
from diffsim.physics.elasticity import volume_ratios

from .scene_rollouts import scene_rollout

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SCENES = sorted((ROOT / "scenes").glob("*.py"))
SPEED = 5.0  # m/s, straight down onto the ground
STEPS = 40  # the soft cube lands at frame 2 and is crushed for tens of frames


def cube() -> ds.TetMesh:
    return ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=3, origin=(-0.05, 0.01, -0.05))


def drop(sim: ds.Simulator, steps: int = STEPS):
    """Rolls out the cube thrown down at SPEED; returns (trajectory, inversion warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            traj = sim.rollout(steps, sim.initial_state(velocities=(0.0, -SPEED, 0.0)))
    inverted = [
        w
        for w in caught
        if issubclass(w.category, ds.StabilityWarning) and "inverted" in str(w.message)
    ]
    return traj, inverted


def direct_counts(sim: ds.Simulator, traj) -> torch.Tensor:
    """Inverted tets per frame after the first, ``[T]`` (``[T, W]`` with worlds), by J."""
    m, W = sim.model, sim.n_worlds
    rows = []
    for x in traj.positions[1:]:
        J = volume_ratios(x.detach().reshape(-1, 3), m.tets, m.dm_inv.double())
        rows.append((J <= 0).view(W, -1).sum(1))
    counts = torch.stack(rows)
    return counts if sim.worlds is not None else counts[:, 0]


def test_a_soft_cube_dropped_at_5_m_s_inverts_and_says_so_once():
    sim = ds.Simulator(cube(), ds.StableNeoHookean(youngs_modulus=2e4, poissons_ratio=0.3))
    traj, inverted = drop(sim)
    record = sim.inversions
    expected = direct_counts(sim, traj)
    assert int(expected.max()) > 0  # the scene does invert
    assert torch.equal(record.counts, expected)
    assert record and record.max_per_frame == int(expected.max())
    assert record.frames_affected == int((expected > 0).sum())
    first = int(torch.nonzero(expected)[0]) + 1
    assert record.first_frame == first
    J = volume_ratios(traj.positions[first], sim.model.tets, sim.model.dm_inv.double())
    assert record.first_tets == torch.nonzero(J <= 0).flatten().tolist()
    worst = min(
        float(volume_ratios(x, sim.model.tets, sim.model.dm_inv.double()).min())
        for x in traj.positions
    )
    assert record.min_volume_ratio == pytest.approx(worst, rel=1e-6)
    # One warning, with the numbers and the fixes.
    assert len(inverted) == 1
    text = str(inverted[0].message)
    assert f"frame {first}" in text and f"{record.min_volume_ratio:.3g}" in text
    assert "substeps" in text and "stiffer" in text and "StableNeoHookean" in text
    # The state diagnostic agrees with a direct computation.
    assert torch.equal(sim.inverted_tets(traj.state(first)), torch.nonzero(J <= 0).flatten())
    assert len(sim.inverted_tets(traj.state(0))) == 0
    # A second rollout: a fresh record, and no second warning from this simulator.
    traj2, again = drop(sim, 5)
    assert again == [] and sim.inversions.counts.shape == (5,)
    assert torch.equal(sim.inversions.counts, direct_counts(sim, traj2))
    assert "none" not in record.summary() and str(first) in record.summary()


def test_the_record_is_kept_with_gradients_and_by_step():
    sim = ds.Simulator(cube(), ds.StableNeoHookean(youngs_modulus=2e4, poissons_ratio=0.3))
    E = torch.tensor(2e4, requires_grad=True)
    state = sim.initial_state(velocities=(0.0, -SPEED, 0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ds.StabilityWarning)
        traj = sim.rollout(12, state, checkpoint_every=5, params={"youngs_modulus": E})
        traj.positions[-1, :, 1].sum().backward()  # recomputes segments: the record stays
    assert torch.equal(sim.inversions.counts, direct_counts(sim, traj))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ds.StabilityWarning)
        state = sim.step(traj.state(3))
    assert sim.inversions.counts.shape == (1,)
    assert int(sim.inversions.counts[0]) == len(sim.inverted_tets(state))


def test_a_stiff_cube_at_the_same_speed_does_not_invert():
    sim = ds.Simulator(
        cube(), ds.StableNeoHookean(youngs_modulus=1e6, poissons_ratio=0.3), substeps="auto"
    )
    traj, inverted = drop(sim)
    assert inverted == []
    assert int(sim.inversions.counts.sum()) == 0 and not sim.inversions
    assert sim.inversions.first_frame is None and sim.inversions.min_volume_ratio is None
    assert int(direct_counts(sim, traj).sum()) == 0
    assert sim.inversions.summary() == "none"


def test_worlds_name_the_world_that_inverts():
    E = torch.tensor([1e6, 2e4])
    sim = ds.Simulator(
        cube(),
        ds.StableNeoHookean(youngs_modulus=E, poissons_ratio=0.3),
        substeps="auto",
        worlds=2,
    )
    traj, inverted = drop(sim)
    record = sim.inversions
    expected = direct_counts(sim, traj)
    assert record.counts.shape == (STEPS, 2)
    assert torch.equal(record.counts, expected)
    assert int(expected[:, 0].sum()) == 0 and int(expected[:, 1].sum()) > 0
    assert record.first_world == 1 and record.worlds_affected == [1]
    assert len(inverted) == 1 and "of world 1" in str(inverted[0].message)
    state = traj.state(record.first_frame)
    per_world = sim.inverted_tets(state)
    assert len(per_world) == 2 and len(per_world[0]) == 0
    dm_inv = sim.model.dm_inv[: sim.mesh.n_tets].double()
    J = volume_ratios(state.positions[1], sim.model.tets[: sim.mesh.n_tets], dm_inv)
    assert torch.equal(per_world[1], torch.nonzero(J <= 0).flatten())
    assert record.first_tets == per_world[1].tolist()


@pytest.mark.parametrize("worlds", [None, 3], ids=["one_world", "worlds"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_the_kernel_counts_what_torch_counts_on_a_deformed_mesh(dtype, worlds):
    """The Warp count (and the torch fallback) equals J <= 0 computed directly, per frame
    and world, with the lowest J per frame; the record names the first tets and the worst."""
    from diffsim.simulator import _InversionCheck, _InversionLog

    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=5, origin=(0.0, 0.1, 0.0))  # 750 tets
    material = ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.3)
    sim = ds.Simulator(mesh, material, substeps="auto", dtype=dtype, worlds=worlds, contact=False)
    m, W = sim.model, sim.n_worlds
    rest = m.rest_positions.double()
    gen = torch.Generator().manual_seed(0)
    K = 6
    noise = torch.randn((K, *rest.shape), generator=gen, dtype=torch.float64)
    amplitude = 0.005 + 0.004 * torch.rand((K, 1, 1), generator=gen, dtype=torch.float64)
    xs = rest + amplitude * noise  # m, edges of 2 cm
    xs[1] = rest  # a frame with none
    J = torch.stack([volume_ratios(x, m.tets, m.dm_inv.double()) for x in xs])
    expected = (J <= 0).view(K, W, -1).sum(dim=2)
    lowest = torch.where(J <= 0, J, torch.inf).amin(dim=1)
    assert int(expected[1].sum()) == 0 and int((expected.sum(dim=1) > 0).sum()) == K - 1
    assert bool((expected.sum(dim=0) > 0).all())  # in every world
    from diffsim import simulator
    from diffsim.backends.warp.threads import SplitLauncher

    check = _InversionCheck(m)
    assert check.kernels is not None
    single = xs.to(torch.float32)  # a float32 simulation's frames, read as float64
    J32 = torch.stack([volume_ratios(x, m.tets, m.dm_inv.double()) for x in single.double()])
    for path in ("warp", "warp, two threads", "warp, float32 frames", "torch"):
        frames, want, want_low, launcher = xs, expected, lowest, None
        if path == "warp, two threads":  # the frames split between the CPU threads
            launcher = SplitLauncher.shared(2)
        if path == "warp, float32 frames":
            frames, want = single, (J32 <= 0).view(K, W, -1).sum(dim=2)
            want_low = torch.where(J32 <= 0, J32, torch.inf).amin(dim=1)
        if path == "torch":
            check.kernels = None
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(simulator, "INVERSION_SPLIT", 0)  # however few tet-frames
            counts, low = check(frames, launcher)
        assert torch.equal(counts, want), path
        torch.testing.assert_close(low, want_low, rtol=1e-12, atol=0.0)
        want_J = J32[3] if frames is single else J[3]
        torch.testing.assert_close(check.volume_ratios(frames[3]), want_J, rtol=1e-10, atol=1e-12)
    # The record of these frames as a rollout's (frames 1..K).
    sim._inversion_log = _InversionLog(K, sim.worlds, m.dt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sim._count_inversions(xs, 0)
    record = sim.inversions
    assert torch.equal(record.counts, expected if worlds else expected[:, 0])
    assert len(caught) == 1 and "inverted" in str(caught[0].message)
    k = int(torch.nonzero(expected.sum(dim=1))[0])
    world = int(torch.nonzero(expected[k])[0])
    per_world = J[k].view(W, -1)[world]
    assert (record.first_frame, record.first_world) == (k + 1, world)
    assert record.first_tets == torch.nonzero(per_world <= 0).flatten().tolist()
    worst = int(J.argmin())
    assert record.min_volume_ratio == pytest.approx(float(J.min()), rel=1e-12)
    assert record.worst_frame == worst // J.shape[1] + 1
    tet = worst % J.shape[1]
    assert (record.worst_world, record.worst_tet) == (tet // mesh.n_tets, tet % mesh.n_tets)


SOFT_SCENE = """
import diffsim as ds

STEPS = 30

def build():
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=3, origin=(-0.05, 0.01, -0.05))
    material = ds.StableNeoHookean(youngs_modulus=2e4, poissons_ratio=0.3)
    return ds.Simulator(mesh, material, substeps="auto")

def initial_state(sim):
    return sim.initial_state(velocities=(0.0, -5.0, 0.0))
"""


@pytest.mark.parametrize("soft", [True, False], ids=["soft", "stiff"])
def test_the_run_summary_reports_inverted_tets(tmp_path, capsys, soft):
    text = SOFT_SCENE if soft else SOFT_SCENE.replace("2e4", "1e6").replace("-5.0", "-0.5")
    path = tmp_path / "drop.py"
    path.write_text(text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ds.StabilityWarning)
        assert cli.main(["run", str(path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "inverted tets" in line]
    assert len(lines) == 1, lines
    if soft:
        assert "up to" in lines[0] and "of 30 frames" in lines[0] and "first at frame" in lines[0]
    else:
        assert lines[0].strip() == "inverted tets: none"


# Steps per scene: past the first impact (the drops land within these), kept short; the
# least checked (the rollouts shared in tests/scene_rollouts.py may be longer).
SCENE_STEPS = {
    "armadillo_drop": 160,  # it topples and rests on a crease from frame 145 on
    "bunny_drop": 150,
    "cantilever": 100,
    "cube_drop": 260,
    "cube_stack": 150,
    "mat_on_sphere": 120,
    "sphere_bounce": 300,
    "spheres_collide": 120,
    "torus_chain": 60,
}


@pytest.mark.parametrize("path", SCENES, ids=[p.stem for p in SCENES])
def test_the_scenes_do_not_invert(path):
    # The scene's rollout shared with test_contact_scenes and test_scenes: at least these
    # steps, and its record covers all of them.
    _, sim, traj = scene_rollout(path.stem, SCENE_STEPS.get(path.stem, 50))
    record = sim.inversions
    assert len(record.counts) == len(traj.positions) - 1 >= SCENE_STEPS.get(path.stem, 50)
    assert not record, f"{path.stem}: {record.summary()}"
