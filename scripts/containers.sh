#!/usr/bin/env bash
# Containers on a machine without a Docker engine and without access to image registries:
# podman (Debian packages) serving the Docker API that tracerl's ContainerRunner drives,
# a local Debian base image built with debootstrap, and the project's CPU image on it.
#
#   bash scripts/containers.sh setup     # apt-get install podman runc debootstrap (root)
#   bash scripts/containers.sh base      # debootstrap Debian 12 -> image tracerl-base:12
#   bash scripts/containers.sh wheels    # the locked wheels (torch CPU) -> containers/wheelhouse
#   bash scripts/containers.sh build     # tracerl-cpu:<tag> (and tracerl-sandbox:<tag>)
#   bash scripts/containers.sh service   # Docker API socket in .cache/podman/ (background)
#   bash scripts/containers.sh stop      # stop that service
#   bash scripts/containers.sh all       # base, wheels, build, service
#   eval "$(bash scripts/containers.sh env)"  # CONTAINERS_CONF and DOCKER_HOST in this shell
#
# Nothing is written outside the project except by apt (setup) and podman's own image
# storage. The podman settings live in containers/containers.conf (CONTAINERS_CONF).
# Environment: TRACERL_IMAGE_TAG (default: run.image_tag of params.yaml, else 0.1.0),
# DEBIAN_MIRROR (default http://deb.debian.org/debian), TRACERL_PODMAN_SOCKET (default
# .cache/podman/podman.sock).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CONTAINERS_CONF="$ROOT/containers/containers.conf"
BASE_IMAGE="tracerl-base:12"        # the FROM of containers/Dockerfile.cpu and .sandbox
SUITE="bookworm"                    # Debian 12
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SOCKET="${TRACERL_PODMAN_SOCKET:-$ROOT/.cache/podman/podman.sock}"
WHEELHOUSE="$ROOT/containers/wheelhouse"

log() { echo "[containers] $*" >&2; }

