"""A cantilever beam clamped at x = 0, sagging under gravity and settling (damped).

The beam is 0.6 m long with a 0.1 m square cross-section; the vertices at x = 0 are fixed.
"""

import numpy as np

import diffsim as ds

STEPS = 1000  # 1 s at dt = 1 ms
FPS = 30
CAMERA = {"position": (0.75, 0.55, 0.9), "target": (0.3, 0.33, 0.0)}


def build() -> ds.Simulator:
    mesh = ds.TetMesh.beam(
        length=0.6, width=0.1, height=0.1, cells_per_width=2, origin=(0.0, 0.35, -0.05)
    )
    clamped = np.flatnonzero(np.isclose(mesh.vertices[:, 0], 0.0))
    material = ds.StableNeoHookean(youngs_modulus=1e6, poissons_ratio=0.3, density=1000.0)
    return ds.Simulator(
        mesh, material, dt=1e-3, substeps="auto", ground=None, fixed=clamped, damping=5.0
    )
