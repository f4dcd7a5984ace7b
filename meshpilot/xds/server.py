"""The ADS gRPC service (state-of-the-world and delta) on grpc.aio.

Each stream is a state machine from stream.py plus two tasks: a reader that feeds it requests and
a writer that sends what it returns. Cache changes only mark streams pending and wake their
writers, so a slow Envoy delays nobody but itself, and several changes queued behind a slow write
collapse into one push of the latest state. Responses are cached bytes written through an
identity serializer.

grpc.aio accepts a write at once, whether or not the client reads, so the client's answers are
the flow control: every xDS client ACKs or NACKs every response. A stream whose client owes
answers for more than a window of bytes writes nothing more until it answers (its changes
collapse meanwhile), and a client that leaves a response unanswered for ``write_timeout_s`` is
disconnected with DEADLINE_EXCEEDED. A stream never holds a writer slot while it waits for its
client. Across streams, the bytes written and not yet answered are bounded too (``InFlight``):
grpc holds every written response until its client reads it, so a fleet's first sync (2,000
streams each owed ~300 KB at once) would otherwise hold the whole fleet's responses in memory at
once; a response counts against that bound until it is answered or for at most a second, so
clients that never answer cannot hold the others back. Requests larger than a real client sends are refused with RESOURCE_EXHAUSTED before
they cost the event loop anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Set
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from meshpilot import metrics
from meshpilot.xds.cache import ResourceCache
from meshpilot.xds.resource import NodeInfo, node_info, string_field
from meshpilot.xds.stream import DeltaStream, SotwStream

__all__ = [
    "ADS_SERVICE", "Admit", "COLLECTOR_THRESHOLDS", "GRPC_SERVER_OPTIONS", "InFlight", "MAX_REQUEST_BYTES", "StreamError", "Unanswered", "XdsServer", "check_request",
    "collect_less", "names_region", "user_agent",
]

log = logging.getLogger("meshpilot.xds")

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
# What a real client sends fits well inside these: a sotw endpoint request naming 50,000 clusters
# is about 2 MB; Envoy's and grpc's node metadata is a few KB.
MAX_REQUEST_BYTES = 4 * 1024 * 1024  # for grpc.max_receive_message_length
_MAX_NAMES = 50_000  # in each name field of one request; 50,000 cost the event loop ~0.15 s here
_MAX_NAME_CHARS = 1024
_MAX_METADATA_BYTES = 64 * 1024
# grpc core queues a call until the application takes it, and refuses (CANCELLED) at random the
# calls that arrive while more than max_pending_requests wait (all of them beyond the hard limit);
# defaults 1,000 and 3,000. grpc.aio takes one call per turn of the event loop, so a fleet opening
# its streams at once (a restart, a replica handing over) lost 150-250 of 2,000 streams, each then
# waiting out Envoy's back-off. A waiting call costs a few KB; these let 10,000 streams arrive at once.
GRPC_SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.server.max_pending_requests", 10_000),
    ("grpc.server.max_pending_requests_hard_limit", 20_000),
)


def _identity(b: bytes) -> bytes:
    return b


class InFlight:
    """The bytes written to every stream and not yet answered, bounded by ``cap``: a stream waits
    for room before it builds a response. A response stops counting when its client answers it, or
    after ``hold_s`` whatever the client does, so streams whose clients never read or answer hold
    room for at most ``hold_s`` (each is still bounded by its own window, ``Unanswered``)."""

    __slots__ = ("_charges", "_room", "cap", "hold_s", "used")

    def __init__(self, cap: int = 64 * 1024 * 1024, hold_s: float = 1.0) -> None:
        self.cap = cap
        self.hold_s = hold_s
        self.used = 0
        self._charges: deque[tuple[float, list[int]]] = deque()  # (when it stops counting, [bytes still counted])
        self._room = asyncio.Event()
        self._room.set()

    def charge(self, size: int, now: float) -> list[int]:
        cell = [size]
        self.used += size
        self._charges.append((now + self.hold_s, cell))
        return cell

    def settle(self, cell: list[int]) -> None:
        """The response of ``cell`` is answered (or its time is up): it stops counting."""
        if cell[0]:
            self.used -= cell[0]
            cell[0] = 0
            if self.used < self.cap:
                self._room.set()

    def _expire(self, now: float) -> None:
        charges = self._charges
        while charges and (charges[0][0] <= now or not charges[0][1][0]):
            self.settle(charges.popleft()[1])

    async def room(self) -> None:
        """Return once the bytes in flight are under the bound."""
        while True:
            now = time.monotonic()
            self._expire(now)
            if self.used < self.cap or not self._charges:
                return
            self._room.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.001, self._charges[0][0] - now)):
                    await self._room.wait()


class Unanswered:
    """The responses a client has not answered yet, per type: the flow control of one stream.

    An xDS client answers (ACKs or NACKs) every response, and an answer carries the nonce of the
    latest response of its type the client has seen, so it answers the earlier ones of that type
    too. Nonces are the stream's counter, so they compare as numbers."""

    __slots__ = ("_sent", "bytes", "count", "in_flight", "window_bytes", "window_count")

    def __init__(self, window_bytes: int = 1024 * 1024, window_count: int = 64, in_flight: InFlight | None = None) -> None:
        self._sent: dict[str, deque[tuple[int, float, int, list[int]]]] = {}
        self.bytes = 0
        self.count = 0
        self.window_bytes = window_bytes
        self.window_count = window_count
        self.in_flight = in_flight  # the bound across streams, if any

    @property
    def full(self) -> bool:
        """Whether the client owes so much that nothing more may be written to it."""
        return self.bytes >= self.window_bytes or self.count >= self.window_count

    def sent(self, type_url: str, nonce: str, size: int, now: float) -> None:
        cell = self.in_flight.charge(size, now) if self.in_flight is not None else [0]
        self._sent.setdefault(type_url, deque()).append((int(nonce), now, size, cell))
        self.bytes += size
        self.count += 1

    def answer(self, type_url: str, nonce: str) -> bool:
        """Record a request's nonce; True when it answered at least one response."""
        q = self._sent.get(type_url)
        if not q or not nonce or len(nonce) > 20:
            return False
        try:
            n = int(nonce)
        except ValueError:
            return False
        hit = False
        while q and q[0][0] <= n:
            _nonce, _at, size, cell = q.popleft()
            self.bytes -= size
            self.count -= 1
            if self.in_flight is not None:
                self.in_flight.settle(cell)
            hit = True
        return hit

    def oldest(self) -> tuple[str, int, float] | None:
        """(type, nonce, time sent) of the oldest unanswered response, if any."""
        heads = [(q[0][1], t, q[0][0]) for t, q in self._sent.items() if q]
        if not heads:
            return None
        at, type_url, nonce = min(heads)
        return type_url, nonce, at


