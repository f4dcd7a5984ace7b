"""The node's spans: a local Zipkin receiver for Envoy, a bounded spool on disk, and a shipper.

Envoy's Zipkin tracer posts its spans (Zipkin v2 JSON) to the agent on loopback (``Receiver``, the
bootstrap's ``meshpilot-traces`` cluster). Each span is normalised (meshpilot/telemetry/spans.py) and
appended as one JSON line to the node's ``Spool``: numbered files in ``<workdir>/traces``, each at most
``max_file_bytes``, at most ``max_files`` of them; when a new file would exceed the count the oldest is
deleted and its unshipped spans are counted as dropped. The ``Shipper`` reads the spool from a cursor
(file number, byte offset) kept in ``cursor.json``, posts a batch to the control plane's ``POST
/v1/spans`` (or to a Zipkin v2 or OTLP/HTTP endpoint of the operator's) and moves the cursor past the
batch only after a 2xx, so spans wait on disk while the backend is down or the agent restarts, and a
batch is sent at least once. A batch the backend refuses for its content (400, 413, 422) would never
pass: it is dropped, counted and logged rather than blocking the spool. A stopping agent ships what is
left once its Envoy stopped (``flush``, bounded in time). docs/observability.md
(Tracing) has the operator's view.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
from aiohttp import web

from meshpilot import boundedjson
from meshpilot.telemetry.spans import COLLECTOR_PATH, SpanInvalid, from_line, line, parse_spans, to_otlp

__all__ = ["Backend", "Cursor", "Receiver", "Shipper", "Spool"]

log = logging.getLogger("meshpilot.sidecar.traces")

_PREFIX = "spans-"
_SUFFIX = ".jsonl"


@dataclass(frozen=True, slots=True, order=True)
class Cursor:
    """Everything before byte ``offset`` of file ``seq`` (and every earlier file) has been shipped."""

    seq: int
    offset: int


@dataclass(slots=True)
class _Stats:
    written: int = 0
    dropped: int = 0  # unshipped spans lost to the bound
    shipped: int = 0
    refused: int = 0  # spans the backend refused for their content


class Spool:
    """Spans one per line in rotating files under ``directory``, with a persisted read cursor.

    Writes and reads happen on the agent's event loop (small appends); nothing here blocks on the
    network. A line that a crash left half-written is cut off when the spool is opened again."""

    def __init__(self, directory: Path, max_file_bytes: int = 4 * 1024 * 1024, max_files: int = 8,
                 prefix: str = _PREFIX, what: str = "spans") -> None:
        """``prefix``: the files' name before their number; ``what``: what its lines are, in its log
        events (the node's log records use a spool of their own, sidecar/logs.py)."""
        if max_file_bytes < 1024:
            raise ValueError(f"max_file_bytes: at least 1024, got {max_file_bytes}")
        if max_files < 2:
            raise ValueError(f"max_files: at least 2 (one written, one shipped), got {max_files}")
        self.dir = directory
        self._prefix = prefix
        self.what = what
        self.max_file_bytes = max_file_bytes
        self.max_files = max_files
        self.dir.mkdir(parents=True, exist_ok=True)
        self.stats = _Stats()
        self._cursor_file = self.dir / "cursor.json"
        self._files = self._scan()
        self.cursor = self._load_cursor()
        if not self._files:
            self._files = [max(1, self.cursor.seq)]
            self._path(self._files[0]).touch()
        self._repair_tail()
        if self.cursor.seq < self._files[0]:
            self.cursor = Cursor(self._files[0], 0)
        self._size = self._path(self._files[-1]).stat().st_size

    # ---- files -----------------------------------------------------------------------------

    def _path(self, seq: int) -> Path:
        return self.dir / f"{self._prefix}{seq:012d}{_SUFFIX}"

    def _scan(self) -> list[int]:
        seqs = []
        for p in self.dir.glob(f"{self._prefix}*{_SUFFIX}"):
            digits = p.name[len(self._prefix):-len(_SUFFIX)]
            if digits.isdigit():
                seqs.append(int(digits))
        return sorted(seqs)

    def _load_cursor(self) -> Cursor:
        try:
            doc = json.loads(self._cursor_file.read_text())
            cursor = Cursor(int(doc["seq"]), int(doc["offset"]))
            self.stats.dropped = int(doc.get("dropped", 0))
            self.stats.refused = int(doc.get("refused", 0))
            return cursor if cursor.seq >= 0 and cursor.offset >= 0 else Cursor(0, 0)
        except (OSError, ValueError, KeyError, TypeError):
            return Cursor(self._files[0] if self._files else 1, 0)

    def _save_cursor(self) -> None:
        tmp = self._cursor_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"seq": self.cursor.seq, "offset": self.cursor.offset,
                                   "dropped": self.stats.dropped, "refused": self.stats.refused}))
        os.replace(tmp, self._cursor_file)

    def _repair_tail(self) -> None:
        """Cut a half-written last line off the newest file (the agent died mid-append)."""
        path = self._path(self._files[-1])
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with path.open("r+b") as f:
                f.truncate(keep)
            log.warning("event=%s_spool_torn_line file=%s cut_bytes=%d", self.what, path.name, len(data) - keep)

    @property
    def files(self) -> list[int]:
        return list(self._files)

    # ---- writing ---------------------------------------------------------------------------

    def append(self, spans: Sequence[dict[str, Any]]) -> None:
        """Append spans, rotating to a new file at the size bound and dropping the oldest file at
        the count bound (its unshipped spans are counted in ``stats.dropped``)."""
        self.append_lines([line(span) for span in spans])

    def append_lines(self, lines: Sequence[bytes]) -> None:
        """``append`` for records already encoded, one line each ending in a newline."""
        chunk = bytearray()
        for data in lines:
            if self._size + len(chunk) + len(data) > self.max_file_bytes and (self._size or chunk):
                self._write(bytes(chunk))
                chunk.clear()
                self._rotate()
            chunk += data
        if chunk:
            self._write(bytes(chunk))
        self.stats.written += len(lines)

    def _write(self, data: bytes) -> None:
        with self._path(self._files[-1]).open("ab") as f:
            f.write(data)
        self._size += len(data)

    def _rotate(self) -> None:
        seq = self._files[-1] + 1
        self._path(seq).touch()
        self._files.append(seq)
        self._size = 0
        while len(self._files) > self.max_files:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        oldest = self._files.pop(0)
        path = self._path(oldest)
        lost = 0
        if self.cursor.seq <= oldest:
            data = path.read_bytes()
            start = self.cursor.offset if self.cursor.seq == oldest else 0
            lost = data[start:].count(b"\n")
        path.unlink(missing_ok=True)
        if self.cursor.seq <= oldest:
            self.cursor = Cursor(self._files[0], 0)
        if lost:
            self.stats.dropped += lost
            log.warning("event=%s_dropped reason=spool_full file=%d %s=%d dropped_total=%d",
                        self.what, oldest, self.what, lost, self.stats.dropped)
        self._save_cursor()

    # ---- reading ---------------------------------------------------------------------------

    def read(self, max_spans: int = 500, max_bytes: int = 512 * 1024) -> tuple[list[bytes], Cursor]:
        """(up to ``max_spans`` unshipped lines, the cursor after them). Nothing is consumed until
        ``commit`` is given that cursor."""
        lines: list[bytes] = []
        size = 0
        cursor = self.cursor
        while len(lines) < max_spans and size < max_bytes:
            if cursor.seq not in self._files:
                later = [s for s in self._files if s > cursor.seq]
                if not later:
                    break
                cursor = Cursor(later[0], 0)
            torn = False
            with self._path(cursor.seq).open("rb") as f:
                f.seek(cursor.offset)
                while len(lines) < max_spans and size < max_bytes:
                    raw = f.readline()
                    if not raw.endswith(b"\n"):
                        torn = bool(raw)
                        break
                    lines.append(raw)
                    size += len(raw)
                    cursor = Cursor(cursor.seq, cursor.offset + len(raw))
                else:
                    break  # the batch is full
            later = [s for s in self._files if s > cursor.seq]
            if not later:
                break
            if torn:  # a line without its newline in a file no longer written
                log.warning("event=%s_spool_torn_line file=%d offset=%d", self.what, cursor.seq, cursor.offset)
            cursor = Cursor(later[0], 0)
        return lines, cursor

    def commit(self, cursor: Cursor, shipped: int = 0, refused: int = 0) -> None:
        """Move the cursor (after the backend took the batch) and delete the files wholly behind it."""
        if cursor < self.cursor:
            return  # the bound moved it on meanwhile
        self.cursor = cursor
        self.stats.shipped += shipped
        self.stats.refused += refused
        for seq in [s for s in self._files[:-1] if s < cursor.seq]:
            self._path(seq).unlink(missing_ok=True)
            self._files.remove(seq)
        self._save_cursor()

    def pending(self) -> int:
        """Unshipped spans on disk (counts lines; for status and tests)."""
        total = 0
        for seq in self._files:
            if seq < self.cursor.seq:
                continue
            data = self._path(seq).read_bytes()
            total += data[self.cursor.offset if seq == self.cursor.seq else 0:].count(b"\n")
        return total


