"""The control-plane process: registry and store, change debouncing, translation into the cache,
the xDS gRPC server and the HTTP front doors, all on one asyncio loop.

Data flows one way (DESIGN.md): a write changes the registry, the registry emits a change, the
debouncer publishes a change to an idle control plane at once and collects the changes that follow
until ``debounce_ms`` pass without one (never longer than ``debounce_max_ms`` in total), then only
the resources the changes touch are rebuilt by translate/ and put into the cache, which tells the
subscribed streams. The control plane assembles its parts and owns their lifetimes: a
plugin contributes gRPC services (HDS), HTTP apps (Consul, Eureka), management API routes, tasks
and node watchers as a ``Part`` (parts.py), given to ``include``. What goes into the cache comes
from the publisher (publish/), its one writer, fed by producers the control plane assembles: the
registry's translation (publish/mesh.py), the policies (policy/mesh.py) and the proxyless clients'
resources (proxyless/producer.py).

Replicas: on a shared store (etcd) several control planes serve one mesh. Each takes in the others'
writes from the store's watch (``Registry.apply_remote``), so its caches follow the same events as if
the writes were its own; resource versions are content hashes, so an Envoy that moves to another
replica is not sent again what it has. A replica whose store is no longer current (cut off from etcd
for longer than its grace) stops claiming to be: it hands its xDS streams over (UNAVAILABLE, so clients
reconnect to another replica), refuses new ones, answers 503 on its HTTP ports (``/healthz`` says why)
until the store is current again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web

from meshpilot import metrics
from meshpilot.api.app import build_api
from meshpilot.api.routes import Handler, Route
from meshpilot.hds.metadata import SOURCE as SIDECAR_SOURCE
from meshpilot.hds.specifier import health_token
from meshpilot.parts import HttpApp, Part, Task
from meshpilot.pki import peer_from_context
from meshpilot.pki.admission import refusal
from meshpilot.policy.governance import REPLICAS
from meshpilot.policy.mesh import Policies
from meshpilot.proxyless.producer import ProxylessProducer
from meshpilot.publish import Changes, Debouncer, MeshProducer, Publisher
from meshpilot.registry import Change, Registry
from meshpilot.registry.open import open_store
from meshpilot.registry.store import Store
from meshpilot.settings import Settings
from meshpilot.xds.cache import ResourceCache
from meshpilot.xds.resource import NodeInfo
from meshpilot.xds.server import GRPC_SERVER_OPTIONS, MAX_REQUEST_BYTES, StreamError, XdsServer

__all__ = ["ControlPlane"]

log = logging.getLogger("meshpilot.controlplane")
_CHANGE_COUNTERS: dict[str, Any] = {}  # change kind -> its labelled counter

_HEALTH_KEY = "controlplane/health_key"  # meta table: the key of the nodes' health tokens (hex)

class ControlPlane:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic, store: Store | None = None) -> None:
        self.settings = settings
        self.registry = Registry(store if store is not None else open_store(settings.store), settings.vip_cidr, settings.vip6_cidr)
        registry = self.registry
        metrics.STORE_COMMITS.set_function(lambda: float(registry.store.commits))
        self.cache = ResourceCache()
        self.nodes: dict[str, NodeInfo] = {}
        self.xds = XdsServer(self.cache, self._node_connected, self._node_gone, write_timeout_s=settings.xds_write_timeout_s,
                             admit=self._admit if settings.identity else None)
        self.ports: dict[str, int] = {}
        self._grpc_handlers: list[grpc.GenericRpcHandler] = [self.xds.handler()]
        self._http_apps: list[HttpApp] = []
        self._api_routes: list[Route] = []
        self._node_watchers: list[Callable[[NodeInfo, bool], None]] = []
        self._tasks: list[Task] = []
        self._server_credentials: Callable[[], grpc.ServerCredentials] | None = None
        self._admission: Callable[[grpc.aio.ServicerContext[Any, Any]], tuple[grpc.StatusCode, str] | None] | None = None
        # a node's own health checks (HDS) carry its token; its inbound routes let them past every
        # optional inbound filter. On a shared store the key is kept in the store, so every replica gives
        # a node the same token (its routes from one replica, its health checks from another)
        self._health_key = self._shared_health_key()
        # the publisher and its producers, in the order they publish: the registry's translation
        # first (it takes in policy changes and stages new subsets), then what reads its overlays
        self.policies = Policies(registry=self.registry, domain=settings.domain, listen_address=settings.listen_address,
                                 nodes=self.nodes, ports=self.ports, routing=lambda key: self.mesh.service_routing(key),
                                 trust_domain=settings.trust_domain)
        self.mesh = MeshProducer(self.registry, settings.domain, self.nodes, self.policies, self.health_token,
                                 settings.single_vip, SIDECAR_SOURCE, identity=settings.identity,
                                 trust_domain=settings.trust_domain, mtls_mode=settings.mtls_mode)
        proxyless = ProxylessProducer(self.registry, settings.domain, self.mesh.service_routing, self.nodes, self.policies, self.mesh.tls)
        self.publisher = Publisher(
            self.cache,
            [self.mesh, *self.policies.producers, proxyless],
            Debouncer(settings.debounce_ms / 1000, settings.debounce_max_ms / 1000),
            clock,
        )
        self.include(Part(routes=self.policies.routes()))
        self._grpc: grpc.aio.Server | None = None
        self._runners: list[web.AppRunner] = []
        self.ready = asyncio.Event()
        # this process among the replicas of a shared store (its entry in the ``replicas`` table)
        self.replica_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self.current = True  # whether this replica's view of the store is current (always, on a local store)
        self.registry.subscribe(self._on_change)
        self.registry.subscribe(self._follow_health_key)

    # ---- assembly -----------------------------------------------------------------------------

    def include(self, part: Part) -> None:
        """Serve, run and tell what a plugin contributes (before ``start``)."""
        self._grpc_handlers.extend(part.grpc_handlers)
        self._http_apps.extend(part.http_apps)
        self._api_routes.extend(part.routes)
        self._tasks.extend(part.tasks)
        self._node_watchers.extend(part.node_watchers)
        if part.server_credentials is not None:
            if self._server_credentials is not None:
                raise ValueError("two parts give the xDS port's TLS credentials")
            self._server_credentials = part.server_credentials
        if part.admission is not None:
            if self._admission is not None:
                raise ValueError("two parts give the streams' admission check")
            self._admission = part.admission

    def _shared_health_key(self) -> bytes:
        if not self.registry.store.shared:
            return secrets.token_bytes(32)  # one control plane: a new key each start, kept nowhere
        stored = self.registry.store.get("meta", _HEALTH_KEY)
        if isinstance(stored, str) and len(stored) == 64:
            return bytes.fromhex(stored)
        key = secrets.token_bytes(32)
        self.registry.store.write({("meta", _HEALTH_KEY): key.hex()})
        return key

    def _follow_health_key(self, change: Change) -> None:
        """Another replica wrote the health key (replicas that started together on an empty store each
        made one; the store keeps the last): use it, and give every node its routes again."""
        if change.remote and change.kind == "document" and change.table == "meta" and change.key == _HEALTH_KEY:
            key = self._shared_health_key()
            if key != self._health_key:
                self._health_key = key
                self.publisher.note(Changes(nodes=set(self.nodes)))

    def health_token(self, node_id: str) -> str:
        """The node's health token: its HDS checks carry it, its inbound routes match it."""
        return health_token(self._health_key, node_id)

    def api_app(self) -> web.Application:
        """The management API with every route the assembled parts contributed."""
        return build_api(self.settings, self.registry, self.xds, self._api_routes, self.ports, self.publisher.inject)

    # ---- change handling ----------------------------------------------------------------------

    def _on_change(self, change: Change) -> None:
        counter = _CHANGE_COUNTERS.get(change.kind)
        if counter is None:  # looking a labelled child up costs more than counting: once per kind
            counter = _CHANGE_COUNTERS[change.kind] = metrics.REGISTRY_WRITES.labels(change.kind)
        counter.inc()
        if change.kind == "service":
            self.publisher.note(Changes(services={change.key}))
        elif change.kind == "instance":
            self.publisher.note(Changes(endpoints={change.service}, instances={change.key}))
        elif change.kind == "policy":
            self.publisher.note(Changes(other={change.key}))
        elif change.kind == "document" and change.table == REPLICAS:
            # a replica came or went: the cluster of every replica's API is published again
            self.publisher.note(Changes(other={f"{REPLICAS}/{change.key}"}))
        # Consul KV and sessions are no producer's input: a KV write publishes nothing

    def publishing(self, service_key: str) -> bool:
        """Whether a change to the service waits behind the debounce, not yet in the cache."""
        return self.publisher.pending_for(service_key)

    def flush(self) -> None:
        """Apply every pending change to the cache now."""
        self.publisher.flush()

    def build_all(self) -> None:
        """Publish everything (at start, before any node is connected)."""
        self.publisher.publish(Changes(everything=True))

    # ---- nodes --------------------------------------------------------------------------------

    def disconnect(self, node_id: str, reason: str) -> None:
        """End the node's xDS streams now (its enrolment was removed, say); it reconnects only with
        a certificate the control plane still accepts."""
        n = self.xds.disconnect(node_id, reason)
        log.warning("event=node_disconnected node=%s streams=%d reason=%s", node_id, n, reason)

    def caller_refusal(self, context: grpc.aio.ServicerContext[Any, Any]) -> tuple[grpc.StatusCode, str] | None:
        """Why a stream's client certificate may not speak now (the mesh CA's part judges: its node's
        enrolment removed, a certificate it no longer stands for), or None."""
        return self._admission(context) if self._admission is not None else None

    def _admit(self, context: grpc.aio.ServicerContext[Any, Any], node: NodeInfo) -> tuple[str, float]:
        """With identity on: a stream speaks only for the node (and service) of its client certificate,
        and only while the certificate's enrolment stands."""
        peer = peer_from_context(context)
        no = refusal(peer, self.settings.trust_domain, node.id, node.service, node.namespace)
        code, reason = (grpc.StatusCode.PERMISSION_DENIED if no.authenticated else grpc.StatusCode.UNAUTHENTICATED, no.reason) \
            if no is not None else (self.caller_refusal(context) or (None, ""))
        if code is not None:
            metrics.XDS_REFUSED.labels("denied" if code == grpc.StatusCode.PERMISSION_DENIED else "unauthenticated").inc()
            log.warning("event=stream_refused node=%s peer=%s identity=%s reason=%s", node.id, context.peer(),
                        peer.spiffe if peer else "-", reason)
            raise StreamError(reason, code)
        assert peer is not None
        return peer.spiffe, peer.not_after

    def _node_connected(self, node: NodeInfo) -> None:
        known = self.nodes.get(node.id)
        if known is not None and _has_listeners(known) and not _has_listeners(node):
            # another stream of the same node id that declares no listeners (a DNS-table client,
            # a debugging tool) must not take the node's listeners away
            return
        self.nodes[node.id] = node
        self.publisher.publish(Changes(nodes={node.id}))  # the stream waits for them: at once
        for watcher in self._node_watchers:
            watcher(node, True)

    def _node_gone(self, node: NodeInfo) -> None:
        self.nodes.pop(node.id, None)
        self.publisher.forget_scope(node.id)
        self.publisher.publish(Changes(nodes={node.id}))  # e.g. its service's limits are re-divided
        for watcher in self._node_watchers:
            watcher(node, False)

    # ---- serving ------------------------------------------------------------------------------

    # ---- replicas -----------------------------------------------------------------------------

    def check_current(self) -> bool:
        """Follow the store's currency: hand the streams over when it is lost, serve again once it
        is back. Whether this replica is current."""
        now = self.registry.store.current()
        if now != self.current:
            self.current = now
            metrics.STORE_CURRENT.set(1 if now else 0)
            if now:
                self.xds.resume()
                log.warning("event=replica_current store=%s", _store_name(self.settings.store))
            else:
                n = self.xds.hand_over("this control-plane replica lost its store; reconnect to another replica")
                log.error("event=replica_not_current store=%s streams_handed_over=%d", _store_name(self.settings.store), n)
        return now

    async def _follow_store(self) -> None:
        while True:
            self.check_current()
            await asyncio.sleep(0.5)

    def grpc_options(self) -> list[tuple[str, Any]]:
        """The xDS port's grpc server options."""
        s = self.settings
        options: list[tuple[str, Any]] = [
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
            ("grpc.http2.max_ping_strikes", 0),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
            ("grpc.so_reuseport", 0),
            # a fleet reconnecting at once: grpc refuses calls the loop has not taken yet beyond its
            # default queue (measured: 150-250 of 2,000 streams opened together)
            *GRPC_SERVER_OPTIONS,
        ]
        if s.identity:
            # A connection is authenticated by the certificate of its handshake. Agents renew at half
            # of a certificate's life, so one in use has at least half of it left: a connection that
            # lives at most a quarter of it ends (GOAWAY, then its streams) before its certificate
            # does, and the client comes back with the renewed one. A stream whose certificate
            # expires anyway is ended by the server (XdsServer, HdsServer).
            options += [
                ("grpc.max_connection_age_ms", int(s.workload_cert_ttl_s * 1000 / 4)),
                ("grpc.max_connection_age_grace_ms", 5000),
            ]
        return options

    async def start(self) -> None:
        s = self.settings
        self.registry.store.watch(asyncio.get_running_loop(), self.registry.apply_remote)
        self.build_all()
        server = grpc.aio.server(options=self.grpc_options())
        server.add_generic_rpc_handlers(self._grpc_handlers)
        if s.identity:
            # no plaintext port: every client proves who it is (enrolment by join token, the rest by certificate)
            if self._server_credentials is None:
                raise RuntimeError("identity is on, but no part gives the xDS port's TLS credentials (the mesh CA's plugin)")
            self.ports["xds"] = server.add_secure_port(f"{s.listen_address}:{s.xds_port}", self._server_credentials())
        else:
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
            app.middlewares.append(_current_only(self))
            app.middlewares.append(_durable_answers(self.registry.store))
            runner, self.ports[door.name] = await start_front_door(app, s.listen_address, door.port, limits)
            self._runners.append(runner)
        self._announce()
        self.ready.set()
        log.info("event=control_plane_ready %s", " ".join(f"{k}_port={v}" for k, v in self.ports.items()))

    def _announce(self) -> None:
        """Tell the other replicas (and the Envoys, through ``meshpilot-api``) where this one serves; the
        entry lives as long as this process keeps its lease on a shared store."""
        host = self.policies.governance.api_host
        self.registry.store.write({(REPLICAS, self.replica_id): {
            "api": [host, self.ports["api"]], "xds": [host, self.ports["xds"]], "started_at": time.time()}})
        self.publisher.note(Changes(other={f"{REPLICAS}/{self.replica_id}"}))

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
                tg.create_task(_supervise("publish", self.publisher.run))
                if self.registry.store.shared:
                    tg.create_task(_supervise("follow-store", self._follow_store))
                for task in self._tasks:
                    tg.create_task(_supervise(task.name, task.run))
        finally:
            await self.stop()


def _has_listeners(node: NodeInfo) -> bool:
    return bool(node.outbound_port or (node.inbound_port and node.app_port))


def _store_name(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "sqlite"


# answered while the replica is not current: what lets a probe and a scraper see why
_ALWAYS_OPEN = frozenset({"/metrics"})


def _current_only(cp: ControlPlane) -> Any:
    """Middleware: while the replica's store is not current, every request is answered 503 (a read
    could be stale, a write would not be durable) and ``/healthz`` says so; clients try another replica."""

    @web.middleware
    async def current_only(request: web.Request, handler: Handler) -> web.StreamResponse:
        if cp.current or request.path in _ALWAYS_OPEN:
            return await handler(request)
        return web.json_response({"status": "not current", "error": "this control-plane replica has lost its store "
                                  f"({_store_name(cp.settings.store)}); use another replica"}, status=503,
                                 headers={"Retry-After": "1"})

    return current_only


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
