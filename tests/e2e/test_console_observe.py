"""The console's observing pages in a real browser (Debian's headless Chromium, driven by Playwright) against
a running mesh: a control plane scraped by Debian's Prometheus (the generated file_sd), three `meshpilot
sidecar` agents with real Envoys tracing every request (shop calls web, web calls api, through their sidecars), and an OpenAPI
document uploaded twice to the catalog. Each page must show what its API answers: the topology's edges and
numbers (graph and table), a trace in the list and as a waterfall (rows nested by parent, bars placed by
start and duration, tags on click, the trace's log lines under it), the log search, the catalog's
operations, versions and diff, and try-it sending an operation through the control plane's own sidecar. A span name, a log line and an
operation summary that look like markup render as text. Screenshots go to docs/console/ when asked."""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from tests.e2e.test_console import CHROMIUM, browser, shot, sign_in_at, watched_tab  # noqa: F401 (browser: a fixture used here)
from tests.e2e.test_sidecar import AUTH, TOKEN, app, sidecar, spec_doc
from tests.e2e.test_topology import PROMETHEUS, _scrape_time, prometheus, targets_up
from tests.e2e.test_tracing import _both_sidecars, _flat, _sampling
from tests.support import control_plane, free_port, through, tmpdir, wait_until

playwright = pytest.importorskip("playwright.sync_api", reason="the console's browser tests need playwright (pip install -e '.[test]')")

HOSTILE = '<img src=x onerror="window.__pwned=1">'
SENT = 30  # traced requests web sends to api through its sidecar


def _doc(version: str, ops: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"openapi": "3.0.3", "info": {"title": "Orders API", "version": version}, "paths": ops}


CATALOG_V1 = _doc("1.0", {
    "/orders/{id}": {"get": {"operationId": "getOrder", "summary": HOSTILE, "responses": {"200": {"description": "ok"}}}},
    "/orders": {"post": {"operationId": "createOrder", "summary": "Place an order", "responses": {"201": {"description": "made"}}}},
})
CATALOG_V2 = _doc("2.0", {
    "/orders/{id}": {"get": {"operationId": "getOrder", "summary": "Find an order by id", "responses": {"200": {"description": "ok"}},
                             "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}},
                                            {"name": "fields", "in": "query", "schema": {"type": "string"}}]},
                     "delete": {"operationId": "cancelOrder", "summary": "Cancel an order", "responses": {"204": {"description": "gone"}}}},
})


@dataclass
class Observed:
    cp: Any
    trace_id: str  # a trace web's app started (traceparent) through web's and api's sidecars
    hostile_trace: str  # a trace whose span name and tag are markup

    @property
    def base(self) -> str:
        return self.cp.api

    def api(self, path: str) -> Any:
        status, data = self.cp.call("GET", path, None, AUTH)
        assert status == 200, f"expected GET {path} to answer 200, got {status}: {data}"
        return data