# ---- the receiver --------------------------------------------------------------------------------


class Receiver:
    """A Zipkin v2 JSON endpoint (``POST /api/v2/spans``) on loopback for the node's Envoy: good
    spans go to the spool, a body that is no span array gets 400, refused spans are counted."""

    def __init__(self, spool: Spool, host: str = "127.0.0.1", port: int = 0, max_body: int = 8 * 1024 * 1024) -> None:
        self.spool = spool
        self.host = host
        self.port = port
        self.max_body = max_body
        self.arrived = asyncio.Event()
        self.refused = 0
        self._runner: web.AppRunner | None = None

    def take(self, raw: bytes) -> tuple[int, dict[str, Any]]:
        """(status, answer) for a posted body; the spans it holds are in the spool when it returns."""
        try:
            doc = boundedjson.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            reason = f"malformed JSON: {str(exc)[:200]}"
            return 400, {"error": f"(body): {reason}", "fields": [{"field": "(body)", "reason": reason}]}
        try:
            spans, refused = parse_spans(doc)
        except SpanInvalid as exc:
            return 400, {"error": str(exc), "fields": [{"field": exc.field, "reason": exc.reason}]}
        if spans:
            self.spool.append(spans)
            self.arrived.set()
        if refused:
            self.refused += len(refused)
            log.warning("event=spans_refused count=%d first=%s", len(refused), json.dumps(refused[0]))
        return 202, {"accepted": len(spans), "refused": refused[:20]}

    async def _post(self, request: web.Request) -> web.Response:
        status, body = self.take(await request.read())
        return web.json_response(body, status=status)

    async def start(self) -> int:
        app = web.Application(client_max_size=self.max_body)
        app.router.add_post(COLLECTOR_PATH, self._post)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


