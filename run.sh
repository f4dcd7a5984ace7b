#!/usr/bin/env bash
# meshpilot's two entry points on a fresh Debian 12 machine (as root):
#   ./run.sh demo   set everything up, then run `meshpilot demo`
#   ./run.sh test   set everything up, then run the whole test suite
# Any other words are passed to the `meshpilot` command after setup.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)

APT_PACKAGES=(
  python3 python3-venv ca-certificates curl openssl procps iproute2 iptables
  rustc cargo libstd-rust-dev-wasm32 lld-14
  etcd-server dnsperf dnsmasq-base unbound knot-dnsutils wrk nghttp2-client valgrind strace prometheus
  chromium
)

log() { printf 'setup: %s\n' "$*" >&2; }

setup_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# Every executable the build and the tests call, by the path they call it. A package that is only
# recommended (lld-14 behind /usr/bin/rust-lld) leaves a dangling link on a machine that installs without
# recommends: check that each resolves to a real executable file, so a missing step fails here, by name.
REQUIRED_TOOLS=(
  /usr/bin/rustc /usr/bin/cargo /usr/bin/rust-lld
  etcd dnsperf dnsmasq unbound kdig wrk h2load valgrind strace ip iptables openssl curl prometheus
  /usr/bin/chromium
)

check_tools() {
  local bad=() t p
  for t in "${REQUIRED_TOOLS[@]}" "$@"; do
    p=$(command -v "$t" 2>/dev/null || true)
    if [ -z "$p" ] || [ ! -f "$(readlink -f "$p")" ] || [ ! -x "$(readlink -f "$p")" ]; then
      bad+=("$t${p:+ -> $(readlink -f "$p")}")
    fi
  done
  if ((${#bad[@]})); then
    log "missing or dangling executables: ${bad[*]}"
    exit 1
  fi
}

pick_python() {
  for py in python3.11 python3.12 python3.13 python3; do
    if command -v "$py" >/dev/null && "$py" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$py"; return
    fi
  done
  log "no Python >= 3.11 found"; exit 1
}

setup_venv() {
  local stamp=.venv/.setup-stamp want
  want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
  if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    "$(pick_python)" -m venv .venv
  fi
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    log "installing Python packages"
    .venv/bin/pip install -q --upgrade pip >/dev/null
    .venv/bin/pip install -q -e '.[test]'
    echo "$want" > "$stamp"
  fi
}

setup_build() {
  # generated protobuf modules and the WASM filters; each script is idempotent
  for s in scripts/build-*.sh; do
    [ -e "$s" ] && bash "$s"
  done
  return 0
}

setup() { setup_apt; check_tools; setup_venv; check_tools "$ROOT/.venv/bin/envoy"; setup_build; }

cmd=${1:-demo}; shift || true
case "$cmd" in
  setup) setup ;;
  demo) setup; exec .venv/bin/meshpilot demo "$@" ;;
  test) setup; exec .venv/bin/python -m pytest -p no:cacheprovider -ra "$@" ;;
  *) setup; exec .venv/bin/meshpilot "$cmd" "$@" ;;
esac
