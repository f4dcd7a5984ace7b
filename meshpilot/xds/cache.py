"""The resource cache: what every Envoy should have, serialised once per version.

translate/ produces protobuf messages; ``ResourceCache.put`` serialises each one once, versions it
by a hash of its content (stable across restarts and replicas) and keeps the ready-made wire bytes
for both state-of-the-world and delta responses. Resources live in a scope: ``""`` is shared by
every node, a node id holds that node's own resources (its listeners), which shadow shared ones of
the same name. Watchers (the xDS streams) are told which names changed; they never build anything.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from google.protobuf.message import Message

from meshpilot.xds.resource import bytes_field, string_field

__all__ = ["Entry", "ResourceCache", "Snapshot", "Watcher"]

Watcher = Callable[[str, str, frozenset[str], float], None]  # type_url, scope, names, stamp


@dataclass(frozen=True, slots=True)
class Entry:
    name: str
    version: str
    any_bytes: bytes
    sotw_field: bytes  # DiscoveryResponse.resources (field 2) holding the Any
    delta_field: bytes  # DeltaDiscoveryResponse.resources (field 2) holding a Resource
    wildcard: bool = True  # part of wildcard subscriptions (proxyless-only listeners are not)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A state-of-the-world response body: shared by every stream with the same subscription."""

    version: str
    body: bytes
    entries: tuple[Entry, ...]
    names: frozenset[str]


def snapshot_of(entries: Iterable[Entry]) -> Snapshot:
    ordered = tuple(sorted(entries, key=lambda e: e.name))
    h = hashlib.blake2b(digest_size=8)
    for e in ordered:
        h.update(e.name.encode())
        h.update(e.version.encode())
    return Snapshot(h.hexdigest(), b"".join(e.sotw_field for e in ordered), ordered, frozenset(e.name for e in ordered))


def make_entry(type_url: str, name: str, msg: Message | bytes, wildcard: bool = True) -> Entry:
    value = msg if isinstance(msg, bytes) else msg.SerializeToString(deterministic=True)
    any_bytes = string_field(1, type_url) + bytes_field(2, value)
    version = hashlib.blake2b(any_bytes, digest_size=8).hexdigest()
    resource = string_field(1, version) + bytes_field(2, any_bytes) + string_field(3, name)
    return Entry(name, version, any_bytes, bytes_field(2, any_bytes), bytes_field(2, resource), wildcard)


class ResourceCache:
    def __init__(self) -> None:
        self._data: dict[str, dict[str, dict[str, Entry]]] = {}  # type -> scope -> name -> entry
        self._watchers: list[Watcher] = []
        self.generation: dict[tuple[str, str], int] = {}  # (type, scope) -> changes so far
        self._memo: dict[tuple[object, ...], tuple[tuple[int, int], Snapshot]] = {}

    def watch(self, watcher: Watcher) -> Callable[[], None]:
        self._watchers.append(watcher)
        return lambda: self._watchers.remove(watcher)

    # ---- writing ----------------------------------------------------------------------------

    def put(
        self,
        type_url: str,
        resources: Mapping[str, Message | bytes] | Iterable[tuple[str, Message | bytes]],
        scope: str = "",
        wildcard: bool = True,
    ) -> frozenset[str]:
        """Add or replace resources; returns the names whose content changed."""
        items = resources.items() if isinstance(resources, Mapping) else resources
        bucket = self._data.setdefault(type_url, {}).setdefault(scope, {})
        changed = set()
        for name, msg in items:
            entry = make_entry(type_url, name, msg, wildcard)
            old = bucket.get(name)
            if old is None or old.version != entry.version or old.wildcard != wildcard:
                bucket[name] = entry
                changed.add(name)
        return self._changed(type_url, scope, changed)

    def remove(self, type_url: str, names: Iterable[str], scope: str = "") -> frozenset[str]:
        bucket = self._data.get(type_url, {}).get(scope, {})
        gone = {n for n in names if bucket.pop(n, None) is not None}
        return self._changed(type_url, scope, gone)

    def replace(
        self, type_url: str, resources: Mapping[str, Message | bytes], scope: str = "", wildcard: bool = True
    ) -> frozenset[str]:
        """Make the scope hold exactly these resources of this type."""
        bucket = self._data.get(type_url, {}).get(scope, {})
        stale = [n for n in bucket if n not in resources]
        a = self.remove(type_url, stale, scope)
        b = self.put(type_url, resources, scope, wildcard)
        return a | b

    def drop_scope(self, scope: str) -> None:
        if not scope:
            raise ValueError("the shared scope cannot be dropped")
        for type_url, scopes in self._data.items():
            bucket = scopes.pop(scope, None)
            if bucket:
                self._changed(type_url, scope, set(bucket))

    def _changed(self, type_url: str, scope: str, names: set[str]) -> frozenset[str]:
        frozen = frozenset(names)
        if not frozen:
            return frozen
        key = (type_url, scope)
        self.generation[key] = self.generation.get(key, 0) + 1
        stamp = time.monotonic()
        for w in list(self._watchers):
            w(type_url, scope, frozen, stamp)
        return frozen

    # ---- reading ----------------------------------------------------------------------------

    def get(self, type_url: str, name: str, node_id: str = "") -> Entry | None:
        scopes = self._data.get(type_url)
        if not scopes:
            return None
        if node_id:
            own = scopes.get(node_id)
            if own and name in own:
                return own[name]
        shared = scopes.get("")
        return shared.get(name) if shared else None

    _EMPTY: dict[str, Entry] = {}

    def scopes(self, type_url: str, node_id: str = "") -> tuple[dict[str, Entry], dict[str, Entry]]:
        """The node's own entries and the shared ones of a type (read-only views for hot loops)."""
        scopes = self._data.get(type_url)
        if not scopes:
            return self._EMPTY, self._EMPTY
        return (scopes.get(node_id, self._EMPTY) if node_id else self._EMPTY), scopes.get("", self._EMPTY)

    def wildcard_names(self, type_url: str, node_id: str = "") -> set[str]:
        scopes = self._data.get(type_url, {})
        names = {n for n, e in scopes.get("", {}).items() if e.wildcard}
        if node_id:
            names.update(n for n, e in scopes.get(node_id, {}).items() if e.wildcard)
        return names

    def names(self, type_url: str, scope: str = "") -> list[str]:
        return sorted(self._data.get(type_url, {}).get(scope, {}))

    def sotw_snapshot(self, type_url: str, node_id: str, names: frozenset[str] | None) -> Snapshot:
        """What a state-of-the-world response of this type holds for a subscription.

        ``names`` None means a wildcard subscription. Results are memoised per subscription
        shape and cache generation, so a push to many streams with the same subscription builds
        the body once.
        """
        scopes = self._data.get(type_url, {})
        own = scopes.get(node_id, {}) if node_id else {}
        gens = (self.generation.get((type_url, ""), 0), self.generation.get((type_url, node_id), 0) if own else 0)
        key = (type_url, node_id if own else "", names)
        hit = self._memo.get(key)
        if hit is not None and hit[0] == gens:
            return hit[1]
        shared = scopes.get("", {})
        if names is None:
            merged = {n: e for n, e in shared.items() if e.wildcard}
            merged.update({n: e for n, e in own.items() if e.wildcard})
            snap = snapshot_of(merged.values())
        else:
            snap = snapshot_of(e for e in (own.get(n) or shared.get(n) for n in names) if e is not None)
        if len(self._memo) > 8192:
            self._memo.clear()
        self._memo[key] = (gens, snap)
        return snap
