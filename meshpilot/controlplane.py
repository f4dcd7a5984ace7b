"""The control-plane process: registry and store, change debouncing, translation into the cache,
the xDS gRPC server and the HTTP front doors, all on one asyncio loop.

Data flows one way (DESIGN.md): a write changes the registry, the registry emits a change, the
debouncer collects changes for ``debounce_ms`` (never longer than ``debounce_max_ms`` in total),
then only the resources the changes touch are rebuilt by translate/ and put into the cache, which
tells the subscribed streams. The control plane assembles its parts and owns their lifetimes: a
plugin contributes gRPC services (HDS), HTTP apps (Consul, Eureka), management API routes, tasks
and node watchers as a ``Part`` (parts.py), given to ``include``; producers still plug in through
``add_*`` hooks: extra shared resources (policies), extra
per-node HTTP filters (the WASM governance filters) and routing overlays (routing policies: subsets,
weights and per-route overrides, applied when services' clusters, endpoints and routes are built).

Make before break: an overlay that brings new subsets is published in two steps. First its subset
clusters and endpoints go out with the routes that were in force (proxyless clients also get an
unreachable route naming every cluster, so they build a balancer for each); ``subset_warmup_s``
later its own routes follow. A gRPC client that got a route to a cluster it was not already
balancing would fail calls in the moment between its new routes and its new balancers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
from aiohttp import web
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm

from meshpilot import metrics
from meshpilot.api.app import build_api
from meshpilot.api.routes import Handler, Route
from meshpilot.hds.metadata import SOURCE as SIDECAR_SOURCE
from meshpilot.hds.specifier import health_token
from meshpilot.model import Service, ServicePort
from meshpilot.registry import Change, Registry
from meshpilot.registry.store import Store, open_store
from meshpilot.parts import HttpApp, Part, Task
from meshpilot.settings import Settings
from meshpilot.translate.clusters import build_cluster, build_inbound_cluster, subset_cluster_name
from meshpilot.translate.dns import build_dns_service, dns_resource_name
from meshpilot.translate.endpoints import build_endpoints
from meshpilot.translate.listeners import INBOUND, INBOUND_ROUTE, OUTBOUND, build_inbound_listener, build_inbound_routes, build_outbound_listener
from meshpilot.translate.names import OUTBOUND_ROUTE, cluster_name, inbound_cluster_name
from meshpilot.translate.routes import OutboundRoutes, ServiceRouting, Subset
from meshpilot.xds.cache import ResourceCache
from meshpilot.xds.resource import TYPE, NodeInfo
from meshpilot.xds.server import MAX_REQUEST_BYTES, XdsServer

__all__ = ["ControlPlane"]

log = logging.getLogger("meshpilot.controlplane")

NodeFilters = Callable[[NodeInfo, str], list[hcm.HttpFilter]]  # (node, "inbound"|"outbound")


class RoutingSource(Protocol):
    def affected(self, changed: set[str]) -> set[str]:
        """Take in changed document keys; return the service keys whose routing changed."""

    def routing(self, service_key: str) -> ServiceRouting | None:
        """The service's routing overlay, if any."""


@dataclass
class _Dirty:
    services: set[str] = field(default_factory=set)
    endpoints: set[str] = field(default_factory=set)
    other: set[str] = field(default_factory=set)
    rerouted: set[str] = field(default_factory=set)  # services whose staged overlay is due in full

    def __bool__(self) -> bool:
        return bool(self.services or self.endpoints or self.other or self.rerouted)


