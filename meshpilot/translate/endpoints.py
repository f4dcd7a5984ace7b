"""Instances → ClusterLoadAssignments (EDS), one per service port.

Only routable instances are listed (healthy at least once, not critical now): Envoy would still
send traffic to hosts marked unhealthy when a cluster is in panic mode. Instances are grouped by
zone into localities, each weighted by the sum of its endpoints' weights (proxyless gRPC clients
require locality weights).
"""

from __future__ import annotations

from collections import defaultdict

from envoy.config.core.v3 import address_pb2, base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from google.protobuf import struct_pb2

from meshpilot.model import Instance, Service, ServicePort
from meshpilot.translate.names import cluster_name

__all__ = ["build_endpoints"]


def build_endpoints(
    service: Service, port: ServicePort, instances: list[Instance], domain: str
) -> endpoint_pb2.ClusterLoadAssignment:
    by_zone: dict[str, list[Instance]] = defaultdict(list)
    for inst in instances:
        if inst.routable and port.name in inst.ports:
            by_zone[inst.zone].append(inst)
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=cluster_name(service, port, domain))
    for zone in sorted(by_zone):
        members = sorted(by_zone[zone], key=lambda i: i.id)
        loc = cla.endpoints.add()
        if zone:
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
    return cla


