"""Abusive xDS clients against a real control plane: streams that never read, requests larger
than any real client sends. Neither may delay a real Envoy or the management API."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from meshpilot.xds.resource import TYPE
from tests.support import ControlPlaneProc, control_plane, envoy, free_port, http, sidecar_bootstrap, wait_until


_SOTW = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
_DELTA = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
SERVICES = 120  # enough that a client's first clusters response is over 64 KB
DEAD = 192
T = TypeVar("T")


class _Loop:
    """An asyncio loop on a thread, for grpc.aio clients that outlive one call."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_all(), 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def loop() -> Iterator[_Loop]:
    lp = _Loop()
    try:
        yield lp
    finally:
        lp.close()


def _seed(cp: ControlPlaneProc, n: int) -> None:
    for i in range(n):
        status, body = cp.call("POST", "/v1/services", {"name": f"svc{i}", "ports": [{"name": "http", "port": 80}]})
        assert status == 201, f"creating svc{i}: expected 201, got {status} {body}"
        inst = {"id": f"svc{i}-1", "address": f"10.1.{i // 250}.{i % 250 + 1}", "ports": {"http": 8080}}
        status, body = cp.call("POST", f"/v1/services/default/svc{i}/instances", inst)
        assert status == 201, f"registering svc{i}-1: expected 201, got {status} {body}"


def _request(node: str, type_url: str, names: list[str] | None = None) -> bytes:
    req = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names or [])
    if node:
        req.node.id = node
    return req.SerializeToString()


def _call(ch: grpc.aio.Channel, method: str = _SOTW) -> Any:
    return ch.stream_stream(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)()


def _streams_of(cp: ControlPlaneProc, prefix: str) -> int:
    status, proxies = cp.call("GET", "/v1/proxies")
    assert status == 200, f"GET /v1/proxies: expected 200, got {status} {proxies}"
    return sum(1 for p in proxies if p["node_id"].startswith(prefix))


