#!/usr/bin/env bash
# Sets up the project env (idempotent) and runs the test suite on CPU.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k masks`.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$TRACERL_ROOT"
# two workers (each test process uses one torch thread, see tests/conftest.py)
exec python -m pytest -q -n "${TRACERL_TEST_WORKERS:-2}" "$@"
