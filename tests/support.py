"""Helpers for tests that start real processes: the control plane, Envoy, HTTP backends.

Every helper is a context manager that stops what it started, even when the test fails.
"""

from __future__ import annotations

import contextlib
import http.server as httpserver
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
ENVOY = shutil.which("envoy", path=str(VENV_BIN)) or shutil.which("envoy") or "envoy"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = pred()
        except Exception as exc:  # noqa: BLE001 - keep polling; report the last error
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last result: {last!r}")


def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 5.0) -> tuple[int, Any, dict[str, str]]:
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None and "Content-Type" not in (headers or {}):
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            status, hdrs = r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        raw, status, hdrs = e.read(), e.code, dict(e.headers)
    try:
        return status, json.loads(raw), hdrs
    except ValueError:
        return status, raw.decode(errors="replace"), hdrs


def _stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ControlPlaneProc:
    def __init__(self, workdir: Path, store: str | None = None, extra: list[str] | None = None, xds_port: int = 0, api_port: int = 0,
                 nofile: int | None = None) -> None:
        self.workdir = workdir
        self.nofile = nofile  # soft and hard limit on the process's open files
        self.store = store or f"sqlite:{workdir / 'meshpilot.db'}"
        self.extra = extra or []
        self.xds_port_wanted = xds_port
        self.api_port_wanted = api_port
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}
        self.log = workdir / "control-plane.log"

    def start(self) -> ControlPlaneProc:
        ready = self.workdir / "cp-ready.json"
        ready.unlink(missing_ok=True)
        cmd = [
            str(VENV_BIN / "meshpilot"), "serve", "--store", self.store,
            "--xds-port", str(self.xds_port_wanted), "--api-port", str(self.api_port_wanted),
            "--consul-port", "-1", "--eureka-port", "-1", "--ready-file", str(ready), *self.extra,
        ]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, cwd=self.workdir,
                                     preexec_fn=self._limits if self.nofile is not None else None)
        wait_until(lambda: ready.exists() or self.proc.poll() is not None, 20, what="control plane ready file")
        if self.proc.poll() is not None:
            raise AssertionError(f"control plane exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        self.ports = json.loads(ready.read_text())
        return self

    def _limits(self) -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}"

    @property
    def xds_port(self) -> int:
        return self.ports["xds"]

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        status, data, _ = http(method, self.api + path, body, headers)
        return status, data

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None


@contextlib.contextmanager
def control_plane(workdir: Path, **kw: Any) -> Iterator[ControlPlaneProc]:
    cp = ControlPlaneProc(workdir, **kw)
    try:
        yield cp.start()
    finally:
        cp.stop()


