"""xDS stream state machines, state-of-the-world and delta, without I/O.

A stream is fed requests (``receive``) and cache change notices (``notify``); ``responses()``
returns the wire bytes to send next, in the order Envoy needs (clusters before their endpoints,
listeners before their routes). The gRPC handler only moves bytes between these and the wire.

Rules both variants follow:
- a NACK is recorded and the rejected version is not sent again; the next change is;
- a request whose nonce is not the latest sent for its type is stale and only its subscription
  changes count;
- a changed cluster stays warming in Envoy until its endpoints arrive again, and the server is
  the one to provide them (xDS: "the management server should provide the EDS/RDS updates
  during warming"): the endpoints of every changed cluster are sent right behind it, over sotw as
  over delta. Envoy's own re-request of them may carry a nonce that is stale by then and is not
  needed. A request repeating an already-answered nonce is answered anyway, and so is a delta
  subscribe to a name already subscribed;
- make before break: clusters and endpoints go before listeners and routes, and a cluster (or its
  endpoints) that left the cache is removed from the client only once the listeners and routes
  sent with or before its removal are answered, so no route the client holds names a cluster it
  no longer has. Until then the client keeps the version it holds.
"""

from __future__ import annotations

import hashlib
import operator
import sys
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from collections.abc import Collection, Iterable, Set
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2

from meshpilot.xds.cache import Entry, ResourceCache, Snapshot, snapshot_of
from meshpilot.xds.resource import NAMED, NAMERS, PUSH_ORDER, TYPE, string_field, strings_field

__all__ = ["DeltaStream", "Nack", "SotwStream"]

_WILDCARD_BY_DEFAULT = {TYPE.CLUSTER, TYPE.LISTENER}
_RANK = {t: n for n, t in enumerate(PUSH_ORDER)}
# sotw subscriptions, one object per distinct list of names (and per set): a fleet subscribes to
# the same names, and 2,000 streams holding their own sets of 1,000 names would hold 2,000 sets of
# ~40 KB. The list as the client sent it lets an ACK that repeats it be recognised without building
# a set (comparing strings costs a third of interning them into one).
_Subscription = tuple[tuple[str, ...], frozenset[str], bool]  # the names as listed, as a set without "*", "*" listed
_SUBSCRIPTIONS: dict[tuple[str, ...], _Subscription] = {}
_SETS: dict[frozenset[str], frozenset[str]] = {}
_MAX_SHARED = 4096


def _subscription(raw: Iterable[str]) -> _Subscription:
    listed = tuple(sys.intern(n) for n in raw)  # the strings shared, not one copy per stream
    got = _SUBSCRIPTIONS.get(listed)
    if got is not None:
        return got
    names = frozenset(listed)
    star = "*" in names
    if star:
        names = names - {"*"}
    names = _SETS.setdefault(names, names)
    if len(_SUBSCRIPTIONS) >= _MAX_SHARED or len(_SETS) >= _MAX_SHARED:
        _SUBSCRIPTIONS.clear()  # only sharing is lost; streams keep what they hold
        _SETS.clear()
    got = _SUBSCRIPTIONS[listed] = (listed, names, star)
    return got


# sotw responses of the types sent incrementally, per cache: every stream subscribed to a changed
# name is sent the same (version, body) in a push, so it is built once per push, not once per stream
# (a burst changing 500 of 1,000 services cost ~1 ms per stream here). A few recent ones are kept.
_Incremental = tuple[tuple[int, int], str, bytes, int]  # generations, version, body, resources
_INCREMENTAL: weakref.WeakKeyDictionary[ResourceCache, OrderedDict[tuple[str, str, frozenset[str]], _Incremental]] = (
    weakref.WeakKeyDictionary()
)
_MAX_INCREMENTAL = 32


def _scoped(cache: ResourceCache, type_url: str, node_id: str) -> tuple[dict[str, Entry], dict[str, Entry], str, tuple[int, int]]:
    """The node's own and the shared resources of a type, the scope a memo of them is kept under, and
    the cache generations it is valid for."""
    own, shared = cache.scopes(type_url, node_id)
    scope = node_id if own else ""
    gens = (cache.generation.get((type_url, ""), 0), cache.generation.get((type_url, node_id), 0) if own else 0)
    return own, shared, scope, gens


