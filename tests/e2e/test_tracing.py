"""Tracing end to end: a real control plane, two real `meshpilot sidecar` agents with real Envoys, real
HTTP apps on 127.0.0.1.

A request that enters the caller's sidecar with a W3C ``traceparent`` (and one with B3 headers) and
goes on to the callee's sidecar becomes one trace in ``/v1/traces`` with both sidecars' spans under the
caller's trace id, the callee's span a child of the caller's; the app behind the callee gets both
header families. Spans on disk also survive the agent killed (kill -9, with its Envoy) while the control
plane is down: the restarted agent ships them from its persisted cursor. With ``mesh.tracing.backend``
set, a node ships to that Zipkin (with its configured headers) or OTLP/HTTP endpoint instead of the
control plane. The node's health checks are never traced. The listeners with tracing, in every mTLS mode, and the bootstrap with the span
collector are accepted by ``envoy --mode validate``. The ingestion route refuses a stranger. With the control plane stopped while requests
flow, the spans wait in the nodes' span files and arrive once it is back. An agent asked to stop while
its shipper's post hangs still ships its last span on the way out.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from google.protobuf import json_format

from meshpilot.sidecar.render import SidecarOptions, render_bootstrap
from meshpilot.sidecar.spec import load_spec
from meshpilot.translate.bootstrap import BootstrapOptions, build_bootstrap
from meshpilot.translate.listeners import build_inbound_listener, build_outbound_listener
from meshpilot.translate.tracing import node_tracing, with_tracing
from meshpilot.xds.resource import node_info
from tests.e2e.test_sidecar import AUTH, TOKEN, app, sidecar, spec_doc
from tests.e2e.test_envoy_validates_translations import _routes_inline
from tests.support import ControlPlaneProc, assert_envoy_accepts, free_port, http, through, wait_until

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("mtls", ["DISABLE", "PERMISSIVE", "STRICT"])
def test_traced_listeners_and_the_collector_bootstrap_validate_in_envoy(tmp_path: Path, mtls: str) -> None:
    b = build_bootstrap(BootstrapOptions(node_id="n1", service="web", app_port=9999, trace_collector_port=41000,
                                         identity=mtls != "DISABLE", sds_socket=str(tmp_path / "sds.sock")))
    node = node_info("n1", "web", b["node"]["metadata"])
    t = node_tracing(node, 12.5)
    assert t is not None, "expected the bootstrap's node to be given tracing"
    route = {"name": "r", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
        {"match": {"prefix": "/"}, "direct_response": {"status": 200}}]}]}
    names = {"outbound": route, "inbound": route, "inbound-local": route}
    listeners = [
        with_tracing(build_outbound_listener(node), t),
        with_tracing(build_inbound_listener(node, trusted_peers=["127.0.0.2"], mtls=mtls), t),
    ]
    b["static_resources"]["listeners"] = [
        _routes_inline(json_format.MessageToDict(lst, preserving_proto_field_name=True), names) for lst in listeners
    ]
    assert_envoy_accepts(b, tmp_path, f"listeners traced with the Zipkin tracer (mTLS {mtls}) and the collector cluster")


def test_the_rendered_sidecar_bootstrap_with_tracing_validates_in_envoy(tmp_path: Path) -> None:
    spec = load_spec(yaml.safe_dump(spec_doc("web", 8080, 15006, 15001)))
    b = render_bootstrap(spec, SidecarOptions(admin_port=0))
    assert "TRACE_COLLECTOR" not in b["node"]["metadata"], "expected no collector before the agent binds the receiver"
    from dataclasses import replace

    from meshpilot.sidecar.render import bootstrap_options

    traced = build_bootstrap(replace(bootstrap_options(spec, SidecarOptions(admin_port=0)), trace_collector_port=41001))
    assert_envoy_accepts(traced, tmp_path, "the sidecar bootstrap with the span collector")


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ControlPlaneProc]:
    cfg = tmp_path / "cp.yaml"
    cfg.write_text(yaml.safe_dump({"hds_interval_s": 0.3, "debounce_ms": 20, "token": TOKEN}))
    c = ControlPlaneProc(tmp_path, extra=["--config", str(cfg)])
    try:
        yield c.start()
    finally:
        c.stop()


def _sampling(side: Any) -> list[float]:
    """The random_sampling percentages of the HTTP connection managers in the sidecar's Envoy."""
    dump = json.loads(side.admin("/config_dump?resource=dynamic_listeners"))
    text = json.dumps(dump)
    out = []
    marker = '"random_sampling": {"value": '
    start = 0
    while (i := text.find(marker, start)) >= 0:
        start = i + len(marker)
        out.append(float(text[start:text.index("}", start)]))
    return out


