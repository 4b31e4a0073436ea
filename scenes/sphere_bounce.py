"""A soft ball thrown sideways: it falls, bounces on the ground and rolls on with friction."""

import diffsim as ds

STEPS = 1000  # 1 s at dt = 1 ms
FPS = 30
CAMERA = {"position": (0.45, 0.45, 1.4), "target": (0.45, 0.15, 0.0)}


def build() -> ds.Simulator:
    mesh = ds.TetMesh.sphere(radius=0.1, resolution=5, center=(0.0, 0.4, 0.0))
    material = ds.StableNeoHookean(youngs_modulus=2e4, poissons_ratio=0.3, density=500.0)
    return ds.Simulator(mesh, material, dt=1e-3, substeps=2, ground=0.0, friction=0.3)


def initial_state(sim: ds.Simulator) -> ds.State:
    return sim.initial_state(velocities=(1.0, 0.0, 0.0))
