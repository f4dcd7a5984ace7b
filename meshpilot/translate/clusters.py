"""Services → Envoy Clusters (CDS): one EDS cluster per service port, plus a node's inbound cluster.

A routing policy may split a service into subsets of its instances (by label, e.g. version v1/v2);
each subset of each port is a cluster of its own, ``outbound|<port>|<subset>|<fqdn>``, with the
same traffic settings and its own EDS (endpoints.py lists only the instances the subset selects).

With identities on (``TlsSettings``, tls.py) a cluster of a service in PERMISSIVE mode talks mutual
TLS to the endpoints of sidecars with an identity (a transport socket match on the endpoint
metadata endpoints.py writes) and plaintext to the rest (SDK apps without a sidecar). A cluster of
a STRICT service talks mutual TLS to every endpoint (TLS is its default transport socket, there is
no plaintext one): an instance registered without a sidecar cannot be called in the clear.
"""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.config.core.v3 import extension_pb2
from envoy.extensions.load_balancing_policies.least_request.v3 import least_request_pb2
from envoy.extensions.load_balancing_policies.random.v3 import random_pb2
from envoy.extensions.load_balancing_policies.round_robin.v3 import round_robin_pb2
from envoy.extensions.load_balancing_policies.wrr_locality.v3 import wrr_locality_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2
from google.protobuf.message import Message

from meshpilot.model import Service, ServicePort
from meshpilot.translate.names import cluster_name, fqdn, inbound_cluster_name
from meshpilot.translate.tls import DISABLE, STRICT, TlsSettings, mesh_socket_matches, tls_socket, upstream_tls
from meshpilot.xds.resource import NodeInfo, pack

__all__ = ["ads_source", "build_cluster", "build_clusters", "build_inbound_cluster", "duration_ms", "subset_cluster_name"]

_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def duration_ms(ms: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def ads_source() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
    )


def _http2_options() -> any_pb2.Any:
    opts = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
        )
    )
    return pack(opts)


def _typed(name: str, msg: Message) -> cluster_pb2.LoadBalancingPolicy.Policy:
    packed = pack(msg)
    return cluster_pb2.LoadBalancingPolicy.Policy(
        typed_extension_config=extension_pb2.TypedExtensionConfig(name=name, typed_config=packed)
    )


def _set_lb(c: cluster_pb2.Cluster, policy: str, zone_aware: bool) -> None:
    """Round robin as the classic enum, which Envoy and gRPC clients both read. Least-request and
    random, which gRPC's C-core clients do not implement, as a ``load_balancing_policy`` list:
    each reader takes the first policy it supports, so Envoy uses the intended one and gRPC
    clients fall back to locality-weighted round robin instead of rejecting the cluster."""
    if policy == "round_robin":
        c.lb_policy = cluster_pb2.Cluster.ROUND_ROBIN
        if zone_aware:
            c.common_lb_config.zone_aware_lb_config.min_cluster_size.value = 1
        return
    chosen: least_request_pb2.LeastRequest | random_pb2.Random
    chosen = least_request_pb2.LeastRequest() if policy == "least_request" else random_pb2.Random()
    if zone_aware:
        chosen.locality_lb_config.zone_aware_lb_config.min_cluster_size.value = 1
    fallback = wrr_locality_pb2.WrrLocality(
        endpoint_picking_policy=cluster_pb2.LoadBalancingPolicy(
            policies=[_typed("envoy.load_balancing_policies.round_robin", round_robin_pb2.RoundRobin())]
        )
    )
    c.load_balancing_policy.policies.extend(
        [_typed(f"envoy.load_balancing_policies.{policy}", chosen), _typed("envoy.load_balancing_policies.wrr_locality", fallback)]
    )


def subset_cluster_name(service: Service, port: ServicePort, subset: str, domain: str) -> str:
    """Istio-style name of a subset's cluster, also its EDS service name."""
    return f"outbound|{port.port}|{subset}|{fqdn(service, domain)}"


