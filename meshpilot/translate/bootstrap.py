"""Envoy bootstrap for a meshpilot sidecar: node identity, ADS to the control plane, admin on loopback.

Everything else (listeners, clusters, routes, endpoints) arrives over ADS. The node metadata keys
(``META`` in xds/resource.py) are read back by the control plane to build the node's own listeners.
With ``identity`` on, the agent serves the node's certificate over SDS on a unix socket: a static
cluster ``meshpilot-sds`` reaches it, and ``meshpilot-xds`` (ADS and HDS) talks TLS with the SDS
secrets ``default`` (client certificate) and ``ROOTCA`` (trust bundle), accepting only the control
plane's SPIFFE id. No file path of a certificate or key ever appears here.

Several control-plane replicas (``control_planes``, from ``--control-plane a:p,b:p``) are the endpoints of
the one cluster ``meshpilot-xds``: Envoy picks a replica per stream (round robin), so when the replica of
its ADS or HDS stream dies or ends the stream, the stream's retry opens on the next one. A short connect
timeout leaves a dead replica fast, and TCP and HTTP/2 keepalives notice a replica that vanished without
closing its connections. Every replica is checked for the same SPIFFE id (they share the mesh CA).
The admin interface stays on loopback (it takes writes). With ``stats_port`` set, a static listener
``meshpilot-stats`` on the node's bind address serves only ``GET /stats/prometheus`` (Istio's 15090), relayed to
the admin through the static cluster ``meshpilot-admin``; every other path or method gets 404. The port goes
into the node metadata (``STATS_PORT``) so the control plane can tell Prometheus where to scrape
(meshpilot/topology/, docs/observability.md).
Pure: options in, a JSON-serialisable dict out.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Literal

from meshpilot.pki import control_plane_id
from meshpilot.telemetry.spans import COLLECTOR_CLUSTER, META_TRACE_COLLECTOR
from meshpilot.xds.resource import META

__all__ = ["ADMIN_CLUSTER", "SDS_CLUSTER", "STATS_LISTENER", "STATS_PATH", "STATS_PORT_META", "XDS_CLUSTER", "BootstrapOptions", "build_bootstrap", "control_plane_addresses",
           "format_control_planes", "grpc_target", "parse_control_planes", "sds_config"]

SDS_CLUSTER = "meshpilot-sds"
XDS_CLUSTER = "meshpilot-xds"
DEFAULT_XDS_PORT = 15010
ADMIN_CLUSTER = "meshpilot-admin"  # the stats listener's way to the loopback admin
STATS_LISTENER = "meshpilot-stats"
STATS_PATH = "/stats/prometheus"
STATS_PORT_META = META.STATS_PORT  # node metadata: the stats listener's port (0 or absent: none)


@dataclass(frozen=True, slots=True)
class BootstrapOptions:
    node_id: str
    service: str = ""
    namespace: str = "default"
    zone: str = ""
    control_plane_host: str = "127.0.0.1"
    control_plane_port: int = DEFAULT_XDS_PORT
    # every replica of the control plane, in the operator's order; when set, the two fields above are unused
    control_planes: tuple[tuple[str, int], ...] = ()
    connect_timeout_s: float = 1.0  # to one replica: a dead one is left after this
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
    trace_collector_port: int = 0  # the agent's span receiver on loopback (0: none, no tracing)
    stats_port: int = 0  # the read-only Prometheus listener on bind_address (0: none); needs a fixed admin_port


def parse_control_planes(text: str, default_port: int = DEFAULT_XDS_PORT) -> tuple[tuple[str, int], ...]:
    """``HOST:PORT[,HOST:PORT...]`` (also ``HOST`` with the default port, ``[v6]:PORT``, and ``:PORT`` for this
    host's 127.0.0.1) → (host, port) pairs in the given order; ValueError naming the entry that is wrong, or one
    listed twice."""
    out: list[tuple[str, int]] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise ValueError(f"{text!r}: an empty entry (expected HOST:PORT[,HOST:PORT...])")
        if item.startswith("["):
            host, sep, rest = item[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise ValueError(f"{item!r}: expected [IPV6]:PORT")
            port_text = rest[1:] if rest else ""
        elif item.count(":") == 1:
            host, _, port_text = item.partition(":")
        elif ":" in item:  # a bare IPv6 address
            host, port_text = item, ""
        else:
            host, port_text = item, ""
        host = host.strip() or "127.0.0.1"
        try:
            port = int(port_text) if port_text else default_port
        except ValueError:
            raise ValueError(f"{item!r}: the port {port_text!r} is not a number") from None
        if not 0 < port < 65536:
            raise ValueError(f"{item!r}: the port {port} is out of range (1-65535)")
        if (host, port) in out:
            raise ValueError(f"{item!r} is listed twice")
        out.append((host, port))
    return tuple(out)


def grpc_target(host: str, port: int) -> str:
    """A gRPC channel target for one replica (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_control_planes(addresses: tuple[tuple[str, int], ...]) -> str:
    """The list back as the ``--control-plane`` text: ``a:p,b:p``."""
    return ",".join(grpc_target(h, p) for h, p in addresses)


def control_plane_addresses(o: BootstrapOptions) -> tuple[tuple[str, int], ...]:
    """Every replica the options name: ``control_planes``, else the one host and port."""
    return o.control_planes or ((o.control_plane_host, o.control_plane_port),)


def _socket(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _http2_options(interval_s: int = 10, timeout_s: int = 5) -> dict[str, Any]:
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {
                "http2_protocol_options": {
                    "connection_keepalive": {"interval": f"{interval_s}s", "timeout": f"{timeout_s}s"},
                }
            },
        }
    }


def _xds_cluster(o: BootstrapOptions) -> dict[str, Any]:
    """``meshpilot-xds``: one endpoint per replica. A dead replica is left after the connect timeout, and one
    that vanished without a FIN or RST after the HTTP/2 PING timeout (10 s + 3 s; TCP keepalive as a floor
    under it); Envoy's stream retry then picks the next endpoint."""
    addresses = control_plane_addresses(o)
    # STATIC takes only addresses; names (a headless service with one A record per replica too) need DNS
    cp_type = "STATIC" if all(_is_ip(h) for h, _ in addresses) else "STRICT_DNS"
    return {
        "name": XDS_CLUSTER,
        "type": cp_type,
        "connect_timeout": f"{o.connect_timeout_s:g}s",
        "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": _http2_options(interval_s=10, timeout_s=3),
        "upstream_connection_options": {
            "tcp_keepalive": {"keepalive_time": 10, "keepalive_interval": 3, "keepalive_probes": 3},
        },
        "load_assignment": {
            "cluster_name": XDS_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(h, p)}} for h, p in addresses]}],
        },
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


