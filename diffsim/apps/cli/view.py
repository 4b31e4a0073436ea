"""``diffsim view``: the interactive viewer on a scene or trajectory."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from diffsim.apps.cli.arguments import EXIT_FAILURE, EXIT_OK, UsageError, _error, _load
from diffsim.apps.cli.render import _load_trajectory


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
    from diffsim.apps.viewer import ViewerController, run_viewer

    if path.suffix.lower() == ".py":
        scene, sim = _load(args.path, args)
        controller = ViewerController.for_scene(scene, sim)
    else:
        traj, scene, sim = _load_trajectory(args)
        controller = ViewerController.for_trajectory(traj, sim)
    run_viewer(controller, camera=scene.camera if scene is not None else None)
    return EXIT_OK
