#!/usr/bin/env bash
# Sets up a virtual environment in .venv with diffsim and its dependencies.
#
# Safe and quick to run again: it installs only what is missing or out of date.
# - torch: the CPU build where no NVIDIA GPU answers `nvidia-smi` (from PyTorch's CPU
#   wheel index, with a short timeout, falling back to the default index), the default
#   build (with CUDA) where one does. An installed torch is left as it is.
# - diffsim (`pip install -e .[dev]`): again only when pyproject.toml changed since the
#   last install (a stamp in .venv holds its hash).
# - Mesa's EGL for headless rendering, through apt-get where it is missing.
#
# Environment: PYTHON (interpreter for a new .venv, default python3), TORCH_VERSION
# (default 2.13.0), DIFFSIM_SKIP_APT=1 (never call apt-get).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
CPU_INDEX=https://download.pytorch.org/whl/cpu
STAMP=.venv/.diffsim-setup-stamp

say() { echo "setup: $*" >&2; }

has_nvidia_gpu() {
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}

if [ ! -x .venv/bin/python ]; then
    say "creating .venv with $PY"
    "$PY" -m venv .venv
    .venv/bin/pip install -q --upgrade pip || say "could not upgrade pip; going on with $(.venv/bin/pip --version)"
fi

# Looked up, not imported (importing torch takes seconds).
if ! .venv/bin/python -c 'import importlib.util, sys
sys.exit(importlib.util.find_spec("torch") is None)'; then
    if has_nvidia_gpu; then
        say "NVIDIA GPU found: installing torch==$TORCH_VERSION (default build, with CUDA)"
        .venv/bin/pip install -q "torch==$TORCH_VERSION"
    else
        # An unpinned or default-index torch would pull a multi-GB CUDA build on Linux.
        say "no NVIDIA GPU: installing the CPU build of torch==$TORCH_VERSION"
        if ! .venv/bin/pip install -q --timeout 15 --retries 1 --index-url "$CPU_INDEX" \
            "torch==$TORCH_VERSION"; then
            say "PyTorch's CPU index did not answer; installing torch==$TORCH_VERSION from the default index"
            .venv/bin/pip install -q "torch==$TORCH_VERSION"
        fi
    fi
fi

# diffsim itself, editable, with the dev extras: again only when pyproject.toml changed.
want="$(.venv/bin/python -c 'import hashlib, os, sys
print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest(), os.getcwd(), sys.version.split()[0])')"
if [ ! -x .venv/bin/diffsim ] || [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
    say "installing diffsim (pip install -e .[dev])"
    .venv/bin/pip install -q -e ".[dev]"
    echo "$want" >"$STAMP"
fi

# Headless rendering (polyscope's EGL backend) needs Mesa's EGL; install it where missing.
if [ "${DIFFSIM_SKIP_APT:-0}" != 1 ] && command -v apt-get >/dev/null \
    && ! ldconfig -p 2>/dev/null | grep -q libEGL_mesa; then
    SUDO=""; [ "$(id -u)" != 0 ] && SUDO="sudo"
    ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq libegl1 libegl-mesa0 libgl1-mesa-dri) \
        || echo "warning: could not install Mesa EGL; video rendering will be unavailable" >&2
fi
