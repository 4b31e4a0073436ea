"""A soft cube dropped onto the ground: it falls 20 cm, squashes, bounces and settles.

Run it: ``diffsim run scenes/cube_drop.py --out cube.mp4``.
"""

import diffsim as ds

STEPS = 1000  # 1 s at dt = 1 ms
FPS = 30
CAMERA = {"position": (0.55, 0.5, 0.95), "target": (0.0, 0.18, 0.0)}


def build() -> ds.Simulator:
    mesh = ds.TetMesh.box(size=(0.2, 0.2, 0.2), resolution=5, origin=(-0.1, 0.2, -0.1))
    material = ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.4, density=1000.0)
    return ds.Simulator(
        mesh, material, dt=1e-3, substeps="auto", ground=0.0, damping=1.0, friction=0.5
    )
