"""Instances → ClusterLoadAssignments (EDS), one per service port.

Only routable instances are listed (healthy at least once, not critical now): Envoy would still
send traffic to hosts marked unhealthy when a cluster is in panic mode. Instances are grouped by
zone into localities, each weighted by the sum of its endpoints' weights and always carrying the
locality field (proxyless gRPC clients require both). A subset's assignment (``subset`` with its name and label selector)
lists only the instances whose labels match the selector, under the subset's cluster name. An
instance registered by a sidecar with an identity (``metadata["spiffe"]``) is marked for its
callers' TLS socket match (``envoy.transport_socket_match: {tls: mesh}``, tls.py).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

from envoy.config.core.v3 import address_pb2, base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from google.protobuf import struct_pb2

from meshpilot.model import Instance, Service, ServicePort
from meshpilot.translate.clusters import subset_cluster_name
from meshpilot.translate.names import cluster_name
from meshpilot.translate.tls import mark_tls_endpoint

__all__ = ["build_endpoints"]


def build_endpoints(
    service: Service,
    port: ServicePort,
    instances: list[Instance],
    domain: str,
    subset: tuple[str, Mapping[str, str]] | None = None,
) -> endpoint_pb2.ClusterLoadAssignment:
    """The assignment of a service port, or of the subset ``(name, labels)`` of it."""
    by_zone: dict[str, list[Instance]] = defaultdict(list)
    selector = subset[1] if subset else {}
    for inst in instances:
        if inst.routable and port.name in inst.ports and all(inst.labels.get(k) == v for k, v in selector.items()):
            by_zone[inst.zone].append(inst)
    name = subset_cluster_name(service, port, subset[0], domain) if subset else cluster_name(service, port, domain)
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    for zone in sorted(by_zone):
        members = sorted(by_zone[zone], key=lambda i: i.id)
        loc = cla.endpoints.add()
        # gRPC clients reject a locality entry without the field, even an empty one
        loc.locality.CopyFrom(base_pb2.Locality(zone=zone))
        loc.load_balancing_weight.value = sum(i.weight for i in members)
        loc.priority = 0
        for inst in members:
            ep = loc.lb_endpoints.add()
            ep.endpoint.address.CopyFrom(
                address_pb2.Address(
                    socket_address=address_pb2.SocketAddress(address=inst.address, port_value=inst.ports[port.name])
                )
            )
            ep.health_status = health_check_pb2.HEALTHY
            ep.load_balancing_weight.value = inst.weight
            md = struct_pb2.Struct()
            md.update({"instance": inst.id, **({"version": inst.labels["version"]} if "version" in inst.labels else {})})
            ep.metadata.filter_metadata["meshpilot"].CopyFrom(md)
            if inst.metadata.get("spiffe"):
                mark_tls_endpoint(ep.metadata)
    return cla


