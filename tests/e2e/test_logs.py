"""Logs and alerts end to end: a real control plane, two real `meshpilot sidecar` agents with real Envoys,
a real HTTP app behind one of them that writes its own log file.

Requests through the mesh become access-log records searchable by service and by trace id (the trace id
of a traced request is the one ``/v1/traces`` has, and the app's line naming it is found with it); the
app's log lines are searchable; a stranger's records get 401 and nothing is kept; a log alert rule goes
firing when errors pass its threshold and back to inactive when they leave its window; records written
while the control plane is down arrive once it is back, and the rule is still there. A metric rule on
Debian's Prometheus (scraping the control plane's /metrics) fires and goes back to inactive, and a
query Prometheus refuses is shown as the rule's error.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import time
from collections.abc import Iterator
from http import server as httpserver
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.test_sidecar import AUTH, TOKEN, app, sidecar, spec_doc
from tests.e2e.test_topology import PROMETHEUS, prometheus
from tests.e2e.test_tracing import _sampling
from tests.support import ControlPlaneProc, free_port, http, through, wait_until

pytestmark = pytest.mark.e2e


class LoggingApp:
    """An HTTP app that writes one line per request to its log file (level, path, the trace id it got),
    and answers 500 (logging ERROR) on paths under /fail."""

    def __init__(self, log_file: Path) -> None:
        self.log_file = log_file
        self._lock = threading.Lock()
        owner = self

        class H(httpserver.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                failing = self.path.startswith("/fail")
                status = 500 if failing else 200
                if self.path != "/healthz":
                    trace = self.headers.get("x-b3-traceid", "-")
                    level = "ERROR payment failed" if failing else "INFO served"
                    owner.write(f"{time.strftime('%H:%M:%S')} {level} path={self.path} trace_id={trace}")
                body = json.dumps({"server": "api", "path": self.path,
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
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def write(self, text: str) -> None:
        with self._lock, self.log_file.open("a") as f:
            f.write(text + "\n")

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


@contextlib.contextmanager
def logging_app(log_file: Path) -> Iterator[LoggingApp]:
    a = LoggingApp(log_file)
    try:
        yield a
    finally:
        a.close()


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ControlPlaneProc]:
    cfg = tmp_path / "cp.yaml"
    cfg.write_text(yaml.safe_dump({"hds_interval_s": 0.3, "debounce_ms": 20, "token": TOKEN, "alert_interval_s": 0.5}))
    c = ControlPlaneProc(tmp_path, extra=["--config", str(cfg)])
    try:
        yield c.start()
    finally:
        c.stop()


def _logs(cp: ControlPlaneProc, query: str) -> list[dict[str, Any]]:
    status, body = cp.call("GET", f"/v1/logs?{query}", headers=AUTH)
    assert status == 200, f"expected GET /v1/logs?{query} to answer 200, got {status} {body}"
    return list(body["records"])


def _alert(cp: ControlPlaneProc, name: str) -> dict[str, Any]:
    status, body = cp.call("GET", f"/v1/alerts/{name}", headers=AUTH)
    assert status == 200, f"expected the alert rule {name}, got {status} {body}"
    return dict(body)


def _until_state(cp: ControlPlaneProc, name: str, state: str, timeout: float, what: str) -> dict[str, Any]:
    seen: list[dict[str, Any]] = [{}]

    def reached() -> dict[str, Any] | None:
        seen[0] = _alert(cp, name)
        return seen[0] if seen[0]["state"] == state else None

    try:
        return dict(wait_until(reached, timeout, interval=0.3, what=what))
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the rule last showed {seen[0]}") from None


def _access_line(r: dict[str, Any]) -> dict[str, Any]:
    return dict(json.loads(r["line"]))


def test_access_and_app_logs_are_searchable_linked_to_traces_alerted_on_and_survive_the_control_plane_down(
        cp: ControlPlaneProc, tmp_path: Path) -> None:
    status, body = cp.call("PUT", "/v1/policies/TracingPolicy/default/all",
                           {"kind": "TracingPolicy", "name": "all", "namespace": "default", "sampling": 100}, AUTH)
    assert status in (200, 201), f"expected the TracingPolicy stored, got {status} {body}"
    app_log = tmp_path / "api-app.log"
    api_doc = spec_doc("api", 0, free_port(), free_port())
    with logging_app(app_log) as api_app, app("web") as web_app:
        api_doc["spec"]["ports"][0]["targetPort"] = api_app.port
        api_doc["mesh"]["logs"] = {"files": [{"path": str(app_log)}]}
        with sidecar(tmp_path, "api", api_doc, cp, "api-1") as api_side, \
                sidecar(tmp_path, "web", spec_doc("web", web_app.port, free_port(), free_port()), cp, "web-1") as web_side:
            wait_until(lambda: through(web_side.outbound, "api", "/ready")[0] == 200, 20, what="web -> api routable")

            # a traced request: its access records (both sidecars) and the app's line carry the trace id
            t1, p1 = secrets.token_hex(16), secrets.token_hex(8)
            status, body = through(web_side.outbound, "api", "/traced", {"traceparent": f"00-{t1}-{p1}-01"})
            assert status == 200, f"expected api's answer, got {status} {body}"

            def trace_with_logs() -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
                s, tree = cp.call("GET", f"/v1/traces/{t1}", headers=AUTH)
                found = _logs(cp, f"trace_id={t1}")
                kinds = {(r["service"], r["source"]) for r in found}
                if s == 200 and {("web.default", "access"), ("api.default", "access"), ("api.default", "app")} <= kinds:
                    return tree, found
                return None

            tree, found = wait_until(trace_with_logs, 40, interval=0.5,
                                     what=f"trace {t1} and the access records of both sidecars and api's app line under its id")
            assert tree["trace_id"] == t1 and all(r["trace_id"] == tree["trace_id"] for r in found), \
                f"expected every record to carry the trace's id {tree['trace_id']}, got {[r['trace_id'] for r in found]}"
            assert all(r["trace"] == f"/v1/traces/{t1}" for r in found), f"expected each record to link its trace, got {found}"
            assert tree.get("logs") == f"/v1/logs?trace_id={t1}", f"expected the trace to link its log lines, got {tree.get('logs')}"
            s, linked = cp.call("GET", tree["logs"], headers=AUTH)
            assert s == 200 and {r["id"] for r in linked["records"]} >= {r["id"] for r in found}, \
                f"expected the trace's link to find its records, got {s} {linked}"
            inbound = [r for r in found if r["service"] == "api.default" and r["source"] == "access"]
            line = _access_line(inbound[0])
            assert (line["direction"], line["path"], line["trace_id"], inbound[0]["instance"]) == ("inbound", "/traced", t1, "api-1"), \
                f"expected api's inbound access line for /traced, got {inbound[0]}"
            app_line = next(r for r in found if r["source"] == "app")
            assert "path=/traced" in app_line["line"] and app_line["level"] == "info", f"expected the app's own line, got {app_line}"

            # a request its caller chose not to sample: no spans, and still its trace id in the access records
            t0 = secrets.token_hex(16)
            status, _ = through(web_side.outbound, "api", "/unsampled", {"traceparent": f"00-{t0}-{secrets.token_hex(8)}-00"})
            assert status == 200, f"expected api's answer, got {status}"
            unsampled = wait_until(lambda: (x := _logs(cp, f"trace_id={t0}&source=access")) and len(x) >= 2 and x, 30,
                                   interval=0.5, what=f"both sidecars' access records of an unsampled request under its trace id {t0}")
            assert {_access_line(r)["path"] for r in unsampled} == {"/unsampled"}, unsampled

            # by service: every request's access record, and the app's lines by text
            for i in range(3):
                assert through(web_side.outbound, "api", f"/plain-{i}")[0] == 200
            wait_until(lambda: {f"/plain-{i}" for i in range(3)} <= {
                _access_line(r).get("path") for r in _logs(cp, "service=api&source=access&since=10m")}, 30, interval=0.5,
                what="api's access records of /plain-0..2")
            outbound = wait_until(lambda: (x := _logs(cp, "service=web&source=access&q=/plain-")) and len(x) >= 3 and x, 30,
                                  interval=0.5, what="web's access records of /plain-0..2")
            assert {_access_line(r)["destination_service"] for r in outbound} == {"api.default"} and len(outbound) == 3, \
                f"expected web's 3 outbound access records to api, got {outbound}"
            app_lines = wait_until(lambda: (x := _logs(cp, "service=api&source=app&q=path=/plain-")) and len(x) == 3 and x, 30,
                                   interval=0.5, what="api's 3 app lines for /plain-0..2")
            assert all(r["service"] == "api.default" and r["instance"] == "api-1" for r in app_lines), app_lines

            # a stranger's records: 401, nothing kept
            forged = [{"id": secrets.token_hex(8), "time": time.time(), "node": "x", "service": "api.default",
                       "source": "app", "line": "forged-line"}]
            for headers in ({}, {"Authorization": "Bearer not-a-token"}):
                s, b, _ = http("POST", cp.api + "/v1/logs", forged, headers)
                assert s == 401, f"expected 401 for records without a valid token, got {s} {b}"
            assert _logs(cp, "q=forged-line") == [], "expected nothing of the stranger's records kept"

            # a log alert rule: more than 2 errors of api in 5 s, for 1 s
            rule = {"log": {"service": "api", "level": "error", "window": "5s"}, "op": ">", "threshold": 2, "for": "1s"}
            s, b = cp.call("PUT", "/v1/alerts/api-errors", rule, AUTH)
            assert s == 201, f"expected the rule created, got {s} {b}"
            wait_until(lambda: _alert(cp, "api-errors")["evaluated_at"] is not None, 10, what="a first evaluation")
            assert _alert(cp, "api-errors")["state"] == "inactive", f"expected inactive without errors, got {_alert(cp, 'api-errors')}"
            for i in range(4):
                assert through(web_side.outbound, "api", f"/fail-{i}")[0] == 500
            firing = _until_state(cp, "api-errors", "firing", 30, "the rule firing after 4 failed requests")
            assert firing["value"] > 2 and firing["error"] is None, f"expected a count above 2, got {firing}"
            errors = wait_until(lambda: (x := _logs(cp, "service=api&level=error&since=1m")) and len(x) >= 8 and x, 30, interval=0.3,
                                what="api's 4 access records (500) and 4 app lines (ERROR) at level error")
            assert sorted(r["source"] for r in errors) == ["access"] * 4 + ["app"] * 4, \
                f"expected the 500 access records and the app's ERROR lines, got {errors}"
            back = _until_state(cp, "api-errors", "inactive", 30, "the rule inactive again once the errors left its 5 s window")
            assert back["since"] > firing["since"] and back["value"] == 0, f"got {back}"

            # sampling at 0 %: a request nobody samples still has one trace id in both sidecars' access records
            status, body = cp.call("PUT", "/v1/policies/TracingPolicy/default/all",
                                   {"kind": "TracingPolicy", "name": "all", "namespace": "default", "sampling": 0}, AUTH)
            assert status in (200, 201), f"expected the TracingPolicy changed, got {status} {body}"
            for side in (web_side, api_side):
                wait_until(lambda side=side: _sampling(side) == [] and '"random_sampling": {}' in side.admin("/config_dump?resource=dynamic_listeners"),
                           20, what=f"{side.node_id}'s listeners tracing at 0 % (a percentage of 0 is left out of the dump)")
            assert through(web_side.outbound, "api", "/never-sampled")[0] == 200
            never = wait_until(lambda: (x := _logs(cp, "source=access&q=/never-sampled")) and len(x) >= 2 and x, 30,
                               interval=0.5, what="both sidecars' access records of /never-sampled")
            ids = {r["trace_id"] for r in never}
            assert len(ids) == 1 and "" not in ids, f"expected one trace id in both records of an unsampled request, got {never}"

            # the control plane down: records wait in the nodes' spools, then arrive
            ports = dict(cp.ports)
            cp.stop()
            t2, p2 = secrets.token_hex(16), secrets.token_hex(8)
            status, _ = through(web_side.outbound, "api", "/while-down", {"traceparent": f"00-{t2}-{p2}-01"})
            assert status == 200, f"expected requests to flow with the control plane down, got {status}"

            def spooled(side: Any) -> bool:
                return any("/while-down" in p.read_text() for p in (side.dir / "logs").glob("logs-*.jsonl"))

            for side in (web_side, api_side):
                wait_until(lambda side=side: spooled(side), 30, interval=0.3,
                           what=f"{side.node_id}'s record of /while-down in its log spool while the control plane is down")
            cp.xds_port_wanted, cp.api_port_wanted = ports["xds"], ports["api"]
            cp.start()
            late = wait_until(lambda: (x := _logs(cp, f"trace_id={t2}")) and {(r["service"], r["source"]) for r in x} >= {
                ("web.default", "access"), ("api.default", "access"), ("api.default", "app")} and x, 60, interval=0.5,
                what="the records written while the control plane was down")
            assert all(r["trace_id"] == t2 for r in late), late
            s, b = cp.call("GET", "/v1/alerts", headers=AUTH)
            assert s == 200 and [a["name"] for a in b["alerts"]] == ["api-errors"], f"expected the rule kept across the restart, got {s} {b}"

            # a node that stops: its last lines are shipped on the way out
            assert through(web_side.outbound, "api", "/last-words")[0] == 200
            assert api_side.terminate() == 0, f"expected api's agent to stop cleanly:\n{api_side.log.read_text()[-2000:]}"
            last = wait_until(lambda: {r["source"] for r in _logs(cp, "service=api&q=/last-words")} == {"access", "app"}, 15,
                              interval=0.3, what="api's access record and app line of its last request after it stopped")
            assert last
            pending = json.loads((api_side.dir / "logs" / "cursor.json").read_text())
            newest = max((api_side.dir / "logs").glob("logs-*.jsonl"))
            assert (pending["seq"], pending["offset"]) == (int(newest.name[5:-6]), newest.stat().st_size), \
                f"expected api's log spool shipped to its end when it stopped, cursor {pending}, newest file {newest.name} of {newest.stat().st_size} bytes"


@pytest.mark.skipif(not Path(PROMETHEUS).exists(), reason="Debian's prometheus is not installed (run.sh installs it)")
def test_a_metric_rule_fires_on_a_real_prometheus_and_goes_back_to_inactive(tmp_path: Path) -> None:
    """The control plane's own /metrics scraped by Debian's Prometheus (from the generated file_sd file);
    a rule on the 404s its management API answered in the last 10 s."""
    sd_file = tmp_path / "targets.json"
    with contextlib.ExitStack() as stack:
        prom = stack.enter_context(prometheus(tmp_path, sd_file))
        cfg = tmp_path / "cp.yaml"
        cfg.write_text(yaml.safe_dump({"token": TOKEN, "alert_interval_s": 0.5, "prometheus_sd_file": str(sd_file),
                                       "prometheus_url": prom}))
        cp = ControlPlaneProc(tmp_path, extra=["--config", str(cfg)])
        stack.callback(cp.stop)
        cp.start()
        query = 'sum(increase(meshpilot_api_requests_total{status="404"}[10s]))'
        # one 404 first: increase() counts from a series' first sample, so the series must exist before the burst
        assert cp.call("GET", "/v1/services/default/no-such-service", headers=AUTH)[0] == 404
        series = f"{prom}/api/v1/query?query=meshpilot_api_requests_total%7Bstatus%3D%22404%22%7D"
        wait_until(lambda: http("GET", series)[1]["data"]["result"], 30, interval=0.5,
                   what="prometheus scraping the control plane's 404 counter")
        rule = {"metric": {"query": query}, "op": ">", "threshold": 3}
        s, b = cp.call("PUT", "/v1/alerts/api-404s", rule, AUTH)
        assert s == 201, f"expected the rule created, got {s} {b}"
        s, b = cp.call("PUT", "/v1/alerts/broken", {"metric": {"query": "sum(("}, "threshold": 1}, AUTH)
        assert s == 201, f"expected the rule created (PromQL is Prometheus' to judge), got {s} {b}"
        broken = wait_until(lambda: (a := _alert(cp, "broken"))["error"] and a, 20, interval=0.3, what="the broken rule's error")
        assert "Prometheus refused" in broken["error"] and broken["state"] == "inactive", f"expected Prometheus' refusal shown, got {broken}"
        for _ in range(10):
            s, _b = cp.call("GET", "/v1/services/default/no-such-service", headers=AUTH)
            assert s == 404, f"expected 404 for a service that does not exist, got {s}"
        firing = _until_state(cp, "api-404s", "firing", 30, "the metric rule firing after 10 answers 404")
        assert firing["value"] > 3 and firing["error"] is None, f"got {firing}"
        back = _until_state(cp, "api-404s", "inactive", 40, "the metric rule inactive once the 404s left the 10 s window")
        assert back["since"] > firing["since"], f"got {back}"
