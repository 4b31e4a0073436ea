"""``diffsim info``: versions, devices, threads and the rendering backend; ``diffsim info
MESH``: the mesh's quality and stable time step for a material."""

from __future__ import annotations

import argparse
import os
import sys

from diffsim.apps.cli.arguments import (
    EXIT_OK,
    UsageError,
    _number,
    _positive_float,
    _require_file,
)

# The material and steps ``diffsim info MESH`` assumes unless told (those of mesh scenes).
MESH_DEFAULTS = {
    "youngs_modulus": 1e5,
    "poissons_ratio": 0.4,
    "density": 1000.0,
    "dt": 1e-3,
    "mass_scaling": 1e-4,
    "scale": 1.0,
}
# Mesh files ``diffsim info`` reads (tet meshes, and surfaces it tetrahedralizes).
INFO_MESH_SUFFIXES = (
    ".msh", ".npz", ".vtu", ".vtk", ".mesh", ".node", ".ele", ".stl", ".obj", ".ply", ".off",
)  # fmt: skip


def configure(parser: argparse.ArgumentParser) -> None:
    """The ``info`` subcommand's arguments."""
    parser.add_argument(
        "mesh",
        nargs="?",
        help="a mesh file: print its quality and stable time step instead "
        f"({', '.join(INFO_MESH_SUFFIXES)})",
    )
    options = (
        ("youngs_modulus", "E", _positive_float, "Young's modulus (Pa)"),
        ("poissons_ratio", "NU", _number, "Poisson's ratio"),
        ("density", "RHO", _positive_float, "density (kg/m^3)"),
        ("dt", "DT", _positive_float, "the step (frame, s) to count substeps for"),
        ("mass_scaling", "H", _positive_float, "the target substep (s) whose cost is shown"),
        ("scale", "S", _positive_float, "factor on the file's coordinates (metres)"),
    )
    for name, metavar, kind, text in options:
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            metavar=metavar,
            help=f"for MESH: {text}; default {MESH_DEFAULTS[name]:g}",
        )
    parser.set_defaults(func=cmd_info)


def _version_line() -> str:
    from importlib import metadata

    try:
        version = metadata.version("diffsim")
    except metadata.PackageNotFoundError:  # run from a source tree without installing
        from diffsim import __version__ as version
    return f"diffsim {version}"


