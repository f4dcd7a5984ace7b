"""The meshdns server: UDP and TCP listeners around the pure core, the forwarder and the table feed.

The UDP hot path (batched with recvmmsg/sendmmsg in a thread of its own on Linux, see batch.py, else an asyncio
DatagramProtocol) is one dictionary lookup keyed by the packet after its id and flags (counts, question, OPT),
whose value is the prebuilt response in the four RD/CD variants and the instant it stops being exact; a hit
prepends the query id and sends. Mesh answers stay exact until the table changes; a cached upstream answer only
until its TTLs would drop by another second or it expires, after which the next query takes the slow path,
which renders it again with the TTLs counted down (or goes upstream once it has expired). Every miss goes through :func:`meshpilot.meshdns.answer.respond`, which either builds the mesh answer (stored for next
time), answers an error, drops the packet, or hands it to the :class:`~meshpilot.meshdns.forward.Forwarder`.
A new table replaces the dictionaries wholesale, so an answer is never older than the table it came from.

:class:`MeshDns` is the in-process API the sidecar agent uses (``async with MeshDns(config) as dns``, then
``dns.port``); :func:`serve` wraps it for the ``meshpilot meshdns`` command. Both own their tasks in an
``asyncio.TaskGroup`` (the UDP thread too: a task waits for it and sees its failure) and close their listeners on
the way out.
"""

from __future__ import annotations

import asyncio
import logging
import gc
import math
import socket
import struct
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, cast

from meshpilot.meshdns import batch
from meshpilot.meshdns.ads import AdsState, load_state, run_ads, save_state
from meshpilot.meshdns.answer import DROP, FORWARD, REPLY, flag_variants, respond
from meshpilot.meshdns.config import MeshDnsConfig, read_resolv_conf, without_self
from meshpilot.meshdns.forward import Forwarder
from meshpilot.meshdns.table import NameTable, Service, load_services_file

__all__ = ["MeshDns", "serve"]

log = logging.getLogger("meshpilot.meshdns")

_HOT_LIMIT = 100_000
_TCP_IDLE = 10.0


class _Udp(asyncio.DatagramProtocol):
    __slots__ = ("dns", "transport", "hits")

    def __init__(self, dns: MeshDns) -> None:
        self.dns = dns
        self.transport: asyncio.DatagramTransport  # set by connection_made, before any datagram
        self.hits = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # a datagram endpoint's transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        hot = self.dns._udp_hot.get(data[4:])
        if hot is not None and not data[2] & 0xF8 and hot[4] > self.dns.clock():  # a query with opcode QUERY
            # the index is 0-3, a bytes variant (4 is the expiry); a cast() would cost a call per query
            self.transport.sendto(data[:2] + hot[(data[2] & 1) | ((data[3] & 0x10) >> 3)], addr)  # type: ignore[operator]
            self.hits += 1
            return
        self.dns._miss(data, lambda out: self.transport.sendto(out, addr), tcp=False)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors about clients that went away; nothing to do


