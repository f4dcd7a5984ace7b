"""The listener under every HTTP front door (management API, Consul, Eureka, the admission
webhook): what a slow or flooding client may cost the process.

Left to itself aiohttp keeps a connection that never completes its request open for an hour and
accepts connections until the process runs out of file descriptors, after which every listener of
the process fails, xDS included. Here:

- a connection that holds no complete request is closed ``idle_timeout_s`` after it opened or
  after its last response (aiohttp's keep-alive deadline, which a request head still being sent
  does not push back), and a request's body must arrive within the same time (408);
- each port holds at most ``max_connections`` open connections; the next is answered 503 and
  closed at once;
- ``raise_fd_limit`` lifts the soft limit on open files to the hard limit, and ``connection_cap``
  keeps all HTTP ports together within half of it, so xDS, the store and the rest of the process
  always find descriptors.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import ssl
from dataclasses import dataclass
from typing import cast

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

__all__ = ["HttpLimits", "bearer_token", "connection_cap", "raise_fd_limit", "start_front_door"]

log = logging.getLogger("meshpilot.frontdoor")

_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 34\r\n"
    b"Retry-After: 1\r\nConnection: close\r\n\r\ntoo many connections to this port\n"
)


@dataclass(frozen=True, slots=True)
class HttpLimits:
    idle_timeout_s: float = 30.0
    max_connections: int = 4096


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard limit; the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as exc:
            log.warning("event=fd_limit_unchanged soft=%d hard=%d reason=%s", soft, hard, exc)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_cap(wanted: int, ports: int, fd_limit: int) -> int:
    """Connections per HTTP port: at most ``wanted``, and ``ports`` ports together within half of
    ``fd_limit``."""
    return max(1, min(wanted, fd_limit // (2 * max(ports, 1))))


async def start_front_door(app: web.Application, host: str, port: int, limits: HttpLimits,
                           ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on ``host:port`` within ``limits``: (its runner, whose ``cleanup()`` also
    closes the port; the bound port)."""
    app.middlewares.append(_body_deadline(limits.idle_timeout_s))
    runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=limits.idle_timeout_s)
    open_now: set[_Counted] = set()
    server: asyncio.AbstractServer | None = None
    bound = port

    async def close_port(_app: web.Application) -> None:
        if server is not None:
            server.close()

    app.on_shutdown.append(close_port)
    await runner.setup()
    handlers = runner.server
    assert handlers is not None
    full = False

    def protocol() -> asyncio.BaseProtocol:
        nonlocal full
        if len(open_now) >= limits.max_connections:
            if not full:
                log.warning("event=http_port_full port=%d max_connections=%d", bound, limits.max_connections)
            full = True
            return _Busy()
        full = False
        return _Counted(handlers(), open_now)  # counted from connection_made (after a TLS handshake)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(protocol, host, port, reuse_address=True, ssl=ssl_context)
    bound = server.sockets[0].getsockname()[1] if server.sockets else port
    return runner, bound


def _body_deadline(seconds: float) -> Middleware:
    @web.middleware
    async def body_deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.body_exists:
            try:
                async with asyncio.timeout(seconds):
                    await request.read()  # kept by the request: the handler's read() returns it
            except TimeoutError:
                raise web.HTTPRequestTimeout(reason=f"the request body did not arrive within {seconds:g} s") from None
        return await handler(request)

    return body_deadline


class _Counted(asyncio.Protocol):
    """An aiohttp connection, counted while it is open."""

    __slots__ = ("_inner", "_open")

    def __init__(self, inner: asyncio.Protocol, open_now: set[_Counted]) -> None:
        self._inner = inner
        self._open = open_now

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._open.add(self)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._open.discard(self)
        self._inner.connection_lost(exc)


class _Busy(asyncio.Protocol):
    """A connection over the port's cap: answered 503 and closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        writer = cast(asyncio.WriteTransport, transport)  # uvloop's transports are not asyncio's classes
        writer.write(_BUSY)
        writer.close()


def bearer_token(request: web.Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (the scheme in any case, RFC 7235), else None.
    Every HTTP front door reads bearer tokens through this one function."""
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None
