"""The control plane's own logic, in process: debouncing, node resources, the DNS table."""

from __future__ import annotations

import asyncio

from meshpilot.controlplane import ControlPlane
from meshpilot.meshdns import dns_pb2
from meshpilot.model import Instance, Service
from meshpilot.settings import Settings
from meshpilot.translate.names import OUTBOUND_ROUTE
from meshpilot.translate.routes import RouteRule, ServiceRouting, Subset
from meshpilot.xds.resource import TYPE, NodeInfo


def _cp(**kw: object) -> ControlPlane:
    return ControlPlane(Settings(store="memory:", consul_port=None, eureka_port=None, **kw))


def _count_rebuilds(cp: ControlPlane) -> list[int]:
    calls: list[int] = []
    original = cp._rebuild

    def counting(dirty):  # type: ignore[no-untyped-def]
        calls.append(len(dirty.endpoints))
        original(dirty)

    cp._rebuild = counting  # type: ignore[method-assign]
    return calls


async def test_a_burst_of_registrations_becomes_one_rebuild() -> None:
    cp = _cp(debounce_ms=50, debounce_max_ms=2000)
    cp.registry.put_service(Service(name="web", ports=[{"name": "http", "port": 80}]))
    cp.build_all()
    calls = _count_rebuilds(cp)
    task = asyncio.create_task(cp._debounce())
    try:
        for i in range(300):
            cp.registry.register(Instance(id=f"w{i}", service="web", address="10.0.0.1", ports={"http": 1000 + i}))
        await asyncio.sleep(0.3)
        assert len(calls) == 1, f"expected one rebuild for 300 registrations, got {len(calls)}"
        assert len(cp.cache.get(TYPE.ENDPOINT, "outbound|80||web.default.svc.mesh").any_bytes) > 300 * 10
    finally:
        task.cancel()


async def test_a_steady_stream_of_changes_is_flushed_at_the_cap() -> None:
    cp = _cp(debounce_ms=100, debounce_max_ms=150)
    cp.registry.put_service(Service(name="web", ports=[{"name": "http", "port": 80}]))
    cp.build_all()
    calls = _count_rebuilds(cp)
    task = asyncio.create_task(cp._debounce())
    try:
        for i in range(40):  # a change every 20 ms never leaves 100 ms of quiet
            cp.registry.register(Instance(id=f"w{i}", service="web", address="10.0.0.1", ports={"http": 1000 + i}))
            await asyncio.sleep(0.02)
        assert len(calls) >= 3, f"expected flushes at the 150 ms cap during 0.8 s of changes, got {len(calls)}"
    finally:
        task.cancel()


def test_a_second_stream_without_listeners_keeps_the_nodes_listeners() -> None:
    cp = _cp()
    cp.build_all()
    sidecar = NodeInfo(id="n1", service="web", outbound_port=15001, inbound_port=15006, app_port=8080)
    cp._node_connected(sidecar)
    assert cp.cache.names(TYPE.LISTENER, "n1") == ["inbound", "outbound"]
    cp._node_connected(NodeInfo(id="n1"))  # e.g. a DNS-table client reusing the node id
    assert cp.cache.names(TYPE.LISTENER, "n1") == ["inbound", "outbound"]
    assert cp.nodes["n1"] == sidecar


def test_dns_table_carries_the_vips_or_the_single_vip() -> None:
    cp = _cp(vip6_cidr="fd00:240::/112")
    svc = cp.registry.put_service(Service(name="web", namespace="shop", ports=[{"name": "http", "port": 80}, {"name": "db", "port": 5432, "protocol": "tcp"}]))
    cp.build_all()
    entry = dns_pb2.DnsService.FromString(_value(cp.cache.get(TYPE.DNS, "web.shop").any_bytes))
    assert (entry.name, entry.namespace, entry.domain, entry.vip) == ("web", "shop", "mesh", svc.vip)
    assert entry.vip6.startswith("fd00:240::") and entry.vip6 == cp.registry.vip6(svc)
    assert [(p.name, p.port, p.protocol) for p in entry.ports] == [("http", 80, "http"), ("db", 5432, "tcp")]
    single = _cp(single_vip="240.240.255.1")
    single.registry.put_service(Service(name="web", ports=[{"name": "http", "port": 80}]))
    single.build_all()
    assert dns_pb2.DnsService.FromString(_value(single.cache.get(TYPE.DNS, "web.default").any_bytes)).vip == "240.240.255.1"