# ---- the shipper ---------------------------------------------------------------------------------

Format = Literal["meshpilot", "zipkin", "otlp"]


@dataclass(frozen=True, slots=True)
class Backend:
    """Where the spans go: the control plane's ``/v1/spans`` (``meshpilot``, every replica's URL,
    the management token), a Zipkin v2 JSON endpoint (``zipkin``: Zipkin, Jaeger's Zipkin collector)
    or an OTLP/HTTP JSON endpoint (``otlp``: an OpenTelemetry collector, Jaeger)."""

    urls: tuple[str, ...]
    format: Format = "meshpilot"
    headers: dict[str, str] = field(default_factory=dict)

    def body(self, lines: Sequence[bytes]) -> bytes:
        if self.format == "otlp":
            return json.dumps(to_otlp(from_line(raw) for raw in lines)).encode()
        return b"[" + b",".join(raw.rstrip(b"\n") for raw in lines) + b"]"


_REFUSED = (400, 413, 422)  # the batch itself is refused: sending it again would not help


class Shipper:
    """Sends the spool's spans to a backend in batches; retries with back-off while it fails."""

    def __init__(self, spool: Spool, backend: Backend, arrived: asyncio.Event | None = None,
                 batch_spans: int = 500, idle_s: float = 1.0, max_delay_s: float = 10.0) -> None:
        self.spool = spool
        self.backend = backend
        self.arrived = arrived or asyncio.Event()
        self.batch_spans = batch_spans
        self.idle_s = idle_s
        self.max_delay_s = max_delay_s
        self.failures = 0
        self.last_error = ""
        self._url_index = 0

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        delay = 0.2
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                sent = await self.ship_once(http)
                if sent is None:  # the backend failed: wait, then the same batch again
                    await asyncio.sleep(delay)
                    delay = min(self.max_delay_s, delay * 2)
                    continue
                delay = 0.2
                if sent == 0:
                    self.arrived.clear()
                    try:
                        async with asyncio.timeout(self.idle_s):
                            await self.arrived.wait()
                    except TimeoutError:
                        pass

    async def flush(self, http: aiohttp.ClientSession, bound_s: float = 2.0) -> None:
        """The final ship of a stopping agent: batches until the spool is shipped, the backend fails or
        ``bound_s`` passes (what is left waits on disk for the next start)."""
        try:
            async with asyncio.timeout(bound_s):
                while await self.ship_once(http):
                    pass
        except TimeoutError:
            log.warning("event=%s_flush_unfinished pending=%d", self.spool.what, self.spool.pending())
        except Exception as exc:  # noqa: BLE001 - the lines stay on disk for the next start
            log.error("event=%s_flush_failed error=%r", self.spool.what, exc)

    async def ship_once(self, http: aiohttp.ClientSession) -> int | None:
        """Send one batch: the number of spans it held (0: nothing to send), None when the backend
        did not take it (the cursor stays)."""
        lines, cursor = self.spool.read(self.batch_spans)
        if not lines:
            if cursor != self.spool.cursor:
                self.spool.commit(cursor)  # past an empty file
            return 0
        try:
            body = self.backend.body(lines)
        except SpanInvalid as exc:  # an edited or damaged spool file: skip the batch
            log.error("event=%s_unreadable error=%s %s=%d", self.spool.what, exc, self.spool.what, len(lines))
            self.spool.commit(cursor, refused=len(lines))
            return len(lines)
        status = await self._post(http, body)
        if status is None:
            return None
        if 200 <= status < 300:
            self.spool.commit(cursor, shipped=len(lines))
            if self.failures:
                log.info("event=%s_backend_back after_failures=%d", self.spool.what, self.failures)
            self.failures = 0
            return len(lines)
        if status in _REFUSED:
            log.error("event=%s_refused_by_backend status=%d %s=%d error=%s", self.spool.what, status, self.spool.what, len(lines),
                      self.last_error)
            self.spool.commit(cursor, refused=len(lines))
            return len(lines)
        self._failed(f"status {status}: {self.last_error}")
        return None

    async def _post(self, http: aiohttp.ClientSession, body: bytes) -> int | None:
        urls = self.backend.urls
        headers = {"Content-Type": "application/json", **self.backend.headers}
        for step in range(len(urls)):
            index = (self._url_index + step) % len(urls)
            try:
                async with http.post(urls[index], data=body, headers=headers) as r:
                    text = await r.text()
                    if r.status in (502, 503, 504) and step < len(urls) - 1:
                        continue
                    self._url_index = index
                    self.last_error = text[:300]
                    return r.status
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                self.last_error = repr(exc)
        self._failed(self.last_error)
        return None

    def _failed(self, error: str) -> None:
        self.failures += 1
        if self.failures == 1 or self.failures % 20 == 0:
            log.warning("event=%s_backend_failed failures=%d pending=%d error=%s", self.spool.what, self.failures,
                        self.spool.pending(), error[:300])


# ---- standalone: the receiver and spool alone (benchmarks: meshpilot/perf/tracing.py) --------------


async def _serve(directory: Path, port: int, port_file: Path | None) -> None:
    receiver = Receiver(Spool(directory), port=port)
    bound = await receiver.start()
    if port_file is not None:
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(str(bound))
        os.replace(tmp, port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await receiver.close()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m meshpilot.sidecar.traces",
                                     description="the node's span receiver and spool alone, without a shipper")
    parser.add_argument("--dir", required=True, type=Path, help="the spool directory")
    parser.add_argument("--port", type=int, default=0, help="loopback port (0: the OS picks)")
    parser.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    args = parser.parse_args()
    asyncio.run(_serve(args.dir, args.port, args.port_file))
