"""Compiles every Warp kernel of diffsim for the CPU into Warp's kernel cache, ahead of time.

Each Warp module is compiled by one of several processes (one per core, at most 4), the
slowest first, so that no module is compiled twice at once: the test processes that start
next (pytest-xdist) would otherwise each compile the modules they need as they reach
them, the same ones at the same time. Where the cache holds them already, this only loads
them (a few seconds). The cache is ``WARP_CACHE_PATH`` (scripts/test.sh sets it), else
Warp's user cache.

Usage: ``python scripts/compile_kernels.py [--processes N]``
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

MOST_PROCESSES = 4


def compile_module(name: str) -> tuple[str, float]:
    """Builds every kernel here and compiles (or loads) module ``name`` for the CPU;
    returns its name and seconds."""
    import warp as wp

    from diffsim.kernels import build_every_kernel

    build_every_kernel()
    start = time.perf_counter()
    wp.load_module(name, device="cpu")
    return name, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parser.add_argument("--processes", type=int, default=min(cores or 1, MOST_PROCESSES))
    args = parser.parse_args()
    if args.processes < 1:
        parser.error(f"--processes must be at least 1, got {args.processes}")
    from diffsim.kernels import build_every_kernel

    modules = build_every_kernel()  # the names, the slowest to compile first
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")  # a fresh Warp in each
    with ProcessPoolExecutor(args.processes, mp_context=context) as pool:
        done = list(pool.map(compile_module, modules))
    slowest = max(done, key=lambda d: d[1])
    print(
        f"diffsim: {len(done)} kernel modules ready in {time.perf_counter() - start:.0f} s "
        f"on {args.processes} processes (slowest: {slowest[0]}, {slowest[1]:.0f} s)"
    )


if __name__ == "__main__":
    main()
