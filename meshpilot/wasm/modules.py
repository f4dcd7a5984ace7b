"""The built WASM filter modules: where they are, their sha256, and the Envoy filter that loads them.

``scripts/build-filters.sh`` (run by setup) compiles ``filters/`` and leaves ``<name>.wasm`` and
``<name>.wasm.sha256`` in this package directory; nothing built is committed. ``mesh`` is the
governance filter (circuit breaker + rate limiter), ``noop`` the Continue-only baseline and ``probe``
the benchmark's host-call pricer. The control plane serves the bytes over HTTP and names them by
sha256 in Envoy's remote code source, so sidecars need no local copy; tests and benchmarks load the
local file.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

__all__ = ["MODULES", "build", "module_path", "module_sha256", "wasm_filter", "WASM_TYPE_URL"]

MODULES = ("mesh", "noop", "probe")
WASM_TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
_DIR = Path(__file__).resolve().parent
_BUILD_SCRIPT = _DIR.parent.parent / "scripts" / "build-filters.sh"


def module_path(name: str = "mesh") -> Path:
    """Path of a built module; raises FileNotFoundError (with the fix) if it has not been built."""
    if name not in MODULES:
        raise ValueError(f"unknown module {name!r}; expected one of {MODULES}")
    path = _DIR / f"{name}.wasm"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run scripts/build-filters.sh (or ./run.sh setup)")
    return path


def module_sha256(name: str = "mesh") -> str:
    """Hex sha256 of a built module, as written beside it by the build."""
    digest = (module_path(name).with_name(f"{name}.wasm.sha256")).read_text().strip()
    if len(digest) != 64:
        raise ValueError(f"{name}.wasm.sha256 does not hold a sha256: {digest!r}")
    return digest


def build(force: bool = False) -> None:
    """Runs the idempotent build script (source checkouts only)."""
    if not _BUILD_SCRIPT.is_file():
        raise FileNotFoundError(f"{_BUILD_SCRIPT} not found: module builds need a source checkout")
    subprocess.run(["bash", str(_BUILD_SCRIPT), *(["--force"] if force else [])], check=True)


def wasm_filter(
    configuration: str,
    *,
    module: str = "mesh",
    name: str = "meshpilot",
    vm_id: str = "meshpilot",
    remote_uri: str | None = None,
    remote_cluster: str | None = None,
    failure_policy: str = "FAIL_OPEN",
) -> dict[str, Any]:
    """The ``envoy.extensions.filters.http.wasm.v3.Wasm`` message (protobuf JSON) for a module.

    ``configuration`` is the text from :func:`meshpilot.wasm.config.encode`. With ``remote_uri`` and
    ``remote_cluster`` the code comes over HTTP, pinned by the module's sha256; otherwise from the
    local file. All filters of one Envoy should share ``vm_id`` so they share one VM per worker and one
    shared-data space. ``failure_policy`` decides what Envoy does if the VM fails at runtime
    (FAIL_OPEN: requests pass without the filter; FAIL_CLOSED: they get 503; FAIL_RELOAD: reload).
    """
    if remote_uri:
        if not remote_cluster:
            raise ValueError("remote_uri needs remote_cluster (the cluster that serves the module)")
        code: dict[str, Any] = {
            "remote": {
                "http_uri": {"uri": remote_uri, "cluster": remote_cluster, "timeout": "10s"},
                "sha256": module_sha256(module),
            }
        }
    else:
        code = {"local": {"filename": str(module_path(module))}}
    return {
        "@type": WASM_TYPE_URL,
        "config": {
            "name": name,
            "root_id": name,
            "vm_config": {"vm_id": vm_id, "runtime": "envoy.wasm.runtime.v8", "code": code},
            "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": configuration},
            "failure_policy": failure_policy,
        },
    }
