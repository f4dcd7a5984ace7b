"""The node's logs: the agent follows its Envoy's access log and the app log files named in spec.yaml,
keeps each line as a log record in a bounded spool on disk, and ships the records to the control plane.

Envoy writes one JSON access-log line per request to its stdout (translate/listeners.py), which the
agent's supervisor sends to ``<workdir>/envoy.log`` together with Envoy's own log; the ``Collector``
follows that file and keeps the JSON lines as ``access`` records (level from the status: 5xx error,
4xx warn, else info; the trace id Envoy wrote), and follows each file of ``mesh.logs.files`` as
``app`` records (level and trace id when the line names them). Records (meshpilot/telemetry/logs.py)
go to a ``Spool`` of their own (``<workdir>/logs/logs-*.jsonl``: the span spool of sidecar/traces.py
with its size and count bounds and its cursor), and the span ``Shipper`` sends them to the control
plane's ``POST /v1/logs``, moving the cursor only after a 2xx: records wait on disk while the control
plane is down and arrive later, at least once (the store keeps each record id once).

A ``Follower`` reads one file from an offset kept in ``<workdir>/logs/follow.json`` with the file's
inode, written after the records are in the spool, so an agent restart loses no lines; a record's id
comes from where its line is (``record_id``: node, path, the follower's epoch, inode and offset), so a
line read again after a crash between the two writes is kept once by the store. A file with no kept offset (never followed) is followed from its end as it is when the collector
starts, as ``tail -F`` does, so its history does not arrive stamped as new; a file that appears later is
read from its start. A file renamed away (rotated) is read to its end before the new file at the path is followed
from its start; a file that shrank (truncated in place) is read again from its start (one that was
truncated and grew past the offset again between two reads, 0.25 s apart, is read on from the offset:
a size check cannot see that). ``<workdir>/envoy.log`` is the
agent's own file (``LogSource.max_bytes``): once it is past ``ENVOY_LOG_MAX_BYTES`` and read to its end,
the collector truncates it in place and Envoy's appends go on at its start, so it stays bounded without
rename rotation (which Envoy, holding the renamed file open, would not follow). A line longer
than ``MAX_LINE`` bytes is cut there and the rest of it skipped; undecodable bytes are replaced.
docs/observability.md (Logs and alerts) has the operator's view.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from meshpilot.sidecar.traces import Spool
from meshpilot.telemetry.logs import MAX_LINE, find_trace_id, guess_level, line

__all__ = ["ENVOY_LOG_MAX_BYTES", "Collector", "Follower", "LogSource", "access_record", "record_id"]

log = logging.getLogger("meshpilot.sidecar.logs")

_CHUNK = 64 * 1024
ENVOY_LOG_MAX_BYTES = 64 * 1024 * 1024  # <workdir>/envoy.log is truncated once past this and read to its end


@dataclass(frozen=True, slots=True)
class LogSource:
    """A file the agent follows: ``kind`` access (Envoy's stdout), app, or envoy (Envoy's stdout kept
    bounded but not collected), and whose lines they are. ``max_bytes``: the agent's own file, truncated
    in place once it is past this and read to its end (0: never)."""

    path: Path
    kind: str
    service: str
    instance: str
    max_bytes: int = 0


class Follower:
    """Complete lines appended to one file, across rotation (rename, then a new file) and truncation."""

    def __init__(self, path: Path, inode: int = 0, offset: int = 0, max_line: int = MAX_LINE, epoch: str = "") -> None:
        self.path = path
        self.inode = inode  # of the file the offset is in (0: none seen yet)
        self.offset = offset  # bytes of that file consumed into returned lines
        # names this file's bytes from offset 0 on: a line is (epoch, inode, offset); the next epoch follows
        # from this one whenever the offset starts again at 0 (a new file, a truncation), so a file read
        # again from the same kept state names its lines as before, and new lines at old offsets anew
        self.epoch = epoch or secrets.token_hex(8)
        self.max_line = max_line
        self.cut = 0  # lines cut at max_line
        self._fd: int | None = None
        self._buf = b""
        self._skipping = False  # inside a line already cut: drop bytes up to its newline

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._buf = b""
        self._skipping = False

    def _open(self) -> bool:
        """Open the file at the path; from the kept offset when it is the same file and not shorter."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        st = os.fstat(fd)
        if st.st_ino != self.inode or st.st_size < self.offset:
            self._restart(st.st_ino)
        os.lseek(fd, self.offset, os.SEEK_SET)
        self._fd = fd
        return True

    def _restart(self, inode: int) -> None:
        self.inode, self.offset = inode, 0
        self.epoch = hashlib.blake2b(f"{self.epoch}|{inode}".encode(), digest_size=8).hexdigest()

    def _drain(self, out: list[tuple[str, str]], budget: int) -> int:
        """Read the open file to its end (or ``budget`` bytes); the bytes read."""
        assert self._fd is not None
        total = 0
        while total < budget:
            chunk = os.read(self._fd, _CHUNK)
            if not chunk:
                break
            total += len(chunk)
            self._take(chunk, out)
        return total

    def _take(self, chunk: bytes, out: list[tuple[str, str]]) -> None:
        data = self._buf + chunk
        start = 0
        base = self.offset  # offset of data[0]
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                break
            if self._skipping:
                self._skipping = False
            elif nl - start > self.max_line:
                out.append((self._at(base + start), data[start:start + self.max_line].decode("utf-8", "replace")))
                self.cut += 1
            else:
                out.append((self._at(base + start), data[start:nl].decode("utf-8", "replace").rstrip("\r")))
            start = nl + 1
            self.offset = base + start
        rest = data[start:]
        if self._skipping:
            self.offset = base + len(data)
            rest = b""
        elif len(rest) > self.max_line:
            out.append((self._at(base + start), rest[: self.max_line].decode("utf-8", "replace")))
            self.cut += 1
            self._skipping = True
            self.offset = base + len(data)
            rest = b""
        self._buf = rest

    def trim(self, max_bytes: int) -> bool:
        """Truncate the file in place when it is past ``max_bytes`` and every byte of it has been read
        into lines; True when it was. For a file whose writers append (O_APPEND, as Envoy's stdout):
        they go on at its new end. A line written between the last read and the truncation is lost."""
        if self._fd is None or self._buf or self._skipping:
            return False
        st = os.fstat(self._fd)
        if st.st_size <= max_bytes or st.st_size != self.offset:
            return False
        try:
            if os.stat(self.path).st_ino != st.st_ino:  # rotated meanwhile: not ours to cut
                return False
            os.truncate(self.path, 0)
        except OSError:
            return False
        os.lseek(self._fd, 0, os.SEEK_SET)
        self._restart(self.inode)
        log.info("event=log_file_trimmed path=%s size=%d", self.path, st.st_size)
        return True

    def _at(self, offset: int) -> str:
        return f"{self.epoch}|{self.inode}|{offset}"

    def read(self, budget: int = 4 * 1024 * 1024) -> list[str]:
        """The complete lines written since the last read (a partial last line waits for its newline)."""
        return [text for _, text in self.read_placed(budget)]

    def read_placed(self, budget: int = 4 * 1024 * 1024) -> list[tuple[str, str]]:
        """As ``read``, each line with where it is (``epoch|inode|offset``): the same line read again
        from the same kept state is at the same place."""
        out: list[tuple[str, str]] = []
        if self._fd is None and not self._open():
            return out
        self._drain(out, budget)
        try:
            st = os.stat(self.path)
        except OSError:
            return out  # renamed away and no new file yet: the open one may still grow
        assert self._fd is not None
        if st.st_ino != self.inode:  # rotated: the old file was read to its end above
            self._drain(out, budget)
            if self._buf and not self._skipping:  # its last line will get no newline now
                out.append((self._at(self.offset), self._buf.decode("utf-8", "replace")))
            self.close()
            self.inode, self.offset = 0, 0
            if self._open():
                self._drain(out, budget)
        elif st.st_size < self.offset + len(self._buf):  # truncated in place
            log.info("event=log_file_truncated path=%s size=%d offset=%d", self.path, st.st_size, self.offset)
            self.close()
            self._restart(self.inode)
            self._open()
            self._drain(out, budget)
        return out


