"""CircuitBreakerPolicy through a real Envoy 1.40 sidecar and the control plane: the WASM module is
fetched from the control plane over HTTP and pinned by sha256, the filter config arrives by ECDS,
the breaker opens after the configured failures, rejects with 503 while open, lets exactly the
configured probes through half-open and closes when the backend recovers; per-API breakers are
independent; a policy change reaches a keep-alive connection within 1 s without a listener change;
the policy's instance section becomes outlier detection; invalid policies store nothing."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import http.server
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support import control_plane, envoy, free_port, sidecar_bootstrap, tmpdir, wait_until


BREAKER = "/v1/policies/CircuitBreakerPolicy/default/"  # + a name per test: breaker state is kept per rule name
TARGET = "outbound_80__orders_default_svc_mesh"  # the cluster as it appears in stat names


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self) -> None:  # noqa: N802
        srv: Any = self.server
        with srv.lock:
            srv.hits[self.path] = srv.hits.get(self.path, 0) + 1
            status = next((s for prefix, s in srv.failing.items() if self.path.startswith(prefix)), 200)
        body = json.dumps({"server": srv.name, "path": self.path}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def backend(name: str) -> Iterator[Any]:
    """An HTTP backend whose failures the test sets: ``failing[path_prefix] = status``."""
    srv: Any = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.name, srv.hits, srv.failing, srv.lock = name, {}, {}, threading.Lock()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        srv.port = srv.server_address[1]
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


@dataclass
class Mesh:
    cp: Any
    proxy: Any
    port: int
    orders: Any
    spare: Any

    def api(self, method: str, path: str, body: Any = None) -> Any:
        status, data = self.cp.call(method, path, body)
        assert status < 300, f"expected {method} {path} to succeed, got {status}: {data}"
        return data

    def hits(self, prefix: str = "/") -> int:
        with self.orders.lock:
            return sum(n for p, n in self.orders.hits.items() if p.startswith(prefix))

    def stat(self, name: str) -> int | None:
        return self.proxy.stat(name)

    def ecds_version(self) -> str:
        dump = self.proxy.config_dump("ecds_filters")
        for c in dump.get("configs", []):
            if c.get("ecds_filter", {}).get("name") == "meshpilot.governance.outbound":
                return str(c.get("version_info", ""))
        return ""


def get(port: int, path: str, conn: http.client.HTTPConnection | None = None) -> tuple[int, dict[str, str], bytes]:
    own = conn is None
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", path, headers={"Host": "orders"})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        if own:
            c.close()


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    workdir = tmpdir("meshpilot-governance-")
    with control_plane(workdir) as cp, backend("orders-1") as orders, backend("orders-2") as spare:
        def api(method: str, path: str, body: Any = None) -> None:
            status, data = cp.call(method, path, body)
            assert status < 300, f"expected {method} {path} to succeed, got {status}: {data}"

        api("POST", "/v1/services", {"name": "orders", "ports": [{"name": "http", "port": 80}], "apis": [
            {"name": "get-order", "method": "GET", "path": "/orders/{id}"},
            {"name": "list-orders", "method": "GET", "path": "/orders"},
        ], "traffic": {"retries": 0}})
        api("POST", "/v1/services/default/orders/instances", {"id": "orders-1", "address": "127.0.0.1", "ports": {"http": orders.port}})
        port = free_port()
        # one worker: the breaker's state machine is shown request by request
        with envoy(workdir, sidecar_bootstrap("web-1", cp.xds_port, service="web", outbound_port=port), concurrency=1) as proxy:
            wait_until(lambda: get(port, "/")[0] == 200, 20, what="a first 200 through the sidecar")
            yield Mesh(cp, proxy, port, orders, spare)


@pytest.fixture
def clean(mesh: Mesh) -> Iterator[Mesh]:
    mesh.orders.failing.clear()
    try:
        yield mesh
    finally:
        mesh.orders.failing.clear()
        for p in mesh.cp.call("GET", "/v1/policies/CircuitBreakerPolicy")[1]:
            mesh.cp.call("DELETE", f"/v1/policies/CircuitBreakerPolicy/{p['namespace']}/{p['name']}")


def test_module_is_fetched_from_the_control_plane_with_its_sha256(mesh: Mesh) -> None:
    with urllib.request.urlopen(f"{mesh.cp.api}/v1/wasm/mesh.wasm", timeout=5) as r:
        data, headers = r.read(), {k.lower(): v for k, v in r.getheaders()}
    digest = hashlib.sha256(data).hexdigest()
    assert data[:4] == b"\0asm", f"expected a WASM module from /v1/wasm/mesh.wasm, got {data[:8]!r}"
    assert headers.get("x-meshpilot-sha256") == digest, f"expected X-Meshpilot-Sha256 {digest}, got {headers.get('x-meshpilot-sha256')}"
    mesh.api("PUT", BREAKER + "fetch", {"service": "orders"})
    try:
        def remote() -> dict[str, Any] | None:
            for c in mesh.proxy.config_dump("ecds_filters").get("configs", []):
                cfg = c.get("ecds_filter", {}).get("typed_config", {}).get("config", {})
                code = cfg.get("vm_config", {}).get("code", {}).get("remote")
                if code:
                    return code
            return None

        code = wait_until(remote, 5, what="a WASM filter with remote code in Envoy's ECDS configs")
        assert code["sha256"] == digest, f"expected the ECDS config to pin sha256 {digest}, got {code['sha256']}"
        uri = code["http_uri"]["uri"]
        assert uri == "http://meshpilot-api/v1/wasm/mesh.wasm" and code["http_uri"]["cluster"] == "meshpilot-api", \
            f"expected the module fetched through the cluster of the control planes' APIs, got {code['http_uri']}"
        api_hosts = set(mesh.proxy.cluster_hosts("meshpilot-api"))
        assert api_hosts == {f"127.0.0.1:{mesh.cp.ports['api']}"}, f"expected the control plane's API in meshpilot-api, got {api_hosts}"
        # the filter runs with the rule: its breaker gauge appears. Its code can only have come from the
        # control plane, checked against the pinned sha256 (Envoy loads no remote code whose digest
        # differs); whether Envoy took it through its remote-code cache or, when the configuration
        # came while Envoy was still initialising, straight from the fetch depends on that timing
        assert not mesh.stat("wasm.remote_load_fetch_failures"), "expected no failed remote fetch"
        gauge = f"wasmcustom.meshpilot.breaker.fetch_default.{TARGET}.state"
        wait_until(lambda: get(mesh.port, "/")[0] == 200 and mesh.stat(gauge) == 0, 10, what="the filter's breaker gauge in Envoy's stats")
    finally:
        mesh.cp.call("DELETE", BREAKER + "fetch")


def test_breaker_opens_rejects_probes_and_closes(clean: Mesh) -> None:
    m = clean
    m.api("PUT", BREAKER + "cycle", {"service": "orders", "sliding_window_size": 10, "minimum_calls": 5, "failure_rate_threshold": 50,
                           "wait_duration_in_open": "1s", "permitted_calls_in_half_open": 2})
    state = f"wasmcustom.meshpilot.breaker.cycle_default.{TARGET}.state"
    # the policy is live once the breaker's gauge exists (a request creates it) — probe with successes
    wait_until(lambda: get(m.port, "/ok")[0] == 200 and m.stat(state) == 0, 5, what="the breaker to be active and closed")

    m.orders.failing["/"] = 500
    for _ in range(20):  # the window holds successes; failures push the rate over 50 %
        if get(m.port, "/fail")[0] == 503:
            break
    before = m.hits()
    statuses = [get(m.port, "/fail") for _ in range(10)]
    assert all(s == 503 for s, _, _ in statuses), f"expected 503 for every request while open, got {[s for s, _, _ in statuses]}"
    assert statuses[0][1].get("x-mesh-circuit") == "open", f"expected x-mesh-circuit: open, got {statuses[0][1]}"
    assert m.hits() == before, f"expected no request to reach the backend while open, got {m.hits() - before}"
    wait_until(lambda: m.stat(state) == 1, 1, what="the state gauge at 1 (open) within a tick or so")

    # half-open with the backend still failing: exactly the 2 permitted probes reach it, then open again
    time.sleep(1.1)  # the configured open wait itself is what is being tested
    before = m.hits()
    statuses = [get(m.port, "/fail")[0] for _ in range(10)]
    assert m.hits() - before == 2, f"expected exactly 2 half-open probes to reach the backend, got {m.hits() - before} ({statuses})"
    assert statuses[:2] == [500, 500] and set(statuses[2:]) == {503}, f"expected 2 probes (500) then 503s, got {statuses}"

    # the backend recovers: after the open wait the probes succeed and the breaker closes
    m.orders.failing.clear()
    time.sleep(1.1)
    statuses = [get(m.port, "/ok")[0] for _ in range(10)]
    assert statuses == [200] * 10, f"expected the breaker to close after 2 good probes, got {statuses}"
    wait_until(lambda: m.stat(state) == 0, 1, what="the state gauge at 0 (closed)")
    opened = f"wasmcustom.meshpilot.breaker.cycle_default.{TARGET}.opened"
    wait_until(lambda: m.stat(opened) == 2, 1, what=f"{opened} at 2 (opened, re-opened after failed probes)")


def test_per_api_breakers_are_independent(clean: Mesh) -> None:
    m = clean
    m.api("PUT", BREAKER + "per-api", {"service": "orders", "per": "api", "sliding_window_size": 5, "minimum_calls": 5,
                           "wait_duration_in_open": "30s"})
    wait_until(lambda: "get-order" in json.dumps(m.proxy.config_dump("ecds_filters")), 5, what="the per-API config in Envoy")
    m.orders.failing["/orders/"] = 500
    got = [get(m.port, "/orders/7")[0] for _ in range(8)]
    assert got[:5] == [500] * 5 and set(got[5:]) == {503}, f"expected get-order to open after 5 failures, got {got}"
    listing = [get(m.port, "/orders")[0] for _ in range(10)]
    assert listing == [200] * 10, f"expected list-orders unaffected by get-order's open breaker, got {listing}"
    other = [get(m.port, "/elsewhere")[0] for _ in range(5)]
    assert other == [200] * 5, f"expected a path outside both APIs to pass, got {other}"


def test_policy_change_reaches_a_keepalive_connection_within_a_second(clean: Mesh) -> None:
    m = clean
    m.api("PUT", BREAKER + "change", {"service": "orders", "sliding_window_size": 5, "minimum_calls": 5, "wait_duration_in_open": "60s"})
    m.orders.failing["/"] = 500
    wait_until(lambda: get(m.port, "/")[0] == 503, 10, what="the breaker to open")
    lds = m.stat("listener_manager.lds.update_success")
    conn = http.client.HTTPConnection("127.0.0.1", m.port, timeout=5)
    try:
        status, _, body = get(m.port, "/", conn)
        assert status == 503, f"expected 503 from the open breaker, got {status}: {body!r}"
        sock = conn.sock
        changed = time.monotonic()
        m.api("PUT", BREAKER + "change", {"service": "orders", "sliding_window_size": 5, "minimum_calls": 5, "wait_duration_in_open": "60s",
                               "reply": {"status": 529, "body": "orders paused", "headers": {"x-team": "orders"}}})
        while True:
            status, headers, body = get(m.port, "/", conn)
            elapsed = time.monotonic() - changed
            if status == 529 or elapsed > 1.0:
                break
            time.sleep(0.01)
        assert status == 529 and body == b"orders paused" and headers.get("x-team") == "orders", (
            f"expected the new reply (529, 'orders paused', x-team) within 1 s, got {status} {body!r} after {elapsed:.2f}s"
        )
        assert conn.sock is sock, "expected the same keep-alive connection to see the change (no drain, no reconnect)"
    finally:
        conn.close()
    assert m.stat("listener_manager.lds.update_success") == lds, "expected no listener update for a policy change"


def _filter_switched_off(m: Mesh, vhost: str) -> bool | None:
    return m.proxy.filter_switched_off("outbound", vhost, "meshpilot.governance.outbound")


def test_only_guarded_services_routes_run_the_filter_and_the_switch_reaches_open_connections(clean: Mesh) -> None:
    m = clean
    wait_until(lambda: _filter_switched_off(m, "orders.default:80") is True, 5, what="orders' routes to skip the filter without a breaker")
    assert _filter_switched_off(m, "unknown-host") is True, "expected the unknown-host route to skip the filter"
    lds = m.stat("listener_manager.lds.update_success")
    conn = http.client.HTTPConnection("127.0.0.1", m.port, timeout=5)
    try:
        assert get(m.port, "/", conn)[0] == 200, "expected a 200 before any breaker"
        sock = conn.sock
        m.orders.failing["/"] = 500
        m.api("PUT", BREAKER + "switch", {"service": "orders", "sliding_window_size": 5, "minimum_calls": 5, "wait_duration_in_open": "60s"})
        changed = time.monotonic()
        statuses = []
        while time.monotonic() - changed < 3:
            statuses.append(get(m.port, "/", conn)[0])
            if statuses[-1] == 503:
                break
            time.sleep(0.02)
        assert statuses[-1] == 503, f"expected the new breaker to open on the same keep-alive connection, got {statuses[-12:]}"
        assert conn.sock is sock, "expected the switch to reach the open connection (no drain, no reconnect)"
    finally:
        conn.close()
    assert _filter_switched_off(m, "orders.default:80") is False, "expected orders' routes to run the filter while a breaker guards it"
    assert m.stat("listener_manager.lds.update_success") == lds, "expected no listener update when the filter is switched on"
    m.api("DELETE", BREAKER + "switch")
    wait_until(lambda: _filter_switched_off(m, "orders.default:80") is True, 5, what="orders' routes to skip the filter again")


def test_instance_section_becomes_outlier_detection(clean: Mesh) -> None:
    m = clean
    cluster = "outbound|80||orders.default.svc.mesh"
    m.api("POST", "/v1/services/default/orders/instances", {"id": "orders-2", "address": "127.0.0.1", "ports": {"http": m.spare.port}})
    try:
        wait_until(lambda: len(m.proxy.cluster_hosts(cluster)) == 2, 5, what="both instances in Envoy")
        m.api("PUT", BREAKER + "outlier", {"service": "orders", "failure_rate_threshold": 100, "minimum_calls": 100,
                               "instance": {"consecutive_5xx": 3, "interval_ms": 100, "base_ejection_time_ms": 30000, "max_ejection_percent": 50}})

        def outlier() -> dict[str, Any] | None:
            for c in m.proxy.config_dump("dynamic_active_clusters").get("configs", []):
                cl = c.get("cluster", {})
                if cl.get("name") == cluster and cl.get("outlier_detection", {}).get("consecutive_5xx") == 3:
                    return cl["outlier_detection"]
            return None

        od = wait_until(outlier, 5, what="consecutive_5xx 3 on the orders cluster")
        assert od.get("base_ejection_time") == "30s", f"expected base_ejection_time 30s, got {od}"
        m.orders.failing["/"] = 500
        addr = f"127.0.0.1:{m.orders.port}"
        for _ in range(30):
            get(m.port, "/")
            if "failed_outlier_check" in m.proxy.cluster_hosts(cluster).get(addr, ""):
                break
        flags = m.proxy.cluster_hosts(cluster)
        assert "failed_outlier_check" in flags.get(addr, ""), f"expected the failing instance ejected, got {flags}"
        got = [get(m.port, "/")[0] for _ in range(10)]
        assert got == [200] * 10, f"expected every call on the healthy instance once the failing one is ejected, got {got}"
    finally:
        m.cp.call("DELETE", "/v1/instances/orders-2")


def test_invalid_policies_are_rejected_with_fields_and_store_nothing(clean: Mesh) -> None:
    m = clean
    version = m.ecds_version()
    cases = [
        ({"service": "orders", "failure_rate_threshold": 0}, "failure_rate_threshold"),
        ({"service": "orders", "sliding_window_size": 10, "minimum_calls": 11}, "minimum_calls"),
        ({"service": "orders", "per": "api", "apis": [{"path": "/a*b"}]}, "apis.0.path"),
        ({"service": "orders", "reply": {"headers": {"Bad Header": "x"}}}, "reply.headers.Bad Header"),
        ({"service": "orders", "wait_duration_in_open": "soon"}, "wait_duration_in_open"),
        ({"service": "orders", "instance": {"consecutive_5xx": 0}}, "instance.consecutive_5xx"),
        ({"service": "Not A Label"}, "service"),
    ]
    for body, field in cases:
        status, data = m.cp.call("PUT", BREAKER + "invalid", body)
        fields = [f["field"] for f in data.get("fields", [])] if isinstance(data, dict) else data
        assert status == 400 and field in fields, f"expected 400 naming {field!r} for {body}, got {status}: {data}"
    for body, field in [({"service": "orders", "rate": 10}, "burst"), ({"service": "orders", "rate": "10/x", "burst": 1}, "rate"),
                        ({"service": "orders", "rate": 5, "total_rate": 5, "burst": 1}, "rate"),
                        ({"service": "orders", "rate": 5, "burst": 1, "per": {"header": "x y"}}, "per")]:
        status, data = m.cp.call("PUT", "/v1/policies/RateLimitPolicy/default/bad", body)
        fields = [f["field"] for f in data.get("fields", [])] if isinstance(data, dict) else data
        assert status == 400 and field in fields, f"expected 400 naming {field!r} for {body}, got {status}: {data}"
    for kind in ("CircuitBreakerPolicy", "RateLimitPolicy"):
        status, listed = m.cp.call("GET", f"/v1/policies/{kind}")
        assert status == 200 and listed == [], f"expected no {kind} stored after rejections, got {listed}"
    assert m.ecds_version() == version, "expected Envoy's filter config untouched by rejected policies"


def test_a_config_the_filter_rejects_is_a_nack_in_proxies_and_the_last_good_config_stays() -> None:
    """Policies cannot produce a config the filter rejects, so the bad one is injected directly."""
    workdir = tmpdir("meshpilot-governance-nack-")
    with control_plane(workdir, extra=["--debug-api"]) as cp, backend("orders-1") as orders:
        for method, path, body in [
            ("POST", "/v1/services", {"name": "orders", "ports": [{"name": "http", "port": 80}], "traffic": {"retries": 0}}),
            ("POST", "/v1/services/default/orders/instances", {"id": "orders-1", "address": "127.0.0.1", "ports": {"http": orders.port}}),
            ("PUT", BREAKER + "kept", {"service": "orders", "sliding_window_size": 5, "minimum_calls": 5, "wait_duration_in_open": "60s"}),
        ]:
            status, data = cp.call(method, path, body)
            assert status < 300, f"expected {method} {path} to succeed, got {status}: {data}"
        port = free_port()
        with envoy(workdir, sidecar_bootstrap("web-nack", cp.xds_port, service="web", outbound_port=port)) as proxy:
            wait_until(lambda: get(port, "/")[0] == 200, 20, what="a first 200 through the sidecar")
            good = next(c["ecds_filter"] for c in proxy.config_dump("ecds_filters")["configs"]
                        if c["ecds_filter"]["name"] == "meshpilot.governance.outbound")
            bad = json.loads(json.dumps(good["typed_config"]))
            bad["config"]["configuration"]["value"] = "[breaker broken]\nwindow = sideways\n"
            status, data = cp.call("POST", "/v1/debug/resources", {
                "type_url": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig", "name": "meshpilot.governance.outbound",
                "scope": "web-nack", "resource": {"name": "meshpilot.governance.outbound", "typed_config": bad}})
            assert status == 201, f"expected the injection to be accepted, got {status}: {data}"

            def nack() -> dict[str, Any] | None:
                for p in cp.call("GET", "/v1/proxies")[1]:
                    n = p.get("last_nack")
                    if p["node_id"] == "web-nack" and n and "TypedExtensionConfig" in json.dumps(n):
                        return n
                return None

            n = wait_until(nack, 5, what="a NACK of the filter config in /v1/proxies")
            assert proxy.proc is not None and proxy.proc.poll() is None, "expected Envoy to keep running after the NACK"
            assert "meshpilot filter: configuration rejected" in proxy.log.read_text(errors="replace"), "expected the filter to log why"
            assert "Unable to create Wasm plugin" in n.get("error", ""), f"expected Envoy's reason in the NACK, got {n}"
            # Envoy's config dump shows the last config received; what it enforces is the last good one
            orders.failing["/"] = 500
            got = [get(port, "/")[0] for _ in range(8)]
            first = got.index(503) if 503 in got else len(got)
            assert 3 <= first <= 5 and set(got[first:]) == {503}, f"expected the kept breaker (window 5) to open after 3-5 failures, got {got}"
