#!/usr/bin/env bash
# Sets up a virtual environment in .venv with diffsim and its dependencies.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q "torch==2.13.0" || .venv/bin/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
.venv/bin/pip install -q -e ".[dev]"
# Headless rendering (polyscope's EGL backend) needs Mesa's EGL; install it where missing.
if command -v apt-get >/dev/null && ! ldconfig -p 2>/dev/null | grep -q libEGL_mesa; then
    SUDO=""; [ "$(id -u)" != 0 ] && SUDO="sudo"
    ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq libegl1 libegl-mesa0 libgl1-mesa-dri) \
        || echo "warning: could not install Mesa EGL; video rendering will be unavailable" >&2
fi
