"""The HDS gRPC service: moves messages between a sidecar's Envoy and the stream machine
(stream.py), carries its effects to the wire and the registry, and sweeps the instances of lost
streams (liveness.py).

A node whose HDS stream is lost goes critical after ``hds_critical_after_s`` (longer than Envoy's
30 s HDS reconnect back-off), or after ``hds_dead_after_s`` once the node's ADS stream has been
closed as long too (a dead sidecar: outlier detection ejects it for 30 s, and it must leave EDS
before that ends), and is deregistered after ``hds_remove_after_s``. With identity on, a stream
ends when its client certificate expires; the sidecar reconnects with its renewed one.

Replicas (several control planes on one etcd): the replica holding a node's stream writes the
ephemeral document ``liveness/<node id> = {"replica": <its id>}`` when the stream opens and deletes it
when the stream closes (if it still names that replica); on etcd it is bound to the replica's lease,
so it also goes when the replica dies. Every replica follows the others' documents (``on_change``):
a node is held while a document names it, and the clocks above run only for nodes nobody holds, on
every replica that saw the last holder go (the short grace only where both of the node's streams
closed on this replica: its ADS stream may be open on another). When a sidecar moves (its replica died, its stream was
reset), the replica it moves to overwrites the document, so the old replica's end no longer counts.
Acting on the clocks is idempotent, and several replicas may act at once: marking critical writes
the same check (a no-op on a replica that already has it), deregistering skips an instance already
gone, and each replica looks at the current document right before it acts. A mark that crosses a
reconnect (written by a replica that had not heard of the new holder yet) is undone by the holder,
which puts its stream's last reported status back; a removal cannot be undone that way (it looks
like a graceful offline), so one that crosses a reconnect, in the few milliseconds of the watch at
the end of ``hds_remove_after_s``, lasts until the sidecar's next reconnect. A replica whose store is not current
(``follow_store``) ends its streams with UNAVAILABLE, refuses new ones and acts on no clock until
it is current again; then it deletes the documents that still name it and gives the nodes nobody
holds the long grace from then (it refused them meanwhile; the replicas that stayed current kept
their clocks).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.service.health.v3 import hds_pb2

from meshpilot.hds.liveness import Liveness
from meshpilot.hds.metadata import CHECK_ID, OWNER, SOURCE
from meshpilot.hds.stream import HdsStream, Register, Reject, Send, SetCheck
from meshpilot.model import Check, CheckStatus
from meshpilot.pki import peer_from_context
from meshpilot.registry import Change, Registry, RegistryError
from meshpilot.registry.store import StoreError
from meshpilot.xds.resource import NodeInfo

__all__ = ["HDS_SERVICE", "LIVENESS", "HdsServer", "replica_id"]

log = logging.getLogger("meshpilot.hds")

HDS_SERVICE = "envoy.service.health.v3.HealthDiscoveryService"
LIVENESS = "liveness"  # the store's ephemeral table: node id -> {"replica": the replica holding its stream}


def replica_id() -> str:
    """A name for this control-plane process, unique among the replicas of a mesh and across restarts."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


@dataclass(slots=True, eq=False)
class _Open:
    """A stream being served: its task, so that ``follow_store`` can end it."""

    task: asyncio.Task[Any] | None
    closing: str = ""


