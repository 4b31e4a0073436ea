"""Warp vs torch backend, side by side: speed, forward+backward time, peak memory, start-up.

The reference scene of DESIGN.md: a mesh from ../shared/assets centred, scaled to 0.3 m
tall and lifted 2 cm above the ground at y = 0; Stable Neo-Hookean E = 1e5 Pa, nu = 0.4,
density 1000 kg/m^3; gravity -9.81 m/s^2; one substep per step; float32; one torch thread.
One change: dt. At the reference dt = 1e-3 s these meshes blow up within a few steps on
both backends (their sliver tets need dt of about 1e-5 s for explicit stability), so the
default here is dt = 1e-5 s; the work per substep does not depend on dt.

Every measurement runs in a fresh subprocess, so peak memory (VmHWM, reset after warm-up
via /proc/self/clear_refs) is that configuration's alone, reported above the baseline
after imports, mesh load and warm-up.

    .venv/bin/python benchmarks/bench_backends.py            # full table
    .venv/bin/python benchmarks/bench_backends.py --quick    # bunny only, fewer steps
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # start-up timings count from here (after the interpreter)

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
MESHES = {"bunny": "bunny.msh", "armadillo": "Armadillo13K.msh"}


# ----------------------------------------------------------------------------- worker side
def _memory_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not permitted: peak then includes the warm-up
        pass


def _build(spec: dict, youngs_modulus=1e5):
    import diffsim as ds

    mesh = ds.TetMesh.load(ASSETS / MESHES[spec["mesh"]])
    mesh = mesh.centered().scaled_to(0.3).placed_on(0.0, gap=0.02)
    material = ds.StableNeoHookean(
        youngs_modulus=youngs_modulus, poissons_ratio=0.4, density=1000.0
    )
    return mesh, ds.Simulator(mesh, material, dt=spec["dt"], backend=spec["backend"])


def _worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    task = spec["task"]
    if task == "start":  # import torch + diffsim, load the mesh, build, one step
        _, sim = _build(spec)
        with torch.no_grad():
            sim.step(sim.initial_state())
        return {"seconds": time.perf_counter() - _T0}
    if task == "torch_import":
        return {"seconds": time.perf_counter() - _T0}
    youngs = torch.tensor(1e5, requires_grad=True)
    mesh, sim = _build(spec, youngs_modulus=youngs if task == "grad" else 1e5)
    steps = spec["steps"]
    with torch.no_grad():
        sim.rollout(3)  # warm-up: kernels loaded, buffers allocated
    if task == "grad":  # and the backward kernels (start-up is measured separately)
        sim.rollout(3, checkpoint_every=spec["checkpoint"]).positions[-1].sum().backward()
        youngs.grad = None
    if task == "forward":
        best, best_cpu = float("inf"), float("inf")
        for _ in range(spec["repeats"]):
            with torch.no_grad():
                t0, c0 = time.perf_counter(), time.process_time()
                sim.rollout(steps)
                best = min(best, time.perf_counter() - t0)
                best_cpu = min(best_cpu, time.process_time() - c0)
        return {
            "tet_substeps_per_s": mesh.n_tets * steps / best,
            "per_cpu_s": mesh.n_tets * steps / best_cpu,
            "seconds": best,
        }
    # forward + backward: loss = mean height of the last frame, gradient wrt E
    baseline = _memory_kib("VmRSS")
    _reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    traj = sim.rollout(steps, checkpoint_every=spec["checkpoint"])
    loss = traj.positions[-1, :, 1].mean()
    loss.backward()
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0
    peak = _memory_kib("VmHWM")
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_mb": max(peak - baseline, 0) / 1024,
        "grad": float(youngs.grad),
    }


# ----------------------------------------------------------------------------- driver side
def _run(spec: dict, env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(extra)
    return env


@functools.cache
def _default_threads() -> int:
    """The Warp backend's default thread count on this machine."""
    env = {k: v for k, v in os.environ.items() if k != "DIFFSIM_WARP_THREADS"}
    code = "from diffsim.backends.warp.backend import cpu_threads; print(cpu_threads())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    return int(out.stdout.strip() or 1)


