"""Serves proxyless gRPC clients and servers: a producer of ApiListeners and their route
configurations, the Listeners of xDS-enabled gRPC servers, and the TLS clusters of clients with an
identity.

The ApiListeners are published unlisted: a sidecar's wildcard LDS subscription never sees them, a
gRPC client that names one gets it. Clusters and endpoints are the shared ones every Envoy gets
(gRPC clients subscribe to them by name). Routes follow the services' routing overlays (routing
policies, staged ones included), so a weight change reaches gRPC clients in the same push as the
sidecars. One key per service; the publisher removes what a service no longer has.

A proxyless node that names its service (``SERVICE``, ``NAMESPACE``) and the addresses its
xDS-enabled gRPC server listens on (``GRPC_SERVER_ADDRESSES``) gets, in its own scope, one Listener
per address (server.py) with the RBAC rules of the AuthorizationPolicies that select its service,
rebuilt whenever those policies, the service's mTLS mode or the service change. A proxyless node
with an identity (``IDENTITY``: its bootstrap defines the certificate provider ``mesh``) gets, in
its own scope, a TLS copy of the clusters of every service that has instances with an identity
(``metadata.spiffe``, as sidecars' instances have and a proxyless server's registration gives):
gRPC chooses TLS per cluster, not per endpoint, and a client without the certificate provider
would reject such a cluster, so the shared clusters stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from google.protobuf.message import Message

from meshpilot.model import Service
from meshpilot.proxyless.resources import PROTOCOLS, build_api_listener, build_proxyless_routes, listener_names, route_name
from meshpilot.proxyless.server import SERVER_ADDRESSES, build_server_listener, server_addresses, server_listener_name, tls_cluster
from meshpilot.publish.mesh import MeshPolicy
from meshpilot.publish.publisher import Bundle, Changes, Output, Producer
from meshpilot.registry import Registry
from meshpilot.translate.clusters import build_cluster, subset_cluster_name
from meshpilot.translate.names import cluster_name
from meshpilot.translate.routes import ServiceRouting, short_name_owners
from meshpilot.translate.tls import DISABLE, TlsSettings
from meshpilot.xds.resource import META, TYPE, NodeInfo

__all__ = ["SERVER_KEY", "ProxylessProducer", "tls_key"]

SERVER_KEY = "grpc-server"  # a server node's own key: its Listeners


def tls_key(service_key: str) -> str:
    """A client node's own key for the TLS clusters of one service."""
    return f"tls-clusters {service_key}"