def _trace(cp: ControlPlaneProc, trace_id: str) -> dict[str, Any] | None:
    status, body = cp.call("GET", f"/v1/traces/{trace_id}", headers=AUTH)
    return body if status == 200 else None


def _flat(tree: dict[str, Any]) -> list[dict[str, Any]]:
    out, stack = [], list(tree["roots"])
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node["children"])
    return out


def _both_sidecars(cp: ControlPlaneProc, trace_id: str) -> dict[str, Any] | None:
    tree = _trace(cp, trace_id)
    if tree is None:
        return None
    kinds = {(s["service"], s.get("kind")) for s in _flat(tree)}
    return tree if {("web", "CLIENT"), ("api", "SERVER")} <= kinds else None


def _check_tree(tree: dict[str, Any], trace_id: str, caller_span: str) -> None:
    spans = _flat(tree)
    client = next(s for s in spans if s["service"] == "web" and s.get("kind") == "CLIENT")
    server = next(s for s in spans if s["service"] == "api" and s.get("kind") == "SERVER")
    assert tree["trace_id"] == trace_id, f"expected the caller's trace id {trace_id}, got {tree['trace_id']}"
    assert client.get("parentId") == caller_span, f"expected web's span under the caller's span {caller_span}, got {client}"
    assert server.get("parentId") == client["id"], f"expected api's span to be a child of web's span {client['id']}, got {server}"
    assert server in client["children"], f"expected api's span in web's span's children, got {client['children']}"
    assert client["tags"].get("mesh.service") == "web.default" and server["tags"].get("mesh.service") == "api.default", \
        f"expected each span tagged with its sidecar's service, got {client['tags']} and {server['tags']}"


