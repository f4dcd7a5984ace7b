"""Sidecars end to end: real control plane, real `meshpilot sidecar` agents running real Envoys, real
HTTP apps on 127.0.0.1.

Lossless rolling of a service under a steady client loop, health checks that keep a failing app out
of EDS (with the removal time measured against its bound), kill -9 of a sidecar, an Envoy crash
that the agent repairs without re-registration churn, and the agent's meshdns fed by the same
control plane.
"""

from __future__ import annotations

import contextlib
import http.server as httpserver
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import VENV_BIN, EnvoyProc, control_plane, free_port, http, through, wait_until

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HDS_INTERVAL = 0.3
CRITICAL_AFTER = 1.5
REMOVE_AFTER = 3.0
CHECK_INTERVAL = 0.3
CHECK_TIMEOUT = 0.3
UNHEALTHY = 2


class App:
    """A real HTTP app: answers JSON {server, path, headers}; /healthz fails until ``warm`` and
    while ``failing``. Requests that are not health checks but arrive before the app's first
    successful health check are recorded as served-too-early."""

    def __init__(self, name: str, warmup_s: float = 0.0) -> None:
        self.name = name
        self.failing = False
        self.ready_at = time.monotonic() + warmup_s
        self.first_healthy: float | None = None
        self.too_early = 0
        self.served = 0
        app = self

        class H(httpserver.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                now = time.monotonic()
                if self.path == "/healthz":
                    ok = not app.failing and now >= app.ready_at
                    if ok and app.first_healthy is None:
                        app.first_healthy = now
                    status = 200 if ok else 503
                else:
                    app.served += 1
                    if app.first_healthy is None:
                        app.too_early += 1
                    status = 200
                body = json.dumps({"server": app.name, "path": self.path,
                                   "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: Any) -> None:
                pass

        class S(httpserver.ThreadingHTTPServer):
            daemon_threads = True

        self.srv = S(("127.0.0.1", 0), H)
        self.port = self.srv.server_address[1]
        self.thread = threading.Thread(target=self.srv.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


@contextlib.contextmanager
def app(name: str, warmup_s: float = 0.0) -> Iterator[App]:
    a = App(name, warmup_s)
    try:
        yield a
    finally:
        a.close()


def spec_doc(name: str, app_port: int, inbound: int, outbound: int, *, health: str = "/healthz", drain: str = "1s") -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "labels": {"version": "v1"}},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": app_port}]},
        "mesh": {
            "healthCheck": {"http": {"path": health}, "interval": f"{CHECK_INTERVAL}s", "timeout": f"{CHECK_TIMEOUT}s",
                            "healthyThreshold": 1, "unhealthyThreshold": UNHEALTHY},
            "drainTime": drain, "syncTimeout": "5s",
            "sidecar": {"adminPort": 0, "inboundPort": inbound, "outboundPort": outbound},
            "dns": {"enabled": False},  # several sidecars share this machine; the meshdns test turns it on
        },
    }


class Sidecar:
    def __init__(self, workdir: Path, name: str, doc: dict[str, Any], cp: Any, node_id: str) -> None:
        self.dir = workdir / node_id
        self.dir.mkdir(parents=True, exist_ok=True)
        self.node_id = node_id
        self.spec = self.dir / "spec.yaml"
        self.spec.write_text(yaml.safe_dump(doc))
        self.ready = self.dir / "ready.json"
        self.log = self.dir / "agent.log"
        self.inbound = doc["mesh"]["sidecar"]["inboundPort"]
        self.outbound = doc["mesh"]["sidecar"]["outboundPort"]
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "meshpilot"), "sidecar", "--spec", str(self.spec),
             "--control-plane", f"127.0.0.1:{cp.xds_port}", "--api", cp.api, "--token", TOKEN,
             "--node-id", node_id, "--workdir", str(self.dir), "--ready-file", str(self.ready), "--log-level", "info"],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
        )
        wait_until(lambda: self.ready.exists() or self.proc.poll() is not None, 20, what=f"{node_id} ready file")
        if self.proc.poll() is not None:
            raise AssertionError(f"sidecar {node_id} exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")

    def info(self) -> dict[str, Any]:
        return json.loads(self.ready.read_text())

    def admin(self, path: str) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.info()['admin_port']}{path}", timeout=5) as r:
            return r.read().decode()

    def hosts(self, cluster: str) -> set[str]:
        out = set()
        for line in self.admin("/clusters").splitlines():
            parts = line.split("::")
            if len(parts) >= 4 and parts[0] == cluster and parts[2] == "health_flags":
                out.add(parts[1])
        return out

    def terminate(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"sidecar {self.node_id} did not stop within {timeout}s:\n{self.log.read_text()[-3000:]}")
        return self.proc.returncode

    def kill(self) -> None:
        """kill -9 of the agent and its Envoy, as a crashed VM would."""
        pids = []
        with contextlib.suppress(Exception):
            pids.append(self.info()["envoy_pid"])
        pids.append(self.proc.pid)
        for pid in pids:
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(AssertionError):
                self.terminate(10)
        # never leave an Envoy behind
        with contextlib.suppress(Exception):
            pid = self.info()["envoy_pid"]
            if pid:
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def sidecar(workdir: Path, name: str, doc: dict[str, Any], cp: Any, node_id: str) -> Iterator[Sidecar]:
    s = Sidecar(workdir, name, doc, cp, node_id)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[Any]:
    cfg = tmp_path / "cp.yaml"
    cfg.write_text(yaml.safe_dump({
        "hds_interval_s": HDS_INTERVAL, "hds_critical_after_s": CRITICAL_AFTER, "hds_remove_after_s": REMOVE_AFTER,
        "debounce_ms": 20, "token": TOKEN,
    }))
    with control_plane(tmp_path, extra=["--config", str(cfg)]) as c:
        yield c


