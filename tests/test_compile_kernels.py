"""scripts/compile_kernels.py, which scripts/test.sh runs before the tests: every Warp
module of diffsim compiled (here: loaded from the kernel cache it filled) for the CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from diffsim.kernels import build_every_kernel

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compile_kernels.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600
    )


def test_every_module_is_made_ready():
    done = run("--processes", "2")
    assert done.returncode == 0, done.stderr
    modules = build_every_kernel()
    assert f"{len(modules)} kernel modules ready" in done.stdout
    assert "on 2 processes" in done.stdout


def test_a_bad_process_count_is_refused_with_the_fix():
    done = run("--processes", "0")
    assert done.returncode == 2
    assert "--processes must be at least 1, got 0" in done.stderr
