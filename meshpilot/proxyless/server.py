"""Proxyless gRPC servers and mutual TLS for proxyless gRPC: the Listener an xDS-enabled gRPC
server asks for, and the TLS a proxyless client's clusters carry.

An xDS-enabled gRPC server (gRFC A36: grpcio's ``grpc.server(..., xds=True)``) asks LDS for the
Listener named by its bootstrap's ``server_listener_resource_name_template`` with its listening
address in place of ``%s``; meshpilot answers the template ``LISTENER_TEMPLATE``. The Listener
has the server's address, one filter chain whose HTTP connection manager holds its routes inline
(one virtual host for every authority, one route whose action is ``non_forwarding_action``: the
server serves the call itself) and the RBAC filters of the AuthorizationPolicies that select the
server's service (gRFC A41; the same rules Envoy's inbound routes carry, from policy/authz.py),
then the router. With identities on, the chain terminates TLS and requires a client certificate
(gRFC A29): both the server's certificate and the trust bundle come from the certificate provider
instance ``CERT_PROVIDER`` of the gRPC process's bootstrap (a ``file_watcher`` over the files
``meshpilot identity-files`` keeps fresh), never over xDS. gRPC cannot sniff TLS on a port, so a
server's listener is either TLS (modes PERMISSIVE and STRICT) or plaintext (DISABLE).

A gRPC client takes TLS for a cluster from the cluster's ``transport_socket`` (it ignores Envoy's
per-endpoint ``transport_socket_matches``), so ``tls_cluster`` turns a shared cluster into the
copy a proxyless client with an identity gets: the same cluster with an UpstreamTlsContext on the
same certificate provider, accepting only a peer whose SAN is the service's SPIFFE id. Pure: model
in, protobuf out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2

from meshpilot.translate.listeners import AUTHZ_ALLOW, AUTHZ_DENY, InboundAuthz
from meshpilot.xds.resource import pack
from meshpilot.translate.tls import tls_socket

__all__ = [
    "CERT_PROVIDER",
    "LISTENER_PREFIX",
    "LISTENER_TEMPLATE",
    "SERVER_ADDRESSES",
    "build_server_listener",
    "server_addresses",
    "server_listener_name",
    "tls_cluster",
]

LISTENER_TEMPLATE = "grpc/server?xds.resource.listening_address=%s"  # the bootstrap's server_listener_resource_name_template
LISTENER_PREFIX = LISTENER_TEMPLATE.removesuffix("%s")
CERT_PROVIDER = "mesh"  # the bootstrap's certificate_providers instance: workload certificate, key and trust bundle
SERVER_ADDRESSES = "GRPC_SERVER_ADDRESSES"  # node metadata: the host:port addresses the node's xDS gRPC server listens on
_HCM = "envoy.filters.network.http_connection_manager"


def server_addresses(value: Any) -> list[tuple[str, int]]:
    """The (ip, port) pairs of a node's ``GRPC_SERVER_ADDRESSES`` (a list of ``host:port``, or one
    string of them separated by commas); entries that are not an IP address with a port are skipped."""
    items: Iterable[Any] = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else ()
    out: list[tuple[str, int]] = []
    for item in items:
        if not isinstance(item, str):
            continue
        host, sep, port = item.strip().rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        try:
            ip = ipaddress.ip_address(host)
            number = int(port)
        except ValueError:
            continue
        if sep and 0 < number <= 65535 and (str(ip), number) not in out:
            out.append((str(ip), number))
    return out


def server_listener_name(host: str, port: int) -> str:
    """The name gRPC asks for: the template with the address as gRPC prints it ([v6]:port)."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return LISTENER_PREFIX + address


def _provider() -> common_pb2.CertificateProviderPluginInstance:
    return common_pb2.CertificateProviderPluginInstance(instance_name=CERT_PROVIDER, certificate_name="default")


def _common(peer_uri: str | None) -> tls_pb2.CommonTlsContext:
    validation = common_pb2.CertificateValidationContext(ca_certificate_provider_instance=_provider())
    if peer_uri is not None:
        # gRPC matches these against the peer's URI, IP and DNS SANs (it reads the untyped field)
        validation.match_subject_alt_names.append(string_pb2.StringMatcher(exact=peer_uri))
    return tls_pb2.CommonTlsContext(tls_certificate_provider_instance=_provider(), validation_context=validation)


def _rbac_filter(name: str, rules: Any) -> hcm.HttpFilter:
    return hcm.HttpFilter(name=name, typed_config=pack(rbac_pb2.RBAC(rules=rules)))


def build_server_listener(host: str, port: int, authz: InboundAuthz | None, tls: bool) -> listener_pb2.Listener:
    """The Listener of a gRPC server listening on ``host:port``; ``authz``: the RBAC rules of the
    policies selecting its service (deny, then allow); ``tls``: require mutual TLS."""
    name = server_listener_name(host, port)
    routes = route_pb2.RouteConfiguration(name="grpc-server")
    vh = routes.virtual_hosts.add(name="grpc-server", domains=["*"])
    route = vh.routes.add(name="serve")
    route.match.prefix = "/"
    route.non_forwarding_action.SetInParent()
    filters: list[hcm.HttpFilter] = []
    if authz is not None and authz.deny is not None:
        filters.append(_rbac_filter(AUTHZ_DENY, authz.deny))
    if authz is not None and authz.allow is not None:
        filters.append(_rbac_filter(AUTHZ_ALLOW, authz.allow))
    filters.append(hcm.HttpFilter(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router())))
    manager = hcm.HttpConnectionManager(stat_prefix="grpc-server", route_config=routes, http_filters=filters)
    chain = listener_components_pb2.FilterChain(name="grpc-server", filters=[listener_components_pb2.Filter(name=_HCM, typed_config=pack(manager))])
    if tls:
        ctx = tls_pb2.DownstreamTlsContext(common_tls_context=_common(None))
        ctx.require_client_certificate.value = True
        chain.transport_socket.CopyFrom(tls_socket(ctx))
    return listener_pb2.Listener(
        name=name,
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=port)),
        filter_chains=[chain],
    )


def tls_cluster(cluster: cluster_pb2.Cluster, peer_uri: str) -> cluster_pb2.Cluster:
    """A copy of ``cluster`` that talks mutual TLS to every endpoint, accepting ``peer_uri`` only."""
    out = cluster_pb2.Cluster()
    out.CopyFrom(cluster)
    del out.transport_socket_matches[:]  # Envoy's per-endpoint choice; gRPC reads transport_socket
    out.transport_socket.CopyFrom(tls_socket(tls_pb2.UpstreamTlsContext(common_tls_context=_common(peer_uri))))
    return out
