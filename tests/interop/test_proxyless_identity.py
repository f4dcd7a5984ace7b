"""A proxyless grpcio client on a mesh with identity on: it authenticates to the control plane with
a workload certificate, as gRPC's xDS bootstrap allows (``channel_creds`` of type ``tls`` reading
the files ``meshpilot identity-files`` keeps fresh), and gets its routes; without a certificate it
gets nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.interop.test_proxyless import HERE, SERVICE_PORT, client, echo_gen, echo_server  # noqa: F401 - fixture
from tests.support import VENV_BIN, control_plane, tmpdir, wait_until

TOKEN = "admin-secret"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def _ok(cp: Any, method: str, path: str, body: Any = None) -> Any:
    status, data = cp.call(method, path, body, ADMIN)
    assert status < 300, f"expected {method} {path} to succeed, got {status}: {data}"
    return data


@pytest.fixture
def mesh(echo_gen: Path) -> Iterator[tuple[Any, Path]]:  # noqa: F811
    workdir = tmpdir("meshpilot-proxyless-identity-")
    cfg = workdir / "cp.yaml"
    cfg.write_text(yaml.safe_dump({"identity": True, "token": TOKEN, "debounce_ms": 20}))
    with control_plane(workdir, extra=["--config", str(cfg)]) as cp, echo_server(echo_gen, "v1") as port:
        _ok(cp, "POST", "/v1/services", {"name": "echo", "ports": [{"name": "grpc", "port": SERVICE_PORT, "protocol": "grpc"}]})
        _ok(cp, "POST", "/v1/services/default/echo/instances", {"id": "echo-v1", "address": "127.0.0.1", "ports": {"grpc": port}})
        _ok(cp, "POST", "/v1/services", {"name": "caller", "ports": [{"name": "grpc", "port": 50052, "protocol": "grpc"}]})
        yield cp, workdir


def _bootstrap(path: Path, cp: Any, node: str, creds: dict[str, Any]) -> Path:
    path.write_text(json.dumps({
        "xds_servers": [{"server_uri": f"127.0.0.1:{cp.xds_port}", "channel_creds": [creds], "server_features": ["xds_v3"]}],
        "node": {"id": node, "cluster": "proxyless", "metadata": {"PROXYLESS": True}, "locality": {"zone": ""}},
    }))
    return path


def test_grpcio_authenticates_with_its_workload_certificate_and_a_stranger_gets_nothing(mesh: tuple[Any, Path], echo_gen: Path) -> None:  # noqa: F811
    cp, workdir = mesh
    identity = _ok(cp, "GET", "/v1/identity")
    bundle = workdir / "bundle.pem"
    status, pem = cp.call("GET", "/v1/identity/bundle", headers=ADMIN)
    assert status == 200, (status, pem)
    bundle.write_text(str(pem))
    token = workdir / "join-token"
    token.write_text(_ok(cp, "POST", "/v1/identity/tokens", {"namespace": "default", "service": "caller"})["secret"])
    out = workdir / "certs"
    log = open(workdir / "identity-files.log", "w")
    files = subprocess.Popen(
        [str(VENV_BIN / "meshpilot"), "identity-files", "--out", str(out), "--control-plane", f"127.0.0.1:{cp.xds_port}",
         "--node-id", "caller-1", "--join-token-file", str(token), "--trust-bundle", str(bundle),
         "--enrol-port", str(identity["enrolment_port"])],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: all((out / f).exists() for f in ("key.pem", "cert.pem", "bundle.pem")) or files.poll() is not None,
                   30, what="the workload certificate files")
        assert files.poll() is None, f"identity-files exited: {(workdir / 'identity-files.log').read_text()[-2000:]}"
        tls = {"type": "tls", "config": {"ca_certificate_file": str(out / "bundle.pem"), "certificate_file": str(out / "cert.pem"),
                                          "private_key_file": str(out / "key.pem"), "refresh_interval": "1s"}}
        cmd = [sys.executable, str(HERE / "client.py"), str(echo_gen), f"echo:{SERVICE_PORT}", "20"]
        with client(cmd, _bootstrap(workdir / "tls.json", cp, "caller-1", tls), workdir, "grpcio-tls") as calls:
            wait_until(lambda: sum(o == "v1" for _, o in list(calls.calls)) >= 20 or calls.proc.poll() is not None, 30,
                       what="20 calls answered through routes from the authenticated control plane")
            answered = sum(o == "v1" for _, o in list(calls.calls))
            ids = {p["node_id"]: p.get("identity") for p in _ok(cp, "GET", "/v1/proxies")}
        assert answered >= 20, f"expected the authenticated client's calls answered, got {calls.calls[-5:]}: " \
                               f"{(workdir / 'grpcio-tls.stderr').read_text()[-2000:]}"
        assert ids.get("caller-1") == "spiffe://mesh.local/ns/default/sa/caller", f"expected the client's stream under its identity, got {ids}"

        # the same client with the insecure creds of a plaintext mesh: the TLS-only port gives it nothing
        cmd = [sys.executable, str(HERE / "client.py"), str(echo_gen), f"echo:{SERVICE_PORT}", "4"]
        with client(cmd, _bootstrap(workdir / "insecure.json", cp, "caller-1", {"type": "insecure"}), workdir, "grpcio-plain") as stranger:
            stranger.proc.wait(30)
        assert stranger.calls and not any(o == "v1" for _, o in stranger.calls), \
            f"expected no call answered without a certificate, got {stranger.calls[-5:]}"
    finally:
        files.terminate()
        try:
            files.wait(10)
        except subprocess.TimeoutExpired:
            files.kill()
            files.wait()
        log.close()
