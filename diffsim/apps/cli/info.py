"""``diffsim info``: versions, devices, threads and the rendering backend."""

from __future__ import annotations

import argparse
import os
import sys

from diffsim.apps.cli.arguments import EXIT_OK


def _version_line() -> str:
    from importlib import metadata

    try:
        version = metadata.version("diffsim")
    except metadata.PackageNotFoundError:  # run from a source tree without installing
        from diffsim import __version__ as version
    return f"diffsim {version}"


def cmd_info(args: argparse.Namespace) -> int:
    """``diffsim info``: versions, devices, backends and whether EGL rendering works."""
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