@dataclass(slots=True)
class StreamHandle:
    id: int
    machine: SotwStream | DeltaStream
    wake: asyncio.Event
    peer: str
    node: NodeInfo | None = None
    connected_at: float = field(default_factory=time.time)
    user_agent: str = ""
    identity: str = ""  # the client's certificate identity, when the port authenticates
    expires_at: float = float("inf")  # time.monotonic() when the client's certificate expires
    closing: str = ""  # set by ``disconnect`` or ``hand_over``: why the stream ends now
    closing_code: grpc.StatusCode = grpc.StatusCode.PERMISSION_DENIED
    unanswered: Unanswered = field(default_factory=Unanswered)
    # sotw: per type, the wire bytes of the names the last request listed and those names
    listed: dict[str, tuple[bytes, tuple[str, ...]]] = field(default_factory=dict)


Admit = Callable[[grpc.aio.ServicerContext[Any, Any], NodeInfo], tuple[str, float]]  # (identity, not_after, unix s)


class XdsServer:
    """ADS streams over one cache. ``on_node`` is called with a node's info before its first
    response (to build its own resources); ``on_node_gone`` when its last stream closes.
    ``admit`` (when the port authenticates its clients) sees each stream's context and node before
    anything is sent or recorded: it returns the client's identity and when its certificate
    expires, or raises StreamError to refuse the stream. A stream ends when its client's
    certificate expires (the client reconnects with its renewed one) or when ``disconnect`` says so."""

    def __init__(
        self,
        cache: ResourceCache,
        on_node: Callable[[NodeInfo], None] = lambda n: None,
        on_node_gone: Callable[[NodeInfo], None] = lambda n: None,
        max_concurrent_writes: int = 64,
        write_timeout_s: float = 30.0,
        admit: Admit | None = None,
        in_flight_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.cache = cache
        self.admit = admit
        self.write_timeout_s = write_timeout_s
        self.on_node = on_node
        self.on_node_gone = on_node_gone
        self.streams: dict[int, StreamHandle] = {}
        self._ids = itertools.count(1)
        self._node_streams: dict[str, int] = {}
        self._changes: dict[tuple[str, str], tuple[set[str], float]] = {}
        self._dispatch_scheduled = False
        self._writers = asyncio.Semaphore(max_concurrent_writes)
        self.in_flight = InFlight(in_flight_bytes)
        self.unavailable = ""  # why new streams are refused (``hand_over``), "" while serving
        cache.watch(self._on_change)

    def handler(self) -> grpc.GenericRpcHandler:
        """The ADS service for a grpc server; the process serves xDS from now on (``collect_less``)."""
        collect_less()
        return grpc.method_handlers_generic_handler(
            ADS_SERVICE,
            {
                "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self._sotw,
                    request_deserializer=_identity,  # parsed in _read, which keeps the bytes of the names
                    response_serializer=_identity,
                ),
                "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self._delta,
                    request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                    response_serializer=_identity,
                ),
            },
        )

    def _on_change(self, type_url: str, scope: str, names: frozenset[str], stamp: float) -> None:
        """Collect cache changes and tell the streams once the current rebuild is done, so a
        rebuild that touches many services costs one notification per stream, not one each."""
        key = (type_url, scope)
        pending = self._changes.get(key)
        if pending is None:
            self._changes[key] = (set(names), stamp)
        else:
            pending[0].update(names)
        if self._dispatch_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._dispatch()
            return
        self._dispatch_scheduled = True
        loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_scheduled = False
        changes, self._changes = self._changes, {}
        for (type_url, scope), (names, stamp) in changes.items():
            self._notify(type_url, scope, frozenset(names), stamp)

    def _notify(self, type_url: str, scope: str, names: frozenset[str], stamp: float) -> None:
        if scope:
            for h in self.streams.values():
                if h.machine.node_id == scope and h.machine.notify(type_url, scope, names, stamp):
                    h.wake.set()
            return
        for h in self.streams.values():
            if h.machine.notify(type_url, scope, names, stamp):
                h.wake.set()

    def proxies(self) -> list[dict[str, Any]]:
        out = []
        for h in sorted(self.streams.values(), key=lambda x: x.id):
            node = h.node
            out.append(
                {
                    "stream": h.id,
                    "node_id": node.id if node else "",
                    "cluster": node.cluster if node else "",
                    "service": node.service_key if node else "",
                    "peer": h.peer,
                    "identity": h.identity,
                    "user_agent": h.user_agent,
                    "connected_at": h.connected_at,
                    **h.machine.summary(),
                }
            )
        return out

    def ack_status(self, type_url: str, names: Set[str]) -> list[tuple[str, bool]]:
        """One entry per stream subscribed to any of ``names`` of ``type_url``: its node id and
        whether it has ACKed the current version of each of those it subscribed to. Delta streams
        ACK per resource; a sotw stream has ACKed when it answered its last response with an ACK
        and nothing of these names is waiting to be sent to it (its endpoint responses carry only
        what changed, so their versions are not the cache's)."""
        out = []
        for h in list(self.streams.values()):
            m = h.machine
            ts = m.types.get(type_url)
            if ts is None:
                continue
            wanted = set(names) if ts.wildcard else names & ts.names
            if not wanted:
                continue
            if m.kind == "DELTA_GRPC":
                acked = all(
                    (e := self.cache.get(type_url, n, m.node_id)) is None or ts.acked_resource(n) == e.version for n in wanted
                )
            else:
                acked = (ts.acked_version == ts.sent_version and not ts.pending and not (ts.dirty & wanted)
                         and not self._undispatched(type_url, m.node_id, wanted))
            out.append((h.node.id if h.node else f"stream-{h.id}", acked))
        return out

    def _undispatched(self, type_url: str, node_id: str, names: Set[str]) -> bool:
        """Whether a cache change to any of ``names`` has not reached the streams yet."""
        return any(
            not changed[0].isdisjoint(names)
            for changed in (self._changes.get((type_url, "")), self._changes.get((type_url, node_id)))
            if changed is not None
        )

    def has_acked(self, node_id: str, type_url: str, names: Set[str]) -> bool:
        """Whether every stream of ``node_id`` subscribed to any of ``names`` has ACKed their current
        version (True when none is)."""
        return all(acked for node, acked in self.ack_status(type_url, names) if node == node_id)

    async def _sotw(self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest], context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await self._serve(SotwStream(self.cache), context)

    async def _delta(self, requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest], context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await self._serve(DeltaStream(self.cache), context)

    async def _serve(self, machine: SotwStream | DeltaStream, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """The stream's requests are read with ``context.read()`` (``_read``), not from grpc's iterator."""
        handle = StreamHandle(next(self._ids), machine, asyncio.Event(), context.peer(), unanswered=Unanswered(in_flight=self.in_flight))
        self.streams[handle.id] = handle
        metrics.XDS_STREAMS.labels(machine.kind).inc()
        try:
            async with asyncio.TaskGroup() as tg:
                writer = tg.create_task(self._write(handle, context))
                try:
                    await self._read(handle, context)
                finally:
                    writer.cancel()
        except* (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        except* StreamError as eg:
            e = eg.exceptions[0]
            assert isinstance(e, StreamError)
            metrics.XDS_STREAMS_ABORTED.labels(e.code.name).inc()
            log.warning(
                "event=stream_aborted stream=%s node=%s peer=%s code=%s reason=%s",
                handle.id, handle.node.id if handle.node else "", handle.peer, e.code.name, e,
            )
            await context.abort(e.code, str(e))
        finally:
            del self.streams[handle.id]
            metrics.XDS_STREAMS.labels(machine.kind).dec()
            if handle.node is not None:
                left = self._node_streams.get(handle.node.id, 1) - 1
                if left <= 0:
                    self._node_streams.pop(handle.node.id, None)
                    self.on_node_gone(handle.node)
                else:
                    self._node_streams[handle.node.id] = left
            log.info("event=stream_closed stream=%s node=%s", handle.id, handle.node.id if handle.node else "")

    async def _read(self, handle: StreamHandle, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        # context.read(), not the request iterator: grpc's iterator holds the last request while it
        # waits for the next, and so would a loop variable here. A sotw ACK repeats every name the
        # stream subscribes to (~40 KB for 1,000 names), and a stream waiting for its first sync held
        # its request, its names as strings and as wire bytes: ~200 KB per stream across a fleet.
        while self._request(handle, await context.read(), context):
            pass

    def _request(self, handle: StreamHandle, item: Any, context: grpc.aio.ServicerContext[Any, Any]) -> bool:
        """Take one request (False: the client closed its side). Nothing of it outlives this call
        but what the stream records."""
        if item is grpc.aio.EOF:
            return False
        region: bytes | None = None
        if isinstance(item, bytes):  # sotw
            # an ACK lists the names the stream subscribes to already: recognised by their
            # bytes, the names are neither parsed nor read (a new string of each) nor checked again
            try:
                again = _repeated(item, handle.listed)
                if again is not None:
                    req, listed = again[0], check_request(again[0], again[1])
                else:
                    req = discovery_pb2.DiscoveryRequest.FromString(item)
                    region = names_region(item, req)
                    listed = check_request(req)
            except DecodeError as exc:
                raise StreamError(f"the request is not a DiscoveryRequest: {exc}") from exc
        else:
            req = item
            listed = check_request(req)
        if handle.node is None:
            if self.unavailable:
                raise StreamError(self.unavailable, grpc.StatusCode.UNAVAILABLE)
            if not req.HasField("node") or not req.node.id:
                raise StreamError("the first request of a stream must carry node.id")
            md = json_format.MessageToDict(req.node.metadata) if req.node.HasField("metadata") else {}
            node = node_info(req.node.id, req.node.cluster, md, req.node.locality.zone)
            if self.admit is not None:
                handle.identity, not_after = self.admit(context, node)  # raises StreamError to refuse
                handle.expires_at = time.monotonic() + (not_after - time.time())
                handle.wake.set()  # the writer keeps the time
            handle.node = node
            handle.user_agent = user_agent(req.node)
            handle.machine.node_id = req.node.id
            self._node_streams[req.node.id] = self._node_streams.get(req.node.id, 0) + 1
            log.info("event=stream_open stream=%s kind=%s node=%s peer=%s", handle.id, handle.machine.kind, req.node.id, handle.peer)
            self.on_node(handle.node)
        nacks = handle.machine.nacks
        if log.isEnabledFor(logging.DEBUG):
            log.debug("event=request stream=%s %s", handle.id, _describe(req))
        if isinstance(handle.machine, SotwStream):
            handle.machine.receive(req, resource_names=listed)
            ts = handle.machine.types.get(req.type_url)
            if region is not None and ts is not None and ts.listed == listed:  # a new list of names
                handle.listed[req.type_url] = (_REGIONS.setdefault(region, region), ts.listed)
                if len(_REGIONS) > _MAX_REGIONS:
                    _REGIONS.clear()  # only sharing is lost
        else:
            handle.machine.receive(req)
        if handle.unanswered.answer(req.type_url, req.response_nonce):
            handle.wake.set()  # the writer may be waiting for room
        if handle.machine.nacks != nacks and handle.machine.last_nack:
            n = handle.machine.last_nack
            metrics.XDS_NACKS.labels(n.type_url.rsplit(".", 1)[-1]).inc()
            log.warning("event=nack node=%s type=%s error=%r", handle.node.id, n.type_url, n.message[:500])
        if handle.machine.pending:
            handle.wake.set()
        return True

    def disconnect(self, node_id: str, reason: str) -> int:
        """End every stream of ``node_id`` and of its auxiliary nodes (``<node>~...``) with
        PERMISSION_DENIED; how many there were."""
        n = 0
        for h in list(self.streams.values()):
            nid = h.machine.node_id
            if nid == node_id or nid.startswith(node_id + "~"):
                h.closing = reason
                h.wake.set()
                n += 1
        return n

    def hand_over(self, reason: str) -> int:
        """End every stream with UNAVAILABLE (clients reconnect, to another replica) and refuse new
        ones until ``resume``; how many streams there were."""
        self.unavailable = reason
        n = 0
        for h in list(self.streams.values()):
            h.closing, h.closing_code = reason, grpc.StatusCode.UNAVAILABLE
            h.wake.set()
            n += 1
        return n

    def resume(self) -> None:
        self.unavailable = ""

    def _check_standing(self, handle: StreamHandle) -> None:
        if handle.closing:
            raise StreamError(handle.closing, handle.closing_code)
        if time.monotonic() >= handle.expires_at:
            raise StreamError("the client certificate expired; reconnect with the renewed one", grpc.StatusCode.UNAUTHENTICATED)

    async def _write(self, handle: StreamHandle, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        owed = handle.unanswered
        while True:
            self._check_standing(handle)
            handle.wake.clear()
            if handle.machine.pending and not owed.full:
                # A bounded number of streams build and write at once; the slot is held only for
                # that (grpc takes the bytes at once), never while the client reads or answers.
                # Room among the bytes in flight is waited for before anything is built.
                await self.in_flight.room()
                async with self._writers:
                    wrote = await self._push(handle, context)
                for seconds in handle.machine.latencies:
                    metrics.XDS_PUSH_SECONDS.observe(max(0.0, seconds))
                handle.machine.latencies.clear()
                if wrote:
                    continue
                # nothing to send after all: wait for the next change or answer, do not spin
            oldest = owed.oldest()
            if oldest is None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(None if handle.expires_at == float("inf") else handle.expires_at - time.monotonic()):
                        await handle.wake.wait()
                continue
            left = oldest[2] + self.write_timeout_s - time.monotonic()
            left_standing = handle.expires_at - time.monotonic()
            if left_standing <= 0:
                continue  # checked at the top
            if left <= 0:
                raise StreamError(
                    f"the {oldest[0].rsplit('.', 1)[-1]} response with nonce {oldest[1]} was not answered within "
                    f"{self.write_timeout_s:g} s; a client must read and ACK or NACK every response",
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, left_standing)):
                    await handle.wake.wait()

    async def _push(self, handle: StreamHandle, context: grpc.aio.ServicerContext[Any, Any]) -> bool:
        """Write what the stream owes; False if that was nothing. Responses live only in here: an
        idle stream keeps nothing of its last push alive until the next one."""
        out = handle.machine.responses()
        sizes: dict[str, int] = {}
        for type_url, payload in out:
            sizes[type_url] = sizes.get(type_url, 0) + len(payload)
        now = time.monotonic()
        for type_url, size in sizes.items():
            # owed before the write: a client may answer while the write is still returning, and an
            # answer to a response not yet recorded would be lost (the stream then ends as unanswered).
            # One answer with the latest nonce of a type answers every earlier response of it
            handle.unanswered.sent(type_url, handle.machine.types[type_url].sent_nonce, size, now)
        for type_url, payload in out:
            await context.write(payload)
            _pushes(type_url, handle.machine.kind).inc()
        return bool(out)


# the cyclic garbage collector's thresholds in a process serving xDS (CPython's are 700, 10, 10)
COLLECTOR_THRESHOLDS = (50_000, 20, 20)


def collect_less() -> None:
    """Run the cyclic garbage collector less often, and never over what the process holds so far.

    A push to 2,000 streams allocates a few hundred thousand short-lived containers (futures,
    coroutine frames, the records of what each stream owes), almost all freed by reference counts,
    yet each 700 of them started a collection, and the streams' own objects (~320,000) were walked
    again by every full one: ~0.1 s of the 0.35 s a single change cost the control plane, and a full
    collection in the middle of a push stopped every stream for 0.1-0.8 s. What was built before
    the server starts (modules, the first resources) lives as long as the process: frozen, left
    out of full collections. Thresholds are only ever raised."""
    now = gc.get_threshold()
    gc.set_threshold(*(max(a, b) for a, b in zip(now, COLLECTOR_THRESHOLDS)))
    gc.freeze()


_PUSH_COUNTERS: dict[tuple[str, str], Any] = {}


def _pushes(type_url: str, kind: str) -> Any:
    """The pushes counter of a type and stream kind (looking a labelled child up costs more than
    counting: it is done once per response to every stream)."""
    key = (type_url, kind)
    child = _PUSH_COUNTERS.get(key)
    if child is None:
        child = _PUSH_COUNTERS[key] = metrics.XDS_PUSHES.labels(type_url.rsplit(".", 1)[-1], kind)
    return child


# the wire bytes of sotw subscriptions, one object per distinct list (a fleet lists the same names)
_REGIONS: dict[bytes, bytes] = {}
_MAX_REGIONS = 4096


def _varint_at(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(raw) and shift < 64:
        b = raw[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
    return -1, len(raw)


def _names_start(raw: bytes) -> int:
    """Where the names of a sotw request begin: after version_info and node (-1: malformed)."""
    pos, n = 0, len(raw)
    for tag in (0x0A, 0x12):
        if pos < n and raw[pos] == tag:
            length, pos = _varint_at(raw, pos + 1)
            if length < 0:
                return -1
            pos += length
    return pos


def _repeated(
    raw: bytes, listed: dict[str, tuple[bytes, tuple[str, ...]]],
) -> tuple[discovery_pb2.DiscoveryRequest, tuple[str, ...]] | None:
    """A sotw request that lists the same names as the stream's last request of its type: the
    request parsed without them, and those names; None for any other request."""
    if not listed:
        return None
    pos = _names_start(raw)
    if pos < 0:
        return None
    for type_url, (region, names) in listed.items():
        end = pos + len(region)
        if region and raw.startswith(region, pos) and (end == len(raw) or raw[end] != 0x1A):
            req = discovery_pb2.DiscoveryRequest.FromString(raw[:pos] + raw[end:])
            if req.type_url == type_url and not req.resource_names:
                return req, names
    return None


def names_region(raw: bytes, req: discovery_pb2.DiscoveryRequest) -> bytes | None:
    """The wire bytes of a sotw request's resource_names (field 3), when the request is laid out as
    protobuf writes it, fields in order: version_info and node, the names, then type_url and
    response_nonce ending the message. None otherwise (an error_detail, fields out of order): the
    caller then reads the names from the message. Equal bytes mean the same list of names."""
    pos, n = _names_start(raw), len(raw)
    if pos < 0 or req.HasField("error_detail"):
        return None
    suffix = string_field(4, req.type_url) + string_field(5, req.response_nonce)
    end = n - len(suffix)
    if end < pos or not raw.endswith(suffix) or (end > pos and raw[pos] != 0x1A):
        return None
    return raw[pos:end]


def check_request(
    req: discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest, checked: tuple[str, ...] | None = None,
) -> tuple[str, ...] | None:
    """Refuse a request larger than a real client sends, before anything iterates over it. Returns
    a sotw request's resource_names, read once here for the stream to use (each read of them from
    the message makes a new string of every name: ~50 us for 1,000 names, in every ACK);
    ``checked``: the names the request is known to list, checked before."""
    listed: tuple[str, ...] | None = None
    if checked is not None and isinstance(req, discovery_pb2.DiscoveryRequest):
        if req.HasField("node") and req.node.HasField("metadata"):
            _check_metadata(req.node.metadata.ByteSize())
        return checked
    if isinstance(req, discovery_pb2.DeltaDiscoveryRequest):
        fields: tuple[tuple[str, Any], ...] = (
            ("resource_names_subscribe", req.resource_names_subscribe),
            ("resource_names_unsubscribe", req.resource_names_unsubscribe),
            ("initial_resource_versions", req.initial_resource_versions),
        )
    else:
        fields = (("resource_names", req.resource_names),)
    for name, values in fields:
        if len(values) > _MAX_NAMES:
            raise StreamError(f"{name}: {len(values)} names; at most {_MAX_NAMES} in one request", grpc.StatusCode.RESOURCE_EXHAUSTED)
        if name == "resource_names":
            values = listed = tuple(values)
        longest = max(map(len, values), default=0)
        if longest > _MAX_NAME_CHARS:
            raise StreamError(f"{name}: a name of {longest} characters; at most {_MAX_NAME_CHARS}", grpc.StatusCode.RESOURCE_EXHAUSTED)
    if req.HasField("node") and req.node.HasField("metadata"):
        _check_metadata(req.node.metadata.ByteSize())
    return listed


def _check_metadata(size: int) -> None:
    if size > _MAX_METADATA_BYTES:
        raise StreamError(f"node.metadata: {size} bytes; at most {_MAX_METADATA_BYTES}", grpc.StatusCode.RESOURCE_EXHAUSTED)


def user_agent(node: Any) -> str:
    """"name version" of a client: Envoy sends a structured build version, grpc and others a string."""
    kind = node.WhichOneof("user_agent_version_type")
    if kind == "user_agent_version":
        version = node.user_agent_version
    elif kind == "user_agent_build_version":
        v = node.user_agent_build_version.version
        version = f"{v.major_number}.{v.minor_number}.{v.patch}"
    else:
        version = ""
    return f"{node.user_agent_name} {version}".strip()


def _describe(req: Any) -> str:
    if isinstance(req, discovery_pb2.DeltaDiscoveryRequest):
        return (
            f"type={req.type_url.rsplit('.', 1)[-1]} nonce={req.response_nonce!r} subscribe={list(req.resource_names_subscribe)} "
            f"unsubscribe={list(req.resource_names_unsubscribe)} initial={len(req.initial_resource_versions)} nack={req.HasField('error_detail')}"
        )
    return (
        f"type={req.type_url.rsplit('.', 1)[-1]} nonce={req.response_nonce!r} version={req.version_info!r} "
        f"names={list(req.resource_names)[:5]} nack={req.HasField('error_detail')}"
    )


class StreamError(Exception):
    """Ends a stream with a gRPC status (INVALID_ARGUMENT unless said otherwise)."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> None:
        super().__init__(message)
        self.code = code
