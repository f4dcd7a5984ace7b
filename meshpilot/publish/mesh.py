"""The registry's producer: services, instances and nodes → clusters, endpoints, routes, listeners
and the DNS table.

Per service (key: the service key, shared scope) its clusters (one per port, one per subset its
routing overlay asks for), their endpoint assignments and its DNS entry; the outbound route
configuration every sidecar shares (key ``outbound``); per node (scope: the node id) its listeners,
its inbound cluster and its inbound routes. The policies in force reach the translation through a
``MeshPolicy``: routing overlays, per-service overrides (outlier detection), outbound filters only
some services need, and the filters each node's listeners carry.

Make before break: an overlay that brings new subsets is published in two steps. First its subset
clusters and endpoints go out with the routes that were in force (proxyless clients also get an
unreachable route naming every cluster, so they build a balancer for each); ``subset_warmup_s``
later its own routes follow. A gRPC client that got a route to a cluster it was not already
balancing would fail calls in the moment between its new routes and its new balancers.

Inbound listeners keep ``x-mesh-caller`` only from trusted peers: the addresses of the sidecars
registered over HDS, read from the registry like everything else.

With workload identities on (``identity``), each destination service has an mTLS mode (its
MtlsPolicy, its namespace's, else ``mtls_mode``): clusters of services not in DISABLE mode talk TLS
to sidecars with an identity, and the inbound listener of a node with an identity takes TLS
(PERMISSIVE: and plaintext; STRICT: plaintext only from the node itself, whose ``inbound-local``
routes answer its health checks). The clusters are shared by every node, so every Envoy that
reads them must have the ``meshpilot-sds`` cluster: with identity on, every sidecar is enrolled
(its xDS stream needs a certificate anyway). Each node's inbound routes carry the RBAC rules of the
AuthorizationPolicies that select its service; a TCP service's inbound listener carries them itself
(network RBAC filters), so for TCP a policy change is a listener change. A node whose bootstrap has
the span collector gets tracing in its HTTP connection managers at its TracingPolicy's sampling
rate (translate/tracing.py); a sampling change is a listener change for the service's nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from google.protobuf.message import Message

from meshpilot.model import Service, ServicePort
from meshpilot.publish.publisher import Bundle, Changes, Output, Producer
from meshpilot.registry import Registry
from meshpilot.translate.clusters import build_cluster, build_inbound_cluster, subset_cluster_name
from meshpilot.translate.dns import build_dns_service, dns_resource_name
from meshpilot.translate.endpoints import build_endpoints
from meshpilot.translate.listeners import (
    INBOUND,
    INBOUND_LOCAL_ROUTE,
    INBOUND_ROUTE,
    OUTBOUND,
    InboundAuthz,
    build_inbound_listener,
    build_inbound_local_routes,
    build_inbound_routes,
    build_outbound_listener,
)
from meshpilot.translate.names import OUTBOUND_ROUTE, cluster_name, inbound_cluster_name
from meshpilot.translate.routes import OutboundRoutes, ServiceRouting, Subset
from meshpilot.translate.tls import DISABLE, STRICT, TlsSettings
from meshpilot.translate.tracing import DEFAULT_SAMPLING, node_tracing, with_tracing
from meshpilot.xds.resource import META, TYPE, NodeInfo

__all__ = ["MeshPolicy", "MeshProducer", "NoPolicy"]


class MeshPolicy(Protocol):
    """What the policies in force change in the registry's translation."""

    def affected(self, changed: set[str]) -> set[str]:
        """Take in changed document keys; return the services whose translation changed (routing
        overlay, override, optional filters, or the inbound filters of their nodes)."""

    def routing(self, service_key: str) -> ServiceRouting | None:
        """The service's routing overlay, if any."""

    def override(self, service: Service) -> Service:
        """The service as its clusters are built (e.g. with a policy's outlier detection)."""

    def optional_route_filters(self) -> dict[str, frozenset[str]]:
        """Outbound HTTP filters only some services need: filter name → those services. Routes to
        every other service switch the filter off, so their requests skip it at no cost."""

    def node_filters(self, node: NodeInfo, direction: str) -> list[hcm.HttpFilter]:
        """HTTP filters of the node's ``inbound`` or ``outbound`` listener."""

    def inbound_filters(self, node: NodeInfo) -> tuple[list[str], list[str]]:
        """(filters the node's inbound routes switch off, every optional inbound filter)."""

    def mtls_modes(self) -> tuple[dict[str, str], dict[str, str]]:
        """(service key → mTLS mode, namespace → mode) of the mTLS policies in force."""

    def inbound_authz(self, node: NodeInfo, ports: frozenset[int]) -> InboundAuthz | None:
        """The RBAC rules of the node's inbound routes, for a node serving these service ports."""

    def trace_sampling(self, node: NodeInfo) -> float:
        """The percentage of new traces the node's listeners sample (TracingPolicy)."""


