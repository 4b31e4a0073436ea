"""A stack of four soft cubes knocked over by a thrown cube.

Four 8 cm rubber cubes stand in a column on the ground (5 mm apart at the start, so they
settle onto each other in the first few hundredths of a second); a fifth cube is thrown
at SPEED (5 m/s, slightly upwards) at the top half of the column. It hits the third
cube, the column shears apart, and the cubes tumble and slide across the ground.
Cube-cube contact is the surface barrier with friction, the ground is the ground barrier
with friction. Run it: ``diffsim run scenes/stack_knockover.py --out knockover.mp4``.
"""

import torch

import diffsim as ds

STEPS = 600  # 0.6 s at dt = 1 ms
FPS = 30
CAMERA = {"position": (0.2, 0.35, 0.95), "target": (0.1, 0.15, 0.0)}
SIZE, GAP, LEVELS = 0.08, 0.005, 4  # m, m, cubes in the column
SPEED = 5.0  # m/s, the thrown cube's launch speed
DIRECTION = (1.0, 0.15, 0.0)  # along +x, slightly up against gravity on the way


def build() -> ds.Simulator:
    column = [
        ds.TetMesh.box(
            size=(SIZE, SIZE, SIZE),
            resolution=3,
            origin=(-SIZE / 2, GAP + i * (SIZE + GAP), -SIZE / 2),
        )
        for i in range(LEVELS)
    ]
    thrown = ds.TetMesh.box(
        size=(SIZE, SIZE, SIZE), resolution=3, origin=(-0.45, 2.2 * SIZE, -SIZE / 2 + 0.01)
    )
    material = ds.StableNeoHookean(youngs_modulus=2e5, poissons_ratio=0.4, density=600.0)
    return ds.Simulator(
        ds.TetMesh.merge([*column, thrown]),
        material,
        dt=1e-3,
        substeps="auto",
        contact_speed=SPEED,  # m/s: short enough substeps for the barrier to stop the throw
        ground=0.0,
        damping=1.0,
        friction=0.5,
        contact_friction=0.5,
    )


def initial_state(sim: ds.Simulator) -> ds.State:
    direction = torch.tensor(DIRECTION, dtype=sim.dtype)
    v = torch.zeros((sim.mesh.n_vertices, 3), dtype=sim.dtype, device=sim.device)
    thrown = torch.as_tensor(sim.mesh.body_ids == LEVELS, device=sim.device)
    v[thrown] = SPEED * direction / direction.norm()
    return sim.initial_state(velocities=v)