@pytest.fixture(scope="module")
def observed() -> Iterator[Observed]:
    if not CHROMIUM.exists():
        pytest.fail(f"expected Debian's chromium at {CHROMIUM} (run.sh installs it)")
    if not __import__("pathlib").Path(PROMETHEUS).exists():
        pytest.fail(f"expected Debian's prometheus at {PROMETHEUS} (run.sh installs it)")
    workdir = tmpdir("meshpilot-console-observe-")
    sd_file = workdir / "sd" / "mesh.json"
    with contextlib.ExitStack() as stack:
        prom = stack.enter_context(prometheus(workdir, sd_file))
        cfg = workdir / "cp.yaml"
        console_out = free_port()  # the outbound listener of the control plane's own sidecar, which try-it sends through
        cfg.write_text(yaml.safe_dump({"token": TOKEN, "prometheus_sd_file": str(sd_file), "prometheus_url": prom,
                                       "hds_interval_s": 0.3, "debounce_ms": 20, "try_it_proxy": f"127.0.0.1:{console_out}"}))
        cp = stack.enter_context(control_plane(workdir, extra=["--config", str(cfg)]))
        status, body = cp.call("PUT", "/v1/policies/TracingPolicy/default/all",
                               {"kind": "TracingPolicy", "name": "all", "namespace": "default", "sampling": 100}, AUTH)
        assert status in (200, 201), f"expected the TracingPolicy stored, got {status} {body}"
        sides = {}
        for name in ("api", "web", "shop"):
            backend = stack.enter_context(app(name))
            doc = spec_doc(name, backend.port, free_port(), free_port())
            doc["mesh"]["sidecar"].update(adminPort=free_port(), statsPort=free_port())  # Prometheus scrapes the stats ports
            sides[name] = stack.enter_context(sidecar(workdir, name, doc, cp, f"{name}-1"))
        api_port = int(cp.api.rsplit(":", 1)[1])  # the control plane's sidecar: its app is the control plane's API
        sides["meshpilot-console"] = stack.enter_context(sidecar(
            workdir, "meshpilot-console", spec_doc("meshpilot-console", api_port, free_port(), console_out), cp, "control-plane-1"))
        for side in sides.values():
            wait_until(lambda side=side: (s := _sampling(side)) and all(v == 100 for v in s), 20,
                       what=f"{side.node_id}'s listeners tracing at 100 %")
        out = sides["web"].outbound
        wait_until(lambda: through(out, "api", "/ready")[0] == 200, 20, what="web -> api routable")
        wait_until(lambda: through(sides["shop"].outbound, "web", "/ready")[0] == 200, 20, what="shop -> web routable")
        # shop's, web's and api's stats listeners and the control plane (the control plane's own sidecar serves no stats)
        wait_until(lambda: len(targets_up(prom)) == 4 and all(t["health"] == "up" for t in targets_up(prom)), 30, 0.2,
                   what="Prometheus scraping three sidecars and the control plane")
        trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
        for i in range(SENT):
            headers = {"traceparent": f"00-{trace_id}-{parent}-01"} if i == SENT - 1 else {}
            status, body = through(out, "api", f"/orders/{i}", headers)
            assert status == 200, f"expected api's answer through web's sidecar, got {status}: {body}"
        for i in range(SENT // 2):  # shop calls web: three columns in the graph
            status, body = through(sides["shop"].outbound, "web", f"/cart/{i}")
            assert status == 200, f"expected web's answer through shop's sidecar, got {status}: {body}"
        done = time.time()
        wait_until(lambda: _both_sidecars(cp, trace_id), 40, 0.5, what=f"trace {trace_id} with web's and api's spans")

        def logged() -> bool:
            status, body = cp.call("GET", f"/v1/logs?trace_id={trace_id}", None, AUTH)
            return status == 200 and {r["service"] for r in body["records"]} >= {"web.default", "api.default"}

        wait_until(logged, 40, 0.5, what=f"both sidecars' access log records of trace {trace_id}")
        # a span whose name and tag look like markup, as any holder of a write token could ship
        hostile = secrets.token_hex(16)
        now_us = int(time.time() * 1e6)
        spans = [{"traceId": hostile, "id": secrets.token_hex(8), "name": HOSTILE, "kind": "SERVER", "timestamp": now_us,
                  "duration": 1500, "localEndpoint": {"serviceName": "xss-probe"}, "tags": {"http.url": HOSTILE}}]
        status, body = cp.call("POST", "/v1/spans", spans, AUTH)
        assert status == 201, f"expected the span kept, got {status}: {body}"
        record = {"id": secrets.token_hex(8), "time": time.time(), "node": "probe-1", "service": "xss-probe.default",
                  "instance": "probe-1", "source": "app", "level": "error", "line": HOSTILE}
        status, body = cp.call("POST", "/v1/logs", [record], AUTH)
        assert status == 201, f"expected the log record kept, got {status}: {body}"
        for doc in (CATALOG_V1, CATALOG_V2):
            status, body = cp.call("PUT", "/v1/catalog/default/api", doc, AUTH)
            assert status == 201 and body.get("created"), f"expected a new catalog version, got {status}: {body}"
        # the topology's numbers settle once every sidecar was scraped after the last request and Envoy's next histogram flush
        wait_until(lambda: all(_scrape_time(t) > done + 5.5 for t in targets_up(prom)), 30, 0.2,
                   what="a scrape of every target after the last request and the next histogram flush")
        yield Observed(cp, trace_id, hostile)


@pytest.fixture
def page(browser: Any, observed: Observed) -> Iterator[Any]:  # noqa: F811 (browser: the imported fixture)
    with watched_tab(browser) as pg:
        yield pg


def sign_in(pg: Any, base: str, then: str) -> None:
    sign_in_at(pg, base, TOKEN)
    pg.goto(f"{base}/ui/#/{then}")


def _percent(share: float) -> str:
    return f"{round(share * 10000) / 100:g} %"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:g} ms"


