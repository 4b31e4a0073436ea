"""A chain of three interlocked soft rings: the top ring is held, the other two hang from it.

The rings pass through each other's holes without touching at the start; gravity pulls
them down until each hangs on the one above, held only by the surface barrier.
Run it: ``diffsim run scenes/torus_chain.py --out chain.mp4``.
"""

import numpy as np

import diffsim as ds

STEPS = 200  # 0.2 s at dt = 1 ms
FPS = 30
CAMERA = {"position": (0.6, 0.0, 0.75), "target": (0.0, -0.12, 0.0)}
MAJOR, MINOR, SPACING = 0.1, 0.025, 0.13  # m; rings interlock while SPACING < 2 (MAJOR - MINOR)


def ring(center_y: float, turned: bool) -> ds.TetMesh:
    import trimesh

    surface = trimesh.creation.torus(
        major_radius=MAJOR, minor_radius=MINOR, major_sections=32, minor_sections=12
    )
    mesh = ds.TetMesh.from_surface(surface, resolution=12)
    rotation = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]) if turned else None
    return mesh.transformed(rotation=rotation, translation=(0.0, center_y, 0.0))


def build() -> ds.Simulator:
    mesh = ds.TetMesh.merge([ring(-i * SPACING, turned=i % 2 == 1) for i in range(3)])
    material = ds.StableNeoHookean(youngs_modulus=1.5e5, poissons_ratio=0.4, density=500.0)
    return ds.Simulator(
        mesh,
        material,
        dt=1e-3,
        substeps="auto",
        ground=None,
        fixed=np.flatnonzero(mesh.body_ids == 0),
        damping=2.0,
        contact=True,
        contact_friction=0.3,
    )
