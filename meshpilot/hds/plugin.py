"""HDS as a part of the control plane: the gRPC service on the xDS port, the liveness sweeps, the
ADS watch that tells a dead sidecar from a reconnecting one, the graceful-offline sync route, and
(on a shared store) the watch of the store's currency that hands this replica's HDS streams over
while it is cut off (server.py says how replicas share the liveness of sidecars).
With identity on, a sidecar registers only its own node's instance of its certificate's service, at
the address it connects from (pki/admission.py and ``admit`` below)."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import grpc

from meshpilot import metrics
from meshpilot.hds.server import HdsServer, log
from meshpilot.hds.stream import Refused
from meshpilot.hds.synced import synced_route
from meshpilot.parts import Core, Part, Task
from meshpilot.pki import peer_from_context
from meshpilot.pki.admission import Refusal, refusal
from meshpilot.xds.resource import NodeInfo

__all__ = ["install"]


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def _peer_ip(peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address in a grpc peer string (``ipv4:10.0.0.5:4321``, ``ipv6:[::1]:4321``); None for others."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    ip = _ip(rest.rsplit(":", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def install(core: Core) -> Part:
    s = core.settings

    def admit(context: grpc.aio.ServicerContext[Any, Any], node: NodeInfo) -> str:
        """With identity on: a sidecar registers and reports only its own node's instance of its own service."""
        peer = peer_from_context(context)
        no = refusal(peer, s.trust_domain, node.id, node.service, node.namespace)
        if no is None and (standing := core.caller_refusal(context)) is not None:
            no = Refusal(standing[0] != grpc.StatusCode.UNAUTHENTICATED, standing[1])
        if no is not None:
            metrics.XDS_REFUSED.labels("denied" if no.authenticated else "unauthenticated").inc()
            log.warning("event=hds_refused node=%s peer=%s identity=%s reason=%s", node.id, context.peer(),
                        peer.spiffe if peer else "-", no.reason)
            raise Refused(no.reason, no.authenticated)
        assert peer is not None
        where = _peer_ip(context.peer())
        if node.address and where is not None and _ip(node.address) != where:
            # the address callers will be sent to (and trust as this service's sidecar) must be the node's own
            reason = f"node {node.id!r} registers address {node.address}, but connects from {where}"
            metrics.XDS_REFUSED.labels("denied").inc()
            log.warning("event=hds_refused node=%s peer=%s identity=%s reason=%s", node.id, context.peer(), peer.spiffe, reason)
            raise Refused(reason, True)
        return peer.spiffe

    replica = core.replica_id
    server = HdsServer(core.registry, s.hds_interval_s, s.hds_critical_after_s, s.hds_remove_after_s, s.hds_dead_after_s,
                       token=core.health_token, admit=admit if s.identity else None, replica=replica)
    core.registry.subscribe(server.on_change)
    store = core.registry.store
    if store.shared:
        log.info("event=hds_replica replica=%s", replica)

    async def follow_store() -> None:
        while True:
            server.follow_store(store.current())
            await asyncio.sleep(1.0)

    def on_node(node: NodeInfo, connected: bool) -> None:
        server.on_node(node.id, connected)

    return Part(
        grpc_handlers=[server.handler()],
        routes=[synced_route(core.registry, core.xds, core.publishing, s.domain, core.replica_id)],
        tasks=[Task("hds_sweeps", server.run_sweeps), *([Task("hds_follow_store", follow_store)] if store.shared else [])],
        node_watchers=[on_node],
    )