class MeshDns:
    """One meshdns instance. ``async with MeshDns(config) as dns:`` binds, loads the table and starts the feed."""

    def __init__(self, config: MeshDnsConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.counters: dict[str, int] = {}
        upstreams = list(config.upstreams)
        search = list(config.search)
        if not upstreams:
            upstreams, resolv_search = read_resolv_conf()
            if not search:
                search = resolv_search
        self._search = tuple(search)
        self._requested_upstreams = upstreams
        self.clock: Callable[[], float] = clock
        self.forwarder = Forwarder([], timeout=config.upstream_timeout, counters=self.counters, clock=clock,
                                   mark=config.upstream_mark)
        self.ads = AdsState(config.node_id, load_state(config.state_file) if config.state_file else None)
        self.table = NameTable.build((), domain=config.domain, ttl=config.ttl)
        self._serial = 0
        self._udp_hot: dict[bytes, batch.HotEntry] = {}
        self._tcp_hot: dict[bytes, batch.HotEntry] = {}
        self._udp: _Udp | None = None
        self._udp_transport: asyncio.DatagramTransport | None = None
        self._batched: batch.BatchedUdp | None = None
        self._udp_thread: asyncio.Task[None] | None = None
        self._tcp_server: asyncio.Server | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._feed: asyncio.Task[None] | None = None
        self.port = 0
        self.table_updated = asyncio.Event()

    # -- table -----------------------------------------------------------------------------------------------

    def set_services(self, services: list[Service]) -> None:
        """Install a new table; prebuilt answers of the old one are dropped with it."""
        self._serial += 1
        self.table = NameTable.build(services, domain=self.config.domain, ttl=self.config.ttl, search=self._search,
                                     namespace=self.config.namespace, serial=self._serial)
        self._udp_hot = {}
        self._tcp_hot = {}
        self.forwarder.forget_exact()
        self.counters["table_updates"] = self.counters.get("table_updates", 0) + 1
        self.table_updated.set()
        self.table_updated = asyncio.Event()
        log.info("event=table_installed services=%d serial=%d", len(services), self._serial)

    async def _on_ads_change(self) -> None:
        self.set_services(self.ads.services())
        if self.config.state_file:
            await asyncio.to_thread(save_state, self.config.state_file, dict(self.ads.resources))

    # -- queries ---------------------------------------------------------------------------------------------

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def _remember(self, data: bytes, response: bytes, until: float, tcp: bool) -> None:
        """Keep a response in the prebuilt-answer dictionary, valid until ``until`` (``inf`` for mesh answers)."""
        hot = self._tcp_hot if tcp else self._udp_hot
        if len(hot) >= _HOT_LIMIT:
            hot.clear()
        hot[data[4:]] = (*flag_variants(response), until)

    def _renew(self, data: bytes, now: float) -> batch.HotEntry | None:
        """In the UDP thread: the prebuilt answer of a packet whose cached upstream answer is still cached but a
        second older (its TTLs counted down), or None (expired, replaced, or forgotten with the table: the
        loop's slow path decides). Only the forwarder's cache is read; nothing goes upstream."""
        try:
            hit = self.forwarder.cached_until(data, None, False, now)
        except (KeyError, ValueError):  # the loop changed the cache under this read: let the slow path decide
            return None
        if hit is None:
            return None
        return (*flag_variants(hit[0]), hit[1])

    def _miss(self, data: bytes, reply: Callable[[bytes], Any], *, tcp: bool) -> None:
        try:
            if len(data) >= 12 and not data[2] & 0xF8:
                hit = self.forwarder.cached_until(data, None, tcp)
                if hit is not None:
                    self._count("forward_cache_hits")
                    self._remember(data, hit[0], hit[1], tcp)
                    reply(hit[0])
                    return
            outcome = respond(data, self.table, tcp=tcp)
            if outcome.kind == REPLY:
                self._count(f"replies_{outcome.reason}" if outcome.reason else "mesh_answers")
                if outcome.cacheable:
                    self._remember(data, outcome.response, math.inf, tcp)
                reply(outcome.response)
            elif outcome.kind == FORWARD:
                assert outcome.query is not None
                hit = self.forwarder.cached_until(data, outcome.query, tcp)
                if hit is not None:
                    self._count("forward_cache_hits")
                    self._remember(data, hit[0], hit[1], tcp)
                    reply(hit[0])
                elif self._tg is not None:
                    self._count("forwarded")
                    self._tg.create_task(self._forward(data, outcome.query, reply, tcp))
            elif outcome.kind == DROP:
                self._count(f"dropped_{outcome.reason}")
        except Exception:  # a packet must never take the server down; count it and move on
            self._count("internal_errors")
            log.exception("event=query_failed")

    async def _forward(self, data: bytes, query: Any, reply: Callable[[bytes], Any], tcp: bool) -> None:
        try:
            reply(await self.forwarder.resolve(data, query, tcp))
        except Exception:
            self._count("internal_errors")
            log.exception("event=forward_failed")

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def reply(out: bytes) -> None:
            if not writer.is_closing():
                writer.write(struct.pack("!H", len(out)) + out)

        try:
            while True:
                async with asyncio.timeout(_TCP_IDLE):
                    (length,) = struct.unpack("!H", await reader.readexactly(2))
                    data = await reader.readexactly(length)
                hot = self._tcp_hot.get(data[4:])
                if hot is not None and not data[2] & 0xF8 and hot[4] > self.clock():
                    # as in _Udp: the index is 0-3, a bytes variant
                    reply(data[:2] + hot[(data[2] & 1) | ((data[3] & 0x10) >> 3)])  # type: ignore[operator]
                    self._count("tcp_hot_hits")
                else:
                    self._miss(data, reply, tcp=True)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def _bind_udp(self, host: str, port: int, family: int) -> int:
        loop = asyncio.get_running_loop()
        if self.config.udp_batch and batch.available(family):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                sock.bind((host, port))
            except OSError:
                sock.close()
                raise
            self._batched = batch.BatchedUdp(sock, lambda: self._udp_hot,
                                             lambda data, reply: self._miss(data, reply, tcp=False), self.clock,
                                             self._renew)
            return int(sock.getsockname()[1])
        transport, proto = await loop.create_datagram_endpoint(
            lambda: _Udp(self), local_addr=(host, port), family=family)
        self._udp_transport, self._udp = transport, proto
        return int(transport.get_extra_info("sockname")[1])

    async def _serve_batched(self, udp: batch.BatchedUdp) -> None:
        """Own the UDP thread: it runs until stopped, and is waited for even when this task is cancelled, so the
        socket is closed only once nothing reads it."""
        loop = asyncio.get_running_loop()
        done = loop.run_in_executor(None, udp.run, loop.call_soon_threadsafe)
        try:
            await asyncio.shield(done)
        finally:
            udp.stop()
            await asyncio.wait([done])
            udp.sock.close()

    def _close_udp(self) -> None:
        if self._udp_transport is not None:
            self._udp_transport.close()
            self._udp_transport = None
        if self._batched is not None:
            self._batched.stop()
            if self._udp_thread is None:  # no thread yet; else its task closes the socket once the thread is done
                self._batched.sock.close()
                self._batched = None

    async def _bind(self) -> None:
        host, port = self.config.host, self.config.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for attempt in range(20):
            bound = await self._bind_udp(host, port, family)
            try:
                self._tcp_server = await asyncio.start_server(self._tcp_client, host, bound, family=family,
                                                              reuse_address=True)
            except OSError:
                self._close_udp()
                if port or attempt == 19:
                    raise
                continue
            self.port = bound
            return

    async def __aenter__(self) -> MeshDns:
        upstreams = without_self(self._requested_upstreams, self.config.host, self.config.port or -1)
        await self._bind()
        self.forwarder.upstreams = without_self(upstreams, self.config.host, self.port)
        if self.config.static_table:
            self.set_services(load_services_file(self.config.static_table))
        elif self.ads.resources:
            self.set_services(self.ads.services())  # the last table, served until the control plane answers
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        if self._batched is not None:
            self._udp_thread = self._tg.create_task(self._serve_batched(self._batched))
        if self.config.control_plane and not self.config.static_table:
            self._feed = self._tg.create_task(run_ads(
                self.config.control_plane, self.ads, self._on_ads_change,
                backoff_max=self.config.backoff_max, counters=self.counters, tls=self.config.tls))
        log.info("event=meshdns_listening host=%s port=%d upstreams=%s services=%d", self.config.host, self.port,
                 ",".join(f"{h}:{p}" for h, p in self.forwarder.upstreams), len(self.table.services))
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        # listeners first, then the tasks they fed
        self._close_udp()
        if self._tcp_server is not None:
            self._tcp_server.close()
        if self._feed is not None:
            self._feed.cancel()
        if self._tg is not None:
            await self._tg.__aexit__(exc_type, exc, tb)
            self._tg = None
        if self._batched is not None:
            self._batched.sock.close()  # closed already unless its task was cancelled before it started
            self._batched = None
        self._udp_thread = None

    # -- metrics ---------------------------------------------------------------------------------------------

    def metrics(self) -> dict[str, int]:
        out = dict(self.counters)
        out["udp_hot_hits"] = (self._udp.hits if self._udp else 0) + (self._batched.hits if self._batched else 0)
        if self._batched is not None:
            out["udp_send_drops"] = self._batched.send_drops
            out["forward_cache_renewed"] = self._batched.renewed
        out["table_services"] = len(self.table.services)
        out["ads_acks"], out["ads_nacks_total"] = self.ads.acks, self.ads.nacks
        return out

    def metrics_text(self) -> str:
        """The counters in Prometheus text format."""
        lines = ["# HELP meshdns_events_total meshdns events by kind", "# TYPE meshdns_events_total counter"]
        m = self.metrics()
        services = m.pop("table_services")
        for name, value in sorted(m.items()):
            lines.append(f'meshdns_events_total{{event="{name}"}} {value}')
        lines += ["# HELP meshdns_table_services services in the name table", "# TYPE meshdns_table_services gauge",
                  f"meshdns_table_services {services}"]
        return "\n".join(lines) + "\n"


async def serve(config: MeshDnsConfig, *, ready: Callable[[MeshDns], Any] | None = None) -> None:
    """Run meshdns until cancelled; ``ready`` is called with the running instance (``.port`` is bound)."""
    async with MeshDns(config) as dns:
        # what was built to start (modules, the first table) lives as long as the process: left out of the
        # collector's full passes, which would otherwise stop every query for 15-30 ms on this heap
        gc.freeze()
        if ready is not None:
            ready(dns)
        await asyncio.Event().wait()