def _incremental(cache: ResourceCache, type_url: str, node_id: str, names: frozenset[str]) -> tuple[str, bytes, int]:
    """(version, body, how many resources) of a sotw response holding those of ``names`` the cache has."""
    own, shared, scope, gens = _scoped(cache, type_url, node_id)
    memo = _INCREMENTAL.get(cache)
    if memo is None:
        memo = _INCREMENTAL[cache] = OrderedDict()
    key = (type_url, scope, names)
    hit = memo.get(key)
    if hit is not None and hit[0] == gens:
        memo.move_to_end(key)
        return hit[1], hit[2], hit[3]
    lookup = shared.get
    entries = [e for e in ((own.get(n) or lookup(n)) if own else lookup(n) for n in sorted(names)) if e is not None]
    h = hashlib.blake2b(digest_size=8)
    for e in entries:
        h.update(e.name.encode() + b"=" + e.version.encode() + b";")
    made = (gens, h.hexdigest(), b"".join(e.sotw_field for e in entries), len(entries))
    memo[key] = made
    if len(memo) > _MAX_INCREMENTAL:
        memo.popitem(last=False)
    return made[1], made[2], made[3]


def _shared_names(names: frozenset[str]) -> frozenset[str]:
    """One object per distinct set of names (delta subscriptions, as ``_subscription`` for sotw)."""
    got = _SETS.get(names)
    if got is not None:
        return got
    if len(_SETS) >= _MAX_SHARED:
        _SETS.clear()
        _SUBSCRIPTIONS.clear()
    _SETS[names] = names
    return names


@dataclass(frozen=True, slots=True)
class _Whole:
    """The delta Resource fields of a set of names: a client's first sync of a type (every stream
    subscribed alike is sent the same) or the names a push changed (every stream that holds an older
    version of each is sent the same), built once for all of them."""

    gens: tuple[int, int]
    body: bytes  # the Resource fields, by name
    carried: frozenset[str]  # the names it carries
    versions: dict[str, str]  # their versions (copied into each stream's record of what it sent)
    missing: frozenset[str]  # subscribed names the cache does not have
    names: tuple[str, ...]  # the names carried, in order, and their versions
    version_list: tuple[str, ...]
    unlisted: bool  # some carried resource is left out of wildcard subscriptions


_WHOLE: weakref.WeakKeyDictionary[ResourceCache, OrderedDict[tuple[str, str, bool, frozenset[str]], _Whole]] = (
    weakref.WeakKeyDictionary()
)
_MAX_WHOLE = 8


def _whole(cache: ResourceCache, type_url: str, node_id: str, names: frozenset[str], wildcard: bool) -> _Whole:
    own, shared, scope, gens = _scoped(cache, type_url, node_id)
    memo = _WHOLE.get(cache)
    if memo is None:
        memo = _WHOLE[cache] = OrderedDict()
    key = (type_url, scope, wildcard, names)
    hit = memo.get(key)
    if hit is not None and hit.gens == gens:
        memo.move_to_end(key)
        return hit
    candidates = names | cache.wildcard_names(type_url, node_id) if wildcard else names
    lookup = shared.get
    fields: list[bytes] = []
    versions: dict[str, str] = {}
    missing: set[str] = set()
    unlisted = False
    for name in sorted(candidates):
        entry = (own.get(name) or lookup(name)) if own else lookup(name)
        if entry is None:
            missing.add(name)
        elif name in names or (wildcard and entry.wildcard):
            fields.append(entry.delta_field)
            versions[name] = entry.version
            unlisted = unlisted or not entry.wildcard
    made = _Whole(
        gens, b"".join(fields), frozenset(versions), versions, frozenset(missing), tuple(versions), tuple(versions.values()), unlisted,
    )
    memo[key] = made
    if len(memo) > _MAX_WHOLE:
        memo.popitem(last=False)
    return made


# delta: what a stream has been sent, shared between streams while they hold the same. A fleet's
# streams are sent the same first sync and then the same pushes, so their records of what they hold
# are equal: 2,000 streams each holding a copy of 1,000 versions per type held ~70 KB each. A record
# is shared from a first sync (the ``_Whole``'s versions) and moves to the next shared one on a push
# every holder of it is sent alike; a stream whose record must change otherwise takes its own copy.
_ADVANCED: OrderedDict[tuple[int, int], tuple[dict[str, str], _Whole, dict[str, str]]] = OrderedDict()
_MAX_ADVANCED = 16


