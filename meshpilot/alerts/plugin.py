"""Alert rules as a part of the control plane: their routes, where they are kept, and the task that
evaluates them.

Routes of the management API (docs/observability.md, Logs and alerts):

- ``GET /v1/alerts`` and ``GET /v1/alerts/{name}`` (read token): the rules with their state
  (``inactive|pending|firing``, since, value, last evaluation and its error).
- ``PUT /v1/alerts/{name}`` and ``DELETE /v1/alerts/{name}`` (write token): a rule is validated where
  it enters (meshpilot/alerts/rules.py; a 400 names each bad field) and kept in the registry's store
  (table ``meta``, key ``alerts/<name>``), durable before the answer, so rules survive a restart and
  replicas sharing a store share them. At most ``MAX_RULES`` rules: one more is a 409 naming ``name``.

A supervised task evaluates every rule each ``alert_interval_s``, ``MAX_CONCURRENT_QUERIES`` at once: a
log rule counts (in a thread) the records of this control plane's log store through the ``LogCounter`` the logs part offers for it
(meshpilot/telemetry/logs.py; alerts do not import the logs part), a metric rule asks the
Prometheus at ``prometheus_url`` (``/api/v1/query``). States live in memory: after a restart every
rule starts ``inactive`` and is evaluated again, and each replica evaluates against what it holds. A
state names the digest of its rule, so a rule replaced through any replica starts ``inactive`` on every
replica.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import aiohttp
from aiohttp import web
from pydantic import ValidationError

from meshpilot.alerts.rules import AlertRule, AlertState, pick, step
from meshpilot.api.app import ApiError, json_body
from meshpilot.api.routes import Route
from meshpilot.model import field_errors
from meshpilot.parts import Core, Part, Task
from meshpilot.registry.store import Store
from meshpilot.telemetry.logs import LogCounter, counter_of

__all__ = ["MAX_CONCURRENT_QUERIES", "MAX_RULES", "Alerts", "PrometheusError", "alert_routes", "install", "prometheus_values"]

log = logging.getLogger("meshpilot.alerts")

_TABLE = "meta"
_PREFIX = "alerts/"
MAX_RULES = 100  # rules kept; one more is a 409 (each costs a count or a query per evaluation)
MAX_CONCURRENT_QUERIES = 8  # rules evaluated at once: a slow Prometheus holds up at most this many

MetricSource = Callable[[str], Awaitable[list[float]]]


class PrometheusError(Exception):
    pass


async def prometheus_values(http: aiohttp.ClientSession, base_url: str, query: str, at: float) -> list[float]:
    """The values of an instant query's series (a scalar is one value); PrometheusError naming why not."""
    url = f"{base_url.rstrip('/')}/api/v1/query"
    try:
        async with http.get(url, params={"query": query, "time": f"{at:.3f}"}) as r:
            try:
                doc = await r.json(content_type=None)
            except ValueError:
                raise PrometheusError(f"prometheus_url: {r.status} and no JSON answer") from None
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise PrometheusError(f"prometheus_url: cannot reach {base_url}: {exc!r}"[:300]) from None
    if not isinstance(doc, dict) or doc.get("status") != "success":
        error = doc.get("error") if isinstance(doc, dict) else None
        raise PrometheusError(f"metric.query: Prometheus refused it: {error or doc}"[:300])
    data = doc.get("data") or {}
    kind = data.get("resultType")
    result: Any = data.get("result")
    try:
        if kind == "scalar":
            values = [float(result[1])]
        elif kind == "vector":
            values = [float(s["value"][1]) for s in result]
        else:
            raise PrometheusError(f"metric.query: expected a number or an instant vector, got {kind}")
    except (TypeError, ValueError, KeyError, IndexError) as exc:
        raise PrometheusError(f"metric.query: unreadable answer: {exc!r}") from None
    return [v for v in values if not math.isnan(v)]