def test_streams_that_never_read_delay_no_envoy_and_are_closed(workdir: Path, loop: _Loop) -> None:
    settings = workdir / "settings.yaml"
    settings.write_text("xds_write_timeout_s: 4\n")
    with control_plane(workdir, extra=["--config", str(settings)]) as cp:
        _seed(cp, SERVICES)
        names = [f"outbound|80||svc{i}.default.svc.mesh" for i in range(SERVICES)]

        async def open_dead() -> list[Any]:
            channels = [grpc.aio.insecure_channel(f"127.0.0.1:{cp.xds_port}") for _ in range(DEAD // 32)]
            calls = []
            for i in range(DEAD):
                call = _call(channels[i % len(channels)])
                await call.write(_request(f"dead-{i}", TYPE.CLUSTER))
                await call.write(_request("", TYPE.ENDPOINT, names))
                calls.append(call)
            return calls

        dead = loop.run(open_dead())
        wait_until(lambda: _streams_of(cp, "dead-") == DEAD, 20, what=f"{DEAD} streams that never read to be connected")
        opened = time.monotonic()

        # A real Envoy connecting right behind them gets its whole config at once.
        out = free_port()
        with envoy(workdir, sidecar_bootstrap("late-envoy", cp.xds_port, service="client", outbound_port=out)) as e:
            last = f"outbound|80||svc{SERVICES - 1}.default.svc.mesh"
            wait_until(lambda: e.cluster_hosts(last), 8, what=f"the new Envoy's clusters and endpoints ({last}) beside {DEAD} streams that never read")

            # The streams that never read are closed once their first response is 4 s unanswered,
            # with a status that says why; the Envoy, which answers, stays.
            wait_until(lambda: _streams_of(cp, "dead-") == 0, 30, what="the server to close every stream that never read")
            assert time.monotonic() - opened >= 3.5, "streams were closed before their write deadline"
            assert _streams_of(cp, "late-envoy") == 1, "the Envoy that answers every response lost its stream"

            async def drain(call: Any) -> grpc.aio.AioRpcError | None:
                try:
                    while await call.read() is not grpc.aio.EOF:
                        pass
                except grpc.aio.AioRpcError as err:
                    return err
                return None

            err = loop.run(drain(dead[0]))
            assert err is not None and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, f"a stream that never read: expected DEADLINE_EXCEEDED, got {err!r}"
            assert "not answered within 4 s" in (err.details() or ""), f"status details should say why: {err.details()!r}"
            log = cp.log.read_text()
            assert "event=stream_aborted" in log and "code=DEADLINE_EXCEEDED" in log, "the closed streams were not logged"

            # The Envoy still gets changes after the deadline has passed for it many times over.
            status, body = cp.call("POST", "/v1/services/default/svc0/instances", {"id": "svc0-2", "address": "10.9.9.9", "ports": {"http": 8080}})
            assert status == 201, f"registering svc0-2: expected 201, got {status} {body}"
            wait_until(lambda: "10.9.9.9:8080" in e.cluster_hosts("outbound|80||svc0.default.svc.mesh"), 10, what="the Envoy to get a later change")


def _api_latency(cp: ControlPlaneProc) -> float:
    t = time.monotonic()
    try:
        status, body, _ = http("GET", cp.api + "/v1/services", timeout=3)
    except (TimeoutError, urllib.error.URLError) as exc:
        raise AssertionError(f"the management API did not answer within 3 s while huge xDS requests arrived: {exc!r}") from exc
    assert status == 200, f"GET /v1/services: expected 200, got {status} {body}"
    return time.monotonic() - t


def test_requests_larger_than_real_clients_send_are_refused(workdir: Path, loop: _Loop) -> None:
    with control_plane(workdir) as cp:

        async def send(payload: bytes, method: str = _SOTW) -> grpc.aio.AioRpcError | None:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{cp.xds_port}", options=[("grpc.max_send_message_length", -1)]) as ch:
                call = _call(ch, method)
                try:
                    await call.write(payload)
                    async with asyncio.timeout(60):
                        await call.read()
                except grpc.aio.AioRpcError as err:
                    return err
                except TimeoutError:
                    return None
                finally:
                    call.cancel()
                return None

        # Four 12.5 MB endpoint requests (1.3 million names each) while the API is asked.
        huge = _request("huge", TYPE.ENDPOINT, [f"{i:08d}" for i in range(int(12.5 * 2**20) // 10)])
        with ThreadPoolExecutor(4) as pool:
            pending = [pool.submit(loop.run, send(huge), 120) for _ in range(4)]
            latencies = []
            while not all(f.done() for f in pending):
                latencies.append(_api_latency(cp))
                time.sleep(0.05)
            errors = [f.result() for f in pending]
        for err in errors:
            assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, f"a 12.5 MB request: expected RESOURCE_EXHAUSTED, got {err!r}"
        assert latencies, "the API was never asked"
        _api_latency(cp)

        # Under the size limit but more names than any client subscribes to at once.
        many = _request("many", TYPE.ENDPOINT, [f"n{i}" for i in range(200_000)])
        err = loop.run(send(many))
        assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, f"200,000 names: expected RESOURCE_EXHAUSTED, got {err!r}"
        assert "resource_names: 200000 names" in (err.details() or ""), f"the status should name the field and count: {err.details()!r}"

        delta = discovery_pb2.DeltaDiscoveryRequest(type_url=TYPE.ENDPOINT, resource_names_subscribe=["x" * 5000])
        delta.node.id = "long"
        err = loop.run(send(delta.SerializeToString(), _DELTA))
        assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, f"a 5,000-character name: expected RESOURCE_EXHAUSTED, got {err!r}"
        assert "resource_names_subscribe" in (err.details() or ""), f"the status should name the field: {err.details()!r}"

        # The server still serves a normal client afterwards.
        async def first_clusters() -> bytes:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{cp.xds_port}") as ch:
                call = _call(ch)
                await call.write(_request("normal", TYPE.CLUSTER))
                async with asyncio.timeout(10):
                    raw = await call.read()
                call.cancel()
                return raw

        resp = discovery_pb2.DiscoveryResponse.FromString(loop.run(first_clusters()))
        assert resp.type_url == TYPE.CLUSTER, f"a normal client after the abuse: expected a clusters response, got {resp.type_url!r}"