def cmd_info(args: argparse.Namespace) -> int:
    """``diffsim info``: versions, devices, backends and whether EGL rendering works;
    ``diffsim info MESH``: :func:`mesh_info`."""
    if getattr(args, "mesh", None) is not None:
        return mesh_info(args)
    given = [k for k in MESH_DEFAULTS if getattr(args, k, None) is not None]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise UsageError(f"{flags} apply to a mesh: diffsim info MESH {flags} ...")
    import platform
    from importlib import metadata

    print(f"python         {platform.python_version()} ({sys.executable})")
    packages = ("diffsim", "torch", "warp-lang", "polyscope", "imageio", "imageio-ffmpeg", "tqdm")
    for package in packages:
        try:
            version = metadata.version(package)
        except metadata.PackageNotFoundError:
            version = "not installed"
        print(f"{package:<14} {version}")
    import torch

    from diffsim.backends import BACKENDS

    print(f"devices        cpu ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"               cuda:{i} ({torch.cuda.get_device_name(i)})")
    elif torch.version.cuda is None:
        print("               no CUDA device (this torch is a CPU-only build)")
    else:
        print(f"               no CUDA device (torch built for CUDA {torch.version.cuda})")
    print(f"backends       {', '.join(sorted(BACKENDS))}")
    if "warp" in BACKENDS:
        from diffsim.backends.warp.backend import cpu_threads
        from diffsim.kernels.runtime import cuda_driver_present

        print(f"warp threads   {cpu_threads()} on the CPU (DIFFSIM_WARP_THREADS to change)")
        if cuda_driver_present():
            print("warp cuda      NVIDIA driver found (Warp can run on the GPU)")
        else:
            print("warp cuda      no NVIDIA driver: Warp runs on the CPU only")
    ok, detail = probe_rendering()
    print(f"rendering      {'openGL3_egl works' if ok else 'unavailable'} ({detail})")
    return EXIT_OK


def probe_rendering(timeout: float = 60.0) -> tuple[bool, str]:
    """Tries polyscope's EGL backend in a child process; ``(works, detail)``."""
    import subprocess

    # Polyscope alone (not diffsim, which would import torch): the same calls as init_headless.
    code = (
        "import polyscope as ps\n"
        "ps.set_verbosity(0)\n"
        "ps.set_use_prefs_file(False)\n"
        "ps.set_allow_headless_backends(True)\n"
        "ps.init('openGL3_egl')\n"
        "print(ps.get_render_engine_backend_name())\n"
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return False, f"EGL start-up did not finish in {timeout:.0f} s"
    if result.returncode == 0:
        lines = result.stdout.strip().splitlines()
        return True, f"polyscope backend {lines[-1] if lines else '?'}, headless"
    lines = (result.stderr or result.stdout).strip().splitlines()
    return False, lines[-1] if lines else f"exit status {result.returncode}"


def mesh_info(args: argparse.Namespace) -> int:
    """``diffsim info MESH``: the mesh's size and quality (:meth:`TetMesh.quality`), its
    estimated stable substep for the material (:func:`diffsim.physics.stable_step.stable_step`),
    the substeps a step of ``--dt`` needs, and what mass scaling to ``--mass-scaling`` costs."""
    import numpy as np

    from diffsim.mesh import TetMesh
    from diffsim.physics.stable_step import dilatational_wave_speed, mass_scaling, stable_step

    values = {k: v if getattr(args, k, None) is None else getattr(args, k)
              for k, v in MESH_DEFAULTS.items()}  # fmt: skip
    E, nu, rho = values["youngs_modulus"], values["poissons_ratio"], values["density"]
    if not -1.0 < nu < 0.5:
        raise UsageError(f"--poissons-ratio must be in (-1, 0.5), got {nu:g}")
    path = _require_file(
        args.mesh, INFO_MESH_SUFFIXES, f"a mesh file ({', '.join(INFO_MESH_SUFFIXES)})"
    )
    mesh = TetMesh.load(path)
    if values["scale"] != 1.0:
        mesh = mesh.transformed(scale=values["scale"])
    size = " x ".join(f"{e:.3g}" for e in np.ptp(mesh.vertices, axis=0))
    bodies = f"{mesh.n_bodies} bod{'y' if mesh.n_bodies == 1 else 'ies'}"
    print(f"mesh           {path.name}: {mesh.n_vertices} vertices, {mesh.n_tets} tets, {bodies}, "
          f"{size} m (x scale {values['scale']:g})")  # fmt: skip
    print(mesh.quality())
    c = dilatational_wave_speed(E, nu, rho)
    print(f"material       E = {E:g} Pa, nu = {nu:g}, rho = {rho:g} kg/m^3: dilatational wave "
          f"speed {c:.3g} m/s")  # fmt: skip
    est = stable_step(mesh.vertices, mesh.tets, E, nu, rho)
    tets = ", ".join(str(int(i)) for i in est.limiting_tets)
    dt = values["dt"]
    print(f"stable substep {est.dt:.3g} s (per vertex; per tet {est.tet_dt:.3g} s), set by tets "
          f"[{tets}]")  # fmt: skip
    n = est.substeps(dt)
    print(f"at dt = {dt:g} s  {n} substep{'s' if n > 1 else ''} of {dt / n:.3g} s "
          f'(substeps="auto")')  # fmt: skip
    target = values["mass_scaling"]
    scaling = mass_scaling(mesh.vertices, mesh.tets, E, nu, rho, target_dt=target)
    scaled = stable_step(mesh.vertices, mesh.tets, E, nu, rho, added_mass=scaling.added_mass)
    m = scaled.substeps(dt)
    print(f"mass scaling   {scaling.describe().removeprefix('mass scaling ')}")
    print(
        f"               then a stable substep of {scaled.dt:.3g} s: {m} substep"
        f"{'s' if m > 1 else ''} at dt = {dt:g} s (Simulator(..., mass_scaling={target:g}))"
    )
    return EXIT_OK
