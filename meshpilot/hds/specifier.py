"""The HealthCheckSpecifier a sidecar's Envoy is sent: check your own app, this way, this often.

An HTTP check goes through the node's inbound listener and carries ``x-mesh-health-check`` with
the node's health token (an HMAC of its id under a key the control plane draws at start), which
the node's inbound routes match to skip the governance filters: a rate limit must never fail the
check that keeps the instance in EDS. Only the node's own streams are sent the token, but the xDS/HDS port
does not authenticate its clients yet: whoever can open a stream there under the node's id gets it too.
"""

from __future__ import annotations

import hashlib
import hmac

from envoy.config.core.v3 import address_pb2, base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2
from envoy.service.health.v3 import hds_pb2
from google.protobuf import duration_pb2

from meshpilot.hds.metadata import Registration
from meshpilot.translate.listeners import HEALTH_HEADER

__all__ = ["build_specifier", "health_token"]


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(round(seconds * 1e9)))
    return d


def health_token(key: bytes, node_id: str) -> str:
    """The token a node's own health checks carry: stable for the node under one key, unguessable
    without the key."""
    return hmac.new(key, node_id.encode(), hashlib.sha256).hexdigest()[:32]


def build_specifier(reg: Registration, report_interval_s: float, token: str = "") -> hds_pb2.HealthCheckSpecifier:
    """Tell the node's Envoy to check its own app; every interval is explicit (HDS clusters carry
    no traffic, so Envoy would otherwise probe at the 60 s no_traffic_interval). An HTTP check
    carries ``token`` in ``x-mesh-health-check``, which the node's inbound routes exempt from
    governance."""
    p = reg.plan
    hc = health_check_pb2.HealthCheck(
        timeout=_duration(p.timeout_s),
        interval=_duration(p.interval_s),
        no_traffic_interval=_duration(p.interval_s),
        no_traffic_healthy_interval=_duration(p.interval_s),
        unhealthy_interval=_duration(p.interval_s),
        healthy_edge_interval=_duration(p.interval_s),
        unhealthy_edge_interval=_duration(p.interval_s),
    )
    hc.healthy_threshold.value = p.healthy_threshold
    hc.unhealthy_threshold.value = p.unhealthy_threshold
    if p.kind == "http":
        hc.http_health_check.path = p.path
        hc.http_health_check.host = p.host
        if token:
            hc.http_health_check.request_headers_to_add.append(base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=HEALTH_HEADER, value=token),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            ))
    else:
        hc.tcp_health_check.SetInParent()
    spec = hds_pb2.HealthCheckSpecifier(interval=_duration(report_interval_s))
    chc = spec.cluster_health_checks.add(cluster_name=reg.cluster)
    chc.health_checks.append(hc)
    loc = chc.locality_endpoints.add()
    if reg.instance.zone:
        loc.locality.CopyFrom(base_pb2.Locality(zone=reg.instance.zone))
    loc.endpoints.append(
        endpoint_components_pb2.Endpoint(
            address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address=p.address, port_value=p.port))
        )
    )
    return spec
