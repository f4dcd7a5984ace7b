"""AuthorizationPolicy enforced by a proxyless grpcio server (gRFC A36 xDS server, A41 RBAC, A29 TLS).

The control plane runs with identity on. An echo server started with ``xds=True`` and
``xds_server_credentials`` takes its Listener from meshpilot: mutual TLS with its workload
certificate (the bootstrap's ``file_watcher`` certificate provider ``mesh`` over the files
``meshpilot identity-files`` keeps for service ``echo``) and the RBAC rules of the policies that
select ``echo``. Two proxyless grpcio clients, of services ``a`` and ``c``, call it through
``xds:///echo:50051`` with xDS channel credentials: their clusters for ``echo`` carry TLS on the
same certificate provider, because the echo instance is registered with its SPIFFE id. With a
policy allowing only ``a``, calls from ``a`` are answered and calls from ``c`` fail with
PERMISSION_DENIED; once the policy allows ``c`` instead, ``c``'s calls are answered (and ``a``'s
refused) within seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from tests.interop.test_proxyless import HERE, SERVICE_PORT, CallLog, client, echo_gen  # noqa: F401 - fixture
from tests.support import VENV_BIN, control_plane, free_port, tmpdir, wait_until

TOKEN = "admin-secret"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
TEMPLATE = "grpc/server?xds.resource.listening_address=%s"
ECHO_ID = "spiffe://mesh.local/ns/default/sa/echo"
FOLLOW_S = 5.0  # a policy change reaches the server's connections within this


def _ok(cp: Any, method: str, path: str, body: Any = None) -> Any:
    status, data = cp.call(method, path, body, ADMIN)
    assert status < 300, f"expected {method} {path} to succeed, got {status}: {data}"
    return data


@contextlib.contextmanager
def _process(cmd: list[str], log: Path, env: dict[str, str] | None = None, stdout: int | None = None) -> Iterator[subprocess.Popen[str]]:
    """A process stopped on the way out, whatever happened inside."""
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=stdout if stdout is not None else err, stderr=err,
                                text=True, env={**os.environ, **(env or {})})
        try:
            yield proc
        finally:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    if proc.stdin:
                        proc.stdin.close()
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


class Mesh:
    def __init__(self, cp: Any, workdir: Path, stack: contextlib.ExitStack) -> None:
        self.cp = cp
        self.workdir = workdir
        self.stack = stack
        identity = _ok(cp, "GET", "/v1/identity")
        self.enrol_port = identity["enrolment_port"]
        status, pem = cp.call("GET", "/v1/identity/bundle", headers=ADMIN)
        assert status == 200, f"expected the trust bundle, got {status}: {pem}"
        self.bundle = workdir / "bundle.pem"
        self.bundle.write_text(str(pem))

    def certificates(self, service: str, node: str) -> Path:
        """``meshpilot identity-files`` keeping ``node``'s certificate for ``service``; its directory."""
        token = self.workdir / f"{node}.token"
        token.write_text(_ok(self.cp, "POST", "/v1/identity/tokens", {"namespace": "default", "service": service})["secret"])
        out = self.workdir / f"{node}-certs"
        proc = self.stack.enter_context(_process(
            [str(VENV_BIN / "meshpilot"), "identity-files", "--out", str(out), "--control-plane", f"127.0.0.1:{self.cp.xds_port}",
             "--node-id", node, "--join-token-file", str(token), "--trust-bundle", str(self.bundle),
             "--enrol-port", str(self.enrol_port)],
            self.workdir / f"{node}-identity-files.log"))
        wait_until(lambda: all((out / f).exists() for f in ("key.pem", "cert.pem", "bundle.pem")) or proc.poll() is not None,
                   30, what=f"{node}'s workload certificate files")
        assert proc.poll() is None, f"identity-files for {node} exited: {(self.workdir / f'{node}-identity-files.log').read_text()[-2000:]}"
        return out

    def bootstrap(self, node: str, service: str, certs: Path, metadata: dict[str, Any] | None = None) -> Path:
        files = {"ca_certificate_file": str(certs / "bundle.pem"), "certificate_file": str(certs / "cert.pem"),
                 "private_key_file": str(certs / "key.pem")}
        path = self.workdir / f"{node}-bootstrap.json"
        path.write_text(json.dumps({
            "xds_servers": [{"server_uri": f"127.0.0.1:{self.cp.xds_port}",
                             "channel_creds": [{"type": "tls", "config": {**files, "refresh_interval": "1s"}}],
                             "server_features": ["xds_v3"]}],
            "node": {"id": node, "cluster": service, "locality": {"zone": ""},
                     "metadata": {"PROXYLESS": True, "IDENTITY": True, "SERVICE": service, "NAMESPACE": "default", **(metadata or {})}},
            "certificate_providers": {"mesh": {"plugin_name": "file_watcher", "config": {**files, "refresh_interval": "1s"}}},
            "server_listener_resource_name_template": TEMPLATE,
        }))
        return path

    def allow(self, service: str) -> None:
        _ok(self.cp, "PUT", "/v1/policies/AuthorizationPolicy/default/echo-callers",
            {"service": "echo", "action": "ALLOW", "rules": [{"from": [{"services": [service]}]}]})


