#!/usr/bin/env bash
# The test command of the README: builds the environment on first use (tools/env.sh),
# then runs the whole suite. Extra arguments go to pytest (e.g. -m "not slow", -k focal).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec bash tools/env.sh python -m pytest "$@"
