"""meshdns fed by the real control plane over delta ADS.

Starts ``meshpilot serve`` (SQLite store in a temporary directory) and a ``meshpilot meshdns`` pointed at its xDS
port, registers services through the management API and checks that DNS follows (new names answered, deleted ones
NXDOMAIN; how fast is measured by the propagation benchmarks in perf/, not bounded here, where a loaded CI
machine would make a bound a coin toss), that the
table survives a control-plane outage, and that a restarted meshdns answers from its state file before any
control plane is reachable.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from pathlib import Path

import dns.message
import dns.query
import dns.rcode

from tests.support import control_plane

ROOT = Path(__file__).resolve().parents[2]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_meshdns(tmp: Path, xds_port: int, state: Path) -> tuple[subprocess.Popen[bytes], int]:
    log = open(tmp / f"meshdns-{secrets.token_hex(3)}.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshpilot.cli", "meshdns", "--listen", "127.0.0.1:0", "--control-plane",
         f"127.0.0.1:{xds_port}", "--node-id", "node-a", "--state-file", str(state), "--upstream", "127.0.0.1:9"],
        stdout=subprocess.PIPE, stderr=log, cwd=ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("meshdns listening"):
        _stop(proc)
        raise AssertionError(f"meshdns did not start: {line!r}; log: {Path(log.name).read_text()[-2000:]}")
    return proc, int(line.rsplit(":", 1)[1])


def query(port: int, name: str, rdtype: str = "A") -> dns.message.Message:
    return dns.query.udp(dns.message.make_query(name, rdtype), "127.0.0.1", port=port, timeout=1)


def wait_for_answer(port: int, name: str, timeout: float) -> tuple[str | None, float]:
    """Poll until ``name`` resolves; returns (address or None, seconds waited)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        r = query(port, name)
        if r.rcode() == dns.rcode.NOERROR and r.answer:
            return r.answer[0][0].to_text(), time.monotonic() - t0
        time.sleep(0.01)  # polling interval of the observer, not a readiness wait
    return None, time.monotonic() - t0


def register(cp: object, name: str, ns: str = "default") -> None:
    status, body = cp.call("POST", "/v1/services", {  # type: ignore[attr-defined]
        "name": name, "namespace": ns, "ports": [{"name": "http", "port": 8080, "protocol": "http"}]})
    assert status in (200, 201), f"registering {name}.{ns}: expected 200/201, got {status} {body}"


def test_table_follows_registry(tmp_path: Path) -> None:
    workdir = tmp_path
    state = workdir / "meshdns-state.json"
    with control_plane(workdir) as cp:
        register(cp, "web")
        proc, port = start_meshdns(workdir, cp.xds_port, state)
        try:
            addr, _ = wait_for_answer(port, "web.default.svc.mesh", 10)
            assert addr and addr.startswith("240.240."), f"expected a VIP from 240.240.0.0/16, got {addr}"
            t0 = time.monotonic()
            register(cp, "orders", "shop")
            addr2, _ = wait_for_answer(port, "orders.shop.svc.mesh", 10)
            took = time.monotonic() - t0
            assert addr2 and addr2 != addr, f"expected a second, different VIP within 10 s, got {addr2} after {took:.3f}s"
            srv = query(port, "_http._tcp.orders.shop.svc.mesh", "SRV")
            assert srv.answer and srv.answer[0][0].port == 8080, f"expected SRV port 8080, got {srv.answer}"

            status, body = cp.call("DELETE", "/v1/services/shop/orders")
            assert status in (200, 204), f"delete: got {status} {body}"
            deadline = time.monotonic() + 10.0
            while query(port, "orders.shop.svc.mesh").rcode() != dns.rcode.NXDOMAIN:
                assert time.monotonic() < deadline, "expected NXDOMAIN within 10 s of deleting the service"
                time.sleep(0.01)
            assert state.exists(), "the table must be persisted"
        except BaseException:
            _stop(proc)
            raise
    # control plane gone: the table is still served
    try:
        r = query(port, "web.default.svc.mesh")
        assert r.answer and r.answer[0][0].to_text() == addr, f"expected {addr} during the outage, got {r.answer}"
    finally:
        _stop(proc)
    # restart meshdns with no control plane reachable: it answers from the state file
    proc, port = start_meshdns(workdir, cp.xds_port, state)
    try:
        r = query(port, "web.default.svc.mesh")
        assert r.answer and r.answer[0][0].to_text() == addr, f"expected {addr} from the state file, got {r}"
        assert query(port, "orders.shop.svc.mesh").rcode() == dns.rcode.NXDOMAIN, "deleted service stays deleted"
    finally:
        _stop(proc)
