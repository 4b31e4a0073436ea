"""Fitting: the observation format and its checks, and recovery of E, nu, damping and fields."""

from __future__ import annotations

import argparse
import json
import math
import textwrap

import numpy as np
import pytest
import torch

import diffsim as ds
from diffsim.apps.cli.fit import configure, write_loss_plot
from diffsim.apps.cli.fit import main as fit_main
from diffsim.fitting.fit import fit, tet_adjacency
from diffsim.fitting.observation import Observation, ObservationError

torch.set_num_threads(1)

TRUE_E, TRUE_NU = 1e5, 0.3
STEPS = 40
MARKERS = np.array([0, 3, 12, 15, 48, 51, 60, 63, 21, 42])  # box corners and two inner points


def make_sim(E=TRUE_E, nu=TRUE_NU, damping=0.0) -> ds.Simulator:
    """A free 10 cm cube (64 vertices, 162 tets), float64, no gravity or ground."""
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=3)
    material = ds.StableNeoHookean(youngs_modulus=E, poissons_ratio=nu)
    return ds.Simulator(
        mesh,
        material,
        dt=1e-3,
        substeps=2,
        gravity=(0.0, 0.0, 0.0),
        ground=None,
        damping=damping,
        backend="torch",
        dtype=torch.float64,
    )


def start(sim: ds.Simulator) -> ds.State:
    """Stretched along x, squeezed along y and sheared: E sets the frequency, nu the coupling."""
    x = sim.model.rest_positions
    d = x - x.mean(dim=0)
    moved = x.mean(dim=0) + d * torch.tensor([1.1, 0.97, 1.0], dtype=x.dtype)
    moved[:, 0] += 0.05 * d[:, 1]
    return sim.initial_state(positions=moved)


@pytest.fixture(scope="module")
def truth() -> ds.Trajectory:
    sim = make_sim()
    with torch.no_grad():
        return sim.rollout(STEPS, state=start(sim))


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# --------------------------------------------------------------------- the format
def test_trajectory_file_is_a_valid_target(truth, tmp_path):
    path = tmp_path / "traj.npz"
    truth.save(path)
    obs = Observation.load(path)
    assert obs.indices is None and obs.n_frames == STEPS + 1 and obs.n_points == 64
    np.testing.assert_array_equal(obs.steps(1e-3), np.arange(STEPS + 1))
    obs.check(64, 1e-3, STEPS)
    torch.testing.assert_close(obs.predict(truth.positions, 1e-3), truth.positions)


def test_marker_file_round_trip(tmp_path):
    x = np.random.default_rng(0).normal(size=(5, 3, 3))
    x[2, 1] = np.nan
    obs = Observation(x, indices=[4, 0, 9], frames=[0, 2, 4, 6, 8], weights=[1.0, 2.0, 0.5])
    obs.save(tmp_path / "m.npz")
    back = Observation.load(tmp_path / "m.npz")
    np.testing.assert_array_equal(back.indices, [4, 0, 9])
    np.testing.assert_array_equal(back.frames, [0, 2, 4, 6, 8])
    np.testing.assert_array_equal(back.positions, x)
    target, weights = back.targets()
    assert weights[2, 1] == 0 and weights[0, 1] == 2.0 and torch.isfinite(target).all()


def test_times_between_steps_interpolate():
    positions = torch.arange(4 * 2 * 3, dtype=torch.float64).reshape(4, 2, 3)
    obs = Observation(np.zeros((2, 2, 3)), times=[0.0005, 0.002])
    pred = obs.predict(positions, dt=1e-3)
    torch.testing.assert_close(pred[0], 0.5 * (positions[0] + positions[1]))
    torch.testing.assert_close(pred[1], positions[2])
    assert obs.steps_needed(1e-3) == 2


