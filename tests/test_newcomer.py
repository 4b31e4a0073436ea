"""What a newcomer meets: set-up, the first run, files and errors, pictures, and the extras
users expect (--set, energy CSV, provenance, a bare mesh file)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

import diffsim as ds  # noqa: E402
from diffsim.apps import cli, render  # noqa: E402
from diffsim.apps.scene import SceneError, load_scene, mesh_scene  # noqa: E402
from diffsim.backends.warp.setup import check_device  # noqa: E402

torch.set_num_threads(1)

SCENE = """
import diffsim as ds

STEPS = 8
FPS = 25

def build(size=0.1):
    mesh = ds.TetMesh.box(size=(size, size, size), resolution=2, origin=(0.0, 0.05, 0.0))
    material = ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.3)
    return ds.Simulator(mesh, material, dt=1e-3, backend="torch")
"""


@pytest.fixture
def scene(tmp_path) -> Path:
    path = tmp_path / "tiny.py"
    path.write_text(SCENE)
    return path


@pytest.fixture
def traj_file(scene, tmp_path) -> Path:
    out = tmp_path / "t.npz"
    assert cli.main(["run", str(scene), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def egl():
    try:
        render.init_headless()
    except render.RenderError as exc:
        pytest.skip(f"headless EGL rendering unavailable: {exc}")


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


# ----------------------------------------------------------------------------- set-up
def _fake_setup(tmp_path: Path, gpu: bool, cpu_index_answers: bool) -> tuple[Path, dict]:
    """A copy of setup.sh over a fake .venv whose pip logs its arguments (no network)."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup.sh", root / "scripts" / "setup.sh")
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    venv_bin = root / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    site = tmp_path / "site"
    site.mkdir()
    tools = tmp_path / "tools"
    tools.mkdir()

    def script(path: Path, text: str) -> None:
        path.write_text("#!/bin/sh\n" + textwrap.dedent(text))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)

    # python without site-packages (no torch) but with the fake site folder.
    script(venv_bin / "python", f'PYTHONPATH="{site}" exec "{sys.executable}" -S "$@"\n')
    fail = "" if cpu_index_answers else 'case "$*" in *--index-url*) exit 1;; esac\n'
    script(
        venv_bin / "pip",
        f"""\
        echo "$*" >> "{tmp_path}/pip.log"
        {fail}case "$*" in
          *torch==*) mkdir -p "{site}/torch" && touch "{site}/torch/__init__.py";;
          *-e*) printf '#!/bin/sh\\n' > "{venv_bin}/diffsim"; chmod +x "{venv_bin}/diffsim";;
        esac
        """,
    )
    script(tools / "nvidia-smi", "exit 0\n" if gpu else "exit 9\n")
    env = dict(os.environ, PATH=f"{tools}:{os.environ['PATH']}", DIFFSIM_SKIP_APT="1")
    return root, env


def _pip_calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "pip.log"
    return log.read_text().splitlines() if log.exists() else []