def test_one_trace_across_two_sidecars_with_w3c_and_b3_and_spans_survive_the_backend_down(cp: ControlPlaneProc, tmp_path: Path) -> None:
    status, body = cp.call("PUT", "/v1/policies/TracingPolicy/default/all",
                           {"kind": "TracingPolicy", "name": "all", "namespace": "default", "sampling": 100}, AUTH)
    assert status in (200, 201), f"expected the TracingPolicy stored, got {status} {body}"
    with app("api") as api_app, app("web") as web_app, \
            sidecar(tmp_path, "api", spec_doc("api", api_app.port, free_port(), free_port()), cp, "api-1") as api_side, \
            sidecar(tmp_path, "web", spec_doc("web", web_app.port, free_port(), free_port()), cp, "web-1") as web_side:
        for side in (api_side, web_side):
            wait_until(lambda side=side: (s := _sampling(side)) and all(v == 100 for v in s), 20,
                       what=f"{side.node_id}'s listeners tracing at 100 %")
        wait_until(lambda: through(web_side.outbound, "api", "/ready")[0] == 200, 20, what="web -> api routable")

        # W3C: the caller (an app with its own tracing) sends traceparent
        t1, p1 = secrets.token_hex(16), secrets.token_hex(8)
        status, body = through(web_side.outbound, "api", "/w3c", {"traceparent": f"00-{t1}-{p1}-01"})
        assert status == 200 and body["server"] == "api", f"expected api's answer, got {status} {body}"
        got = body["headers"]
        assert got.get("traceparent", "").split("-")[1:2] == [t1] and got.get("x-b3-traceid") == t1, \
            f"expected the api app to get trace {t1} in traceparent and x-b3-traceid, got {got}"

        # B3: the caller sends multi-header B3
        t2, p2 = secrets.token_hex(16), secrets.token_hex(8)
        status, body = through(web_side.outbound, "api", "/b3", {"x-b3-traceid": t2, "x-b3-spanid": p2, "x-b3-sampled": "1"})
        assert status == 200, f"expected 200, got {status} {body}"

        tree1 = wait_until(lambda: _both_sidecars(cp, t1), 40, interval=0.5, what=f"trace {t1} with web's and api's spans")
        _check_tree(tree1, t1, p1)
        tree2 = wait_until(lambda: _both_sidecars(cp, t2), 40, interval=0.5, what=f"trace {t2} with web's and api's spans")
        _check_tree(tree2, t2, p2)
        status, listed = cp.call("GET", "/v1/traces?service=api&since=1h&limit=1000", headers=AUTH)
        ids = [t["trace_id"] for t in listed.get("traces", [])] if status == 200 else []
        assert t1 in ids and t2 in ids, f"expected both traces listed for service api, got {status} {listed}"
        # the nodes' own health checks (HDS, every 0.3 s here) are never traced, even at 100 %
        urls = [s.get("tags", {}).get("http.url", "") for tid in ids for s in _flat(_trace(cp, tid) or {"roots": []})]
        assert not any(u.endswith("/healthz") for u in urls), \
            f"expected no health check traced, got spans of {[u for u in urls if u.endswith('/healthz')][:3]}"

        # a stranger may not write spans: 401 and nothing kept
        t3 = secrets.token_hex(16)
        forged = [{"traceId": t3, "id": secrets.token_hex(8), "name": "forged", "timestamp": 1_700_000_000_000_000}]
        status, body, _ = http("POST", cp.api + "/v1/spans", forged)
        assert status == 401, f"expected 401 for spans without a token, got {status} {body}"
        status, body, _ = http("POST", cp.api + "/v1/spans", forged, {"Authorization": "Bearer not-a-token"})
        assert status == 401, f"expected 401 for spans with a wrong token, got {status} {body}"
        assert _trace(cp, t3) is None, f"expected nothing kept of the stranger's spans, got {_trace(cp, t3)}"

        # the backend down: spans wait in the nodes' span files, then arrive
        ports = dict(cp.ports)
        cp.stop()
        t4, p4 = secrets.token_hex(16), secrets.token_hex(8)
        status, body = through(web_side.outbound, "api", "/while-down", {"traceparent": f"00-{t4}-{p4}-01"})
        assert status == 200, f"expected requests to flow with the control plane down, got {status} {body}"

        def on_disk(side: Any) -> bool:
            return any(t4 in p.read_text() for p in (side.dir / "traces").glob("spans-*.jsonl"))

        for side in (web_side, api_side):
            wait_until(lambda side=side: on_disk(side), 30, interval=0.5,
                       what=f"{side.node_id}'s span of trace {t4} in its span files while the control plane is down")
        cp.xds_port_wanted, cp.api_port_wanted = ports["xds"], ports["api"]
        cp.start()
        tree4 = wait_until(lambda: _both_sidecars(cp, t4), 60, interval=0.5,
                           what=f"trace {t4}, written while the control plane was down, with both sidecars' spans")
        _check_tree(tree4, t4, p4)


def test_spans_on_disk_survive_the_agent_killed_while_the_control_plane_is_down(cp: ControlPlaneProc, tmp_path: Path) -> None:
    status, body = cp.call("PUT", "/v1/policies/TracingPolicy/default/all",
                           {"kind": "TracingPolicy", "name": "all", "namespace": "default", "sampling": 100}, AUTH)
    assert status in (200, 201), f"expected the TracingPolicy stored, got {status} {body}"
    web_doc = spec_doc("web", 0, free_port(), free_port())
    with app("api") as api_app, app("web") as web_app, \
            sidecar(tmp_path, "api", spec_doc("api", api_app.port, free_port(), free_port()), cp, "api-1") as api_side:
        web_doc["spec"]["ports"][0]["targetPort"] = web_app.port
        with sidecar(tmp_path, "web", web_doc, cp, "web-1") as web_side:
            wait_until(lambda: (s := _sampling(web_side)) and all(v == 100 for v in s), 20, what="web's listeners tracing at 100 %")
            wait_until(lambda: through(web_side.outbound, "api", "/ready")[0] == 200, 20, what="web -> api routable")
            ports = dict(cp.ports)
            cp.stop()
            t5, p5 = secrets.token_hex(16), secrets.token_hex(8)
            status, body = through(web_side.outbound, "api", "/before-kill", {"traceparent": f"00-{t5}-{p5}-01"})
            assert status == 200, f"expected the request to flow with the control plane down, got {status} {body}"
            files = web_side.dir / "traces"
            wait_until(lambda: any(t5 in p.read_text() for p in files.glob("spans-*.jsonl")), 30, interval=0.5,
                       what=f"web's span of trace {t5} in its span files")
            web_side.kill()  # kill -9 of the agent and its Envoy: only the files remain
        cp.xds_port_wanted, cp.api_port_wanted = ports["xds"], ports["api"]
        cp.start()
        with sidecar(tmp_path, "web", web_doc, cp, "web-1"):  # the same node, the same work directory
            tree = wait_until(lambda: _both_sidecars(cp, t5), 60, interval=0.5,
                              what=f"trace {t5}, spooled by an agent killed while the control plane was down, after it restarted")
            _check_tree(tree, t5, p5)


