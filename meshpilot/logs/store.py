"""The control plane's log store: the newest log records sidecars shipped, in memory.

Bounded by a record count: past ``max_records`` the records that arrived first go. Nothing is kept
across a restart and replicas do not share it (each keeps what its sidecars sent it); it is for
looking at what the mesh does now and for the alert rules' recent windows, not a log archive. A
record that arrives twice (a shipper sends a batch again when our 2xx was lost) is kept once, by its
id. ``search`` answers the newest matching records first; ``count`` is the ``LogCounter`` the alert
rules read (meshpilot/telemetry/logs.py). Pure: no I/O.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable
from typing import Any

from meshpilot.telemetry.logs import LogMatch

__all__ = ["LogStore"]


class LogStore:
    def __init__(self, max_records: int = 100_000) -> None:
        if max_records < 1:
            raise ValueError(f"max_records: at least 1, got {max_records}")
        self.max_records = max_records
        self._records: deque[dict[str, Any]] = deque()
        self._ids: set[str] = set()
        self.dropped = 0  # records that left for the bound

    def __len__(self) -> int:
        return len(self._records)

    def add(self, records: Iterable[dict[str, Any]]) -> int:
        """Keep normalised records; the number that were new."""
        new = 0
        for r in records:
            if r["id"] in self._ids:
                continue
            self._records.append(r)
            self._ids.add(r["id"])
            new += 1
        while len(self._records) > self.max_records:
            self._ids.discard(self._records.popleft()["id"])
            self.dropped += 1
        return new

    def _select(self, match: LogMatch, since: float, until: float) -> Iterable[dict[str, Any]]:
        for r in self._records:
            if since <= r["time"] < until and match.matches(r):
                yield r

    def search(self, match: LogMatch, since: float = 0.0, until: float = float("inf"), limit: int = 100) -> list[dict[str, Any]]:
        """Up to ``limit`` matching records with ``since <= time < until``, newest first."""
        return heapq.nlargest(limit, self._select(match, since, until), key=lambda r: (r["time"], r["id"]))

    def count(self, match: LogMatch, since: float, until: float) -> int:
        return sum(1 for _ in self._select(match, since, until))