class NoPolicy:
    """A mesh without policies."""

    def affected(self, changed: set[str]) -> set[str]:
        return set()

    def routing(self, service_key: str) -> ServiceRouting | None:
        return None

    def override(self, service: Service) -> Service:
        return service

    def optional_route_filters(self) -> dict[str, frozenset[str]]:
        return {}

    def node_filters(self, node: NodeInfo, direction: str) -> list[hcm.HttpFilter]:
        return []

    def inbound_filters(self, node: NodeInfo) -> tuple[list[str], list[str]]:
        return [], []

    def mtls_modes(self) -> tuple[dict[str, str], dict[str, str]]:
        return {}, {}

    def inbound_authz(self, node: NodeInfo, ports: frozenset[int]) -> InboundAuthz | None:
        return None

    def trace_sampling(self, node: NodeInfo) -> float:
        return DEFAULT_SAMPLING


@dataclass(frozen=True, slots=True)
class _Staged:
    routing: ServiceRouting  # the new subsets with the routes in force before
    target: ServiceRouting  # what follows once they are warm
    due: float


class MeshProducer(Producer):
    subset_warmup_s = 0.5  # new subsets go out this long before the routes that use them

    def __init__(
        self,
        registry: Registry,
        domain: str,
        nodes: Mapping[str, NodeInfo],
        policy: MeshPolicy,
        health_token: Callable[[str], str] = lambda node_id: "",
        single_vip: str | None = None,
        sidecar_source: str = "mesh",
        identity: bool = False,
        trust_domain: str = "mesh.local",
        mtls_mode: str = "PERMISSIVE",
    ) -> None:
        """``sidecar_source``: the source of the instances sidecars register (their addresses are
        the trusted peers). ``identity``, ``trust_domain``, ``mtls_mode``: workload identities (the
        settings of the same names; the mode is the mesh-wide default MtlsPolicies override)."""
        self.registry = registry
        self.domain = domain
        self.nodes = nodes
        self.policy = policy
        self.health_token = health_token
        self.single_vip = single_vip
        self.sidecar_source = sidecar_source
        self.identity = identity
        self.trust_domain = trust_domain
        self.mtls_mode = mtls_mode
        self.tls()  # a bad mode fails here, not at the first publication
        self._routes = OutboundRoutes()
        self._in_full: dict[str, ServiceRouting] = {}  # service key -> overlay published whole
        self._staged: dict[str, _Staged] = {}
        self._sidecars: dict[str, str] = {}  # sidecar instance id -> address
        self._peers: frozenset[str] = frozenset()

    # ---- what other producers read ----------------------------------------------------------

    def service_routing(self, key: str) -> ServiceRouting | None:
        """The overlay the service is built with: a staged one while its new subsets warm up."""
        staged = self._staged.get(key)
        return staged.routing if staged is not None else self.policy.routing(key)

    @property
    def trusted_peers(self) -> frozenset[str]:
        return self._peers

    def tls(self) -> TlsSettings:
        """Identities and the mTLS mode of every service, as the builders take them."""
        by_service, by_namespace = self.policy.mtls_modes() if self.identity else ({}, {})
        return TlsSettings(self.identity, self.trust_domain, self.mtls_mode, by_service, by_namespace)

    def next_deadline(self) -> float | None:
        return min((s.due for s in self._staged.values()), default=None)

    # ---- producing --------------------------------------------------------------------------

    def produce(self, changes: Changes, now: float) -> Output:
        reg = self.registry
        out: Output = {}
        if changes.everything:
            self._in_full = {s.key: r for s in reg.services() if (r := self.policy.routing(s.key)) is not None}
            self._staged.clear()
            self._sidecars = {i.id: i.address for i in reg.iter_instances() if i.source == self.sidecar_source}
            self._peers = frozenset(self._sidecars.values())
            services = {s.key for s in reg.services()}
            rerouted: set[str] = set()
        else:
            services = set(changes.services)
            rerouted = self.policy.affected(changes.other) | changes.rerouted
            rerouted |= {k for k, s in self._staged.items() if s.due <= now}
            for key in [k for k in self._staged if reg.service(k) is None]:
                del self._staged[key]  # a deleted service warms nothing up
            rerouted = {k for k in rerouted if reg.service(k) is not None}
            for key in sorted(rerouted):
                self._stage(key, now)
        changes.rerouted |= rerouted  # later producers build with the same overlays
        for key in sorted(services | rerouted):
            out.update(self._service(key))
        for key in sorted(changes.endpoints - services - rerouted):
            svc = reg.service(key)
            if svc is not None:
                out[("", key)] = self._service_bundle(svc)
        if changes.everything or services or rerouted:
            routing = {s.key: r for s in reg.services() if (r := self.service_routing(s.key)) is not None}
            route = self._routes.build(reg.services(), self.domain, routing, self.policy.optional_route_filters())
            out[("", OUTBOUND_ROUTE)] = Bundle({TYPE.ROUTE: {OUTBOUND_ROUTE: route}})
        peers_changed = not changes.everything and self._note_sidecars(changes.instances)
        if changes.everything or peers_changed or services or rerouted:
            touched = services | rerouted
            nodes = [n for n in self.nodes.values() if changes.everything or peers_changed or n.id in changes.nodes
                     or n.service_key in touched or (n.capture and services)]  # capture chains list every VIP
        else:  # the common case of a node connecting: that node alone
            nodes = [n for nid in sorted(changes.nodes) if (n := self.nodes.get(nid)) is not None]
        for node in nodes:
            out[(node.id, "node")] = self.node_bundle(node)
        return out

    def _service(self, key: str) -> Output:
        svc = self.registry.service(key)
        if svc is None:
            return {("", key): None}
        return {("", key): self._service_bundle(svc, clusters=True)}

    def _service_bundle(self, svc: Service, clusters: bool = False) -> Bundle:
        """The service's endpoints (and its clusters and DNS entry): a bundle replaces only the
        types it names, so an instance change leaves the clusters as they are."""
        domain = self.domain
        instances = self.registry.instances(svc.key)
        subsets = self._subsets(svc)
        assignments: dict[str, Message | bytes] = {cluster_name(svc, p, domain): build_endpoints(svc, p, instances, domain) for p in svc.ports}
        for p, subset, name in subsets:
            assignments[name] = build_endpoints(svc, p, instances, domain, (subset.name, dict(subset.labels)))
        resources: dict[str, dict[str, Message | bytes]] = {TYPE.ENDPOINT: assignments}
        if clusters:
            built = self.policy.override(svc)
            tls = self.tls()
            cl: dict[str, Message | bytes] = {cluster_name(svc, p, domain): build_cluster(built, p, domain, tls=tls) for p in svc.ports}
            cl.update((name, build_cluster(built, p, domain, subset.name, tls)) for p, subset, name in subsets)
            resources[TYPE.CLUSTER] = cl
            vip = self.single_vip or svc.vip
            resources[TYPE.DNS] = {dns_resource_name(svc): build_dns_service(svc, domain, vip, self.registry.vip6(svc))}
        return Bundle(resources)

    def _stage(self, key: str, now: float) -> None:
        """Publish an overlay whole, or, when it brings new subsets, first with them and the routes
        in force before (see the module docstring)."""
        new = self.policy.routing(key)
        pending = self._staged.pop(key, None)
        if pending is not None and pending.due <= now and pending.target == new:
            self._in_full[key] = new  # warmed up
            return
        old = self._in_full.get(key)
        known = {s.name for s in old.subsets} if old is not None else set()
        fresh = [s for s in new.subsets if s.name not in known] if new is not None else []
        if not fresh or self.subset_warmup_s <= 0 or not self.nodes:  # nobody to warm up for
            if new is None:
                self._in_full.pop(key, None)
            else:
                self._in_full[key] = new
            return
        assert new is not None
        rules = old.rules if old is not None and old.ports == new.ports else ()
        staged = ServiceRouting(subsets=(*(old.subsets if old else ()), *fresh), rules=rules, ports=new.ports, source=new.source)
        self._staged[key] = _Staged(staged, new, now + self.subset_warmup_s)

    def _subsets(self, svc: Service) -> list[tuple[ServicePort, Subset, str]]:
        """(port, subset, cluster name) of every subset cluster the service's routing asks for."""
        routing = self.service_routing(svc.key)
        if routing is None:
            return []
        return [
            (p, subset, subset_cluster_name(svc, p, subset.name, self.domain))
            for p in svc.ports
            if routing.applies_to(p)
            for subset in routing.subsets
        ]

    def _note_sidecars(self, instance_ids: set[str]) -> bool:
        """Follow the registered sidecars' addresses; True when the trusted peers changed."""
        changed = False
        for iid in instance_ids:
            inst = self.registry.instance(iid)
            if inst is not None and inst.source == self.sidecar_source:
                if self._sidecars.get(iid) != inst.address:
                    self._sidecars[iid] = inst.address
                    changed = True
            elif self._sidecars.pop(iid, None) is not None:
                changed = True
        if not changed:
            return False
        peers = frozenset(self._sidecars.values())
        changed, self._peers = peers != self._peers, peers
        return changed

    # ---- a node's own resources -------------------------------------------------------------

    def node_bundle(self, node: NodeInfo) -> Bundle | None:
        """The node's listeners, inbound cluster and inbound routes (None: a proxyless client,
        which has none of its own)."""
        if node.proxyless:
            return None
        listeners: dict[str, Message | bytes] = {}
        clusters: dict[str, Message | bytes] = {}
        routes: dict[str, Message | bytes] = {}
        tracing = node_tracing(node, self.policy.trace_sampling(node))  # None: its Envoy has no collector
        if node.outbound_port:
            services = self.registry.services() if node.capture else ()
            listeners[OUTBOUND] = with_tracing(
                build_outbound_listener(node, self.policy.node_filters(node, "outbound"), services, self.domain), tracing)
        if node.inbound_port and node.app_port:
            svc = self.registry.service(node.service_key) if node.service else None
            protocol = next((p.protocol for p in svc.ports), "http") if svc is not None else "http"
            filters = self.policy.node_filters(node, "inbound") if protocol != "tcp" else []
            mode = self.tls().mode(node.service_key) if node.identity and node.service else DISABLE
            authz = self.policy.inbound_authz(node, _served_ports(node, svc))
            # a TCP listener carries its rules itself (no routes): a policy change drains it
            listeners[INBOUND] = with_tracing(build_inbound_listener(node, filters, sorted(self._peers), protocol, mode,
                                                                     authz if protocol == "tcp" else None), tracing)
            clusters[inbound_cluster_name(node.app_port)] = build_inbound_cluster(node, protocol)
            off, optional = self.policy.inbound_filters(node)
            token = self.health_token(node.id)
            routes[INBOUND_ROUTE] = build_inbound_routes(node, off, token, optional, authz)
            if mode == STRICT and protocol != "tcp":
                routes[INBOUND_LOCAL_ROUTE] = build_inbound_local_routes(node, token, optional)
        return Bundle({TYPE.CLUSTER: clusters, TYPE.ROUTE: routes, TYPE.LISTENER: listeners})


def _served_ports(node: NodeInfo, svc: Service | None) -> frozenset[int]:
    """The service ports a node serves: the one its registration names, else all of them."""
    if svc is None:
        return frozenset()
    name = node.extra.get(META.PORT_NAME)
    named = frozenset(p.port for p in svc.ports if p.name == name)
    return named or frozenset(p.port for p in svc.ports)