class Collector:
    """A tracing backend stand-in on 127.0.0.1: keeps every JSON body posted to it, with its headers.
    With ``hold`` set to a trace id, the first post that holds a span of that trace gets no answer
    (``held`` is set; the connection stays open until ``release`` or 30 s), as a backend that hangs."""

    def __init__(self) -> None:
        import http.server as httpserver
        import threading

        self.posts: list[tuple[str, dict[str, str], Any]] = []
        self.hold = ""
        self.held = threading.Event()
        self.release = threading.Event()
        collector = self

        class H(httpserver.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if collector.hold and not collector.held.is_set() and collector.hold.encode() in raw:
                    collector.held.set()
                    collector.release.wait(30)
                    self.close_connection = True
                    return
                collector.posts.append((self.path, {k.lower(): v for k, v in self.headers.items()}, json.loads(raw)))
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a: Any) -> None:
                pass

        class S(httpserver.ThreadingHTTPServer):
            daemon_threads = True

        self.srv = S(("127.0.0.1", 0), H)
        self.port = self.srv.server_address[1]
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.srv.shutdown()
        self.srv.server_close()


def test_sidecars_ship_to_a_zipkin_or_otlp_backend_when_configured(cp: ControlPlaneProc, tmp_path: Path) -> None:
    status, body = cp.call("PUT", "/v1/policies/TracingPolicy/default/all",
                           {"kind": "TracingPolicy", "name": "all", "namespace": "default", "sampling": 100}, AUTH)
    assert status in (200, 201), f"expected the TracingPolicy stored, got {status} {body}"
    zipkin, otlp = Collector(), Collector()
    try:
        web_doc = spec_doc("web", 1, free_port(), free_port())
        api_doc = spec_doc("api", 1, free_port(), free_port())
        web_doc["mesh"]["tracing"] = {"backend": f"http://127.0.0.1:{zipkin.port}/api/v2/spans",
                                      "backendHeaders": {"Authorization": "Bearer zipkin-secret"}}
        api_doc["mesh"]["tracing"] = {"backend": f"http://127.0.0.1:{otlp.port}/v1/traces", "backendFormat": "otlp"}
        with app("api") as api_app, app("web") as web_app:
            web_doc["spec"]["ports"][0]["targetPort"] = web_app.port
            api_doc["spec"]["ports"][0]["targetPort"] = api_app.port
            with sidecar(tmp_path, "api", api_doc, cp, "api-1"), sidecar(tmp_path, "web", web_doc, cp, "web-1") as web_side:
                wait_until(lambda: (s := _sampling(web_side)) and all(v == 100 for v in s), 20, what="web's listeners tracing at 100 %")
                wait_until(lambda: through(web_side.outbound, "api", "/ready")[0] == 200, 20, what="web -> api routable")
                t6, p6 = secrets.token_hex(16), secrets.token_hex(8)
                status, body = through(web_side.outbound, "api", "/to-backends", {"traceparent": f"00-{t6}-{p6}-01"})
                assert status == 200, f"expected 200, got {status} {body}"

                def zipkin_span() -> dict[str, Any] | None:
                    for path, headers, doc in list(zipkin.posts):
                        for s in doc:
                            if s["traceId"] == t6 and s.get("kind") == "CLIENT":
                                assert path == "/api/v2/spans" and headers.get("authorization") == "Bearer zipkin-secret", \
                                    f"expected Zipkin's path and the configured header, got {path} {headers}"
                                return s
                    return None

                def otlp_span() -> tuple[str, dict[str, Any]] | None:
                    for path, _, doc in list(otlp.posts):
                        for resource in doc["resourceSpans"]:
                            service = resource["resource"]["attributes"][0]["value"]["stringValue"]
                            for s in resource["scopeSpans"][0]["spans"]:
                                if s["traceId"] == t6 and path == "/v1/traces":
                                    return service, s
                    return None

                client = wait_until(zipkin_span, 30, interval=0.5, what=f"web's span of {t6} at the Zipkin backend")
                service, server = wait_until(otlp_span, 30, interval=0.5, what=f"api's span of {t6} at the OTLP backend")
                assert client["parentId"] == p6 and client["localEndpoint"]["serviceName"] == "web", f"got {client}"
                assert (service, server["kind"], server["parentSpanId"]) == ("api", 2, client["id"]), \
                    f"expected api's SERVER span under web's span {client['id']}, got {service} {server}"
                assert _trace(cp, t6) is None, "expected nothing shipped to the control plane when a backend is configured"
    finally:
        zipkin.close()
        otlp.close()


