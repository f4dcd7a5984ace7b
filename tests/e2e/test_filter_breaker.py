"""The circuit breaker in a real Envoy 1.40 (2 workers) in front of a backend whose failures the test
controls: it opens after the configured failures, rejects with 503 and `x-mesh-circuit: open` while
open, lets exactly the permitted probes through half-open, closes when the backend recovers; breakers
per route and per upstream cluster are independent of each other."""

from __future__ import annotations

import datetime
import http.client
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from meshpilot.wasm import config, modules
from meshpilot.wasm import testbed as tb


def build_modules() -> None:
    if not Path("/usr/bin/cargo").exists() and not (Path(modules.__file__).parent / "mesh.wasm").exists():
        pytest.skip("no built filter modules and no /usr/bin/cargo to build them")
    if Path("/usr/bin/cargo").exists():
        subprocess.run(["bash", str(Path(__file__).resolve().parents[2] / "scripts" / "build-filters.sh")], check=True)


class Backend:
    """An HTTP/1.1 backend: per first path segment, the status to answer and an optional gate that
    holds responses until released. Counts requests and the ones waiting at the gate."""

    def __init__(self) -> None:
        self.status: dict[str, int] = {}
        self.gates: dict[str, threading.Event] = {}
        self.hits: dict[str, int] = {}
        self.waiting: dict[str, int] = {}
        self.lock = threading.Lock()
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                seg = self.path.split("/")[1] if self.path.count("/") else ""
                with backend.lock:
                    backend.hits[seg] = backend.hits.get(seg, 0) + 1
                    gate = backend.gates.get(seg)
                    if gate is not None:
                        backend.waiting[seg] = backend.waiting.get(seg, 0) + 1
                if gate is not None:
                    gate.wait(30)
                    with backend.lock:
                        backend.waiting[seg] -= 1
                code = backend.status.get(seg, 200)
                body = f"{seg} {code}\n".encode()
                self.send_response(code)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "Backend":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for g in self.gates.values():
            g.set()
        self.server.shutdown()
        self.server.server_close()


