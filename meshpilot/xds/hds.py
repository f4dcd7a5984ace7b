"""The Health Discovery Service: how sidecar apps join the registry and report their health.

A sidecar's Envoy opens ``envoy.service.health.v3.HealthDiscoveryService/StreamHealthCheck``. Its
first message carries the node; from the node's metadata (written by ``meshpilot sidecar``) the
server registers the node's app as an instance (source ``mesh``, a critical ``hds`` check owned by
``hds``) and answers with a HealthCheckSpecifier telling that Envoy to check its own app. Envoy then
reports EndpointHealthResponses every specifier interval; those drive the ``hds`` check, so the
instance enters EDS only after its first HEALTHY report (DESIGN.md: lossless publish).

An HTTP check goes through the node's inbound listener and carries ``x-mesh-health-check``
with the node's health token (an HMAC of its id under a key this control plane draws at start), which
the node's inbound routes match to skip the governance filters: a rate limit must never fail the
check that keeps the instance in EDS, and a caller cannot forge a token it never sees.

The core is pure (``registration``, ``build_specifier``, ``health_token``, ``HdsSession``, ``Liveness``): node
metadata and reports in, registry values out. The gRPC handler keeps per-stream state outside its
receive loop (only the first message carries the node) and the liveness sweep marks the instance of
a lost stream critical after ``hds_critical_after_s`` (longer than Envoy's 30 s HDS reconnect
back-off), or after ``hds_dead_after_s`` once the node's ADS stream has been closed as long too (a
dead sidecar: outlier detection ejects it for 30 s, and it must leave EDS before that ends), and
deregisters it after ``hds_remove_after_s``. The module also adds the read-only
``GET /v1/services/{namespace}/{name}/synced`` endpoint the sidecar agent polls during graceful
offline: whether every Envoy subscribed to the service's endpoints has ACKed their current version.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import grpc
from envoy.config.core.v3 import address_pb2, base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2
from envoy.service.health.v3 import hds_pb2
from google.protobuf import duration_pb2, json_format

from meshpilot.model import Check, CheckStatus, Instance, ValidationError, field_errors
from meshpilot.registry import Change, Registry, RegistryError
from meshpilot.translate.listeners import HEALTH_HEADER
from meshpilot.translate.names import TYPE, cluster_name
from meshpilot.translate.node import NodeInfo, node_info

if TYPE_CHECKING:
    from aiohttp import web

    from meshpilot.controlplane import ControlPlane
    from meshpilot.xds.server import XdsServer

__all__ = [
    "CHECK_ID",
    "HDS_SERVICE",
    "CheckPlan",
    "HdsError",
    "HdsServer",
    "HdsSession",
    "Liveness",
    "Registration",
    "build_specifier",
    "health_token",
    "install",
    "registration",
    "synced",
]

log = logging.getLogger("meshpilot.hds")

HDS_SERVICE = "envoy.service.health.v3.HealthDiscoveryService"
CHECK_ID = "hds"
OWNER = "hds"
SOURCE = "mesh"


class HdsError(ValueError):
    """Node metadata that cannot describe an instance; names the metadata field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"node.metadata.{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True, slots=True)
class CheckPlan:
    """What the node's Envoy is told to check, and how often."""

    kind: Literal["http", "tcp"]
    address: str
    port: int
    path: str = "/"
    host: str = ""
    interval_s: float = 5.0
    timeout_s: float = 1.0
    healthy_threshold: int = 1
    unhealthy_threshold: int = 3

    @property
    def cycle_s(self) -> float:
        """One check: Envoy reports a host failed until its first check has completed."""
        return self.interval_s + self.timeout_s


@dataclass(frozen=True, slots=True)
class Registration:
    instance: Instance
    plan: CheckPlan

    @property
    def cluster(self) -> str:
        return f"hds|{self.instance.id}"


def _number(md: dict[str, Any], key: str, default: float, lo: float, hi: float, where: str) -> float:
    v = md.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise HdsError(f"{where}.{key}", f"must be a number between {lo} and {hi}")
    try:
        n = float(v)
    except ValueError:
        raise HdsError(f"{where}.{key}", f"must be a number between {lo} and {hi}, got {v!r}") from None
    if not lo <= n <= hi or n != n:
        raise HdsError(f"{where}.{key}", f"must be between {lo} and {hi}, got {v!r}")
    return n


