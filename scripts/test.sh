#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WARP_CACHE_PATH="${WARP_CACHE_PATH:-$PWD/.warp_cache}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -q --durations=25 "$@"
