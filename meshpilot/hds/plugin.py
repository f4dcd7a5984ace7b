"""HDS as a part of the control plane: the gRPC service on the xDS port, the liveness sweeps, the
ADS watch that tells a dead sidecar from a reconnecting one, and the graceful-offline sync route."""

from __future__ import annotations

from typing import Any

import grpc

from meshpilot import metrics
from meshpilot.hds.server import HdsServer, log
from meshpilot.hds.stream import Refused
from meshpilot.hds.synced import synced_route
from meshpilot.parts import Core, Part, Task
from meshpilot.pki import peer_from_context
from meshpilot.pki.admission import refusal
from meshpilot.xds.resource import NodeInfo

__all__ = ["install"]


def install(core: Core) -> Part:
    s = core.settings

    def admit(context: grpc.aio.ServicerContext[Any, Any], node: NodeInfo) -> str:
        """With identity on: a sidecar registers and reports only its own node's instance of its own service."""
        peer = peer_from_context(context)
        no = refusal(peer, s.trust_domain, node.id, node.service, node.namespace)
        if no is not None:
            metrics.XDS_REFUSED.labels("denied" if no.authenticated else "unauthenticated").inc()
            log.warning("event=hds_refused node=%s peer=%s identity=%s reason=%s", node.id, context.peer(),
                        peer.spiffe if peer else "-", no.reason)
            raise Refused(no.reason, no.authenticated)
        assert peer is not None
        return peer.spiffe

    server = HdsServer(core.registry, s.hds_interval_s, s.hds_critical_after_s, s.hds_remove_after_s, s.hds_dead_after_s,
                       token=core.health_token, admit=admit if s.identity else None)
    core.registry.subscribe(server.on_change)

    def on_node(node: NodeInfo, connected: bool) -> None:
        server.on_node(node.id, connected)

    return Part(
        grpc_handlers=[server.handler()],
        routes=[synced_route(core.registry, core.xds, core.publishing, s.domain)],
        tasks=[Task("hds_sweeps", server.run_sweeps)],
        node_watchers=[on_node],
    )