def _str_map(v: Any, where: str) -> dict[str, str]:
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise HdsError(where, "must be a mapping of strings to strings")
    return dict(v)


def _wildcard(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_unspecified
    except ValueError:
        return False


def registration(node: NodeInfo) -> Registration:
    """The instance a sidecar node stands for and the check its Envoy must run. Pure."""
    md = node.extra if isinstance(node.extra, dict) else {}
    if not node.service:
        raise HdsError("SERVICE", "a sidecar node must name its service")
    if not node.inbound_port:
        raise HdsError("INBOUND_PORT", "a sidecar node needs an inbound port between 1 and 65535")
    if not node.app_port:
        raise HdsError("APP_PORT", "a sidecar node needs its app's port between 1 and 65535")
    address = node.address
    if _wildcard(address):
        raise HdsError("ADVERTISE_ADDRESS", f"BIND_ADDRESS is {address}; set an address callers can reach")
    port_name = md.get("PORT_NAME", "http")
    if not isinstance(port_name, str) or not port_name:
        raise HdsError("PORT_NAME", "must be the name of one of the service's ports")
    hc = md.get("HEALTH_CHECK", {})
    if not isinstance(hc, dict):
        raise HdsError("HEALTH_CHECK", "must be a mapping")
    kind = hc.get("kind", "tcp")
    if kind not in ("http", "tcp"):
        raise HdsError("HEALTH_CHECK.kind", f"must be 'http' or 'tcp', got {kind!r}")
    path = hc.get("path", "/")
    if not isinstance(path, str) or not path.startswith("/") or len(path) > 1024:
        raise HdsError("HEALTH_CHECK.path", "must be an absolute path such as /healthz")
    w = "HEALTH_CHECK"
    interval = _number(hc, "interval_s", 5.0, 0.05, 3600, w)
    timeout = _number(hc, "timeout_s", 1.0, 0.01, 600, w)
    healthy = int(_number(hc, "healthy_threshold", 1, 1, 100, w))
    unhealthy = int(_number(hc, "unhealthy_threshold", 3, 1, 100, w))
    weight = int(_number(md, "WEIGHT", 100, 1, 10_000, "") if "WEIGHT" in md else 100)
    if kind == "http":
        # through the inbound listener: healthy then means callers can reach the app
        check_addr = "127.0.0.1" if _wildcard(node.bind_address) else node.bind_address
        check_port = node.inbound_port
    else:
        check_addr, check_port = node.app_address, node.app_port
    plan = CheckPlan(kind, check_addr, check_port, path, node.service, interval, timeout, healthy, unhealthy)
    try:
        inst = Instance(
            id=node.id,
            service=node.service,
            namespace=node.namespace,
            node=node.id,
            address=address,
            ports={port_name: node.inbound_port},
            zone=node.zone,
            weight=weight,
            labels=_str_map(md.get("LABELS"), "LABELS"),
            metadata={"sidecar": "true"},
            source=SOURCE,
            checks=[Check(id=CHECK_ID, owner=OWNER, status=CheckStatus.critical, output="waiting for the first health report")],
        )
    except ValidationError as exc:
        f = field_errors(exc)[0]
        raise HdsError(f["field"], f["reason"]) from None
    return Registration(inst, plan)


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


_STATUS = {
    health_check_pb2.HEALTHY: CheckStatus.passing,
    health_check_pb2.DEGRADED: CheckStatus.warning,
    health_check_pb2.UNHEALTHY: CheckStatus.critical,
    health_check_pb2.DRAINING: CheckStatus.critical,
    health_check_pb2.TIMEOUT: CheckStatus.critical,
}


@dataclass(slots=True)
class HdsSession:
    """One HDS stream after its first message: reports in, check status (or nothing new) out."""

    registration: Registration
    started: float
    seen_healthy: bool = False
    reports: int = 0
    last: CheckStatus | None = None
    # a reconnect of an instance that was passing: its restarted Envoy checks through its own
    # inbound listener, which warms (filter configs, WASM code) before it accepts connections
    resumed: bool = False
    warmup_s: float = 10.0

    def report(self, resp: hds_pb2.EndpointHealthResponse, now: float) -> CheckStatus | None:
        """The status this report sets for the ``hds`` check, or None when it says nothing new."""
        status = self._status_in(resp)
        if status is None:
            return None
        self.reports += 1
        if status is CheckStatus.passing:
            self.seen_healthy = True
        elif not self.seen_healthy and now - self.started < self.registration.plan.cycle_s:
            # Envoy reports a host failed until its first check completes
            return None
        elif not self.seen_healthy and self.resumed and now - self.started < self.warmup_s:
            return None
        if status == self.last:
            return None
        self.last = status
        return status

    def _status_in(self, resp: hds_pb2.EndpointHealthResponse) -> CheckStatus | None:
        want = self.registration.cluster
        for c in resp.cluster_endpoints_health:
            if c.cluster_name != want:
                continue
            worst: CheckStatus | None = None
            for loc in c.locality_endpoints_health:
                for eh in loc.endpoints_health:
                    s = _STATUS.get(eh.health_status)
                    if s is not None and (worst is None or s.rank > worst.rank):
                        worst = s
            return worst
        return None


@dataclass(slots=True)
class Liveness:
    """Which nodes have an open HDS stream, and since when the others have had none. Pure.

    A node whose HDS stream closed goes critical after ``critical_after_s``, or after
    ``dead_after_s`` when its Envoy's ADS stream (``ads``) has been closed as long too: both streams
    closing is what a dead sidecar looks like (kill -9, a crashed VM), while a reconnecting Envoy
    opens them again within its back-off. Instances that were merely absent when this process
    started (no close seen) get only the long grace: after a control-plane restart every sidecar
    reconnects at its own pace."""

    critical_after_s: float
    remove_after_s: float
    dead_after_s: float = 0.0  # 0: no faster path
    open: dict[str, int] = field(default_factory=dict)
    lost_at: dict[str, float] = field(default_factory=dict)
    marked: set[str] = field(default_factory=set)
    closed_here: set[str] = field(default_factory=set)
    ads: set[str] = field(default_factory=set)
    ads_lost_at: dict[str, float] = field(default_factory=dict)

    def opened(self, instance_id: str) -> None:
        self.open[instance_id] = self.open.get(instance_id, 0) + 1
        self.lost_at.pop(instance_id, None)
        self.marked.discard(instance_id)
        self.closed_here.discard(instance_id)

    def closed(self, instance_id: str, now: float) -> None:
        n = self.open.get(instance_id, 0) - 1
        if n > 0:
            self.open[instance_id] = n
            return
        self.open.pop(instance_id, None)
        self.lost_at[instance_id] = now
        self.closed_here.add(instance_id)

    def ads_changed(self, node_id: str, connected: bool, now: float) -> None:
        """The node's first ADS stream opened (True) or its last one closed (False)."""
        if connected:
            self.ads.add(node_id)
            self.ads_lost_at.pop(node_id, None)
        else:
            self.ads.discard(node_id)
            self.ads_lost_at[node_id] = now

    def forget(self, instance_id: str) -> None:
        self.lost_at.pop(instance_id, None)
        self.marked.discard(instance_id)
        self.closed_here.discard(instance_id)

    def _dead(self, iid: str, at: float, now: float) -> bool:
        if not self.dead_after_s or iid not in self.closed_here or iid in self.ads:
            return False
        return now - max(at, self.ads_lost_at.get(iid, at)) >= self.dead_after_s

    def due(self, now: float) -> tuple[list[str], list[str]]:
        """(instances to mark critical now, instances to remove now)."""
        critical, remove = [], []
        for iid, at in sorted(self.lost_at.items()):
            age = now - at
            if age >= self.remove_after_s:
                remove.append(iid)
            elif iid not in self.marked and (age >= self.critical_after_s or self._dead(iid, at, now)):
                critical.append(iid)
        for iid in remove:
            self.forget(iid)
        self.marked.update(critical)
        for nid, at in list(self.ads_lost_at.items()):
            if now - at >= self.remove_after_s and nid not in self.lost_at:
                del self.ads_lost_at[nid]  # nodes that never return: keep the map bounded
        return critical, remove


def synced(xds: XdsServer, cluster_names: set[str]) -> dict[str, Any]:
    """Whether every stream subscribed to these EDS resources has ACKed their current version.

    Read-only view over the ADS streams: delta streams ACK per resource, sotw streams per
    response (whose version hashes the subscribed set).
    """
    pending: list[str] = []
    consumers = 0
    for h in list(xds.streams.values()):
        m = h.machine
        ts = m.types.get(TYPE.ENDPOINT)
        if ts is None:
            continue
        names = cluster_names & ts.names if not ts.wildcard else set(cluster_names)
        if not names:
            continue
        consumers += 1
        node = h.node.id if h.node else f"stream-{h.id}"
        if m.kind == "DELTA_GRPC":
            for n in names:
                e = xds.cache.get(TYPE.ENDPOINT, n, m.node_id)
                acked = ts.acked_resource(n) if hasattr(ts, "acked_resource") else ts.acked.get(n)
                if e is not None and acked != e.version:
                    pending.append(node)
                    break
        else:
            version, _ = xds.cache.sotw_body(TYPE.ENDPOINT, m.node_id, None if ts.wildcard else frozenset(ts.names))
            if ts.acked_version != version:
                pending.append(node)
    return {"synced": not pending, "consumers": consumers, "pending": sorted(set(pending))}


class HdsServer:
    """The gRPC side: moves messages between Envoy and the pure core, and writes the registry."""

    def __init__(
        self, registry: Registry, report_interval_s: float, critical_after_s: float, remove_after_s: float, dead_after_s: float = 0.0
    ) -> None:
        self.registry = registry
        self.report_interval_s = report_interval_s
        self.liveness = Liveness(critical_after_s, remove_after_s, dead_after_s)
        self.sessions: dict[int, HdsSession] = {}
        self._next = 0
        self._key = secrets.token_bytes(32)
        now = time.monotonic()
        # instances registered before a restart must reconnect within the same bounds
        for inst in registry.instances():
            if inst.source == SOURCE:
                self.liveness.lost_at[inst.id] = now

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            HDS_SERVICE,
            {
                "StreamHealthCheck": grpc.stream_stream_rpc_method_handler(
                    self._stream,
                    request_deserializer=hds_pb2.HealthCheckRequestOrEndpointHealthResponse.FromString,
                    response_serializer=hds_pb2.HealthCheckSpecifier.SerializeToString,
                ),
                "FetchHealthCheck": grpc.unary_unary_rpc_method_handler(
                    self._fetch,
                    request_deserializer=hds_pb2.HealthCheckRequestOrEndpointHealthResponse.FromString,
                    response_serializer=hds_pb2.HealthCheckSpecifier.SerializeToString,
                ),
            },
        )

    async def _fetch(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "use StreamHealthCheck")

    def token(self, node_id: str) -> str:
        """The node's health token (its inbound routes and its checks agree on it)."""
        return health_token(self._key, node_id)

    def _register(self, reg: Registration) -> None:
        inst = reg.instance
        old = self.registry.instance(inst.id)
        if old is not None and old.source == SOURCE:
            # a reconnect (Envoy restarted): keep the current hds check, no churn in EDS
            inst = inst.model_copy(update={"checks": []})
        self.registry.register(inst, replace=True)

    def _apply(self, session: HdsSession, status: CheckStatus) -> None:
        iid = session.registration.instance.id
        if self.registry.instance(iid) is None:
            return  # deregistered (graceful offline): reports no longer matter
        out = "health check passing" if status is CheckStatus.passing else f"health check {status.value}"
        self.registry.set_check(iid, Check(id=CHECK_ID, owner=OWNER, status=status, output=out))
        log.info("event=hds_health instance=%s status=%s", iid, status.value)

    async def _stream(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
        self._next += 1
        sid = self._next
        iid = ""
        try:
            async for msg in requests:
                session = self.sessions.get(sid)
                if session is None:
                    if not msg.HasField("health_check_request") or not msg.health_check_request.node.id:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be a HealthCheckRequest carrying node.id")
                    n = msg.health_check_request.node
                    md = json_format.MessageToDict(n.metadata) if n.HasField("metadata") else {}
                    try:
                        reg = registration(node_info(n.id, n.cluster, md, n.locality.zone))
                        before = self.registry.instance(reg.instance.id)
                        resumed = before is not None and before.source == SOURCE and before.routable
                        self._register(reg)
                    except (HdsError, RegistryError) as exc:
                        log.warning("event=hds_rejected node=%s reason=%s", n.id, exc)
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                    session = HdsSession(reg, time.monotonic(), resumed=resumed)
                    self.sessions[sid] = session
                    iid = reg.instance.id
                    self.liveness.opened(iid)
                    log.info("event=hds_open instance=%s check=%s:%s:%d", iid, reg.plan.kind, reg.plan.address, reg.plan.port)
                    await context.write(build_specifier(reg, self.report_interval_s, self.token(iid)))
                    continue
                if msg.HasField("endpoint_health_response"):
                    status = session.report(msg.endpoint_health_response, time.monotonic())
                    if status is not None:
                        try:
                            self._apply(session, status)
                        except RegistryError as exc:
                            log.warning("event=hds_update_failed instance=%s reason=%s", iid, exc)
        finally:
            self.sessions.pop(sid, None)
            if iid:
                self.liveness.closed(iid, time.monotonic())
                log.info("event=hds_closed instance=%s", iid)

    def on_change(self, change: Change) -> None:
        if change.kind == "instance" and change.op == "delete":
            self.liveness.forget(change.key)

    def sweep(self, now: float) -> None:
        critical, remove = self.liveness.due(now)
        for iid in critical:
            inst = self.registry.instance(iid)
            if inst is not None and inst.source == SOURCE:
                self.registry.set_check(iid, Check(id=CHECK_ID, owner=OWNER, status=CheckStatus.critical, output="health stream lost"))
                log.warning("event=hds_lost instance=%s action=critical ads_open=%s", iid, iid in self.liveness.ads)
        for iid in remove:
            inst = self.registry.instance(iid)
            if inst is not None and inst.source == SOURCE:
                self.registry.deregister(iid, SOURCE)
                log.warning("event=hds_lost instance=%s action=removed", iid)

    async def run_sweeps(self) -> None:
        lv = self.liveness
        period = max(0.05, min(1.0, lv.critical_after_s / 5, (lv.dead_after_s or 1e9) / 10))
        while True:
            await asyncio.sleep(period)
            self.sweep(time.monotonic())


def install(cp: ControlPlane) -> None:
    """Serve HDS on the xDS port and add the graceful-offline sync endpoint to the API."""
    from aiohttp import web

    from meshpilot.api.app import ApiError, api_routes

    s = cp.settings
    server = HdsServer(cp.registry, s.hds_interval_s, s.hds_critical_after_s, s.hds_remove_after_s, s.hds_dead_after_s)
    cp.registry.subscribe(server.on_change)
    cp.add_node_watcher(lambda node, connected: server.liveness.ads_changed(node.id, connected, time.monotonic()))
    cp.health_token = server.token

    # sidecar instance id -> address, kept up to date from change events (no registry scans)
    sidecars = {i.id: i.address for i in cp.registry.iter_instances() if i.source == SOURCE}
    cp.trusted_peers = frozenset(sidecars.values())

    def on_instance(change: Change) -> None:
        if change.kind != "instance":
            return
        inst = cp.registry.instance(change.key)
        if inst is not None and inst.source == SOURCE:
            if sidecars.get(inst.id) == inst.address:
                return  # the common case: a known sidecar address
            sidecars[inst.id] = inst.address
        elif sidecars.pop(change.key, None) is None:
            return  # not a sidecar instance: nothing to do
        peers = frozenset(sidecars.values())
        if peers != cp.trusted_peers:
            cp.trusted_peers = peers
            cp.refresh_nodes()

    cp.registry.subscribe(on_instance)
    cp.add_grpc_handler(server.handler())

    async def sweeps() -> None:
        await server.run_sweeps()

    sweeps.__name__ = "hds_sweeps"
    cp.add_task(sweeps)

    async def service_synced(request: web.Request) -> web.Response:
        key = f"{request.match_info['name']}.{request.match_info['namespace']}".lower()
        svc = cp.registry.service(key)
        if svc is None:
            raise ApiError(404, f"service: no service {key!r}", [{"field": "service", "reason": "not found"}])
        cp.flush()  # the registry's latest state must be in the cache before it can be ACKed
        names = {cluster_name(svc, p, s.domain) for p in svc.ports}
        return web.json_response({"service": key, **synced(cp.xds, names)})

    route = ("GET", "/v1/services/{namespace}/{name}/synced", service_synced,
             "Whether every Envoy consuming the service's endpoints has ACKed their current version", None)
    # one control plane per process: a newer one replaces the route of an older one
    api_routes[:] = [r for r in api_routes if (r[0], r[1]) != (route[0], route[1])]
    api_routes.append(route)
    cp.hds = server  # type: ignore[attr-defined]
