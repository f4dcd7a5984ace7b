"""A replica on a shared store: the other replicas' writes reach its cache through the store's watch,
and a replica whose store is no longer current hands its streams over and answers 503 until it is
current again. In process: the control plane on loopback ports, a store whose currency the test sets."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from meshpilot.controlplane import ControlPlane
from meshpilot.registry.store import Deliver, MemoryStore
from meshpilot.settings import Settings
from meshpilot.xds.resource import TYPE

ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"


class SharedStore(MemoryStore):
    """A memory store that says it is shared: the test plays etcd's watch and its reachability."""

    shared = True

    def __init__(self) -> None:
        super().__init__()
        self.is_current = True
        self.deliver: Deliver | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def watch(self, loop: asyncio.AbstractEventLoop, deliver: Deliver) -> None:
        self.loop, self.deliver = loop, deliver

    def current(self) -> bool:
        return self.is_current


async def _stream(target: str) -> tuple[Any, grpc.aio.Channel]:
    ch = grpc.aio.insecure_channel(target)
    call = ch.stream_stream(ADS, request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                            response_deserializer=discovery_pb2.DiscoveryResponse.FromString)()
    req = discovery_pb2.DiscoveryRequest(type_url=TYPE.CLUSTER)
    req.node.id = "sidecar~127.0.0.1~web-1.default~default.svc.cluster.local"
    req.node.cluster = "web"
    await call.write(req)
    return call, ch