class EnvoyProc:
    def __init__(self, workdir: Path, bootstrap: dict[str, Any], name: str = "envoy", concurrency: int = 1) -> None:
        self.workdir = workdir
        self.name = name
        self.bootstrap = bootstrap
        self.concurrency = concurrency
        self.proc: subprocess.Popen[bytes] | None = None
        self.admin_port = 0
        self.log = workdir / f"{name}.log"

    def start(self) -> EnvoyProc:
        cfg = self.workdir / f"{self.name}.json"
        cfg.write_text(json.dumps(self.bootstrap))
        addr_file = self.workdir / f"{self.name}.admin"
        addr_file.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [ENVOY, "-c", str(cfg), "--use-dynamic-base-id", "--concurrency", str(self.concurrency),
             "--admin-address-path", str(addr_file), "-l", "info", "--drain-time-s", "1", "--parent-shutdown-time-s", "2"],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
        )
        wait_until(lambda: (addr_file.exists() and addr_file.read_text().strip()) or self.proc.poll() is not None, 20, what=f"{self.name} admin address")
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        self.admin_port = int(addr_file.read_text().strip().rsplit(":", 1)[1])
        return self

    def admin(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as r:
            return r.read().decode()

    def config_dump(self, resource: str | None = None) -> dict[str, Any]:
        q = f"?resource={resource}" if resource else ""
        return json.loads(self.admin(f"/config_dump{q}"))

    def filter_switched_off(self, route_config: str, vhost: str, filter_name: str) -> bool | None:
        """Whether the routes Envoy holds switch an HTTP filter off (``FilterConfig.disabled``) for a
        virtual host of a dynamic route configuration; None if Envoy has no such host."""
        for c in self.config_dump("dynamic_route_configs").get("configs", []):
            rc = c.get("route_config", {})
            if rc.get("name") != route_config:
                continue
            for vh in rc.get("virtual_hosts", []):
                if vh.get("name") == vhost:
                    fc = vh.get("typed_per_filter_config", {}).get(filter_name)
                    return bool(fc and fc.get("disabled"))
        return None

    def cluster_hosts(self, cluster: str) -> dict[str, str]:
        """host:port -> health flags, from /clusters."""
        out: dict[str, str] = {}
        for line in self.admin("/clusters").splitlines():
            parts = line.split("::")
            if len(parts) >= 4 and parts[0] == cluster and parts[2] == "health_flags":
                out[parts[1]] = parts[3]
        return out

    def stat(self, name: str) -> int | None:
        for line in self.admin(f"/stats?filter=^{name}$").splitlines():
            k, _, v = line.partition(": ")
            if k == name:
                try:
                    return int(v)
                except ValueError:
                    return None
        return None

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None


@contextlib.contextmanager
def envoy(workdir: Path, bootstrap: dict[str, Any], name: str = "envoy", concurrency: int = 1) -> Iterator[EnvoyProc]:
    e = EnvoyProc(workdir, bootstrap, name, concurrency)
    try:
        yield e.start()
    finally:
        e.stop()


class _Handler(httpserver.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes

    def do_GET(self) -> None:  # noqa: N802
        srv = self.server
        srv.hits += 1  # type: ignore[attr-defined]
        status = srv.status  # type: ignore[attr-defined]
        body = json.dumps({"server": srv.name, "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args: Any) -> None:
        pass


class _Server(httpserver.ThreadingHTTPServer):
    daemon_threads = True


@contextlib.contextmanager
def http_backend(name: str, status: int = 200) -> Iterator[Any]:
    """A real HTTP server on 127.0.0.1 answering JSON {server, path, headers}."""
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.name, srv.hits, srv.status = name, 0, status  # type: ignore[attr-defined]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        srv.port = srv.server_address[1]  # type: ignore[attr-defined]
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def through(proxy_port: int, host: str, path: str = "/", headers: dict[str, str] | None = None, timeout: float = 5.0) -> tuple[int, Any]:
    """An HTTP request sent to an Envoy listener with the given Host."""
    h = {"Host": host, **(headers or {})}
    status, data, _ = http("GET", f"http://127.0.0.1:{proxy_port}{path}", headers=h, timeout=timeout)
    return status, data


def sidecar_bootstrap(node: str, xds_port: int, *, service: str = "", sotw: bool = False, outbound_port: int = 0, inbound_port: int = 0, app_port: int = 0, zone: str = "", hds: bool = False, service_port: int = 0) -> dict[str, Any]:
    from meshpilot.translate.bootstrap import BootstrapOptions, build_bootstrap

    return build_bootstrap(
        BootstrapOptions(
            node_id=node, service=service, zone=zone, control_plane_port=xds_port,
            api_type="GRPC" if sotw else "DELTA_GRPC", admin_port=0,
            outbound_port=outbound_port, inbound_port=inbound_port, app_port=app_port, hds=hds,
            service_port=service_port,
        )
    )


def assert_envoy_accepts(config: dict[str, Any] | Path, workdir: Path, what: str = "the config") -> None:
    """Envoy's own verdict on a config (``envoy --mode validate``), without serving it."""
    if isinstance(config, Path):
        path = config
    else:
        path = workdir / "envoy-validate.json"
        path.write_text(json.dumps(config))
    r = subprocess.run([ENVOY, "--mode", "validate", "-c", str(path), "-l", "error", "--use-dynamic-base-id"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"expected Envoy to accept {what}, got exit {r.returncode}:\n{r.stdout[-3000:]}{r.stderr[-3000:]}"


def tmpdir(prefix: str = "meshpilot-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))




def operator_ca_files(directory: Path) -> tuple[Any, dict[str, str]]:
    """An operator's CA for the mesh, as files: an offline root (not given to meshpilot) and an
    intermediate of it. Returns (the root's pki.Authority, the ca_cert_file/ca_key_file/ca_chain_file
    settings)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    from meshpilot import pki

    directory.mkdir(parents=True, exist_ok=True)
    root = pki.Authority.generate("corp")
    key = pki.new_key()
    now = dt.datetime.now(dt.timezone.utc)
    root_ski = root.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "corp mesh intermediate")]))
        .issuer_name(root.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski), critical=False)
        .sign(root.key, hashes.SHA256())
    )
    files = {"ca_cert_file": directory / "ca.pem", "ca_key_file": directory / "ca.key", "ca_chain_file": directory / "chain.pem"}
    files["ca_cert_file"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["ca_key_file"].write_bytes(pki.key_pem(key))
    files["ca_key_file"].chmod(0o600)
    files["ca_chain_file"].write_bytes(root.anchor_pem())
    return root, {k: str(v) for k, v in files.items()}
