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
import math
import os
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
FIELD_CHOICES = ("speed", "displacement", "energy_density", "von_mises")


class UsageError(Exception):
    """Bad command-line usage (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises UsageError instead of printing usage and exiting."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


# ----------------------------------------------------------------------------- parser
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
    render.add_argument("--out", required=True, help="output: .mp4, .gif, .png or DIR/")
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

    info = sub.add_parser("info", help="versions, devices and the rendering backend")
    info.set_defaults(func=cmd_info)

    fit = sub.add_parser("fit", help="fit material parameters of a scene to a trajectory")
    if _wants(argv, "fit"):
        _configure_fit(fit)
    else:
        fit.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        fit.set_defaults(func=cmd_fit_missing)
    return parser


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


def _wants(argv: list[str] | None, command: str) -> bool:
    args = sys.argv[1:] if argv is None else argv
    positional = [a for a in args if not a.startswith("-")]
    return bool(positional) and positional[0] == command


def _configure_fit(fit: argparse.ArgumentParser) -> None:
    try:
        module = importlib.import_module("diffsim.fit_command")
    except ModuleNotFoundError as exc:
        if exc.name != "diffsim.fit_command":
            raise
        fit.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        fit.set_defaults(func=cmd_fit_missing)
        return
    module.configure(fit)
    fit.set_defaults(func=module.main)


# ----------------------------------------------------------------------------- argument types
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


# ----------------------------------------------------------------------------- entry point
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


def _error(message: str) -> None:
    print(message, file=sys.stderr)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    message = text[0] if text else type(exc).__name__
    from diffsim.scene import SceneError

    if isinstance(exc, (SceneError, FileNotFoundError, UsageError)):
        return message
    return f"{type(exc).__name__}: {message}"


def _quiet_warp() -> None:
    """Silences Warp's start-up banner and CPU-only notices (`diffsim info` lists devices)."""
    try:
        from diffsim.warp_setup import quiet_warp

        quiet_warp()
    except Exception:  # Warp missing or broken: the simulator reports it when it matters
        pass


def _version_line() -> str:
    from importlib import metadata

    try:
        version = metadata.version("diffsim")
    except metadata.PackageNotFoundError:  # run from a source tree without installing
        from diffsim import __version__ as version
    return f"diffsim {version}"


# ----------------------------------------------------------------------------- helpers
def _dtype(name: str | None):
    if name is None:
        return None
    import torch

    return {"float32": torch.float32, "float64": torch.float64}[name]


def _device(name: str | None):
    if name is None:
        return None
    from diffsim.warp_setup import check_device

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
    from diffsim.scene import load_scene, mesh_scene

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


