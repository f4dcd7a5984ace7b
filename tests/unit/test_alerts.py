"""Alert rules: validation with field errors, the state machine (inactive -> pending -> firing -> inactive)
on a fake clock, evaluation of log and metric rules, the routes and their persistence in the store."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from meshpilot.alerts.plugin import Alerts, PrometheusError, alert_routes
from meshpilot.alerts.rules import AlertRule, AlertState, parse_duration, pick, step
from meshpilot.api.app import build_api
from meshpilot.controlplane import ControlPlane
from meshpilot.logs.store import LogStore
from meshpilot.model import field_errors
from meshpilot.registry.store import MemoryStore, SqliteStore
from meshpilot.settings import Settings
from meshpilot.telemetry.logs import normalise

LOG_RULE = {"name": "pay-errors", "log": {"service": "pay", "level": "error", "window": "1m"}, "op": ">", "threshold": 2, "for": "30s"}


def _fields(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as err:
        AlertRule.model_validate(doc)
    return [f["field"] for f in field_errors(err.value)]


@pytest.mark.parametrize("change,field", [
    ({"name": "Bad Name"}, "name"), ({"threshold": "many"}, "threshold"), ({"op": "=~"}, "op"),
    ({"for": "soon"}, "for"), ({"for": "2d"}, "for"), ({"log": {"window": "0s"}}, "log.window"),
    ({"log": {"window": "5m", "level": "loud"}}, "log.level"), ({"log": {"window": "5m", "source": "disk"}}, "log.source"),
    ({"log": {"window": "5m", "extra": 1}}, "log.extra"), ({"metric": {"query": ""}, "log": None}, "metric.query"),
    ({"colour": "red"}, "colour"),
])
def test_a_bad_rule_is_refused_naming_the_field(change: dict[str, Any], field: str) -> None:
    doc = {k: v for k, v in {**LOG_RULE, **change}.items() if v is not None}
    got = _fields(doc)
    assert any(f == field or f.startswith(field) or f.replace("for_", "for") == field for f in got), f"expected {field} named, got {got}"


def test_a_rule_has_one_query() -> None:
    both = {**LOG_RULE, "metric": {"query": "up"}}
    neither = {k: v for k, v in LOG_RULE.items() if k != "log"}
    for doc in (both, neither):
        with pytest.raises(ValidationError) as err:
            AlertRule.model_validate(doc)
        assert "one of log or metric" in str(err.value), f"expected the choice named, got {err.value}"
    rule = AlertRule.model_validate(LOG_RULE)
    assert (rule.kind, rule.for_, rule.log and rule.log.window) == ("log", 30.0, 60.0), rule
    assert AlertRule.model_validate(rule.doc()) == rule, "expected a rule to read back from its stored document"


@given(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12)))
@settings(max_examples=300)
def test_any_duration_is_read_in_range_or_refused(v: Any) -> None:
    try:
        n = parse_duration(v)
    except ValueError as exc:
        assert "duration" in str(exc) or "between" in str(exc), f"expected a reason, got {exc}"
    else:
        assert 0 <= n <= 86_400, f"{v!r} read as {n}"


def test_the_state_machine_on_a_fake_clock() -> None:
    s = AlertState()
    assert s.doc()["state"] == "inactive" and s.since is None
    s = step(s, 100.0, 30.0, False, 1.0)
    assert (s.state, s.since, s.value) == ("inactive", 100.0, 1.0)
    s = step(s, 110.0, 30.0, True, 5.0)
    assert (s.state, s.since) == ("pending", 110.0), f"expected pending from the first evaluation that holds, got {s}"
    s = step(s, 130.0, 30.0, True, 6.0)
    assert (s.state, s.since, s.value) == ("pending", 110.0, 6.0), f"expected still pending before `for` has passed, got {s}"
    s = step(s, 135.0, 30.0, False, None, "prometheus_url: cannot reach")
    assert (s.state, s.since, s.error) == ("pending", 110.0, "prometheus_url: cannot reach"), f"expected a failed evaluation to change no state, got {s}"
    s = step(s, 140.0, 30.0, True, 7.0)
    assert (s.state, s.since, s.error) == ("firing", 140.0, ""), f"expected firing once it held for 30 s, got {s}"
    s = step(s, 150.0, 30.0, True, 8.0)
    assert (s.state, s.since, s.value) == ("firing", 140.0, 8.0)
    s = step(s, 160.0, 30.0, False, 0.0)
    assert (s.state, s.since) == ("inactive", 160.0), f"expected inactive at the first evaluation that does not hold, got {s}"
    s = step(s, 170.0, 30.0, True, 9.0)
    s = step(s, 175.0, 30.0, False, 0.0)
    assert (s.state, s.since) == ("inactive", 175.0), "expected a pending alert that stops holding to go back to inactive"
    assert step(AlertState(), 1.0, 0.0, True, 1.0).state == "firing", "expected `for: 0` to fire at once"


@pytest.mark.parametrize("values,op,threshold,expected", [
    ([], ">", 1, (None, False)), ([0.5, 3.0], ">", 1, (3.0, True)), ([0.5, 0.7], ">", 1, (0.7, False)),
    ([5.0, 0.2], "<", 1, (0.2, True)), ([5.0, 4.0], "<=", 1, (4.0, False)), ([2.0], "==", 2, (2.0, True)),
])
def test_a_query_of_several_series_holds_when_any_does(values: list[float], op: str, threshold: float, expected: Any) -> None:
    assert pick(values, op, threshold) == expected


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _errors(store: LogStore, t: float, n: int, service: str = "pay.default") -> None:
    store.add([normalise({"id": secrets.token_hex(8), "time": t, "node": "n", "service": service, "source": "app",
                          "level": "error", "line": "payment failed"}) for _ in range(n)])


async def test_a_log_rule_goes_pending_firing_and_back_with_the_records_in_its_window() -> None:
    logs, clock = LogStore(), Clock(1000.0)
    alerts = Alerts(MemoryStore(), lambda: logs, None, clock)
    await alerts.put(AlertRule.model_validate(LOG_RULE))
    await alerts.evaluate()
    assert alerts.states["pay-errors"].state == "inactive"
    _errors(logs, 1000.0, 3)
    _errors(logs, 1000.0, 10, service="web.default")  # another service's errors do not count
    clock.t = 1005.0
    await alerts.evaluate()
    s = alerts.states["pay-errors"]
    assert (s.state, s.value) == ("pending", 3.0), f"expected pending with 3 errors in the window, got {s}"
    clock.t = 1040.0
    await alerts.evaluate()
    assert alerts.states["pay-errors"].state == "firing", f"expected firing after 30 s, got {alerts.states['pay-errors']}"
    clock.t = 1061.0  # the errors left the 1-minute window
    await alerts.evaluate()
    s = alerts.states["pay-errors"]
    assert (s.state, s.value) == ("inactive", 0.0), f"expected inactive once the window holds no errors, got {s}"


async def test_a_metric_rule_reads_prometheus_and_a_failure_is_its_error() -> None:
    answers: list[Any] = [[0.2, 0.9], PrometheusError("prometheus_url: cannot reach http://127.0.0.1:1")]

    async def metrics(query: str) -> list[float]:
        assert query == "up == 0"
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return list(a)

    alerts = Alerts(MemoryStore(), lambda: None, metrics, Clock(10.0))
    await alerts.put(AlertRule.model_validate({"name": "down", "metric": {"query": "up == 0"}, "threshold": 0.5}))
    await alerts.put(AlertRule.model_validate({**LOG_RULE, "name": "needs-logs"}))
    await alerts.evaluate()
    assert (alerts.states["down"].state, alerts.states["down"].value) == ("firing", 0.9), alerts.states["down"]
    assert "no log records" in alerts.states["needs-logs"].error, f"expected the missing log store named, got {alerts.states['needs-logs']}"
    await alerts.evaluate()
    s = alerts.states["down"]
    assert (s.state, s.error) == ("firing", "prometheus_url: cannot reach http://127.0.0.1:1"), f"expected the error and no state change, got {s}"
    no_prom = Alerts(MemoryStore(), lambda: None, None, Clock(10.0))
    await no_prom.put(AlertRule.model_validate({"name": "down", "metric": {"query": "up"}, "threshold": 0}))
    await no_prom.evaluate()
    assert "prometheus_url" in no_prom.states["down"].error, no_prom.states["down"]


async def test_rules_survive_a_restart_of_the_store(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db.sqlite")
    alerts = Alerts(store, lambda: None, None)
    assert await alerts.put(AlertRule.model_validate(LOG_RULE)) is True
    assert await alerts.put(AlertRule.model_validate({**LOG_RULE, "threshold": 5})) is False
    store.close()
    again = Alerts(SqliteStore(tmp_path / "db.sqlite"), lambda: None, None)
    rules = again.rules()
    assert [(r.name, r.threshold) for r in rules] == [("pay-errors", 5.0)], f"expected the rule back after a restart, got {rules}"
    again.store.close()


async def _client(token: str | None) -> tuple[ControlPlane, TestClient, Alerts]:
    cp = ControlPlane(Settings(store="memory:", token=token))
    alerts = Alerts(cp.registry.store, lambda: None, None)
    client = TestClient(TestServer(build_api(cp.settings, cp.registry, cp.xds, routes=alert_routes(alerts))))
    await client.start_server()
    return cp, client, alerts


async def test_the_routes_keep_rules_with_field_errors_and_scopes() -> None:
    cp, client, alerts = await _client("boot")
    admin = {"Authorization": "Bearer boot"}
    try:
        r = await client.put("/v1/alerts/pay-errors", json=LOG_RULE)
        assert r.status == 401 and alerts.rules() == [], f"expected a stranger refused and nothing kept, got {r.status}"
        issued = await (await client.post("/v1/access/tokens", json={"scope": "read", "description": "r"}, headers=admin)).json()
        reader = {"Authorization": f"Bearer {issued['secret']}"}
        r = await client.put("/v1/alerts/pay-errors", json=LOG_RULE, headers=reader)
        assert r.status == 403 and alerts.rules() == [], f"expected a read token refused, got {r.status}"
        r = await client.put("/v1/alerts/pay-errors", json={**LOG_RULE, "for": "eventually"}, headers=admin)
        body = await r.json()
        assert r.status == 400 and "for" in [f["field"] for f in body["fields"]], f"expected `for` named, got {r.status} {body}"
        r = await client.put("/v1/alerts/other", json=LOG_RULE, headers=admin)
        assert r.status == 400 and (await r.json())["fields"][0]["field"] == "name", "expected a name that differs from the path refused"
        r = await client.put("/v1/alerts/pay-errors", json={k: v for k, v in LOG_RULE.items() if k != "name"}, headers=admin)
        body = await r.json()
        assert r.status == 201 and body["state"] == "inactive" and body["kind"] == "log" and body["for"] == 30.0, f"got {r.status} {body}"
        r = await client.put("/v1/alerts/pay-errors", json={**LOG_RULE, "threshold": 4}, headers=admin)
        assert r.status == 200, f"expected a replaced rule answered 200, got {r.status}"
        listed = await (await client.get("/v1/alerts", headers=reader)).json()
        assert [(a["name"], a["threshold"], a["state"]) for a in listed["alerts"]] == [("pay-errors", 4.0, "inactive")], listed
        assert (await client.get("/v1/alerts/nope", headers=reader)).status == 404
        assert (await client.delete("/v1/alerts/pay-errors", headers=reader)).status == 403
        assert (await client.delete("/v1/alerts/pay-errors", headers=admin)).status == 200
        assert (await client.delete("/v1/alerts/pay-errors", headers=admin)).status == 404
        assert alerts.rules() == []
    finally:
        await client.close()
        cp.registry.store.close()


async def test_log_counts_run_off_the_event_loop_and_metric_rules_concurrently_within_a_bound() -> None:
    import asyncio
    import threading

    from meshpilot.alerts.plugin import MAX_CONCURRENT_QUERIES

    counted: list[int] = []

    class Watched(LogStore):
        def count(self, *args: Any, **kw: Any) -> int:
            counted.append(threading.get_ident())
            return super().count(*args, **kw)

    in_flight, most = 0, 0

    async def metrics(query: str) -> list[float]:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return [1.0]

    logs = Watched()
    alerts = Alerts(MemoryStore(), lambda: logs, metrics, Clock(10.0))
    await alerts.put(AlertRule.model_validate(LOG_RULE))
    for i in range(3 * MAX_CONCURRENT_QUERIES):
        await alerts.put(AlertRule.model_validate({"name": f"m{i}", "metric": {"query": "up"}, "threshold": 0}))
    await alerts.evaluate()
    assert counted and counted[0] != threading.get_ident(), "expected a log rule's count to run in a thread, not on the event loop"
    assert most == MAX_CONCURRENT_QUERIES, f"expected {MAX_CONCURRENT_QUERIES} metric queries at once (a slow one not holding up the rest), got {most}"
    assert all(alerts.states[f"m{i}"].state == "firing" for i in range(3 * MAX_CONCURRENT_QUERIES)), alerts.states


async def test_the_number_of_rules_is_bounded_with_a_409_naming_the_field() -> None:
    from meshpilot.alerts.plugin import MAX_RULES

    cp, client, alerts = await _client(None)
    try:
        for i in range(MAX_RULES):
            alerts.store.write({("meta", f"alerts/r{i}"): {**LOG_RULE, "name": f"r{i}"}})
        r = await client.put("/v1/alerts/one-more", json={**LOG_RULE, "name": "one-more"})
        body = await r.json()
        assert r.status == 409 and body["fields"][0]["field"] == "name", f"expected a 409 naming name past {MAX_RULES} rules, got {r.status} {body}"
        assert alerts.rule("one-more") is None, "expected nothing stored"
        r = await client.put("/v1/alerts/r0", json={**LOG_RULE, "name": "r0", "threshold": 9})
        assert r.status == 200, f"expected a rule replaced at the bound, got {r.status} {await r.text()}"
    finally:
        await client.close()
        cp.registry.store.close()


async def test_a_replaced_rule_starts_inactive_on_every_replica() -> None:
    logs, clock, shared = LogStore(), Clock(1000.0), MemoryStore()
    a = Alerts(shared, lambda: logs, None, clock)  # two replicas sharing one store
    b = Alerts(shared, lambda: logs, None, clock)
    await a.put(AlertRule.model_validate({**LOG_RULE, "for": 0}))
    _errors(logs, 1000.0, 5)
    clock.t = 1001.0
    await a.evaluate()
    await b.evaluate()
    assert a.states["pay-errors"].state == b.states["pay-errors"].state == "firing"
    await a.put(AlertRule.model_validate({**LOG_RULE, "threshold": 3, "for": "30s"}))  # replaced through replica a
    rule = b.rule("pay-errors")
    assert rule is not None and b.view(rule)["state"] == "inactive", f"expected replica b to show the replaced rule inactive, got {b.view(rule)}"
    clock.t = 1002.0
    await b.evaluate()
    s = b.states["pay-errors"]
    assert (s.state, s.since) == ("pending", 1002.0), f"expected the replaced rule to start again on replica b (pending, not firing), got {s}"
    clock.t = 1003.0
    await b.evaluate()
    assert b.states["pay-errors"].since == 1002.0, "expected an unchanged rule to keep its state"
