#!/usr/bin/env bash
# Compile meshpilot's own protobuf files into Python modules and their type stubs (git-ignored).
# Idempotent: a module is rebuilt only when its .proto is newer.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
for proto in meshpilot/meshdns/dns.proto meshpilot/pki/ca.proto; do
  out="${proto%.proto}_pb2.py"
  if [ ! -e "$out" ] || [ ! -e "${out}i" ] || [ "$proto" -nt "$out" ]; then
    "$PY" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. "$proto"
  fi
done