def test_topology_draws_the_apis_edges_with_their_numbers(page: Any, observed: Observed) -> None:
    before = observed.api("/v1/topology")
    edges = {(e["source"], e["destination"]): e for e in before["edges"]}
    e = edges.get(("web.default", "api.default"))
    assert e is not None and e["requests"] >= SENT, f"expected the edge web -> api with at least {SENT} requests, got {before['edges']}"
    sign_in(page, observed.base, "topology")
    page.wait_for_selector("#topology-graph")
    after = observed.api("/v1/topology")
    assert [x["requests"] for x in after["edges"]] == [x["requests"] for x in before["edges"]], \
        f"expected the topology not to move while the page loaded (no traffic), got {before['edges']} then {after['edges']}"
    nodes = page.locator("#topology-graph g.node").evaluate_all("els => els.map(e => e.dataset.id)")
    assert sorted(nodes) == sorted(n["id"] for n in before["nodes"]), f"expected a box per node {[n['id'] for n in before['nodes']]}, got {nodes}"
    drawn = page.locator("#topology-graph g.edge[data-source='web.default'][data-destination='api.default']")
    assert drawn.count() == 1, "expected one arrow web.default -> api.default"
    label = page.locator("#topology-graph text.edge-label[data-source='web.default'][data-destination='api.default']").text_content()
    want = f"{e['rps']:g} rps · {_percent(e['error_rate'])} 5xx · p99 {_ms(e['p99_ms'])}"
    assert label == want, f"expected the arrow labelled {want!r}, got {label!r}"
    # shop calls web, web calls api: a column each, callers to the left
    x = {n: float(page.locator(f"#topology-graph g.node[data-id='{n}'] rect").get_attribute("x")) for n in ("shop.default", "web.default", "api.default")}
    assert x["shop.default"] < x["web.default"] < x["api.default"], f"expected shop, web and api in columns left to right, got {x}"
    rows = [[c.strip() for c in r.split("\t")] for r in page.locator("#edges-table tbody tr").all_inner_texts()]
    want_rows = [[x["source"], x["destination"], str(x["requests"]), f"{x['rps']:g}", str(x["errors"]), _percent(x["error_rate"]),
                  _ms(x["p50_ms"]), _ms(x["p99_ms"]), x["reporter"]] for x in before["edges"]]
    assert rows == want_rows, f"expected a table row per edge {want_rows}, got {rows}"
    assert any(r[:2] == ["shop.default", "web.default"] for r in rows), f"expected the edge shop -> web, got {rows}"
    api_node = next(n for n in before["nodes"] if n["id"] == "api.default")
    node_row = page.locator("#nodes-table tbody tr", has_text="api.default").inner_text()
    assert str(api_node["requests_in"]) in node_row and "mesh" in node_row, f"expected api's {api_node['requests_in']} requests in, got {node_row!r}"
    shot(page, "topology.png")


