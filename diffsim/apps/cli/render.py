"""``diffsim render``: render a trajectory or scene to video, PNG frames, OBJ or PLY."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffsim.apps.cli.arguments import EXIT_OK, UsageError, _load, _output_kind, _require_file
from diffsim.apps.cli.run import _render_options, _render_out, _summary, _view_direction, simulate


def cmd_render(args: argparse.Namespace) -> int:
    """``diffsim render TRAJ.npz|SCENE.py --out FILE.mp4|.gif|.png|.pvd|DIR/ [--export ...]``."""
    pvd = Path(args.out).suffix.lower() == ".pvd"
    if pvd and not Path(args.out).parent.is_dir():
        raise UsageError(f"{args.out}: folder {Path(args.out).parent} does not exist")
    if args.export is None and not pvd:
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
    if pvd:
        return _export_vtu(args, traj, sim)
    _render_out(args, traj, faces, options)
    return EXIT_OK


def _load_trajectory(args):
    """(trajectory, scene or None, simulator or None) for a ``.npz`` and an optional --scene;
    ``--steps N`` keeps the first N steps."""
    from diffsim.sim.state import Trajectory

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
    from diffsim.apps.fields import FieldContext
    from diffsim.apps.render import DEFAULT_SIZE, surface_faces

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
    from diffsim.apps.render import export_surfaces, frame_indices, video_stride

    out = Path(args.out)
    if out.suffix and not out.is_dir():
        raise UsageError(f"--export writes one file per frame: --out must be a folder, got {out}")
    stride = options["stride"] or video_stride(traj.n_frames - 1, traj.dt, options["fps"])
    picks = frame_indices(traj.n_frames, stride, options["max_frames"])
    paths = export_surfaces(traj.positions.cpu().numpy()[picks], faces, out, args.export)
    print(f"wrote {len(paths)} {args.export.upper()} files to {out}/")
    return EXIT_OK


def _export_vtu(args, traj, sim) -> int:
    """Writes ``--out X.pvd`` and its VTU frames (every ``--stride``-th, at most ``--frames``)
    for ParaView; the stress and energy fields need the material (a scene)."""
    from diffsim.apps.export import export_vtu_series

    material = None if sim is None else sim.material
    rest = None if sim is None else sim.mesh.vertices
    frames = export_vtu_series(
        traj, args.out, material, rest_positions=rest, stride=args.stride or 1,
        max_frames=args.frames,
    )  # fmt: skip
    fields = "velocity, displacement, speed"
    if material is not None:
        fields += ", von_mises (Pa), energy_density (J/m^3)"
    note = "" if material is not None else "; add --scene SCENE.py for stress and energy"
    print(f"wrote {args.out} ({len(frames)} VTU frames in {frames[0].parent}/: {fields}{note})")
    return EXIT_OK
