#!/usr/bin/env bash
# Sets up .venv if needed, then runs the test suite. Extra arguments go to pytest.
# Two worker processes (pytest-xdist) by default, one per core of the 2-core CI machine: every test runs its
# torch work on one thread (OMP_NUM_THREADS=1, inherited by the runs the tests launch), so two at once keep
# both cores busy without oversubscribing them. TEST_WORKERS=0 runs in this process.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/setup_env.sh"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest -q -n "${TEST_WORKERS:-2}" --dist worksteal "$@"
