"""``diffsim run``: simulate a scene headless; write a video or a trajectory, a summary."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from diffsim.apps.cli.arguments import EXIT_OK, _check_csv, _load, _output_kind


def simulate(scene, sim, steps: int, progress: bool = True):
    """Runs ``steps`` steps without gradients, with a progress bar on stderr.

    Returns:
        ``(trajectory, timing)`` with timing ``{"elapsed": s, "warmup": s, "warmup_steps": n,
        "inversions": Inversions}``: the wall time of all steps and of the first chunk (which
        includes Warp's kernel loading or compilation), and the inverted tets of all steps
        (:attr:`Simulator.inversions` of each chunk, joined).
    """
    import torch

    from diffsim.apps.progress import progress_bar
    from diffsim.sim.state import Trajectory
    from diffsim.simulator import Inversions

    state = scene.initial_state(sim)
    positions = [state.positions.detach().unsqueeze(0)]
    velocities = [state.velocities.detach().unsqueeze(0)]
    chunk = max(1, min(100, steps // 50 or 1))
    done = 0
    start = time.perf_counter()
    timing = {"elapsed": 0.0, "warmup": 0.0, "warmup_steps": 0}
    inversions = []
    with torch.no_grad(), progress_bar(steps, "run", "step", enabled=progress) as bar:
        while done < steps:
            n = min(chunk, steps - done)
            part = sim.rollout(n, state)
            inversions.append(sim.inversions)
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
    timing["inversions"] = Inversions.join(inversions) if inversions else sim.inversions
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
        f"  {sim.mesh.n_vertices} vertices, {sim.mesh.n_tets} tets, backend "
        f"{sim.backend_name}, {dtype}",
        _time_step_line(sim),
        _added_mass_line(sim),
        "  energy (J)      start        end",
    ]
    for key in first:
        lines.append(f"  {key:<13} {first[key]:>10.4g} {last[key]:>10.4g}")
    y = traj.positions[..., 1]
    lines.append(f"  lowest vertex height {float(y.min()):.4g} m")
    lines.append(_inversion_line(timing.get("inversions", sim.inversions)))
    if sim.model.volume_limit is not None:
        lines.append(_volume_limit_line(sim))
    if sim.model.contact is not None:
        lines.append(_contact_line(sim))
    return "\n".join(lines)


def _contact_line(sim) -> str:
    """Surface contact: its dhat, the approach speed the barrier stops at this substep, and
    the vertex-steps the continuous collision limit cut (impacts faster than that)."""
    c = getattr(sim.model.contact, "contacts", [sim.model.contact])[0]
    cut = sim.contact_steps_cut
    return (
        f"  surface contact: dhat {c.dhat * 1e3:.3g} mm, the barrier stops approaches up to "
        f"{c.stopping_speed(sim.model.substep_dt):.3g} m/s; the step limit cut "
        f"{cut} vertex-steps" + (" (impacts lost energy: see contact_speed)" if cut else "")
    )


def _volume_limit_line(sim) -> str:
    """The volume limit: its floor and the vertex-steps it cut."""
    counts = sim.model.volume_limit.counts
    return (
        f"  volume limit: J >= {sim.model.volume_limit.min_ratio:g}; it cut "
        f"{counts['limited_vertex_steps']} vertex-steps in {counts['limited_substeps']} substeps"
        + (" (they lost energy)" if counts["limited_vertex_steps"] else "")
    )


def _inversion_line(record) -> str:
    """The inverted tets (J <= 0) of the run (an :class:`Inversions`), or that there are none."""
    return f"  inverted tets: {record.summary()}"


def _time_step_line(sim) -> str:
    """The substeps used per step and the estimated stable substep (``sim.stable_dt``)."""
    n, h = sim.model.substeps, sim.model.dt / sim.model.substeps
    return (
        f"  {n} substep{'s' if n > 1 else ''} of {h:.3g} s per step; estimated stable substep "
        f"{sim.stable_dt:.3g} s"
    )


def _added_mass_line(sim) -> str:
    """The mass ``mass_scaling`` added (``sim.added_mass``, kg), or that there is none."""
    scaling = sim.mass_scaling
    if scaling is None:
        return "  added mass 0 kg (no mass scaling)"
    return (
        f"  added mass {sim.added_mass:.3g} kg ({100.0 * scaling.fraction:.2g}% of "
        f"{scaling.mass:.3g} kg) by mass_scaling={scaling.target_dt:g} s, at "
        f"{len(scaling.scaled_vertices)} of {len(scaling.added_mass)} vertices"
    )


def _view_direction(camera: dict | None):
    """The direction from a camera's target to its position, or None."""
    if camera is None:
        return None
    return tuple(p - t for p, t in zip(camera["position"], camera["target"], strict=True))


def _render_options(args, scene, sim) -> dict:
    from diffsim.apps.fields import FieldContext
    from diffsim.apps.render import DEFAULT_SIZE

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
    from diffsim.apps import plots

    plot = Path(path).with_suffix(".png")
    if not plots.plotting_available():
        print(f"energy plot skipped: matplotlib is not installed ({plots.INSTALL_HINT})")
        return
    write_energy_plot(rows, keys, plot)
    print(f"wrote {plot}")


def write_energy_plot(rows, keys: list[str], path: Path) -> None:
    """The energies over time as a PNG (:func:`diffsim.apps.plots.line_plot`).

    Raises:
        ImportError: matplotlib is not installed.
    """
    from diffsim.apps.plots import line_plot

    t = [r[1] for r in rows]
    series = {key: [r[2][key] for r in rows] for key in keys}
    line_plot(path, t, series, xlabel="time (s)", ylabel="energy (J)", emphasise="total")


def _render_out(args, traj, faces, options: dict) -> None:
    """Renders ``traj`` to ``args.out`` and says what was written: frames, the video's
    length (and slow motion), and the time it took."""
    from diffsim.apps.render import slow_motion, video_stride

    stride = options["stride"] or video_stride(traj.n_frames - 1, traj.dt, options["fps"])
    options = dict(options, stride=stride)
    from diffsim.apps.render import render_trajectory

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
