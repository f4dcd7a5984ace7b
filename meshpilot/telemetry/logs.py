"""Log records: the one shape a log line has on a node's disk, on the wire to the control plane and in
its log store, and the match both the log search and the alert rules count with.

A record is one line the node agent collected (meshpilot/sidecar/logs.py): an access-log line of the
node's Envoy (``source: access``) or a line of an app's log file (``source: app``), with the time it
was seen or stated, the node, the service (``name.namespace``) and instance it belongs to, its level
when known (``debug|info|warn|error``), the trace id it names when it names one (32 lower-case hex
digits, as ``/v1/traces/{id}`` has them) and the line itself, cut at ``MAX_LINE`` characters. ``id``
(16 hex digits, given on the node) lets the store keep a record once when a batch is sent twice.
``normalise`` checks a record where it enters and raises ``LogInvalid`` naming the field; ``line`` and
``from_line`` are its disk form. ``LogMatch`` is what a search or an alert rule selects; a part that
keeps records offers a ``LogCounter`` for its control plane (``offer_counter``), which the alert
rules read (``counter_of``) without importing that part. Pure: no I/O.
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "LEVELS", "MAX_LINE", "MAX_RECORDS_PER_BODY", "SOURCES", "LogCounter", "LogInvalid", "LogMatch",
    "counter_of", "find_trace_id", "from_line", "guess_level", "line", "normalise", "offer_counter", "parse_records",
]

LEVELS = ("debug", "info", "warn", "error")
SOURCES = ("access", "app")
MAX_LINE = 8192  # characters of a line kept; the rest is cut
MAX_RECORDS_PER_BODY = 10_000
_MAX_NAME = 256
_MAX_T = 1e11  # unix seconds: beyond this is junk
_HEX_ID = re.compile(r"^[0-9a-f]{16}$")
_TRACE = re.compile(r"^[0-9a-f]{1,32}$")

# a level word: the first one a line names (``ERROR``, ``level=warn``, ``"level":"info"``, ``[warning]``)
_LEVEL_WORD = re.compile(r"(?<![A-Za-z0-9_])(trace|debug|info|notice|warn|warning|error|err|fatal|critical|crit|panic|severe)(?![A-Za-z0-9_])",
                         re.IGNORECASE)
_LEVEL_OF = {"trace": "debug", "debug": "debug", "info": "info", "notice": "info", "warn": "warn", "warning": "warn",
             "error": "error", "err": "error", "fatal": "error", "critical": "error", "crit": "error", "panic": "error",
             "severe": "error"}
# a trace id a line names: trace_id=..., traceId: ..., "trace_id":"...", or a W3C traceparent
_TRACE_IN_LINE = re.compile(r"trace[_.-]?id[\"']?\s*[:=]\s*[\"']?([0-9a-fA-F]{16,32})(?![0-9a-fA-F])", re.IGNORECASE)
_TRACEPARENT = re.compile(r"(?<![0-9a-fA-F])[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}(?![0-9a-fA-F])")


class LogInvalid(ValueError):
    """A record that cannot be kept; ``field`` names the offending field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def guess_level(text: str) -> str:
    """The level a line names (its first level word, within its first 200 characters), or ""."""
    m = _LEVEL_WORD.search(text[:200])
    return _LEVEL_OF[m.group(1).lower()] if m else ""


def _trace_id(value: str) -> str:
    v = value.lower().rjust(32, "0")
    return "" if set(v) == {"0"} else v


def find_trace_id(text: str) -> str:
    """The trace id a line names (32 hex digits, a 64-bit one padded), or ""."""
    m = _TRACE_IN_LINE.search(text) or _TRACEPARENT.search(text)
    return _trace_id(m.group(1)) if m else ""


def _name(doc: dict[str, Any], key: str, required: bool = True) -> str:
    v = doc.get(key, "")
    if not isinstance(v, str):
        raise LogInvalid(key, f"expected a string, got {type(v).__name__}")
    v = v.strip()
    if required and not v:
        raise LogInvalid(key, "required")
    if len(v) > _MAX_NAME or any(c in v for c in "\n\r\x00"):
        raise LogInvalid(key, f"expected at most {_MAX_NAME} characters on one line")
    return v


