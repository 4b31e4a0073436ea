"""The ``diffsim fit`` command: recover material parameters of a scene from a trajectory file.

``diffsim fit SCENE.py --target traj.npz --param youngs_modulus --param poissons_ratio``
prints one line per iteration and a final report, and writes a loss-curve PNG, a video of
the fitted against the observed motion and (with ``--out``) a JSON result. The scene's
material values are the start values of the fit.

``--target`` repeats for several recordings fitted at once (``--per-target NAME`` gives
each its own value of NAME). Each starts from the state stored in its file
(``initial_positions``), else from the scene's ``initial_state(sim, index)`` (or
``initial_state(sim)``), else at rest. Under ``torchrun --nproc-per-node N -m diffsim fit
...`` the targets are split over the N processes and process 0 prints and writes the
results (docs/distributed-fitting.md).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np


def configure(parser: argparse.ArgumentParser) -> None:
    """Adds the ``fit`` subcommand's arguments to ``parser``."""
    parser.add_argument("scene", help="scene script (.py) defining build()")
    parser.add_argument(
        "--target",
        action="append",
        required=True,
        metavar="FILE.npz",
        help="observed trajectory (.npz); repeat to fit several recordings at once",
    )
    parser.add_argument(
        "--param",
        action="append",
        dest="params",
        metavar="NAME",
        help="parameter to fit (repeat): youngs_modulus, poissons_ratio, density, damping "
        "(default: youngs_modulus and poissons_ratio)",
    )
    parser.add_argument(
        "--per-tet", action="append", default=[], metavar="NAME", help="fit NAME per tet"
    )
    parser.add_argument(
        "--per-target",
        action="append",
        default=[],
        metavar="NAME",
        help="fit NAME with one value per target (e.g. each specimen's density)",
    )
    parser.add_argument(
        "--reduction",
        choices=("mean", "sum"),
        default="mean",
        help="how the targets' losses combine (default mean)",
    )
    parser.add_argument(
        "--initial", action="append", default=[], metavar="NAME=VALUE", help="start value"
    )
    parser.add_argument(
        "--bounds", action="append", default=[], metavar="NAME=LO,HI", help="open bounds"
    )
    parser.add_argument("--iters", type=int, default=50, help="maximum iterations (default 50)")
    parser.add_argument("--optimizer", choices=("auto", "adam", "lbfgs"), default="auto")
    parser.add_argument("--lr", type=float, default=None, help="step size (optimizer default)")
    parser.add_argument("--loss", choices=("mse", "huber"), default="mse")
    parser.add_argument("--huber-delta", type=float, default=None, help="Huber distance (m)")
    parser.add_argument("--smoothness", type=float, default=0.0, help="per-tet smoothness weight")
    parser.add_argument("--checkpoint-every", type=int, default=None, metavar="K")
    parser.add_argument(
        "--mode",
        choices=("dynamic", "equilibrium"),
        default="dynamic",
        help="equilibrium: the target is one frame of the body at rest (static equilibrium)",
    )
    parser.add_argument("--patience", type=int, default=10, help="early-stopping patience")
    parser.add_argument(
        "--stages",
        type=int,
        default=1,
        help="fit the first 1/2^(S-1), ..., 1/2, then all of the motion in turn (far starts)",
    )
    parser.add_argument("--backend", choices=("warp", "torch"), default=None)
    parser.add_argument("--dtype", choices=("float32", "float64"), default=None)
    parser.add_argument("--out", default=None, help="result JSON (default: none)")
    parser.add_argument(
        "--plot", default=None, help="loss-curve PNG (default: <out or scene>_loss.png)"
    )
    parser.add_argument(
        "--video", default=None, help="fitted vs observed video (default: <out or scene>.mp4)"
    )
    parser.add_argument("--no-video", action="store_true", help="skip the video")
    parser.add_argument("--quiet", action="store_true", help="no per-iteration lines")