def test_topology_says_when_prometheus_is_not_configured(browser: Any) -> None:  # noqa: F811
    workdir = tmpdir("meshpilot-console-noprom-")
    with control_plane(workdir) as cp:
        context = browser.new_context()
        try:
            pg = context.new_page()
            pg.goto(f"{cp.api}/ui/")
            pg.click("#signin button[type=submit]")
            pg.wait_for_selector("#services-page", timeout=10_000)
            pg.goto(f"{cp.api}/ui/#/topology")
            pg.wait_for_selector("#topology-page .notice.error")
            text = pg.inner_text("#topology-page .notice.error")
            status, body = cp.call("GET", "/v1/topology")
            assert status == 503, f"expected the API's 503 without prometheus_url, got {status}: {body}"
            assert "Prometheus is not configured" in text and body["error"] in text, f"expected the API's reason {body['error']!r}, got {text!r}"
        finally:
            context.close()


def test_traces_list_and_waterfall_show_the_trace_the_sidecars_shipped(page: Any, observed: Observed) -> None:
    # spans of the last requests may still be on their way (Envoy sends them in batches, every 5 s at the latest)
    seen: list[Any] = [None]

    def settled() -> Any:
        time.sleep(1.0)
        now = observed.api("/v1/traces?service=api&since=1h&limit=200")["traces"]
        same, seen[0] = now == seen[0], now
        return now if same else None

    listed = wait_until(settled, 30, 0, what="the list of api's traces to stop changing")
    summary = next((t for t in listed if t["trace_id"] == observed.trace_id), None)
    assert summary is not None, f"expected trace {observed.trace_id} listed for api, got {[t['trace_id'] for t in listed]}"
    sign_in(page, observed.base, "traces?service=api&since=1h&limit=200")
    page.wait_for_selector("#traces-table")
    ids = page.locator("#traces-table code.trace-id").all_inner_texts()
    assert ids == [t["trace_id"] for t in listed], f"expected the API's traces in its order, got {ids}"
    row = page.locator("#traces-table tbody tr", has=page.locator(f"code.trace-id:text-is('{observed.trace_id}')")).inner_text()
    assert ", ".join(summary["services"]) in row and str(summary["span_count"]) in row, f"expected the trace's services and span count, got {row!r}"
    shot(page, "traces.png")
    page.click(f"code.trace-id:text-is('{observed.trace_id}')")
    page.wait_for_selector("#waterfall")
    tree = observed.api(f"/v1/traces/{observed.trace_id}")
    spans = _flat(tree)
    order = page.locator("#waterfall .span-row[data-span]").evaluate_all(
        "els => els.map(e => [e.dataset.span, e.dataset.kind, e.querySelector('.span-label').dataset.depth])")
    assert len(order) == len(spans) == tree["span_count"], f"expected a row per span ({tree['span_count']}), got {order}"
    rows = {(sid, kind): int(depth) for sid, kind, depth in order}
    for s in spans:
        assert rows.get((s["id"], s.get("kind") or "")) == s["depth"], f"expected span {s['id']} ({s.get('kind')}) at depth {s['depth']}, got {order}"
    client = next(s for s in spans if s["service"] == "web" and s.get("kind") == "CLIENT")
    server = next(s for s in spans if s["service"] == "api" and s.get("kind") == "SERVER")
    positions = [(r[0], r[1]) for r in order]
    assert positions.index((client["id"], "CLIENT")) < positions.index((server["id"], "SERVER")), \
        f"expected web's client span above api's server span (its child), got {order}"
    for s in (client, server):
        row_el = page.locator(f"#waterfall .span-row[data-span='{s['id']}'][data-kind='{s['kind']}']")
        label = row_el.locator(".span-label").inner_text()
        assert s["service"] in label and s["name"] in label, f"expected {s['service']} and {s['name']!r} on the row, got {label!r}"
        rect = row_el.locator("svg.span-bar rect")
        left = float(rect.get_attribute("x").rstrip("%"))
        want = 100 * s["offset_us"] / max(1, tree["duration_us"])
        assert abs(left - want) < 0.01, f"expected span {s['id']}'s bar at {want:.3f} % of the trace, got {left} %"
    server_row = page.locator(f"#waterfall .span-row[data-span='{server['id']}'][data-kind='SERVER']")
    server_row.click()
    details = server_row.locator("xpath=following-sibling::div[1]")
    details.wait_for(state="visible")
    text = details.inner_text()
    for key, value in server["tags"].items():
        assert key in text and str(value) in text, f"expected tag {key}={value!r} among the shown tags, got {text!r}"
    logs = observed.api(f"/v1/logs?trace_id={observed.trace_id}&limit=200")["records"]
    shown_logs = page.locator("#trace-logs code.log-line").all_inner_texts()
    assert sorted(shown_logs) == sorted(r["line"] for r in logs), f"expected the trace's {len(logs)} log lines under the waterfall, got {shown_logs}"
    shot(page, "trace.png")


