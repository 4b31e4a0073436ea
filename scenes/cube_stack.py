"""Three soft cubes dropped in a loose stack: they land on each other and settle.

Cube-on-cube contact is the surface barrier (with friction); the bottom cube rests on the
ground plane. The cubes land on each other at up to about 0.8 m/s; the scene names a speed
above that (``contact_speed``), so the automatic substep lets the barrier stop them
without a step cut. Run it: ``diffsim run scenes/cube_stack.py --out stack.mp4``.
"""

import diffsim as ds

STEPS = 400  # 0.4 s at dt = 1 ms
FPS = 30
CAMERA = {"position": (0.45, 0.35, 0.7), "target": (0.0, 0.17, 0.0)}


def build() -> ds.Simulator:
    size, gap = 0.1, 0.01
    cubes = [
        ds.TetMesh.box(
            size=(size, size, size),
            resolution=3,
            origin=(-size / 2 + 0.01 * i, 0.01 + i * (size + gap), -size / 2 - 0.008 * i),
        )
        for i in range(3)
    ]
    material = ds.StableNeoHookean(youngs_modulus=5e4, poissons_ratio=0.4, density=500.0)
    return ds.Simulator(
        ds.TetMesh.merge(cubes),
        material,
        dt=1e-3,
        substeps="auto",
        contact_speed=1.0,  # m/s
        ground=0.0,
        damping=5.0,
        friction=0.5,
        contact_friction=0.5,
    )
