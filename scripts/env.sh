# Sourced by the project's commands (and by researchers: `source scripts/env.sh`): creates
# the project's virtual env (.venv) on first use, re-installs only when pyproject.toml or
# requirements/cpu.lock changed, and sets the offline-friendly environment every tool of
# the pipeline needs.
# It never changes the caller's shell options: no `set -e` here (in an interactive shell
# the next failing command would close the terminal); every step checks its own status
# and a failure returns non-zero. scripts/run.sh and scripts/test.sh set -euo pipefail
# themselves, so they stop there.
# Installer: plain pip (it reads pip's own configuration, where a CPU torch wheel may be
# found). torch==2.13.0 is pinned; any other torch spec would pull CUDA packages.
_tracerl_env() {
  local py venv stamp want f
  TRACERL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || return 1
  export TRACERL_ROOT
  py="${TRACERL_PYTHON:-python3}"
  venv="$TRACERL_ROOT/.venv"
  stamp="$venv/.tracerl-install-stamp"
  for f in pyproject.toml requirements/cpu.lock; do
    [ -f "$TRACERL_ROOT/$f" ] || { echo "[tracerl] missing $TRACERL_ROOT/$f" >&2; return 1; }
  done
  want="$(cat "$TRACERL_ROOT/pyproject.toml" "$TRACERL_ROOT/requirements/cpu.lock" | sha256sum | cut -c1-16)"
  if [ ! -x "$venv/bin/python" ]; then
    echo "[tracerl] creating virtual env in .venv"
    "$py" -m venv "$venv" || { echo "[tracerl] could not create $venv with $py" >&2; return 1; }
  fi
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[tracerl] installing pinned dependencies (first run takes a few minutes)"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "pip==26.3" >/dev/null 2>&1 || true
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
      -c "$TRACERL_ROOT/requirements/cpu.lock" -e "$TRACERL_ROOT[dev]" \
      || { echo "[tracerl] installing the pinned dependencies failed (see above)" >&2; return 1; }
    echo "$want" > "$stamp" || return 1
  fi
  # shellcheck disable=SC1091
  source "$venv/bin/activate" || return 1
  local cache="$TRACERL_ROOT/.cache"
  mkdir -p "$cache" || return 1
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
  _tracerl_vega_page
  _tracerl_chromium
}

# The offline page of `dvc plots show` (README, "Environment"): DVC's
# default page loads Vega from a CDN and stays blank offline, so `npm ci` installs the
# Vega packages pinned in web/vega (package-lock.json) and tracerl.pipeline.dvc_page
# inlines them into web/vega/page.html, set as plots.html_template in .dvc/config.local.
# Optional: it never fails the env. Fast when done: one hash of two files and a grep of
# .dvc/config.local (re-set when that file lost the setting). Without npm,
# DVC keeps its CDN page (`tracerl plots` draws offline either way).
_tracerl_vega_page() {
  local dir="$TRACERL_ROOT/web/vega" want have
  [ -f "$dir/package-lock.json" ] || return 0
  want="$(cat "$dir/package-lock.json" "$TRACERL_ROOT/src/tracerl/pipeline/dvc_page.py" \
    2>/dev/null | sha256sum | cut -c1-16)"
  have="$(cat "$dir/.stamp" 2>/dev/null)"
  local npm_ci=1 retry="retry: rm web/vega/.stamp; source scripts/env.sh"
  if [ "$have" = "$want" ] && [ -f "$dir/page.html" ]; then
    grep -qs 'web/vega/page.html' "$TRACERL_ROOT/.dvc/config.local" && return 0
    npm_ci=0  # built, but DVC's local config lost the setting: set it again
  fi
  if [ "$have" = "failed $want" ]; then  # said once in full when it failed; no re-download
    echo "[tracerl] offline dvc plots page not built (npm ci or its build failed earlier; $retry)" >&2
    return 0
  fi
  if [ "$npm_ci" = 1 ] && ! command -v npm >/dev/null 2>&1; then
    echo "[tracerl] npm not found: \`dvc plots show\` loads Vega from a CDN (blank offline)." \
      "For its offline page install Node.js with npm (Debian: apt-get install npm) and" \
      "source scripts/env.sh again; \`tracerl plots\` draws the curves offline meanwhile" >&2
    return 0
  fi
  [ "$npm_ci" = 1 ] && echo "[tracerl] installing Vega for the offline dvc plots page" \
    "(npm ci in web/vega)"
  if [ "$npm_ci" = 1 ] && ! npm ci --prefix "$dir" --no-audit --no-fund --ignore-scripts \
       --loglevel=error --fetch-retries=1 >/dev/null; then
    echo "[tracerl] npm ci in web/vega failed (offline?): \`dvc plots show\` keeps" \
      "its CDN page; $retry" >&2
    echo "failed $want" > "$dir/.stamp"
    return 0
  fi
  if ! PYTHONPATH="$TRACERL_ROOT/src${PYTHONPATH:+:$PYTHONPATH}" \
       "$TRACERL_ROOT/.venv/bin/python" -m tracerl.pipeline.dvc_page --root "$TRACERL_ROOT"; then
    echo "[tracerl] building web/vega/page.html failed (see above); $retry" >&2
    echo "failed $want" > "$dir/.stamp"
    return 0
  fi
  echo "$want" > "$dir/.stamp"
}

# Opt-in (TRACERL_INSTALL_CHROMIUM=1): Chromium for the tests marked `browser`, which render
# the dvc plots page headless (Debian's package; needs root). Nothing otherwise.
_tracerl_chromium() {
  [ "${TRACERL_INSTALL_CHROMIUM:-0}" = 1 ] || return 0
  command -v chromium >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[tracerl] installing chromium (TRACERL_INSTALL_CHROMIUM=1)"
    { apt-get install -y --no-install-recommends chromium >/dev/null \
      || { apt-get update >/dev/null && apt-get install -y --no-install-recommends chromium \
           >/dev/null; }; } \
      || echo "[tracerl] could not install chromium; the browser tests will skip" >&2
  else
    echo "[tracerl] TRACERL_INSTALL_CHROMIUM=1: install Chromium yourself (as root:" \
      "apt-get install chromium, or set TRACERL_CHROMIUM to a Chrome/Chromium binary)" >&2
  fi
  return 0
}
_tracerl_status=0
_tracerl_env || _tracerl_status=$?  # in a || list, a caller's set -e cannot fire inside
unset -f _tracerl_env _tracerl_vega_page _tracerl_chromium
# `return` when sourced; `exit` when run as a script (then nothing persists anyway)
if [ "$_tracerl_status" -ne 0 ]; then
  unset _tracerl_status
  return 1 2>/dev/null || exit 1
fi
unset _tracerl_status