def test_setup_on_a_cpu_machine_asks_the_cpu_index_first_and_skips_what_is_current(tmp_path):
    root, env = _fake_setup(tmp_path, gpu=False, cpu_index_answers=False)
    run = subprocess.run(
        ["bash", "scripts/setup.sh"], cwd=root, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    calls = _pip_calls(tmp_path)
    assert "--index-url https://download.pytorch.org/whl/cpu" in calls[0]
    assert "--timeout" in calls[0] and "torch==2.13.0" in calls[0]
    assert "--index-url" not in calls[1] and "torch==2.13.0" in calls[1]  # the fallback
    assert "-e .[dev]" in calls[2] and len(calls) == 3
    assert "no NVIDIA GPU" in run.stderr
    # A second run installs nothing; a changed pyproject.toml reinstalls diffsim only.
    again = subprocess.run(["bash", "scripts/setup.sh"], cwd=root, env=env, capture_output=True)
    assert again.returncode == 0 and len(_pip_calls(tmp_path)) == 3
    with open(root / "pyproject.toml", "a") as f:
        f.write("\n# changed\n")
    subprocess.run(["bash", "scripts/setup.sh"], cwd=root, env=env, check=True)
    calls = _pip_calls(tmp_path)
    assert len(calls) == 4 and "-e .[dev]" in calls[3]


def test_setup_on_a_gpu_machine_installs_the_default_build(tmp_path):
    root, env = _fake_setup(tmp_path, gpu=True, cpu_index_answers=True)
    subprocess.run(["bash", "scripts/setup.sh"], cwd=root, env=env, check=True)
    calls = _pip_calls(tmp_path)
    assert "torch==2.13.0" in calls[0] and "--index-url" not in calls[0]
    assert "-e .[dev]" in calls[1]


# ----------------------------------------------------------------------------- first run
def test_help_imports_neither_torch_nor_warp():
    # The CLI module itself (diffsim/__init__.py aside, whose imports are not the CLI's).
    code = textwrap.dedent(
        f"""
        import sys, types
        pkg = types.ModuleType("diffsim")
        pkg.__path__ = [{str(ROOT / "diffsim")!r}]
        sys.modules["diffsim"] = pkg
        from diffsim.apps import cli
        for argv in (["--help"], ["run", "--help"], ["render", "--help"], ["--version"]):
            assert cli.main(argv) == 0, argv
        print(sorted(m for m in ("torch", "warp", "polyscope") if m in sys.modules))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_compile_notice_once_before_a_compile_and_not_for_a_cached_module(
    tmp_path, capsys, monkeypatch
):
    import warp as wp

    from diffsim.kernels import runtime as warp_setup

    warp_setup.init_warp()
    monkeypatch.setattr(warp_setup, "_announced", False)
    monkeypatch.setattr(wp.config, "kernel_cache_dir", str(tmp_path))
    module = f"diffsim_notice_test_{os.getpid()}"

    @wp.kernel(module=module)
    def add_one(a: wp.array(dtype=float)):
        i = wp.tid()
        a[i] = a[i] + 1.0

    a = wp.zeros(4, dtype=float)
    wp.launch(add_one, dim=4, inputs=[a])
    assert a.numpy().tolist() == [1.0] * 4
    err = capsys.readouterr().err
    assert err.count("diffsim: compiling Warp kernels (first run only") == 1
    # The same module again, from the cache: no notice.
    monkeypatch.setattr(warp_setup, "_announced", False)
    wp.get_module(module).unload()
    wp.launch(add_one, dim=4, inputs=[a])
    assert "compiling" not in capsys.readouterr().err


def test_no_cuda_driver_warning_and_info_reports_cuda():
    code = "from diffsim.kernels.runtime import init_warp; init_warp()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Could not find or load the NVIDIA CUDA driver" not in out.stderr
    info = subprocess.run(
        [sys.executable, "-m", "diffsim", "info"], capture_output=True, text=True, check=True
    )
    assert "warp cuda" in info.stdout and "CUDA" in info.stdout
    assert "Could not find or load" not in info.stderr


def test_run_shows_progress_bars_and_says_what_it_wrote(scene, tmp_path, capsys, egl):
    out = tmp_path / "v.gif"
    argv = ["run", str(scene), "--out", str(out), "--size", "64x48", "--stride", "2"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "run: 100%" in captured.err and "step 8/8" in captured.err
    assert "render: 100%" in captured.err and "frame 5/5" in captured.err
    line = [x for x in captured.out.splitlines() if x.startswith("wrote")][-1]
    assert line.startswith(f"wrote {out} (5 frames, 0.20 s of video at 25 fps")
    assert "; rendered in " in line


def test_default_video_lasts_a_few_seconds():
    # A scene of 1000 steps of 1 ms at 30 fps: 1.07 s in real time, >= 3 s by default.
    stride = render.video_stride(1000, 1e-3, 30)
    frames = len(render.frame_indices(1001, stride))
    assert frames / 30 >= 3.0
    assert render.slow_motion(stride, 1e-3, 30) <= render.MAX_SLOW_MOTION
    assert render.video_stride(100_000, 1e-3, 30) == render.frame_stride(1e-3, 30)  # long


# ----------------------------------------------------------------------------- files and errors
def test_a_text_file_named_npz_does_not_suggest_allow_pickle(tmp_path, capsys):
    bad = tmp_path / "t.npz"
    bad.write_text("hello\n")
    with pytest.raises(ValueError, match="t.npz: not an .npz archive"):
        ds.Trajectory.load(bad)
    assert cli.main(["render", str(bad), "--out", str(tmp_path / "x.mp4")]) == 1
    line = one_error_line(capsys)
    assert "not an .npz archive" in line and "allow_pickle" not in line
    with pytest.raises(ds.ObservationError, match="not an .npz archive"):
        ds.Observation.load(bad)


def _save(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_out_of_range_tets_faces_nan_and_bad_dt_are_clear_errors(tmp_path, capsys):
    x = np.zeros((2, 4, 3))
    cases = {
        "tets refer to vertex 9": dict(positions=x, dt=0.1, tets=np.array([[0, 1, 2, 9]])),
        "surface_faces refer to vertex 7": dict(
            positions=x, dt=0.1, surface_faces=np.array([[0, 1, 7]])
        ),
        "positions are NaN or infinite from frame 1": dict(
            positions=np.where(np.arange(2)[:, None, None] == 1, np.nan, x), dt=0.1
        ),
        "dt must be a positive time": dict(positions=x, dt=-1.0),
        "dt must be one number": dict(positions=x, dt=np.array([0.1, 0.2])),
    }
    for i, (message, arrays) in enumerate(cases.items()):
        path = _save(tmp_path / f"bad{i}.npz", **arrays)
        with pytest.raises(ValueError, match=message):
            ds.Trajectory.load(path)
        assert cli.main(["render", str(path), "--out", str(tmp_path / "x.png")]) == 1
        assert message in one_error_line(capsys)


def test_render_checks_faces_and_positions_before_drawing(tmp_path):
    x = np.zeros((2, 4, 3))
    with pytest.raises(ValueError, match="faces refer to vertex 5"):
        render.render_trajectory(x, np.array([[0, 1, 5]]), tmp_path / "a.png", dt=0.1)
    x[1, 2, 0] = np.inf
    with pytest.raises(ValueError, match="positions are NaN or infinite from frame 1"):
        render.render_trajectory(x, np.array([[0, 1, 2]]), tmp_path / "a.png", dt=0.1)


def test_device_names_are_checked_with_the_choices(capsys):
    with pytest.raises(ValueError, match='device \'gpu\' is not a device; use "cpu" or "cuda"'):
        check_device("gpu")
    assert check_device("cpu") == torch.device("cpu")
    assert cli.main(["run", "x.py", "--device", "gpu"]) == 2
    assert 'use "cpu" or "cuda"' in one_error_line(capsys)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda':"):
            check_device("cuda")


def test_fit_with_a_missing_output_folder_fails_before_fitting(
    scene, traj_file, tmp_path, capsys, monkeypatch
):
    import argparse

    from diffsim.apps.cli import fit as fit_command

    parser = argparse.ArgumentParser()
    fit_command.configure(parser)
    args = parser.parse_args(
        [str(scene), "--target", str(traj_file), "--out", str(tmp_path / "missing" / "f.json")]
    )

    def never(*a, **k):
        raise AssertionError("the fit started")

    monkeypatch.setattr(sys.modules["diffsim.fitting.fit"], "fit", never)
    assert fit_command.main(args) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "missing" in err


def test_usage_errors_name_no_internals_and_repeat_nothing(scene, traj_file, capsys):
    assert cli.main(["run", str(scene), "--steps", "abc"]) == 2
    line = one_error_line(capsys)
    assert "expected a whole number, got 'abc'" in line and "_nonnegative_int" not in line
    assert cli.main(["render", "traj.txt", "--out", "x.mp4"]) == 2
    line = one_error_line(capsys)
    assert line.count("(.npz)") == 1 and "expected a trajectory (.npz) or a scene" in line
    assert cli.main(["render", str(scene), "--out", "x.mp4", "--camera", "1,1,1:1,1,1"]) == 2
    assert "camera position equals its target" in one_error_line(capsys)


def test_render_steps_on_a_trajectory_keeps_its_first_steps(traj_file, tmp_path, capsys, egl):
    import imageio.v3 as iio

    out = tmp_path / "f.gif"
    argv = ["render", str(traj_file), "--out", str(out), "--steps", "5", "--stride", "1"]
    assert cli.main([*argv, "--size", "32x32"]) == 0
    assert iio.imread(out).shape[0] == 6  # frames 0..5
    capsys.readouterr()
    assert cli.main(["render", str(traj_file), "--out", str(out), "--steps", "50"]) == 2
    assert "holds only 8 steps" in one_error_line(capsys)


def test_a_camera_at_its_target_is_rejected(tmp_path):
    path = tmp_path / "cam.py"
    path.write_text(SCENE + "CAMERA = {'position': (0.1, 0.2, 0.3), 'target': (0.1, 0.2, 0.3)}\n")
    with pytest.raises(SceneError, match="CAMERA position equals its target"):
        load_scene(path)
    with pytest.raises(ValueError, match="equals its target"):
        render.check_camera({"position": (1, 1, 1), "target": (1, 1, 1)})


# ----------------------------------------------------------------------------- pictures
def _body_pixels(image: np.ndarray) -> np.ndarray:
    p = image.astype(int)
    return p[..., 2] - p[..., 0] > 40  # the body's blue


def _floor_pixels(image: np.ndarray) -> np.ndarray:
    p = image.astype(int)
    grey = (p.max(axis=2) - p.min(axis=2)) < 12
    return grey & (p.mean(axis=2) < 245)  # grey, not the white background


def test_floor_only_where_the_scene_has_a_ground_and_shadows_on_it(egl):
    mesh = ds.TetMesh.box(size=(0.2, 0.2, 0.2), resolution=2, origin=(-0.1, 0.05, -0.1))
    frames = mesh.vertices[None]
    pictures = {}
    for name, ground, shadows in (
        ("ground", 0.0, True),
        ("none", None, True),
        ("flat", 0.0, False),
    ):
        r = render.FrameRenderer(
            mesh.surface_faces,
            mesh.vertices,
            size=(160, 120),
            ground=ground,
            bounds=render.trajectory_bounds(frames, ground),
            shadows=shadows,
        )
        pictures[name] = r.render(mesh.vertices)
        r.close()
    lower = slice(90, 120)  # the bottom quarter
    assert _floor_pixels(pictures["ground"][lower]).mean() > 0.5
    assert _floor_pixels(pictures["none"][lower]).mean() < 0.02
    rest = ~_body_pixels(pictures["none"][lower])
    assert (pictures["none"][lower] > 245).all(axis=2)[rest].mean() > 0.9  # white around
    # The shadow darkens the floor around the body's foot.
    assert pictures["ground"].astype(int).sum() < pictures["flat"].astype(int).sum()


def test_the_camera_frames_the_whole_motion(egl, tmp_path):
    import imageio.v3 as iio

    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=1, origin=(-0.05, 0.0, -0.05))
    # The body slides 1 m to the side and rises 0.5 m: every frame must be in the picture.
    path = np.linspace(0.0, 1.0, 11)[:, None, None] * np.array([1.0, 0.5, 0.0])
    frames = mesh.vertices[None] + path
    out = tmp_path / "pngs"
    render.render_trajectory(
        frames, mesh.surface_faces, f"{out}/", dt=0.1, stride=5, size=(160, 120), ground=None
    )
    pictures = [iio.imread(p) for p in sorted(out.glob("*.png"))]
    assert len(pictures) == 3
    for picture in pictures:
        body = _body_pixels(picture)
        assert body.sum() > 30  # visible, not a speck
        assert not body[0].any() and not body[-1].any()  # inside the frame
        assert not body[:, 0].any() and not body[:, -1].any()


def test_colour_bar_range_never_collapses_and_the_viewer_uses_it(tmp_path):
    from diffsim.apps.viewer import ViewerController

    assert render.colour_range(0.4782, 0.4782) == (0.0, 0.4782)
    assert render.colour_range(0.0, 0.0) == (0.0, 1.0)
    lo, hi = render.colour_range(-2.0, -2.0)
    assert lo < -2.0 < hi
    assert render.colour_range(1.0, 2.0) == (1.0, 2.0)
    path = tmp_path / "fall.py"
    path.write_text(SCENE.replace("origin=(0.0, 0.05, 0.0)", "origin=(0.0, 0.5, 0.0)"))
    c = ViewerController.for_scene(load_scene(path))
    c.step(5)
    c.set_field("speed")  # a body in free fall: every vertex has the same speed
    lo, hi = c.field_range()
    assert lo == 0.0 and hi == pytest.approx(float(np.max(c.field_values())))


def test_viewer_floor_follows_the_ground_of_the_scene_or_trajectory(traj_file, tmp_path):
    from diffsim.apps.viewer import ViewerController

    traj = ds.Trajectory.load(traj_file)
    assert ViewerController.for_trajectory(traj).ground_height() == 0.0  # from its metadata
    traj.save(tmp_path / "bare.npz", metadata={"note": "no ground recorded"})
    bare = ds.Trajectory.load(tmp_path / "bare.npz")
    assert ViewerController.for_trajectory(bare).ground_height() is None
    path = tmp_path / "float.py"
    path.write_text(SCENE.replace('backend="torch")', 'backend="torch", ground=None)'))
    assert ViewerController.for_scene(load_scene(path)).ground_height() is None


def test_viewer_error_counts_steps_from_the_start(tmp_path):
    from diffsim.apps.viewer import ViewerController

    path = tmp_path / "scene.py"
    path.write_text(SCENE.replace("origin=(0.0, 0.05, 0.0)", "origin=(0.0, 0.5, 0.0)"))
    c = ViewerController.for_scene(load_scene(path))
    c.step(30)
    c.set_parameter("dt", 1e-2)
    # Slider rebuilds choose stable substeps, so force a blow-up: one fixed 10 ms substep
    # at E = 1e8 (far above its stable substep).
    stiff = c.sim.material.replace(youngs_modulus=1e8)
    with pytest.warns(ds.StabilityWarning):
        c.sim = c.sim.replace(material=stiff, substeps=1)
    for _ in range(10):
        c.step(20)
    assert c.error is not None and c.error.startswith("step ")
    step = int(c.error.split()[1])
    assert step > 30  # counted from t = 0, not from the rebuild after step 30
    assert f"(t = {0.03 + (step - 30) * 1e-2:.3f} s)" in c.error  # 30 ms at 1 ms, then 10 ms


def test_viewer_error_banner_wraps(tmp_path, egl):
    import polyscope as ps

    from diffsim.apps.viewer import PolyscopeViewer, ViewerController

    path = tmp_path / "scene.py"
    path.write_text(SCENE)
    c = ViewerController.for_scene(load_scene(path))
    c.error = "step 349 (t = 0.349 s) produced non-finite positions; " + "a long message " * 12
    viewer = PolyscopeViewer(c)
    ps.set_user_callback(viewer.callback)
    try:
        ps.frame_tick()
        ps.frame_tick()
        image = ps.screenshot_to_buffer(transparent_bg=False, include_UI=True)[..., :3]
    finally:
        ps.clear_user_callback()
        ps.remove_all_structures()
    p = image.astype(int)
    red = (p[..., 0] > 200) & (p[..., 1] < 130) & (p[..., 2] < 110)
    rows = np.flatnonzero(red.any(axis=1))
    assert len(rows) and rows.max() - rows.min() > 40  # several lines of text


def test_fit_video_panels_are_labelled(egl, tmp_path):
    import imageio.v3 as iio

    from diffsim.apps.cli.fit import write_comparison_video

    path = tmp_path / "float.py"
    path.write_text(SCENE.replace('backend="torch")', 'backend="torch", ground=None)'))
    scene = load_scene(path)
    sim = scene.build()
    with torch.no_grad():
        traj = sim.rollout(4, scene.initial_state(sim))
    observation = ds.Observation.from_trajectory(traj)
    out = tmp_path / "cmp.gif"
    note = write_comparison_video(scene, sim, observation, out, scene.initial_state(sim))
    assert note.startswith("video:"), note
    frame = iio.imread(out)[0]
    h, w = frame.shape[:2]
    for left in (0, w // 2):  # both panels: dark text in the top-left corner
        corner = frame[: h // 8, left : left + w // 4].astype(int)
        assert (corner.max(axis=2) < 90).sum() > 20
    labelled = render.label_image(np.full((60, 200, 3), 255, np.uint8), "observed")
    assert (labelled < 90).all(axis=2).sum() > 20


# ----------------------------------------------------------------------------- what users expect
def test_set_parameters_of_build_and_of_any_scene(scene, tmp_path, capsys):
    out = tmp_path / "t.npz"
    argv = ["run", str(scene), "--out", str(out), "--steps", "4"]
    sets = ["--set", "youngs_modulus=2e5", "--set", "dt=5e-4", "--set", "size=0.12"]
    assert cli.main(argv + sets) == 0
    traj = ds.Trajectory.load(out)
    assert traj.dt == 5e-4
    assert traj.positions[0, :, 0].max() == pytest.approx(0.12)  # build(size=0.12)
    assert traj.metadata["parameters"] == {"youngs_modulus": 2e5, "dt": 5e-4, "size": 0.12}
    capsys.readouterr()
    assert cli.main([*argv, "--set", "stiffness=3"]) == 1
    line = one_error_line(capsys)
    assert "unknown parameter 'stiffness'; build() accepts: size" in line
    assert "youngs_modulus, poissons_ratio, damping, dt, gravity" in line


def test_energy_csv_and_plot(scene, tmp_path, capsys, monkeypatch):
    csv = tmp_path / "energy.csv"
    from diffsim.apps import plots

    monkeypatch.setattr(plots, "plotting_available", lambda: False)  # as without matplotlib
    assert cli.main(["run", str(scene), "--energy", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "energy plot skipped: matplotlib is not installed" in out
    rows = np.genfromtxt(csv, delimiter=",", names=True)
    names = rows.dtype.names
    assert names[:2] == ("step", "time")
    assert {"kinetic", "elastic", "gravitational", "barrier", "total"} <= set(names)
    assert len(rows) == 9 and rows["time"][-1] == pytest.approx(8e-3)
    parts = sum(rows[k] for k in names[2:-1])
    assert np.allclose(parts, rows["total"], rtol=1e-6, atol=1e-9)
    assert cli.main(["run", str(scene), "--energy", str(tmp_path / "no" / "e.csv")]) == 2
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    assert cli.main(["run", str(scene), "--energy", str(csv)]) == 0
    assert csv.with_suffix(".png").is_file()


def test_trajectories_carry_their_provenance(scene, traj_file, tmp_path):
    traj = ds.Trajectory.load(traj_file)
    meta = traj.metadata
    assert meta["scene"] == str(scene) and meta["diffsim_version"] == ds.__version__
    assert meta["parameters"] == {} and meta["backend"] == "torch" and meta["fps"] == 25
    assert meta["ground"] == 0.0 and meta["dt"] == 1e-3
    # save(metadata=...) and load keep any JSON dict; save again keeps what load read.
    traj.save(tmp_path / "again.npz")
    assert ds.Trajectory.load(tmp_path / "again.npz").metadata == meta
    traj.save(tmp_path / "mine.npz", metadata={"note": "hand-made", "n": [1, 2]})
    assert ds.Trajectory.load(tmp_path / "mine.npz").metadata == {"note": "hand-made", "n": [1, 2]}
    with pytest.raises(ValueError, match="metadata must hold JSON values"):
        traj.save(tmp_path / "bad.npz", metadata={"x": object()})


def test_run_a_bare_mesh_file_dropped_on_the_ground(tmp_path, capsys):
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=2, origin=(3.0, -1.0, 2.0))
    mesh.save(tmp_path / "box.msh")
    out = tmp_path / "t.npz"
    argv = ["run", str(tmp_path / "box.msh"), "--drop", "0.05", "--steps", "20"]
    assert cli.main([*argv, "--backend", "torch", "--out", str(out)]) == 0
    traj = ds.Trajectory.load(out)
    x0 = traj.positions[0].numpy()
    assert x0[:, 1].min() == pytest.approx(0.05) and abs(x0[:, 0].mean()) < 1e-9
    assert traj.positions[-1, :, 1].min() < 0.05  # falling
    assert traj.metadata["ground"] == 0.0
    scene = mesh_scene(tmp_path / "box.msh", drop=0.2, scale=2.0)
    sim = scene.build(backend="torch", parameters={"youngs_modulus": 3e5})
    assert sim.mesh.bounds[0, 1] == pytest.approx(0.2)
    assert np.ptp(sim.mesh.vertices[:, 0]) == pytest.approx(0.2)
    capsys.readouterr()
    assert cli.main(["run", str(tmp_path / "box.msh"), "--drop", "-1"]) == 2
    assert "must be >= 0" in one_error_line(capsys)
    assert cli.main(["run", str(tmp_path / "box.xyz")]) == 2
    assert "expected a scene script (.py) or a mesh file" in one_error_line(capsys)


def test_warnings_are_one_line_naming_the_command(tmp_path, capsys):
    path = tmp_path / "warn.py"
    path.write_text(
        SCENE.replace(
            "def build(size=0.1):\n",
            "def build(size=0.1):\n    import warnings\n"
            "    warnings.warn('check the mesh\\nsecond line', UserWarning)\n",
        )
    )
    assert cli.main(["run", str(path), "--steps", "1"]) == 0
    err = capsys.readouterr().err
    assert "diffsim run: UserWarning: check the mesh" in err
    assert "second line" not in err and "warnings.warn(" not in err