def _fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="bunny only, fewer repeats")
    parser.add_argument("--dt", type=float, default=1e-5, help="time step in s (see above)")
    parser.add_argument("--steps", type=int, default=100, help="steps per measurement")
    parser.add_argument("--checkpoint", type=int, default=10, help="checkpoint segment K")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return
    if not ASSETS.is_dir():
        sys.exit(f"{ASSETS} not found: the benchmark meshes live in ../shared/assets")
    meshes = ["bunny"] if args.quick else ["bunny", "armadillo"]
    base = {"dt": args.dt, "steps": args.steps}
    repeats = 2 if args.quick else 3
    rows = []
    for mesh in meshes:
        r = {"mesh": mesh}
        fwd = {}
        for label, backend, threads in [
            ("torch", "torch", "1"),
            ("warp1", "warp", "1"),
            ("warpN", "warp", str(_default_threads())),
        ]:
            spec = {**base, "mesh": mesh, "backend": backend, "task": "forward"}
            spec["repeats"] = repeats
            fwd[label] = _run(spec, _env(DIFFSIM_WARP_THREADS=threads))
        r["fwd"] = fwd
        grads = {}
        for backend in ("torch", "warp"):
            for ck in (None, args.checkpoint):
                spec = {**base, "mesh": mesh, "backend": backend, "task": "grad", "checkpoint": ck}
                grads[(backend, ck)] = _run(spec, _env())
        r["grad"] = grads
        rows.append(r)
    long_run = None
    if not args.quick:
        spec = {**base, "steps": 1000, "mesh": "bunny", "backend": "warp", "task": "grad"}
        long_run = _run({**spec, "checkpoint": 50}, _env())
    with tempfile.TemporaryDirectory() as cache:
        spec = {**base, "mesh": "bunny", "backend": "warp", "task": "start"}
        t0 = time.perf_counter()
        cold_inner = _run(spec, _env(WARP_CACHE_PATH=cache))
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm_inner = _run(spec, _env(WARP_CACHE_PATH=cache))
        warm = time.perf_counter() - t0
        torch_only = _run({**spec, "task": "torch_import"}, _env())
    _print(rows, args, long_run, (cold, cold_inner), (warm, warm_inner), torch_only)


def _print(rows, args, long_run, cold, warm, torch_only) -> None:
    import torch

    print(
        f"# diffsim backends: reference scene, float32, dt={args.dt:g} s, {args.steps} steps, "
        f"torch {torch.__version__} (1 thread), {os.cpu_count()} CPU cores, "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )
    print()
    print(
        "Forward, M tet-substeps/s: wall clock (per CPU-second of the process in brackets, "
        "which load from other jobs does not inflate)"
    )
    print()
    print(
        f"| mesh | tets | torch | warp 1 thread | warp {_default_threads()} threads "
        f"(the default) | warp/torch (wall) |"
    )
    print("|---|---|---|---|---|---|")
    tets = {"bunny": 19379, "armadillo": 54985}
    for r in rows:
        f = {k: v.get("tet_substeps_per_s") for k, v in r["fwd"].items()}
        c = {k: v.get("per_cpu_s") for k, v in r["fwd"].items()}
        best = max((v for k, v in f.items() if k != "torch" and v), default=None)
        ratio = best / f["torch"] if best and f["torch"] else None

        cells = {
            key: "n/a" if not f[key] else f"{f[key] / 1e6:.2f} ({c[key] / 1e6:.2f})" for key in f
        }
        print(
            f"| {r['mesh']} | {tets[r['mesh']]} | {cells['torch']} | {cells['warp1']} | "
            f"{cells['warpN']} | {_fmt(ratio, '.1f', 'x')} |"
        )
    print()
    print(
        f"Forward+backward, {args.steps} substeps, loss = mean height of the last frame, "
        f"d/dE; peak = peak RSS above the baseline (MB); checkpoint K = {args.checkpoint}"
    )
    print()
    print(
        "| mesh | checkpoint | torch s (CPU s) | torch peak MB | warp s (CPU s) | warp peak MB "
        "| time ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        for ck in (None, args.checkpoint):
            t = r["grad"][("torch", ck)]
            w = r["grad"][("warp", ck)]
            ratio = (
                t.get("seconds") / w["seconds"] if t.get("seconds") and w.get("seconds") else None
            )
            print(
                f"| {r['mesh']} | {ck or 'no'} | {_fmt(t.get('seconds'))} "
                f"({_fmt(t.get('cpu_seconds'))}) | {_fmt(t.get('peak_mb'), '.0f')} | "
                f"{_fmt(w.get('seconds'))} ({_fmt(w.get('cpu_seconds'))}) | "
                f"{_fmt(w.get('peak_mb'), '.0f')} | {_fmt(ratio, '.1f', 'x')} |"
            )
        errors = [v["error"] for v in [*r["fwd"].values(), *r["grad"].values()] if "error" in v]
        for e in errors:
            print(f"  error ({r['mesh']}): {e}")
    print()
    if long_run is not None:
        print(
            f"1000-substep bunny rollout gradient on warp, checkpoint K = 50: "
            f"{_fmt(long_run.get('seconds'))} s, peak {_fmt(long_run.get('peak_mb'), '.0f')} MB "
            f"above baseline {long_run.get('error', '')}"
        )
    print(
        f"Start-up (import torch and diffsim, load bunny, build, first step; own process, "
        f"timed from the script's first line): cold (empty kernel cache) "
        f"{_fmt(cold[1].get('seconds'), '.1f')} s, warm {_fmt(warm[1].get('seconds'), '.1f')} s "
        f"(of which `import torch` alone: {_fmt(torch_only.get('seconds'), '.1f')} s); "
        f"whole process incl. interpreter: {cold[0]:.1f} s / {warm[0]:.1f} s"
    )


if __name__ == "__main__":
    main()
