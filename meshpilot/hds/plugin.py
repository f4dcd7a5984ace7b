"""HDS as a part of the control plane: the gRPC service on the xDS port, the liveness sweeps, the
ADS watch that tells a dead sidecar from a reconnecting one, and the graceful-offline sync route."""

from __future__ import annotations

from meshpilot.hds.server import HdsServer
from meshpilot.hds.synced import synced_route
from meshpilot.parts import Core, Part, Task
from meshpilot.xds.resource import NodeInfo

__all__ = ["install"]


def install(core: Core) -> Part:
    s = core.settings
    server = HdsServer(core.registry, s.hds_interval_s, s.hds_critical_after_s, s.hds_remove_after_s, s.hds_dead_after_s,
                       token=core.health_token)
    core.registry.subscribe(server.on_change)

    def on_node(node: NodeInfo, connected: bool) -> None:
        server.on_node(node.id, connected)

    return Part(
        grpc_handlers=[server.handler()],
        routes=[synced_route(core.registry, core.xds, core.publishing, s.domain)],
        tasks=[Task("hds_sweeps", server.run_sweeps)],
        node_watchers=[on_node],
    )