class HdsServer:
    """The gRPC side of HDS over one registry. ``token(node_id)`` is a node's health token;
    ``admit(context, node)`` (when clients authenticate) returns the client's SPIFFE id or raises
    stream.Refused. ``replica`` names this process in the liveness documents."""

    def __init__(
        self,
        registry: Registry,
        report_interval_s: float,
        critical_after_s: float,
        remove_after_s: float,
        dead_after_s: float = 0.0,
        token: Callable[[str], str] = lambda node_id: "",
        admit: Callable[[grpc.aio.ServicerContext[Any, Any], NodeInfo], str] | None = None,
        replica: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.store = registry.store
        self.admit = admit
        self.report_interval_s = report_interval_s
        self.token = token
        self.replica = replica or replica_id()
        self.clock = clock
        self.liveness = Liveness(critical_after_s, remove_after_s, dead_after_s, shared=self.store.shared)
        self.current = True
        self.unavailable = ""  # while set, why streams are refused
        self._open: set[_Open] = set()
        self._latest: dict[str, HdsStream] = {}  # instance -> the stream that last opened for it here
        now = clock()
        for node, _doc in list(self.store.items(LIVENESS)):
            holder = self._holder(node)
            if holder == self.replica:
                self._write_liveness(node, None)  # this replica's name from before a restart: it holds nothing yet
            elif holder:
                self.liveness.elsewhere.add(node)
        # instances registered before a restart must reconnect within the same bounds, unless another
        # replica holds them
        for inst in registry.instances():
            if inst.source == SOURCE and inst.id not in self.liveness.elsewhere:
                self.liveness.lost_at[inst.id] = now

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            HDS_SERVICE,
            {
                "StreamHealthCheck": grpc.stream_stream_rpc_method_handler(
                    self._stream,
                    request_deserializer=hds_pb2.HealthCheckRequestOrEndpointHealthResponse.FromString,
                    response_serializer=hds_pb2.HealthCheckSpecifier.SerializeToString,
                ),
                "FetchHealthCheck": grpc.unary_unary_rpc_method_handler(
                    self._fetch,
                    request_deserializer=hds_pb2.HealthCheckRequestOrEndpointHealthResponse.FromString,
                    response_serializer=hds_pb2.HealthCheckSpecifier.SerializeToString,
                ),
            },
        )

    async def _fetch(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "use StreamHealthCheck")

    async def _stream(
        self, requests: AsyncIterator[hds_pb2.HealthCheckRequestOrEndpointHealthResponse], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        if self.unavailable:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.unavailable)
        admit = self.admit
        stream = HdsStream(self.report_interval_s, self.token, None if admit is None else lambda node: admit(context, node))
        handle = _Open(asyncio.current_task())
        self._open.add(handle)
        iid = ""
        expires: float | None = None
        if admit is not None and (peer := peer_from_context(context)) is not None:
            # the stream ends with its certificate; the sidecar reconnects with its renewed one
            expires = asyncio.get_running_loop().time() + (peer.not_after - time.time())
        try:
            async with asyncio.timeout_at(expires):
                async for msg in requests:
                    for effect in stream.receive(msg, self.clock(), self.registry.instance):
                        if isinstance(effect, Reject):
                            if effect.node:
                                log.warning("event=hds_rejected node=%s reason=%s", effect.node, effect.reason)
                            await context.abort(grpc.StatusCode[effect.code], effect.reason)
                        elif isinstance(effect, Register):
                            try:
                                self.registry.register(effect.instance, replace=True)
                            except RegistryError as exc:
                                log.warning("event=hds_rejected node=%s reason=%s", effect.instance.id, exc)
                                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                            iid = effect.instance.id
                            self.opened(iid, stream)
                            plan = effect.registration.plan
                            log.info("event=hds_open instance=%s check=%s:%s:%d", iid, plan.kind, plan.address, plan.port)
                        elif isinstance(effect, Send):
                            await context.write(effect.specifier)
                        elif isinstance(effect, SetCheck):
                            try:
                                self.registry.set_check(effect.instance_id, effect.check)
                            except RegistryError as exc:
                                log.warning("event=hds_update_failed instance=%s reason=%s", iid, exc)
                                continue
                            log.info("event=hds_health instance=%s status=%s", iid, effect.check.status.value)
        except TimeoutError:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "the client certificate expired; reconnect with the renewed one")
        except asyncio.CancelledError:
            if not handle.closing or handle.task is None:
                raise
            handle.task.uncancel()  # ended by follow_store, not by the client
            await context.abort(grpc.StatusCode.UNAVAILABLE, handle.closing)
        finally:
            self._open.discard(handle)
            if iid:
                self.closed(iid, self.clock(), stream)
                log.info("event=hds_closed instance=%s", iid)

    # ---- the node's hold: this replica's streams and the other replicas' documents -------------

    def opened(self, iid: str, stream: HdsStream | None = None) -> None:
        """A stream of ``iid`` registered here: this replica holds the node."""
        self.liveness.opened(iid)
        if stream is not None:
            self._latest[iid] = stream
        self._write_liveness(iid, {"replica": self.replica})

    def closed(self, iid: str, now: float, stream: HdsStream | None = None) -> None:
        """A stream of ``iid`` ended here; when it was the node's last, the hold ends."""
        if stream is not None and self._latest.get(iid) is stream:
            del self._latest[iid]
        self.liveness.closed(iid, now)
        if iid not in self.liveness.open and self._holder(iid) == self.replica:
            self._write_liveness(iid, None)

    def _holder(self, node: str) -> str:
        doc = self.store.get(LIVENESS, node)
        return str(doc.get("replica", "")) if isinstance(doc, dict) else ""

    def _write_liveness(self, node: str, doc: dict[str, Any] | None) -> None:
        # also while cut off: the store commits it once etcd is back (a delete that lands after another
        # replica took the node over is undone by that replica, see _on_liveness)
        try:
            if doc is None:
                self.store.write({}, ((LIVENESS, node),))
            else:
                self.store.write({(LIVENESS, node): doc})
        except StoreError as exc:
            log.warning("event=hds_liveness_write_failed node=%s reason=%s", node, exc)

    def _on_liveness(self, node: str, op: str) -> None:
        """Another replica's liveness document for ``node`` was written or removed (or expired with its lease)."""
        now = self.clock()
        if op == "delete":
            if node in self.liveness.open:
                # this replica still holds the node: the document must say so (the other replica's
                # view was behind when it removed it, or an old holder's lease ran out)
                self.liveness.elsewhere.discard(node)
                self._write_liveness(node, {"replica": self.replica})
                return
            self.liveness.released_elsewhere(node, now)
            return
        holder = self._holder(node)
        if not holder:
            return  # removed again already: its delete follows
        if holder == self.replica:
            if node not in self.liveness.open:
                # put back by the store with a renewed lease after this replica's hold ended
                self._write_liveness(node, None)
            return
        self.liveness.held_elsewhere(node)

    def on_change(self, change: Change) -> None:
        if change.kind == "instance" and change.op == "delete":
            self.liveness.forget(change.key)
        elif change.kind == "instance" and change.remote:
            self._reassert(change.key)
        elif change.kind == "document" and change.table == LIVENESS and change.remote:
            self._on_liveness(change.key, change.op)

    def _reassert(self, iid: str) -> None:
        """Another replica changed an instance whose stream this replica holds: the ``hds`` check stays
        what the stream last reported (a replica that marked it critical had not heard of this hold yet)."""
        stream = self._latest.get(iid)
        if stream is None or stream.session is None or stream.session.last is None:
            return
        if iid not in self.liveness.open or self._holder(iid) != self.replica or not self.current:
            return
        inst = self.registry.instance(iid)
        if inst is None or inst.source != SOURCE:
            return
        want = stream.session.last
        have = next((c.status for c in inst.checks if c.id == CHECK_ID), None)
        if have == want:
            return
        out = "health check passing" if want is CheckStatus.passing else f"health check {want.value}"
        try:
            self.registry.set_check(iid, Check(id=CHECK_ID, owner=OWNER, status=want, output=out))
        except RegistryError as exc:
            log.warning("event=hds_update_failed instance=%s reason=%s", iid, exc)
            return
        log.warning("event=hds_reasserted instance=%s status=%s was=%s", iid, want.value, have.value if have else "-")

    def on_node(self, node_id: str, connected: bool) -> None:
        """One of a node's ADS streams opened, or its last one closed."""
        self.liveness.ads_changed(node_id, connected, self.clock())

    # ---- the store's currency ---------------------------------------------------------------------

    def follow_store(self, current: bool) -> int:
        """Cut off from the store (``current`` False): end every stream with UNAVAILABLE (its Envoy
        reconnects to another replica) and refuse new ones; current again: serve, and delete the
        documents that still name this replica. Returns how many streams were ended."""
        if current == self.current:
            return 0
        if not current:
            self.current = False
            self.unavailable = "this control-plane replica lost its store; reconnect to another replica"
            ended = 0
            for handle in list(self._open):
                if not handle.closing and handle.task is not None:
                    handle.closing = self.unavailable
                    handle.task.cancel()
                    ended += 1
            log.error("event=hds_not_current streams_ended=%d", ended)
            return ended
        self.current = True
        self.unavailable = ""
        self.liveness.restart_clocks(self.clock())
        stale = [node for node, _doc in self.store.items(LIVENESS)
                 if self._holder(node) == self.replica and node not in self.liveness.open]
        for node in stale:
            self._write_liveness(node, None)
        log.warning("event=hds_current stale_documents_removed=%d", len(stale))
        return 0

    # ---- the clocks -------------------------------------------------------------------------------

    def sweep(self, now: float) -> None:
        if not self.current or not self.store.current():
            # a stale view acts on nothing (asked each time: a replica thawed after a freeze runs its
            # sweep before follow_store has seen the store go); the clocks keep running
            return
        critical, remove = self.liveness.due(now)
        for iid in critical:
            if self._taken(iid):
                continue
            inst = self.registry.instance(iid)
            if inst is not None and inst.source == SOURCE:
                try:
                    self.registry.set_check(iid, Check(id=CHECK_ID, owner=OWNER, status=CheckStatus.critical, output="health stream lost"))
                except RegistryError as exc:
                    log.warning("event=hds_update_failed instance=%s reason=%s", iid, exc)
                    continue
                log.warning("event=hds_lost instance=%s action=critical ads_open=%s", iid, iid in self.liveness.ads)
        for iid in remove:
            if self._taken(iid):
                continue
            inst = self.registry.instance(iid)
            if inst is not None and inst.source == SOURCE:
                try:
                    self.registry.deregister(iid, SOURCE)
                except RegistryError as exc:
                    log.warning("event=hds_update_failed instance=%s reason=%s", iid, exc)
                    continue
                log.warning("event=hds_lost instance=%s action=removed", iid)

    def _taken(self, iid: str) -> bool:
        """Whether another replica holds the node by now (its document is in the store's view, its
        change not yet handed to ``on_change``)."""
        holder = self._holder(iid)
        if holder and holder != self.replica:
            self.liveness.held_elsewhere(iid)
            return True
        return False

    async def run_sweeps(self) -> None:
        lv = self.liveness
        period = max(0.05, min(1.0, lv.critical_after_s / 5, (lv.dead_after_s or 1e9) / 10))
        while True:
            await asyncio.sleep(period)
            self.sweep(self.clock())