def test_logs_search_shows_what_the_api_finds(page: Any, observed: Observed) -> None:
    want = observed.api(f"/v1/logs?service=api&trace_id={observed.trace_id}&since=1h")["records"]
    assert want and all(r["service"] == "api.default" for r in want), f"expected api's records of the trace, got {want}"
    sign_in(page, observed.base, "logs")
    page.wait_for_selector("#logs-table")
    page.fill("#logs-service", "api")
    page.fill("#logs-trace_id", observed.trace_id)
    page.click("#logs-form button[type=submit]")
    page.wait_for_selector(f"#logs-page:has(#logs-trace_id[value='{observed.trace_id}'])")
    rows = page.locator("#logs-table tbody tr").all_inner_texts()
    assert len(rows) == len(want), f"expected the API's {len(want)} records, got {rows}"
    for row, rec in zip(rows, want):
        assert rec["line"] in row and "api-1" in row and rec["source"] in row, f"expected {rec['line']!r} of api-1, got {row!r}"
    shot(page, "logs.png")
    page.click("#logs-table a:has(code.trace-id)")
    page.wait_for_selector("#waterfall")
    assert page.inner_text("#trace-id") == observed.trace_id, "expected a record's trace link to open its waterfall"


def test_a_refused_log_search_names_the_field_and_a_hostile_line_is_text(page: Any, observed: Observed) -> None:
    sign_in(page, observed.base, "logs?trace_id=not-hex")
    page.wait_for_selector("#logs-page .notice.error")
    item = page.locator("#field-errors li[data-field=trace_id]")
    assert item.count() == 1 and "hex" in item.inner_text(), f"expected the API's refusal naming trace_id, got {page.inner_text('#logs-page')!r}"
    page.goto(f"{observed.base}/ui/#/logs?service=xss-probe")
    page.wait_for_selector("#logs-table code.log-line")
    assert page.inner_text("#logs-table code.log-line") == HOSTILE, "expected the hostile line shown as text"
    assert page.locator("main img, main script").count() == 0 and page.evaluate("window.__pwned") is None, \
        "expected no element or script made from a log line"


def test_a_span_that_looks_like_markup_renders_as_text(page: Any, observed: Observed) -> None:
    sign_in(page, observed.base, f"traces/{observed.hostile_trace}")
    page.wait_for_selector("#waterfall")
    label = page.inner_text("#waterfall .span-row[data-span] .span-name")
    assert label == HOSTILE, f"expected the span name shown as text, got {label!r}"
    page.click("#waterfall .span-row[data-span]")
    page.wait_for_selector(".span-open:not([hidden]) tr[data-tag='http.url']")
    assert HOSTILE in page.inner_text(".span-open tr[data-tag='http.url']"), "expected the tag value shown as text"
    assert page.locator("main img, main script").count() == 0, "expected no element made from an API value"
    assert page.evaluate("window.__pwned") is None, "expected no script from an API value to have run"