def test_stride_sets_frame_steps():
    obs = Observation(np.zeros((4, 2, 3)), stride=5)
    np.testing.assert_array_equal(obs.steps(1e-3), [0, 5, 10, 15])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(positions=np.zeros((3, 4))), r"\[frames, points, 3\]"),
        (dict(positions=np.zeros((2, 3, 3)), indices=[0, 1]), r"indices must have shape \[3\]"),
        (dict(positions=np.zeros((2, 2, 3)), indices=[1, 1]), "repeat"),
        (dict(positions=np.zeros((2, 2, 3)), frames=[3, 1]), "strictly increasing"),
        (dict(positions=np.zeros((2, 2, 3)), times=[0.0]), r"times must have shape \[2\]"),
        (dict(positions=np.zeros((2, 2, 3)), weights=[1.0, -1.0]), ">= 0"),
        (dict(positions=np.full((2, 2, 3), np.nan)), "NaN"),
        (dict(positions=np.zeros((2, 2, 3)), stride=0), "stride"),
    ],
)
def test_malformed_observations_are_rejected(kwargs, message):
    with pytest.raises(ObservationError, match=message):
        Observation(**kwargs)


def test_file_without_positions_names_the_array(tmp_path):
    np.savez(tmp_path / "bad.npz", points=np.zeros((2, 2, 3)))
    with pytest.raises(ObservationError, match="no 'positions' array"):
        Observation.load(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError):
        Observation.load(tmp_path / "missing.npz")


def test_targets_that_do_not_match_the_scene(truth):
    sim = make_sim()
    wrong_count = Observation(np.zeros((3, 10, 3)))
    with pytest.raises(ObservationError, match="10 points per frame but the scene has 64"):
        fit(sim, wrong_count, iters=1)
    out_of_range = Observation(np.zeros((3, 2, 3)), indices=[5, 64])
    with pytest.raises(ObservationError, match=r"marker indices \[64\] are out of range"):
        fit(sim, out_of_range, iters=1)
    too_long = Observation.from_trajectory(truth)
    with pytest.raises(ObservationError, match="last frame is at step 40.*rollout has 20"):
        fit(sim, too_long, steps=20, iters=1)


def test_bad_parameters_are_rejected(truth):
    obs = Observation.from_trajectory(truth)
    with pytest.raises(ValueError, match="cannot fit 'stiffness'"):
        fit(make_sim(), obs, ["stiffness"])
    with pytest.raises(ValueError, match="not inside its bounds"):
        fit(make_sim(), obs, initial={"poissons_ratio": 0.5})
    with pytest.raises(ValueError, match="optimizer"):
        fit(make_sim(), obs, optimizer="sgd")


def test_tet_adjacency_pairs_tets_sharing_faces():
    two = np.array([[0, 1, 2, 3], [1, 2, 3, 4]])
    np.testing.assert_array_equal(tet_adjacency(two), [[0, 1]])
    mesh = ds.TetMesh.box(size=(1.0, 1.0, 1.0), resolution=2)
    pairs = tet_adjacency(mesh.tets)
    # Each interior face is shared once: (4 * tets - boundary faces) / 2.
    assert len(pairs) == (4 * mesh.n_tets - len(mesh.surface_faces)) // 2


# --------------------------------------------------------------------- recovery
def test_recovers_e_and_nu_noiseless_within_1_percent(truth):
    result = fit(
        make_sim(6e4, 0.2), Observation.from_trajectory(truth), state=start, iters=30, patience=3
    )
    assert rel(result.values["youngs_modulus"], TRUE_E) < 0.01
    assert rel(result.values["poissons_ratio"], TRUE_NU) < 0.01
    assert result.loss_history[-1] < 1e-6 * result.loss_history[0]
    assert len(result.loss_history) == result.iterations + 1
    assert result.timings["per_iteration"] > 0 and result.evaluations >= result.iterations


def test_recovers_e_and_nu_with_1_percent_noise_within_5_percent(truth):
    noise = 0.01 * 0.1  # 1% of the cube's size, on every coordinate
    obs = Observation.from_trajectory(truth, noise=noise, seed=1)
    result = fit(make_sim(6e4, 0.2), obs, state=start, iters=30, patience=3)
    assert rel(result.values["youngs_modulus"], TRUE_E) < 0.05
    assert rel(result.values["poissons_ratio"], TRUE_NU) < 0.05
    assert result.rmse < 2 * noise * math.sqrt(3)  # the fit does not chase the noise


