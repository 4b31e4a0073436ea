"""Two soft balls thrown head-on at each other: they meet, squash, and bounce apart.

Surface contact (IPC barrier with a continuous-collision step limit) keeps them apart. The
scene names the speed at which they meet (``contact_speed``), so the automatic substep is
short enough for the barrier alone to stop them: no step is cut, and they bounce apart with
their energy.
Run it: ``diffsim run scenes/spheres_collide.py --out spheres.mp4``.
"""

import torch

import diffsim as ds

STEPS = 300  # 0.3 s at dt = 1 ms
FPS = 30
CAMERA = {"position": (0.0, 0.35, 0.9), "target": (0.0, 0.2, 0.0)}
SPEED = 1.5  # m/s, each ball, towards the other


def build() -> ds.Simulator:
    left = ds.TetMesh.sphere(radius=0.1, resolution=6, center=(-0.13, 0.2, 0.0))
    right = ds.TetMesh.sphere(radius=0.1, resolution=6, center=(0.13, 0.2, 0.0))
    mesh = ds.TetMesh.merge([left, right])
    material = ds.StableNeoHookean(youngs_modulus=2e4, poissons_ratio=0.4, density=1000.0)
    return ds.Simulator(
        mesh,
        material,
        dt=1e-3,
        substeps="auto",
        # m/s: they close at twice each ball's speed, and after the impact their ringing
        # surfaces meet again at up to 5 m/s (at 2 x SPEED, 12 substeps, some runs cut 4
        # vertex-steps there)
        contact_speed=2.5 * SPEED,
        gravity=(0.0, 0.0, 0.0),
        ground=None,
    )


def initial_state(sim: ds.Simulator) -> ds.State:
    body = torch.as_tensor(sim.mesh.body_ids, device=sim.device)
    v = torch.zeros((sim.mesh.n_vertices, 3), dtype=sim.dtype, device=sim.device)
    v[:, 0] = torch.where(body == 0, SPEED, -SPEED)
    return sim.initial_state(velocities=v)
