"""The HDS gRPC service: moves messages between a sidecar's Envoy and the stream machine
(stream.py), carries its effects to the wire and the registry, and sweeps the instances of lost
streams (liveness.py).

A node whose HDS stream is lost goes critical after ``hds_critical_after_s`` (longer than Envoy's
30 s HDS reconnect back-off), or after ``hds_dead_after_s`` once the node's ADS stream has been
closed as long too (a dead sidecar: outlier detection ejects it for 30 s, and it must leave EDS
before that ends), and is deregistered after ``hds_remove_after_s``. With identity on, a stream
ends when its client certificate expires; the sidecar reconnects with its renewed one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from envoy.service.health.v3 import hds_pb2

from meshpilot.hds.liveness import Liveness
from meshpilot.hds.metadata import CHECK_ID, OWNER, SOURCE
from meshpilot.hds.stream import HdsStream, Register, Reject, Send, SetCheck
from meshpilot.model import Check, CheckStatus
from meshpilot.pki import peer_from_context
from meshpilot.registry import Change, Registry, RegistryError
from meshpilot.xds.resource import NodeInfo

__all__ = ["HDS_SERVICE", "HdsServer"]

log = logging.getLogger("meshpilot.hds")

HDS_SERVICE = "envoy.service.health.v3.HealthDiscoveryService"


class HdsServer:
    """The gRPC side of HDS over one registry. ``token(node_id)`` is a node's health token;
    ``admit(context, node)`` (when clients authenticate) returns the client's SPIFFE id or raises
    stream.Refused."""

    def __init__(
        self,
        registry: Registry,
        report_interval_s: float,
        critical_after_s: float,
        remove_after_s: float,
        dead_after_s: float = 0.0,
        token: Callable[[str], str] = lambda node_id: "",
        admit: Callable[[grpc.aio.ServicerContext[Any, Any], NodeInfo], str] | None = None,
    ) -> None:
        self.registry = registry
        self.admit = admit
        self.report_interval_s = report_interval_s
        self.token = token
        self.liveness = Liveness(critical_after_s, remove_after_s, dead_after_s)
        now = time.monotonic()
        # instances registered before a restart must reconnect within the same bounds
        for inst in registry.instances():
            if inst.source == SOURCE:
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
        admit = self.admit
        stream = HdsStream(self.report_interval_s, self.token, None if admit is None else lambda node: admit(context, node))
        iid = ""
        expires: float | None = None
        if admit is not None and (peer := peer_from_context(context)) is not None:
            # the stream ends with its certificate; the sidecar reconnects with its renewed one
            expires = asyncio.get_running_loop().time() + (peer.not_after - time.time())
        try:
            async with asyncio.timeout_at(expires):
                async for msg in requests:
                    for effect in stream.receive(msg, time.monotonic(), self.registry.instance):
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
                            self.liveness.opened(iid)
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
        finally:
            if iid:
                self.liveness.closed(iid, time.monotonic())
                log.info("event=hds_closed instance=%s", iid)

    def on_change(self, change: Change) -> None:
        if change.kind == "instance" and change.op == "delete":
            self.liveness.forget(change.key)

    def on_node(self, node_id: str, connected: bool) -> None:
        """One of a node's ADS streams opened, or its last one closed."""
        self.liveness.ads_changed(node_id, connected, time.monotonic())

    def sweep(self, now: float) -> None:
        critical, remove = self.liveness.due(now)
        for iid in critical:
            inst = self.registry.instance(iid)
            if inst is not None and inst.source == SOURCE:
                self.registry.set_check(iid, Check(id=CHECK_ID, owner=OWNER, status=CheckStatus.critical, output="health stream lost"))
                log.warning("event=hds_lost instance=%s action=critical ads_open=%s", iid, iid in self.liveness.ads)
        for iid in remove:
            inst = self.registry.instance(iid)
            if inst is not None and inst.source == SOURCE:
                self.registry.deregister(iid, SOURCE)
                log.warning("event=hds_lost instance=%s action=removed", iid)

    async def run_sweeps(self) -> None:
        lv = self.liveness
        period = max(0.05, min(1.0, lv.critical_after_s / 5, (lv.dead_after_s or 1e9) / 10))
        while True:
            await asyncio.sleep(period)
            self.sweep(time.monotonic())