@pytest.fixture
def mesh() -> Iterator[Mesh]:
    workdir = tmpdir("meshpilot-proxyless-server-")
    cfg = workdir / "cp.yaml"
    cfg.write_text(yaml.safe_dump({"identity": True, "token": TOKEN, "debounce_ms": 20, "hds_interval_s": 0.3}))
    with contextlib.ExitStack() as stack:
        cp = stack.enter_context(control_plane(workdir, extra=["--config", str(cfg)]))
        _ok(cp, "POST", "/v1/services", {"name": "echo", "ports": [{"name": "grpc", "port": SERVICE_PORT, "protocol": "grpc"}]})
        for name, port in (("a", 50061), ("c", 50062)):
            _ok(cp, "POST", "/v1/services", {"name": name, "ports": [{"name": "grpc", "port": port, "protocol": "grpc"}]})
        yield Mesh(cp, workdir, stack)


def _serve_echo(mesh: Mesh, gen: Path) -> None:
    """The echo instance (registered with its SPIFFE id) and its xDS-enabled grpcio server, serving."""
    port = free_port()
    _ok(mesh.cp, "POST", "/v1/services/default/echo/instances",
        {"id": "echo-xds", "address": "127.0.0.1", "ports": {"grpc": port}, "metadata": {"spiffe": ECHO_ID}})
    certs = mesh.certificates("echo", "echo-1")
    boot = mesh.bootstrap("echo-1", "echo", certs, {"GRPC_SERVER_ADDRESSES": [f"127.0.0.1:{port}"]})
    server = mesh.stack.enter_context(_process(
        [sys.executable, str(HERE / "xds_server.py"), str(gen), f"127.0.0.1:{port}", "echo-xds"],
        mesh.workdir / "xds-server.stderr", {"GRPC_XDS_BOOTSTRAP": str(boot)}, stdout=subprocess.PIPE))
    assert server.stdout is not None
    assert server.stdout.readline().strip() == "serving", f"expected the xDS server to bind: {_tail(mesh.workdir / 'xds-server.stderr')}"


def _outcomes(log: CallLog, since: float) -> list[str]:
    return log.since(since)


def _tail(path: Path) -> str:
    return path.read_text()[-2000:] if path.exists() else "(no file)"