def test_recovers_from_few_markers_with_gaps_and_an_ignored_outlier(truth):
    """Noiseless markers every 2nd step, occlusions (NaN), one bad marker with weight 0."""
    obs = Observation.from_trajectory(truth, indices=MARKERS, stride=2)
    obs.positions[3:6, 2] = np.nan  # occluded for three frames
    obs.positions[:, 9] += 0.05  # a mis-tracked marker ...
    obs.weights = np.ones(len(MARKERS))
    obs.weights[9] = 0.0  # ... that the user down-weights
    result = fit(make_sim(7e4, 0.22), obs, state=start, iters=30, patience=3)
    assert rel(result.values["youngs_modulus"], TRUE_E) < 0.01
    assert rel(result.values["poissons_ratio"], TRUE_NU) < 0.01


def test_recovers_from_noisy_markers_within_5_percent(truth):
    obs = Observation.from_trajectory(truth, indices=MARKERS, noise=0.001, seed=2)
    result = fit(make_sim(7e4, 0.22), obs, state=start, iters=30, patience=3, loss="huber")
    assert rel(result.values["youngs_modulus"], TRUE_E) < 0.05
    assert rel(result.values["poissons_ratio"], TRUE_NU) < 0.05


def test_per_tet_field_error_falls_as_the_fit_runs():
    truth_sim = make_sim()
    centroids = truth_sim.model.rest_positions[truth_sim.model.tets].mean(dim=1)
    e_true = TRUE_E * (1.0 + 0.6 * centroids[:, 0] / 0.1)
    truth_sim.material = truth_sim.material.replace(youngs_modulus=e_true)
    with torch.no_grad():
        obs = Observation.from_trajectory(truth_sim.rollout(STEPS, state=start(truth_sim)))
    errors = []

    def track(progress):
        e = progress.values["youngs_modulus"]
        assert e.shape == (truth_sim.mesh.n_tets,)
        errors.append(float(((e - e_true) / e_true).square().mean().sqrt()))

    result = fit(
        make_sim(1.3e5),
        obs,
        ["youngs_modulus"],
        per_tet=["youngs_modulus"],
        state=start,
        iters=8,
        smoothness=0.01,
        callback=track,
    )
    final = float(((torch.as_tensor(result.values["youngs_modulus"]) - e_true) / e_true).norm())
    final /= math.sqrt(len(e_true))
    assert errors[0] > 0.1
    assert errors[-1] < 0.5 * errors[0] and final < 0.4 * errors[0]
    assert np.all(np.diff(errors[:4]) < 0)  # falls from the start


def test_recovers_damping():
    truth_sim = make_sim(damping=5.0)
    with torch.no_grad():
        obs = Observation.from_trajectory(truth_sim.rollout(20, state=start(truth_sim)))
    result = fit(make_sim(damping=0.0), obs, ["damping"], state=start, iters=20)
    assert rel(result.damping, 5.0) < 0.01
    assert result.material.youngs_modulus == TRUE_E


def test_adam_decreases_the_loss_and_keeps_nu_in_bounds(truth):
    obs = Observation.from_trajectory(truth, stride=4)
    result = fit(make_sim(8e4, 0.45), obs, state=start, optimizer="adam", iters=6, lr=0.1)
    assert min(result.loss_history) < result.loss_history[0]
    assert all(-1 < h["poissons_ratio"] < 0.5 for h in result.value_history)
    assert result.best_loss == min(result.loss_history)


def test_checkpointing_gives_the_same_fit(truth):
    obs = Observation.from_trajectory(truth, stride=4)
    kwargs = dict(state=start, iters=2, optimizer="adam")
    plain = fit(make_sim(8e4, 0.25), obs, **kwargs)
    ckpt = fit(make_sim(8e4, 0.25), obs, checkpoint_every=7, **kwargs)
    np.testing.assert_allclose(ckpt.loss_history, plain.loss_history, rtol=1e-10)


def test_early_stopping_and_result_export(truth, tmp_path):
    obs = Observation.from_trajectory(truth, stride=4)
    sim = make_sim()
    result = fit(sim, obs, state=start, iters=50, patience=2)
    assert (
        result.iterations < 50
        and "converged" in result.stop_reason
        or "early" in (result.stop_reason)
    )
    result.save_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert set(data["values"]) == {"youngs_modulus", "poissons_ratio"}
    assert sim.material.youngs_modulus == TRUE_E  # the simulator is left as it was
    assert result.apply(sim).material is result.material


