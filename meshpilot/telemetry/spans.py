"""Span records: the one shape a span has on a node's disk, on the wire to the control plane and in
its trace store.

A span is a Zipkin v2 span (the JSON Envoy's Zipkin tracer posts, and what Zipkin, Jaeger's Zipkin
collector and Brave speak), normalised where it enters (``normalise``): ids lower-case hex (a 64-bit
trace id is padded to 128 bits, so a trace keeps one id whichever propagation carried it), times in
integer microseconds, only the fields below, strings bounded. Junk is refused with a ``SpanInvalid``
naming the field. ``parse_spans`` takes a posted body (a JSON array of spans) and keeps the good
spans, reporting each refused one by index. On disk a span is one JSON line (``line``/``from_line``).
``to_otlp`` turns spans into an OTLP/HTTP JSON request for OpenTelemetry collectors (and Jaeger's OTLP
receiver). Pure: no I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "COLLECTOR_CLUSTER", "COLLECTOR_PATH", "KINDS", "MAX_SPANS_PER_BODY", "META_TRACE_COLLECTOR", "SERVICE_TAG",
    "SpanInvalid", "from_line", "line", "normalise", "normalise_trace_id", "parse_spans", "to_otlp",
]

COLLECTOR_CLUSTER = "meshpilot-traces"  # the sidecar bootstrap's cluster to the agent's span receiver
COLLECTOR_PATH = "/api/v2/spans"  # where the receiver takes Zipkin v2 JSON (Zipkin's own path)
META_TRACE_COLLECTOR = "TRACE_COLLECTOR"  # node metadata: the node's Envoy has the collector cluster
SERVICE_TAG = "mesh.service"  # tag every sidecar span carries: the node's service key (name.namespace)
KINDS = ("CLIENT", "SERVER", "PRODUCER", "CONSUMER")
MAX_SPANS_PER_BODY = 10_000
_MAX_NAME = 256
_MAX_TAGS = 64
_MAX_TAG_KEY = 256
_MAX_TAG_VALUE = 4096
_MAX_ANNOTATIONS = 64
_HEX = re.compile(r"^[0-9a-f]{1,32}$")
_MAX_US = 2**62  # a microsecond time or duration beyond this is junk


class SpanInvalid(ValueError):
    """A span that cannot be kept; ``field`` names the offending field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def _hex_id(value: Any, field: str, width: int) -> str:
    if not isinstance(value, str):
        raise SpanInvalid(field, f"expected a hex string, got {type(value).__name__}")
    v = value.strip().lower()
    if not _HEX.match(v) or len(v) > width:
        raise SpanInvalid(field, f"expected 1-{width} hex digits, got {value[:40]!r}")
    if set(v) == {"0"}:
        raise SpanInvalid(field, "must not be all zeros")
    return v.rjust(width, "0")


def normalise_trace_id(value: Any, field: str = "traceId") -> str:
    """A trace id as 32 lower-case hex digits (a 64-bit id padded with zeros); SpanInvalid if not one."""
    return _hex_id(value, field, 32)


def _micros(value: Any, field: str) -> int:
    if isinstance(value, bool):
        raise SpanInvalid(field, "expected microseconds (an integer)")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise SpanInvalid(field, f"expected microseconds (an integer), got {str(value)[:40]!r}")
    if not 0 <= value < _MAX_US:
        raise SpanInvalid(field, f"out of range: {value}")
    return value


def _text(value: Any, field: str, limit: int) -> str:
    if not isinstance(value, str):
        raise SpanInvalid(field, f"expected a string, got {type(value).__name__}")
    return value[:limit]


