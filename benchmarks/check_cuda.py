"""CUDA check: the Warp backend on a GPU against the torch reference, then its speed.

For a session with a GPU (CI has none): one short script that says whether the CUDA path
gives the reference's numbers and how fast it runs.

1. Parity, float64, on the GPU: the Warp backend against the torch backend (same device)
   for a box dropped on the ground with friction and a fixed corner (positions), the
   gradient of a loss w.r.t. Young's modulus and the initial velocities, 4 batched worlds
   against each world alone, and two cubes colliding with surface contact; then, for the
   cubes, the same comparison with each suspect of the drift seen on a GPU taken away in
   turn (contact-free blocks, LBVH trees, Warp's own stream), and where the device leaves
   the torch backend on the CPU (rollouts, one substep from each reference state, and the
   pieces of the first substep that differs).
2. float32 (the default) free fall against g t on the GPU.
3. Speed: the reference bunny (../shared/assets/bunny.msh, float32, 1e-5 s substeps)
   forward and forward+backward per substep, Warp on the GPU against Warp on this CPU
   where Warp's CPU compiler is present, and against the torch backend on the GPU.

Usage: ``python benchmarks/check_cuda.py [--device cuda] [--steps 200]``; exits 1 if a
parity check fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

import diffsim as ds
from diffsim.sim.state import State

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
FAILED: list[str] = []


def check(name: str, error: float, limit: float) -> None:
    ok = error <= limit
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {error:.3g} (limit {limit:g})", flush=True)
    if not ok:
        FAILED.append(name)


def box_drop(backend: str, device: str, dtype=torch.float64, worlds=None) -> ds.Simulator:
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=4).placed_on(0.0, gap=0.01)
    material = ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.35, density=1000.0)
    return ds.Simulator(
        mesh, material, dt=2e-3, substeps=8, ground=0.0, friction=0.4, damping=1.0,
        fixed=[0], backend=backend, device=device, dtype=dtype, worlds=worlds, contact=False,
    )  # fmt: skip


def parity(device: str) -> None:
    steps = 60
    trajs = {}
    for backend in ("warp", "torch"):
        sim = box_drop(backend, device)
        v = torch.zeros((sim.mesh.n_vertices, 3), dtype=sim.dtype, device=device)
        v[:, 0] = 0.5
        trajs[backend] = sim.rollout(steps, sim.initial_state(velocities=v))
    landed = float(trajs["torch"].positions[:, :, 1].min())
    error = float((trajs["warp"].positions - trajs["torch"].positions).abs().max())
    check(
        f"box drop positions, warp vs torch on {device} (landed: min y {landed:.2e} m)", error, 1e-9
    )

    grads = {}
    for backend in ("warp", "torch"):
        sim = box_drop(backend, device)
        E = torch.tensor(1e5, dtype=sim.dtype, device=device, requires_grad=True)
        v0 = torch.zeros((sim.mesh.n_vertices, 3), dtype=sim.dtype, device=device)
        v0[:, 0] = 0.5
        v0.requires_grad_(True)
        traj = sim.rollout(
            30, State(sim.initial_state().positions, v0), params={"youngs_modulus": E}
        )
        (traj.positions[-1][:, 1].mean() + traj.positions[-1][:, 0].square().mean()).backward()
        grads[backend] = (E.grad.clone(), v0.grad.clone())
    for i, name in enumerate(("d/dE", "d/dv0")):
        a, b = grads["warp"][i], grads["torch"][i]
        check(f"gradient {name}, warp vs torch on {device}", float((a - b).norm() / b.norm()), 1e-9)

    W = 4
    batched = box_drop("warp", device, worlds=W)
    moduli = torch.linspace(5e4, 2e5, W, dtype=torch.float64, device=device)
    together = batched.rollout(40, params={"youngs_modulus": moduli}).positions
    alone = box_drop("warp", device)
    worst = 0.0
    for w in range(W):
        one = alone.rollout(40, params={"youngs_modulus": moduli[w]}).positions
        worst = max(worst, float((together[:, w] - one).abs().max()))
    check(f"{W} batched worlds vs each alone on {device}", worst, 1e-12)

    out = {}
    for backend in ("warp", "torch"):
        sim = two_cubes(backend, device, dt=2e-3, substeps=8)
        traj = sim.rollout(50, two_cubes_start(sim))
        out[backend] = traj
    half = sim.mesh.n_vertices // 2
    bounced = float(out["torch"].velocities[-1][:half, 0].mean())
    error = float((out["warp"].positions - out["torch"].positions).abs().max())
    check(f"two cubes with surface contact, warp vs torch on {device} (left cube now "
          f"{bounced:+.2f} m/s, was +1)", error, 1e-8)  # fmt: skip
    check("the cubes bounced (left cube's x velocity, m/s)", max(bounced, 0.0), 0.0)


def drift_suspects(device: str, steps: int = 50) -> None:
    """The two cubes of ``parity`` (8 substeps a step), Warp against torch on the device,
    with each suspect of the drift seen on a GPU taken away in turn: the contact-free blocks
    (contact asked every substep), Warp's GPU trees (SAH trees built on the host instead of
    LBVH ones), and Warp's own stream for the contact launches (torch's current stream for
    all of them). A suspect whose removal brings the error to rounding is the cause; to rule
    out every ordering of launches at once, run the script again with CUDA_LAUNCH_BLOCKING=1."""
    import contextlib

    import warp as wp

    from diffsim.backends.warp.contact_free import ContactFreeBlocks

    torch_sim = two_cubes("torch", device, dt=2e-3, substeps=8)
    reference = torch_sim.rollout(steps, two_cubes_start(torch_sim)).positions

    def sah(*args, **kwargs):
        return plain_bvh(*args, **{**kwargs, "constructor": "sah"})

    plain_bvh = wp.Bvh
    suspects = {
        "as it runs": {},
        "no contact-free blocks": {(ContactFreeBlocks, "_predicted_clear"): lambda *a: 0},
        "SAH trees": {(wp, "Bvh"): sah},
        "torch's stream": {},
    }
    print(f"\ntwo cubes, warp vs torch on {device}, {steps} steps, each suspect taken away")
    for name, patches in suspects.items():
        saved = {key: getattr(*key) for key in patches}
        try:
            for (owner, attr), value in patches.items():
                setattr(owner, attr, value)
            stream = contextlib.nullcontext()
            if name == "torch's stream" and device.startswith("cuda"):
                stream = wp.ScopedStream(wp.stream_from_torch(torch.device(device)))
            with stream:
                sim = two_cubes("warp", device, dt=2e-3, substeps=8)
                out = sim.rollout(steps, two_cubes_start(sim)).positions
            error = float((out - reference).abs().max())
            blocks = sim.backend.contact_free.counts["fused_steps"]
            print(f"  {name}: {error:.3g} m ({blocks} steps in contact-free blocks)", flush=True)
        finally:
            for (owner, attr), value in saved.items():
                setattr(owner, attr, value)


def two_cubes(backend: str, device: str, dt: float, substeps: int) -> ds.Simulator:
    """Two 5 cm cubes that meet head-on at 2 m/s with friction (float64, no gravity)."""
    a = ds.TetMesh.box(size=(0.05,) * 3, resolution=2, origin=(-0.075, 0.1, 0.0))
    b = ds.TetMesh.box(size=(0.05,) * 3, resolution=2, origin=(0.025, 0.11, 0.01))
    return ds.Simulator(
        ds.TetMesh.merge([a, b]),
        ds.StableNeoHookean(youngs_modulus=2e5, poissons_ratio=0.3, density=1000.0),
        dt=dt, substeps=substeps, gravity=(0, 0, 0), backend=backend, device=device,
        dtype=torch.float64, contact=True, contact_friction=0.3,
    )  # fmt: skip


def two_cubes_start(sim: ds.Simulator) -> State:
    v = torch.zeros((sim.mesh.n_vertices, 3), dtype=sim.dtype, device=sim.device)
    half = sim.mesh.n_vertices // 2
    v[:half, 0], v[half:, 0] = 1.0, -1.0
    return sim.initial_state(velocities=v)


def substep_parts(sim: ds.Simulator, x: torch.Tensor, v: torch.Tensor) -> dict:
    """The pieces of one substep from (x, v) on the CPU: forces, the surface contact's
    forces, friction and step scales, and the substep's result."""
    dev, c = sim.device, sim.model.contact
    xd, vd = x.to(dev), v.to(dev)
    mass, h = sim.coefficients().mass, sim.model.substep_dt
    parts = {"forces": sim.forces(xd), "contact forces": c.forces(xd, mass)}
    v_free = vd + h * parts["forces"] / mass[:, None]
    parts["friction"] = c.apply_friction(v_free, xd, mass, h)
    parts["step scales"] = c.step_scales(xd, xd + h * v_free)
    out = sim.step(State(xd, vd))
    parts["x"], parts["v"] = out.positions, out.velocities
    return {k: t.detach().cpu().double() for k, t in parts.items()}


