"""Every Warp kernel diffsim launches compiles for a CUDA GPU, on a machine without one.

Warp's CUDA compiler (NVRTC) ships in its Linux and Windows wheels, so the CUDA code
generated from the kernels is compiled here ahead of time (``wp.compile_aot_module``, to
PTX) for the architecture of the GPUs diffsim is checked on (sm_90, an H100 or H200;
benchmarks/check_cuda.py runs the kernels there). A kernel that only compiles for the CPU
fails here, not on a user's GPU.
What this cannot show is that the kernels give the right numbers on a GPU: the CUDA
path's Python side runs on the CPU in tests/test_contact_free.py (``as_on_cuda``), and its
numbers are checked by benchmarks/check_cuda.py where a GPU is lent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

wp = pytest.importorskip("warp")

from diffsim.kernels import build_every_kernel  # noqa: E402 - after the import check

# sm_90: the GPUs diffsim is measured on. The code generated for one architecture differs
# from another's only in the instructions NVRTC picks, not in what the kernels may use.
ARCH = 90
# The modules of the kernels a CUDA run launches (built by build_every_kernel).
MODULES = [
    "diffsim_float32",
    "diffsim_float64",
    "diffsim_float32_grad",
    "diffsim_float64_grad",
    "diffsim.kernels.contact",
    "diffsim.kernels.broad_phase",
    "diffsim.kernels.inversion",
]
# The fused contact substeps run on CPU threads only (CUDA runs contact substep by substep:
# docs/backends.md). They compile for sm_90 too (measured when this test was written: 42 s
# of the 72 s these modules take), but a CUDA run never launches them.
CPU_ONLY = ["diffsim_float32_contact", "diffsim_float64_contact"]
# The set-up check that surfaces do not intersect runs on the CPU whatever the device.
CPU_ONLY += ["diffsim.kernels.intersections"]


def cuda_compiler_present() -> bool:
    """Whether this Warp build can compile CUDA code (its Linux and Windows wheels can)."""
    from warp._src import context

    from diffsim.kernels.runtime import init_warp

    init_warp()  # (context.runtime is set here)
    return bool(context.runtime.core.wp_is_cuda_enabled())


def test_the_lists_name_every_module_with_kernels():
    named = build_every_kernel()
    from warp._src.context import user_modules

    with_kernels = {
        name
        for name, module in user_modules.items()
        if name.startswith("diffsim") and module.kernels
    }
    assert with_kernels == set(MODULES) | set(CPU_ONLY) == set(named)
    assert len(named) == len(set(named))


@pytest.mark.parametrize("name", MODULES)
def test_kernels_compile_for_cuda(name):

    if not cuda_compiler_present():
        pytest.skip("this Warp build has no CUDA compiler (macOS wheels)")
    build_every_kernel()
    # In the kernel cache: compiled once per version of the kernels (CI: once per run).
    where = Path(wp.config.kernel_cache_dir) / "cuda_aot" / name
    try:
        artifacts = wp.compile_aot_module(
            wp.get_module(name), arch=ARCH, module_dir=where, use_ptx=True
        )
    except Exception as error:  # NVRTC's log names the kernel and the line
        pytest.fail(f"{name} does not compile for sm_{ARCH}: {error}")
    assert artifacts and all(Path(a).stat().st_size > 0 for a in artifacts)
    assert all(str(a).endswith(f".sm{ARCH}.ptx") for a in artifacts)


def test_code_only_a_cpu_compiles_fails_the_check(tmp_path):
    """The check can fail: a kernel calling an x86 intrinsic (which Warp's CPU compiler
    takes) does not compile for sm_90."""

    if not cuda_compiler_present():
        pytest.skip("this Warp build has no CUDA compiler (macOS wheels)")

    @wp.func_native("__builtin_ia32_pause();\nreturn 0;")
    def pause() -> int: ...

    @wp.kernel(module="probe_cpu_only")
    def probe(out: wp.array(dtype=int)):
        out[0] = pause()

    with pytest.raises(Exception, match="CUDA kernel build failed"):
        wp.compile_aot_module(wp.get_module("probe_cpu_only"), arch=ARCH, module_dir=tmp_path)
