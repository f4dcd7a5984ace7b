"""The control plane's own logic, in process: debouncing, node resources, the DNS table."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from collections.abc import Callable

from meshpilot.controlplane import ControlPlane
from meshpilot.meshdns import dns_pb2
from meshpilot.model import Instance, Service
from meshpilot.settings import Settings
from meshpilot.translate.names import OUTBOUND_ROUTE
from meshpilot.xds.resource import TYPE, NodeInfo


def _cp(clock: Callable[[], float] = time.monotonic, **kw: object) -> ControlPlane:
    return ControlPlane(Settings(store="memory:", consul_port=None, eureka_port=None, **kw), clock)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _endpoint_writes(cp: ControlPlane) -> list[frozenset[str]]:
    writes: list[frozenset[str]] = []

    def seen(type_url: str, scope: str, names: frozenset[str], stamp: float) -> None:
        if type_url == TYPE.ENDPOINT:
            writes.append(names)

    cp.cache.watch(seen)
    return writes


def test_a_burst_of_registrations_becomes_one_publication() -> None:
    clock = Clock()
    cp = _cp(clock, debounce_ms=50, debounce_max_ms=2000)
    cp.registry.put_service(Service(name="web", ports=[{"name": "http", "port": 80}]))
    cp.build_all()
    writes = _endpoint_writes(cp)
    for i in range(300):
        clock.now += 0.001
        cp.registry.register(Instance(id=f"w{i}", service="web", address="10.0.0.1", ports={"http": 1000 + i}))
        assert not cp.publisher.publish_due(), f"expected nothing published inside the burst (registration {i})"
    assert writes == [], f"expected no endpoint write before the burst settles, got {writes}"
    clock.now += 0.05
    assert cp.publisher.publish_due(), "expected the burst published 50 ms after its last registration"
    assert writes == [frozenset({"outbound|80||web.default.svc.mesh"})], f"expected one endpoint write for 300 registrations, got {writes}"
    entry = cp.cache.get(TYPE.ENDPOINT, "outbound|80||web.default.svc.mesh")
    assert entry is not None and len(entry.any_bytes) > 300 * 10, "expected all 300 instances in the assignment"


def test_consul_kv_writes_publish_nothing() -> None:
    cp = _cp()
    cp.flush()
    cp.registry.put_document("kv", "config/app/limit", {"Value": "NDI="})
    cp.registry.write_documents("kv", {"config/app/a": {"Value": ""}}, ["config/app/limit"])
    assert cp.publisher.next_deadline() is None, "expected KV writes to wake no publication (no producer reads KV)"


def test_a_steady_stream_of_registrations_is_published_at_the_cap() -> None:
    clock = Clock()
    cp = _cp(clock, debounce_ms=100, debounce_max_ms=150)
    cp.registry.put_service(Service(name="web", ports=[{"name": "http", "port": 80}]))
    cp.build_all()
    writes = _endpoint_writes(cp)
    published_at = []
    for i in range(40):  # a registration every 20 ms never leaves 100 ms of quiet
        cp.registry.register(Instance(id=f"w{i}", service="web", address="10.0.0.1", ports={"http": 1000 + i}))
        clock.now += 0.02
        if cp.publisher.publish_due():
            published_at.append(round(clock.now - 100.0, 2))
    assert len(writes) == len(published_at) >= 4, f"expected a publication at each 150 ms cap during 0.8 s, got them at {published_at}"


def test_the_publisher_loop_sleeps_until_the_deadline() -> None:
    async def scenario() -> list[float]:
        cp = _cp(debounce_ms=30, debounce_max_ms=1000)
        cp.registry.put_service(Service(name="web", ports=[{"name": "http", "port": 80}]))
        cp.build_all()
        loop = asyncio.get_running_loop()
        seen: list[float] = []
        written = asyncio.Event()

        def watch(type_url: str, scope: str, names: frozenset[str], stamp: float) -> None:
            if type_url == TYPE.ENDPOINT:
                seen.append(loop.time())
                written.set()

        cp.cache.watch(watch)
        task = asyncio.create_task(cp.publisher.run())
        try:
            start = loop.time()
            cp.registry.register(Instance(id="w", service="web", address="10.0.0.1", ports={"http": 1000}))
            await asyncio.wait_for(written.wait(), 5)
            await asyncio.sleep(0.05)  # room for a second write, which must not come
            return [t - start for t in seen]
        finally:
            task.cancel()

    seen = asyncio.run(scenario())
    assert len(seen) == 1 and seen[0] >= 0.025, f"expected one endpoint write after the 30 ms quiet time, got {seen}"


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


_SPLIT = {"kind": "RoutingPolicy", "name": "split", "service": "web", "subsets": [{"name": "v1", "labels": {"version": "v1"}}],
          "routes": [{"name": "web-split", "destinations": [{"subset": "v1"}]}]}


def _set_split(cp: ControlPlane, on: bool) -> None:
    if on:
        cp.registry.put_document("policies", "RoutingPolicy/default/split", _SPLIT, service="web.default")
    else:
        cp.registry.delete_document("policies", "RoutingPolicy/default/split", service="web.default")


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


def test_new_subsets_go_out_before_the_routes_that_use_them() -> None:
    clock = Clock()
    cp = _cp(clock)
    cp.registry.put_service(Service(name="web", ports=[{"name": "http", "port": 80}]))
    cp.build_all()
    cp._node_connected(NodeInfo(id="n1", service="client", outbound_port=15001))
    base, v1 = "outbound|80||web.default.svc.mesh", "outbound|80|v1|web.default.svc.mesh"
    _set_split(cp, True)
    cp.flush()
    assert cp.cache.get(TYPE.CLUSTER, v1) is not None and cp.cache.get(TYPE.ENDPOINT, v1) is not None, "expected the subset cluster and its endpoints at once"
    assert _routed_clusters(cp) == {base}, f"expected the routes in force before while v1 warms up, got {_routed_clusters(cp)}"
    warm = clock.now + cp.mesh.subset_warmup_s
    assert cp.publisher.next_deadline() == warm, f"expected the publisher due when the warm-up ends ({warm}), got {cp.publisher.next_deadline()}"
    clock.now = warm - 0.01
    assert not cp.publisher.publish_due() and _routed_clusters(cp) == {base}, "expected the old routes until the warm-up ends"
    clock.now = warm
    assert cp.publisher.publish_due(), "expected a publication when the warm-up ends"
    assert _routed_clusters(cp) == {v1}, f"expected the split's own route after the warm-up, got {_routed_clusters(cp)}"
    assert cp.publisher.next_deadline() is None, "expected nothing more due"
    # a delete applies at once
    _set_split(cp, False)
    cp.flush()
    assert _routed_clusters(cp) == {base} and cp.cache.get(TYPE.CLUSTER, v1) is None, "expected the split and its cluster gone"


def test_without_connected_nodes_an_overlay_applies_whole() -> None:
    cp = _cp()
    cp.registry.put_service(Service(name="web", ports=[{"name": "http", "port": 80}]))
    cp.build_all()
    _set_split(cp, True)
    cp.flush()
    assert _routed_clusters(cp) == {"outbound|80|v1|web.default.svc.mesh"}


def test_trusted_peers_follow_the_registered_sidecars() -> None:
    cp = _cp()
    cp.registry.put_service(Service(name="web", ports=[{"name": "http", "port": 80}]))
    cp.build_all()
    cp._node_connected(NodeInfo(id="n1", service="web", outbound_port=15001, inbound_port=15006, app_port=8080))
    assert cp.mesh.trusted_peers == frozenset(), f"expected no trusted peers without sidecars, got {cp.mesh.trusted_peers}"
    before = cp.cache.get(TYPE.LISTENER, "inbound", "n1")
    cp.registry.register(Instance(id="n2", service="web", address="10.0.0.2", ports={"http": 15006}, source="mesh"))
    cp.registry.register(Instance(id="c1", service="web", address="10.0.0.3", ports={"http": 8080}, source="consul"))
    cp.flush()
    assert cp.mesh.trusted_peers == frozenset({"10.0.0.2"}), f"expected the sidecar's address alone, got {cp.mesh.trusted_peers}"
    after = cp.cache.get(TYPE.LISTENER, "inbound", "n1")
    assert before is not None and after is not None and after.version != before.version, "expected the node's inbound listener rebuilt for the new peer"
    assert b"10.0.0.2" in after.any_bytes and b"10.0.0.3" not in after.any_bytes, "expected only the sidecar's address in the listener"
    cp.registry.deregister("n2")
    cp.flush()
    assert cp.mesh.trusted_peers == frozenset(), "expected the peer gone with its sidecar"


def test_one_control_plane_makes_a_new_health_key_each_start_and_keeps_it_nowhere(tmp_path: Path) -> None:
    from meshpilot.registry.store import SqliteStore

    first = ControlPlane(Settings(store="memory:", consul_port=None, eureka_port=None), store=SqliteStore(tmp_path / "s.db"))
    token = first.health_token("node-1")
    first.registry.store.close()
    again = ControlPlane(Settings(store="memory:", consul_port=None, eureka_port=None), store=SqliteStore(tmp_path / "s.db"))
    try:
        assert again.health_token("node-1") != token, "expected a new health key on a restart of a single control plane"
        assert again.registry.store.get("meta", "controlplane/health_key") is None, "expected the key kept nowhere"
    finally:
        again.registry.store.close()


def test_the_xds_port_takes_a_fleet_reconnecting_at_once() -> None:
    from meshpilot.xds.server import GRPC_SERVER_OPTIONS

    options = dict(_cp().grpc_options())
    for name, value in GRPC_SERVER_OPTIONS:
        assert options.get(name) == value, f"expected the xDS server started with {name}={value}, got {options.get(name)}"