def test_catalog_shows_operations_versions_and_the_diff(page: Any, observed: Observed) -> None:
    listed = observed.api("/v1/catalog")
    api = next((c for c in listed if c["service"] == "api.default"), None)
    assert api is not None and api["current"]["number"] == 2, f"expected api's catalog at version 2, got {listed}"
    sign_in(page, observed.base, "catalog")
    page.wait_for_selector("#catalog-table")
    row = page.locator("#catalog-table tbody tr", has_text="api").inner_text()
    assert "v2" in row and "Orders API" in row and str(api["current"]["operations"]) in row, f"expected api's current version, got {row!r}"
    shot(page, "catalog.png")
    page.click("#catalog-table a:text-is('api')")
    page.wait_for_selector("#operations")
    current = observed.api("/v1/catalog/default/api")
    ops = page.locator("#operations tbody tr").all_inner_texts()
    assert len(ops) == len(current["operations"]), f"expected {len(current['operations'])} operations, got {ops}"
    for op in current["operations"]:
        assert any(op["method"] in r and op["path"] in r and op["operation_id"] in r and op["summary"] in r for r in ops), \
            f"expected {op['method']} {op['path']} {op['operation_id']} {op['summary']!r} in the operations, got {ops}"
    versions = page.locator("#versions tbody tr").all_inner_texts()
    assert [r.split("\t")[0].strip() for r in versions] == ["v2", "v1"], f"expected versions v2 and v1, newest first, got {versions}"
    page.select_option("#diff-from", "1")
    page.select_option("#diff-to", "2")
    page.click("#diff-button")
    page.wait_for_selector("#catalog-diff")
    d = observed.api("/v1/catalog/default/api/diff?from=1&to=2")
    for kind in ("added", "removed"):
        shown = page.inner_text(f"#catalog-diff section[data-diff={kind}]") if d[kind] else ""
        for op in d[kind]:
            assert op["operation_id"] in shown and op["path"] in shown, f"expected {op['operation_id']} among the {kind} operations, got {shown!r}"
    changed = page.inner_text("#catalog-diff section[data-diff=changed]")
    for c in d["changed"]:
        for name, ch in c["changes"].items():
            assert name in changed, f"expected the changed field {name} of {c['key']}, got {changed!r}"
            if name == "summary":
                assert ch["from"] in changed and ch["to"] in changed, f"expected the summary from {ch['from']!r} to {ch['to']!r}, got {changed!r}"
    assert any(c["operation_id"] == "getOrder" for c in d["changed"]), f"expected getOrder changed, got {d['changed']}"
    shot(page, "catalog-diff.png")
    # v1's hostile summary, shown as the old version's operations
    page.click("#versions a:text-is('v1')")
    page.wait_for_selector("#operations-title:has-text('v1')")
    summaries = page.locator("#operations .op-summary").all_inner_texts()
    assert HOSTILE in summaries, f"expected v1's summary shown as text, got {summaries}"
    assert page.locator("main img, main script").count() == 0 and page.evaluate("window.__pwned") is None, \
        "expected no element or script made from an operation's summary"
    assert re.search(r"Operations of v1\b", page.inner_text("#operations-title")), "expected the page to name the version shown"


def _console_and_api(cp: Any, trace_id: str) -> bool:
    status, tree = cp.call("GET", f"/v1/traces/{trace_id}", None, AUTH)
    return status == 200 and {("meshpilot-console", "CLIENT"), ("api", "SERVER")} <= {(s["service"], s.get("kind")) for s in _flat(tree)}


