#!/usr/bin/env bash
# The test command: sets up .venv (first run only), then lint + format check + the whole test suite on the CPU.
# Extra arguments go to pytest (e.g. `bash launch/test.sh -k dit`).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup.sh dev
echo "[test] ruff format --check && ruff check"
ruff format --check .
ruff check .
echo "[test] pytest"
JAX_PLATFORMS=cpu python -m pytest -q -rs -n 2 --dist loadgroup --durations=15 "$@"