def contact_drift(device: str, substeps: int = 400, threshold: float = 1e-12) -> None:
    """Where surface contact on ``device`` leaves the torch backend on the CPU.

    The two cubes with one substep per step (2.5e-4 s). Each backend on the device is
    rolled out and compared with the CPU reference, frame by frame (and with itself,
    repeated); then one substep is taken from every reference state, and at the first
    substep where a backend leaves the reference the substep's pieces are compared.
    """
    reference = two_cubes("torch", "cpu", dt=2.5e-4, substeps=1)
    ref = reference.rollout(substeps, two_cubes_start(reference))
    X, V = ref.positions, ref.velocities
    configs = [("torch", None), ("warp", None), ("warp", "torch")]
    print(f"\nsurface contact on {device} against torch on the CPU, {substeps} substeps")

    def config(backend: str, implementation: str | None) -> tuple[ds.Simulator, str]:
        sim = two_cubes(backend, device, dt=2.5e-4, substeps=1)
        if implementation:
            sim.model.contact.implementation = implementation
        return sim, f"{backend} (contact {sim.model.contact.implementation})"

    for backend, implementation in configs:
        runs = []
        for _ in range(2):
            sim, name = config(backend, implementation)
            runs.append(sim.rollout(substeps, two_cubes_start(sim)).positions.cpu())
        drift = (runs[0] - X).abs().amax(dim=(1, 2))
        late = torch.nonzero(drift > 1e-10).flatten()
        first = int(late[0]) if len(late) else None
        repeat = float((runs[0] - runs[1]).abs().max())
        print(f"  rollout {name}: max {float(drift.max()):.3g} m, first frame over 1e-10: "
              f"{first}, repeat {repeat:.3g}", flush=True)  # fmt: skip
    one_ref = two_cubes("torch", "cpu", dt=2.5e-4, substeps=1)
    for backend, implementation in configs:
        sim, name = config(backend, implementation)
        first = None
        for k in range(substeps):
            r = one_ref.step(State(X[k], V[k]))
            o = sim.step(State(X[k].to(device), V[k].to(device)))
            gap = max(
                float((o.positions.cpu() - r.positions).abs().max()),
                float((o.velocities.cpu() - r.velocities).abs().max()) * sim.model.substep_dt,
            )
            if gap > threshold:
                first = (k, gap)
                break
        if first is None:
            print(f"  one substep, {name}: within {threshold:g} m of the reference throughout")
            continue
        k = first[0]
        mine = substep_parts(config(backend, implementation)[0], X[k], V[k])
        theirs = substep_parts(two_cubes("torch", "cpu", dt=2.5e-4, substeps=1), X[k], V[k])
        pieces = ", ".join(
            f"{key} {float((mine[key] - theirs[key]).abs().max()):.2g} "
            f"(of {float(theirs[key].abs().max()):.2g})"
            for key in mine
        )
        print(f"  one substep, {name}: first over {threshold:g} m at substep {k} ({first[1]:.3g}); "
              f"differences there: {pieces}", flush=True)  # fmt: skip


