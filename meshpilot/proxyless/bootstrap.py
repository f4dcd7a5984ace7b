"""The xDS bootstrap of a proxyless gRPC application (the file ``GRPC_XDS_BOOTSTRAP`` names), for every replica
of the control plane.

gRPC's xDS client holds one channel to the xDS server named by ``server_uri``; a later ``xds_servers`` entry is
only a fallback for a client that has no resources yet (gRFC A71), so it does not move a running client. The
replicas therefore go into one gRPC target that names them all: ``ipv4:10.0.0.5:15010,10.0.0.6:15010`` (or
``ipv6:``), whose channel reconnects to another address when the one it uses fails or ends the stream; or one
DNS name (``cp.example:15010``, gRPC's default ``dns:///`` scheme) that resolves to every replica. One replica
stays ``HOST:PORT`` as before. grpcio (C core) and grpc-js take ``ipv4:``/``ipv6:`` targets; grpc-go has no such
scheme and needs the DNS name. With identity on, the channel is TLS with the files ``meshpilot identity-files``
keeps fresh, and the certificate provider ``mesh`` serves the same files to the application's own xDS-managed
TLS; gRPC then checks the control plane's certificate for the target's host name, which a list of addresses
does not have (checked with grpcio: "Hostname Verification Check failed"), so with identity several replicas
must be one DNS name that their certificates hold. With server
addresses, the node is an xDS-enabled gRPC server (docs/proxyless.md). Pure: options in, a JSON-serialisable
dict out (:func:`build_grpc_bootstrap`).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from meshpilot.proxyless.server import CERT_PROVIDER, LISTENER_TEMPLATE, SERVER_ADDRESSES
from meshpilot.translate.bootstrap import grpc_target
from meshpilot.xds.resource import META

__all__ = ["GrpcBootstrapOptions", "build_grpc_bootstrap", "xds_server_uri"]

@dataclass(frozen=True, slots=True)
class GrpcBootstrapOptions:
    node_id: str
    control_planes: tuple[tuple[str, int], ...]
    cluster: str = ""  # node.cluster (default: the service, else the node id)
    zone: str = ""
    service: str = ""  # with server_addresses: whose policies apply to the node's server
    namespace: str = "default"
    server_addresses: tuple[str, ...] = ()  # host:port the application's xDS gRPC server listens on
    identity_dir: str = ""  # key.pem, cert.pem and bundle.pem (``meshpilot identity-files --out``): TLS on
    refresh_interval_s: int = 60  # how often gRPC rereads the identity files


def _version(host: str) -> int | None:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


def xds_server_uri(control_planes: tuple[tuple[str, int], ...]) -> str:
    """One gRPC target for every replica; ValueError when gRPC cannot take them as one (names mixed with
    addresses, several names, IPv4 with IPv6)."""
    if not control_planes:
        raise ValueError("no control plane")
    if len(control_planes) == 1:
        host, port = control_planes[0]
        return grpc_target(host, port)
    versions = {_version(h) for h, _ in control_planes}
    if versions == {4}:
        return "ipv4:" + ",".join(f"{h}:{p}" for h, p in control_planes)
    if versions == {6}:
        return "ipv6:" + ",".join(f"[{h}]:{p}" for h, p in control_planes)
    raise ValueError("gRPC takes one target for its xDS server: list every replica by IPv4 address, or every one "
                     "by IPv6 address, or give one DNS name that resolves to them all (one NAME:PORT: "
                     f"gRPC resolves it to every address); got {', '.join(grpc_target(h, p) for h, p in control_planes)}")


def build_grpc_bootstrap(o: GrpcBootstrapOptions) -> dict[str, Any]:
    if o.server_addresses and not o.service:
        raise ValueError("a node with server addresses needs its service (whose policies apply to its server)")
    if o.identity_dir and len(o.control_planes) > 1:
        raise ValueError("with identity, gRPC checks the control plane's certificate for the target's host name, "
                         "and a list of addresses has none: give one DNS name that resolves to every replica and "
                         "that their certificates hold (the control plane's xds_server_names)")
    server: dict[str, Any] = {"server_uri": xds_server_uri(o.control_planes), "server_features": ["xds_v3"]}
    metadata: dict[str, Any] = {META.PROXYLESS: True}
    doc: dict[str, Any] = {"xds_servers": [server]}
    if o.identity_dir:
        d = o.identity_dir.rstrip("/")
        files = {"certificate_file": f"{d}/cert.pem", "private_key_file": f"{d}/key.pem",
                 "ca_certificate_file": f"{d}/bundle.pem"}
        server["channel_creds"] = [{"type": "tls", "config": {**files, "refresh_interval": f"{o.refresh_interval_s}s"}}]
        doc["certificate_providers"] = {CERT_PROVIDER: {"plugin_name": "file_watcher", "config": {
            **files, "refresh_interval": f"{o.refresh_interval_s}s"}}}
        metadata[META.IDENTITY] = True
    else:
        server["channel_creds"] = [{"type": "insecure"}]
    if o.service:
        metadata[META.SERVICE] = o.service
        metadata[META.NAMESPACE] = o.namespace
    if o.server_addresses:
        metadata[SERVER_ADDRESSES] = list(o.server_addresses)
        doc["server_listener_resource_name_template"] = LISTENER_TEMPLATE
    node: dict[str, Any] = {"id": o.node_id, "cluster": o.cluster or o.service or o.node_id, "metadata": metadata,
                            "locality": {"zone": o.zone}}
    doc["node"] = node
    return doc
