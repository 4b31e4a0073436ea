"""The ``diffsim`` command: run, view, render, fit and info.

Every failure the user can cause (an unknown option, a missing file, a scene that raises)
ends with one line on stderr and a non-zero exit status: 2 for bad usage or a missing
file, 1 for anything else. ``--traceback`` shows the full Python traceback instead.

Nothing heavy is imported at module level: ``diffsim --help`` parses its arguments
without torch or Warp (they load when a command runs).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from diffsim.apps.cli.arguments import (
    EXIT_FAILURE,
    EXIT_USAGE,
    UsageError,
    _add_render_options,
    _add_sim_options,
    _error,
    _nonnegative_float,
    _nonnegative_int,
    _one_line,
    _Parser,
    _positive_float,
)
from diffsim.apps.cli.info import _version_line
from diffsim.apps.cli.info import configure as _configure_info
from diffsim.apps.cli.render import cmd_render
from diffsim.apps.cli.run import cmd_run
from diffsim.apps.cli.view import cmd_view


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; ``argv`` decides whether the ``fit`` plugin is imported."""
    parser = _Parser(
        prog="diffsim",
        description="Differentiable explicit FEM simulation of soft solids.",
    )
    parser.add_argument("--version", action="version", version=_version_line())
    parser.add_argument("--traceback", action="store_true", help="show Python tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a scene headless; write a video or a trajectory")
    run.add_argument(
        "scene",
        help="scene script (.py) defining build(), or a mesh file (.msh, .npz, .stl, .obj, "
        ".ply, .off) to drop on the ground",
    )
    run.add_argument("--steps", type=_nonnegative_int, help="steps to run (default: the scene's)")
    run.add_argument("--out", help="output: .mp4/.gif/.png (render), .npz (trajectory) or DIR/")
    run.add_argument(
        "--energy",
        metavar="FILE.csv",
        help="write kinetic, elastic, gravitational, barrier and total energy over time (J) "
        "as CSV, and a plot FILE.png where matplotlib is installed",
    )
    run.add_argument(
        "--drop",
        type=_nonnegative_float,
        metavar="H",
        help="for a mesh file: drop height of its lowest point above the ground (m, default 0.1)",
    )
    run.add_argument(
        "--scale",
        type=_positive_float,
        metavar="S",
        help="for a mesh file: factor on its coordinates (default 1: the file is in metres)",
    )
    _add_sim_options(run)
    _add_render_options(run)
    run.set_defaults(func=cmd_run)

    view = sub.add_parser("view", help="open the interactive viewer on a scene or trajectory")
    view.add_argument("path", help="scene script (.py) or saved trajectory (.npz)")
    view.add_argument(
        "--scene", help="for a .npz: the scene that made it (material, fixed vertices, ground)"
    )
    _add_sim_options(view)
    view.set_defaults(func=cmd_view)

    render = sub.add_parser("render", help="render a trajectory or scene to video/PNG/OBJ/PLY")
    render.add_argument("path", help="saved trajectory (.npz) or scene script (.py)")
    render.add_argument(
        "--out", required=True, help="output: .mp4, .gif, .png, DIR/ or .pvd (VTU series)"
    )
    render.add_argument(
        "--steps",
        type=_nonnegative_int,
        help="for a scene: steps to run (default: its own); for a .npz: its first N steps",
    )
    render.add_argument(
        "--scene", help="for a .npz: the scene that made it (camera, ground, fields)"
    )
    render.add_argument(
        "--export",
        choices=("obj", "ply"),
        help="write the surface of each video frame as OBJ/PLY files into --out (a folder)",
    )
    _add_sim_options(render)
    _add_render_options(render)
    render.set_defaults(func=cmd_render)

    info = sub.add_parser(
        "info", help="versions, devices and rendering; or a mesh's quality and stable time step"
    )
    _configure_info(info)

    fit = sub.add_parser("fit", help="fit material parameters of a scene to a trajectory")
    if _wants(argv, "fit"):
        _configure_fit(fit)
    else:
        fit.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        fit.set_defaults(func=cmd_fit_missing)
    return parser


def _wants(argv: list[str] | None, command: str) -> bool:
    args = sys.argv[1:] if argv is None else argv
    positional = [a for a in args if not a.startswith("-")]
    return bool(positional) and positional[0] == command


def _configure_fit(fit: argparse.ArgumentParser) -> None:
    try:
        module = importlib.import_module("diffsim.apps.cli.fit")
    except ModuleNotFoundError as exc:
        if exc.name != "diffsim.apps.cli.fit":
            raise
        fit.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        fit.set_defaults(func=cmd_fit_missing)
        return
    module.configure(fit)
    fit.set_defaults(func=module.main)


def main(argv: list[str] | None = None) -> int:
    """Runs the ``diffsim`` command line; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    show_traceback = "--traceback" in argv
    try:
        parser = build_parser(argv)
        args, extras = parser.parse_known_args(argv)
        if extras:
            prog = f"diffsim {args.command}" if args.command else "diffsim"
            raise UsageError(
                f"{prog}: unrecognized arguments: {' '.join(extras)} (see {prog} --help)"
            )
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except SystemExit as exc:  # --help and --version
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    _quiet_warp()
    if not show_traceback:
        _one_line_warnings(f"diffsim {args.command}")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        _error(f"diffsim {args.command}: interrupted")
        return 130
    except Exception as exc:
        if show_traceback:
            raise
        usage = isinstance(exc, (FileNotFoundError, UsageError))
        _error(f"diffsim {args.command}: error: {_one_line(exc)}")
        return EXIT_USAGE if usage else EXIT_FAILURE


def _one_line_warnings(prog: str) -> None:
    """Shows Python warnings as ``PROG: warning: message`` (one line, no source line),
    above a running progress bar."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = str(message).strip().splitlines()
        out = f"{prog}: {category.__name__}: {text[0] if text else ''}"
        tqdm = sys.modules.get("tqdm")
        if tqdm is not None and hasattr(tqdm, "tqdm"):
            tqdm.tqdm.write(out, file=sys.stderr)
        else:
            print(out, file=sys.stderr)

    warnings.showwarning = show


def _quiet_warp() -> None:
    """Silences Warp's start-up banner and CPU-only notices (`diffsim info` lists devices)."""
    try:
        from diffsim.kernels.runtime import quiet_warp

        quiet_warp()
    except Exception:  # Warp missing or broken: the simulator reports it when it matters
        pass


def cmd_fit_missing(args: argparse.Namespace) -> int:
    _error("diffsim fit: unavailable (the module diffsim.apps.cli.fit is not installed)")
    return EXIT_FAILURE
