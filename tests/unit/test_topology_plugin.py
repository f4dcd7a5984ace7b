"""The topology part in an assembled control plane (in-process, on 127.0.0.1): the file_sd file follows the
connected sidecars, /v1/prometheus/targets serves it to read tokens only, and /v1/topology names what is
wrong with its input or its Prometheus."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from meshpilot.controlplane import ControlPlane
from meshpilot.plugins import install_plugins
from meshpilot.settings import Settings
from meshpilot.xds.resource import NodeInfo

TOKEN = "topology-unit-token"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def _serving(**settings: Any) -> AsyncIterator[tuple[ControlPlane, str]]:
    cp = ControlPlane(Settings(store="memory:", xds_port=0, api_port=0, consul_port=None, eureka_port=None, token=TOKEN, **settings))
    install_plugins(cp)
    run = asyncio.create_task(cp.run())
    try:
        async with asyncio.timeout(10):
            await cp.ready.wait()
        yield cp, f"http://127.0.0.1:{cp.ports['api']}"
    finally:
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run


async def _get(url: str, token: str | None = TOKEN) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as r:
        return r.status, await r.json(content_type=None)


async def _until(pred: Any, what: str, timeout: float = 5.0) -> Any:
    async with asyncio.timeout(timeout):
        while True:
            got = pred()
            if got:
                return got
            await asyncio.sleep(0.02)
    raise AssertionError(what)  # pragma: no cover


def _read(path: Path) -> list[dict[str, Any]] | None:
    try:
        return list(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def test_the_file_follows_the_connected_sidecars_and_the_route_serves_it_to_read_tokens(tmp_path: Path) -> None:
    sd = tmp_path / "targets.json"

    async def scenario() -> None:
        async with _serving(prometheus_sd_file=str(sd)) as (cp, api):
            first = await _until(lambda: _read(sd), "the file written at start")
            assert [g["labels"]["kind"] for g in first] == ["controlplane"] and first[0]["targets"] == [f"127.0.0.1:{cp.ports['api']}"], \
                f"expected the control plane's own /metrics at start, got {first}"
            node = NodeInfo(id="web-1", service="web", outbound_port=15001, bind_address="10.0.0.5", extra={"STATS_PORT": 15090})
            cp._node_connected(node)
            got = await _until(lambda: (g := _read(sd)) and len(g) == 2 and g, "the sidecar listed")
            assert got[1]["targets"] == ["10.0.0.5:15090"] and got[1]["labels"]["node"] == "web-1", f"expected web-1's target, got {got}"
            assert await _get(api + "/v1/prometheus/targets") == (200, got), "expected the route to serve the file's document"
            status, body = await _get(api + "/v1/prometheus/targets", token=None)
            assert status == 401, f"expected 401 without a token, got {status}: {body}"
            cp._node_gone(node)
            back = await _until(lambda: (g := _read(sd)) and len(g) == 1 and g, "the sidecar gone from the file")
            assert back == first, f"expected only the control plane again, got {back}"

    asyncio.run(scenario())


def test_the_topology_route_names_a_bad_window_a_missing_and_an_unreachable_prometheus() -> None:
    async def scenario() -> None:
        async with _serving() as (_, api):
            status, body = await _get(api + "/v1/topology")
            assert status == 503 and "prometheus_url" in body["error"], f"expected 503 naming prometheus_url, got {status}: {body}"
            status, body = await _get(api + "/v1/topology", token=None)
            assert status == 401, f"expected 401 without a token, got {status}: {body}"
        async with _serving(prometheus_url=f"http://127.0.0.1:{_closed_port()}") as (_, api):
            status, body = await _get(api + "/v1/topology?window=5%20minutes")
            assert status == 400 and body["error"].startswith("window: "), f"expected 400 naming window, got {status}: {body}"
            status, body = await _get(api + "/v1/topology?namespace=No_Such")
            assert status == 400 and body["error"].startswith("namespace: "), f"expected 400 naming namespace, got {status}: {body}"
            status, body = await _get(api + "/v1/topology?window=30s")
            assert status == 502 and body["error"].startswith("prometheus_url: "), f"expected 502 naming prometheus_url, got {status}: {body}"

    asyncio.run(scenario())


def test_the_targets_route_adds_the_sidecars_of_the_other_replicas_asking_with_the_callers_token() -> None:
    other_sidecar = {"targets": ["10.0.0.6:15090"], "labels": {"kind": "sidecar", "node": "api-1", "instance": "10.0.0.6:15090",
                                                              "__metrics_path__": "/stats/prometheus"}}
    asked: list[tuple[str, str]] = []

    async def other_targets(request: web.Request) -> web.Response:
        asked.append((request.query_string, request.headers.get("Authorization", "")))
        return web.json_response([other_sidecar])

    async def scenario() -> None:
        other = web.Application()
        other.router.add_get("/v1/prometheus/targets", other_targets)
        runner = web.AppRunner(other)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with _serving() as (cp, api):
                cp.registry.store.write({("replicas", "other"): {"api": ["127.0.0.1", port]},
                                         ("replicas", "gone"): {"api": ["127.0.0.1", _closed_port()]}})
                status, merged = await _get(api + "/v1/prometheus/targets")
                assert status == 200 and other_sidecar in merged, f"expected the other replica's sidecar, got {status}: {merged}"
                assert asked == [("local=1", f"Bearer {TOKEN}")], f"expected the other replica asked for its own, with the token, got {asked}"
                kinds = sorted(g["labels"]["kind"] for g in merged)
                assert kinds == ["controlplane", "controlplane", "controlplane", "sidecar"], \
                    f"expected three replicas' /metrics (one unreachable, still listed) and one sidecar, got {merged}"
                status, local = await _get(api + "/v1/prometheus/targets?local=1")
                assert status == 200 and other_sidecar not in local and len(asked) == 1, f"expected only this replica's own, got {local}"
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


@contextlib.asynccontextmanager
async def _fake_prometheus(answer: Any) -> AsyncIterator[tuple[str, list[str]]]:
    """A Prometheus HTTP API on 127.0.0.1 answering ``answer(promql)`` (a JSON-able body or raw bytes) to
    every /api/v1/query; the queries asked, in order."""
    asked: list[str] = []

    async def query(request: web.Request) -> web.StreamResponse:
        promql = request.query.get("query", "")
        asked.append(promql)
        got = answer(promql)
        if isinstance(got, tuple):  # ("chunked", bytes): no Content-Length, as a streaming Prometheus may send
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(0, len(got[1]), 1000):
                await resp.write(got[1][i:i + 1000])
            await resp.write_eof()
            return resp
        return web.Response(body=got, content_type="application/json") if isinstance(got, bytes) else web.json_response(got)

    app = web.Application()
    app.router.add_get("/api/v1/query", query)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", asked
    finally:
        await runner.cleanup()


def _vector(value: float) -> dict[str, Any]:
    return {"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1.0, str(value)]}]}}


_EMPTY = {"status": "success", "data": {"resultType": "vector", "result": []}}


def test_a_window_holding_more_samples_than_read_is_refused_naming_window_before_they_are_asked_for() -> None:
    from meshpilot.topology import prometheus

    def answer(promql: str) -> Any:
        # each of the three range queries holds MAX_SAMPLES samples a day: 24h is three times the bound
        if promql.startswith("sum(count_over_time("):
            return _vector(prometheus.MAX_SAMPLES * int(promql.rpartition("[")[2].partition("ms]")[0]) / 86_400_000)
        return _EMPTY

    async def scenario() -> None:
        async with _fake_prometheus(answer) as (prom, asked), _serving(prometheus_url=prom) as (_, api):
            status, body = await _get(api + "/v1/topology?window=24h")
            assert status == 400 and body["error"].startswith("window: ") and "at most 28800s" in body["error"], \
                f"expected 400 naming window and the longest that fits (24h / 3), got {status}: {body}"
            raw = [q for q in asked if q.endswith("ms]")]
            assert raw == [], f"expected no range query asked once the count is over, got {raw}"
            status, body = await _get(api + "/v1/topology?window=1h")
            assert status == 200 and body["edges"] == [], f"expected a window under the bound answered, got {status}: {body}"

    asyncio.run(scenario())


def test_an_answer_past_the_byte_bound_is_a_502_and_answers_are_decoded_off_the_loop(monkeypatch: Any) -> None:
    import threading

    from meshpilot.topology import prometheus

    decoded: list[int] = []
    real = prometheus.parse_series

    def parse(result: Any) -> Any:
        decoded.append(threading.get_ident())
        return real(result)

    monkeypatch.setattr(prometheus, "parse_series", parse)
    monkeypatch.setattr(prometheus, "MAX_BODY", 4096)
    big = json.dumps({"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {"peer": f"10.0.{i // 256}.{i % 256}"}, "value": [1.0, "1"]} for i in range(200)]}}).encode()

    async def scenario() -> None:
        async with _fake_prometheus(lambda q: _EMPTY) as (prom, _), _serving(prometheus_url=prom) as (_, api):
            status, body = await _get(api + "/v1/topology?window=5m")
            assert status == 200, f"expected the topology, got {status}: {body}"
        loop = threading.get_ident()
        assert decoded and loop not in decoded, f"expected every answer decoded on a worker thread, not the loop's ({loop}), got {decoded}"
        async with _fake_prometheus(lambda q: big) as (prom, _), _serving(prometheus_url=prom) as (_, api):
            status, body = await _get(api + "/v1/topology?window=5m")
            assert status == 502 and body["error"].startswith("prometheus_url: ") and "more than 4096 bytes" in body["error"], \
                f"expected 502 naming prometheus_url and the byte bound, got {status}: {body}"
        async with _fake_prometheus(lambda q: ("chunked", json.dumps(_EMPTY).encode())) as (prom, _), _serving(prometheus_url=prom) as (_, api):
            status, body = await _get(api + "/v1/topology?window=5m")
            assert status == 200 and body["edges"] == [], f"expected a chunked answer under the bound read, got {status}: {body}"
        async with _fake_prometheus(lambda q: ("chunked", big)) as (prom, _), _serving(prometheus_url=prom) as (_, api):
            status, body = await _get(api + "/v1/topology?window=5m")
            assert status == 502 and "more than 4096 bytes" in body["error"], \
                f"expected 502 naming the byte bound for a chunked answer too, got {status}: {body}"

    asyncio.run(scenario())