def test_a_sidecar_that_stops_ships_its_last_spans_on_the_way_out(cp: ControlPlaneProc, tmp_path: Path) -> None:
    """The shipper's post of the last request's span hangs (a backend that does not answer) when the
    agent is asked to stop: the span is still shipped before the agent exits, by a bounded final ship
    once Envoy stopped, and the node's span spool is shipped to its end."""
    status, body = cp.call("PUT", "/v1/policies/TracingPolicy/default/all",
                           {"kind": "TracingPolicy", "name": "all", "namespace": "default", "sampling": 100}, AUTH)
    assert status in (200, 201), f"expected the TracingPolicy stored, got {status} {body}"
    zipkin = Collector()
    try:
        web_doc = spec_doc("web", 1, free_port(), free_port(), drain="0s")
        web_doc["mesh"]["tracing"] = {"backend": f"http://127.0.0.1:{zipkin.port}/api/v2/spans"}
        with app("api") as api_app, app("web") as web_app:
            web_doc["spec"]["ports"][0]["targetPort"] = web_app.port
            with sidecar(tmp_path, "api", spec_doc("api", api_app.port, free_port(), free_port()), cp, "api-1"), \
                    sidecar(tmp_path, "web", web_doc, cp, "web-1") as web_side:
                wait_until(lambda: (s := _sampling(web_side)) and all(v == 100 for v in s), 20, what="web's listeners tracing at 100 %")
                wait_until(lambda: through(web_side.outbound, "api", "/ready")[0] == 200, 20, what="web -> api routable")
                t7, p7 = secrets.token_hex(16), secrets.token_hex(8)
                zipkin.hold = t7
                status, body = through(web_side.outbound, "api", "/last-span", {"traceparent": f"00-{t7}-{p7}-01"})
                assert status == 200, f"expected 200, got {status} {body}"
                wait_until(zipkin.held.is_set, 30, interval=0.2, what=f"web's shipper posting the span of {t7} (held unanswered)")
                assert web_side.terminate() == 0, f"expected web's agent to stop cleanly:\n{web_side.log.read_text()[-2000:]}"
                shipped = [s for _, _, doc in zipkin.posts for s in doc if s["traceId"] == t7]
                assert [s.get("kind") for s in shipped] == ["CLIENT"] and shipped[0]["parentId"] == p7, \
                    f"expected web's span of {t7} shipped by the agent on its way out, got {shipped}\n{web_side.log.read_text()[-2000:]}"
                files = web_side.dir / "traces"
                pending = json.loads((files / "cursor.json").read_text())
                newest = max(files.glob("spans-*.jsonl"))
                assert (pending["seq"], pending["offset"]) == (int(newest.name[6:-6]), newest.stat().st_size), \
                    f"expected web's span spool shipped to its end, cursor {pending}, newest file {newest.name} of {newest.stat().st_size} bytes"
    finally:
        zipkin.close()
