"""Argument types, shared options, loading a scene or mesh, and one-line errors."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

# Exit statuses: success, a failure, bad usage or a missing file.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
FIELD_CHOICES = ("speed", "displacement", "energy_density", "von_mises")


class UsageError(Exception):
    """Bad command-line usage (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises UsageError instead of printing usage and exiting."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _add_sim_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=("warp", "torch"), help="override the scene's backend")
    p.add_argument("--dtype", choices=("float32", "float64"), help="override the scene's dtype")
    p.add_argument("--device", help="override the scene's torch device (cpu, cuda, cuda:1)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        dest="parameters",
        metavar="NAME=VALUE",
        help="scene parameter (repeat): a keyword of the scene's build(), or youngs_modulus, "
        "poissons_ratio, damping, dt, gravity",
    )


def _add_render_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=_size, default=None, metavar="WxH", help="pixels (800x600)")
    p.add_argument("--fps", type=_positive_int, help="video frame rate (default: the scene's)")
    p.add_argument(
        "--stride",
        type=_positive_int,
        help="simulation steps per video frame (default: real time at --fps, or slow "
        "motion for a video of at least 3 s)",
    )
    p.add_argument("--frames", type=_positive_int, help="at most this many video frames")
    p.add_argument(
        "--camera",
        type=_camera,
        metavar="PX,PY,PZ:TX,TY,TZ",
        help="camera position and target in metres (default: framing the whole motion, "
        "seen from the scene's CAMERA direction)",
    )
    p.add_argument("--color", choices=FIELD_CHOICES, help="colour the surface by a field")


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _nonnegative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _nonnegative_float(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(p) for p in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected WIDTHxHEIGHT such as 800x600, got {text!r}"
        ) from None
    if w < 16 or h < 16 or w % 2 or h % 2:
        raise argparse.ArgumentTypeError(f"width and height must be even and >= 16, got {text}")
    return w, h


def _camera(text: str) -> dict:
    try:
        pos, target = text.split(":")
        position = tuple(float(c) for c in pos.split(","))
        tgt = tuple(float(c) for c in target.split(","))
    except ValueError:
        position = tgt = ()
    if len(position) != 3 or len(tgt) != 3 or not all(map(math.isfinite, position + tgt)):
        raise argparse.ArgumentTypeError(
            f"expected PX,PY,PZ:TX,TY,TZ such as 1,0.5,1.5:0,0.1,0, got {text!r}"
        )
    if position == tgt:
        raise argparse.ArgumentTypeError(
            f"the camera position equals its target ({text}); put the camera away from the "
            "point it looks at"
        )
    return {"position": position, "target": tgt}


def _parameters(items: list[str]) -> dict:
    """``{name: value}`` from ``--set NAME=VALUE`` items (values as Python literals)."""
    import ast

    out = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise UsageError(f"--set takes NAME=VALUE such as youngs_modulus=2e5, got {item!r}")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()  # a word: passed as a string
        out[name] = value
    return out


def _error(message: str) -> None:
    print(message, file=sys.stderr)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    message = text[0] if text else type(exc).__name__
    from diffsim.apps.scene import SceneError

    if isinstance(exc, (SceneError, FileNotFoundError, UsageError)):
        return message
    return f"{type(exc).__name__}: {message}"


def _dtype(name: str | None):
    if name is None:
        return None
    import torch

    return {"float32": torch.float32, "float64": torch.float64}[name]


def _device(name: str | None):
    if name is None:
        return None
    from diffsim.backends.warp.setup import check_device

    try:
        return check_device(name)
    except ValueError as exc:
        raise UsageError(f"--device {name}: {exc} (see diffsim info)") from None


MESH_SUFFIXES = (".msh", ".npz", ".stl", ".obj", ".ply", ".off")


def _require_file(path: str, suffixes: tuple[str, ...], what: str) -> Path:
    """``path`` as a Path, checked: ``what`` names the expected kind with its suffixes."""
    p = Path(path)
    if p.suffix.lower() not in suffixes:
        raise UsageError(f"{path}: expected {what}")
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return p


def _load(path: str, args: argparse.Namespace, mesh_ok: bool = False):
    """(scene, simulator) from a scene script (or, with ``mesh_ok``, a bare mesh file) with
    the command's backend/dtype/device overrides and ``--set`` parameters."""
    from diffsim.apps.scene import load_scene, mesh_scene

    parameters = _parameters(getattr(args, "parameters", None) or [])
    device = _device(args.device)
    suffix = Path(path).suffix.lower()
    drop, scale = getattr(args, "drop", None), getattr(args, "scale", None)
    if mesh_ok and suffix in MESH_SUFFIXES:
        _require_file(path, MESH_SUFFIXES, "a mesh file")
        scene = mesh_scene(path, drop=0.1 if drop is None else drop, scale=scale or 1.0)
    else:
        what = "a scene script (.py)"
        if mesh_ok:
            what += f" or a mesh file ({', '.join(MESH_SUFFIXES)})"
        scene = load_scene(_require_file(path, (".py",), what))
        if drop is not None or scale is not None:
            raise UsageError(
                f"--drop and --scale apply to a mesh file; {path} is a scene script (set "
                "the body's position in its build())"
            )
    sim = scene.build(
        backend=args.backend, dtype=_dtype(args.dtype), device=device, parameters=parameters
    )
    scene.parameters = parameters
    return scene, sim


def _output_kind(out: str, allow_npz: bool) -> str:
    from diffsim.apps.render import RenderError, check_output

    if allow_npz and out.lower().endswith(".npz"):
        if not Path(out).parent.exists():
            raise UsageError(f"{out}: folder {Path(out).parent} does not exist")
        return "npz"
    try:
        return check_output(out)
    except RenderError as exc:
        raise UsageError(str(exc)) from exc


def _check_csv(path: str | None) -> None:
    if path is None:
        return
    p = Path(path)
    if p.suffix.lower() != ".csv":
        raise UsageError(f"--energy {path}: expected a .csv file name")
    if not p.parent.exists():
        raise UsageError(f"--energy {path}: folder {p.parent} does not exist; create it first")