def _endpoint(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise SpanInvalid(field, "expected an object")
    out: dict[str, Any] = {}
    for key in ("serviceName", "ipv4", "ipv6"):
        if value.get(key) is not None:
            out[key] = _text(value[key], f"{field}.{key}", _MAX_NAME)
    port = value.get("port")
    if port is not None:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise SpanInvalid(f"{field}.port", f"expected a port number, got {str(port)[:40]!r}")
        out["port"] = port
    return out


def _tags(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise SpanInvalid("tags", "expected an object of strings")
    if len(value) > _MAX_TAGS:
        raise SpanInvalid("tags", f"at most {_MAX_TAGS} tags, got {len(value)}")
    out: dict[str, str] = {}
    for k, v in value.items():
        if type(k) is str and type(v) is str and 0 < len(k) <= _MAX_TAG_KEY and len(v) <= _MAX_TAG_VALUE:
            out[k] = v  # the common case, checked at once
            continue
        if not isinstance(k, str) or not k or len(k) > _MAX_TAG_KEY:
            raise SpanInvalid("tags", f"a tag name must be a string of 1-{_MAX_TAG_KEY} characters, got {str(k)[:40]!r}")
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise SpanInvalid(f"tags.{k}", "expected a string")
        out[k] = str(v)[:_MAX_TAG_VALUE]
    return out


def _annotations(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise SpanInvalid("annotations", "expected a list")
    out = []
    for i, a in enumerate(value[:_MAX_ANNOTATIONS]):
        if not isinstance(a, Mapping):
            raise SpanInvalid(f"annotations.{i}", "expected an object {timestamp, value}")
        out.append({"timestamp": _micros(a.get("timestamp"), f"annotations.{i}.timestamp"),
                    "value": _text(a.get("value"), f"annotations.{i}.value", _MAX_NAME)})
    return out


def normalise(obj: Any) -> dict[str, Any]:
    """The span record of one Zipkin v2 span (a decoded JSON object); SpanInvalid naming the field."""
    if not isinstance(obj, Mapping):
        raise SpanInvalid("(span)", f"expected an object, got {type(obj).__name__}")
    span: dict[str, Any] = {
        "traceId": normalise_trace_id(obj.get("traceId")),
        "id": _hex_id(obj.get("id"), "id", 16),
    }
    if obj.get("parentId") is not None:
        span["parentId"] = _hex_id(obj["parentId"], "parentId", 16)
    if obj.get("name") is not None:
        span["name"] = _text(obj["name"], "name", _MAX_NAME)
    kind = obj.get("kind")
    if kind is not None:
        if not isinstance(kind, str) or kind.upper() not in KINDS:
            raise SpanInvalid("kind", f"expected one of {', '.join(KINDS)}, got {str(kind)[:40]!r}")
        span["kind"] = kind.upper()
    if obj.get("timestamp") is None:
        raise SpanInvalid("timestamp", "required: the start, in microseconds since the epoch")
    span["timestamp"] = _micros(obj["timestamp"], "timestamp")
    span["duration"] = _micros(obj["duration"], "duration") if obj.get("duration") is not None else 0
    for key in ("localEndpoint", "remoteEndpoint"):
        if obj.get(key) is not None:
            span[key] = _endpoint(obj[key], key)
    if obj.get("tags") is not None:
        span["tags"] = _tags(obj["tags"])
    if obj.get("annotations") is not None:
        span["annotations"] = _annotations(obj["annotations"])
    for key in ("shared", "debug"):
        if obj.get(key) is True:
            span[key] = True
    return span


def parse_spans(doc: Any, max_spans: int = MAX_SPANS_PER_BODY) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """(spans kept, ``[{field, reason}]`` for each refused one, the field prefixed by its index) of a
    posted body, decoded (the front door decodes with its nesting bounded): a JSON array of Zipkin
    v2 spans. A document that is no such array raises SpanInvalid."""
    if not isinstance(doc, list):
        raise SpanInvalid("(body)", "expected a JSON array of Zipkin v2 spans")
    if len(doc) > max_spans:
        raise SpanInvalid("(body)", f"at most {max_spans} spans per body, got {len(doc)}")
    kept: list[dict[str, Any]] = []
    refused: list[dict[str, str]] = []
    for i, obj in enumerate(doc):
        try:
            kept.append(normalise(obj))
        except SpanInvalid as exc:
            refused.append({"field": f"{i}.{exc.field}", "reason": exc.reason})
    return kept, refused


_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)  # one encoder: building one per span costs 3x


def line(span: Mapping[str, Any]) -> bytes:
    """One span as a line of the on-disk spool (compact JSON and a newline)."""
    return _COMPACT.encode(span).encode() + b"\n"


def from_line(raw: bytes) -> dict[str, Any]:
    """A span back from a spool line; SpanInvalid when the line is not one (a torn or edited file)."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise SpanInvalid("(line)", f"malformed JSON: {str(exc)[:200]}") from None
    return normalise(obj)


# ---- OTLP/HTTP JSON ------------------------------------------------------------------------------

_OTLP_KIND = {"SERVER": 2, "CLIENT": 3, "PRODUCER": 4, "CONSUMER": 5}  # SPAN_KIND_*; 1 internal


def _attrs(tags: Mapping[str, str]) -> list[dict[str, Any]]:
    return [{"key": k, "value": {"stringValue": v}} for k, v in sorted(tags.items())]


def to_otlp(spans: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """An OTLP ``ExportTraceServiceRequest`` in its JSON form (POST to an OTLP/HTTP ``/v1/traces``):
    one resource per service name; ids in hex, times in nanoseconds as the protocol's JSON mapping
    says; a span whose status tag is 5xx (or has an ``error`` tag) gets status ERROR."""
    by_service: dict[str, list[dict[str, Any]]] = {}
    for s in spans:
        service = (s.get("localEndpoint") or {}).get("serviceName") or "unknown"
        tags = dict(s.get("tags") or {})
        start = int(s["timestamp"]) * 1000
        out: dict[str, Any] = {
            "traceId": s["traceId"], "spanId": s["id"], "name": s.get("name") or "",
            "kind": _OTLP_KIND.get(s.get("kind") or "", 1),
            "startTimeUnixNano": str(start), "endTimeUnixNano": str(start + int(s.get("duration") or 0) * 1000),
            "attributes": _attrs(tags),
        }
        if s.get("parentId"):
            out["parentSpanId"] = s["parentId"]
        if s.get("annotations"):
            out["events"] = [{"timeUnixNano": str(int(a["timestamp"]) * 1000), "name": a["value"]} for a in s["annotations"]]
        code = tags.get("http.status_code", "")
        if "error" in tags or code.startswith("5"):
            out["status"] = {"code": 2, "message": tags.get("error", "")}
        by_service.setdefault(service, []).append(out)
    return {"resourceSpans": [
        {"resource": {"attributes": _attrs({"service.name": name})},
         "scopeSpans": [{"scope": {"name": "meshpilot"}, "spans": items}]}
        for name, items in sorted(by_service.items())
    ]}