def normalise(doc: Any) -> dict[str, Any]:
    """A record as the store keeps it (service lower-case, level and trace id checked, line cut)."""
    if not isinstance(doc, dict):
        raise LogInvalid("(record)", f"expected an object, got {type(doc).__name__}")
    t = doc.get("time")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < _MAX_T:
        raise LogInvalid("time", "expected unix seconds (a number from 0 to 1e11)")
    rid = doc.get("id")
    if not isinstance(rid, str) or not _HEX_ID.match(rid):
        raise LogInvalid("id", "expected 16 lower-case hex digits")
    source = doc.get("source")
    if source not in SOURCES:
        raise LogInvalid("source", f"expected one of {', '.join(SOURCES)}")
    level = doc.get("level", "")
    if not isinstance(level, str) or (level not in LEVELS and level != ""):
        raise LogInvalid("level", f"expected one of {', '.join(LEVELS)} or empty")
    trace = doc.get("trace_id", "")
    if not isinstance(trace, str) or (trace and not _TRACE.match(trace.lower())):
        raise LogInvalid("trace_id", "expected 1-32 hex digits or empty")
    text = doc.get("line")
    if not isinstance(text, str):
        raise LogInvalid("line", "expected a string")
    return {
        "id": rid, "time": float(t), "node": _name(doc, "node"), "service": _name(doc, "service").lower(),
        "instance": _name(doc, "instance", required=False), "source": source, "level": level,
        "trace_id": _trace_id(trace) if trace else "", "line": text[:MAX_LINE],
    }


def parse_records(doc: Any) -> list[dict[str, Any]]:
    """The records of a posted body (a JSON array of them); LogInvalid naming ``<index>.<field>`` at the
    first bad one: a body is kept whole or not at all."""
    if not isinstance(doc, list):
        raise LogInvalid("(body)", "expected a JSON array of log records")
    if len(doc) > MAX_RECORDS_PER_BODY:
        raise LogInvalid("(body)", f"at most {MAX_RECORDS_PER_BODY} records, got {len(doc)}")
    out = []
    for i, item in enumerate(doc):
        try:
            out.append(normalise(item))
        except LogInvalid as exc:
            raise LogInvalid(f"{i}.{exc.field}", exc.reason) from None
    return out


def line(record: dict[str, Any]) -> bytes:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def from_line(raw: bytes) -> dict[str, Any]:
    try:
        return normalise(json.loads(raw))
    except ValueError as exc:
        if isinstance(exc, LogInvalid):
            raise
        raise LogInvalid("(line)", f"not JSON: {str(exc)[:100]}") from None


@dataclass(frozen=True, slots=True)
class LogMatch:
    """Which records a search or an alert rule selects: every given field must hold. ``service`` is
    ``name`` (any namespace) or ``name.namespace``; ``level`` matches that level and the ones above it
    (``warn``: warn and error); ``text`` is a case-insensitive substring of the line."""

    service: str = ""
    instance: str = ""
    source: str = ""
    level: str = ""
    trace_id: str = ""
    text: str = ""

    def matches(self, r: dict[str, Any], lowered: str | None = None) -> bool:
        """Whether ``r`` is selected; ``lowered``: its line lower-cased already (a store keeps it once, so a
        text search does not lower-case every line again)."""
        if self.service:
            s = r["service"]
            if s != self.service and s.split(".", 1)[0] != self.service:
                return False
        if self.instance and r["instance"] != self.instance:
            return False
        if self.source and r["source"] != self.source:
            return False
        if self.level and (r["level"] not in LEVELS or LEVELS.index(r["level"]) < LEVELS.index(self.level)):
            return False
        if self.trace_id and r["trace_id"] != self.trace_id:
            return False
        if not self.text:
            return True
        return self.text.lower() in (r["line"].lower() if lowered is None else lowered)


class LogCounter(Protocol):
    def count(self, match: LogMatch, since: float, until: float) -> int:
        """Records that match with ``since <= time < until`` (unix seconds)."""


_COUNTERS: weakref.WeakKeyDictionary[object, LogCounter] = weakref.WeakKeyDictionary()


def offer_counter(owner: object, counter: LogCounter) -> None:
    """The log records kept for ``owner`` (a control plane) can be counted with ``counter``."""
    _COUNTERS[owner] = counter


def counter_of(owner: object) -> LogCounter | None:
    return _COUNTERS.get(owner)
