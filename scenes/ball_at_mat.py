"""A ball thrown fast at a thin mat held at its edges: the mat catches it like a trampoline.

A rubber ball (6 cm radius, E = 1 MPa) is thrown down at the mat at SPEED (10 m/s, at a
slant); the 8 mm rubber mat (E = 0.3 MPa), 0.6 m square, is clamped along its four edges
0.25 m above the ground. The mat stretches into a cone around the ball, throws it back up,
and wobbles.
Ball-mat contact is the surface barrier with friction, and the continuous-collision step
limit keeps the fast ball from passing through the thin mat at any substep
(docs/contact.md). Run it: ``diffsim run scenes/ball_at_mat.py --out ball_at_mat.mp4``.
"""

import numpy as np
import torch

import diffsim as ds

STEPS = 200  # 0.2 s at dt = 1 ms
FPS = 60
CAMERA = {"position": (0.6, 0.6, 0.75), "target": (0.0, 0.3, 0.0)}
SPEED = 10.0  # m/s, the ball's launch speed
DIRECTION = (0.25, -1.0, 0.0)  # down at the mat, slanting along +x
MAT_HEIGHT, MAT_SIZE, MAT_THICKNESS = 0.25, 0.6, 0.008  # m


def build() -> ds.Simulator:
    mat = ds.TetMesh.box(
        size=(MAT_SIZE, MAT_THICKNESS, MAT_SIZE),
        resolution=(16, 1, 16),
        origin=(-MAT_SIZE / 2, MAT_HEIGHT, -MAT_SIZE / 2),
    )
    ball = ds.TetMesh.sphere(radius=0.06, resolution=5, center=(-0.05, MAT_HEIGHT + 0.2, 0.0))
    mesh = ds.TetMesh.merge([mat, ball])
    x = mesh.vertices
    on_mat = mesh.body_ids == 0
    edge = on_mat & (
        (np.abs(np.abs(x[:, 0]) - MAT_SIZE / 2) < 1e-9)
        | (np.abs(np.abs(x[:, 2]) - MAT_SIZE / 2) < 1e-9)
    )
    # Rubber: a softer mat and a stiffer ball (per-tet fields).
    tet_body = mesh.body_ids[mesh.tets[:, 0]]
    material = ds.StableNeoHookean(
        youngs_modulus=torch.as_tensor(np.where(tet_body == 0, 3e5, 1e6)),
        poissons_ratio=0.4,
        density=torch.as_tensor(np.where(tet_body == 0, 1000.0, 1100.0)),
    )
    return ds.Simulator(
        mesh,
        material,
        dt=1e-3,
        substeps="auto",
        ground=0.0,
        fixed=np.flatnonzero(edge),
        damping=0.5,
        friction=0.5,
        contact=True,
        contact_friction=0.5,
        contact_speed=SPEED,  # the barrier, not the step limit, stops the ball
    )


def initial_state(sim: ds.Simulator) -> ds.State:
    direction = torch.tensor(DIRECTION, dtype=sim.dtype)
    v = torch.zeros((sim.mesh.n_vertices, 3), dtype=sim.dtype, device=sim.device)
    ball = torch.as_tensor(sim.mesh.body_ids == 1, device=sim.device)
    v[ball] = SPEED * direction / direction.norm()
    return sim.initial_state(velocities=v)
