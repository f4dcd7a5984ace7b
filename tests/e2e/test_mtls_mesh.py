"""Identity on, the whole way: a control plane, enrolled sidecars (key made on the node, join
token, certificate over SDS), real Envoys talking mutual TLS, and the modes and policies an operator
sets. Callers: ``a`` and ``c`` (mesh apps with sidecars) and the test itself as a plaintext client.
"""

from __future__ import annotations

import contextlib
from http import client as httpc
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshpilot.pki import spiffe_id
from tests.e2e.test_sidecar import App, spec_doc
from tests.support import VENV_BIN, control_plane, free_port, http, wait_until

TOKEN = "admin-secret"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
A_ID = spiffe_id("mesh.local", "default", "a")
C_ID = spiffe_id("mesh.local", "default", "c")


class Node:
    """An enrolled sidecar (the real agent) in front of a real app."""

    def __init__(self, workdir: Path, cp: Any, name: str, bundle: Path, enrol_port: int) -> None:
        self.name = name
        self.app = App(name)
        self.inbound, self.outbound = free_port(), free_port()
        self.dir = workdir / name
        self.dir.mkdir()
        status, body = cp.call("POST", "/v1/identity/tokens", {"namespace": "default", "service": name}, ADMIN)
        assert status == 201, (status, body)
        token = self.dir / "join-token"
        token.write_text(body["secret"])
        spec = self.dir / "spec.yaml"
        spec.write_text(yaml.safe_dump(spec_doc(name, self.app.port, self.inbound, self.outbound)))
        self.ready = self.dir / "ready.json"
        self.log = self.dir / "agent.log"
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "meshpilot"), "sidecar", "--spec", str(spec), "--control-plane", f"127.0.0.1:{cp.xds_port}",
             "--api", cp.api, "--token", TOKEN, "--node-id", f"{name}-1", "--workdir", str(self.dir),
             "--ready-file", str(self.ready), "--join-token-file", str(token), "--trust-bundle", str(bundle),
             "--enrol-port", str(enrol_port)],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
        )
        wait_until(lambda: self.ready.exists() or self.proc.poll() is not None, 30, what=f"{name} ready file")
        if self.proc.poll() is not None:
            raise AssertionError(f"sidecar {name} exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(Exception):
            pid = json.loads(self.ready.read_text())["envoy_pid"]
            if pid:
                os.kill(pid, signal.SIGKILL)
        self.app.close()


@contextlib.contextmanager
def _mesh(tmp_path: Path, names: tuple[str, ...], **settings: Any) -> Iterator[dict[str, Any]]:
    cfg = tmp_path / "cp.yaml"
    cfg.write_text(yaml.safe_dump({"identity": True, "token": TOKEN, "debounce_ms": 20, "hds_interval_s": 0.3, **settings}))
    with control_plane(tmp_path, extra=["--config", str(cfg)]) as cp:
        status, body = cp.call("GET", "/v1/identity", headers=ADMIN)
        assert status == 200, (status, body)
        enrol_port = int(body["enrolment_port"])
        status, bundle = cp.call("GET", "/v1/identity/bundle", headers=ADMIN)
        assert status == 200, (status, bundle)
        bundle_file = tmp_path / "bundle.pem"
        bundle_file.write_text(str(bundle))
        nodes: dict[str, Any] = {"cp": cp}
        try:
            for name in names:
                nodes[name] = Node(tmp_path, cp, name, bundle_file, enrol_port)
            for name in names:
                if name != "b":
                    wait_until(lambda n=name: _call(nodes[n], "b")[0] == 200, 30, what=f"{name} → b through the mesh")
            yield nodes
        finally:
            for name in names:
                if name in nodes:
                    nodes[name].close()


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[dict[str, Any]]:
    with _mesh(tmp_path, ("a", "b", "c")) as nodes:
        yield nodes


def _call(node: Node, host: str, path: str = "/work", headers: dict[str, str] | None = None, conn: httpc.HTTPConnection | None = None) -> tuple[int, Any]:
    """GET through ``node``'s outbound listener; on ``conn`` (kept open) when given."""
    own = conn is None
    c = conn or httpc.HTTPConnection("127.0.0.1", node.outbound, timeout=5)
    try:
        c.request("GET", path, headers={"Host": host, **(headers or {})})
        r = c.getresponse()
        raw = r.read()
        try:
            return r.status, json.loads(raw)
        except ValueError:
            return r.status, raw.decode(errors="replace")
    except OSError as exc:
        return 0, repr(exc)
    finally:
        if own:
            c.close()


def _direct(node: Node, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """A plaintext client straight to ``node``'s inbound listener (no sidecar, no certificate)."""
    try:
        status, body, _ = http("GET", f"http://127.0.0.1:{node.inbound}/direct", headers=headers, timeout=5)
        return status, body
    except OSError as exc:
        return 0, repr(exc)


def _policy(cp: Any, kind: str, doc: dict[str, Any]) -> None:
    status, body = cp.call("PUT", f"/v1/policies/{kind}/default/{doc['name']}", doc, ADMIN)
    assert status in (200, 201), (status, body)


def test_permissive_mesh_calls_carry_the_callers_certificate_and_plaintext_still_enters(mesh: dict[str, Any]) -> None:
    a, b = mesh["a"], mesh["b"]
    status, body = _call(a, "b", headers={"x-mesh-caller": "admin"})
    assert status == 200, (status, body)
    assert body["headers"].get("x-mesh-caller") == A_ID, \
        f"expected b to see a's SPIFFE id from its certificate (the app's forged 'admin' overwritten), got {body['headers']}"
    instances = mesh["cp"].call("GET", "/v1/services/default/b/instances", headers=ADMIN)[1]
    assert [i["metadata"].get("spiffe") for i in instances] == [spiffe_id("mesh.local", "default", "b")], instances
    status, body = _direct(b, {"x-mesh-caller": A_ID})
    assert status == 200, f"PERMISSIVE must let a plaintext caller in, got {status} {body}"
    assert "x-mesh-caller" not in body["headers"], f"a plaintext caller's x-mesh-caller must be stripped, got {body['headers']}"


def test_strict_refuses_plaintext_and_keeps_mesh_calls_and_health(mesh: dict[str, Any]) -> None:
    cp, a, b = mesh["cp"], mesh["a"], mesh["b"]
    _policy(cp, "MtlsPolicy", {"name": "b-strict", "service": "b", "mode": "STRICT"})
    wait_until(lambda: _direct(b)[0] != 200, 10, what="b refusing plaintext after STRICT")
    status, body = _direct(b, {"x-mesh-caller": A_ID})
    assert status in (0, 403), f"STRICT must refuse a plaintext caller, got {status} {body}"
    served = b.app.served
    for _ in range(20):
        status, body = _call(a, "b")
        assert status == 200, f"a's mTLS call to b failed under STRICT: {status} {body}"
    assert b.app.served == served + 20, "every mesh call should have reached b's app"
    time.sleep(1.5)  # a few health-check rounds (0.3 s) through the local plaintext chain
    inst = cp.call("GET", "/v1/instances/b-1", headers=ADMIN)[1]
    assert inst["routable"] and inst["health"] == "passing", f"b's own health checks must pass under STRICT, got {inst}"


def test_authorization_policy_denies_another_service_then_allows_it_on_an_open_connection(mesh: dict[str, Any]) -> None:
    cp, a, c = mesh["cp"], mesh["a"], mesh["c"]
    _policy(cp, "AuthorizationPolicy", {"name": "b-from-a", "service": "b", "action": "ALLOW",
                                        "rules": [{"from": [{"services": ["a"]}]}]})
    wait_until(lambda: _call(c, "b")[0] == 403, 10, what="c denied by b's ALLOW policy")
    assert _call(a, "b")[0] == 200, "a is allowed by the policy"
    conn = httpc.HTTPConnection("127.0.0.1", c.outbound, timeout=5)
    try:
        assert _call(c, "b", conn=conn)[0] == 403, "c is denied on the open connection too"
        _policy(cp, "AuthorizationPolicy", {"name": "b-from-a", "service": "b", "action": "ALLOW",
                                            "rules": [{"from": [{"services": ["a", "c"]}]}]})
        t0 = time.monotonic()
        while _call(c, "b", conn=conn)[0] != 200:
            assert time.monotonic() - t0 < 1.0, "c still denied a second after the rule allowed it"
            time.sleep(0.02)
    finally:
        conn.close()
    _policy(cp, "AuthorizationPolicy", {"name": "b-deny-c", "service": "b", "action": "DENY",
                                        "rules": [{"from": [{"principals": [C_ID]}]}]})
    wait_until(lambda: _call(c, "b")[0] == 403, 10, what="c denied again: a DENY comes before an ALLOW")
    assert _call(a, "b")[0] == 200
    stats = http("GET", f"http://127.0.0.1:{json.loads(mesh['b'].ready.read_text())['admin_port']}/stats?filter=rbac", timeout=5)[1]
    assert "denied" in str(stats), f"expected b's Envoy to count denials, got {stats}"


def test_workload_and_root_rotation_under_steady_load_fail_no_request(tmp_path: Path) -> None:
    """Certificates of 20 s (renewed every 10 s) and a root rotated while a calls b without pause."""
    from tests.e2e.test_sidecar import Loop

    with _mesh(tmp_path, ("a", "b"), workload_cert_ttl_s=20) as nodes:
        cp, a = nodes["cp"], nodes["a"]
        old = [r["serial"] for r in cp.call("GET", "/v1/identity/roots", headers=ADMIN)[1]]
        assert len(old) == 1, old
        with Loop(a.outbound, period=0.01) as loop:
            time.sleep(12)  # at least one workload renewal of each node under load
            status, added = cp.call("POST", "/v1/identity/roots", {}, ADMIN)
            assert status in (200, 201), (status, added)
            new = next(r["serial"] for r in cp.call("GET", "/v1/identity/roots", headers=ADMIN)[1] if r["serial"] not in old)
            status, body = cp.call("POST", f"/v1/identity/roots/{new}/activate", {}, ADMIN)
            assert status == 200, (status, body)
            # the old root can go once every node renewed under the new one (refused before that)
            wait_until(lambda: cp.call("DELETE", f"/v1/identity/roots/{old[0]}", headers=ADMIN)[0] == 200, 30,
                       what="the old root removable once both nodes renewed under the new one")
            time.sleep(4)  # traffic and health checks with only the new root trusted
        roots = cp.call("GET", "/v1/identity/roots", headers=ADMIN)[1]
        assert [r["serial"] for r in roots] == [new], roots
        failed = [r for r in loop.results if r[1] != 200]
        assert len(loop.results) > 200 and not failed, \
            f"expected no failed request across renewals and a root rotation, got {len(failed)} of {len(loop.results)}: {failed[:5]}"
        inst = cp.call("GET", "/v1/instances/b-1", headers=ADMIN)[1]
        assert inst["health"] == "passing", inst
        for name in ("a", "b"):
            renewals = nodes[name].log.read_text().count("event=renewed")
            assert renewals >= 2, f"expected {name} to renew at least twice (before and after the new root signs), got {renewals}"