class ProxylessProducer(Producer):
    def __init__(
        self,
        registry: Registry,
        domain: str,
        routing: Callable[[str], ServiceRouting | None],
        nodes: Mapping[str, NodeInfo] | None = None,
        policy: MeshPolicy | None = None,
        tls: Callable[[], TlsSettings] = TlsSettings,
    ) -> None:
        """``nodes``: the connected nodes (the proxyless servers and clients with an identity among
        them get their own resources); ``policy``: the policies in force (authorization rules,
        cluster overrides); ``tls``: identities and the mTLS mode of every service."""
        self.registry = registry
        self.domain = domain
        self.routing = routing
        self.nodes: Mapping[str, NodeInfo] = nodes if nodes is not None else {}
        self.policy = policy
        self.tls = tls
        self._owners: set[str] = set()  # services that own their bare name

    def produce(self, changes: Changes, now: float) -> Output:
        reg = self.registry
        keys = changes.services | changes.rerouted
        if changes.everything or changes.services:
            services = reg.services()
            owners = short_name_owners(services)
            if changes.everything:
                keys = keys | {s.key for s in services}
            keys = keys | (owners ^ self._owners)  # a bare name changed hands
            self._owners = owners
        out: Output = {("", key): self._bundle(key) for key in sorted(keys)}
        out.update(self._own(changes))
        return out

    def _bundle(self, key: str) -> Bundle | None:
        svc = self.registry.service(key)
        if svc is None:
            return None
        listeners: dict[str, Message] = {}
        routes: dict[str, Message] = {}
        routing = self.routing(key)
        for port in svc.ports:
            if port.protocol not in PROTOCOLS:
                continue
            rname = route_name(svc, port)
            routes[rname] = build_proxyless_routes(svc, port, self.domain, routing)
            for name in listener_names(svc, port, self.domain, short=key in self._owners):
                listeners[name] = build_api_listener(name, rname)
        return Bundle({TYPE.ROUTE: routes, TYPE.LISTENER: listeners}, unlisted=frozenset({TYPE.LISTENER}))

    # ---- proxyless nodes' own resources -------------------------------------------------------

    def _own(self, changes: Changes) -> Output:
        out: Output = {}
        proxyless = [n for n in self.nodes.values() if n.proxyless]
        if not proxyless:
            return out
        tls = self.tls()
        redefined = changes.services | changes.rerouted
        touched = redefined | changes.endpoints
        every: list[str] | None = None
        built: dict[str, Bundle | None] = {}  # one build per service, shared by every client node
        for node in proxyless:
            fresh = changes.everything or node.id in changes.nodes
            if node.service and SERVER_ADDRESSES in node.extra and (fresh or node.service_key in redefined):
                out[(node.id, SERVER_KEY)] = self._server(node, tls)
            if node.identity and tls.enabled:
                if fresh and every is None:
                    every = [s.key for s in self.registry.services()]
                for key in sorted(every if fresh and every is not None else touched):
                    if key not in built:
                        built[key] = self._tls_clusters(key, tls)
                    out[(node.id, tls_key(key))] = built[key]
        return out

    def _server(self, node: NodeInfo, tls: TlsSettings) -> Bundle:
        svc = self.registry.service(node.service_key)
        authz = self.policy.inbound_authz(node, _served_ports(node, svc)) if self.policy is not None else None
        secure = tls.enabled and node.identity and tls.mode(node.service_key) != DISABLE
        listeners: dict[str, Message] = {
            server_listener_name(host, port): build_server_listener(host, port, authz, secure)
            for host, port in server_addresses(node.extra.get(SERVER_ADDRESSES))
        }
        return Bundle({TYPE.LISTENER: listeners}, unlisted=frozenset({TYPE.LISTENER}))

    def _tls_clusters(self, key: str, tls: TlsSettings) -> Bundle | None:
        """The service's clusters with mTLS, when its callers must talk TLS to it (None: they need not)."""
        svc = self.registry.service(key)
        if svc is None or tls.mode(key) == DISABLE or not any(i.metadata.get("spiffe") for i in self.registry.instances(key)):
            return None
        built = self.policy.override(svc) if self.policy is not None else svc
        peer = tls.service_id(svc.namespace, svc.name)
        routing = self.routing(key)
        clusters: dict[str, Message] = {}
        for p in svc.ports:
            if p.protocol not in PROTOCOLS:
                continue
            clusters[cluster_name(svc, p, self.domain)] = tls_cluster(build_cluster(built, p, self.domain), peer)
            if routing is not None and routing.applies_to(p):
                for subset in routing.subsets:
                    name = subset_cluster_name(svc, p, subset.name, self.domain)
                    clusters[name] = tls_cluster(build_cluster(built, p, self.domain, subset.name), peer)
        return Bundle({TYPE.CLUSTER: clusters})


def _served_ports(node: NodeInfo, svc: Service | None) -> frozenset[int]:
    """The service ports a server node serves: the one ``PORT_NAME`` names, else its gRPC ones."""
    if svc is None:
        return frozenset()
    name = node.extra.get(META.PORT_NAME)
    named = frozenset(p.port for p in svc.ports if p.name == name)
    return named or frozenset(p.port for p in svc.ports if p.protocol in PROTOCOLS)
