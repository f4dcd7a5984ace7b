"""The ADS gRPC service (state-of-the-world and delta) on grpc.aio.

Each stream is a state machine from stream.py plus two tasks: a reader that feeds it requests and
a writer that sends what it returns. Cache changes only mark streams pending and wake their
writers, so a slow Envoy delays nobody but itself, and several changes queued behind a slow write
collapse into one push of the latest state. Responses are cached bytes written through an
identity serializer.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import json_format

from meshpilot import metrics
from meshpilot.translate.node import NodeInfo, node_info
from meshpilot.xds.cache import ResourceCache
from meshpilot.xds.stream import DeltaStream, SotwStream

__all__ = ["ADS_SERVICE", "XdsServer"]

log = logging.getLogger("meshpilot.xds")

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
_GATE_BYTES = 64 * 1024
_ANSWER_WAIT_S = 5.0


def _identity(b: bytes) -> bytes:
    return b


@dataclass(slots=True)
class StreamHandle:
    id: int
    machine: SotwStream | DeltaStream
    wake: asyncio.Event
    peer: str
    node: NodeInfo | None = None
    connected_at: float = field(default_factory=time.time)
    user_agent: str = ""
    awaiting_nonce: str = ""  # a whole-state response whose answer the writer waits for
    answered: asyncio.Event = field(default_factory=asyncio.Event)


class XdsServer:
    """ADS streams over one cache. ``on_node`` is called with a node's info before its first
    response (to build its own resources); ``on_node_gone`` when its last stream closes."""

    def __init__(
        self,
        cache: ResourceCache,
        on_node: Callable[[NodeInfo], None] = lambda n: None,
        on_node_gone: Callable[[NodeInfo], None] = lambda n: None,
        max_concurrent_writes: int = 64,
    ) -> None:
        self.cache = cache
        self.on_node = on_node
        self.on_node_gone = on_node_gone
        self.streams: dict[int, StreamHandle] = {}
        self._ids = itertools.count(1)
        self._node_streams: dict[str, int] = {}
        self._changes: dict[tuple[str, str], tuple[set[str], float]] = {}
        self._dispatch_scheduled = False
        self._writers = asyncio.Semaphore(max_concurrent_writes)
        cache.watch(self._on_change)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            ADS_SERVICE,
            {
                "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self._sotw,
                    request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
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
                    "user_agent": h.user_agent,
                    "connected_at": h.connected_at,
                    **h.machine.summary(),
                }
            )
        return out

    async def _sotw(self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest], context: grpc.aio.ServicerContext) -> None:
        await self._serve(SotwStream(self.cache), requests, context)

    async def _delta(self, requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest], context: grpc.aio.ServicerContext) -> None:
        await self._serve(DeltaStream(self.cache), requests, context)

    async def _serve(self, machine: SotwStream | DeltaStream, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
        handle = StreamHandle(next(self._ids), machine, asyncio.Event(), context.peer())
        self.streams[handle.id] = handle
        metrics.XDS_STREAMS.labels(machine.kind).inc()
        try:
            async with asyncio.TaskGroup() as tg:
                writer = tg.create_task(self._write(handle, context))
                try:
                    await self._read(handle, requests)
                finally:
                    writer.cancel()
        except* (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        except* StreamError as eg:
            for e in eg.exceptions:
                log.warning("event=stream_rejected stream=%s peer=%s reason=%s", handle.id, handle.peer, e)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
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

    async def _read(self, handle: StreamHandle, requests: AsyncIterator[Any]) -> None:
        async for req in requests:
            if handle.node is None:
                if not req.HasField("node") or not req.node.id:
                    raise StreamError("the first request of a stream must carry node.id")
                md = json_format.MessageToDict(req.node.metadata) if req.node.HasField("metadata") else {}
                handle.node = node_info(req.node.id, req.node.cluster, md, req.node.locality.zone)
                handle.user_agent = f"{req.node.user_agent_name} {req.node.user_agent_build_version.version.major_number}.{req.node.user_agent_build_version.version.minor_number}".strip()
                handle.machine.node_id = req.node.id
                self._node_streams[req.node.id] = self._node_streams.get(req.node.id, 0) + 1
                log.info("event=stream_open stream=%s kind=%s node=%s peer=%s", handle.id, handle.machine.kind, req.node.id, handle.peer)
                self.on_node(handle.node)
            nacks = handle.machine.nacks
            if log.isEnabledFor(logging.DEBUG):
                log.debug("event=request stream=%s %s", handle.id, _describe(req))
            handle.machine.receive(req)
            if handle.awaiting_nonce and req.response_nonce == handle.awaiting_nonce:
                handle.answered.set()
            if handle.machine.nacks != nacks and handle.machine.last_nack:
                n = handle.machine.last_nack
                metrics.XDS_NACKS.labels(n.type_url.rsplit(".", 1)[-1]).inc()
                log.warning("event=nack node=%s type=%s error=%r", handle.node.id, n.type_url, n.message[:500])
            if handle.machine.pending:
                handle.wake.set()

    async def _write(self, handle: StreamHandle, context: grpc.aio.ServicerContext) -> None:
        while True:
            await handle.wake.wait()
            # A bounded number of streams build and write at once, and responses live only inside
            # _push: an idle stream keeps nothing of its last push alive until the next one.
            async with self._writers:
                handle.wake.clear()
                gate = await self._push(handle, context)
                if gate:
                    # grpc takes a write before the client has read it. A whole-state response
                    # (an initial sync, a resync) can be large, so the slot is held until the
                    # client answers it: a thousand clients syncing at once have at most as many
                    # snapshots in flight as there are slots. Incremental pushes never wait.
                    try:
                        async with asyncio.timeout(_ANSWER_WAIT_S):
                            await handle.answered.wait()
                    except TimeoutError:
                        pass
                    handle.awaiting_nonce = ""
            for seconds in handle.machine.latencies:
                metrics.XDS_PUSH_SECONDS.observe(max(0.0, seconds))
            handle.machine.latencies.clear()

    async def _push(self, handle: StreamHandle, context: grpc.aio.ServicerContext) -> bool:
        """Write what the stream owes; True when the client's answer should be awaited."""
        out = handle.machine.responses()
        gate = handle.machine.full_bytes >= _GATE_BYTES
        if gate:  # set before writing: the answer may arrive while the last write completes
            handle.awaiting_nonce = str(handle.machine.nonce_counter)
            handle.answered.clear()
        for type_url, payload in out:
            await context.write(payload)
            metrics.XDS_PUSHES.labels(type_url.rsplit(".", 1)[-1], handle.machine.kind).inc()
        return gate


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
    pass