# --------------------------------------------------------------------- the command
SCENE = """
import torch
import diffsim as ds
STEPS = 40

def build():
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=3)
    material = ds.StableNeoHookean(youngs_modulus=7e4, poissons_ratio=0.25)
    return ds.Simulator(mesh, material, dt=1e-3, substeps=2, gravity=(0, 0, 0), ground=None,
                        backend="torch", dtype=torch.float64)

def initial_state(sim):
    x = sim.model.rest_positions
    d = x - x.mean(dim=0)
    moved = x.mean(dim=0) + d * torch.tensor([1.1, 0.97, 1.0], dtype=x.dtype)
    moved[:, 0] += 0.05 * d[:, 1]
    return sim.initial_state(positions=moved)
"""


def run_command(argv) -> int:
    parser = argparse.ArgumentParser()
    configure(parser)
    return fit_main(parser.parse_args(argv))


def test_fit_command_writes_result_and_plot(truth, tmp_path, capsys):
    scene = tmp_path / "box.py"
    scene.write_text(textwrap.dedent(SCENE))
    truth.save(tmp_path / "traj.npz")
    out = tmp_path / "result.json"
    argv = [str(scene), "--target", str(tmp_path / "traj.npz"), "--param", "youngs_modulus"]
    argv += ["--param", "poissons_ratio", "--iters", "2", "--out", str(out), "--no-video"]
    assert run_command(argv) == 0
    text = capsys.readouterr().out
    assert "iter    0" in text and "youngs_modulus" in text and "RMS position error" in text
    data = json.loads(out.read_text())
    assert data["iterations"] <= 2
    assert data["loss_history"][-1] < data["loss_history"][0]
    assert (tmp_path / "result_loss.png").is_file()


def test_fit_command_reports_a_mismatched_target(tmp_path, capsys):
    scene = tmp_path / "box.py"
    scene.write_text(textwrap.dedent(SCENE))
    np.savez(tmp_path / "bad.npz", positions=np.zeros((5, 10, 3)))
    code = run_command([str(scene), "--target", str(tmp_path / "bad.npz"), "--no-video"])
    assert code == 2
    assert "10 points per frame but the scene has 64 vertices" in capsys.readouterr().err


def test_loss_plot_is_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    import imageio.v3 as iio

    write_loss_plot([1.0, 0.1, 1e-3, 1e-6], tmp_path / "loss.png")
    img = iio.imread(tmp_path / "loss.png")[..., :3]
    assert img.shape[0] >= 300 and img.shape[1] >= 500
    blue = (img[..., 2] > 150) & (img[..., 0] < 80) & (img[..., 1] < 160)
    assert blue.sum() > 200  # the curve (matplotlib's first colour)
    assert (img < 60).all(axis=2).sum() > 200  # axes, ticks and labels


def test_equilibrium_mode_recovers_e_from_a_sagging_cantilever():
    def cantilever(E):
        mesh = ds.TetMesh.beam(length=0.2, width=0.05, height=0.05, origin=(0, 0.2, -0.025))
        fixed = np.flatnonzero(mesh.vertices[:, 0] < 1e-9)
        material = ds.StableNeoHookean(youngs_modulus=E, poissons_ratio=0.3)
        return ds.Simulator(
            mesh, material, fixed=fixed, ground=None, backend="torch", dtype=torch.float64
        )

    truth = cantilever(2e6)
    sag = truth.equilibrium().detach()
    tip = np.flatnonzero(truth.mesh.vertices[:, 0] > 0.2 - 1e-9)
    assert len(tip) == 9
    obs = Observation(sag[tip].numpy()[None], indices=tip)  # the free end's markers only
    result = fit(cantilever(8e5), obs, ["youngs_modulus"], mode="equilibrium", iters=20)
    assert rel(result.values["youngs_modulus"], 2e6) < 0.01
    with pytest.raises(ObservationError, match="one frame"):
        fit(
            cantilever(8e5), Observation(np.zeros((2, 3, 3)), indices=[0, 1, 2]), mode="equilibrium"
        )


def test_a_file_with_only_dt_is_timed_by_it(tmp_path):
    np.savez(tmp_path / "t.npz", positions=np.zeros((3, 2, 3)), dt=np.asarray(2e-3))
    np.testing.assert_allclose(Observation.load(tmp_path / "t.npz").steps(1e-3), [0, 2, 4])


