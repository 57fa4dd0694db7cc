#!/usr/bin/env bash
# Sets up the project env (idempotent) and runs the whole pipeline on the embedded default.
# Extra arguments go to the pipeline entry point (see `python -m flows.run --help`).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$TRACERL_ROOT"
exec python -m flows.run "$@"