def free_fall(device: str) -> None:
    mesh = ds.TetMesh.box(size=(0.1, 0.1, 0.1), resolution=3).placed_on(0.0, gap=10.0)
    material = ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.3, density=1000.0)
    sim = ds.Simulator(mesh, material, dt=1e-3, substeps=100, ground=0.0, device=device)
    traj = sim.rollout(500)
    v = float(traj.velocities[-1][:, 1].mean())
    check(
        f"float32 free fall on {device}: v(0.5 s) vs -g t, relative",
        abs(v / (-9.81 * 0.5) - 1),
        1e-3,  # float32 sums of 50,000 increments
    )


def bunny(backend: str, device: str, contact: bool = False) -> ds.Simulator:
    mesh = ds.TetMesh.load(ASSETS / "bunny.msh").centered().scaled_to(0.3).placed_on(0.0, gap=0.02)
    material = ds.StableNeoHookean(youngs_modulus=1e5, poissons_ratio=0.4, density=1000.0)
    return ds.Simulator(
        mesh, material, dt=1e-5, substeps=1, ground=0.0, backend=backend, device=device,
        contact=contact,
    )  # fmt: skip


def timed(sim: ds.Simulator, steps: int) -> tuple[float, float]:
    """Seconds per substep, forward (no graph) and forward+backward."""

    def sync() -> None:
        if sim.device.type == "cuda":
            torch.cuda.synchronize()

    state = sim.initial_state()
    with torch.no_grad():
        sim.rollout(5, state)
        sync()
        start = time.perf_counter()
        sim.rollout(steps, state)
        sync()
        forward = (time.perf_counter() - start) / steps
    v0 = state.velocities.clone().requires_grad_(True)
    sim.rollout(3, State(state.positions, v0)).positions[-1][:, 1].mean().backward()
    sync()
    v0 = state.velocities.clone().requires_grad_(True)
    start = time.perf_counter()
    sim.rollout(steps // 4, State(state.positions, v0)).positions[-1][:, 1].mean().backward()
    sync()
    return forward, (time.perf_counter() - start) / (steps // 4)


def speed(device: str, steps: int) -> None:
    rows = []
    configs = [("warp", device, False), ("warp", device, True), ("torch", device, False)]
    if os.environ.get("CHECK_CUDA_CPU", "1") == "1":
        configs += [("warp", "cpu", False), ("warp", "cpu", True)]
    for backend, dev, contact in configs:
        name = f"{backend} on {dev}, contact {'on' if contact else 'off'}"
        try:
            sim = bunny(backend, dev, contact)
            rows.append((name, *timed(sim, steps), sim.mesh.n_tets))
        except Exception as error:
            rows.append((name, float("nan"), float("nan"), repr(error)[:80]))
    print(f"\nbunny, float32, 1e-5 s substeps, {steps} substeps timed ({torch.__version__})")
    print("| path | forward ms/substep | M tet-substeps/s | fwd+bwd ms/substep |")
    print("|---|---|---|---|")
    for name, fwd, both, tets in rows:
        if not isinstance(tets, int):  # the error it raised
            print(f"| {name} | failed: {tets} | | |")
            continue
        print(f"| {name} | {1e3 * fwd:.3f} | {tets / fwd / 1e6:.1f} | {1e3 * both:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    if args.steps < 4:
        parser.error(
            f"--steps must be at least 4 (a quarter of them is timed backward), got {args.steps}"
        )
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            sys.exit(
                f"check_cuda: no CUDA device here (torch {torch.__version__}, "
                f"torch.cuda.is_available() is False); run it on a machine with an NVIDIA GPU "
                "and a CUDA build of torch, or pass --device cpu to run the same checks on "
                "the CPU"
            )
        print(torch.cuda.get_device_name(), flush=True)
    parity(args.device)
    drift_suspects(args.device)
    contact_drift(args.device)
    free_fall(args.device)
    speed(args.device, args.steps)
    if FAILED:
        print(f"\n{len(FAILED)} check(s) failed: {FAILED}")
        sys.exit(1)


if __name__ == "__main__":
    main()
