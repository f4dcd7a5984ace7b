"""Per-node Listeners (LDS): the outbound listener apps call through, the inbound one in front of the app.

The outbound listener routes HTTP by Host/authority with the shared ``outbound`` route configuration
(RDS) and stamps ``x-mesh-caller`` with the node's own service, overwriting what the app sent. The
inbound listener forwards everything to the node's app on loopback. Extra HTTP filters (the WASM
governance filters, delivered over ECDS) are passed in by the caller and run before the router.
"""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from google.protobuf import any_pb2
from google.protobuf.message import Message

from meshpilot.translate.clusters import ads_source
from meshpilot.translate.names import OUTBOUND_ROUTE, inbound_cluster_name
from meshpilot.translate.node import NodeInfo

__all__ = ["CALLER_HEADER", "INBOUND", "OUTBOUND", "build_inbound_listener", "build_outbound_listener", "pack"]

CALLER_HEADER = "x-mesh-caller"
OUTBOUND = "outbound"
INBOUND = "inbound"


def pack(msg: Message) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def _router() -> hcm.HttpFilter:
    return hcm.HttpFilter(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router()))


def _address(host: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=port))


def _listener(name: str, host: str, port: int, manager: hcm.HttpConnectionManager) -> listener_pb2.Listener:
    return listener_pb2.Listener(
        name=name,
        address=_address(host, port),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[listener_components_pb2.Filter(name="envoy.filters.network.http_connection_manager", typed_config=pack(manager))]
            )
        ],
    )


def build_outbound_listener(node: NodeInfo, extra_filters: Sequence[hcm.HttpFilter] = ()) -> listener_pb2.Listener:
    filters: list[hcm.HttpFilter] = []
    if node.service:
        stamp = header_mutation_pb2.HeaderMutation(
            mutations=header_mutation_pb2.Mutations(
                request_mutations=[
                    mutation_rules_pb2.HeaderMutation(
                        append=base_pb2.HeaderValueOption(
                            header=base_pb2.HeaderValue(key=CALLER_HEADER, value=node.service),
                            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                        )
                    )
                ]
            )
        )
        filters.append(hcm.HttpFilter(name="mesh.caller", typed_config=pack(stamp)))
    filters.extend(extra_filters)
    filters.append(_router())
    manager = hcm.HttpConnectionManager(
        stat_prefix="outbound",
        codec_type=hcm.HttpConnectionManager.AUTO,
        rds=hcm.Rds(config_source=ads_source(), route_config_name=OUTBOUND_ROUTE),
        http_filters=filters,
    )
    listener = _listener(OUTBOUND, node.bind_address, node.outbound_port, manager)
    listener.traffic_direction = base_pb2.OUTBOUND
    return listener


def build_inbound_listener(node: NodeInfo, extra_filters: Sequence[hcm.HttpFilter] = ()) -> listener_pb2.Listener:
    cluster = inbound_cluster_name(node.app_port)
    route = route_pb2.RouteConfiguration(name="inbound")
    vh = route.virtual_hosts.add(name="inbound", domains=["*"])
    r = vh.routes.add(name="inbound")
    r.match.prefix = "/"
    r.route.CopyFrom(rc.RouteAction(cluster=cluster))
    r.route.timeout.SetInParent()  # 0: the caller's sidecar owns the timeout
    manager = hcm.HttpConnectionManager(
        stat_prefix="inbound",
        codec_type=hcm.HttpConnectionManager.AUTO,
        route_config=route,
        http_filters=[*extra_filters, _router()],
    )
    listener = _listener(INBOUND, node.bind_address, node.inbound_port, manager)
    listener.traffic_direction = base_pb2.INBOUND  # drained first on graceful offline
    return listener
