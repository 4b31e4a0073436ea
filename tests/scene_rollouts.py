"""Rollouts of the scenes in scenes/, shared by the tests that check them.

test_contact_scenes, test_inversion and test_scenes each roll scenes out from their
``initial_state`` without gradients and check the frames. Each scene now runs once per test
session, for the most steps any of those tests checks (:data:`ROLLOUT_STEPS`), and each test
checks the frames it asks for: the first k + 1 frames of a longer rollout are a k-step
rollout of the scene (bit for bit: measured on five scenes, contact and ground acting). The
simulator and the trajectory are shared: tests read them and never step them.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

from .helpers import build_scene

SCENES = Path(__file__).resolve().parents[1] / "scenes"

# Steps per scene: the most that any of the three test files checks (dt = 1 ms).
ROLLOUT_STEPS = {
    "armadillo_drop": 160,  # test_inversion (contact scenes: 100)
    "ball_at_mat": 50,  # test_inversion (contact scenes: 40)
    "bunny_drop": 150,  # test_inversion (contact scenes: 80)
    "cantilever": 1000,  # test_scenes: the whole scene
    "cube_drop": 1000,  # test_scenes: the whole scene
    "cube_stack": 150,  # test_inversion (contact scenes: 120)
    "mat_on_sphere": 500,  # test_contact_scenes: the whole scene
    "sphere_bounce": 1000,  # test_scenes: the whole scene
    "spheres_collide": 120,  # test_inversion (contact scenes: 70)
    "stack_knockover": 100,  # test_contact_scenes (inversion: 50)
    "torus_chain": 150,  # test_contact_scenes (inversion: 60)
}


@cache
def _rollout(name: str):
    from diffsim.apps.scene import load_scene

    scene = load_scene(SCENES / f"{name}.py")
    sim = build_scene(scene)  # skips where the scene's assets are absent
    with torch.no_grad():
        traj = sim.rollout(ROLLOUT_STEPS[name], scene.initial_state(sim))
    return scene, sim, traj


def scene_rollout(name: str, steps: int | None = None):
    """``(scene, simulator, trajectory)`` of scenes/<name>.py rolled out from its initial
    state for ``ROLLOUT_STEPS[name]`` steps, once per session; ``steps`` (default: the
    scene's STEPS) is what the caller checks, which that rollout must cover. The simulator's
    ``inversions`` is the record of the whole shared rollout."""
    if name not in ROLLOUT_STEPS:
        raise KeyError(f"{name}: add the scene to ROLLOUT_STEPS in {__file__}")
    scene, sim, traj = _rollout(name)
    steps = scene.steps if steps is None else steps
    if steps > ROLLOUT_STEPS[name]:
        raise ValueError(
            f"{name}: a test checks {steps} steps, the shared rollout has "
            f"{ROLLOUT_STEPS[name]}: raise ROLLOUT_STEPS[{name!r}] in {__file__}"
        )
    return scene, sim, traj


def scene_frames(name: str, steps: int | None = None):
    """``(scene, simulator, positions, velocities)``: the first ``steps`` + 1 frames
    (default: the scene's STEPS) of the shared rollout of scenes/<name>.py."""
    scene, sim, traj = scene_rollout(name, steps)
    steps = scene.steps if steps is None else steps
    return scene, sim, traj.positions[: steps + 1], traj.velocities[: steps + 1]
