"""The control plane's trace store: the newest spans sidecars shipped, grouped by trace, in memory.

Bounded by a span count and by bytes: when adding spans would pass ``max_spans`` spans or ``max_bytes``
bytes (about: the spans' strings and a fixed cost per span and per trace, ``size_of``), whole traces
go, the ones least recently written first. One trace holds at most ``max_trace_spans`` spans (a tenth
of the store unless told) and a tenth of ``max_bytes``:
a caller's sampling decision is kept from any peer, so anyone who can reach a sidecar can write every
request into one trace id, and such a trace must not grow without bound nor push out every other
trace. Spans past a trace's share are dropped and counted (``dropped_spans``), and the trace is
marked ``truncated``. Nothing is kept across a restart (the store is for looking at what the mesh
does now; a durable history belongs in a tracing backend, where sidecars can ship instead). A span
that arrives twice (a shipper sends a batch again when our 2xx was lost) is kept once: spans are keyed
by (span id, kind, service). ``traces`` lists trace summaries, newest first, for a service and a time;
``tree`` gives one trace as a tree of spans by parent id, each with its offset from the trace's start,
ready to draw as a waterfall. Pure: no I/O.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MAX_NESTING", "TraceStore", "size_of"]

MAX_NESTING = 64  # how deep a trace's answer nests children (deeper spans are listed flat under their ancestor)


def _service(span: Mapping[str, Any]) -> str:
    return str((span.get("localEndpoint") or {}).get("serviceName") or "")


def _services(span: Mapping[str, Any]) -> set[str]:
    """Names a query may find the span's service by: its endpoint's service name and its mesh service key."""
    out = {_service(span)}
    key = (span.get("tags") or {}).get("mesh.service")
    if key:
        out.add(str(key))
        out.add(str(key).split(".", 1)[0])
    out.discard("")
    return out


# what a kept span costs besides its strings (its dict, ints, ids, endpoints, the key): measured with
# tracemalloc, about 1 KB; a tag or an annotation costs its dict slot or dict and its string objects
_SPAN_BYTES = 1024
_TAG_BYTES = 120
_ANNOTATION_BYTES = 250
_TRACE_BYTES = 1200  # a trace's own record: its dict of spans, its set of services, its entry


def size_of(span: Mapping[str, Any]) -> int:
    """About the bytes a kept span holds: its strings (a character is a byte or more) and fixed costs."""
    n = _SPAN_BYTES + len(span.get("name") or "")
    for key in ("localEndpoint", "remoteEndpoint"):
        for value in (span.get(key) or {}).values():
            if isinstance(value, str):
                n += len(value)
    tags = span.get("tags")
    if tags:
        n += _TAG_BYTES * len(tags) + sum(map(len, tags)) + sum(map(len, tags.values()))
    for a in span.get("annotations") or ():
        n += _ANNOTATION_BYTES + len(a.get("value") or "")
    return n


@dataclass(slots=True)
class _Trace:
    spans: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    services: set[str] = field(default_factory=set)
    start: int = 0
    end: int = 0
    bytes: int = _TRACE_BYTES
    dropped: int = 0  # spans refused past the trace's share of the store


class TraceStore:
    def __init__(self, max_spans: int = 100_000, max_trace_spans: int | None = None,
                 max_bytes: int = 256 * 1024 * 1024) -> None:
        if max_spans < 1:
            raise ValueError(f"max_spans: at least 1, got {max_spans}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes: at least 1, got {max_bytes}")
        per_trace = max(1, max_spans // 10) if max_trace_spans is None else max_trace_spans
        if not 1 <= per_trace <= max_spans:
            raise ValueError(f"max_trace_spans: from 1 to max_spans ({max_spans}), got {per_trace}")
        self.max_spans = max_spans
        self.max_trace_spans = per_trace
        self.max_bytes = max_bytes
        self.max_trace_bytes = max_bytes // 10
        self._traces: OrderedDict[str, _Trace] = OrderedDict()  # least recently written first
        self.span_count = 0
        self.bytes = 0  # size_of every kept span and each trace's own cost
        self.evicted_traces = 0
        self.dropped_spans = 0

    def add(self, spans: Iterable[Mapping[str, Any]]) -> int:
        """Keep normalised spans (meshpilot/telemetry/spans.py); returns how many were new."""
        new = 0
        for span in spans:
            tid = str(span["traceId"])
            key = (str(span["id"]), str(span.get("kind") or ""), _service(span))
            size = size_of(span)
            trace = self._traces.get(tid)
            if trace is None:
                if _TRACE_BYTES + size > self.max_trace_bytes:  # alone past a trace's share
                    self.dropped_spans += 1
                    continue
                trace = self._traces[tid] = _Trace(start=int(span["timestamp"]), end=int(span["timestamp"]))
                self.bytes += trace.bytes
            else:
                self._traces.move_to_end(tid)
            old = trace.spans.get(key)
            if old is None:
                if len(trace.spans) >= self.max_trace_spans or trace.bytes + size > self.max_trace_bytes:
                    trace.dropped += 1
                    self.dropped_spans += 1
                    continue
                new += 1
                self.span_count += 1
            else:
                size -= size_of(old)
            trace.spans[key] = dict(span)
            trace.bytes += size
            self.bytes += size
            trace.services |= _services(span)
            begin = int(span["timestamp"])
            trace.start = min(trace.start, begin)
            trace.end = max(trace.end, begin + int(span.get("duration") or 0))
        # the newest trace holds at most a tenth of either bound, so the loop ends within both
        while (self.span_count > self.max_spans or self.bytes > self.max_bytes) and len(self._traces) > 1:
            _, gone = self._traces.popitem(last=False)
            self.span_count -= len(gone.spans)
            self.bytes -= gone.bytes
            self.evicted_traces += 1
        return new

    def __len__(self) -> int:
        return len(self._traces)

    def traces(self, service: str = "", since_us: int = 0, limit: int = 20) -> list[dict[str, Any]]:
        """Summaries of the newest traces (by start) that a service took part in and that started at
        or after ``since_us`` (microseconds since the epoch)."""
        found = [
            (t.start, tid, t) for tid, t in self._traces.items()
            if t.start >= since_us and (not service or service in t.services)
        ]
        found.sort(key=lambda item: (item[0], item[1]), reverse=True)
        return [self._summary(tid, t) for _, tid, t in found[:limit]]

    def _summary(self, tid: str, t: _Trace) -> dict[str, Any]:
        parents = _parents(t)
        roots = [s for s in self._ordered(t) if parents.get(_key(s)) is None]
        root = roots[0] if roots else None
        return {
            "trace_id": tid, "start": t.start, "duration_us": t.end - t.start, "span_count": len(t.spans),
            "services": sorted({_service(s) for s in t.spans.values() if _service(s)}),
            "root": {"name": root.get("name", ""), "service": _service(root)} if root else None,
            "errors": sum(1 for s in t.spans.values() if _failed(s)),
            "truncated": t.dropped > 0, "dropped_spans": t.dropped,
        }

    @staticmethod
    def _ordered(t: _Trace) -> list[dict[str, Any]]:
        return sorted(t.spans.values(), key=lambda s: (int(s["timestamp"]), str(s["id"]), str(s.get("kind") or "")))

    def tree(self, trace_id: str) -> dict[str, Any] | None:
        """The trace as a tree: ``roots`` are spans whose parent is not in the store, each span with
        its ``children`` (by start time), ``offset_us`` from the trace's start and ``depth``. Children
        nest at most ``MAX_NESTING`` deep (a chain of thousands of spans, an app parenting each call on
        the previous one, could not be encoded as JSON): below that, a span's descendants follow it
        in tree order as further children of its ancestor at that depth, each with its real
        ``depth`` and ``parentId``, so walking the answer depth first gives every span in tree order."""
        t = self._traces.get(trace_id)
        if t is None:
            return None
        parents = _parents(t)
        nodes: dict[tuple[str, str, str], dict[str, Any]] = {}
        for key, span in t.spans.items():
            nodes[key] = {**span, "service": _service(span), "offset_us": int(span["timestamp"]) - t.start,
                          "error": _failed(span), "children": []}
        below: dict[tuple[str, str, str] | None, list[tuple[str, str, str]]] = {}
        for span in self._ordered(t):
            key = _key(span)
            below.setdefault(parents.get(key), []).append(key)
        roots: list[dict[str, Any]] = []
        # depth first, in order: (span, its depth, the span whose children it is listed with)
        stack: list[tuple[tuple[str, str, str], int, tuple[str, str, str] | None]] = [
            (key, 0, None) for key in reversed(below.get(None, []))]
        while stack:
            key, d, holder = stack.pop()
            node = nodes[key]
            node["depth"] = d
            (roots if holder is None else nodes[holder]["children"]).append(node)
            under = key if d <= MAX_NESTING else holder
            stack.extend((child, d + 1, under) for child in reversed(below.get(key, [])))
        return {**self._summary(trace_id, t), "roots": roots}


def _key(span: Mapping[str, Any]) -> tuple[str, str, str]:
    return (str(span["id"]), str(span.get("kind") or ""), _service(span))


def _parents(t: _Trace) -> dict[tuple[str, str, str], tuple[str, str, str] | None]:
    """Each span's parent in the trace (None: a root). A SERVER span that shares its id with a CLIENT
    span (Zipkin's shared span context) hangs under that CLIENT span, and what its service did next
    under the SERVER span. A span whose parents lead back to itself (junk ids) is made a root."""
    by_id: dict[str, list[tuple[str, str, str]]] = {}
    for key in t.spans:
        by_id.setdefault(key[0], []).append(key)
    out: dict[tuple[str, str, str], tuple[str, str, str] | None] = {}
    for key, span in t.spans.items():
        parent: tuple[str, str, str] | None = None
        if key[1] == "SERVER":
            parent = next((k for k in by_id.get(key[0], ()) if k[1] == "CLIENT"), None)
        if parent is None and span.get("parentId"):
            candidates = sorted(by_id.get(str(span["parentId"]), ()), key=lambda k: k[1] != "SERVER")
            parent = candidates[0] if candidates else None
        out[key] = parent if parent != key else None
    done: set[tuple[str, str, str]] = set()  # spans whose way up is known to end at a root
    for key in out:  # break cycles: walking up, the first span met twice becomes a root
        path = [key]
        on_path = {key}
        up = out[key]
        while up is not None and up not in done and up not in on_path:
            path.append(up)
            on_path.add(up)
            up = out.get(up)
        if up is not None and up in on_path:
            out[up] = None
        done.update(path)
    return out


def _failed(span: Mapping[str, Any]) -> bool:
    tags = span.get("tags") or {}
    return "error" in tags or str(tags.get("http.status_code", "")).startswith("5")
