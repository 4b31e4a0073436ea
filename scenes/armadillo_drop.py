"""The Armadillo, tilted, dropped on the ground: the large real mesh at a practical step.

../shared/assets/Armadillo13K.msh (54,985 tets) is centred, scaled to 0.3 m tall, tilted
20 degrees about z and lifted so its lowest vertex is 3 cm above the ground at y = 0; it
lands on one side and topples. Stable Neo-Hookean rubber (E = 1e5 Pa, nu = 0.4,
1000 kg/m^3). Its stable substep is about 1.2e-5 s (83 substeps per 1 ms frame); mass
scaling to 5e-5 s adds 0.1% of its mass and runs it at 20 substeps per frame
(docs/time-steps.md). Toppled, it rests on a crease of its surface, whose few contact
points carry much of its weight: the soft surface tets there would be crushed through
(inverted) without the volume limit, which keeps every tet at J >= 0.1 and cuts the steps
that would go below (docs/time-steps.md, "The volume limit").
Run it: ``diffsim run scenes/armadillo_drop.py --out armadillo.mp4``.

The mesh is not part of diffsim: it is read from ../shared/assets beside the checkout, or
from the folder that DIFFSIM_ASSETS names.
"""

import math

import numpy as np

import diffsim as ds
from diffsim.apps.scene import shared_asset

STEPS = 800  # 0.8 s at dt = 1 ms
FPS = 30
CAMERA = {"position": (0.2, 0.3, 0.9), "target": (0.0, 0.12, 0.0)}
MESH = "Armadillo13K.msh"
TILT = math.radians(20.0)


def build(damping: float = 1.0, mass_scaling: float | None = 5e-5) -> ds.Simulator:
    """The simulator; ``--set mass_scaling=None`` runs without mass scaling (83 substeps
    per frame)."""
    c, s = math.cos(TILT), math.sin(TILT)
    tilt = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    mesh = ds.TetMesh.load(shared_asset(MESH, __file__)).centered().scaled_to(0.3)
    mesh = mesh.transformed(rotation=tilt).placed_on(0.0, gap=0.03)
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
        min_volume_ratio=0.1,
    )
