"""Logs as a part of the control plane: where sidecars ship their nodes' log records, and where
operators search them.

Routes of the management API (docs/observability.md, Logs and alerts):

- ``POST /v1/logs`` — a JSON array of log records (meshpilot/telemetry/logs.py), as the node agent's
  shipper sends them from its spool (meshpilot/sidecar/logs.py). Who may write: a holder of a write
  token, which the agent already has (it registers its service with it), as for spans; with
  authorisation on, anyone else gets 401 (a read token 403) and nothing is kept. A bad record is a 400
  naming it by index and field, and nothing of the body is kept.
- ``GET /v1/logs?service=&instance=&source=&level=&trace_id=&q=&since=&until=&limit=`` — the newest
  matching records first (read token). A record naming a trace links to ``/v1/traces/{id}``.

The records live in a ``LogStore`` in memory, bounded by ``log_store_records`` and ``log_store_bytes``: not kept across a
restart, nor shared between replicas. The part offers the store's count to the alert rules of the
same control plane (``offer_counter``), so a log rule counts what this store holds.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, Field, RootModel

from meshpilot.api.app import ApiError, json_body
from meshpilot.api.routes import Route
from meshpilot.logs.store import LogStore
from meshpilot.parts import Core, Part
from meshpilot.telemetry.logs import LEVELS, MAX_LINE, MAX_RECORDS_PER_BODY, SOURCES, LogInvalid, LogMatch, offer_counter, parse_records

__all__ = ["install", "log_routes"]

MAX_LIMIT = 1000
_AGO = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_HEX = re.compile(r"^[0-9a-fA-F]{1,32}$")
# what the records' checks (meshpilot/telemetry/logs.py) take for a name: one line, not blank
_ONE_LINE = r"^[^\n\r\x00]*$"
_NAME = r"^[^\n\r\x00]*[^\s\x00][^\n\r\x00]*$"

class LogRecordIn(BaseModel):
    """A log record as a node ships it (meshpilot/telemetry/logs.py checks it)."""

    id: str = Field(pattern="^[0-9a-f]{16}$", description="given on the node; a record sent twice is kept once")
    time: float = Field(ge=0, lt=1e11, description="unix seconds")
    node: str = Field(pattern=_NAME, max_length=256)
    service: str = Field(pattern=_NAME, max_length=256, description="name.namespace")
    instance: str = Field(default="", pattern=_ONE_LINE, max_length=256)
    source: Literal["access", "app"]
    level: Literal["debug", "info", "warn", "error", ""] = ""
    trace_id: str = Field(default="", pattern="^[0-9a-fA-F]{0,32}$", description="hex; a 64-bit id is padded to 128 bits")
    line: str = Field(description=f"the line, cut at {MAX_LINE} characters")


class LogsIn(RootModel[Annotated[list[LogRecordIn], Field(max_length=MAX_RECORDS_PER_BODY)]]):
    """Log records to keep: a JSON array."""


def _bad(field: str, reason: str) -> ApiError:
    return ApiError(400, f"{field}: {reason}", [{"field": field, "reason": reason}])


def _time(text: str, field: str, default: float, now: float) -> float:
    """Unix seconds from ``text``: unix seconds, or a time ago such as 15m."""
    text = text.strip()
    if not text:
        return default
    m = _AGO.match(text)
    if m:
        return now - float(m.group(1)) * _UNIT[m.group(2)]
    try:
        value = float(text)
    except ValueError:
        raise _bad(field, f"expected unix seconds or a time ago such as 15m or 2h, got {text[:40]!r}") from None
    if not 0 <= value < 1e11:
        raise _bad(field, f"out of range: {text[:40]!r}")
    return value


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 1 <= value <= MAX_LIMIT:
        raise _bad("limit", f"expected a whole number from 1 to {MAX_LIMIT}, got {text[:40]!r}")
    return value


def query_match(q: Any) -> LogMatch:
    """The search's match from the query string; a bad value is an ApiError naming it."""
    source = q.get("source", "").strip().lower()
    if source and source not in SOURCES:
        raise _bad("source", f"expected one of {', '.join(SOURCES)}")
    level = q.get("level", "").strip().lower()
    if level and level not in LEVELS:
        raise _bad("level", f"expected one of {', '.join(LEVELS)}")
    trace = q.get("trace_id", "").strip().lower()
    if trace and (not _HEX.match(trace) or set(trace) == {"0"}):
        raise _bad("trace_id", "expected 1-32 hex digits, not all zeros")
    return LogMatch(service=q.get("service", "").strip().lower(), instance=q.get("instance", "").strip(), source=source,
                    level=level, trace_id=trace.rjust(32, "0") if trace else "", text=q.get("q", ""))


def log_routes(store: LogStore, clock: Any = time.time) -> list[Route]:
    async def ingest(request: web.Request) -> web.Response:
        doc = await json_body(request)
        try:
            records = parse_records(doc)
        except LogInvalid as exc:  # one bad record refuses the whole body: nothing is kept
            raise _bad(exc.field, exc.reason) from None
        new = store.add(records)
        return web.json_response({"accepted": len(records), "new": new}, status=201)

    async def search(request: web.Request) -> web.Response:
        q = request.query
        now = float(clock())
        match = query_match(q)
        since = _time(q.get("since", ""), "since", 0.0, now)
        until = _time(q.get("until", ""), "until", float("inf"), now)
        # in a thread over a snapshot: a scan of every record does not hold up xDS and the API
        found = await asyncio.to_thread(store.search, match, since, until, _limit(q.get("limit", "100")))
        out = [{**r, "trace": f"/v1/traces/{r['trace_id']}"} if r["trace_id"] else r for r in found]
        return web.json_response({"records": out, "stored_records": len(store), "max_records": store.max_records,
                                  "stored_bytes": store.bytes, "max_bytes": store.max_bytes})

    return [
        Route("POST", "/v1/logs", ingest, "Keep log records (a JSON array), as sidecars ship them", body=LogsIn, scope="write"),
        Route("GET", "/v1/logs", search, "Search log records, newest first: ?service= ?instance= ?source=access|app "
              "?level= (that level and above) ?trace_id= ?q= (text) ?since= ?until= (unix seconds or 15m) ?limit= (1-1000, default 100)",
              scope="read"),
    ]


def install(core: Core) -> Part:
    store = LogStore(core.settings.log_store_records, core.settings.log_store_bytes)
    offer_counter(core, store)
    return Part(routes=log_routes(store))
