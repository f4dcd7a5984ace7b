"""When each TTL check of the Consul front door expires, findable by due time.

The checker looks four times a second for what expired; with tens of thousands of registered
instances a scan of every deadline would cost more than the registrations themselves. A deadline
is kept in a dict (the truth: ``in``, ``get``, ``pop`` as before) and pushed on a heap; ``due``
pops only what is due, skipping heap entries a newer deadline or a removal replaced.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

__all__ = ["Deadlines"]

Key = tuple[str, str]  # (instance id, check id)


class Deadlines:
    def __init__(self) -> None:
        self._at: dict[Key, float] = {}
        self._heap: list[tuple[float, Key]] = []

    def __setitem__(self, key: Key, at: float) -> None:
        self._at[key] = at
        heapq.heappush(self._heap, (at, key))
        if len(self._heap) > 2 * len(self._at) + 1024:  # entries replaced by newer deadlines
            self._heap = [(t, k) for k, t in self._at.items()]
            heapq.heapify(self._heap)

    def __contains__(self, key: object) -> bool:
        return key in self._at

    def __len__(self) -> int:
        return len(self._at)

    def __iter__(self) -> Iterator[Key]:
        return iter(self._at)

    def get(self, key: Key) -> float | None:
        return self._at.get(key)

    def pop(self, key: Key, default: float | None = None) -> float | None:
        return self._at.pop(key, default)

    def due(self, now: float) -> list[Key]:
        """The keys whose deadline is ``now`` or earlier, each once: it stays here (``in``, ``get``)
        but comes due again only when set again, so a caller that acts on one sets its next
        deadline or pops it."""
        out: dict[Key, None] = {}  # a deadline set twice to the same time is on the heap twice
        heap = self._heap
        while heap and heap[0][0] <= now:
            at, key = heapq.heappop(heap)
            if self._at.get(key) == at:
                out[key] = None
        return list(out)
