"""Initialising Warp once, quietly, and telling the user when kernels compile.

- :func:`quiet_warp` silences Warp's start-up banner and module-load lines.
- :func:`init_warp` initialises Warp without the C library's "Could not find or load the
  NVIDIA CUDA driver" warning on machines without a CUDA driver (``diffsim info`` reports
  whether CUDA is available), and installs a hook that prints one line on stderr before
  the first compile of diffsim's kernels (:data:`COMPILE_NOTICE`); later runs load the
  compiled kernels from Warp's kernel cache and print nothing.

Pure Warp and the standard library: the kernels' layer, so that every layer that launches
Warp kernels (contact, backends) can initialise Warp from here.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import tempfile

COMPILE_NOTICE = "diffsim: compiling Warp kernels (first run only, ~20 s)"
# The line Warp's native library prints on stderr when libcuda cannot be loaded.
CUDA_DRIVER_WARNING = "Could not find or load the NVIDIA CUDA driver"
# Warp modules whose first compile is announced (diffsim's kernel modules).
MODULE_PREFIX = "diffsim"

_initialised = False
_announced = False


def quiet_warp() -> None:
    """Silences Warp's informational output without initialising it."""
    import warp as wp

    wp.config.quiet = True  # Warp < 1.10
    if hasattr(wp, "LOG_ERROR"):
        wp.config.log_level = wp.LOG_ERROR


def init_warp() -> None:
    """Silences Warp's informational output and initialises it (idempotent).

    Where no CUDA driver can be loaded, Warp's native warning about it is dropped; any
    other output of the initialisation is passed on.
    """
    global _initialised
    if _initialised:
        return
    import warp as wp

    quiet_warp()
    if cuda_driver_present():
        wp.init()
    else:
        _without_cuda_warning(wp.init)
    install_compile_notice()
    _initialised = True


@functools.cache
def cuda_driver_present() -> bool:
    """True if the NVIDIA driver library (``libcuda``) loads here (what Warp needs for GPUs)."""
    if sys.platform == "darwin":
        return False
    names = ("nvcuda.dll",) if os.name == "nt" else ("libcuda.so", "libcuda.so.1")
    for name in names:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def _without_cuda_warning(fn) -> None:
    """Calls ``fn()`` with file descriptor 2 captured, then re-prints all but the CUDA warning.

    The warning comes from C (``fprintf(stderr, ...)``), so redirecting ``sys.stderr`` is
    not enough: the descriptor itself is swapped for a temporary file during the call.
    """
    fd = 2  # C's stderr, whatever Python's sys.stderr is now (pytest, IDEs replace it)
    try:
        sys.stderr.flush()
        saved = os.dup(fd)
    except (OSError, ValueError):
        fn()
        return
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), fd)
        try:
            fn()
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, fd)
            os.close(saved)
        capture.seek(0)
        text = capture.read().decode("utf-8", errors="replace")
    rest = [line for line in text.splitlines() if CUDA_DRIVER_WARNING not in line]
    if rest:
        print("\n".join(rest), file=sys.stderr)


def install_compile_notice() -> bool:
    """Makes Warp print :data:`COMPILE_NOTICE` once, before it first compiles a diffsim module.

    Warp decides in ``Module._compile`` whether a module's binary is in the kernel cache;
    the hook looks for the same file first. Returns False (and changes nothing) where this
    Warp has no such method.
    """
    try:
        from warp._src.context import Module
    except ImportError:  # pragma: no cover - other Warp layouts
        try:
            from warp.context import Module
        except ImportError:
            return False
    compile_fn = getattr(Module, "_compile", None)
    if compile_fn is None:
        return False
    if getattr(compile_fn, "_diffsim_notice", False):
        return True

    @functools.wraps(compile_fn)
    def _compile(self, device=None, output_dir=None, output_name=None, *args, **kwargs):
        if not _announced and str(getattr(self, "name", "")).startswith(MODULE_PREFIX):
            if output_dir is None or output_name is None or not cache_has(output_dir, output_name):
                announce_compile()
        return compile_fn(self, device, output_dir, output_name, *args, **kwargs)

    _compile._diffsim_notice = True  # type: ignore[attr-defined]
    Module._compile = _compile
    return True


def cache_has(output_dir: str | os.PathLike, output_name: str) -> bool:
    """True if Warp's kernel cache folder ``output_dir`` holds the binary ``output_name``."""
    return os.path.exists(os.path.join(os.fspath(output_dir), output_name))


def announce_compile() -> None:
    """Prints :data:`COMPILE_NOTICE` on stderr, once per process."""
    global _announced
    if _announced:
        return
    _announced = True
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None and hasattr(tqdm, "tqdm"):  # above a running progress bar
        tqdm.tqdm.write(COMPILE_NOTICE, file=sys.stderr)
    else:
        print(COMPILE_NOTICE, file=sys.stderr, flush=True)
