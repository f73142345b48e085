#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# two workers (this VM has two cores), a test file each at a time: the files keep their own order and fixtures;
# the slowest files first (conftest.SLOW_FILES), not xdist's order by count of tests
exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