def _advanced(sent: dict[str, str], whole: _Whole) -> dict[str, str]:
    """The shared record ``sent`` becomes once ``whole`` is sent: built once per push for every
    stream that held ``sent``. The memo holds both, so an id in its key is never reused meanwhile."""
    key = (id(sent), id(whole))
    hit = _ADVANCED.get(key)
    if hit is not None:
        _ADVANCED.move_to_end(key)
        return hit[2]
    made = {**sent, **whole.versions}
    _ADVANCED[key] = (sent, whole, made)
    if len(_ADVANCED) > _MAX_ADVANCED:
        _ADVANCED.popitem(last=False)
    return made


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
    names: Set[str] = frozenset()  # sotw: shared and never changed in place; delta: the stream's own set
    listed: tuple[str, ...] = ()  # sotw: the names as the last request listed them (shared)
    star: bool = False  # sotw: that list held "*"
    pending: bool = False
    forced: bool = False
    pending_since: float = 0.0
    sent_nonce: str = ""
    sent_version: str = ""
    acked_version: str = ""
    answered_nonce: str = ""  # sotw: a nonce already ACKed/NACKed once
    held: Snapshot | None = None  # sotw, whole types: what the last response sent holds
    retiring: set[str] = field(default_factory=set)  # gone from the cache, removal waits for the routes
    requests: int = 0
    resumed_version: str = ""  # sotw: the version the first request of the stream says the client holds
    # delta: the version of each resource sent; ``sent_shared``: the dict is shared with other
    # streams (``_own_sent`` before changing it in place)
    sent: dict[str, str] = field(default_factory=dict)
    sent_shared: bool = False
    dirty: set[str] = field(default_factory=set)
    forced_names: set[str] = field(default_factory=set)
    full: bool = False
    names_frozen: frozenset[str] = frozenset()
    # delta: names carried by responses not ACKed yet (transient), names whose sent version was NACKed
    unacked: dict[str, frozenset[str]] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    sent_rev: int = 0
    _digest: tuple[int, str] = (-1, "")

    def acked_resource(self, name: str) -> str | None:
        """The version of ``name`` the client has ACKed (delta), or None if it has not."""
        version = self.sent.get(name)
        if version is None or self.rejected.get(name) == version:
            return None
        for names in self.unacked.values():
            if name in names:
                return None
        return version

    def acked_digest(self) -> str:
        """sotw: the ACKed version; delta: a digest of the resource versions the client holds."""
        if self.acked_version or not self.sent:
            return self.acked_version
        if self.unacked:
            return "pending"
        if self._digest[0] != self.sent_rev:
            h = hashlib.blake2b(digest_size=8)
            for name in sorted(self.sent):
                h.update(name.encode() + b"=" + self.sent[name].encode() + b";")
            self._digest = (self.sent_rev, h.hexdigest())
        return self._digest[1]


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
            "acked": {t: ts.acked_digest() for t, ts in self.types.items() if ts.acked_version or ts.sent},
            "sent": {t: ts.sent_version for t, ts in self.types.items() if ts.sent_version},
            "last_nack": self.last_nack.as_dict() if self.last_nack else None,
            "nacks": self.nacks,
            "pushes": self.pushes,
        }

    def notify(self, type_url: str, scope: str, names: frozenset[str], stamp: float) -> bool:
        """A cache change: mark the type pending when it touches this stream's subscription
        (or, delta, a resource the client holds that vanished from its shadowed scope)."""
        if scope and scope != self.node_id:
            return False
        ts = self.types.get(type_url)
        if ts is None or ts.requests == 0:
            return False
        if ts.wildcard:
            ts.dirty |= names
        else:
            hit = names & ts.names if len(names) < len(ts.names) else ts.names & names
            if not hit:
                hit = {n for n in names if n in ts.sent}  # always empty for sotw
                if not hit:
                    return False
            ts.dirty |= hit
        self._mark(ts, stamp)
        return True

    def responses(self, now: float | None = None) -> list[tuple[str, bytes]]:
        """The responses owed, in PUSH_ORDER; a type marked pending on the way is answered in the same call."""
        stamp = time.monotonic() if now is None else now
        out: list[tuple[str, bytes]] = []
        while True:
            queue = self._pending_types()
            if not queue and self._release_retiring(stamp):  # the routes had nothing to send after all
                queue = self._pending_types()
            if not queue:
                return out
            type_url = queue[0]
            msg = self._respond(type_url, stamp)
            if msg is not None:
                out.append((type_url, msg))

    def _respond(self, type_url: str, stamp: float) -> bytes | None:
        raise NotImplementedError

    def _sent(self, ts: _TypeState, stamp: float) -> None:
        self.pushes += 1
        self.latencies.append(stamp - ts.pending_since)

    def _answered(self, ts: _TypeState) -> bool:
        raise NotImplementedError

    def _routes_settled(self) -> bool:
        """No listener or route update is pending or awaiting the client's answer."""
        for t in NAMERS:
            ts = self.types.get(t)
            if ts is not None and (ts.pending or not self._answered(ts)):
                return False
        return True

    def _release_retiring(self, stamp: float) -> bool:
        """Routes answered: the removals they held back may go now. True if any may."""
        released = False
        if not self._routes_settled():
            return released
        for t in NAMED:
            ts = self.types.get(t)
            if ts is not None and ts.retiring:
                ts.dirty |= ts.retiring
                ts.retiring = set()
                ts.forced = released = True
                self._mark(ts, stamp)
        return released

    def _behind_clusters(self, changed: Iterable[str], stamp: float) -> None:
        """Mark the endpoints of changed clusters the client subscribes to for sending."""
        eds = self.types.get(TYPE.ENDPOINT)
        if eds is None or eds.requests == 0:
            return
        again = {n for n in changed if n in eds.names or eds.wildcard}
        if again:
            self._endpoints_again(eds, again)
            self._mark(eds, stamp)

    def _endpoints_again(self, eds: _TypeState, names: set[str]) -> None:
        raise NotImplementedError

    def _record_nack(self, type_url: str, nonce: str, version: str, message: str) -> None:
        self.nacks += 1
        self.last_nack = Nack(type_url, nonce, version, message, time.time())