def main(args: argparse.Namespace) -> int:
    """Runs the fit; returns the exit status (0 on success, 2 on bad input).

    Under torchrun every process runs this; process 0 prints and writes the outputs.
    """
    from diffsim.fitting import distributed
    from diffsim.fitting.fit import fit
    from diffsim.fitting.observation import ObservationError
    from diffsim.simulator import SimulationError

    rank = distributed.rank()
    lead = rank == 0
    try:
        stem = check_outputs(args)
        scene, sim = _load_scene(args)
        targets = _targets(args, scene)
        initial = _pairs(args.initial, "--initial", float)
        bounds = _pairs(args.bounds, "--bounds", _bound_pair)
        params = args.params or ["youngs_modulus", "poissons_ratio"]
        what = targets[0].observation if len(targets) == 1 else f"{len(targets)} targets"
        processes = int(os.environ.get("WORLD_SIZE", "1")) if distributed.launched() else 1
        spread = f", {processes} processes" if processes > 1 else ""
        if lead:
            print(
                f"fitting {', '.join([*params, *args.per_target])} of {Path(args.scene).name} "
                f"to {what} (backend {sim.backend_name}, "
                f"{str(sim.dtype).replace('torch.', '')}{spread})"
            )
        bar, log = _progress_log(args, enabled=lead)
        try:
            result = fit(
                sim,
                targets,
                params,
                per_tet=args.per_tet,
                per_target=args.per_target,
                reduction=args.reduction,
                initial=initial,
                bounds=bounds,
                optimizer=args.optimizer,
                iters=args.iters,
                lr=args.lr,
                smoothness=args.smoothness,
                loss=args.loss,
                huber_delta=args.huber_delta,
                checkpoint_every=args.checkpoint_every,
                mode=args.mode,
                stages=args.stages,
                patience=args.patience,
                log=log,
            )
        finally:
            bar.close()
    except (ObservationError, ValueError, FileNotFoundError, TypeError) as exc:
        print(f"diffsim fit{_where(rank)}: error: {exc}", file=sys.stderr)
        return 2
    except SimulationError as exc:
        print(f"diffsim fit{_where(rank)}: simulation failed: {exc}", file=sys.stderr)
        return 1
    finally:
        distributed.finish()
    if not lead:
        return 0
    _report(result)
    if args.out:
        result.save_json(args.out)
        print(f"result: {args.out}")
    from diffsim.apps.plots import INSTALL_HINT, plotting_available

    plot = args.plot or f"{stem}_loss.png"
    if plotting_available():
        write_loss_plot(result.loss_history, plot)
        print(f"loss curve: {plot}")
    else:
        print(f"loss curve skipped: matplotlib is not installed ({INSTALL_HINT})")
    if not args.no_video and args.mode == "dynamic":
        video = args.video or f"{stem}.mp4"
        first = targets[0]
        fitted = result.apply(sim, target=0 if result.per_target else None)
        start = first.start(fitted, 0) or fitted.initial_state()
        note = write_comparison_video(scene, fitted, first.observation, video, start)
        if len(targets) > 1:
            note += f" of the first target, {first.name}"
        print(note)
    return 0


def _where(rank: int) -> str:
    return f" (process {rank})" if rank else ""


def _targets(args: argparse.Namespace, scene) -> list:
    """The ``--target`` files as targets, each with its start state (see the module doc)."""
    from diffsim.fitting.observation import Observation
    from diffsim.fitting.targets import Target

    targets = []
    for i, path in enumerate(args.target):
        observation = Observation.load(path)
        state = None if observation.has_start else _scene_start(scene, i)
        targets.append(Target(observation, state=state, name=Path(path).name))
    return targets


def _scene_start(scene, index: int):
    """The scene's start state for target ``index``: ``initial_state(sim, index)`` where the
    script's function takes two arguments, else ``initial_state(sim)`` (or rest)."""
    import inspect

    from diffsim.apps.scene import SceneError, describe_exception
    from diffsim.sim.state import State

    make = getattr(scene.module, "initial_state", None)
    try:
        positional = [
            p
            for p in inspect.signature(make).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
        ]
    except (TypeError, ValueError):
        positional = []
    if make is None or len(positional) < 2:
        return scene.initial_state

    def start(sim):
        try:
            state = make(sim, index)
        except Exception as exc:
            where = describe_exception(exc, scene.path)
            raise SceneError(f"{where} (in initial_state(sim, {index}))") from exc
        if not isinstance(state, State):
            raise SceneError(
                f"{scene.path}: initial_state(sim, index) must return a diffsim.State, "
                f"got {type(state).__name__}"
            )
        return state

    return start