B_CLUSTER = "outbound|80||b.default.svc.mesh"


def instance(cp: Any, iid: str) -> dict[str, Any] | None:
    status, body = cp.call("GET", f"/v1/instances/{iid}", headers=AUTH)
    return body if status == 200 else None


def routable(cp: Any, iid: str) -> bool:
    i = instance(cp, iid)
    return bool(i and i["routable"])


class Loop:
    """A steady client: GET http://b/ through A's outbound listener every ``period`` seconds."""

    def __init__(self, port: int, period: float = 0.02) -> None:
        self.port = port
        self.period = period
        self.results: list[tuple[float, int, str]] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        nxt = time.monotonic()
        while not self._stop.is_set():
            try:
                status, body = through(self.port, "b", "/work", timeout=5)
                server = body.get("server", "") if isinstance(body, dict) else str(body)[:80]
            except Exception as exc:  # noqa: BLE001 - a failed request is a result
                status, server = 0, repr(exc)
            self.results.append((time.monotonic(), status, server))
            nxt += self.period
            time.sleep(max(0.0, nxt - time.monotonic()))

    def __enter__(self) -> Loop:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self.thread.join(10)


def test_rolling_b_three_times_loses_no_request(cp: Any, tmp_path: Path) -> None:
    apps: list[App] = []
    with contextlib.ExitStack() as stack:
        a_app = stack.enter_context(app("a"))
        a = stack.enter_context(sidecar(tmp_path, "a", spec_doc("a", a_app.port, free_port(), free_port()), cp, "a-1"))
        wait_until(lambda: routable(cp, "a-1"), 15, what="a-1 routable")

        def start_b(n: int) -> Sidecar:
            b_app = stack.enter_context(app(f"b{n}", warmup_s=0.8))  # not ready at once: publish must wait
            apps.append(b_app)
            return stack.enter_context(sidecar(tmp_path, "b", spec_doc("b", b_app.port, free_port(), free_port()), cp, f"b-{n}"))

        current = start_b(0)
        wait_until(lambda: routable(cp, "b-0"), 15, what="b-0 routable")
        wait_until(lambda: through(a.outbound, "b", "/")[0] == 200, 10, what="a reaches b through the mesh")

        with Loop(a.outbound) as loop:
            time.sleep(0.5)
            for n in range(1, 4):
                new = start_b(n)
                wait_until(lambda: routable(cp, f"b-{n}"), 15, what=f"b-{n} routable")
                t0 = time.monotonic()
                assert current.terminate() == 0, f"sidecar {current.node_id} exited non-zero:\n{current.log.read_text()[-2000:]}"
                print(f"roll {n}: {current.node_id} offline in {time.monotonic() - t0:.2f}s")
                current = new
            time.sleep(0.5)

        results = loop.results
        failed = [r for r in results if r[1] != 200]
        servers = sorted({r[2] for r in results})
        print(f"client loop: {len(results)} requests, {len(failed)} failed, served by {servers}")
        assert len(results) > 100, f"expected a steady loop of more than 100 requests, got {len(results)}"
        assert not failed, f"expected zero failed requests, got {len(failed)}: {failed[:5]}"
        too_early = {x.name: x.too_early for x in apps if x.too_early}
        assert not too_early, f"expected no request served before an instance was healthy, got {too_early}"
        assert {"b1", "b2", "b3"} <= set(servers), f"expected the new instances to serve traffic, got {servers}"
        gone = [i["id"] for i in cp.call("GET", "/v1/services/default/b/instances", headers=AUTH)[1]]
        assert gone == ["b-3"], f"expected only b-3 registered after the rolls, got {gone}"