class SotwStream(_Stream):
    """State of the world. Listeners and clusters are always sent whole (absence means removal);
    other types (endpoints, routes, ...) are sent incrementally: the first response and new
    subscriptions get every subscribed resource, later ones only those that changed, which the
    protocol allows and which keeps an endpoint change from resending every endpoint."""

    kind = "GRPC"

    def _answered(self, ts: _TypeState) -> bool:
        return ts.sent_nonce == ts.answered_nonce

    def _endpoints_again(self, eds: _TypeState, names: set[str]) -> None:
        eds.dirty |= names

    def receive(
        self, req: discovery_pb2.DiscoveryRequest, now: float | None = None, resource_names: tuple[str, ...] | None = None,
    ) -> None:
        """``resource_names``: the request's resource_names when the caller has them already (reading them
        from the message makes a new string of each)."""
        now = time.monotonic() if now is None else now
        type_url = req.type_url
        if not type_url:
            return
        ts = self.types.setdefault(type_url, _TypeState())
        raw = tuple(req.resource_names) if resource_names is None else resource_names
        held = ts.names
        listed = ts.listed
        if ts.requests and (raw is listed or (len(raw) == len(listed) and raw == listed)):
            names, star = held, ts.star  # the usual request: an ACK repeating the subscription
        else:
            ts.listed, subscribed, star = _subscription(raw)
            ts.star = star
            names = subscribed
        wildcard = (not names and type_url in _WILDCARD_BY_DEFAULT and (ts.requests == 0 or ts.wildcard)) or star
        changed = wildcard != ts.wildcard or (names is not held and names != held)
        if changed:
            ts.dirty |= names - held
            if wildcard and not ts.wildcard:
                ts.full = True
            ts.wildcard = wildcard
            ts.names = ts.names_frozen = frozenset(names)
        first = ts.requests == 0
        ts.requests += 1
        nonce = req.response_nonce
        if first:
            ts.resumed_version = req.version_info
        if first or not ts.sent_nonce:
            ts.forced = ts.full = True
            self._mark(ts, now)
            return
        if nonce != ts.sent_nonce:  # stale: answered by a response already on its way
            if changed:
                ts.forced = True
                self._mark(ts, now)
            return
        if nonce == ts.answered_nonce:
            # the same nonce again: the client asks for what it has once more
            ts.forced = ts.full = True
            self._mark(ts, now)
            return
        ts.answered_nonce = nonce
        if req.HasField("error_detail"):
            self._record_nack(type_url, nonce, ts.sent_version, req.error_detail.message)
        else:
            ts.acked_version = req.version_info
        if changed:
            ts.forced = True
            self._mark(ts, now)
        if type_url in NAMERS:
            self._release_retiring(now)

    def _respond(self, type_url: str, stamp: float) -> bytes | None:
        ts = self.types[type_url]
        ts.pending = False
        forced, ts.forced = ts.forced, False
        # a client that held a version from another stream (another replica, whose versions are the
        # same content hashes) is sent nothing while that version is current
        resumed, ts.resumed_version = ts.resumed_version, ""
        resumed = resumed if not ts.sent_nonce else ""
        changed: set[str] = set()
        if type_url in _WILDCARD_BY_DEFAULT:
            snap = self.cache.sotw_snapshot(type_url, self.node_id, None if ts.wildcard else ts.names_frozen)
            if type_url == TYPE.CLUSTER:
                snap = self._keep_routed(ts, snap)
            version, body = snap.version, snap.body
            if resumed and version == resumed:
                ts.sent_version = ts.acked_version = version
                ts.dirty, ts.held = set(), snap
                return None
            if not forced and version == ts.sent_version:  # also: a NACKed version is not resent
                ts.dirty = set()
                return None
            changed, ts.dirty, ts.held = ts.dirty, set(), snap
        else:
            if ts.full:
                names = frozenset(self.cache.wildcard_names(type_url, self.node_id) | ts.names) if ts.wildcard else ts.names_frozen
                ts.full = False
            else:
                names = frozenset(ts.dirty)
            ts.dirty = set()
            version, body, count = _incremental(self.cache, type_url, self.node_id, names)
            if not count:
                return None
            if resumed and version == resumed:
                ts.sent_version = ts.acked_version = version
                return None
        nonce = self._nonce()
        msg = b"".join((string_field(1, version), body, string_field(4, type_url), string_field(5, nonce)))
        ts.sent_nonce, ts.sent_version = nonce, version
        self._sent(ts, stamp)
        if type_url == TYPE.CLUSTER and changed:
            self._behind_clusters(changed, ts.pending_since)
        return msg

    def _keep_routed(self, ts: _TypeState, snap: Snapshot) -> Snapshot:
        """The clusters to send: the cache's, plus those the client holds that left the cache
        while listeners or routes that may name them are not yet answered."""
        held = ts.held
        if held is None:
            return snap
        gone = {
            n
            for n in ts.dirty | ts.retiring
            if n in held.names and n not in snap.names and (ts.wildcard or n in ts.names)
        }
        if not gone or self._routes_settled():
            ts.retiring = set()
            return snap
        ts.retiring = gone
        return snapshot_of([*snap.entries, *(e for e in held.entries if e.name in gone)])