def _status(doc: dict[str, Any]) -> int:
    try:
        return int(doc.get("status") or 0)
    except (TypeError, ValueError):
        return 0


def _time(text: Any, default: float) -> float:
    if isinstance(text, str) and text:
        try:
            return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    return default


def record_id(node: str, path: Path, place: str) -> str:
    """A record's id from where its line is (``Follower.read_placed``): a line read again (the agent
    stopped after spooling it, before keeping its offset) gets the same id, and the store keeps it once."""
    return hashlib.blake2b(f"{node}|{path}|{place}".encode(), digest_size=8).hexdigest()


def access_record(text: str, node: str, service: str, instance: str, now: float, rid: str = "") -> dict[str, Any] | None:
    """The record of one of Envoy's access-log lines, or None for any other line (Envoy's own log)."""
    if not text.startswith("{"):
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    if not isinstance(doc, dict) or "direction" not in doc:
        return None
    status = _status(doc)
    trace = doc.get("trace_id")
    trace_id = find_trace_id(f"trace_id={trace}") if isinstance(trace, str) else ""
    return {"id": rid or secrets.token_hex(8), "time": _time(doc.get("time"), now), "node": node, "service": service,
            "instance": instance, "source": "access", "level": "error" if status >= 500 else "warn" if status >= 400 else "info",
            "trace_id": trace_id, "line": text[:MAX_LINE]}


