"""The debouncer: when pending changes should be published.

A pure object over an injected clock (every method that learns something takes ``now``; the tests
move it by hand). The publisher tells it of each change (``add``) and of times the control plane was
busy without a change (``busy``: the full build at start, a publication that failed), asks when the
pending changes are due (``next_deadline``, ``due``) and ``take``s them when it publishes. Its loop
sleeps until the deadline.

The rule, a leading edge and a bounded trailing window:

- **leading edge**: a change that comes when the control plane is idle, i.e. at least ``quiet_s``
  after the change before it and after the last time it was busy, is due at once, with whatever
  joins it before it goes out. A single change costs no waiting.
- **trailing window**: a change that comes sooner (changes keep coming) starts a batch that is due
  once ``quiet_s`` has passed without a new change, or ``cap_s`` after the batch's first change,
  whichever comes first, so a steady stream of changes is still published at least every
  ``cap_s``. The same holds for a batch the control plane was busy during or just before.

A busy time also counts as a change for the quiet time (a batch is due ``quiet_s`` after the later of
its last change and the last busy time, still no later than the cap): the publisher reports the
event loop held up by the pushes of a publication as busy, and writes that waited behind them
arrive together, each one long after the one before it.

So a burst costs its first change's publication at once and then, as before, one publication when
it settles: at most two for a burst shorter than ``cap_s`` whose changes come less than ``quiet_s``
apart. No change waits longer than ``cap_s``. Publications themselves do not make the control
plane busy: a change ``quiet_s`` after the last one goes at once even if a batch was published just
before it. ``quiet_s`` is ``debounce_ms``, ``cap_s`` is ``debounce_max_ms``; ``quiet_s = 0``
publishes every change at once.

The object keeps its own time: a ``now`` earlier than one it has already seen counts as that later
time, so a clock that steps back never brings a deadline forward.
"""

from __future__ import annotations

__all__ = ["Debouncer"]


class Debouncer:
    __slots__ = ("cap_s", "quiet_s", "_first", "_last", "_before", "_busy", "_now")

    def __init__(self, quiet_s: float, cap_s: float) -> None:
        if quiet_s < 0 or cap_s < 0:
            raise ValueError(f"debounce: times must not be negative (quiet {quiet_s}, cap {cap_s})")
        self.quiet_s = quiet_s
        self.cap_s = cap_s
        self._first: float | None = None  # the pending batch's first change (None: nothing pending)
        self._last: float | None = None  # the latest change, pending or not (None: none yet)
        self._before: float | None = None  # the change before the pending batch's first
        self._busy: float | None = None  # the last time the control plane was busy without a change
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
            self._first, self._before = now, self._last
        self._last = now

    def busy(self, now: float) -> None:
        """The control plane was busy without a change (a full build, a failed publication): pending
        changes, and changes within ``quiet_s`` of it, wait for quiet."""
        self._busy = self._tick(now)

    @property
    def leading(self) -> bool:
        """Whether the pending batch is due at once: its first change found the control plane idle
        (no change and no busy time in the ``quiet_s`` before it) and it has not been busy since."""
        first = self._first
        if first is None:
            return False
        return all(t is None or first >= t + self.quiet_s for t in (self._before, self._busy))

    def next_deadline(self) -> float | None:
        """When the pending changes are due (None: nothing pending)."""
        if self._first is None or self._last is None:
            return None
        if self.leading:
            return self._first
        # quiet is counted from the later of the last change and the last busy time: a change that
        # waited out a busy loop may have others right behind it
        last = self._last if self._busy is None else max(self._last, self._busy)
        return min(last + self.quiet_s, self._first + self.cap_s)

    def due(self, now: float) -> bool:
        deadline = self.next_deadline()
        return deadline is not None and max(now, self._now) >= deadline

    def take(self) -> None:
        """The pending changes are being published: start over."""
        self._first = None
