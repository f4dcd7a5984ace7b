"""The control plane's log store: the newest log records sidecars shipped, in memory.

Bounded by a record count and by bytes: past ``max_records`` records or ``max_bytes`` bytes (about: the
line, the names and a fixed cost per record, ``size_of``) the records that arrived first go, so long
lines cannot grow the store past its budget. Nothing is kept
across a restart and replicas do not share it (each keeps what its sidecars sent it); it is for
looking at what the mesh does now and for the alert rules' recent windows, not a log archive. A
record that arrives twice (a shipper sends a batch again when our 2xx was lost) is kept once, by its
id. ``search`` answers the newest matching records first; ``count`` is the ``LogCounter`` the alert
rules read (meshpilot/telemetry/logs.py). Each record's line is kept lower-cased too, once, as it
arrives (counted in the bytes; shared when the line has no upper case), so a text search compares
without copying every line. ``search`` and ``count`` work on a snapshot of the records, so they may run in
a thread while the event loop adds records (the routes and the alert rules run them so). Pure: no I/O.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable
from typing import Any

from meshpilot.telemetry.logs import LogMatch

__all__ = ["LogStore"]


# what a kept record costs besides its strings: the dict, its floats and the id set's entry (measured
# with tracemalloc: about 800 bytes a record beyond the lengths of its line and names)
_RECORD_BYTES = 800


class LogStore:
    def __init__(self, max_records: int = 100_000, max_bytes: int = 256 * 1024 * 1024) -> None:
        if max_records < 1:
            raise ValueError(f"max_records: at least 1, got {max_records}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes: at least 1, got {max_bytes}")
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.bytes = 0  # size_of every kept record
        self._records: deque[tuple[dict[str, Any], str, int]] = deque()  # (record, its line lower-cased, size)
        self._ids: set[str] = set()
        self.dropped = 0  # records that left for the bounds

    @staticmethod
    def size_of(r: dict[str, Any], lowered: str | None = None) -> int:
        """About the bytes a kept record holds: its strings (a character is a byte or more), the lower-cased
        copy of its line when that is another string, and a fixed cost."""
        low = 0 if lowered is None or lowered is r["line"] else len(lowered)
        return _RECORD_BYTES + len(r["line"]) + low + len(r["node"]) + len(r["service"]) + len(r["instance"])

    def __len__(self) -> int:
        return len(self._records)

    def add(self, records: Iterable[dict[str, Any]]) -> int:
        """Keep normalised records; the number that were new."""
        new = 0
        for r in records:
            if r["id"] in self._ids:
                continue
            lowered = r["line"].lower()
            if lowered == r["line"]:
                lowered = r["line"]  # one string, not two
            size = self.size_of(r, lowered)
            self._records.append((r, lowered, size))
            self._ids.add(r["id"])
            self.bytes += size
            new += 1
        while len(self._records) > self.max_records or (self.bytes > self.max_bytes and self._records):
            gone, _, size = self._records.popleft()
            self._ids.discard(gone["id"])
            self.bytes -= size
            self.dropped += 1
        return new

    def _select(self, match: LogMatch, since: float, until: float) -> Iterable[dict[str, Any]]:
        for r, lowered, _ in list(self._records):  # a snapshot: the loop may add records meanwhile
            if since <= r["time"] < until and match.matches(r, lowered):
                yield r

    def search(self, match: LogMatch, since: float = 0.0, until: float = float("inf"), limit: int = 100) -> list[dict[str, Any]]:
        """Up to ``limit`` matching records with ``since <= time < until``, newest first."""
        return heapq.nlargest(limit, self._select(match, since, until), key=lambda r: (r["time"], r["id"]))

    def count(self, match: LogMatch, since: float, until: float) -> int:
        return sum(1 for _ in self._select(match, since, until))
