"""Envoy bootstrap for a meshpilot sidecar: node identity, ADS to the control plane, admin on loopback.

Everything else (listeners, clusters, routes, endpoints) arrives over ADS. The node metadata keys
(``META`` in xds/resource.py) are read back by the control plane to build the node's own listeners.
Pure: options in, a JSON-serialisable dict out.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Literal

from meshpilot.xds.resource import META

__all__ = ["BootstrapOptions", "build_bootstrap"]


@dataclass(frozen=True, slots=True)
class BootstrapOptions:
    node_id: str
    service: str = ""
    namespace: str = "default"
    zone: str = ""
    control_plane_host: str = "127.0.0.1"
    control_plane_port: int = 15010
    api_type: Literal["GRPC", "DELTA_GRPC"] = "DELTA_GRPC"
    admin_address: str = "127.0.0.1"
    admin_port: int = 15000
    outbound_port: int = 15001
    inbound_port: int = 15006
    app_port: int = 0
    app_address: str = "127.0.0.1"
    bind_address: str = "127.0.0.1"
    capture: bool = False
    retry_max_s: float = 1.0  # ADS reconnect back-off cap (Envoy's default is 30 s)
    local_cluster: str = ""  # EDS name of the node's own service port, for zone-aware routing
    service_port: int = 0  # the node's own service port: with a zone, names the local cluster
    domain: str = "mesh"
    hds: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)


def _socket(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def build_bootstrap(o: BootstrapOptions) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        META.NAMESPACE: o.namespace,
        META.OUTBOUND_PORT: o.outbound_port,
        META.INBOUND_PORT: o.inbound_port if o.app_port else 0,
        META.APP_PORT: o.app_port,
        META.APP_ADDRESS: o.app_address,
        META.BIND_ADDRESS: o.bind_address,
        META.CAPTURE: o.capture,
        **o.metadata,
    }
    if o.service:
        metadata[META.SERVICE] = o.service
    node: dict[str, Any] = {"id": o.node_id, "cluster": o.service or o.node_id, "metadata": metadata}
    if o.zone:
        node["locality"] = {"zone": o.zone}
    try:
        ipaddress.ip_address(o.control_plane_host)
        cp_type = "STATIC"
    except ValueError:
        cp_type = "STRICT_DNS"
    grpc_service = {
        "envoy_grpc": {
            "cluster_name": "meshpilot-xds",
            "retry_policy": {"retry_back_off": {"base_interval": "0.1s", "max_interval": f"{o.retry_max_s}s"}},
        }
    }
    clusters: list[dict[str, Any]] = [
        {
            "name": "meshpilot-xds",
            "type": cp_type,
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {
                        "http2_protocol_options": {
                            "connection_keepalive": {"interval": "10s", "timeout": "5s"},
                        }
                    },
                }
            },
            "load_assignment": {
                "cluster_name": "meshpilot-xds",
                "endpoints": [
                    {"lb_endpoints": [{"endpoint": {"address": _socket(o.control_plane_host, o.control_plane_port)}}]}
                ],
            },
        }
    ]
    bootstrap: dict[str, Any] = {
        "node": node,
        "admin": {"address": _socket(o.admin_address, o.admin_port)},
        "dynamic_resources": {
            "ads_config": {
                "api_type": o.api_type,
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [grpc_service],
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": clusters},
        # every stat of a sidecar carries its own service: with the cluster (destination) name,
        # request counts, status codes and latency are labelled by source and destination
        "stats_config": {"stats_tags": [{"tag_name": "source_service", "fixed_value": f"{o.service}.{o.namespace}" if o.service else o.node_id}]},
        "layered_runtime": {
            "layers": [
                {"name": "static", "static_layer": {"overload.global_downstream_max_connections": 50000}},
                {"name": "admin", "admin_layer": {}},
            ]
        },
    }
    local_cluster = o.local_cluster
    if not local_cluster and o.zone and o.service and o.service_port:
        local_cluster = f"outbound|{o.service_port}||{o.service}.{o.namespace}.svc.{o.domain}"
    if local_cluster and o.zone:
        # zone-aware routing compares upstream zones against the node's own service's members
        clusters.append(
            {
                "name": "meshpilot-local",
                "type": "EDS",
                "connect_timeout": "1s",
                "eds_cluster_config": {
                    "service_name": local_cluster,
                    "eds_config": {"ads": {}, "resource_api_version": "V3"},
                },
            }
        )
        bootstrap["cluster_manager"] = {"local_cluster_name": "meshpilot-local"}
    if o.hds:
        bootstrap["hds_config"] = {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "set_node_on_first_message_only": True,
            "grpc_services": [grpc_service],
        }
    return bootstrap
