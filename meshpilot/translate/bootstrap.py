"""Envoy bootstrap for a meshpilot sidecar: node identity, ADS to the control plane, admin on loopback.

Everything else (listeners, clusters, routes, endpoints) arrives over ADS. The node metadata keys
(``META`` in xds/resource.py) are read back by the control plane to build the node's own listeners.
With ``identity`` on, the agent serves the node's certificate over SDS on a unix socket: a static
cluster ``meshpilot-sds`` reaches it, and ``meshpilot-xds`` (ADS and HDS) talks TLS with the SDS
secrets ``default`` (client certificate) and ``ROOTCA`` (trust bundle), accepting only the control
plane's SPIFFE id. No file path of a certificate or key ever appears here.
Pure: options in, a JSON-serialisable dict out.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Literal

from meshpilot.pki import control_plane_id
from meshpilot.xds.resource import META

__all__ = ["SDS_CLUSTER", "BootstrapOptions", "build_bootstrap", "sds_config"]

SDS_CLUSTER = "meshpilot-sds"


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
    identity: bool = False  # the agent serves SDS on sds_socket; ADS and HDS go over TLS
    sds_socket: str = ""
    trust_domain: str = "mesh.local"
    tls_server_name: str = ""  # SNI towards the control plane ("" sends none)


def _socket(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _http2_options() -> dict[str, Any]:
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {
                "http2_protocol_options": {
                    "connection_keepalive": {"interval": "10s", "timeout": "5s"},
                }
            },
        }
    }


def sds_config() -> dict[str, Any]:
    """The ConfigSource of every SDS secret a sidecar uses: the agent, over ``meshpilot-sds``."""
    return {
        "resource_api_version": "V3",
        "api_config_source": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": SDS_CLUSTER}}],
            "set_node_on_first_message_only": True,
        },
    }


def _sds_cluster(socket_path: str) -> dict[str, Any]:
    return {
        "name": SDS_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": _http2_options(),
        "load_assignment": {
            "cluster_name": SDS_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": socket_path}}}}]}],
        },
    }


def _xds_tls(o: BootstrapOptions) -> dict[str, Any]:
    tls: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": {
            "alpn_protocols": ["h2"],
            "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": sds_config()}],
            "combined_validation_context": {
                "default_validation_context": {
                    "match_typed_subject_alt_names": [
                        {"san_type": "URI", "matcher": {"exact": control_plane_id(o.trust_domain)}}
                    ],
                },
                "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": sds_config()},
            },
        },
    }
    if o.tls_server_name:
        tls["sni"] = o.tls_server_name
    return {"name": "envoy.transport_sockets.tls", "typed_config": tls}


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
    if o.identity and not o.sds_socket:
        raise ValueError("identity needs the agent's SDS socket (sds_socket)")
    metadata[META.IDENTITY] = o.identity  # the control plane sends TLS config only to nodes with a certificate
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
    xds_cluster: dict[str, Any] = {
        "name": "meshpilot-xds",
        "type": cp_type,
        "connect_timeout": "1s",
        "typed_extension_protocol_options": _http2_options(),
        "load_assignment": {
            "cluster_name": "meshpilot-xds",
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": _socket(o.control_plane_host, o.control_plane_port)}}]}
            ],
        },
    }
    clusters: list[dict[str, Any]] = [xds_cluster]
    if o.identity:
        # static clusters are initialised in order: the SDS cluster must exist before a cluster whose
        # transport socket asks it for secrets
        clusters.insert(0, _sds_cluster(o.sds_socket))
        xds_cluster["transport_socket"] = _xds_tls(o)
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
