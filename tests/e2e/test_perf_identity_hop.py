"""`meshpilot perf route`'s identity hop in real Envoy 1.40: the mTLS scenarios really talk mutual TLS
with the product's contexts (the callee learns the caller's SPIFFE id; a callee whose certificate the
mesh CA did not issue gets no request through), a connection per request really handshakes per
request, and resumption is on in (m) and off in (n)."""

from __future__ import annotations

import contextlib
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from meshpilot.perf import route
from meshpilot.wasm import testbed as tb


class _Echo(BaseHTTPRequestHandler):
    """Answers 200 with the x-mesh-caller header it got (or "-")."""

    def do_GET(self) -> None:
        body = (self.headers.get("x-mesh-caller") or "-").encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def backend() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def certs() -> route.MeshCerts:
    return route.mesh_certs()


@contextlib.contextmanager
def hop(name: str, backend: int, certs: route.MeshCerts) -> Iterator[tuple[str, tb.Envoy]]:
    port, callee_port = tb.free_port(), tb.free_port()
    caller_boot, callee_boot = route.hop_bootstraps(name, port, callee_port, backend, certs)
    with tb.Envoy(callee_boot, callee_port, log_level="warn"), tb.Envoy(caller_boot, port, log_level="warn") as caller:
        yield f"http://127.0.0.1:{port}/", caller


def get(url: str, caller_header: str = "") -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"x-mesh-caller": caller_header} if caller_header else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def test_mtls_hop_carries_the_callers_spiffe_id(backend: int, certs: route.MeshCerts) -> None:
    with hop("k_hop_mtls", backend, certs) as (url, caller):
        status, body = get(url, caller_header="forged")
        assert (status, body) == (200, route._CALLER_ID), f"expected the callee to stamp the caller's SPIFFE id, got {status} {body!r}"
        assert caller.stats("cluster.callee.ssl.handshake").get("cluster.callee.ssl.handshake", 0) >= 1, "expected a TLS handshake"
    with hop("j_hop_plain", backend, certs) as (url, _caller):
        assert get(url, caller_header="forged") == (200, "-"), "expected plaintext to strip x-mesh-caller"


def test_mtls_hop_refuses_a_callee_the_mesh_ca_did_not_issue(backend: int, certs: route.MeshCerts) -> None:
    other = route.mesh_certs()
    mixed = route.MeshCerts(caller_chain=certs.caller_chain, caller_key=certs.caller_key,
                            callee_chain=other.callee_chain, callee_key=other.callee_key, bundle=certs.bundle)
    with hop("k_hop_mtls", backend, mixed) as (url, caller):
        status, body = get(url)
        assert status == 503, f"expected the caller to refuse a callee certificate from another CA, got {status} {body!r}"
        errors = caller.stats("cluster.callee.ssl.fail_verify")
        assert sum(errors.values()) >= 1, f"expected a verification failure in the caller's stats, got {errors}"


@pytest.mark.parametrize("name, resumed", [("m_hop_mtls_per_request", True), ("n_hop_mtls_full_handshake", False)])
def test_a_handshake_per_request(backend: int, certs: route.MeshCerts, name: str, resumed: bool) -> None:
    with hop(name, backend, certs) as (url, caller):
        for _ in range(4):
            assert get(url)[0] == 200
        stats = caller.stats("cluster.callee.")
        got = (stats.get("cluster.callee.upstream_cx_total"), stats.get("cluster.callee.ssl.handshake"))
        assert got == (4, 4), f"{name}: expected 4 connections and 4 handshakes for 4 requests, got {got}"
        reused = stats.get("cluster.callee.ssl.session_reused", 0)
        assert (reused >= 3) if resumed else (reused == 0), f"{name}: unexpected resumed handshakes {reused}"
