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
# Every kernel compiled once, ahead, shared among the cores (a few seconds where the cache
# has them): the test processes below would each compile what they reach, at once.
.venv/bin/python scripts/compile_kernels.py
# The tests run in parallel processes, one per core (at most 4; pytest-xdist, work
# stealing: the long tests spread over the processes). DIFFSIM_TEST_PROCESSES=1 runs them
# in this one, in the order of a plain pytest run.
PROCESSES="${DIFFSIM_TEST_PROCESSES:-auto}"
PARALLEL=()
if [ "$PROCESSES" != "1" ]; then
    PARALLEL=(-n "$PROCESSES" --maxprocesses 4 --dist worksteal)
fi
exec .venv/bin/python -m pytest -q --durations=25 "${PARALLEL[@]}" "$@"
