"""The publisher: the one writer of the resource cache.

Producers are functions of state: given what changed (``Changes``), each returns the resources
for the keys it owns that the change touches, grouped by (scope, key): a bundle of resources by
type URL (replacing what the key held of those types), or None when the key is gone. A key is the producer's own unit (a service, a node, a
policy kind); the scope is the cache's (``""`` shared, a node id for that node's own). The
publisher remembers which names each producer published under each (scope, key), so a producer
never keeps its own bookkeeping: what a key no longer holds is removed. All of one publication's
writes go to the cache together, puts in push order (clusters and endpoints before the listeners
and routes that name them) and removals after every put; the streams (xds/stream.py) hold a
removed cluster back until the routes sent with it are answered. Registry and policy changes
go through the debouncer (publish/debounce.py): one that finds the control plane idle (no change
for ``quiet_s``) is published at once, the ones that follow it wait until they settle or the cap;
the full build at start and a failed publication count as busy time, so changes around them wait
for quiet too. A node that connects (or leaves) gets its own resources at once, because its stream
waits for them before its first response; that is no change to the mesh, so it holds back none.

A publication to a large fleet holds the event loop while every stream is pushed (0.2-0.5 s for
1,000-2,000 streams), and the writes that arrive meanwhile are handled only after it, each long
after the one before: to the debouncer, a burst that had paused, so every write of the burst went
out at once on its own, and the pushes that followed made the next pause (a burst of 500 became
7 to 45 publications and took seconds longer to write). So for ``cap_s`` after a publication the
loop wakes every ``quiet_s / 2`` and reports each wake-up later than ``quiet_s / 2`` as busy time
(``woke``); the changes around it wait for quiet, up to the cap.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from google.protobuf.message import Message

from meshpilot import metrics
from meshpilot.publish.debounce import Debouncer
from meshpilot.xds.cache import ResourceCache
from meshpilot.xds.resource import PUSH_ORDER

__all__ = ["Bundle", "Changes", "Output", "Producer", "Publisher"]

log = logging.getLogger("meshpilot.publish")

Resource = Message | bytes


@dataclass(slots=True)
class Changes:
    """What changed since the last publication (keys, not values: producers read the state)."""

    services: set[str] = field(default_factory=set)  # service keys defined, redefined or deleted
    endpoints: set[str] = field(default_factory=set)  # service keys whose instances changed
    instances: set[str] = field(default_factory=set)  # instance ids registered, changed or gone
    other: set[str] = field(default_factory=set)  # other document keys (policies)
    nodes: set[str] = field(default_factory=set)  # node ids connected or gone
    rerouted: set[str] = field(default_factory=set)  # services whose routing overlay changed
    everything: bool = False  # the first publication: every key

    def __bool__(self) -> bool:
        return bool(self.everything or self.services or self.endpoints or self.instances or self.other or self.nodes or self.rerouted)

    def merge(self, other: Changes) -> None:
        self.services |= other.services
        self.endpoints |= other.endpoints
        self.instances |= other.instances
        self.other |= other.other
        self.nodes |= other.nodes
        self.rerouted |= other.rerouted
        self.everything |= other.everything


@dataclass(frozen=True, slots=True)
class Bundle:
    """What one key of a producer holds: resources by type URL and name. Types in ``unlisted``
    stay out of wildcard subscriptions (a client gets them only by name)."""

    resources: Mapping[str, Mapping[str, Resource]]
    unlisted: frozenset[str] = frozenset()


Output = dict[tuple[str, str], Bundle | None]  # (scope, key) -> bundle, or None: the key is gone

_BY_HAND = -1  # the producer index of resources put in through ``inject``


class Producer:
    """Base of a producer: ``produce`` answers for the keys ``changes`` touches."""

    def produce(self, changes: Changes, now: float) -> Output:
        raise NotImplementedError

    def next_deadline(self) -> float | None:
        """When the producer has something to publish without a new change (None: never)."""
        return None


class Publisher:
    def __init__(
        self,
        cache: ResourceCache,
        producers: list[Producer],
        debouncer: Debouncer,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cache = cache
        self.producers = producers
        self.debouncer = debouncer
        self.clock = clock
        self._pending = Changes()
        self._kick = asyncio.Event()
        self._watch_until = float("-inf")  # the loop's wake-ups are watched until then (after a publication)
        # (producer index, scope, key) -> type URL -> names published there
        self._published: dict[tuple[int, str, str], dict[str, frozenset[str]]] = {}

    # ---- changes in -------------------------------------------------------------------------

    def note(self, changes: Changes) -> None:
        """Publish these changes when the debouncer says they are due: at once on an idle control
        plane, else once the burst has settled."""
        self._pending.merge(changes)
        self.debouncer.add(self.clock())
        self._kick.set()

    def flush(self) -> None:
        """Publish every pending change now (and whatever a producer has due)."""
        pending, self._pending = self._pending, Changes()
        self.debouncer.take()
        if pending:
            self._watch_until = self.clock() + self.debouncer.cap_s
        if pending:
            metrics.REBUILDS.inc()
        try:
            self.publish(pending)
        except BaseException:
            # a producer failed before anything was written: the batch stays pending, so the run loop's
            # restart publishes it instead of leaving the cache stale until those keys change again
            pending.merge(self._pending)
            self._pending = pending
            now = self.clock()
            self.debouncer.busy(now)  # retried after quiet_s, not at once
            self.debouncer.add(now)
            raise

    def pending_for(self, service_key: str) -> bool:
        """Whether a change to this service's definition or instances waits to be published."""
        p = self._pending
        return p.everything or service_key in p.services or service_key in p.endpoints

    def publish(self, changes: Changes) -> None:
        """Publish these changes now, beside (not instead of) the pending ones."""
        now = self.clock()
        if changes.everything:
            self.debouncer.busy(now)  # pending changes and the ones right after wait for quiet
        self._write([(i, p.produce(changes, now)) for i, p in enumerate(self.producers)])

    def inject(self, type_url: str, name: str, resource: Resource | None, scope: str = "") -> None:
        """Put (or with None, take back) one resource by hand, at once: the management API's debug
        endpoint, which tests use to make Envoy reject a configuration. A producer that publishes
        the same name in the same scope later replaces it."""
        bundle = Bundle({type_url: {name: resource}}) if resource is not None else None
        self._write([(_BY_HAND, {(scope, f"{type_url} {name}"): bundle})])

    def forget_scope(self, scope: str) -> None:
        """A node left: its own resources go with it."""
        for k in [k for k in self._published if k[1] == scope]:
            del self._published[k]
        self.cache.drop_scope(scope)

    def next_deadline(self) -> float | None:
        deadlines = [d for d in (self.debouncer.next_deadline(), *(p.next_deadline() for p in self.producers)) if d is not None]
        return min(deadlines) if deadlines else None

    def next_wake(self) -> float | None:
        """When the run loop should wake: the next deadline, or sooner to watch the loop after a publication."""
        deadline = self.next_deadline()
        now = self.clock()
        if now < self._watch_until and self.debouncer.quiet_s > 0:
            probe = now + self.debouncer.quiet_s / 2
            return probe if deadline is None else min(deadline, probe)
        return deadline

    def woke(self, meant: float | None) -> None:
        """The run loop woke, having meant to wake at ``meant``: later than ``quiet_s / 2`` after it
        while a publication is watched means the loop was held (by that publication's pushes), and
        counts as busy time."""
        now = self.clock()
        if meant is not None and now <= self._watch_until + self.debouncer.quiet_s and now - meant > self.debouncer.quiet_s / 2:
            self.debouncer.busy(now)

    async def run(self) -> None:
        """Publish pending changes as they fall due, until cancelled."""
        while True:
            wake = self.next_wake()
            try:
                async with asyncio.timeout(None if wake is None else max(0.0, wake - self.clock())):
                    await self._kick.wait()
            except TimeoutError:
                pass
            self._kick.clear()
            self.woke(wake)
            self.publish_due()

    def publish_due(self) -> bool:
        """Publish if the debouncer or a producer says it is time; True if it was."""
        deadline = self.next_deadline()
        if deadline is None or self.clock() < deadline:
            return False
        self.flush()
        return True

    # ---- the diff and the writes ------------------------------------------------------------

    def _write(self, outputs: list[tuple[int, Output]]) -> None:
        puts: dict[tuple[str, str, bool], dict[str, Resource]] = {}
        removals: dict[tuple[str, str], set[str]] = {}
        for index, output in outputs:
            for (scope, key), bundle in output.items():
                slot = (index, scope, key)
                old = self._published.get(slot, {})
                new: dict[str, frozenset[str]] = {}
                if bundle is not None:
                    for type_url, resources in bundle.resources.items():
                        if resources:
                            puts.setdefault((type_url, scope, type_url not in bundle.unlisted), {}).update(resources)
                            new[type_url] = frozenset(resources)
                for type_url, names in old.items():
                    if bundle is not None and type_url not in bundle.resources:
                        new[type_url] = names  # a bundle replaces only the types it names
                        continue
                    stale = names - new.get(type_url, frozenset())
                    if stale:
                        removals.setdefault((type_url, scope), set()).update(stale)
                if new:
                    self._published[slot] = new
                else:
                    self._published.pop(slot, None)
        rank = {t: n for n, t in enumerate(PUSH_ORDER)}
        for type_url, scope, wildcard in sorted(puts, key=lambda k: (rank.get(k[0], len(rank)), k[1], k[2])):
            resources = puts[type_url, scope, wildcard]
            self.cache.put(type_url, resources, scope=scope, wildcard=wildcard)
            moved = removals.get((type_url, scope))
            if moved:
                moved.difference_update(resources)  # a name that changed keys in this publication stays
        for type_url, scope in sorted(removals, key=lambda k: (rank.get(k[0], len(rank)), k[1])):
            if removals[type_url, scope]:
                self.cache.remove(type_url, removals[type_url, scope], scope=scope)
