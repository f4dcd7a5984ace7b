"""The debouncer: when a burst of changes has settled enough to publish.

A pure object over an injected clock: ``add(now)`` notes a change, ``due(now)`` says whether the
pending changes should be published (``quiet_s`` without a new one, or ``cap_s`` since the first,
so a steady stream of changes is still published at the cap), ``next_deadline()`` is when that
will be true if nothing else comes, and ``take()`` starts over. The publisher's loop sleeps until
the deadline; the tests move the clock by hand.
"""

from __future__ import annotations

__all__ = ["Debouncer"]


class Debouncer:
    __slots__ = ("cap_s", "quiet_s", "_first", "_last")

    def __init__(self, quiet_s: float, cap_s: float) -> None:
        if quiet_s < 0 or cap_s < 0:
            raise ValueError(f"debounce: times must not be negative (quiet {quiet_s}, cap {cap_s})")
        self.quiet_s = quiet_s
        self.cap_s = cap_s
        self._first: float | None = None
        self._last = 0.0

    @property
    def pending(self) -> bool:
        return self._first is not None

    def add(self, now: float) -> None:
        if self._first is None:
            self._first = now
        self._last = now

    def next_deadline(self) -> float | None:
        """When the pending changes are due (None: nothing pending)."""
        if self._first is None:
            return None
        return min(self._last + self.quiet_s, self._first + self.cap_s)

    def due(self, now: float) -> bool:
        deadline = self.next_deadline()
        return deadline is not None and now >= deadline

    def take(self) -> None:
        """The pending changes are being published: start over."""
        self._first = None