def _stats_listener(o: BootstrapOptions) -> dict[str, Any]:
    """Only ``GET``/``HEAD /stats/prometheus`` (any query: Envoy's ``usedonly``, ``filter``) reaches the admin."""
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "meshpilot_stats",
        "route_config": {
            "name": STATS_LISTENER,
            "virtual_hosts": [{
                "name": STATS_LISTENER,
                "domains": ["*"],
                "routes": [
                    {
                        "match": {"path": STATS_PATH, "headers": [{"name": ":method", "string_match": {"safe_regex": {"regex": "GET|HEAD"}}}]},
                        "route": {"cluster": ADMIN_CLUSTER, "timeout": "10s"},
                    },
                    {"match": {"prefix": "/"}, "direct_response": {"status": 404, "body": {"inline_string": f"only GET {STATS_PATH} is served here\n"}}},
                ],
            }],
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    return {
        "name": STATS_LISTENER,
        "address": _socket(o.bind_address, o.stats_port),
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}],
    }


def _admin_cluster(o: BootstrapOptions) -> dict[str, Any]:
    return {
        "name": ADMIN_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": ADMIN_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(o.admin_address, o.admin_port)}}]}],
        },
    }


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
    if o.stats_port:
        if not o.admin_port:
            raise ValueError("stats_port: the stats listener relays to the admin, which needs a fixed admin_port (not 0)")
        metadata[STATS_PORT_META] = o.stats_port
    node: dict[str, Any] = {"id": o.node_id, "cluster": o.service or o.node_id, "metadata": metadata}
    if o.zone:
        node["locality"] = {"zone": o.zone}
    grpc_service = {
        "envoy_grpc": {
            "cluster_name": XDS_CLUSTER,
            "retry_policy": {"retry_back_off": {"base_interval": "0.1s", "max_interval": f"{o.retry_max_s}s"}},
        }
    }
    xds_cluster = _xds_cluster(o)
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
    if o.stats_port:
        clusters.append(_admin_cluster(o))
        bootstrap["static_resources"]["listeners"] = [_stats_listener(o)]
    if o.trace_collector_port:
        # Envoy's Zipkin tracer posts spans here (the agent's receiver); the node metadata tells the
        # control plane that this Envoy knows the cluster, so its listeners may carry tracing
        clusters.append({
            "name": COLLECTOR_CLUSTER, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": COLLECTOR_CLUSTER, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": _socket("127.0.0.1", o.trace_collector_port)}}]}]},
        })
        metadata[META_TRACE_COLLECTOR] = COLLECTOR_CLUSTER
    if o.hds:
        bootstrap["hds_config"] = {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "set_node_on_first_message_only": True,
            "grpc_services": [grpc_service],
        }
    return bootstrap