def check_outputs(args: argparse.Namespace) -> Path:
    """Checks before the fit starts that its outputs can be written; returns their stem.

    Raises:
        ValueError: an output whose folder does not exist, or a suffix that does not fit.
    """
    stem = Path(args.out).with_suffix("") if args.out else Path(f"{Path(args.scene).stem}_fit")
    outputs = [
        ("--out", args.out, None),
        ("--plot", args.plot or f"{stem}_loss.png", (".png",)),
    ]
    if not args.no_video and args.mode == "dynamic":
        outputs.append(("--video", args.video or f"{stem}.mp4", (".mp4", ".gif")))
    if args.plot:
        from diffsim.apps.plots import INSTALL_HINT, plotting_available

        if not plotting_available():
            raise ValueError(f"--plot {args.plot}: the loss plot needs matplotlib; {INSTALL_HINT}")
    for flag, path, suffixes in outputs:
        if path is None:
            continue
        p = Path(path)
        if suffixes is not None and p.suffix.lower() not in suffixes:
            raise ValueError(f"{flag} {path}: expected a {' or '.join(suffixes)} file name")
        if not p.parent.exists():
            raise ValueError(
                f"{flag} {path}: folder {p.parent} does not exist; create it first "
                "(checked before the fit starts)"
            )
    return stem


def _progress_log(args: argparse.Namespace, enabled: bool = True):
    """``(bar, log)``: a progress bar over the iterations, and a log function that prints
    the fit's lines above it (or nothing with ``--quiet``)."""
    from diffsim.apps.progress import progress_bar

    stages = 1 if args.mode == "equilibrium" else max(1, args.stages)
    # Shown after a second: an input error found at once leaves one line on stderr.
    bar = progress_bar((args.iters + 1) * stages, "fit", "iteration", enabled, delay=1.0)

    def log(line: str) -> None:
        if line.startswith("iter"):
            bar.update(1)
        if args.quiet:
            return
        if hasattr(bar, "write"):
            bar.write(line, file=sys.stdout)
        else:
            print(line)

    return bar, log


def _load_scene(args):
    try:
        from diffsim.apps.scene import load_scene
    except ImportError as exc:  # pragma: no cover - scene.py is part of the package
        raise ValueError("diffsim.apps.scene is not available") from exc
    import torch

    from diffsim.fitting import distributed

    distributed.share_cores()  # under torchrun: the machine's cores split between processes
    scene = load_scene(args.scene)
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    sim = scene.build(backend=args.backend, dtype=dtype)
    if distributed.launched() and sim.device.type == "cuda":
        # One GPU per process: this process's own (cuda:LOCAL_RANK on its machine).
        sim = scene.build(
            backend=args.backend, dtype=dtype, device=distributed.local_device(sim.device)
        )
    return scene, sim


def _pairs(items, flag: str, convert) -> dict:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"{flag} takes NAME=VALUE, got {item!r}")
        try:
            out[name.strip()] = convert(value)
        except ValueError as exc:
            raise ValueError(f"{flag} {item!r}: {exc}") from exc
    return out


def _bound_pair(text: str) -> tuple[float, float]:
    parts = text.split(",")
    if len(parts) != 2:
        raise ValueError("bounds are LO,HI (use inf for none)")
    return float(parts[0]), float(parts[1])


def _report(result) -> None:
    print("\nparameter            start          fitted")
    for name, value in result.values.items():
        start = result.initial[name]
        shown = "per target" if name in result.per_target else _show(value)
        print(f"  {name:18s} {_show(start):>12s}   {shown:>12s}")
    if len(result.target_names) > 1:
        own = "".join(f"  {n:>14s}" for n in result.per_target)
        print(f"\ntarget                     RMS error (m){own}")
        for i, (name, loss) in enumerate(
            zip(result.target_names, result.target_losses, strict=True)
        ):
            values = "".join(f"  {v:14.6g}" for v in result.target_values(i).values())
            print(f"  {name[:24]:24s} {math.sqrt(max(loss, 0.0)):13.3e}{values}")
    first, last = result.loss_history[0], result.best_loss
    print(f"loss {first:.4e} -> {last:.4e}  (RMS position error {result.rmse:.3e} m)")
    t = result.timings
    print(
        f"{result.iterations} iterations, {result.evaluations} rollouts with gradient, "
        f"{t['per_iteration']:.3f} s per iteration, {t['total']:.1f} s in all"
    )
    print(result.stop_reason)


def _show(value) -> str:
    if isinstance(value, np.ndarray):
        return f"[{value.min():.4g}..{value.max():.4g}]"
    return f"{value:.6g}"


