#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Compiled kernels go to a folder outside the checkout (Warp's own default on Linux), so a
# fresh clone reuses what an earlier one compiled (Warp keys modules by their source and
# keeps a folder per Warp version); a relative path would be resolved again in each
# subprocess's folder.
export WARP_CACHE_PATH="${WARP_CACHE_PATH:-${XDG_CACHE_HOME:-$HOME/.cache}/warp}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -q --durations=25 "$@"