class FragileSimulator(ds.Simulator):
    """Fails like an unstable explicit step whenever E exceeds a limit."""

    limit = 1.2e5
    failures = 0

    def rollout(self, *args, params=None, **kwargs):
        E = (params or {}).get("youngs_modulus", self.material.youngs_modulus)
        if float(torch.as_tensor(E).detach().max()) > self.limit:
            FragileSimulator.failures += 1
            raise ds.SimulationError("step 1 produced non-finite positions (test)")
        return super().rollout(*args, params=params, **kwargs)


@pytest.mark.parametrize("optimizer, lr", [("lbfgs", 3.0), ("adam", 0.5)])
def test_failed_simulations_during_the_fit_are_survived(truth, optimizer, lr):
    base = make_sim(6e4, TRUE_NU)
    FragileSimulator.failures = 0
    sim = FragileSimulator(
        base.mesh,
        base.material,
        dt=1e-3,
        substeps=2,
        gravity=(0.0, 0.0, 0.0),
        ground=None,
        backend="torch",
        dtype=torch.float64,
    )
    obs = Observation.from_trajectory(truth, stride=4)
    result = fit(
        sim,
        obs,
        ["youngs_modulus"],
        state=start,
        optimizer=optimizer,
        lr=lr,
        iters=12,
    )
    assert FragileSimulator.failures > 0  # the step size did overshoot into failures
    assert rel(result.values["youngs_modulus"], TRUE_E) < 0.01


def test_fit_on_the_warp_backend_in_float32():
    from diffsim.backends import BACKENDS

    if "warp" not in BACKENDS:
        pytest.skip("the Warp backend is not available")

    def warp_sim(E, nu):
        mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=3)
        material = ds.StableNeoHookean(youngs_modulus=E, poissons_ratio=nu)
        return ds.Simulator(
            mesh,
            material,
            dt=1e-3,
            substeps=2,
            gravity=(0.0, 0.0, 0.0),
            ground=None,
            backend="warp",
            dtype=torch.float32,
        )

    truth_sim = warp_sim(TRUE_E, TRUE_NU)
    assert truth_sim.backend_name == "warp"
    with torch.no_grad():
        obs = Observation.from_trajectory(truth_sim.rollout(STEPS, state=start(truth_sim)))
    result = fit(warp_sim(6e4, 0.2), obs, state=start, iters=30, patience=3)
    assert rel(result.values["youngs_modulus"], TRUE_E) < 0.01
    assert rel(result.values["poissons_ratio"], TRUE_NU) < 0.01


def test_stages_recover_from_a_start_ten_times_off(truth):
    """A 10x-off start is a period out of phase over 40 steps: a local minimum for one stage."""
    obs = Observation.from_trajectory(truth, indices=MARKERS)
    result = fit(make_sim(1e4, 0.2), obs, state=start, iters=30, patience=3, stages=4)
    assert rel(result.values["youngs_modulus"], TRUE_E) < 0.01
    assert rel(result.values["poissons_ratio"], TRUE_NU) < 0.01
    assert [s["frames"] for s in result.stages] == [6, 11, 21, 41]
    assert len(result.loss_history) == result.iterations + len(result.stages)
    assert result.initial["youngs_modulus"] == pytest.approx(1e4)


def test_recovers_density_of_a_swinging_cantilever():
    def cantilever(density):
        mesh = ds.TetMesh.beam(length=0.2, width=0.05, height=0.05, origin=(0, 0.2, -0.025))
        fixed = np.flatnonzero(mesh.vertices[:, 0] < 1e-9)
        material = ds.StableNeoHookean(youngs_modulus=5e4, poissons_ratio=0.3, density=density)
        return ds.Simulator(
            mesh,
            material,
            substeps=2,
            fixed=fixed,
            ground=None,
            backend="torch",
            dtype=torch.float64,
        )

    truth_sim = cantilever(1200.0)
    with torch.no_grad():
        obs = Observation.from_trajectory(truth_sim.rollout(30), stride=3)
    result = fit(cantilever(700.0), obs, ["density"], iters=20, patience=3)
    assert rel(result.values["density"], 1200.0) < 0.01