def simulate(scene, sim, steps: int, progress: bool = True):
    """Runs ``steps`` steps without gradients, with a progress bar on stderr.

    Returns:
        ``(trajectory, timing)`` with timing ``{"elapsed": s, "warmup": s, "warmup_steps": n}``:
        the wall time of all steps and of the first chunk (which includes Warp's kernel
        loading or compilation).
    """
    import torch

    from diffsim.apps_progress import progress_bar
    from diffsim.state import Trajectory

    state = scene.initial_state(sim)
    positions = [state.positions.detach().unsqueeze(0)]
    velocities = [state.velocities.detach().unsqueeze(0)]
    chunk = max(1, min(100, steps // 50 or 1))
    done = 0
    start = time.perf_counter()
    timing = {"elapsed": 0.0, "warmup": 0.0, "warmup_steps": 0}
    with torch.no_grad(), progress_bar(steps, "run", "step", enabled=progress) as bar:
        while done < steps:
            n = min(chunk, steps - done)
            part = sim.rollout(n, state)
            positions.append(part.positions[1:])
            velocities.append(part.velocities[1:])
            state = part.state(-1)
            done += n
            if not timing["warmup_steps"]:
                timing.update(warmup=time.perf_counter() - start, warmup_steps=done)
            rate = steady_rate(sim, done, dict(timing, elapsed=time.perf_counter() - start))
            bar.set_postfix_str(
                f"t = {done * sim.model.dt:.3f} s, {_si(rate)} tet-substeps/s", refresh=False
            )
            bar.update(n)
    timing["elapsed"] = time.perf_counter() - start
    traj = Trajectory(
        torch.cat(positions),
        torch.cat(velocities),
        sim.model.dt,
        sim.mesh.tets,
        sim.mesh.surface_faces,
    )
    return traj, timing


def steady_rate(sim, steps: int, timing: dict) -> float:
    """Tet-substeps per second after the first chunk (or overall if there was one chunk)."""
    work = sim.mesh.n_tets * sim.model.substeps
    if steps > timing["warmup_steps"] and timing["elapsed"] > timing["warmup"]:
        return work * (steps - timing["warmup_steps"]) / (timing["elapsed"] - timing["warmup"])
    return work * steps / max(timing["elapsed"], 1e-9)


def _si(value: float) -> str:
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


def _summary(scene, sim, traj, timing: dict) -> str:
    steps = traj.n_frames - 1
    first = {k: float(v) for k, v in sim.energies(traj.state(0)).items()}
    last = {k: float(v) for k, v in sim.energies(traj.state(-1)).items()}
    rate = steady_rate(sim, steps, timing)
    dtype = str(sim.dtype).replace("torch.", "")
    warm = ""
    if steps > timing["warmup_steps"]:
        warm = f" after the first {timing['warmup_steps']} steps ({timing['warmup']:.2f} s)"
    lines = [
        f"{scene.name}: {steps} steps of {sim.model.dt:g} s ({steps * sim.model.dt:.3f} s "
        f"simulated) in {timing['elapsed']:.2f} s wall",
        f"  {_si(rate)} tet-substeps/s{warm}",
        f"  {sim.mesh.n_vertices} vertices, {sim.mesh.n_tets} tets, {sim.model.substeps} "
        f"substep(s), backend {sim.backend_name}, {dtype}",
        "  energy (J)      start        end",
    ]
    for key in first:
        lines.append(f"  {key:<13} {first[key]:>10.4g} {last[key]:>10.4g}")
    y = traj.positions[..., 1]
    lines.append(f"  lowest vertex height {float(y.min()):.4g} m")
    return "\n".join(lines)


def _view_direction(camera: dict | None):
    """The direction from a camera's target to its position, or None."""
    if camera is None:
        return None
    return tuple(p - t for p, t in zip(camera["position"], camera["target"], strict=True))


def _render_options(args, scene, sim) -> dict:
    from diffsim.fields import FieldContext
    from diffsim.render import DEFAULT_SIZE

    ground = sim.model.ground.height if sim.model.ground is not None else None
    return dict(
        fps=args.fps or scene.fps,
        stride=args.stride,
        max_frames=args.frames,
        size=args.size or DEFAULT_SIZE,
        camera=args.camera,
        view_direction=_view_direction(scene.camera),
        ground=ground,
        fixed=sim.model.fixed_indices.cpu().numpy(),
        body_ids=sim.mesh.body_ids,
        field=args.color,
        context=FieldContext.from_simulator(sim),
    )


def _output_kind(out: str, allow_npz: bool) -> str:
    from diffsim.render import RenderError, check_output

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


# ----------------------------------------------------------------------------- commands
def cmd_run(args: argparse.Namespace) -> int:
    """``diffsim run SCENE.py|MESH [--steps N] [--out FILE] [--energy FILE.csv] [--set K=V]``."""
    kind = _output_kind(args.out, allow_npz=True) if args.out else None
    _check_csv(args.energy)
    scene, sim = _load(args.scene, args, mesh_ok=True)
    steps = scene.steps if args.steps is None else args.steps
    traj, timing = simulate(scene, sim, steps)
    print(_summary(scene, sim, traj, timing))
    if args.energy:
        write_energy(sim, traj, args.energy)
    if kind == "npz":
        traj.save(args.out, metadata=provenance(scene, sim, args))
        print(f"wrote {args.out} ({traj.n_frames} frames: {steps} steps of {traj.dt:g} s)")
    elif kind is not None:
        _render_out(args, traj, sim.mesh.surface_faces, _render_options(args, scene, sim))
    return EXIT_OK


def provenance(scene, sim, args: argparse.Namespace) -> dict:
    """What made a trajectory: scene, parameters, settings, diffsim's version, when."""
    import datetime

    from diffsim import __version__

    camera = scene.camera
    return {
        "diffsim_version": __version__,
        "scene": str(scene.path),
        "parameters": getattr(scene, "parameters", None) or {},
        "steps": None if args.steps is None else int(args.steps),
        "dt": float(sim.model.dt),
        "substeps": int(sim.model.substeps),
        "backend": sim.backend_name,
        "dtype": str(sim.dtype).replace("torch.", ""),
        "device": str(sim.device),
        "ground": None if sim.model.ground is None else float(sim.model.ground.height),
        "fps": int(scene.fps),
        "camera": None if camera is None else {k: list(v) for k, v in camera.items()},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_energy(sim, traj, path: str, max_rows: int = 500) -> None:
    """Writes the energies (J) of at most ``max_rows`` evenly spaced frames as CSV, and a
    plot beside it (``.png``) where matplotlib is installed."""
    import torch

    stride = max(1, math.ceil((traj.n_frames - 1) / max(1, max_rows - 1)))
    frames = list(range(0, traj.n_frames, stride))
    if frames[-1] != traj.n_frames - 1:
        frames.append(traj.n_frames - 1)
    rows = []
    with torch.no_grad():
        for i in frames:
            energy = sim.energies(traj.state(i))
            rows.append((i, i * traj.dt, {k: float(v) for k, v in energy.items()}))
    keys = list(rows[0][2])
    with open(path, "w") as f:
        f.write(",".join(["step", "time", *keys]) + "\n")
        for i, t, values in rows:
            f.write(",".join([str(i), f"{t:.9g}", *(f"{values[k]:.9g}" for k in keys)]) + "\n")
    print(f"wrote {path} (energies in J at {len(rows)} instants)")
    plot = Path(path).with_suffix(".png")
    try:
        write_energy_plot(rows, keys, plot)
    except ImportError:
        print(
            f"energy plot skipped: matplotlib is not installed (pip install matplotlib for {plot})"
        )
        return
    print(f"wrote {plot}")


def write_energy_plot(rows, keys: list[str], path: Path) -> None:
    """The energies over time as a PNG (matplotlib, without a display).

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r[1] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        for key in keys:
            ax.plot(t, [r[2][key] for r in rows], label=key, lw=2.2 if key == "total" else 1.4)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("energy (J)")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def _render_out(args, traj, faces, options: dict) -> None:
    """Renders ``traj`` to ``args.out`` and says what was written: frames, the video's
    length (and slow motion), and the time it took."""
    from diffsim.render import slow_motion, video_stride

    stride = options["stride"] or video_stride(traj.n_frames - 1, traj.dt, options["fps"])
    options = dict(options, stride=stride)
    from diffsim.render import render_trajectory

    start = time.perf_counter()
    n = render_trajectory(
        traj.positions.detach().cpu().numpy(),
        faces,
        args.out,
        dt=traj.dt,
        velocities=traj.velocities.detach().cpu().numpy(),
        progress=True,
        **options,
    )
    elapsed = time.perf_counter() - start
    fps = options["fps"]
    if Path(args.out).suffix.lower() in (".mp4", ".gif"):
        slow = slow_motion(stride, traj.dt, fps)
        speed = f", {slow:.2g}x slow motion" if slow > 1.05 else ""
        what = f"{n} frames, {n / fps:.2f} s of video at {fps} fps{speed}"
    elif Path(args.out).suffix.lower() == ".png":
        what = f"the last frame, t = {(traj.n_frames - 1) * traj.dt:.3f} s"
    else:
        what = f"{n} PNG frames"
    print(f"wrote {args.out} ({what}; rendered in {elapsed:.1f} s)")


def cmd_render(args: argparse.Namespace) -> int:
    """``diffsim render TRAJ.npz|SCENE.py --out FILE.mp4|.gif|.png|DIR/ [--export obj|ply]``."""
    if args.export is None:
        _output_kind(args.out, allow_npz=False)
    path = Path(args.path)
    if path.suffix.lower() == ".py":
        scene, sim = _load(args.path, args)
        steps = scene.steps if args.steps is None else args.steps
        traj, timing = simulate(scene, sim, steps)
        print(_summary(scene, sim, traj, timing))
        options = _render_options(args, scene, sim)
        faces = sim.mesh.surface_faces
    else:
        traj, scene, sim = _load_trajectory(args)
        options, faces = _trajectory_render_options(args, traj, scene, sim)
    if args.export is not None:
        return _export(args, traj, faces, options)
    _render_out(args, traj, faces, options)
    return EXIT_OK


def _load_trajectory(args):
    """(trajectory, scene or None, simulator or None) for a ``.npz`` and an optional --scene;
    ``--steps N`` keeps the first N steps."""
    from diffsim.state import Trajectory

    path = _require_file(args.path, (".npz",), "a trajectory (.npz) or a scene script (.py)")
    traj = Trajectory.load(path)
    if getattr(args, "steps", None) is not None:
        available = traj.n_frames - 1
        if args.steps > available:
            raise UsageError(
                f"--steps {args.steps}: {args.path} holds only {available} steps; "
                f"use --steps {available} or less"
            )
        metadata = traj.metadata
        traj = Trajectory(
            traj.positions[: args.steps + 1],
            traj.velocities[: args.steps + 1],
            traj.dt,
            traj.tets,
            traj.surface_faces,
        )
        traj.metadata = metadata
    scene = sim = None
    if args.scene:
        scene, sim = _load(args.scene, args)
        if sim.mesh.n_vertices != traj.positions.shape[1]:
            raise UsageError(
                f"{args.scene} has {sim.mesh.n_vertices} vertices but {args.path} has "
                f"{traj.positions.shape[1]}; pass the scene that made the trajectory"
            )
    return traj, scene, sim


def _trajectory_render_options(args, traj, scene, sim):
    """Render options for a trajectory: from --scene, else from the file's metadata
    (ground, fps and camera direction of the scene that made it)."""
    from diffsim.fields import FieldContext
    from diffsim.render import DEFAULT_SIZE, surface_faces

    faces, tets = surface_faces(traj), traj.tets
    if sim is not None:
        options = _render_options(args, scene, sim)
        return options, faces
    needs_material = args.color in ("energy_density", "von_mises")
    if needs_material:
        raise UsageError(
            f"--color {args.color} needs the material: add --scene SCENE.py (the scene that "
            "made the trajectory)"
        )
    meta = traj.metadata or {}
    ground = meta.get("ground")
    fps = meta.get("fps")
    camera = meta.get("camera")
    try:
        direction = _view_direction(camera) if isinstance(camera, dict) else None
    except (KeyError, TypeError):
        direction = None
    return (
        dict(
            fps=args.fps or (fps if isinstance(fps, int) and fps > 0 else 30),
            stride=args.stride,
            max_frames=args.frames,
            size=args.size or DEFAULT_SIZE,
            camera=args.camera,
            view_direction=direction,
            ground=float(ground) if isinstance(ground, (int, float)) else None,
            fixed=None,
            field=args.color,
            context=FieldContext(traj.positions[0].numpy(), tets),
        ),
        faces,
    )


def _export(args, traj, faces, options) -> int:
    from diffsim.render import export_surfaces, frame_indices, video_stride

    out = Path(args.out)
    if out.suffix and not out.is_dir():
        raise UsageError(f"--export writes one file per frame: --out must be a folder, got {out}")
    stride = options["stride"] or video_stride(traj.n_frames - 1, traj.dt, options["fps"])
    picks = frame_indices(traj.n_frames, stride, options["max_frames"])
    paths = export_surfaces(traj.positions.cpu().numpy()[picks], faces, out, args.export)
    print(f"wrote {len(paths)} {args.export.upper()} files to {out}/")
    return EXIT_OK


def has_display() -> bool:
    """True if a window can be opened (a display on Linux; assumed elsewhere)."""
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def cmd_view(args: argparse.Namespace) -> int:
    """``diffsim view SCENE.py|TRAJ.npz``."""
    path = Path(args.path)
    if path.suffix.lower() not in (".py", ".npz"):
        raise UsageError(f"{args.path}: expected a scene script (.py) or a trajectory (.npz)")
    if not path.is_file():
        raise FileNotFoundError(f"{args.path}: no such file")
    if not has_display():
        out = path.with_suffix(".mp4").name
        headless = (
            f"diffsim run {args.path} --out {out}"
            if path.suffix.lower() == ".py"
            else f"diffsim render {args.path} --out {out}"
        )
        _error(f"diffsim view: no display found ($DISPLAY is unset); render headless: {headless}")
        return EXIT_FAILURE
    from diffsim.viewer import ViewerController, run_viewer

    if path.suffix.lower() == ".py":
        scene, sim = _load(args.path, args)
        controller = ViewerController.for_scene(scene, sim)
    else:
        traj, scene, sim = _load_trajectory(args)
        controller = ViewerController.for_trajectory(traj, sim)
    run_viewer(controller, camera=scene.camera if scene is not None else None)
    return EXIT_OK


def cmd_fit_missing(args: argparse.Namespace) -> int:
    _error("diffsim fit: unavailable (the module diffsim.fit_command is not installed)")
    return EXIT_FAILURE


def cmd_info(args: argparse.Namespace) -> int:
    """``diffsim info``: versions, devices, backends and whether EGL rendering works."""
    import platform
    from importlib import metadata

    print(f"python         {platform.python_version()} ({sys.executable})")
    packages = ("diffsim", "torch", "warp-lang", "polyscope", "imageio", "imageio-ffmpeg", "tqdm")
    for package in packages:
        try:
            version = metadata.version(package)
        except metadata.PackageNotFoundError:
            version = "not installed"
        print(f"{package:<14} {version}")
    import torch

    from diffsim.backends import BACKENDS

    print(f"devices        cpu ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"               cuda:{i} ({torch.cuda.get_device_name(i)})")
    elif torch.version.cuda is None:
        print("               no CUDA device (this torch is a CPU-only build)")
    else:
        print(f"               no CUDA device (torch built for CUDA {torch.version.cuda})")
    print(f"backends       {', '.join(sorted(BACKENDS))}")
    if "warp" in BACKENDS:
        from diffsim.backends.warp_backend import cpu_threads
        from diffsim.warp_setup import cuda_driver_present

        print(f"warp threads   {cpu_threads()} on the CPU (DIFFSIM_WARP_THREADS to change)")
        if cuda_driver_present():
            print("warp cuda      NVIDIA driver found (Warp can run on the GPU)")
        else:
            print("warp cuda      no NVIDIA driver: Warp runs on the CPU only")
    ok, detail = probe_rendering()
    print(f"rendering      {'openGL3_egl works' if ok else 'unavailable'} ({detail})")
    return EXIT_OK


def probe_rendering(timeout: float = 60.0) -> tuple[bool, str]:
    """Tries polyscope's EGL backend in a child process; ``(works, detail)``."""
    import subprocess

    # Polyscope alone (not diffsim, which would import torch): the same calls as init_headless.
    code = (
        "import polyscope as ps\n"
        "ps.set_verbosity(0)\n"
        "ps.set_use_prefs_file(False)\n"
        "ps.set_allow_headless_backends(True)\n"
        "ps.init('openGL3_egl')\n"
        "print(ps.get_render_engine_backend_name())\n"
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return False, f"EGL start-up did not finish in {timeout:.0f} s"
    if result.returncode == 0:
        lines = result.stdout.strip().splitlines()
        return True, f"polyscope backend {lines[-1] if lines else '?'}, headless"
    lines = (result.stderr or result.stdout).strip().splitlines()
    return False, lines[-1] if lines else f"exit status {result.returncode}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
