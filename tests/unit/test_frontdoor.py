"""The HTTP front doors' listener: its per-port connection cap, and how the cap shares the
open-file limit among ports."""

from __future__ import annotations

import asyncio
import resource

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from meshpilot.frontdoor import HttpLimits, bearer_token, connection_cap, raise_fd_limit, start_front_door


def test_ports_share_half_the_descriptors() -> None:
    assert connection_cap(4096, 3, 1024) == 170, "three ports within half of 1,024 descriptors"
    assert connection_cap(4096, 2, 1_048_576) == 4096, "the configured cap when descriptors are plenty"
    assert connection_cap(4096, 1, 1) == 1, "never zero"


def test_soft_fd_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        got = raise_fd_limit()
        now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert got == now == (hard if hard != resource.RLIM_INFINITY else 1 << 20), f"expected the soft limit raised to {hard}, got {now}"
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_full_port_answers_503_and_serves_again_when_a_connection_closes() -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/", hello)
    runner, port = await start_front_door(app, "127.0.0.1", 0, HttpLimits(idle_timeout_s=60, max_connections=2))
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # half a request
            held.append((reader, writer))
        assert runner.server is not None
        while len(runner.server.connections) < 2:  # until the port has taken both
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 503"), f"expected a 503 from the full port, got {answer[:80]!r}"

        held[0][1].close()  # one slot frees: a new connection is served
        await held[0][1].wait_closed()
        for _ in range(100):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            if not answer.startswith(b"HTTP/1.1 503"):
                break
            await asyncio.sleep(0.01)  # the server has not yet seen the close
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"hello"), f"expected the freed slot to serve, got {answer[:80]!r}"
    finally:
        for _, w in held:
            w.close()
        await runner.cleanup()
    try:
        await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        pass
    else:
        raise AssertionError("the port must be closed by the runner's cleanup")


@pytest.mark.parametrize(("header", "want"), [
    ("Bearer s3cret", "s3cret"), ("bearer s3cret", "s3cret"), ("BEARER  s3cret ", "s3cret"),
    ("Basic czNjcmV0", None), ("Bearer", None), ("Bearer ", None), ("", None), ("s3cret", None),
])
def test_bearer_token_takes_the_scheme_in_any_case(header: str, want: str | None) -> None:
    got = bearer_token(make_mocked_request("GET", "/", headers={"Authorization": header} if header else {}))
    assert got == want, f"Authorization: {header!r}: expected {want!r}, got {got!r}"