def test_failing_app_never_routable_and_failing_one_leaves_eds_in_bound(cp: Any, tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        a_app = stack.enter_context(app("a"))
        a = stack.enter_context(sidecar(tmp_path, "a", spec_doc("a", a_app.port, free_port(), free_port()), cp, "a-1"))
        bad_app = stack.enter_context(app("bad"))
        bad_app.failing = True
        stack.enter_context(sidecar(tmp_path, "b", spec_doc("b", bad_app.port, free_port(), free_port()), cp, "b-bad"))
        good_app = stack.enter_context(app("good"))
        good = stack.enter_context(sidecar(tmp_path, "b", spec_doc("b", good_app.port, free_port(), free_port()), cp, "b-good"))
        wait_until(lambda: routable(cp, "b-good"), 15, what="b-good routable")
        wait_until(lambda: a.hosts(B_CLUSTER) == {f"127.0.0.1:{good.inbound}"}, 10, what="a sees b-good")
        # the failing app has been checked many times by now
        deadline = time.monotonic() + 3 * (CHECK_INTERVAL + CHECK_TIMEOUT) + 1
        while time.monotonic() < deadline:
            bad = instance(cp, "b-bad")
            assert bad is not None and not bad["routable"] and not bad["ever_passed"], f"failing app became routable: {bad}"
            hosts = a.hosts(B_CLUSTER)
            assert hosts == {f"127.0.0.1:{good.inbound}"}, f"expected only b-good in a's EDS, got {hosts}"
            time.sleep(0.1)

        bound = CHECK_INTERVAL * UNHEALTHY + CHECK_TIMEOUT + HDS_INTERVAL + 0.5  # + push time
        t0 = time.monotonic()
        good_app.failing = True
        wait_until(lambda: not a.hosts(B_CLUSTER), bound + 3, interval=0.01, what="b-good gone from a's EDS")
        took = time.monotonic() - t0
        print(f"failing app left EDS after {took:.2f}s (bound {bound:.2f}s = interval {CHECK_INTERVAL} x {UNHEALTHY}"
              f" + timeout {CHECK_TIMEOUT} + report {HDS_INTERVAL} + push 0.5)")
        assert took <= bound, f"expected removal within {bound:.2f}s, took {took:.2f}s"
        # and it comes back when it recovers
        good_app.failing = False
        wait_until(lambda: a.hosts(B_CLUSTER) == {f"127.0.0.1:{good.inbound}"}, 10, what="b-good back in EDS")


def test_kill_9_then_unhealthy_then_removed_and_envoy_crash_without_churn(cp: Any, tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        a_app = stack.enter_context(app("a"))
        a = stack.enter_context(sidecar(tmp_path, "a", spec_doc("a", a_app.port, free_port(), free_port()), cp, "a-1"))
        b_app = stack.enter_context(app("b"))
        b = stack.enter_context(sidecar(tmp_path, "b", spec_doc("b", b_app.port, free_port(), free_port()), cp, "b-1"))
        wait_until(lambda: routable(cp, "b-1"), 15, what="b-1 routable")
        wait_until(lambda: a.hosts(B_CLUSTER), 10, what="a sees b-1")

        # Envoy crash: the agent restarts it; the instance never leaves EDS
        before = b.info()
        os.kill(before["envoy_pid"], signal.SIGKILL)
        t0 = time.monotonic()
        seen_hosts: list[set[str]] = []
        health: list[str] = []

        def restarted() -> bool:
            seen_hosts.append(a.hosts(B_CLUSTER))
            i = instance(cp, "b-1")
            health.append(i["health"] if i else "missing")
            info = b.info()
            return info["envoy_pid"] != before["envoy_pid"] and info["envoy_restarts"] >= 1 and through(a.outbound, "b", "/")[0] == 200

        wait_until(restarted, 20, what="envoy restarted by the agent and serving")
        print(f"envoy crash: restarted and serving after {time.monotonic() - t0:.2f}s")
        assert all(seen_hosts), f"b-1 left a's EDS during the Envoy restart: {seen_hosts}"
        assert set(health) == {"passing"}, f"expected b-1 to stay passing (no re-registration churn), got {sorted(set(health))}"

        # kill -9 of the whole sidecar: critical after the grace period, then removed
        b.kill()
        t0 = time.monotonic()
        wait_until(lambda: not routable(cp, "b-1"), CRITICAL_AFTER + 2, interval=0.05, what="b-1 critical")
        t_crit = time.monotonic() - t0
        wait_until(lambda: instance(cp, "b-1") is None, REMOVE_AFTER + 2, interval=0.05, what="b-1 removed")
        t_gone = time.monotonic() - t0
        print(f"kill -9: critical after {t_crit:.2f}s (configured {CRITICAL_AFTER}s), removed after {t_gone:.2f}s (configured {REMOVE_AFTER}s)")
        assert CRITICAL_AFTER - 0.1 <= t_crit <= CRITICAL_AFTER + 1.0, f"critical after {t_crit:.2f}s, expected ~{CRITICAL_AFTER}s"
        assert REMOVE_AFTER - 0.1 <= t_gone <= REMOVE_AFTER + 1.0, f"removed after {t_gone:.2f}s, expected ~{REMOVE_AFTER}s"
        wait_until(lambda: not a.hosts(B_CLUSTER), 3, what="b-1 gone from a's EDS")


# How long the client keeps calling after a kill -9 (`MESHPILOT_E2E_KILL_WATCH_S=60` makes the full run),
# and hds_dead_after_s (default 5; a value above 45 shows the behaviour without the fast path).
KILL_WATCH_S = float(os.environ.get("MESHPILOT_E2E_KILL_WATCH_S", "10"))
DEAD_AFTER = float(os.environ.get("MESHPILOT_E2E_DEAD_AFTER_S", "5"))


def test_kill_9_of_one_of_two_leaves_eds_within_seconds_and_loses_no_request(tmp_path: Path) -> None:
    """With the default 45 s grace for a lost health stream: a sidecar whose health and ADS streams
    both closed (agent, Envoy and app killed) leaves EDS within ``DEAD_AFTER`` s, long before outlier
    detection's 30 s ejection ends, so callers never route to it again; one whose Envoy the agent
    restarts is not flapped."""
    cfg = tmp_path / "cp.yaml"
    cfg.write_text(yaml.safe_dump({"hds_interval_s": HDS_INTERVAL, "hds_dead_after_s": DEAD_AFTER, "debounce_ms": 20, "token": TOKEN}))
    with contextlib.ExitStack() as stack:
        cp = stack.enter_context(control_plane(tmp_path, extra=["--config", str(cfg)]))
        a_app = stack.enter_context(app("a"))
        a = stack.enter_context(sidecar(tmp_path, "a", spec_doc("a", a_app.port, free_port(), free_port()), cp, "a-1"))
        apps = [stack.enter_context(app(f"b{n}")) for n in (1, 2)]
        bs = [stack.enter_context(sidecar(tmp_path, "b", spec_doc("b", x.port, free_port(), free_port()), cp, f"b-{n}"))
              for n, x in zip((1, 2), apps)]
        both = {f"127.0.0.1:{b.inbound}" for b in bs}
        wait_until(lambda: a.hosts(B_CLUSTER) == both, 20, what="a sees b-1 and b-2")
        # an Envoy that crashes and is restarted by its agent closes both streams too, but reopens
        # them within the grace: never critical
        before = bs[0].info()
        os.kill(before["envoy_pid"], signal.SIGKILL)
        health: list[str] = []

        def restarted() -> bool:
            i = instance(cp, "b-1")
            health.append(i["health"] if i else "missing")
            return bs[0].info()["envoy_pid"] != before["envoy_pid"] and through(bs[0].inbound, "b", "/")[0] == 200

        wait_until(restarted, 20, what="b-1's Envoy restarted by its agent and serving")
        t_back = time.monotonic()
        while time.monotonic() - t_back < DEAD_AFTER + 1:
            health.append((instance(cp, "b-1") or {}).get("health", "missing"))
            time.sleep(0.1)
        assert set(health) == {"passing"}, f"expected b-1 to stay passing across its Envoy's restart, got {sorted(set(health))}"
        wait_until(lambda: a.hosts(B_CLUSTER) == both, 10, what="a sees b-1 and b-2 again")
        with contextlib.ExitStack() as clients:
            loops = [clients.enter_context(Loop(a.outbound, period=0.005)) for _ in range(4)]
            time.sleep(1.0)
            bs[1].kill()
            apps[1].close()
            t0 = time.monotonic()
            left, critical = None, None
            while (elapsed := time.monotonic() - t0) < KILL_WATCH_S:
                if left is None and a.hosts(B_CLUSTER) == {f"127.0.0.1:{bs[0].inbound}"}:
                    left = elapsed
                if critical is None and not routable(cp, "b-2"):
                    critical = elapsed
                time.sleep(0.05)
        after = [r for loop in loops for r in loop.results if r[0] >= t0]
        failed = [(round(t - t0, 2), status, server) for t, status, server in after if status != 200]
        print(f"kill -9 of b-2: critical after {critical and round(critical, 2)}s, left a's EDS after {left and round(left, 2)}s (grace {DEAD_AFTER}s);"
              f" client: {len(after)} requests in {KILL_WATCH_S:.0f}s after the kill, {len(failed)} failed {failed[:5]}")
        assert left is not None and left <= DEAD_AFTER + 3, (
            f"expected b-2 (health and ADS streams closed) out of a's EDS within {DEAD_AFTER + 3:.0f}s of its kill -9, got {left}")
        assert len(after) > 10 * KILL_WATCH_S, f"expected a steady client loop, got {len(after)} requests in {KILL_WATCH_S}s"
        assert not failed, f"expected no failed request after the kill -9, got {len(failed)} (s after the kill, status, error): {failed[:5]}"
        assert routable(cp, "b-1"), "expected b-1 to stay routable"


def test_deregister_needs_the_token_and_bad_spec_is_rejected(cp: Any, tmp_path: Path) -> None:
    status, body = cp.call("DELETE", "/v1/instances/whatever?source=mesh")
    assert status == 401, f"expected 401 without a token, got {status} {body}"
    bad = tmp_path / "bad.yaml"
    bad.write_text("metadata: {name: Bad_Name}\nspec: {ports: [{name: http, port: 80, targetPort: web}]}\n")
    r = subprocess.run([str(VENV_BIN / "meshpilot"), "sidecar", "--spec", str(bad)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, f"expected exit 2 for a bad spec, got {r.returncode}: {r.stderr}"
    for field in ("metadata.name", "spec.ports.0.targetPort"):
        assert field in r.stderr, f"expected the error to name {field}, got: {r.stderr}"


class _Upstream:
    """A resolver on 127.0.0.1 for the meshdns test: ``ext.example`` A 192.0.2.77, anything else NXDOMAIN."""

    def __init__(self) -> None:
        import socket

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.asked: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import dns.message
        import dns.rcode
        import dns.rrset

        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(4096)
            except OSError:
                continue
            q = dns.message.from_wire(data)
            name = q.question[0].name.to_text().lower()
            self.asked.append(name)
            r = dns.message.make_response(q)
            if name == "ext.example.":
                r.answer.append(dns.rrset.from_text(name, 60, "IN", "A", "192.0.2.77"))
            else:
                r.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(r.to_wire(), addr)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def _resolve(port: int, name: str) -> list[str]:
    import dns.message
    import dns.query
    import dns.rcode

    r = dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=2)
    if r.rcode() != dns.rcode.NOERROR:
        return [dns.rcode.to_text(r.rcode())]
    return sorted(rr.to_text() for rrset in r.answer for rr in rrset)


def test_agent_runs_meshdns_fed_by_the_control_plane(cp: Any, tmp_path: Path) -> None:
    up = _Upstream()
    try:
        with app("b") as b:
            doc = spec_doc("b", b.port, free_port(), free_port())
            doc["mesh"]["dns"] = {"listen": "127.0.0.1:0", "upstreams": [f"127.0.0.1:{up.port}"], "ttl": 7}
            with sidecar(tmp_path, "b", doc, cp, "b-dns-1") as car:
                port = car.info()["dns_port"]
                assert isinstance(port, int) and port > 0, f"expected the ready file to carry meshdns's port, got {car.info()}"
                vip = cp.call("GET", "/v1/services/default/b", headers=AUTH)[1]["vip"]
                for name in ("b", "b.default", "b.default.svc.mesh", "B.Default.Svc.Mesh"):
                    got = wait_until(lambda n=name: _resolve(port, n) == [vip] and _resolve(port, n), 5,
                                     what=f"{name} -> {vip} from the agent's meshdns")
                    assert got == [vip], f"{name}: expected {[vip]}, got {got}"
                assert _resolve(port, "nosuch.default.svc.mesh") == ["NXDOMAIN"]
                assert _resolve(port, "ext.example") == ["192.0.2.77"], "expected ext.example forwarded upstream"
                assert up.asked == ["ext.example."], f"expected only ext.example upstream, got {up.asked}"

                # the table follows the registry live, and is kept in the agent's work directory
                t0 = time.monotonic()
                status, body = cp.call("POST", "/v1/services", {"name": "late", "ports": [{"name": "http", "port": 80}]},
                                       {"Authorization": f"Bearer {TOKEN}"})
                assert status == 201, f"expected 201 creating a service, got {status} {body}"
                late_vip = cp.call("GET", "/v1/services/default/late", headers=AUTH)[1]["vip"]
                wait_until(lambda: _resolve(port, "late.default.svc.mesh") == [late_vip], 1.0, interval=0.01,
                           what="a new service answered by the agent's meshdns within 1 s")
                print(f"new service answered by the agent's meshdns after {time.monotonic() - t0:.3f}s")
                def saved() -> list[str]:  # written just after the table is installed
                    names = sorted(json.loads((car.dir / "meshdns.json").read_text())["resources"])
                    return names if {"b.default", "late.default"} <= set(names) else []

                wait_until(saved, 5, what="b.default and late.default in the agent's meshdns.json")
                assert car.terminate() == 0, f"expected a clean exit:\n{car.log.read_text()[-3000:]}"
    finally:
        up.close()
