"""A shared store played in memory for unit tests of replicas: each replica has its own view, every
write takes the next revision of one cluster-wide counter, and ``hand`` does what etcd's watch does
for another replica (its view takes the rows, then its registry hears of them)."""

from __future__ import annotations

from typing import Any

from meshpilot.registry import Registry
from meshpilot.registry.store import MemoryStore, RemoteChange

__all__ = ["SharedStore", "hand"]


class SharedStore(MemoryStore):
    """A memory store that says it is shared; it keeps the rows written to it for the other replica,
    and each write takes the next revision as a commit to etcd would."""

    shared = True

    def __init__(self, clock: list[int]) -> None:
        super().__init__()
        self.clock = clock  # the one revision counter of the "cluster"
        self.revision = clock[0]
        self.rows: list[RemoteChange] = []

    def write(self, puts: Any, deletes: tuple[tuple[str, str], ...] = ()) -> None:
        super().write(puts, deletes)
        self.clock[0] += 1
        self.revision = self.clock[0]
        self.rows += [(t, k, v) for (t, k), v in puts.items()] + [(t, k, None) for t, k in deletes]

    def taken(self) -> list[RemoteChange]:
        rows, self.rows = self.rows, []
        return rows


def hand(src: SharedStore, dst: SharedStore, reg: Registry) -> None:
    """What the watch does: the other replica's rows, then its view's revision."""
    rows = src.taken()
    MemoryStore.write(dst, {(t, k): v for t, k, v in rows if v is not None}, tuple((t, k) for t, k, v in rows if v is None))
    dst.revision = dst.clock[0]
    reg.apply_remote(rows, dst.revision)