class Alerts:
    """The rules in the store and their states in memory; ``evaluate`` runs every rule once."""

    def __init__(self, store: Store, counter: Callable[[], LogCounter | None], metrics: MetricSource | None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.counter = counter
        self.metrics = metrics
        self.clock = clock
        self.states: dict[str, AlertState] = {}

    def rules(self) -> list[AlertRule]:
        out = []
        for key, doc in self.store.items(_TABLE):
            if not key.startswith(_PREFIX):
                continue
            try:
                out.append(AlertRule.model_validate(doc))
            except ValidationError:
                log.exception("event=bad_stored_alert_rule key=%s", key)
        return out

    def rule(self, name: str) -> AlertRule | None:
        doc = self.store.get(_TABLE, _PREFIX + name)
        return AlertRule.model_validate(doc) if doc is not None else None

    def state_of(self, rule: AlertRule, digest: str | None = None) -> AlertState:
        """The rule's state; inactive when the state kept is of another rule by that name (replaced,
        maybe through another replica sharing the store)."""
        digest = digest or rule.digest()
        state = self.states.get(rule.name)
        return state if state is not None and state.rule == digest else AlertState(rule=digest)

    def view(self, rule: AlertRule) -> dict[str, Any]:
        return {**rule.doc(), "kind": rule.kind, **self.state_of(rule).doc()}

    async def put(self, rule: AlertRule) -> bool:
        """Keep the rule (durable on return); True when it is new. A changed rule starts inactive."""
        new = self.store.get(_TABLE, _PREFIX + rule.name) is None
        if new and sum(1 for key, _ in self.store.items(_TABLE) if key.startswith(_PREFIX)) >= MAX_RULES:
            raise ApiError(409, f"name: at most {MAX_RULES} alert rules; delete one before adding {rule.name!r}",
                           [{"field": "name", "reason": f"at most {MAX_RULES} rules"}])
        self.store.write({(_TABLE, _PREFIX + rule.name): rule.doc()})
        await self.store.sync()
        self.states.pop(rule.name, None)
        return new

    async def delete(self, name: str) -> bool:
        if self.store.get(_TABLE, _PREFIX + name) is None:
            return False
        self.store.write({}, ((_TABLE, _PREFIX + name),))
        await self.store.sync()
        self.states.pop(name, None)
        return True

    async def _value(self, rule: AlertRule, now: float) -> list[float]:
        if rule.log is not None:
            counter = self.counter()
            if counter is None:
                raise PrometheusError("log: this control plane keeps no log records (the logs part is off)")
            # in a thread (the store counts over a snapshot): a scan does not hold up xDS and the API
            return [float(await asyncio.to_thread(counter.count, rule.log.match(), now - rule.log.window, now))]
        assert rule.metric is not None
        if self.metrics is None:
            raise PrometheusError("prometheus_url: not set; a metric rule needs the mesh's Prometheus")
        return await self.metrics(rule.metric.query)

    async def evaluate(self) -> None:
        now = self.clock()
        rules = self.rules()
        slots = asyncio.Semaphore(MAX_CONCURRENT_QUERIES)

        async def value(rule: AlertRule) -> list[float] | str:
            async with slots:
                try:
                    return await self._value(rule, now)
                except PrometheusError as exc:
                    return str(exc)

        async with asyncio.TaskGroup() as tg:  # at most MAX_CONCURRENT_QUERIES at once, not one after another
            values = [tg.create_task(value(rule)) for rule in rules]
        for rule, task in zip(rules, values):
            digest = rule.digest()
            prev = self.state_of(rule, digest)
            got = task.result()
            if isinstance(got, str):
                state = step(prev, now, rule.for_, False, None, got)
            else:
                v, holds = pick(got, rule.op, rule.threshold)
                state = step(prev, now, rule.for_, holds, v)
            state = replace(state, rule=digest)
            if state.state != prev.state:
                log.info("event=alert_state rule=%s state=%s value=%s", rule.name, state.state, state.value)
            self.states[rule.name] = state
        names = {r.name for r in rules}
        for gone in [n for n in self.states if n not in names]:  # deleted meanwhile (another replica)
            del self.states[gone]


def alert_routes(alerts: Alerts) -> list[Route]:
    def found(name: str) -> AlertRule:
        rule = alerts.rule(name)
        if rule is None:
            raise ApiError(404, f"name: no alert rule {name[:80]!r}", [{"field": "name", "reason": "not found"}])
        return rule

    async def list_rules(request: web.Request) -> web.Response:
        rules = sorted(alerts.rules(), key=lambda r: r.name)
        return web.json_response({"alerts": [alerts.view(r) for r in rules]})

    async def get_rule(request: web.Request) -> web.Response:
        return web.json_response(alerts.view(found(request.match_info["name"])))

    async def put_rule(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        doc = await json_body(request)
        if not isinstance(doc, dict):
            raise ApiError(400, "(body): expected an object (an alert rule)", [{"field": "(body)", "reason": "not an object"}])
        doc = {**doc, "name": doc.get("name", name)}
        if doc["name"] != name:
            raise ApiError(400, f"name: the body names {str(doc['name'])[:80]!r}, the path {name[:80]!r}",
                           [{"field": "name", "reason": "differs from the path"}])
        try:
            rule = AlertRule.model_validate(doc)
        except ValidationError as exc:
            fields = field_errors(exc)
            for f in fields:
                f["field"] = f["field"].replace("for_", "for")
            raise ApiError(400, f"{fields[0]['field']}: {fields[0]['reason']}", fields[:50]) from None
        new = await alerts.put(rule)
        return web.json_response(alerts.view(rule), status=201 if new else 200)

    async def delete_rule(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not await alerts.delete(name):
            found(name)
        return web.json_response({"deleted": name})

    return [
        Route("GET", "/v1/alerts", list_rules, "Alert rules with their state (inactive, pending, firing), since, value and last evaluation", scope="read"),
        Route("GET", "/v1/alerts/{name}", get_rule, "One alert rule with its state", scope="read"),
        Route("PUT", "/v1/alerts/{name}", put_rule, "Create or replace an alert rule (a log or a metric rule with a threshold and `for`)",
              body=AlertRule, scope="write", errors=("409",)),
        Route("DELETE", "/v1/alerts/{name}", delete_rule, "Delete an alert rule", scope="write"),
    ]


def install(core: Core) -> Part:
    settings = core.settings
    alerts = Alerts(core.registry.store, lambda: counter_of(core), None)

    async def run() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            url = settings.prometheus_url
            if url is not None:
                alerts.metrics = lambda query: prometheus_values(http, url, query, alerts.clock())
            try:
                while True:
                    await alerts.evaluate()
                    await asyncio.sleep(settings.alert_interval_s)
            finally:
                alerts.metrics = None

    return Part(routes=alert_routes(alerts), tasks=[Task("alerts", run)])