def test_try_it_sends_an_operation_through_the_mesh_and_links_its_trace(page: Any, observed: Observed) -> None:
    sign_in(page, observed.base, "catalog/default/api")
    page.wait_for_selector("#operations")
    page.click("#operations button.try-button[data-operation=getOrder]")
    page.wait_for_selector("#try-panel[data-operation=getOrder]")
    page.fill("#try-panel input[name='path.id']", "42 x")
    page.fill("#try-panel input[name='query.fields']", "name")
    page.click("#try-send")
    page.wait_for_selector("#try-status")
    status = page.inner_text("#try-status")
    answer = json.loads(page.inner_text("#try-response"))
    assert status.startswith("200") and "GET /orders/42%20x?fields=name" in status, f"expected the app's 200 for the request sent, got {status!r}"
    assert answer["server"] == "api" and answer["path"] == "/orders/42%20x?fields=name", f"expected api's app to answer the request, got {answer}"
    assert answer["headers"].get("x-mesh-caller") == "meshpilot-console", f"expected the request to come through the control plane's sidecar, got {answer}"
    trace_id = answer["headers"]["traceparent"].split("-")[1]
    assert trace_id[:12] in status, f"expected a link to the try's trace {trace_id}, got {status!r}"
    assert page.inner_text("#try-result").split()[-1] != "null", f"expected only the answer under the form, got {page.inner_text('#try-result')!r}"
    wait_until(lambda: _console_and_api(observed.cp, trace_id), 40, 0.5, what=f"trace {trace_id} with the control plane's sidecar's and api's spans")
    page.wait_for_selector("#try-trace .tryit-trace[data-complete=true]", timeout=60_000)  # drawn under the answer (tryit.js)
    shot(page, "catalog-try.png")
    page.click("#try-status a")
    page.wait_for_selector("#waterfall")
    services = page.locator("#waterfall .span-row[data-span] .service-name").all_inner_texts()
    assert {"meshpilot-console", "api"} <= set(services), f"expected the try's trace through both sidecars, got {services}"


def test_try_it_with_a_read_token_shows_the_apis_refusal(browser: Any, observed: Observed) -> None:  # noqa: F811
    status, made = observed.cp.call("POST", "/v1/access/tokens", {"scope": "read", "description": "console try-it"}, AUTH)
    assert status == 201, f"expected a read token made, got {status}: {made}"
    context = browser.new_context()
    try:
        pg = context.new_page()
        pg.goto(f"{observed.base}/ui/")
        pg.fill("#token", made["secret"])
        pg.click("#signin button[type=submit]")
        pg.wait_for_selector("#services-page", timeout=10_000)
        pg.goto(f"{observed.base}/ui/#/catalog/default/api")
        pg.click("#operations button.try-button[data-operation=getOrder]")
        pg.fill("#try-panel input[name='path.id']", "1")
        pg.click("#try-send")
        pg.wait_for_selector("#try-result .notice.error")
        refusal = pg.inner_text("#try-result")
        assert "scope read" in refusal and "write" in refusal, f"expected the API's 403 reason, got {refusal!r}"
    finally:
        context.close()
        observed.cp.call("DELETE", f"/v1/access/tokens/{made['id']}", None, AUTH)


@pytest.mark.parametrize("where", ["topology", "traces", "logs", "catalog", "catalog/default/api"])
def test_a_revoked_token_on_an_observing_page_goes_back_to_sign_in(browser: Any, observed: Observed, where: str) -> None:  # noqa: F811
    status, made = observed.cp.call("POST", "/v1/access/tokens", {"scope": "read", "description": f"console {where}"}, AUTH)
    assert status == 201, f"expected a read token made, got {status}: {made}"
    context = browser.new_context()
    try:
        pg = context.new_page()
        pg.goto(f"{observed.base}/ui/")
        pg.fill("#token", made["secret"])
        pg.click("#signin button[type=submit]")
        pg.wait_for_selector("#services-page", timeout=10_000)
        status, body = observed.cp.call("DELETE", f"/v1/access/tokens/{made['id']}", None, AUTH)
        assert status in (200, 204), f"expected the token revoked, got {status}: {body}"
        pg.goto(f"{observed.base}/ui/#/{where}")
        pg.wait_for_selector("#signin-status .notice.error", timeout=10_000)
        shown = pg.inner_text("#signin-status")
        assert "Signed out" in shown and "not valid" in shown, f"expected the sign-in page to say why on #/{where}, got {shown!r}"
        assert pg.locator("#topology-graph, #traces-table, #logs-table, #catalog-table, #operations").count() == 0, \
            f"expected no data of #/{where} shown after the 401"
    finally:
        context.close()