def build_cluster(
    service: Service, port: ServicePort, domain: str, subset: str = "", tls: TlsSettings | None = None
) -> cluster_pb2.Cluster:
    """The EDS cluster of a service port, or of one subset of it when ``subset`` is given; with
    ``tls`` (identities on) mutual TLS: in PERMISSIVE mode to sidecars with an identity, in STRICT
    mode to every endpoint."""
    t = service.traffic
    name = subset_cluster_name(service, port, subset, domain) if subset else cluster_name(service, port, domain)
    c = cluster_pb2.Cluster(
        name=name,
        # stats keep the whole name: Envoy's tag extraction splits cluster names at dots
        alt_stat_name=name.replace(".", "_"),
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads_source(), service_name=name),
        connect_timeout=duration_ms(t.connect_timeout_ms),
        outlier_detection=outlier_detection_pb2.OutlierDetection(
            consecutive_5xx=wrappers_pb2.UInt32Value(value=t.outlier.consecutive_5xx),
            consecutive_gateway_failure=wrappers_pb2.UInt32Value(value=t.outlier.consecutive_gateway_failure),
            enforcing_consecutive_gateway_failure=wrappers_pb2.UInt32Value(value=100),
            interval=duration_ms(t.outlier.interval_ms),
            base_ejection_time=duration_ms(t.outlier.base_ejection_time_ms),
            max_ejection_percent=wrappers_pb2.UInt32Value(value=t.outlier.max_ejection_percent),
            # Envoy's defaults, spelled out: grpc-js 1.14 reads unset ones as undefined and its
            # success-rate check then throws (killing the client) in an interval with little traffic
            enforcing_success_rate=wrappers_pb2.UInt32Value(value=100),
            success_rate_minimum_hosts=wrappers_pb2.UInt32Value(value=5),
            success_rate_request_volume=wrappers_pb2.UInt32Value(value=100),
            success_rate_stdev_factor=wrappers_pb2.UInt32Value(value=1900),
        ),
    )
    # host-set changes apply at once; no 1 s merge window between EDS updates
    c.common_lb_config.update_merge_window.CopyFrom(duration_pb2.Duration())
    _set_lb(c, t.lb_policy, t.zone_aware)
    if port.protocol in ("http2", "grpc"):
        c.typed_extension_protocol_options[_HTTP_OPTIONS].CopyFrom(_http2_options())
    mode = tls.mode(service.key) if tls is not None else DISABLE
    if tls is not None and mode == STRICT:
        # every endpoint, marked or not: an instance registered at its own address (API, Consul)
        # must not get the request in the clear with no server authentication
        c.transport_socket.CopyFrom(tls_socket(upstream_tls(tls.service_id(service.namespace, service.name))))
    elif tls is not None and mode != DISABLE:
        c.transport_socket_matches.extend(mesh_socket_matches(tls.service_id(service.namespace, service.name)))
    return c


def build_clusters(services: list[Service], domain: str, tls: TlsSettings | None = None) -> list[cluster_pb2.Cluster]:
    return [build_cluster(s, p, domain, tls=tls) for s in services for p in s.ports]


def build_inbound_cluster(node: NodeInfo, protocol: str = "http") -> cluster_pb2.Cluster:
    """The cluster the inbound listener forwards to: the node's own app on loopback."""
    c = cluster_pb2.Cluster(
        name=inbound_cluster_name(node.app_port),
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=duration_ms(1000),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=inbound_cluster_name(node.app_port),
            endpoints=[
                endpoint_components_pb2.LocalityLbEndpoints(
                    lb_endpoints=[
                        endpoint_components_pb2.LbEndpoint(
                            endpoint=endpoint_components_pb2.Endpoint(
                                address=address_pb2.Address(
                                    socket_address=address_pb2.SocketAddress(
                                        address=node.app_address, port_value=node.app_port
                                    )
                                )
                            )
                        )
                    ]
                )
            ],
        ),
    )
    if protocol in ("http2", "grpc"):
        c.typed_extension_protocol_options[_HTTP_OPTIONS].CopyFrom(_http2_options())
    return c
