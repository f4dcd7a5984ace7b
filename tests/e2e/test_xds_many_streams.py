"""Thousands of xDS streams opened at once, as a fleet does when it reconnects (a replica handing
over, a control-plane restart), against the ADS server on a real grpc.aio server with the options
the control plane serves it with. Every stream must be taken: grpc refuses, with CANCELLED, the calls
that wait beyond its pending-request limits for grpc.aio to take them (one per turn of the loop)."""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Iterator

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import discovery_pb2

from meshpilot.xds.cache import ResourceCache
from meshpilot.xds.resource import TYPE
from meshpilot.xds.server import GRPC_SERVER_OPTIONS, XdsServer

pytestmark = pytest.mark.e2e

_SOTW = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
STREAMS = 3000


@pytest.fixture
def ads_port() -> Iterator[int]:
    """An ADS server (200 clusters) on its own thread and loop, as in the control plane."""
    loop = asyncio.new_event_loop()
    started: asyncio.Future[int] = loop.create_future()
    holder: dict[str, grpc.aio.Server] = {}

    async def serve() -> None:
        cache = ResourceCache()
        cache.put(TYPE.CLUSTER, {f"c{i}": cluster_pb2.Cluster(name=f"c{i}") for i in range(200)})
        server = grpc.aio.server(options=list(GRPC_SERVER_OPTIONS))
        server.add_generic_rpc_handlers([XdsServer(cache).handler()])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        holder["server"] = server
        started.set_result(port)

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(serve(), loop).result(30)
        yield asyncio.run_coroutine_threadsafe(asyncio.wait_for(asyncio.shield(started), 30), loop).result(30)
    finally:
        if "server" in holder:
            asyncio.run_coroutine_threadsafe(holder["server"].stop(None), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


async def _open_all(port: int, n: int) -> collections.Counter[str]:
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(0, n, 100)]
    outcome: collections.Counter[str] = collections.Counter()

    async def one(i: int) -> None:
        call = channels[i // 100].stream_stream(
            _SOTW, request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString, response_deserializer=lambda b: b
        )()
        try:
            await call.write(discovery_pb2.DiscoveryRequest(type_url=TYPE.CLUSTER, node={"id": f"n{i}"}))
            raw = await call.read()
            outcome["clusters" if isinstance(raw, bytes) else "ended"] += 1
        except grpc.aio.AioRpcError as exc:
            outcome[exc.code().name] += 1
        finally:
            call.cancel()

    try:
        async with asyncio.timeout(120):
            await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        for ch in channels:
            await ch.close()
    return outcome


def test_every_stream_of_a_fleet_connecting_at_once_is_served(ads_port: int) -> None:
    outcome = asyncio.run(_open_all(ads_port, STREAMS))
    assert outcome == {"clusters": STREAMS}, (
        f"expected all {STREAMS} streams opened at once to get their clusters; got {dict(outcome)}"
    )