def _value(any_bytes: bytes) -> bytes:
    from google.protobuf import any_pb2

    a = any_pb2.Any.FromString(any_bytes)
    assert a.type_url == TYPE.DNS
    return a.value


class _Overlays:
    """A routing source holding overlays by service key; ``set`` reports the change like a policy write."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self.overlays: dict[str, ServiceRouting] = {}
        self._changed: set[str] = set()

    def set(self, key: str, routing: ServiceRouting | None) -> None:
        if routing is None:
            self.overlays.pop(key, None)
        else:
            self.overlays[key] = routing
        self._changed.add(key)
        self.cp._dirty.other.add("policy/" + key)
        self.cp._kick.set()

    def affected(self, changed: set[str]) -> set[str]:
        out, self._changed = self._changed, set()
        return out

    def routing(self, service_key: str) -> ServiceRouting | None:
        return self.overlays.get(service_key)


def _routed_clusters(cp: ControlPlane) -> set[str]:
    from envoy.config.route.v3 import route_pb2
    from google.protobuf import any_pb2

    rc = route_pb2.RouteConfiguration.FromString(any_pb2.Any.FromString(cp.cache.get(TYPE.ROUTE, OUTBOUND_ROUTE).any_bytes).value)
    return {
        c
        for vh in rc.virtual_hosts
        for r in vh.routes
        for c in ([r.route.cluster] if r.route.cluster else [w.name for w in r.route.weighted_clusters.clusters])
    }


async def test_new_subsets_go_out_before_the_routes_that_use_them() -> None:
    cp = _cp(debounce_ms=1, debounce_max_ms=10)
    cp.subset_warmup_s = 0.2
    overlays = _Overlays(cp)
    cp.add_routing_source(overlays)
    cp.registry.put_service(Service(name="web", ports=[{"name": "http", "port": 80}]))
    cp.build_all()
    cp._node_connected(NodeInfo(id="n1", service="client", outbound_port=15001))
    base, v1 = "outbound|80||web.default.svc.mesh", "outbound|80|v1|web.default.svc.mesh"
    task = asyncio.create_task(cp._debounce())
    try:
        split = ServiceRouting(subsets=(Subset("v1", (("version", "v1"),)),), rules=(RouteRule("web-split", (("v1", 1),)),))
        overlays.set("web.default", split)
        await asyncio.sleep(0.05)
        assert cp.cache.get(TYPE.CLUSTER, v1) is not None and cp.cache.get(TYPE.ENDPOINT, v1) is not None, "expected the subset cluster and its endpoints at once"
        assert _routed_clusters(cp) == {base}, f"expected the routes in force before while v1 warms up, got {_routed_clusters(cp)}"
        await asyncio.sleep(0.3)
        assert _routed_clusters(cp) == {v1}, f"expected the split's own route after the warm-up, got {_routed_clusters(cp)}"
        # a change of weights between known subsets, and a delete, apply at once
        overlays.set("web.default", None)
        await asyncio.sleep(0.05)
        assert _routed_clusters(cp) == {base} and cp.cache.get(TYPE.CLUSTER, v1) is None
    finally:
        task.cancel()


def test_without_connected_nodes_an_overlay_applies_whole() -> None:
    cp = _cp()
    overlays = _Overlays(cp)
    cp.add_routing_source(overlays)
    cp.registry.put_service(Service(name="web", ports=[{"name": "http", "port": 80}]))
    cp.build_all()
    overlays.set("web.default", ServiceRouting(subsets=(Subset("v1", (("version", "v1"),)),), rules=(RouteRule("s", (("v1", 1),)),)))
    cp.flush()
    assert _routed_clusters(cp) == {"outbound|80|v1|web.default.svc.mesh"}
