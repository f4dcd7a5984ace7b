"""Traces as a part of the control plane: where sidecars ship their spans, and where operators read them.

Routes of the management API (docs/observability.md, Tracing):

- ``POST /v1/spans`` — a JSON array of Zipkin v2 spans, as the node agent's shipper sends them from its
  spool (meshpilot/sidecar/traces.py). Who may write: a holder of a write token, which the agent has
  already (it registers its service with it); with authorisation on, anyone else gets 401 and nothing is
  kept. The body is validated where it enters (the schema below, then meshpilot/telemetry/spans.py): a
  bad span is a 400 naming it by index and field, and nothing of the body is kept.
- ``GET /v1/traces?service=&since=&limit=`` — summaries of the newest traces (read token).
- ``GET /v1/traces/{trace_id}`` — one trace as a tree of spans, ready for a waterfall (read token; children
  nest at most 64 deep, deeper spans follow in tree order under their ancestor at that depth), with
  ``logs``: the search of its log lines (``/v1/logs?trace_id=``).

The spans live in a ``TraceStore`` in memory, bounded by ``trace_store_spans`` and ``trace_store_bytes``
(one trace by a tenth of each: past that its spans are dropped and the trace is marked ``truncated``); they are not kept across
a restart, nor shared between replicas (each keeps what its sidecars sent it).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Annotated, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, RootModel, StringConstraints, ValidationError

from meshpilot.api.app import ApiError, json_body
from meshpilot.api.routes import Route
from meshpilot.parts import Core, Part
from meshpilot.model import field_errors
from meshpilot.telemetry.spans import MAX_SPANS_PER_BODY, SpanInvalid, normalise_trace_id, parse_spans
from meshpilot.tracing.store import TraceStore

__all__ = ["install", "trace_routes"]

log = logging.getLogger("meshpilot.tracing")

_AGO = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
MAX_LIMIT = 1000


_ID = r"^0*[1-9a-fA-F][0-9a-fA-F]*$"  # hex, not all zeros
_MICROS = 2**62  # bound of a time or duration in microseconds


class _Endpoint(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    serviceName: str | None = None
    ipv4: str | None = None
    ipv6: str | None = None
    port: int | None = Field(default=None, ge=0, le=65535)


class _Annotation(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    timestamp: int = Field(ge=0, lt=_MICROS)
    value: str


class ZipkinSpan(BaseModel):
    """A Zipkin v2 span (ids in hex; times in microseconds since the epoch)."""

    model_config = ConfigDict(extra="allow", strict=True)
    traceId: str = Field(pattern=_ID, max_length=32)
    id: str = Field(pattern=_ID, max_length=16)
    parentId: str | None = Field(default=None, pattern=_ID, max_length=16)
    name: str | None = None
    kind: Literal["CLIENT", "SERVER", "PRODUCER", "CONSUMER"] | None = None
    timestamp: int = Field(ge=0, lt=_MICROS)
    duration: int | None = Field(default=None, ge=0, lt=_MICROS)
    localEndpoint: _Endpoint | None = None
    remoteEndpoint: _Endpoint | None = None
    tags: Annotated[dict[Annotated[str, StringConstraints(min_length=1, max_length=256)], str], Field(max_length=64)] | None = None
    annotations: list[_Annotation] | None = None
    shared: bool | None = None
    debug: bool | None = None


class SpansIn(RootModel[Annotated[list[ZipkinSpan], Field(max_length=MAX_SPANS_PER_BODY)]]):
    """Spans to keep: a JSON array of Zipkin v2 spans."""


def _since(text: str) -> int:
    """Microseconds since the epoch from ``since``: unix seconds, or a time ago such as 15m."""
    text = text.strip()
    if not text:
        return 0
    m = _AGO.match(text)
    if m:
        seconds = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return max(0, int((time.time() - seconds) * 1_000_000))
    try:
        value = float(text)
    except ValueError:
        raise ApiError(400, f"since: expected unix seconds or a time ago such as 15m or 2h, got {text[:40]!r}",
                       [{"field": "since", "reason": "expected unix seconds or a time ago such as 15m"}]) from None
    if not 0 <= value < 1e11:
        raise ApiError(400, f"since: out of range: {text[:40]!r}", [{"field": "since", "reason": "out of range"}])
    return int(value * 1_000_000)


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 1 <= value <= MAX_LIMIT:
        raise ApiError(400, f"limit: expected a whole number from 1 to {MAX_LIMIT}, got {text[:40]!r}",
                       [{"field": "limit", "reason": f"expected 1-{MAX_LIMIT}"}])
    return value


def trace_routes(store: TraceStore) -> list[Route]:
    async def ingest(request: web.Request) -> web.Response:
        doc = await json_body(request)
        if not isinstance(doc, list):
            raise ApiError(400, "(body): expected a JSON array of Zipkin v2 spans", [{"field": "(body)", "reason": "not an array"}])
        try:
            SpansIn.model_validate(doc)
        except ValidationError as exc:
            fields = field_errors(exc)
            raise ApiError(400, f"{fields[0]['field']}: {fields[0]['reason']}", fields[:50]) from None
        try:
            spans, refused = parse_spans(doc)
        except SpanInvalid as exc:
            raise ApiError(400, str(exc), [{"field": exc.field, "reason": exc.reason}]) from None
        if refused:  # a bad span refuses the whole body: nothing is kept
            raise ApiError(400, f"{refused[0]['field']}: {refused[0]['reason']}", refused[:50])
        new = store.add(spans)
        return web.json_response({"accepted": len(spans), "new": new}, status=201)

    async def list_traces(request: web.Request) -> web.Response:
        q = request.query
        service = q.get("service", "").strip().lower()
        found = store.traces(service, _since(q.get("since", "")), _limit(q.get("limit", "20")))
        return web.json_response({"traces": found, "stored_spans": store.span_count, "max_spans": store.max_spans,
                                  "max_trace_spans": store.max_trace_spans, "dropped_spans": store.dropped_spans,
                                  "stored_bytes": store.bytes, "max_bytes": store.max_bytes})

    async def get_trace(request: web.Request) -> web.Response:
        raw = request.match_info["trace_id"]
        try:
            trace_id = normalise_trace_id(raw, "trace_id")
        except SpanInvalid as exc:  # no trace has such an id
            raise ApiError(404, f"trace_id: {exc.reason}", [{"field": "trace_id", "reason": exc.reason}]) from None
        tree = store.tree(trace_id)
        if tree is None:
            raise ApiError(404, f"trace_id: no trace {trace_id} in the store (it keeps the newest {store.max_spans} spans)",
                           [{"field": "trace_id", "reason": "not found"}])
        return web.json_response({**tree, "logs": f"/v1/logs?trace_id={trace_id}"})  # its log lines (the logs part)

    return [
        Route("POST", "/v1/spans", ingest, "Keep spans (Zipkin v2 JSON array), as sidecars ship them", body=SpansIn, scope="write"),
        Route("GET", "/v1/traces", list_traces, "The newest traces: ?service= (name or name.namespace), ?since= (unix seconds or 15m), ?limit= (1-1000, default 20)", scope="read"),
        Route("GET", "/v1/traces/{trace_id}", get_trace, "One trace as a tree of spans (children by start, offset_us from the trace's start)", scope="read"),
    ]


def install(core: Core) -> Part:
    store = TraceStore(core.settings.trace_store_spans, max_bytes=core.settings.trace_store_bytes)
    return Part(routes=trace_routes(store))
