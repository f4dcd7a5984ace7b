"""The control plane assembles the parts it is given and owns their lifetimes: it serves their gRPC
handlers and HTTP apps, gives their routes to the management API, supervises their tasks
(a failed task is restarted) and closes every listener when it stops. In-process, on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web

from meshpilot.api.routes import Route
from meshpilot.controlplane import ControlPlane
from meshpilot.parts import HttpApp, Part, Task
from meshpilot.settings import Settings


async def _hello(request: web.Request) -> web.Response:
    return web.json_response({"hello": request.match_info["who"]})


async def _hi(request: web.Request) -> web.Response:
    return web.Response(text="hi")


def _echo_handler() -> grpc.GenericRpcHandler:
    async def echo(request: bytes, context: Any) -> bytes:
        return b"echo:" + request

    return grpc.method_handlers_generic_handler("test.Echo", {
        "Say": grpc.unary_unary_rpc_method_handler(echo, request_deserializer=None, response_serializer=None),
    })


@contextlib.asynccontextmanager
async def _serving(cp: ControlPlane) -> AsyncIterator[asyncio.Task[None]]:
    run = asyncio.create_task(cp.run())
    try:
        async with asyncio.timeout(10):
            await cp.ready.wait()
        yield run
    finally:
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run


async def test_the_control_plane_serves_runs_and_stops_what_its_parts_contribute() -> None:
    cp = ControlPlane(Settings(store="memory:", xds_port=0, api_port=0, consul_port=None, eureka_port=None))
    runs: list[int] = []
    restarted = asyncio.Event()

    async def flaky() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("the first run fails")
        restarted.set()
        await asyncio.Event().wait()

    def extra() -> web.Application:
        app = web.Application()
        app.router.add_get("/hi", _hi)
        return app

    cp.include(Part(
        grpc_handlers=[_echo_handler()],
        http_apps=[HttpApp("extra", 0, extra)],
        routes=[Route("GET", "/v1/hello/{who}", _hello, "Say hello")],
        tasks=[Task("flaky", flaky)],
    ))
    async with _serving(cp):
        ports = dict(cp.ports)
        assert set(ports) >= {"xds", "api", "extra"} and all(ports.values()), f"expected every listener bound, got {ports}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{ports['api']}/v1/hello/you") as r:
                got = (r.status, await r.json())
            assert got == (200, {"hello": "you"}), f"expected the part's API route served, got {got}"
            async with http.get(f"http://127.0.0.1:{ports['extra']}/hi") as r:
                got_text = (r.status, await r.text())
            assert got_text == (200, "hi"), f"expected the part's HTTP app served, got {got_text}"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['xds']}") as channel:
            say: Any = channel.unary_unary("/test.Echo/Say")
            answer = await say(b"ping", timeout=5)
        assert answer == b"echo:ping", f"expected the part's gRPC handler on the xDS port, got {answer!r}"
        async with asyncio.timeout(10):
            await restarted.wait()
        assert len(runs) == 2, f"expected the failed task restarted once, ran {len(runs)} times"
    for name in ("api", "extra"):
        with pytest.raises(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", ports[name])
            writer.close()
            pytest.fail(f"expected the {name} listener closed once the control plane stopped")
