"""The reference bunny dropped on the ground: a real scanned mesh at a practical time step.

../shared/assets/bunny.msh (19,379 tets, some of them slivers) is centred, scaled to 0.3 m
tall and lifted so its lowest vertex is 2 cm above the ground at y = 0. Stable Neo-Hookean
rubber (E = 1e5 Pa, nu = 0.4, 1000 kg/m^3). Its slivers set a stable substep of about 7e-6 s
(146 substeps per 1 ms frame); mass scaling to 1e-4 s adds 0.64% of its mass around them and
runs it at 10 substeps per frame (docs/time-steps.md). Run it:
``diffsim run scenes/bunny_drop.py --out bunny.mp4``.

The mesh is not part of diffsim: it is read from ../shared/assets beside the checkout, or
from the folder that DIFFSIM_ASSETS names.
"""

import diffsim as ds
from diffsim.apps.scene import shared_asset

STEPS = 1000  # 1 s at dt = 1 ms
FPS = 30
CAMERA = {"position": (0.5, 0.3, 0.75), "target": (0.0, 0.12, 0.0)}
MESH = "bunny.msh"


def build(damping: float = 1.0, mass_scaling: float | None = 1e-4) -> ds.Simulator:
    """The simulator; ``--set mass_scaling=None`` runs without mass scaling (146 substeps
    per frame), ``--set damping=0`` without damping."""
    mesh = (
        ds.TetMesh.load(shared_asset(MESH, __file__))
        .centered()
        .scaled_to(0.3)
        .placed_on(0.0, gap=0.02)
    )
    material = ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.4, density=1000.0)
    return ds.Simulator(
        mesh,
        material,
        dt=1e-3,
        substeps="auto",
        mass_scaling=mass_scaling,
        ground=0.0,
        damping=damping,
        friction=0.5,
    )
