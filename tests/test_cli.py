"""The diffsim command: run, render, view, info, fit hook, and its one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

import diffsim as ds  # noqa: E402
from diffsim.apps import cli  # noqa: E402

torch.set_num_threads(1)

SCENE = """
import diffsim as ds

STEPS = 8
FPS = 25
CAMERA = {"position": (0.4, 0.3, 0.6), "target": (0.05, 0.1, 0.05)}

def build():
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=2, origin=(0.0, 0.05, 0.0))
    material = ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.3)
    return ds.Simulator(mesh, material, dt=1e-3, backend="torch")
"""


@pytest.fixture
def scene(tmp_path) -> Path:
    path = tmp_path / "tiny.py"
    path.write_text(SCENE)
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_run_writes_a_trajectory_with_progress_and_summary(scene, tmp_path, capsys):
    out = tmp_path / "t.npz"
    assert cli.main(["run", str(scene), "--out", str(out), "--dtype", "float64"]) == 0
    captured = capsys.readouterr()
    assert "step 8/8" in captured.err
    assert "tiny: 8 steps" in captured.out and "tet-substeps/s" in captured.out
    assert "kinetic" in captured.out and "total" in captured.out
    traj = ds.Trajectory.load(out)
    assert traj.positions.shape == (9, 27, 3) and traj.dt == 1e-3
    assert traj.tets is not None and traj.surface_faces is not None


def test_run_steps_option_and_video(scene, tmp_path):
    import imageio.v3 as iio

    out = tmp_path / "v.gif"
    argv = ["run", str(scene), "--steps", "4", "--out", str(out), "--size", "64x48"]
    assert cli.main([*argv, "--stride", "2", "--color", "speed"]) == 0
    frames = iio.imread(out)
    assert frames.shape == (3, 48, 64, 3)  # frames 0, 2, 4


def test_render_trajectory_to_video_pngs_and_surfaces(scene, tmp_path, capsys):
    import imageio.v3 as iio

    traj = tmp_path / "t.npz"
    assert cli.main(["run", str(scene), "--out", str(traj)]) == 0
    mp4 = tmp_path / "t.mp4"
    size = ["--size", "64x48", "--stride", "1"]
    assert cli.main(["render", str(traj), "--out", str(mp4), *size, "--frames", "5"]) == 0
    assert iio.imread(mp4).shape == (5, 48, 64, 3)
    folder = tmp_path / "pngs"
    argv = ["render", str(traj), "--out", f"{folder}/", *size, "--stride", "4"]
    assert cli.main([*argv, "--scene", str(scene), "--color", "von_mises"]) == 0
    assert len(list(folder.glob("*.png"))) == 3  # frames 0, 4, 8
    objs = tmp_path / "objs"
    argv = ["render", str(traj), "--out", str(objs), "--export", "obj", "--stride", "2"]
    assert cli.main(argv) == 0
    assert len(list(objs.glob("frame_*.obj"))) == 5
    capsys.readouterr()
    # A field that needs the material, without the scene: one clear line.
    assert cli.main(["render", str(traj), "--out", str(mp4), "--color", "von_mises"]) == 2
    assert "--scene" in one_error_line(capsys)


def test_render_a_scene_directly(scene, tmp_path):
    out = tmp_path / "last.png"
    argv = ["render", str(scene), "--out", str(out), "--steps", "2", "--size", "64x48"]
    assert cli.main(argv) == 0 and out.is_file()


@pytest.mark.parametrize(
    "argv, code, text",
    [
        (["run", "missing.py"], 2, "missing.py: no such file"),
        (["run", "{scene}", "--bogus"], 2, "diffsim run: unrecognized arguments: --bogus"),
        (["run", "{scene}", "--out", "x.avi"], 2, "unknown output type '.avi'"),
        (["run", "{scene}", "--steps", "-1"], 2, "must be >= 0"),
        (["run", "{scene}", "--backend", "jax"], 2, "invalid choice: 'jax'"),
        (["render", "{scene}", "--out", "x.mp4", "--size", "10x7"], 2, "even and >= 16"),
        (["render", "{scene}", "--out", "x.mp4", "--camera", "1,2:3"], 2, "PX,PY,PZ:TX,TY,TZ"),
        (["render", "traj.txt", "--out", "x.mp4"], 2, "expected a trajectory (.npz)"),
        (["view", "nothing.npz"], 2, "nothing.npz: no such file"),
        (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    ],
)
def test_usage_errors_are_one_line_with_status_2(scene, capsys, argv, code, text):
    argv = [a.replace("{scene}", str(scene)) for a in argv]
    assert cli.main(argv) == code
    assert text in one_error_line(capsys)


def test_a_failing_scene_is_one_line_naming_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import diffsim\n\ndef build():\n    return diffsim.TetMesh.box(size=(-1, 1, 1))\n"
    )
    assert cli.main(["run", str(bad)]) == 1
    line = one_error_line(capsys)
    assert "bad.py:4: ValueError: size must be three positive lengths" in line


def test_traceback_option_shows_the_error(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def build():\n    raise RuntimeError('boom')\n")
    with pytest.raises(Exception, match="boom"):
        cli.main(["--traceback", "run", str(bad)])


def test_view_without_display_names_the_headless_command(scene, monkeypatch, capsys):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    assert cli.main(["view", str(scene)]) == 1
    line = one_error_line(capsys)
    assert "no display" in line and f"diffsim run {scene} --out tiny.mp4" in line


def test_info_lists_versions_devices_and_rendering(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in (
        "diffsim",
        "torch",
        "warp-lang",
        "polyscope",
        "imageio",
        "devices",
        "rendering",
        "warp threads",
    ):
        assert name in out
    assert "cpu" in out


def test_fit_is_delegated_to_the_fit_command(monkeypatch, capsys):
    import argparse
    import importlib
    import types

    calls = {}
    fake = types.ModuleType("diffsim.apps.cli.fit")
    fake.configure = lambda p: p.add_argument("--iters", type=int, default=3)
    fake.main = lambda args: calls.setdefault("iters", args.iters) and 0
    real_import = importlib.import_module
    monkeypatch.setattr(
        importlib,
        "import_module",
        lambda name: fake if name == "diffsim.apps.cli.fit" else real_import(name),
    )
    assert cli.main(["fit", "--iters", "7"]) == 0 and calls == {"iters": 7}

    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(importlib, "import_module", missing)
    assert cli.main(["fit", "anything", "--x"]) == 1
    assert "diffsim.apps.cli.fit" in one_error_line(capsys)
    assert isinstance(cli.build_parser(["run"]), argparse.ArgumentParser)


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("diffsim ")


def test_python_dash_m_runs_the_cli_with_one_line_errors(tmp_path):
    bad = subprocess.run(
        [sys.executable, "-m", "diffsim", "run", str(tmp_path / "missing.py")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr
    assert "missing.py: no such file" in bad.stderr
