# Sourced by the project's commands: creates the project's virtual env (.venv) on first use,
# re-installs only when pyproject.toml or requirements/cpu.lock changed, and sets the
# offline-friendly environment every tool of the pipeline needs.
# Installer: plain pip (it reads pip's own configuration, where a CPU torch wheel may be
# found). torch==2.13.0 is pinned; any other torch spec would pull CUDA packages.
set -euo pipefail
TRACERL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export TRACERL_ROOT
PY="${TRACERL_PYTHON:-python3}"
VENV="$TRACERL_ROOT/.venv"
STAMP="$VENV/.tracerl-install-stamp"
want="$(cat "$TRACERL_ROOT/pyproject.toml" "$TRACERL_ROOT/requirements/cpu.lock" | sha256sum | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[tracerl] creating virtual env in .venv"
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$want" ]; then
  echo "[tracerl] installing pinned dependencies (first run takes a few minutes)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "pip==26.3" >/dev/null 2>&1 || true
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    -c "$TRACERL_ROOT/requirements/cpu.lock" -e "$TRACERL_ROOT[dev]"
  echo "$want" > "$STAMP"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
cache="$TRACERL_ROOT/.cache"
mkdir -p "$cache"
export PYTHONPATH="$TRACERL_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
export HF_HUB_DISABLE_TELEMETRY=1
export TOKENIZERS_PARALLELISM=false
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-180}"
export PREFECT_HOME="${PREFECT_HOME:-$cache/prefect}"
export MLFLOW_DISABLE_TELEMETRY=true
export DO_NOT_TRACK=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$cache/torch_extensions}"
export DVC_NO_ANALYTICS=1
# OpenMP threads spin-wait between parallel regions; with two torch processes on a small
# machine that spinning makes both ~40x slower. A bounded spin keeps ~97% of the solo speed
# and ~11x the default's throughput under contention (docs/benchmarks.md, "CPU threads").
export GOMP_SPINCOUNT="${GOMP_SPINCOUNT:-10000}"
