"""How the barrier's reach dhat trades against explicit stability (the default's evidence).

Runs scenes/spheres_collide.py (two balls, 1.5 m/s each, head-on) with dhat at several
fractions of the bounding-box diagonal and the default stiffness for each, and reports the
rebound (restitution: separation speed / approach speed of the centres of mass), the
smallest gap, how often the continuous-collision limit had to act, and the largest vertex
speed (a blow-up shows as a large value). Usage: ``python benchmarks/bench_contact_dhat.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import diffsim as ds
from diffsim.apps.scene import load_scene

SCENE = Path(__file__).resolve().parents[1] / "scenes" / "spheres_collide.py"
FRACTIONS = (1e-3, 2e-3, 5e-3, 1e-2)
STEPS = 150


def main() -> None:
    torch.set_num_threads(1)
    scene = load_scene(SCENE)
    base = scene.build()
    diag = float(np.linalg.norm(np.ptp(base.mesh.vertices, axis=0)))
    h = base.model.substep_dt
    print(f"spheres_collide: approach 3 m/s, substep h = {h * 1e3:.3g} ms, diagonal {diag:.3g} m")
    print(
        f"{'dhat/diag':>9s} {'dhat mm':>8s} {'0.4dhat/h':>10s} {'restitution':>11s} "
        f"{'min gap mm':>10s} {'limited':>8s} {'max |v|':>8s}"
    )
    body = torch.as_tensor(base.mesh.body_ids)
    for fraction in FRACTIONS:
        sim = ds.Simulator(
            base.mesh, base.material, dt=base.model.dt, substeps=base.model.substeps,
            gravity=(0.0, 0.0, 0.0), ground=None, contact=True, contact_dhat=fraction * diag,
        )  # fmt: skip
        contact = sim.model.contact
        with torch.no_grad():
            traj = sim.rollout(STEPS, scene.initial_state(sim))
        v = traj.velocities
        rel = [float(v[i, body == 1, 0].mean() - v[i, body == 0, 0].mean()) for i in (0, -1)]
        gap = min(contact.min_distance(traj.positions[i]) for i in range(0, STEPS + 1, 2))
        limited = contact.timings["limited_vertex_steps"]
        print(
            f"{fraction:9.0e} {1e3 * contact.dhat:8.2f} {0.4 * contact.dhat / h:9.1f}  "
            f"{-rel[1] / rel[0]:11.2f} {1e3 * gap:10.3f} {int(limited):8d} "
            f"{float(v[-1].norm(dim=1).max()):8.2f}"
        )


if __name__ == "__main__":
    main()
