"""Services → what proxyless gRPC clients need beyond the shared clusters and endpoints.

A gRPC client with an ``xds:///<name>`` target asks LDS for a Listener named exactly ``<name>``
(gRFC A27). For every gRPC/HTTP2 service port and every name form a caller may use (the shared
model's list, port included) there is one such Listener holding an ApiListener whose HTTP
connection manager takes its routes over RDS and ends with the router filter; the fault filter in
front of it carries per-route fault injection (gRFC A33). Each service port has its own
RouteConfiguration with the same routes, weights and overrides sidecars get, plus deadlines in
``max_stream_duration`` (gRFC A31). When a routing overlay defines subsets, a last, unreachable
route names every cluster of the port: a gRPC client keeps a balancer for each cluster its routes
name and picks with the new routes before its balancers have caught up, so a route that switches
to a cluster the client was not already balancing fails calls ("unknown cluster selected for RPC",
see docs/proxyless.md). Pure: model in, protobuf out.
"""

from __future__ import annotations

from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm

from meshpilot.model import Service, ServicePort
from meshpilot.translate.clusters import ads_source, subset_cluster_name
from meshpilot.translate.names import cluster_name, host_forms
from meshpilot.translate.routes import FAULT_FILTER, ServiceRouting, build_service_routes
from meshpilot.xds.resource import pack

__all__ = ["PROTOCOLS", "build_api_listener", "build_proxyless_routes", "listener_names", "route_name"]

PROTOCOLS = ("grpc", "http2")  # ports a gRPC client can call


_pack = pack


def route_name(service: Service, port: ServicePort) -> str:
    return f"proxyless|{service.key}:{port.port}"


def listener_names(service: Service, port: ServicePort, domain: str, *, short: bool = True) -> list[str]:
    """Every target a client may dial for this port: ``xds:///<svc>:<port>`` and the other forms."""
    return host_forms(service, port, domain, short=short)


def build_api_listener(name: str, route_config: str) -> listener_pb2.Listener:
    manager = hcm.HttpConnectionManager(
        stat_prefix=name,
        rds=hcm.Rds(config_source=ads_source(), route_config_name=route_config),
        http_filters=[
            hcm.HttpFilter(name=FAULT_FILTER, typed_config=_pack(fault_pb2.HTTPFault())),
            hcm.HttpFilter(name="envoy.filters.http.router", typed_config=_pack(router_pb2.Router())),
        ],
    )
    return listener_pb2.Listener(name=name, api_listener=api_listener_pb2.ApiListener(api_listener=_pack(manager)))


def build_proxyless_routes(
    service: Service, port: ServicePort, domain: str, routing: ServiceRouting | None = None
) -> route_pb2.RouteConfiguration:
    """One virtual host matching any authority: the listener has already chosen the service."""
    cfg = route_pb2.RouteConfiguration(name=route_name(service, port))
    vh = cfg.virtual_hosts.add(name=f"{service.key}:{port.port}", domains=["*"])
    vh.routes.extend(build_service_routes(service, port, domain, routing, proxyless=True))
    if routing is not None and routing.subsets and routing.applies_to(port):
        keep = vh.routes.add(name="keep-clusters")  # after a catch-all: never matches
        keep.match.prefix = "/"
        names = [cluster_name(service, port, domain)] + [subset_cluster_name(service, port, s.name, domain) for s in routing.subsets]
        for name in names:
            keep.route.weighted_clusters.clusters.add(name=name).weight.value = 1
    return cfg