def app_record(text: str, node: str, service: str, instance: str, now: float, rid: str = "") -> dict[str, Any]:
    return {"id": rid or secrets.token_hex(8), "time": now, "node": node, "service": service, "instance": instance,
            "source": "app", "level": guess_level(text), "trace_id": find_trace_id(text), "line": text[:MAX_LINE]}


def _end_of(path: Path) -> tuple[int, int]:
    """Where to follow a file from that was never followed: its current end, as ``tail -F`` does (its
    history is not the mesh's now, and would be stamped with the time it is read); (0, 0), its start, for
    a file that does not exist yet."""
    try:
        st = os.stat(path)
    except OSError:
        return 0, 0
    return st.st_ino, st.st_size


class Collector:
    """Follows the node's log sources into the spool; ``poll`` once, or ``run`` every ``interval_s``."""

    def __init__(self, spool: Spool, sources: list[LogSource], node: str, state_file: Path,
                 interval_s: float = 0.25, clock: Callable[[], float] = time.time) -> None:
        self.spool = spool
        self.node = node
        self.sources = sources
        self.state_file = state_file
        self.interval_s = interval_s
        self.clock = clock
        self.arrived = asyncio.Event()
        kept = self._load()
        self.followers = [Follower(s.path, *(kept.get(str(s.path)) or (*_end_of(s.path), MAX_LINE, ""))) for s in sources]
        if any(str(s.path) not in kept for s in sources):
            try:
                self._save()  # where a file was first seen, so a restart before its next line goes on from there
            except OSError as exc:
                log.error("event=log_follow_state_unwritable path=%s error=%r", self.state_file, exc)

    def _load(self) -> dict[str, tuple[int, int, int, str]]:
        try:
            doc = json.loads(self.state_file.read_text())
            return {str(k): (int(v["inode"]), int(v["offset"]), MAX_LINE, str(v.get("epoch", ""))) for k, v in doc.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    def _save(self) -> None:
        doc = {str(f.path): {"inode": f.inode, "offset": f.offset, "epoch": f.epoch} for f in self.followers}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.state_file)

    def poll(self) -> int:
        """Records appended to the spool from every source's new lines."""
        now = self.clock()
        encoded: list[bytes] = []
        moved = False
        for source, follower in zip(self.sources, self.followers):
            before = (follower.inode, follower.offset)
            for place, text in follower.read_placed():
                rid = record_id(self.node, source.path, place)
                if source.kind == "access":
                    record = access_record(text, self.node, source.service, source.instance, now, rid)
                elif source.kind == "app" and text.strip():
                    record = app_record(text, self.node, source.service, source.instance, now, rid)
                else:
                    record = None
                if record is not None:
                    encoded.append(line(record))
            moved = moved or before != (follower.inode, follower.offset)
        if encoded:
            self.spool.append_lines(encoded)
            self.arrived.set()
        for source, follower in zip(self.sources, self.followers):
            if source.max_bytes and follower.trim(source.max_bytes):  # after its lines are in the spool
                moved = True
        if moved:
            self._save()  # after the spool has the records: a crash in between repeats lines, never loses them
        return len(encoded)

    async def run(self) -> None:
        try:
            while True:
                try:
                    self.poll()
                except Exception as exc:  # noqa: BLE001 - a disk error, a bug: the offsets stay, the next poll tries again
                    log.error("event=log_collect_failed error=%r", exc)
                await asyncio.sleep(self.interval_s)
        finally:
            for f in self.followers:
                f.close()