class ControlPlane:
    subset_warmup_s = 0.5  # new subsets go out this long before the routes that use them

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        if settings.store.startswith("etcd://"):
            raise ValueError("store: the etcd store is not available in this build; use sqlite:PATH")
        self.registry = Registry(open_store(settings.store), settings.vip_cidr, settings.vip6_cidr)
        self.cache = ResourceCache()
        self._routes = OutboundRoutes()
        self.nodes: dict[str, NodeInfo] = {}
        self.xds = XdsServer(self.cache, self._node_connected, self._node_gone, write_timeout_s=settings.xds_write_timeout_s)
        self.ports: dict[str, int] = {}
        self._dirty = _Dirty()
        self._kick = asyncio.Event()
        self._published: dict[str, set[str]] = {}  # service key -> cluster names
        self._grpc_handlers: list[grpc.GenericRpcHandler] = [self.xds.handler()]
        self._http_apps: list[HttpApp] = []
        self._api_routes: list[Route] = []
        self._node_filters: list[NodeFilters] = []
        self._shared_builders: list[Callable[[set[str]], None]] = []
        self._routing_sources: list[RoutingSource] = []
        self._routing_in_full: dict[str, ServiceRouting] = {}  # service key -> overlay published whole
        self._staged: dict[str, tuple[ServiceRouting, asyncio.TimerHandle]] = {}  # new subsets, old routes
        self._service_overrides: list[Callable[[Service], Service]] = []
        self._optional_filters: dict[str, Callable[[], frozenset[str]]] = {}
        self._optional_inbound: dict[str, Callable[[NodeInfo], bool]] = {}
        self._node_watchers: list[Callable[[NodeInfo, bool], None]] = []
        self._tasks: list[Task] = []
        # a node's own health checks (HDS) carry its token; its inbound routes let them past every
        # optional inbound filter
        self._health_key = secrets.token_bytes(32)
        # addresses of sidecars registered over HDS, kept up to date from change events (no
        # registry scans); inbound listeners keep x-mesh-caller only from these
        self._sidecars = {i.id: i.address for i in self.registry.iter_instances() if i.source == SIDECAR_SOURCE}
        self.trusted_peers: frozenset[str] | None = frozenset(self._sidecars.values())
        self._grpc: grpc.aio.Server | None = None
        self._runners: list[web.AppRunner] = []
        self.ready = asyncio.Event()
        self.registry.subscribe(self._on_change)
        self.registry.subscribe(self._track_sidecars)

    # ---- assembly -----------------------------------------------------------------------------

    def include(self, part: Part) -> None:
        """Serve, run and tell what a plugin contributes (before ``start``)."""
        self._grpc_handlers.extend(part.grpc_handlers)
        self._http_apps.extend(part.http_apps)
        self._api_routes.extend(part.routes)
        self._tasks.extend(part.tasks)
        self._node_watchers.extend(part.node_watchers)

    def health_token(self, node_id: str) -> str:
        """The node's health token: its HDS checks carry it, its inbound routes match it."""
        return health_token(self._health_key, node_id)

    def api_app(self) -> web.Application:
        """The management API with every route the assembled parts contributed."""
        return build_api(self.settings, self.registry, self.xds, self._api_routes, self.ports)

    def _track_sidecars(self, change: Change) -> None:
        if change.kind != "instance":
            return
        inst = self.registry.instance(change.key)
        if inst is not None and inst.source == SIDECAR_SOURCE:
            if self._sidecars.get(inst.id) == inst.address:
                return  # the common case: a known sidecar address
            self._sidecars[inst.id] = inst.address
        elif self._sidecars.pop(change.key, None) is None:
            return  # not a sidecar instance: nothing to do
        peers = frozenset(self._sidecars.values())
        if peers != self.trusted_peers:
            self.trusted_peers = peers
            self.refresh_nodes()

    # ---- extension points ---------------------------------------------------------------------

    def add_node_filters(self, hook: NodeFilters) -> None:
        self._node_filters.append(hook)

    def add_shared_builder(self, builder: Callable[[set[str]], None]) -> None:
        """``builder(changed_keys)`` is called on every rebuild with the changed document keys
        (policy keys and service keys), and once at start with ``{"*"}``."""
        self._shared_builders.append(builder)

    def add_routing_source(self, source: RoutingSource) -> None:
        """Routing overlays for services; consulted on every rebuild (before shared builders)."""
        self._routing_sources.append(source)

    def add_service_override(self, hook: Callable[[Service], Service]) -> None:
        """``hook(service) -> service`` adjusts a service before its clusters are built (outlier
        detection from circuit-breaker policies); a routing source reports which services to rebuild."""
        self._service_overrides.append(hook)

    def add_optional_route_filter(self, name: str, services: Callable[[], frozenset[str]]) -> None:
        """An outbound HTTP filter only some services need: ``services()`` names them. Routes to
        every other service switch the filter off, so their requests skip it at no cost. A routing
        source reports services whose answer changed (their routes are rebuilt)."""
        self._optional_filters[name] = services

    def add_optional_inbound_filter(self, name: str, wanted: Callable[[NodeInfo], bool]) -> None:
        """An inbound HTTP filter only some nodes need: the inbound routes of a node for which
        ``wanted(node)`` is false switch it off. Call ``refresh_inbound_routes`` when the answer changes."""
        self._optional_inbound[name] = wanted

    def refresh_inbound_routes(self, node_id: str) -> None:
        """Rebuild a node's inbound routes (an optional inbound filter's answer changed)."""
        node = self.nodes.get(node_id)
        if node is not None and not node.proxyless:
            self.cache.replace(TYPE.ROUTE, self._inbound_routes(node), scope=node.id)

    def _inbound_routes(self, node: NodeInfo) -> dict[str, Any]:
        if not (node.inbound_port and node.app_port):
            return {}
        off = sorted(name for name, wanted in self._optional_inbound.items() if not wanted(node))
        return {INBOUND_ROUTE: build_inbound_routes(node, off, self.health_token(node.id), sorted(self._optional_inbound))}

    def add_node_watcher(self, hook: Callable[[NodeInfo, bool], None]) -> None:
        """``hook(node, connected)`` after a node's first stream opens and after its last one closes."""
        self._node_watchers.append(hook)

    def service_routing(self, key: str) -> ServiceRouting | None:
        """The overlay to build the service with: a staged one while its new subsets warm up."""
        staged = self._staged.get(key)
        return staged[0] if staged is not None else self._source_routing(key)

    def _source_routing(self, key: str) -> ServiceRouting | None:
        for source in self._routing_sources:
            found = source.routing(key)
            if found is not None:
                return found
        return None

    def _optional_map(self) -> dict[str, frozenset[str]]:
        return {name: services() for name, services in self._optional_filters.items()}

    def _routing_map(self) -> dict[str, ServiceRouting]:
        out = {}
        for svc in self.registry.services():
            found = self.service_routing(svc.key)
            if found is not None:
                out[svc.key] = found
        return out

    def refresh_nodes(self) -> None:
        """Rebuild every connected node's own resources (after a per-node filter hook changed)."""
        for node in list(self.nodes.values()):
            self._build_node(node)

    # ---- change handling ----------------------------------------------------------------------

    def _on_change(self, change: Change) -> None:
        metrics.REGISTRY_WRITES.labels(change.kind).inc()
        if change.kind == "service":
            self._dirty.services.add(change.key)
        elif change.kind == "instance":
            self._dirty.endpoints.add(change.service)
        else:
            self._dirty.other.add(change.key)
        self._kick.set()

    async def _debounce(self) -> None:
        loop = asyncio.get_running_loop()
        quiet = self.settings.debounce_ms / 1000
        cap = self.settings.debounce_max_ms / 1000
        while True:
            await self._kick.wait()
            first = loop.time()
            while True:
                self._kick.clear()
                remaining = first + cap - loop.time()
                if remaining <= 0 or quiet <= 0:
                    break
                try:
                    async with asyncio.timeout(min(quiet, remaining)):
                        await self._kick.wait()
                except TimeoutError:
                    break
            self.flush()

    def flush(self) -> None:
        """Apply every pending change to the cache now."""
        dirty, self._dirty = self._dirty, _Dirty()
        if dirty:
            self._rebuild(dirty)

    def _rebuild(self, dirty: _Dirty) -> None:
        metrics.REBUILDS.inc()
        domain = self.settings.domain
        reg = self.registry
        rerouted: set[str] = set()  # services whose routing overlay changed
        for source in self._routing_sources:
            rerouted |= source.affected(dirty.other)
        rerouted = {k for k in rerouted | dirty.rerouted if reg.service(k) is not None}
        for key in rerouted:
            self._stage(key)
        for key in sorted(dirty.services | rerouted):
            svc = reg.service(key)
            old = self._published.get(key, set())
            if svc is None:
                self.cache.remove(TYPE.CLUSTER, old)
                self.cache.remove(TYPE.ENDPOINT, old)
                self.cache.remove(TYPE.DNS, [key])
                self._published.pop(key, None)
                continue
            built = svc
            for override in self._service_overrides:
                built = override(built)
            clusters = {cluster_name(svc, p, domain): build_cluster(built, p, domain) for p in svc.ports}
            clusters.update(
                (name, build_cluster(built, p, domain, subset.name)) for p, subset, name in self._subsets(svc)
            )
            stale = old - set(clusters)
            # endpoints before clusters: a new cluster finds its endpoints already in the cache
            self._put_endpoints(svc)
            self.cache.put(TYPE.CLUSTER, clusters)
            self.cache.remove(TYPE.CLUSTER, stale)
            self.cache.remove(TYPE.ENDPOINT, stale)
            self._published[key] = set(clusters)
            vip = self.settings.single_vip or svc.vip
            self.cache.put(TYPE.DNS, {dns_resource_name(svc): build_dns_service(svc, domain, vip, reg.vip6(svc))})
        for key in sorted(dirty.endpoints - dirty.services - rerouted):
            svc = reg.service(key)
            if svc is not None:
                self._put_endpoints(svc)
        if dirty.services or rerouted:
            self.cache.put(TYPE.ROUTE, {OUTBOUND_ROUTE: self._routes.build(reg.services(), domain, self._routing_map(), self._optional_map())})
        if dirty.services:
            for node in list(self.nodes.values()):
                if node.service_key in dirty.services or node.capture:  # capture chains list every VIP
                    self._build_node(node)
        changed = dirty.other | dirty.services | rerouted
        if changed:
            for builder in self._shared_builders:
                builder(changed)

    def _stage(self, key: str) -> None:
        """Publish an overlay whole, or, when it brings new subsets, first with them and the routes
        in force before (see the module docstring)."""
        new = self._source_routing(key)
        old = self._routing_in_full.get(key)
        known = {s.name for s in old.subsets} if old is not None else set()
        fresh = [s for s in new.subsets if s.name not in known] if new is not None else []
        pending = self._staged.pop(key, None)
        if pending is not None:
            pending[1].cancel()
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # a rebuild outside the served loop (tests, tools)
            loop = None
        if not fresh or self.subset_warmup_s <= 0 or loop is None or not self.nodes:  # nobody to warm up for
            if new is None:
                self._routing_in_full.pop(key, None)
            else:
                self._routing_in_full[key] = new
            return
        assert new is not None
        rules = old.rules if old is not None and old.ports == new.ports else ()
        staged = ServiceRouting(subsets=(*(old.subsets if old else ()), *fresh), rules=rules, ports=new.ports, source=new.source)
        timer = loop.call_later(self.subset_warmup_s, self._warmed_up, key, new)
        self._staged[key] = (staged, timer)

    def _warmed_up(self, key: str, routing: ServiceRouting) -> None:
        self._staged.pop(key, None)
        self._routing_in_full[key] = routing
        self._dirty.rerouted.add(key)
        self._kick.set()

    def _subsets(self, svc: Service) -> list[tuple[ServicePort, Subset, str]]:
        """(port, subset, cluster name) of every subset cluster the service's routing asks for."""
        routing = self.service_routing(svc.key)
        if routing is None:
            return []
        domain = self.settings.domain
        return [
            (p, subset, subset_cluster_name(svc, p, subset.name, domain))
            for p in svc.ports
            if routing.applies_to(p)
            for subset in routing.subsets
        ]

    def _put_endpoints(self, svc: Service) -> None:
        domain = self.settings.domain
        instances = self.registry.instances(svc.key)
        assignments = {cluster_name(svc, p, domain): build_endpoints(svc, p, instances, domain) for p in svc.ports}
        for p, subset, name in self._subsets(svc):
            assignments[name] = build_endpoints(svc, p, instances, domain, (subset.name, dict(subset.labels)))
        self.cache.put(TYPE.ENDPOINT, assignments)

    def build_all(self) -> None:
        self._routing_in_full = self._routing_map()  # nobody is connected yet: nothing to stage
        self._rebuild(_Dirty(services={s.key for s in self.registry.services()}))
        if not self.registry.services():
            self.cache.put(TYPE.ROUTE, {OUTBOUND_ROUTE: self._routes.build([], self.settings.domain, None, self._optional_map())})
        for builder in self._shared_builders:
            builder({"*"})

    # ---- nodes --------------------------------------------------------------------------------

    def _node_connected(self, node: NodeInfo) -> None:
        known = self.nodes.get(node.id)
        if known is not None and _has_listeners(known) and not _has_listeners(node):
            # another stream of the same node id that declares no listeners (a DNS-table client,
            # a debugging tool) must not take the node's listeners away
            return
        self.nodes[node.id] = node
        self._build_node(node)
        for watcher in self._node_watchers:
            watcher(node, True)

    def _node_gone(self, node: NodeInfo) -> None:
        self.nodes.pop(node.id, None)
        self.cache.drop_scope(node.id)
        for watcher in self._node_watchers:
            watcher(node, False)

    def node_filters(self, node: NodeInfo, direction: str) -> list[hcm.HttpFilter]:
        out: list[hcm.HttpFilter] = []
        for hook in self._node_filters:
            out.extend(hook(node, direction))
        return out

    def _build_node(self, node: NodeInfo) -> None:
        if node.proxyless:
            return
        listeners = {}
        clusters = {}
        if node.outbound_port:
            services = self.registry.services() if node.capture else ()
            listeners[OUTBOUND] = build_outbound_listener(node, self.node_filters(node, "outbound"), services, self.settings.domain)
        if node.inbound_port and node.app_port:
            svc = self.registry.service(node.service_key) if node.service else None
            protocol = "http"
            if svc is not None:
                protocol = next((p.protocol for p in svc.ports), "http")
            peers = sorted(self.trusted_peers) if self.trusted_peers is not None else None
            filters = self.node_filters(node, "inbound") if protocol != "tcp" else []
            listeners[INBOUND] = build_inbound_listener(node, filters, peers, protocol)
            clusters[inbound_cluster_name(node.app_port)] = build_inbound_cluster(node, protocol)
        self.cache.replace(TYPE.CLUSTER, clusters, scope=node.id)
        self.cache.replace(TYPE.ROUTE, self._inbound_routes(node), scope=node.id)  # before the listener that names them
        self.cache.replace(TYPE.LISTENER, listeners, scope=node.id)

    # ---- serving ------------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        self.build_all()
        server = grpc.aio.server(
            options=[
                ("grpc.http2.min_ping_interval_without_data_ms", 5000),
                ("grpc.http2.max_ping_strikes", 0),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                ("grpc.so_reuseport", 0),
            ]
        )
        server.add_generic_rpc_handlers(self._grpc_handlers)
        self.ports["xds"] = server.add_insecure_port(f"{s.listen_address}:{s.xds_port}")
        if not self.ports["xds"]:
            raise OSError(f"xds_port: cannot listen on {s.listen_address}:{s.xds_port}")
        await server.start()
        self._grpc = server
        from meshpilot.frontdoor import HttpLimits, connection_cap, raise_fd_limit, start_front_door

        doors = [HttpApp("api", s.api_port, self.api_app), *self._http_apps]
        # a flood on one HTTP port must leave descriptors for xDS and the rest of the process
        limits = HttpLimits(s.http_idle_timeout_s, connection_cap(s.http_max_connections, len(doors), raise_fd_limit()))
        for door in doors:
            app = door.factory()
            app.middlewares.append(_durable_answers(self.registry.store))
            runner, self.ports[door.name] = await start_front_door(app, s.listen_address, door.port, limits)
            self._runners.append(runner)
        self.ready.set()
        log.info("event=control_plane_ready %s", " ".join(f"{k}_port={v}" for k, v in self.ports.items()))

    async def stop(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        if self._grpc is not None:
            await self._grpc.stop(grace=0.5)
            self._grpc = None
        self.registry.store.close()

    async def run(self, ready_file: str | None = None) -> None:
        """Serve until cancelled."""
        await self.start()
        if ready_file:
            tmp = Path(ready_file + ".tmp")
            tmp.write_text(json.dumps({"pid": os.getpid(), **self.ports}))
            tmp.replace(ready_file)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(_supervise("debounce", self._debounce))
                for task in self._tasks:
                    tg.create_task(_supervise(task.name, task.run))
        finally:
            await self.stop()


def _has_listeners(node: NodeInfo) -> bool:
    return bool(node.outbound_port or (node.inbound_port and node.app_port))


def _durable_answers(store: Store) -> Any:
    """Middleware: a request is answered only once every write made before its answer is on disk
    (a write is acknowledged only when durable; a read never shows what a crash could undo)."""

    @web.middleware
    async def durable(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        finally:
            await store.sync()

    return durable


async def _supervise(name: str, factory: Callable[[], Any]) -> None:
    """Run a long-lived task; log and restart it (with a short back-off) if it fails."""
    delay = 0.1
    while True:
        try:
            await factory()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("event=task_failed task=%s restart_in=%.1fs", name, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