image_tag() {
  if [ -n "${TRACERL_IMAGE_TAG:-}" ]; then echo "$TRACERL_IMAGE_TAG"; return; fi
  local t
  t="$(sed -n 's/^[[:space:]]*image_tag:[[:space:]]*"\{0,1\}\([^"#[:space:]]*\).*/\1/p' \
       "$ROOT/params.yaml" 2>/dev/null | head -n1)"
  echo "${t:-0.1.0}"
}

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    log "$1 needs root (run it with sudo)"; exit 1
  fi
}

cmd_setup() {
  need_root setup
  # Debian's podman with runc (crun fails on rlimits / hybrid cgroups on small VMs)
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    podman runc debootstrap
  podman --version
}

cmd_base() {
  need_root "base (debootstrap)"
  local root
  mkdir -p "$ROOT/.cache"
  root="$(mktemp -d "$ROOT/.cache/debootstrap.XXXXXX")"
  trap 'rm -rf "$root"' RETURN
  log "debootstrap $SUITE (minbase + python3) from $MIRROR into $root"
  debootstrap --variant=minbase --include=python3,python3-venv "$SUITE" "$root" "$MIRROR"
  # an image holds no package lists or downloaded .debs
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb "$root"/var/log/*.log
  log "podman import -> $BASE_IMAGE"
  tar --numeric-owner -C "$root" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase --include=python3,python3-venv $SUITE" \
    - "$BASE_IMAGE"
  podman image inspect --format '{{.Id}} {{.Size}}' "$BASE_IMAGE"
}

cmd_wheels() {
  # Every pinned wheel the image installs, built or fetched on the host by the host's pip
  # (its configuration may point at a local CPU build of torch; a plain index would give
  # the multi-GB CUDA one). The image build then installs offline from this folder.
  local py="${TRACERL_PYTHON:-$ROOT/.venv/bin/python}"
  [ -x "$py" ] || py=python3
  mkdir -p "$WHEELHOUSE"
  log "pip wheel -r requirements/cpu.lock -> containers/wheelhouse"
  "$py" -m pip wheel --quiet --no-deps -w "$WHEELHOUSE" -r "$ROOT/requirements/cpu.lock"
  # pip itself, the project's build backend (pyproject [build-system]) for the offline
  # `pip install .`, and async-timeout: redis needs it on Python < 3.11.3 (Debian 12 has
  # 3.11.2; the lock was resolved on a newer 3.11, where redis does not ask for it)
  "$py" -m pip wheel --quiet --no-deps -w "$WHEELHOUSE" "pip==26.3" "setuptools==84.2.1" \
    "wheel==0.48.0" "async-timeout==5.0.1"
  local torch
  torch="$(ls "$WHEELHOUSE"/torch-2.13.0*.whl 2>/dev/null | head -n1)"
  case "$torch" in
    *+cpu*) log "torch: $(basename "$torch")" ;;
    *) log "torch in the wheelhouse is not a CPU build ($torch): point pip at a CPU torch"\
           "(e.g. --find-links with torch-2.13.0+cpu) and run again"; exit 1 ;;
  esac
  du -sh "$WHEELHOUSE" >&2
}

cmd_build() {
  local tag; tag="$(image_tag)"
  podman image exists "$BASE_IMAGE" || { log "no $BASE_IMAGE: run '$0 base' first"; exit 1; }
  [ -d "$WHEELHOUSE" ] || { log "no containers/wheelhouse: run '$0 wheels' first"; exit 1; }
  log "build tracerl-cpu:$tag"
  local t0=$SECONDS
  podman build --network none -f "$ROOT/containers/Dockerfile.cpu" -t "tracerl-cpu:$tag" "$ROOT"
  log "tracerl-cpu:$tag built in $((SECONDS - t0)) s"
  t0=$SECONDS
  podman build --network none -f "$ROOT/containers/Dockerfile.sandbox" \
    -t "tracerl-sandbox:$tag" "$ROOT/containers"
  log "tracerl-sandbox:$tag built in $((SECONDS - t0)) s"
}

cmd_service() {
  mkdir -p "$(dirname "$SOCKET")"
  if [ -S "$SOCKET" ] && DOCKER_HOST="unix://$SOCKET" curl -sf --unix-socket "$SOCKET" \
       http://d/_ping >/dev/null 2>&1; then
    log "already serving on unix://$SOCKET"
  else
    rm -f "$SOCKET"
    # --time=0: never exit for idleness; the pid file lets `stop` end exactly this process
    nohup podman system service --time=0 "unix://$SOCKET" \
      >"$(dirname "$SOCKET")/service.log" 2>&1 &
    echo $! >"$(dirname "$SOCKET")/service.pid"
    local i
    for i in $(seq 1 50); do [ -S "$SOCKET" ] && break; sleep 0.2; done
    [ -S "$SOCKET" ] || { log "the service did not start (see $(dirname "$SOCKET")/service.log)"; exit 1; }
    log "serving the Docker API on unix://$SOCKET (pid $(cat "$(dirname "$SOCKET")/service.pid"))"
  fi
  echo "export CONTAINERS_CONF=$CONTAINERS_CONF DOCKER_HOST=unix://$SOCKET"
}

cmd_stop() {
  local pidf; pidf="$(dirname "$SOCKET")/service.pid"
  if [ -f "$pidf" ] && kill "$(cat "$pidf")" 2>/dev/null; then
    log "stopped the service (pid $(cat "$pidf"))"
  else
    log "no service running from $pidf"
  fi
  rm -f "$pidf" "$SOCKET"
}

cmd_env() {
  echo "export CONTAINERS_CONF=$CONTAINERS_CONF"
  echo "export DOCKER_HOST=unix://$SOCKET"
}

case "${1:-}" in
  setup) cmd_setup ;;
  base) cmd_base ;;
  wheels) cmd_wheels ;;
  build) cmd_build ;;
  service) cmd_service ;;
  stop) cmd_stop ;;
  env) cmd_env ;;
  all) cmd_base; cmd_wheels; cmd_build; cmd_service ;;
  *) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