def test_a_replica_that_lost_its_store_hands_its_streams_over_and_serves_again_once_current() -> None:
    async def main() -> None:
        store = SharedStore()
        cp = ControlPlane(Settings(store="etcd://127.0.0.1:1", xds_port=0, api_port=0, consul_port=None, eureka_port=None),
                          store=store)
        await cp.start()
        target = f"127.0.0.1:{cp.ports['xds']}"
        health = f"http://127.0.0.1:{cp.ports['api']}/healthz"
        try:
            call, ch = await _stream(target)
            first = await asyncio.wait_for(call.read(), 5)
            assert first.type_url == TYPE.CLUSTER, f"expected a CDS answer, got {first}"
            # another replica registers a service: it reaches this replica's cache through the watch
            assert store.deliver is not None and store.loop is asyncio.get_running_loop()
            store.deliver([("services", "orders.default", {"name": "orders", "namespace": "default",
                                                           "ports": [{"name": "http", "port": 80}], "vip": "240.240.0.9"})], 7)
            assert cp.registry.service("orders.default") is not None, "expected the other replica's service in the registry"
            cp.flush()
            names = cp.cache.names(TYPE.CLUSTER)
            assert any("orders.default" in n for n in names), f"expected a cluster for orders, got {names}"

            store.is_current = False
            assert cp.check_current() is False
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                while True:
                    await asyncio.wait_for(call.read(), 5)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, f"expected the stream handed over (UNAVAILABLE), got {ended.value}"
            await ch.close()
            call, ch = await _stream(target)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await asyncio.wait_for(call.read(), 5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, f"expected a new stream refused, got {refused.value}"
            await ch.close()
            async with aiohttp.ClientSession() as http:
                async with http.get(health) as r:
                    body = await r.json()
                    assert r.status == 503 and body["status"] == "not current", f"expected 503 not current, got {r.status} {body}"
                async with http.get(f"http://127.0.0.1:{cp.ports['api']}/v1/services") as r:
                    assert r.status == 503, f"expected reads refused while not current, got {r.status}"

                store.is_current = True
                assert cp.check_current() is True
                async with http.get(health) as r:
                    assert r.status == 200, f"expected healthz 200 once current again, got {r.status}"
            call, ch = await _stream(target)
            again = await asyncio.wait_for(call.read(), 5)
            assert again.type_url == TYPE.CLUSTER
            await ch.close()
        finally:
            await cp.stop()

    asyncio.run(main())


def test_the_module_cluster_lists_every_live_replicas_api() -> None:
    from envoy.config.cluster.v3 import cluster_pb2
    from google.protobuf import any_pb2

    async def main() -> None:
        store = SharedStore()
        cp = ControlPlane(Settings(store="etcd://127.0.0.1:1", xds_port=0, api_port=0, consul_port=None, eureka_port=None),
                          store=store)
        await cp.start()

        def apis() -> set[tuple[str, int]]:
            cp.flush()
            entry = cp.cache.get(TYPE.CLUSTER, "meshpilot-api")
            assert entry is not None, "expected the meshpilot-api cluster"
            c = cluster_pb2.Cluster()
            any_pb2.Any.FromString(entry.any_bytes).Unpack(c)
            return {(e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value)
                    for le in c.load_assignment.endpoints for e in le.lb_endpoints}

        try:
            own = ("127.0.0.1", cp.ports["api"])
            assert apis() == {own}, f"expected this replica's API alone, got {apis()}"
            assert store.deliver is not None
            other = {"api": ["127.0.0.2", 15014], "xds": ["127.0.0.2", 15010]}
            store.write({("replicas", "other-1"): other})  # the view has it, then the watch tells
            store.deliver([("replicas", "other-1", other)], 3)
            assert apis() == {own, ("127.0.0.2", 15014)}, f"expected both replicas' APIs, got {apis()}"
            store.write({}, (("replicas", "other-1"),))  # its lease ran out
            store.deliver([("replicas", "other-1", None)], 4)
            assert apis() == {own}, f"expected the gone replica left out, got {apis()}"
        finally:
            await cp.stop()

    asyncio.run(main())


def test_synced_asked_of_one_replica_answers_for_the_envoys_of_every_replica() -> None:
    from meshpilot.hds.plugin import install
    from meshpilot.model import Service, ServicePort

    async def main() -> None:
        store = SharedStore()  # one view for both: each sees the other's entry in the replicas table
        cps = [ControlPlane(Settings(store="etcd://127.0.0.1:1", xds_port=0, api_port=0, consul_port=None,
                                     eureka_port=None, debounce_ms=0), store=store) for _ in range(2)]
        for cp in cps:
            cp.include(install(cp))
        svc = Service(name="web", ports=(ServicePort(name="http", port=80),))
        for cp in cps:
            cp.registry.put_service(svc)
        for cp in cps:
            await cp.start()
            cp.flush()  # the publisher's loop is not running here: publish what start noted
        a, b = cps
        eds = "outbound|80||web.default.svc.mesh"
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{b.ports['xds']}")
        try:
            # an Envoy on replica B subscribes to web's endpoints and has not ACKed them yet
            call = ch.stream_stream(ADS, request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                                    response_deserializer=discovery_pb2.DiscoveryResponse.FromString)()
            req = discovery_pb2.DiscoveryRequest(type_url=TYPE.ENDPOINT, resource_names=[eds])
            req.node.id = "caller-1"
            await call.write(req)
            resp: discovery_pb2.DiscoveryResponse = await asyncio.wait_for(call.read(), 5)
            async with aiohttp.ClientSession() as http:
                url = f"http://127.0.0.1:{a.ports['api']}/v1/services/default/web/synced"
                async with http.get(url) as r:
                    body = await r.json()
                assert body["synced"] is False and body["pending"] == ["caller-1"] and body["consumers"] == 1, \
                    f"expected replica A to report B's unACKed Envoy, got {body}"
                async with http.get(url + "?local=1") as r:
                    body = await r.json()
                assert body["synced"] is True and body["consumers"] == 0, f"expected A alone to have no consumer, got {body}"
                await call.write(discovery_pb2.DiscoveryRequest(type_url=TYPE.ENDPOINT, resource_names=[eds],
                                                                version_info=resp.version_info, response_nonce=resp.nonce))

                async def synced_everywhere() -> dict[str, Any]:
                    for _ in range(100):
                        async with http.get(url) as r:
                            body = await r.json()
                        if body["synced"]:
                            return dict(body)
                        await asyncio.sleep(0.02)
                    return dict(body)

                body = await synced_everywhere()
                assert body["synced"] is True and body["consumers"] == 1, f"expected synced once B's Envoy ACKed, got {body}"
                await b.stop()  # a replica that is gone adds nothing
                async with http.get(url) as r:
                    body = await r.json()
                assert body["synced"] is True and body["consumers"] == 0, f"expected the stopped replica left out, got {body}"
        finally:
            await ch.close()
            for cp in cps:
                await cp.stop()

    asyncio.run(main())