class DeltaStream(_Stream):
    kind = "DELTA_GRPC"

    def _answered(self, ts: _TypeState) -> bool:
        return not ts.unacked

    def _endpoints_again(self, eds: _TypeState, names: set[str]) -> None:
        eds.forced_names |= names

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
            carried = ts.unacked.pop(nonce, None)
            if req.HasField("error_detail"):
                rejected = sorted(carried or ())
                for n in rejected:
                    if n in ts.sent:
                        ts.rejected[n] = ts.sent[n]
                self._record_nack(type_url, nonce, ",".join(rejected)[:200], req.error_detail.message)
            elif carried and ts.rejected:
                for n in carried:
                    ts.rejected.pop(n, None)
            if type_url in NAMERS:
                self._release_retiring(now)
        touched = False
        if first:
            if req.initial_resource_versions:
                self._own_sent(ts).update(req.initial_resource_versions)
            if not req.resource_names_subscribe and type_url in _WILDCARD_BY_DEFAULT:
                ts.wildcard = True
            ts.full = True
            touched = True
        subscribe, unsubscribe = req.resource_names_subscribe, req.resource_names_unsubscribe
        if subscribe or unsubscribe:
            names = set(ts.names)
            if subscribe:
                new = {sys.intern(n) for n in subscribe}  # the strings shared, not one copy per stream
                if "*" in new:
                    new.discard("*")
                    ts.wildcard = True
                    ts.full = True
                names |= new
                # on a stream's first request, what the client says it holds is not sent again
                ts.forced_names |= {n for n in new if n not in ts.sent} if first and ts.sent else new
            for n in unsubscribe:
                if n == "*":
                    ts.wildcard = False
                    ts.full = True
                else:
                    names.discard(n)
                    ts.forced_names.discard(n)
                    ts.dirty.add(n)
            ts.names = _shared_names(frozenset(names))  # a fleet subscribes alike: one set for all
            touched = True
        if touched:
            self._mark(ts, now)

    @staticmethod
    def _own_sent(ts: _TypeState) -> dict[str, str]:
        if ts.sent_shared:
            ts.sent = dict(ts.sent)
            ts.sent_shared = False
        return ts.sent

    def _respond(self, type_url: str, stamp: float) -> bytes | None:
        ts = self.types[type_url]
        ts.pending = False
        if ts.full and not ts.sent:
            return self._first(ts, type_url, stamp)
        if not ts.full and ts.dirty and not ts.forced_names:
            pushed = self._changed(ts, type_url, stamp)
            if pushed is not None:
                return pushed
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
        carried: list[str] = []  # names whose resource this response carries
        own, shared = self.cache.scopes(type_url, self.node_id)
        sent, subscribed, wildcard = self._own_sent(ts), ts.names, ts.wildcard
        hold = type_url in NAMED and not self._routes_settled()
        # one pass over the names, once per name and stream (a fleet's first sync is all of them),
        # with the lookups bound once
        lookup, held, send, carry = shared.get, sent.get, fields.append, carried.append
        for name in sorted(candidates):
            entry = (own.get(name) or lookup(name)) if own else lookup(name)
            if entry is not None and (name in subscribed or (wildcard and entry.wildcard)):
                version = entry.version
                if held(name) != version or name in forced:
                    send(entry.delta_field)
                    sent[name] = version
                    carry(name)
            elif name in sent:
                if hold and entry is None and (name in subscribed or wildcard):
                    ts.retiring.add(name)  # removed once the routes naming it are answered
                    continue
                ts.retiring.discard(name)
                del sent[name]
                ts.sent_rev += 1
                ts.rejected.pop(name, None)
                if entry is None or name in subscribed or wildcard:
                    removed.append(name)
            elif name in forced and entry is None:
                removed.append(name)  # tell the client it does not exist, so it stops waiting
        if not fields and not removed:
            return None
        return self._finish(ts, type_url, stamp, fields, frozenset(carried).union(removed), removed, carried)

    def _changed(self, ts: _TypeState, type_url: str, stamp: float) -> bytes | None:
        """A push of changed resources to a client that is subscribed to all of them and holds an
        older version of each (the usual push): what ``_respond`` would send, from the response
        shared by every such stream. None when the stream is not such a one (``_respond`` decides)."""
        own, _ = self.cache.scopes(type_url, self.node_id)
        if own:
            return None
        dirty = frozenset(ts.dirty)
        whole = _whole(self.cache, type_url, self.node_id, dirty, False)
        if whole.missing or not whole.carried:
            return None  # removals: decided name by name
        if not (dirty <= ts.names or (ts.wildcard and not whole.unlisted)):
            return None
        sent = ts.sent
        if any(map(operator.eq, map(sent.get, whole.names), whole.version_list)):
            return None  # the client holds some of them already
        ts.dirty = set()
        if ts.sent_shared:
            ts.sent = _advanced(sent, whole)  # every stream that held the same moves to the same
        else:
            sent.update(whole.versions)
        return self._finish(ts, type_url, stamp, [whole.body], whole.carried, [], whole.carried)

    def _first(self, ts: _TypeState, type_url: str, stamp: float) -> bytes | None:
        """The whole subscription to a client that holds nothing of the type: what
        ``_respond`` would send, from the response shared by every stream subscribed alike."""
        ts.full = False
        forced = ts.forced_names
        ts.dirty, ts.forced_names = set(), set()
        whole = _whole(self.cache, type_url, self.node_id, frozenset(ts.names), ts.wildcard)
        # a name asked for by this request that does not exist is reported removed, so the client stops waiting
        removed = sorted(forced & whole.missing) if whole.missing and forced else []
        if not whole.carried and not removed:
            return None
        ts.sent, ts.sent_shared = whole.versions, True  # shared with every stream subscribed alike: never changed in place
        return self._finish(ts, type_url, stamp, [whole.body], whole.carried.union(removed) if removed else whole.carried, removed, whole.carried)

    def _finish(
        self, ts: _TypeState, type_url: str, stamp: float, fields: list[bytes], answers: frozenset[str], removed: list[str],
        carried: Collection[str],
    ) -> bytes:
        nonce = self._nonce()
        fields.extend((string_field(4, type_url), string_field(5, nonce), strings_field(6, removed)))
        msg = b"".join(fields)
        ts.sent_nonce = nonce
        ts.sent_version = nonce
        ts.sent_rev += 1
        ts.unacked[nonce] = answers
        if len(ts.unacked) > 64:  # a client that never ACKs must not grow this
            ts.unacked.pop(next(iter(ts.unacked)))
        self._sent(ts, stamp)
        if type_url == TYPE.CLUSTER and carried:
            self._behind_clusters(carried, ts.pending_since)  # delta Envoy does not re-request them
        return msg