# --------------------------------------------------------------------- the loss curve
def write_loss_plot(losses, path: str | Path) -> None:
    """The loss per iteration (log scale) as a PNG (:func:`diffsim.apps.plots.line_plot`).

    Raises:
        ImportError: matplotlib is not installed.
    """
    from diffsim.apps.plots import line_plot

    line_plot(
        path,
        list(range(len(losses))),
        {"loss": [max(float(v), 1e-300) for v in losses]},
        xlabel="iteration",
        ylabel="loss (mean squared position error, m^2)",
        log_y=True,
    )


# --------------------------------------------------------------------- the comparison video
def write_comparison_video(scene, sim, observation, path, state, max_frames: int = 150) -> str:
    """Renders the fitted rollout beside the observed motion; returns a one-line note.

    A target of all vertices gives two panels (fitted | observed); a marker target gives
    one panel, the fitted body with the observed markers as red points.
    """
    import torch

    try:
        from diffsim.apps.render import (
            FrameRenderer,
            RenderError,
            fit_camera,
            label_image,
            write_frames,
        )
    except ImportError:
        return "video skipped: diffsim.apps.render is not available"
    dt = sim.model.dt
    steps = observation.steps(dt)
    with torch.no_grad():
        traj = sim.rollout(observation.steps_needed(dt), state=state)
        full = _at_steps(traj.positions, steps).cpu().double().numpy()
    observed = observation.positions
    stride = max(1, math.ceil(len(steps) / max_frames))
    picks = list(range(0, len(steps), stride))
    faces = sim.mesh.surface_faces
    ground = None if sim.model.ground is None else sim.model.ground.height
    try:
        if observation.indices is None:
            obs = np.where(np.isnan(observed), full, observed)
            both = np.concatenate([full[picks], obs[picks]]).reshape(-1, 3)
            camera = scene.camera or fit_camera(_bounds(both[~np.isnan(both).any(1)], ground))
            left = _render(FrameRenderer, faces, full[picks], camera, ground, None)
            right = _render(FrameRenderer, faces, obs[picks], camera, ground, None)
            frames = [
                np.concatenate([label_image(a, "simulated"), label_image(b, "observed")], axis=1)
                for a, b in zip(left, right, strict=True)
            ]
            what = "simulated with the fitted values (left) vs observed (right), labelled"
        else:
            n = full.shape[1]
            seen = observed[picks]
            markers = np.where(np.isnan(seen), full[picks][:, observation.indices], seen)
            merged = np.concatenate([full[picks], markers], axis=1)
            camera = scene.camera or fit_camera(_bounds(merged.reshape(-1, 3), ground))
            idx = np.arange(n, n + observation.n_points)
            frames = [
                label_image(f, "simulated body, observed markers (red)")
                for f in _render(FrameRenderer, faces, merged, camera, ground, idx)
            ]
            what = "fitted body with the observed markers (red)"
        fps = max(1, round(1.0 / (dt * float(np.mean(np.diff(steps))) * stride)))
        fps = min(fps, 60) if len(steps) > 1 else 1
        write_frames(frames, path, fps)
    except (RenderError, OSError, RuntimeError) as exc:
        return f"video skipped: {str(exc).splitlines()[0]}"
    return f"video: {path} ({what}, {len(picks)} frames)"


def _at_steps(positions, steps: np.ndarray):
    import torch

    s = torch.as_tensor(steps, dtype=positions.dtype)
    lo = torch.floor(s).long().clamp(max=positions.shape[0] - 1)
    hi = (lo + 1).clamp(max=positions.shape[0] - 1)
    frac = (s - lo.to(s.dtype))[:, None, None]
    return positions[lo] * (1 - frac) + positions[hi] * frac


def _bounds(points: np.ndarray, ground) -> np.ndarray:
    b = np.stack([points.min(axis=0), points.max(axis=0)])
    if ground is not None:
        b[0, 1] = min(b[0, 1], ground)
    return b


def _render(renderer_cls, faces, frames, camera, ground, points) -> list[np.ndarray]:
    renderer = renderer_cls(faces, frames[0], camera=camera, ground=ground, fixed=points)
    try:
        return [renderer.render(x) for x in frames]
    finally:
        renderer.close()


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser (``python -m diffsim.apps.cli.fit``)."""
    parser = argparse.ArgumentParser(prog="diffsim fit", description=__doc__.splitlines()[0])
    configure(parser)
    return parser


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
