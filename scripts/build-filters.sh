#!/usr/bin/env bash
# Builds meshpilot's WASM filters (filters/) with Debian's rustc and copies them to meshpilot/wasm/
# as <name>.wasm with a <name>.wasm.sha256 beside each. Idempotent: skips the build when the sources,
# the toolchain and the outputs are unchanged. Usage: scripts/build-filters.sh [--force]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RUSTC=${RUSTC:-/usr/bin/rustc}
CARGO=${CARGO:-/usr/bin/cargo}
OUT="$ROOT/meshpilot/wasm"
MODULES=(mesh noop probe)
STAMP="$ROOT/filters/target/.meshpilot-build-stamp"

log() { printf 'build-filters: %s\n' "$*" >&2; }

if [ ! -x "$RUSTC" ] || [ ! -x "$CARGO" ]; then
  log "skipped: $RUSTC or $CARGO not found (install Debian's rustc, cargo, libstd-rust-dev-wasm32)"
  exit 0
fi

want=$( { "$RUSTC" --version; find filters -path filters/target -prune -o -type f \( -name '*.rs' -o -name 'Cargo.toml' -o -name 'Cargo.lock' \) -print | LC_ALL=C sort | xargs sha256sum; } | sha256sum | cut -d' ' -f1)
fresh=1
for m in "${MODULES[@]}"; do
  [ -s "$OUT/$m.wasm" ] && [ -s "$OUT/$m.wasm.sha256" ] || fresh=0
done
if [ "${1:-}" != "--force" ] && [ "$fresh" = 1 ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then
  exit 0
fi

log "building ${MODULES[*]} for wasm32-wasi"
(cd filters && RUSTC="$RUSTC" "$CARGO" build --offline --quiet --release --lib --target wasm32-wasi)
for m in "${MODULES[@]}"; do
  src="filters/target/wasm32-wasi/release/$m.wasm"
  tmp="$OUT/.$m.wasm.tmp"
  cp "$src" "$tmp"
  sha256sum "$tmp" | cut -d' ' -f1 > "$OUT/.$m.sha.tmp"
  mv "$tmp" "$OUT/$m.wasm"
  mv "$OUT/.$m.sha.tmp" "$OUT/$m.wasm.sha256"
done
mkdir -p "$(dirname "$STAMP")"
echo "$want" > "$STAMP"
log "wrote ${MODULES[*]/%/.wasm} to meshpilot/wasm/"