class Client:
    """One keep-alive connection (so one Envoy worker) for sequential requests."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def get(self, path: str) -> tuple[int, dict[str, str]]:
        for attempt in range(2):
            try:
                self.conn.request("GET", path)
                r = self.conn.getresponse()
                r.read()
                return r.status, {k.lower(): v for k, v in r.getheaders()}
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.conn.close()


def wait_for(what: str, check, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value {last!r}")


BREAKER = {
    "tick_ms": 50,
    "breakers": [{
        "name": "api", "per": "route", "sliding_window_type": "count", "sliding_window_size": 10,
        "minimum_calls": 5, "failure_rate_threshold": 50, "wait_duration_in_open": "1500ms",
        "permitted_calls_in_half_open": 3, "reply": {"body": "orders are resting\n", "headers": {"x-team": "shop"}},
    }],
}


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[Backend, tb.Envoy]]:
    build_modules()
    with Backend() as backend:
        port = tb.free_port()
        boot = tb.proxy_bootstrap(
            port,
            [tb.Route("orders", "/orders", "shop"), tb.Route("users", "/users", "shop"),
             tb.Route("alpha", "/alpha", "alpha"), tb.Route("beta", "/beta", "beta")],
            {"shop": backend.port, "alpha": backend.port, "beta": backend.port},
            [{"name": "meshpilot", "typed_config": modules.wasm_filter(config.encode({
                **BREAKER,
                "breakers": [
                    {**BREAKER["breakers"][0], "match": {"cluster": "shop"}},
                    {"name": "svc", "per": "service", "sliding_window_size": 4, "minimum_calls": 4,
                     "failure_rate_threshold": 100, "wait_duration_in_open": "60s"},
                ],
            }))}],
        )
        with tb.Envoy(boot, port, concurrency=2) as envoy:
            yield backend, envoy


def test_route_breaker_opens_rejects_probes_and_closes(stack: tuple[Backend, tb.Envoy]) -> None:
    backend, envoy = stack
    client = Client(envoy.port)
    try:
        for i in range(10):
            code, _ = client.get("/orders/1")
            assert code == 200, f"request {i} to a healthy backend: expected 200, got {code}"

        backend.status["orders"] = 500
        before = backend.hits.get("orders", 0)
        failures = 0
        for _ in range(20):
            code, headers = client.get("/orders/1")
            if code == 500:
                failures += 1
                continue
            break
        assert failures == 5, f"expected the breaker to open after 5 failures (50% of a 10-call window), got {failures}"
        assert (code, headers.get("x-mesh-circuit")) == (503, "open"), f"expected 503 open, got {code} {headers}"
        assert headers.get("x-team") == "shop" and "retry-after" in headers, f"expected reply headers, got {headers}"
        opened_at = time.monotonic()
        for _ in range(5):
            code, headers = client.get("/orders/2")
            assert (code, headers.get("x-mesh-circuit")) == (503, "open"), f"expected 503 open, got {code} {headers}"
        assert backend.hits["orders"] - before == 5, f"expected no calls upstream while open, got {backend.hits['orders'] - before - 5} extra"

        # Other routes have their own breaker; a new connection (maybe the other worker) sees it open too.
        code, _ = client.get("/users/1")
        assert code == 200, f"the users route must be unaffected, got {code}"
        other = Client(envoy.port)
        try:
            code, headers = other.get("/orders/3")
            assert (code, headers.get("x-mesh-circuit")) == (503, "open"), f"expected 503 open on another connection, got {code}"
        finally:
            other.close()
        wait_for("the state gauge to show open",
                 lambda: envoy.stats("meshpilot.breaker.api.orders.state").get("wasmcustom.meshpilot.breaker.api.orders.state") == 1)

        # Backend recovers but holds responses: after the wait, exactly 3 probes reach it.
        backend.status["orders"] = 200
        gate = threading.Event()
        backend.gates["orders"] = gate
        time.sleep(max(0.0, opened_at + 1.6 - time.monotonic()))  # the configured open wait is 1.5 s
        results: list[tuple[int, str | None]] = []
        lock = threading.Lock()

        def one() -> None:
            c = Client(envoy.port)
            try:
                code, headers = c.get("/orders/probe")
                with lock:
                    results.append((code, headers.get("x-mesh-circuit")))
            finally:
                c.close()

        hits_before = backend.hits["orders"]
        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        wait_for("3 probes at the backend and 5 rejections",
                 lambda: backend.waiting.get("orders", 0) == 3 and len(results) == 5)
        assert all(r == (503, "half-open") for r in results), f"expected 5 half-open rejections, got {results}"
        gate.set()
        del backend.gates["orders"]
        for t in threads:
            t.join(10)
        assert backend.hits["orders"] - hits_before == 3, f"expected exactly 3 probes, got {backend.hits['orders'] - hits_before}"
        assert sorted(results)[:3] == [(200, None)] * 3, f"expected the 3 probes to succeed, got {results}"

        for i in range(10):
            code, _ = client.get("/orders/1")
            assert code == 200, f"request {i} after recovery: expected 200 (closed), got {code}"
        wait_for("the state gauge to show closed",
                 lambda: envoy.stats("meshpilot.breaker.api.orders.state").get("wasmcustom.meshpilot.breaker.api.orders.state") == 0)
        stats = envoy.stats("meshpilot.breaker.api.orders")
        assert stats.get("wasmcustom.meshpilot.breaker.api.orders.opened", 0) >= 1, f"expected an opened count, got {stats}"
        wait_for("rejections to be counted",
                 lambda: envoy.stats("meshpilot.breaker.api.orders.rejected").get("wasmcustom.meshpilot.breaker.api.orders.rejected", 0) >= 12)
    finally:
        client.close()
        backend.status.pop("orders", None)


def test_service_breakers_are_independent(stack: tuple[Backend, tb.Envoy]) -> None:
    backend, envoy = stack
    client = Client(envoy.port)
    try:
        backend.status["alpha"] = 503
        codes = [client.get("/alpha/x")[0] for _ in range(4)]
        assert codes == [503] * 4, f"expected 4 upstream 503s, got {codes}"
        code, headers = client.get("/alpha/x")
        assert (code, headers.get("x-mesh-circuit")) == (503, "open"), f"expected the alpha breaker open, got {code} {headers}"
        code, headers = client.get("/beta/x")
        assert (code, headers.get("x-mesh-circuit")) == (200, None), f"expected beta unaffected, got {code} {headers}"
        hits = backend.hits.get("alpha", 0)
        assert hits == 4, f"expected 4 calls to reach alpha, got {hits}"
        assert os.path.exists(envoy.log_path)
        assert "meshpilot breaker svc: meshpilot/cb/svc/alpha opened" in envoy.log_text(), "expected the opening in the log"
    finally:
        client.close()


def test_open_wait_counts_from_the_trip_even_with_a_slow_tick() -> None:
    """Closed-state outcomes are timed by the worker's tick clock (free, up to one tick old); the
    breaker's open wait must still count from the moment it trips. With a 1 s tick and a 1.5 s wait,
    a wait stamped from the tick lets the first probe through up to 1 s early. Envoy's own log times
    the trip ("opened") and the probe's report ("closed"), free of the client's latency."""
    wait_s = 1.5
    build_modules()
    with Backend() as backend:
        port = tb.free_port()
        rule = {"name": "slowtick", "per": "route", "sliding_window_size": 4, "minimum_calls": 4,
                "failure_rate_threshold": 100, "wait_duration_in_open": f"{int(wait_s * 1000)}ms", "permitted_calls_in_half_open": 1}
        boot = tb.proxy_bootstrap(port, [tb.Route("orders", "/orders", "shop")], {"shop": backend.port},
                                  [{"name": "meshpilot", "typed_config": modules.wasm_filter(config.encode({"tick_ms": 1000, "breakers": [rule]}))}])
        with tb.Envoy(boot, port, concurrency=1) as envoy:
            client = Client(envoy.port)
            try:
                for _ in range(3):
                    for _ in range(3):  # closed-state calls: the worker's clock is whatever the last tick read
                        assert client.get("/orders/ok")[0] == 200
                    time.sleep(0.3)
                    backend.status["orders"] = 500
                    codes = [client.get("/orders/fail")[0] for _ in range(4)]
                    assert codes == [500] * 4, f"expected 4 upstream failures, got {codes}"
                    backend.status["orders"] = 200
                    while True:
                        code, headers = client.get("/orders/probe")
                        if code == 200:
                            break
                        assert headers.get("x-mesh-circuit") == "open", f"expected 503 open until the probe, got {code} {headers}"
                        time.sleep(0.002)
            finally:
                client.close()
            stamps = re.findall(r"^\[([\d-]+ [\d:.]+)\].*breaker slowtick: \S+ (opened|closed)$", envoy.log_text(), re.M)
        events = [(datetime.datetime.strptime(t, "%Y-%m-%d %H:%M:%S.%f"), what) for t, what in stamps]
        assert [w for _, w in events] == ["opened", "closed"] * 3, f"expected 3 trips each closed by a probe, got {stamps}"
        gaps = [round((events[i + 1][0] - events[i][0]).total_seconds(), 3) for i in range(0, 6, 2)]
        print(f"trip to closing probe, by Envoy's log: {gaps} s (open wait {wait_s} s, tick 1 s)")
        # the log has millisecond stamps; the probe goes at or after the end of the wait
        assert min(gaps) >= wait_s - 0.002, f"expected no probe earlier than {wait_s} s after the trip, got {gaps} s"
