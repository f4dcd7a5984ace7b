"""The debouncer: when pending changes should be published.

A pure object over an injected clock (every method takes ``now``; the tests move it by hand). The
publisher tells it of each change (``add``) and of each publication (``published``: anything it
writes to the cache, debounced or not), asks when the pending changes are due (``next_deadline``,
``due``) and ``take``s them when it publishes. Its loop sleeps until the deadline.

The rule, a leading edge and a bounded trailing window:

- **leading edge**: a batch of changes whose first change arrived when nothing had been published
  for at least ``quiet_s``, and nothing has been published since, is due at once. A single change
  to an idle control plane costs no waiting; changes that join the batch before it goes out go
  with it.
- **trailing window**: any other batch (its first change came within ``quiet_s`` of a
  publication, the leading one of a burst included) is due once ``quiet_s`` has passed without a
  new change, or ``cap_s`` after its first change, whichever comes first; a steady stream of
  changes is still published at least every ``cap_s``.

So a burst costs its first change at once and then, as before, one publication when it settles:
two publications for a burst shorter than ``cap_s`` whose changes come less than ``quiet_s``
apart, and a change never waits longer than ``cap_s``. ``quiet_s`` is ``debounce_ms``, ``cap_s`` is
``debounce_max_ms``; ``quiet_s = 0`` publishes every change at once.

The object keeps its own time: a ``now`` earlier than one it has already seen counts as that later
time, so a clock that steps back never brings a deadline forward.
"""

from __future__ import annotations

__all__ = ["Debouncer"]


class Debouncer:
    __slots__ = ("cap_s", "quiet_s", "_first", "_last", "_published", "_now")

    def __init__(self, quiet_s: float, cap_s: float) -> None:
        if quiet_s < 0 or cap_s < 0:
            raise ValueError(f"debounce: times must not be negative (quiet {quiet_s}, cap {cap_s})")
        self.quiet_s = quiet_s
        self.cap_s = cap_s
        self._first: float | None = None  # the first pending change
        self._last = 0.0  # the last pending change
        self._published: float | None = None  # the last publication (None: never)
        self._now = float("-inf")  # the latest time seen

    def _tick(self, now: float) -> float:
        if now > self._now:
            self._now = now
        return self._now

    @property
    def pending(self) -> bool:
        return self._first is not None

    def add(self, now: float) -> None:
        """A change arrived."""
        now = self._tick(now)
        if self._first is None:
            self._first = now
        self._last = now

    def published(self, now: float) -> None:
        """The publisher wrote to the cache: changes within ``quiet_s`` of it wait for quiet."""
        self._published = self._tick(now)

    @property
    def leading(self) -> bool:
        """Whether the pending batch is due at once: its first change found the control plane idle
        (nothing published for ``quiet_s``) and nothing has been published since."""
        return self._first is not None and (self._published is None or self._first >= self._published + self.quiet_s)

    def next_deadline(self) -> float | None:
        """When the pending changes are due (None: nothing pending)."""
        if self._first is None:
            return None
        if self.leading:
            return self._first
        return min(self._last + self.quiet_s, self._first + self.cap_s)

    def due(self, now: float) -> bool:
        deadline = self.next_deadline()
        return deadline is not None and max(now, self._now) >= deadline

    def take(self) -> None:
        """The pending changes are being published: start over (``published`` records when)."""
        self._first = None
