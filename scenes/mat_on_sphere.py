"""A thin soft mat dropped onto a fixed ball: it drapes over it and folds onto itself.

The ball is held still (all its vertices fixed); the mat's contact with the ball and with
itself where its skirt wrinkles into folds is the surface barrier with friction; its
corners reach the ground plane.
Run it: ``diffsim run scenes/mat_on_sphere.py --out mat.mp4``.
"""

import numpy as np

import diffsim as ds

STEPS = 500  # 0.5 s at dt = 1 ms
FPS = 30
CAMERA = {"position": (0.7, 0.6, 0.7), "target": (0.0, 0.12, 0.0)}


def build() -> ds.Simulator:
    ball = ds.TetMesh.sphere(radius=0.1, resolution=5, center=(0.0, 0.25, 0.0))
    mat = ds.TetMesh.box(
        size=(0.5, 0.008, 0.5), resolution=(14, 1, 14), origin=(-0.25, 0.365, -0.25)
    )
    mesh = ds.TetMesh.merge([ball, mat])
    material = ds.StableNeoHookean(youngs_modulus=5e3, poissons_ratio=0.3, density=300.0)
    return ds.Simulator(
        mesh,
        material,
        dt=1e-3,
        substeps=4,
        ground=0.0,
        fixed=np.flatnonzero(mesh.body_ids == 0),
        damping=1.0,
        friction=0.4,
        contact=True,
        contact_friction=0.4,
    )
