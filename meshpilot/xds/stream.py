"""xDS stream state machines, state-of-the-world and delta, without I/O.

A stream is fed requests (``receive``) and cache change notices (``notify``); ``responses()``
returns the wire bytes to send next, in the order Envoy needs (clusters before their endpoints,
listeners before their routes). The gRPC handler only moves bytes between these and the wire.

Rules both variants follow:
- a NACK is recorded and the rejected version is not sent again; the next change is;
- a request whose nonce is not the latest sent for its type is stale and only its subscription
  changes count;
- a changed cluster stays warming in Envoy until its endpoints arrive again. Over sotw Envoy
  re-requests them (a second request carrying an already-answered nonce), and that request is
  answered even when nothing changed; over delta it does not re-request names it holds, so the
  endpoints of every cluster sent are sent again right behind it. A delta subscribe to a name
  already subscribed is answered too.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2

from meshpilot.translate.names import TYPE
from meshpilot.xds.cache import ResourceCache
from meshpilot.xds.wire import string_field, strings_field

__all__ = ["DeltaStream", "Nack", "SotwStream", "ORDER"]

ORDER = [TYPE.CLUSTER, TYPE.ENDPOINT, TYPE.LISTENER, TYPE.ROUTE, TYPE.EXTENSION_CONFIG, TYPE.DNS]
_WILDCARD_BY_DEFAULT = {TYPE.CLUSTER, TYPE.LISTENER}
_RANK = {t: n for n, t in enumerate(ORDER)}


@dataclass(slots=True)
class Nack:
    type_url: str
    nonce: str
    version: str
    message: str
    at: float

    def as_dict(self) -> dict[str, Any]:
        return {"type_url": self.type_url, "nonce": self.nonce, "version": self.version, "error": self.message, "at": self.at}


@dataclass(slots=True)
class _TypeState:
    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    pending: bool = False
    forced: bool = False
    pending_since: float = 0.0
    sent_nonce: str = ""
    sent_version: str = ""
    acked_version: str = ""
    nacked_version: str = ""
    answered_nonce: str = ""  # sotw: a nonce already ACKed/NACKed once
    requests: int = 0
    # delta
    sent: dict[str, str] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)
    forced_names: set[str] = field(default_factory=set)
    full: bool = False
    nonce_versions: dict[str, dict[str, str]] = field(default_factory=dict)
    acked: dict[str, str] = field(default_factory=dict)

    def acked_digest(self) -> str:
        if self.acked_version or not self.acked:
            return self.acked_version
        h = hashlib.blake2b(digest_size=8)
        for name in sorted(self.acked):
            h.update(name.encode() + b"=" + self.acked[name].encode() + b";")
        return h.hexdigest()


class _Stream:
    kind = ""

    def __init__(self, cache: ResourceCache, node_id: str = "") -> None:
        self.cache = cache
        self.node_id = node_id
        self.types: dict[str, _TypeState] = {}
        self.nonce_counter = 0
        self.last_nack: Nack | None = None
        self.nacks = 0
        self.pushes = 0
        self.latencies: list[float] = []  # push latencies since last read by the server

    def _nonce(self) -> str:
        self.nonce_counter += 1
        return str(self.nonce_counter)

    def _mark(self, ts: _TypeState, stamp: float) -> None:
        if not ts.pending:
            ts.pending = True
            ts.pending_since = stamp

    @property
    def pending(self) -> bool:
        return any(ts.pending for ts in self.types.values())

    def _pending_types(self) -> list[str]:
        return sorted((t for t, ts in self.types.items() if ts.pending), key=lambda t: (_RANK.get(t, 99), t))

    def summary(self) -> dict[str, Any]:
        return {
            "stream_type": self.kind,
            "subscribed": {
                t: ("*" if ts.wildcard else sorted(ts.names)) if ts.wildcard or len(ts.names) <= 20 else f"{len(ts.names)} names"
                for t, ts in self.types.items()
            },
            "acked": {t: ts.acked_digest() for t, ts in self.types.items() if ts.acked_version or ts.acked},
            "sent": {t: ts.sent_version for t, ts in self.types.items() if ts.sent_version},
            "last_nack": self.last_nack.as_dict() if self.last_nack else None,
            "nacks": self.nacks,
            "pushes": self.pushes,
        }

    def _record_nack(self, type_url: str, nonce: str, version: str, message: str) -> None:
        self.nacks += 1
        self.last_nack = Nack(type_url, nonce, version, message, time.time())


class SotwStream(_Stream):
    kind = "GRPC"

    def receive(self, req: discovery_pb2.DiscoveryRequest, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        type_url = req.type_url
        if not type_url:
            return
        ts = self.types.setdefault(type_url, _TypeState())
        names = set(req.resource_names)
        wildcard = (not names and type_url in _WILDCARD_BY_DEFAULT and (ts.requests == 0 or ts.wildcard)) or "*" in names
        names.discard("*")
        changed = wildcard != ts.wildcard or names != ts.names
        ts.wildcard, ts.names = wildcard, names
        first = ts.requests == 0
        ts.requests += 1
        nonce = req.response_nonce
        if first or not ts.sent_nonce:
            ts.forced = True
            self._mark(ts, now)
            return
        if nonce != ts.sent_nonce:  # stale: answered by a response already on its way
            if changed:
                ts.forced = True
                self._mark(ts, now)
            return
        if nonce == ts.answered_nonce:
            # the same nonce again: Envoy re-requests (e.g. endpoints of a re-created cluster)
            ts.forced = True
            self._mark(ts, now)
            return
        ts.answered_nonce = nonce
        if req.HasField("error_detail"):
            ts.nacked_version = ts.sent_version
            self._record_nack(type_url, nonce, ts.sent_version, req.error_detail.message)
        else:
            ts.acked_version = req.version_info
            ts.nacked_version = ""
        if changed:
            ts.forced = True
            self._mark(ts, now)

    def notify(self, type_url: str, scope: str, names: frozenset[str], stamp: float) -> bool:
        if scope and scope != self.node_id:
            return False
        ts = self.types.get(type_url)
        if ts is None or ts.requests == 0:
            return False
        if ts.wildcard or not ts.names.isdisjoint(names):
            self._mark(ts, stamp)
            return True
        return False

    def responses(self, now: float | None = None) -> list[tuple[str, bytes]]:
        out = []
        for type_url in self._pending_types():
            ts = self.types[type_url]
            ts.pending = False
            forced, ts.forced = ts.forced, False
            version, body = self.cache.sotw_body(type_url, self.node_id, None if ts.wildcard else frozenset(ts.names))
            if not forced and version == ts.sent_version:  # also: a NACKed version is not resent
                continue
            nonce = self._nonce()
            msg = string_field(1, version) + body + string_field(4, type_url) + string_field(5, nonce)
            ts.sent_nonce, ts.sent_version = nonce, version
            out.append((type_url, msg))
            self.pushes += 1
            self.latencies.append((time.monotonic() if now is None else now) - ts.pending_since)
        return out


class DeltaStream(_Stream):
    kind = "DELTA_GRPC"

    def receive(self, req: discovery_pb2.DeltaDiscoveryRequest, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        type_url = req.type_url
        if not type_url:
            return
        ts = self.types.setdefault(type_url, _TypeState())
        first = ts.requests == 0
        ts.requests += 1
        nonce = req.response_nonce
        if nonce:
            sent_versions = ts.nonce_versions.pop(nonce, None)
            if req.HasField("error_detail"):
                self._record_nack(type_url, nonce, ",".join(sorted(sent_versions or {}))[:200], req.error_detail.message)
            elif sent_versions is not None:
                ts.acked.update(sent_versions)
        touched = False
        if first:
            ts.sent.update(req.initial_resource_versions)
            if not req.resource_names_subscribe and type_url in _WILDCARD_BY_DEFAULT:
                ts.wildcard = True
            ts.full = True
            touched = True
        for n in req.resource_names_subscribe:
            touched = True
            if n == "*":
                ts.wildcard = True
                ts.full = True
            else:
                ts.names.add(n)
                if not first or n not in req.initial_resource_versions:
                    ts.forced_names.add(n)
        for n in req.resource_names_unsubscribe:
            touched = True
            if n == "*":
                ts.wildcard = False
                ts.full = True
            else:
                ts.names.discard(n)
                ts.forced_names.discard(n)
                ts.dirty.add(n)
        if touched:
            self._mark(ts, now)

    def notify(self, type_url: str, scope: str, names: frozenset[str], stamp: float) -> bool:
        if scope and scope != self.node_id:
            return False
        ts = self.types.get(type_url)
        if ts is None or ts.requests == 0:
            return False
        if ts.wildcard:
            ts.dirty |= names
        else:
            hit = names & ts.names
            if not hit:
                # a resource the client holds may have vanished from its (shadowed) scope
                hit = {n for n in names if n in ts.sent}
                if not hit:
                    return False
            ts.dirty |= hit
        self._mark(ts, stamp)
        return True

    def _subscribed(self, ts: _TypeState, name: str, type_url: str) -> bool:
        if name in ts.names:
            return True
        if ts.wildcard:
            e = self.cache.get(type_url, name, self.node_id)
            return e is not None and e.wildcard
        return False

    def responses(self, now: float | None = None) -> list[tuple[str, bytes]]:
        out = []
        queue = self._pending_types()
        while queue:
            type_url = queue.pop(0)
            ts = self.types[type_url]
            ts.pending = False
            if ts.full:
                candidates = set(ts.names) | set(ts.sent)
                if ts.wildcard:
                    candidates |= self.cache.wildcard_names(type_url, self.node_id)
                ts.full = False
            else:
                candidates = ts.dirty | ts.forced_names
            forced = ts.forced_names
            ts.dirty, ts.forced_names = set(), set()
            fields: list[bytes] = []
            removed: list[str] = []
            versions: dict[str, str] = {}
            for name in sorted(candidates):
                entry = self.cache.get(type_url, name, self.node_id)
                if entry is not None and self._subscribed(ts, name, type_url):
                    if ts.sent.get(name) != entry.version or name in forced:
                        fields.append(entry.delta_field)
                        ts.sent[name] = entry.version
                        versions[name] = entry.version
                elif name in ts.sent:
                    del ts.sent[name]
                    ts.acked.pop(name, None)
                    if entry is None or name in ts.names or ts.wildcard:
                        removed.append(name)
                elif name in forced and entry is None:
                    removed.append(name)  # tell the client it does not exist, so it stops waiting
            if not fields and not removed:
                continue
            nonce = self._nonce()
            msg = b"".join(fields) + string_field(4, type_url) + string_field(5, nonce) + strings_field(6, removed)
            ts.sent_nonce = nonce
            ts.sent_version = nonce
            ts.nonce_versions[nonce] = versions
            if len(ts.nonce_versions) > 64:
                ts.nonce_versions.pop(next(iter(ts.nonce_versions)))
            out.append((type_url, msg))
            self.pushes += 1
            self.latencies.append((time.monotonic() if now is None else now) - ts.pending_since)
            if type_url == TYPE.CLUSTER and versions:
                # a changed cluster warms until its endpoints arrive, and delta Envoy does not
                # re-request names it already holds: send them again right behind the cluster
                eds = self.types.get(TYPE.ENDPOINT)
                again = {n for n in versions if eds is not None and n in eds.names}
                if eds is not None and again:
                    eds.forced_names |= again
                    self._mark(eds, ts.pending_since)
                    if TYPE.ENDPOINT not in queue:
                        queue.insert(0, TYPE.ENDPOINT)
        return out