def test_proxyless_server_enforces_authorization_policy_by_caller_certificate(mesh: Mesh, echo_gen: Path) -> None:  # noqa: F811
    cp, workdir = mesh.cp, mesh.workdir
    mesh.allow("a")
    _serve_echo(mesh, echo_gen)

    logs: dict[str, CallLog] = {}
    for service in ("a", "c"):
        certs = mesh.certificates(service, f"{service}-1")
        boot = mesh.bootstrap(f"{service}-1", service, certs)
        cmd = [sys.executable, str(HERE / "client.py"), str(echo_gen), f"echo:{SERVICE_PORT}", "120", "xds-creds"]
        logs[service] = mesh.stack.enter_context(client(cmd, boot, workdir, f"client-{service}"))

    def stderr(service: str) -> str:
        return f"client {service}: {_tail(workdir / f'client-{service}.stderr')}\nserver: {_tail(workdir / 'xds-server.stderr')}"

    # "a" is allowed: its calls are answered over mTLS; "c" has a valid certificate of another service
    start = time.time()
    wait_until(lambda: _outcomes(logs["a"], start).count("echo-xds") >= 20 or logs["a"].proc.poll() is not None, 60,
               what="20 calls from a answered by the xDS server")
    assert _outcomes(logs["a"], start).count("echo-xds") >= 20, f"expected a's calls answered, got {logs['a'].calls[-5:]}\n{stderr('a')}"
    wait_until(lambda: _outcomes(logs["c"], start).count("error:PERMISSION_DENIED") >= 10 or logs["c"].proc.poll() is not None, 30,
               what="10 calls from c refused with PERMISSION_DENIED")
    refused = _outcomes(logs["c"], start)
    assert refused.count("error:PERMISSION_DENIED") >= 10 and "echo-xds" not in refused, \
        f"expected every call from c refused with PERMISSION_DENIED, got {refused[-10:]}\n{stderr('c')}"

    # the policy now allows "c" instead: within seconds c's calls are answered and a's refused
    changed = time.time()
    mesh.allow("c")
    wait_until(lambda: "echo-xds" in _outcomes(logs["c"], changed), FOLLOW_S, what=f"a call from c answered within {FOLLOW_S}s of the change")
    settled = time.time() + 1.0
    wait_until(lambda: len(_outcomes(logs["c"], settled)) >= 20 and len(_outcomes(logs["a"], settled)) >= 20, 30,
               what="20 calls from each client after the change settled")
    after_c, after_a = _outcomes(logs["c"], settled), _outcomes(logs["a"], settled)
    assert set(after_c) == {"echo-xds"}, f"expected every call from c answered after the change, got {sorted(set(after_c))}\n{stderr('c')}"
    assert set(after_a) == {"error:PERMISSION_DENIED"}, f"expected every call from a refused after the change, got {sorted(set(after_a))}\n{stderr('a')}"
    # once the server served, no call failed but by the rules: the change drains connections, it breaks none
    served = min(ts for ts, o in list(logs["a"].calls) if o == "echo-xds")
    for service, log in logs.items():
        other = [o for o in _outcomes(log, served) if o.startswith("error:") and o != "error:PERMISSION_DENIED"]
        assert not other, f"expected no call from {service} failed but by PERMISSION_DENIED once the server served, got {other[:5]}\n{stderr(service)}"
    first = min(ts for ts, o in list(logs["c"].calls) if ts >= changed and o == "echo-xds")
    print(f"policy change followed by c's first answered call in {first - changed:.3f}s")


def test_sidecars_reach_a_proxyless_server_over_mtls_under_its_authorization_policy(mesh: Mesh, echo_gen: Path) -> None:  # noqa: F811
    """Enrolled sidecars (the real agent and Envoy) call the same server: their clusters talk mTLS to
    the echo instance (it has an identity), and the server's RBAC knows them by their certificates."""
    from tests.e2e.test_mtls_mesh import Node

    mesh.allow("sa")
    _serve_echo(mesh, echo_gen)
    if str(echo_gen) not in sys.path:
        sys.path.insert(0, str(echo_gen))
    import echo_pb2
    import echo_pb2_grpc

    def outcome(node: Any) -> str:
        # gRPC through the sidecar's outbound listener, by the service's mesh name
        with grpc.insecure_channel(f"127.0.0.1:{node.outbound}", options=[("grpc.default_authority", f"echo:{SERVICE_PORT}")]) as ch:
            try:
                return str(echo_pb2_grpc.EchoStub(ch).Call(echo_pb2.EchoRequest(message="hi"), timeout=5).server)
            except grpc.RpcError as exc:
                return f"error:{exc.code().name}"

    nodes: dict[str, Any] = {}
    try:
        for name in ("sa", "sc"):
            nodes[name] = Node(mesh.workdir, mesh.cp, name, mesh.bundle, mesh.enrol_port)
        wait_until(lambda: outcome(nodes["sa"]) == "echo-xds", 30, what="sa's sidecar → the proxyless server answered")
        # sc's sidecar has its routes once it gets an answer of the server's (UNAVAILABLE until then)
        wait_until(lambda: outcome(nodes["sc"]) != "error:UNAVAILABLE", 30, what="sc's sidecar → an answer of the proxyless server")
        got = [outcome(nodes["sa"]) for _ in range(5)] + [outcome(nodes["sc"]) for _ in range(5)]
        assert got == ["echo-xds"] * 5 + ["error:PERMISSION_DENIED"] * 5, \
            f"expected sa's calls answered and sc's refused by the server's RBAC, got {got}\n{_tail(mesh.workdir / 'xds-server.stderr')}"
        mesh.allow("sc")
        wait_until(lambda: outcome(nodes["sc"]) == "echo-xds", FOLLOW_S, what=f"sc answered within {FOLLOW_S}s of the change")
        assert outcome(nodes["sa"]) == "error:PERMISSION_DENIED", "expected sa refused once the policy allows only sc"
    finally:
        for n in nodes.values():
            n.close()
