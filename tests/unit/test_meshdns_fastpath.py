"""meshdns serves cached upstream answers from its prebuilt-answer fast path, with TTLs that count down and never
past their expiry.

A real meshdns (batched recvmmsg path and the plain asyncio path) on 127.0.0.1 forwards to a tiny upstream in
the test that answers every A question with TTL 3 and counts what it was asked. Time is a clock the test
advances, so expiry is checked without sleeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import dns.asyncquery
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from meshpilot.meshdns.config import MeshDnsConfig
from meshpilot.meshdns.server import MeshDns
from meshpilot.meshdns.table import Service


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Upstream(asyncio.DatagramProtocol):
    """Answers every question with ``192.0.2.<n>`` (n = how many questions it has seen so far), TTL 3, as an
    authoritative server that offers no recursion would (AA set, RA clear). A name starting with ``many.`` gets
    80 addresses, whatever size the query offered (a 1,300-byte datagram, which loopback carries)."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        q = dns.message.from_wire(data)
        name = q.question[0].name
        self.asked.append(name.to_text())
        r = dns.message.make_response(q)
        r.flags |= dns.flags.AA
        n = len(self.asked)
        values = [f"192.0.{i}.{n}" for i in range(80)] if name.labels[0] == b"many" else [f"192.0.2.{n}"]
        r.answer.append(dns.rrset.from_text_list(name, 3, "IN", "A", values))
        self.transport.sendto(r.to_wire(max_size=65535), addr)


@asynccontextmanager
async def _meshdns(batch: bool) -> AsyncIterator[tuple[MeshDns, _Upstream, _Clock]]:
    loop = asyncio.get_running_loop()
    up = _Upstream()
    transport, _ = await loop.create_datagram_endpoint(lambda: up, local_addr=("127.0.0.1", 0))
    try:
        port = transport.get_extra_info("sockname")[1]
        clock = _Clock()
        config = MeshDnsConfig(port=0, control_plane=None, upstreams=(("127.0.0.1", port),), udp_batch=batch,
                               search=("corp.test",))
        async with MeshDns(config, clock=clock) as server:
            yield server, up, clock
    finally:
        transport.close()


async def _ask(server: MeshDns, name: str) -> tuple[str, int]:
    r = await dns.asyncquery.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=server.port, timeout=2)
    assert r.rcode() == dns.rcode.NOERROR, f"{name}: expected NOERROR, got {dns.rcode.to_text(r.rcode())}"
    rrsets = [rr for rr in r.answer if rr.rdtype == dns.rdatatype.A]
    assert len(rrsets) == 1, f"{name}: expected one A rrset, got {r.answer}"
    return rrsets[0][0].to_text(), rrsets[0].ttl


def _hot_hits(server: MeshDns) -> int:
    return server.metrics()["udp_hot_hits"]


@pytest.mark.parametrize("batch", [True, False], ids=["recvmmsg", "asyncio"])
def test_cached_forwarded_answers_take_the_fast_path_and_expire(batch: bool) -> None:
    async def scenario() -> None:
        async with _meshdns(batch) as (server, up, clock):
            assert await _ask(server, "fwd.example.") == ("192.0.2.1", 3)
            assert up.asked == ["fwd.example."], f"expected one upstream question, got {up.asked}"
            # the next query renders the cached answer (slow path) and stores it; the one after is a fast-path hit
            assert await _ask(server, "fwd.example.") == ("192.0.2.1", 3)
            hits = _hot_hits(server)
            assert await _ask(server, "fwd.example.") == ("192.0.2.1", 3)
            assert _hot_hits(server) == hits + 1, f"expected a fast-path hit, hits went {hits} -> {_hot_hits(server)}"

            clock.now += 1.2  # the remaining TTL drops to 2: the stored answer must not be sent as it is
            slow = server.metrics().get("forward_cache_hits", 0)
            assert await _ask(server, "fwd.example.") == ("192.0.2.1", 2), "expected the TTL counted down to 2"
            if batch:  # counted down in the UDP thread itself, not posted to the loop's slow path
                m = server.metrics()
                assert (m["forward_cache_renewed"], m.get("forward_cache_hits", 0)) == (1, slow), (
                    f"expected the countdown rendered in the UDP thread, got renewed={m['forward_cache_renewed']}, "
                    f"slow-path cache hits {slow} -> {m.get('forward_cache_hits', 0)}")
            hits = _hot_hits(server)
            assert await _ask(server, "fwd.example.") == ("192.0.2.1", 2)
            assert _hot_hits(server) == hits + 1, "expected the re-rendered answer back on the fast path"
            assert up.asked == ["fwd.example."], f"expected no new upstream question before expiry, got {up.asked}"

            clock.now += 1.85  # 3.05 s after it was stored: expired
            assert await _ask(server, "fwd.example.") == ("192.0.2.2", 3), "expected a fresh upstream answer"
            assert up.asked == ["fwd.example.", "fwd.example."], f"expected a second upstream question, got {up.asked}"

    asyncio.run(scenario())


def test_a_name_that_becomes_a_mesh_name_is_no_longer_served_from_the_upstream_cache() -> None:
    async def scenario() -> None:
        async with _meshdns(True) as (server, up, _):
            for _ in range(3):  # forwarded, then rendered from the cache, then a fast-path hit
                assert await _ask(server, "web.corp.test.") == ("192.0.2.1", 3)
            server.set_services([Service.from_dict({"name": "web", "namespace": "default", "vip": "240.240.0.9",
                                                    "ports": [{"name": "http", "port": 80, "protocol": "http"}]})])
            for _ in range(2):
                got = await _ask(server, "web.corp.test.")
                assert got == ("240.240.0.9", 30), f"expected the mesh VIP after the table update, got {got}"
            assert up.asked == ["web.corp.test."], f"expected one upstream question, got {up.asked}"

    asyncio.run(scenario())


def test_mesh_names_stay_on_the_fast_path_however_time_moves() -> None:
    async def scenario() -> None:
        async with _meshdns(True) as (server, _, clock):
            server.set_services([Service.from_dict({"name": "api", "namespace": "default", "vip": "240.240.0.7",
                                                    "ports": [{"name": "http", "port": 80, "protocol": "http"}]})])
            assert await _ask(server, "api.default.svc.mesh.") == ("240.240.0.7", 30)
            clock.now += 10_000
            hits = _hot_hits(server)
            assert await _ask(server, "api.default.svc.mesh.") == ("240.240.0.7", 30)
            assert _hot_hits(server) == hits + 1, "expected a mesh answer to stay a fast-path hit"

    asyncio.run(scenario())


@pytest.mark.parametrize("batch", [True, False], ids=["recvmmsg", "asyncio"])
def test_forwarded_answers_are_not_authoritative_and_offer_recursion(batch: bool) -> None:
    """AA is meshdns's to claim only for mesh names; RA says what meshdns offers, not what the upstream does."""

    def flags_of(r: dns.message.Message) -> str:
        return dns.flags.to_text(r.flags)

    async def scenario() -> None:
        async with _meshdns(batch) as (server, up, _):
            server.set_services([Service.from_dict({"name": "api", "namespace": "default", "vip": "240.240.0.7"})])
            q = dns.message.make_query("fwd.example.", "A")
            # forwarded, rendered from the cache, then a fast-path hit; and over TCP
            for how in ("forwarded", "cached", "fast path"):
                hits = _hot_hits(server)
                r = await dns.asyncquery.udp(q, "127.0.0.1", port=server.port, timeout=2)
                assert r.answer, f"{how}: expected the upstream's answer, got {r}"
                assert not r.flags & dns.flags.AA and r.flags & dns.flags.RA, (
                    f"{how}: expected RA and no AA, got flags {flags_of(r)}")
            assert _hot_hits(server) == hits + 1, "expected the last query to be a fast-path hit"
            r = await dns.asyncquery.tcp(q, "127.0.0.1", port=server.port, timeout=2)
            assert not r.flags & dns.flags.AA and r.flags & dns.flags.RA, f"TCP: expected RA, no AA: {flags_of(r)}"
            assert up.asked == ["fwd.example."], f"expected one upstream question, got {up.asked}"

            mesh = await dns.asyncquery.udp(dns.message.make_query("api.default.svc.mesh.", "A"), "127.0.0.1",
                                            port=server.port, timeout=2)
            assert mesh.flags & dns.flags.AA and mesh.flags & dns.flags.RA, (
                f"mesh: expected AA and RA, got {flags_of(mesh)}")
            notify = dns.message.make_query("api.default.svc.mesh.", "SOA")
            notify.set_opcode(dns.opcode.NOTIFY)
            err = await dns.asyncquery.udp(notify, "127.0.0.1", port=server.port, timeout=2)
            assert err.rcode() == dns.rcode.NOTIMP and err.flags & dns.flags.RA, (
                f"NOTIFY: expected NOTIMP with RA, got {dns.rcode.to_text(err.rcode())} {flags_of(err)}")

    asyncio.run(scenario())


@pytest.mark.parametrize("batch", [True, False], ids=["recvmmsg", "asyncio"])
def test_forwarded_answers_over_1232_bytes_are_truncated_over_udp(batch: bool) -> None:
    async def scenario() -> None:
        async with _meshdns(batch) as (server, _, _):
            q = dns.message.make_query("many.example.", "A", use_edns=0, payload=4096)
            for how in ("forwarded", "cached", "fast path"):
                wire = await _udp_raw(q.to_wire(), server.port)
                r = dns.message.from_wire(wire)
                assert len(wire) <= 1232 and r.flags & dns.flags.TC and not r.answer, (
                    f"{how}: expected at most 1232 bytes with TC and no answer to a client offering 4096, got "
                    f"{len(wire)} bytes, flags {dns.flags.to_text(r.flags)}, {sum(len(a) for a in r.answer)} records")
            r = await dns.asyncquery.tcp(q, "127.0.0.1", port=server.port, timeout=2)
            assert not r.flags & dns.flags.TC and len(r.answer[0]) == 80, (
                f"TCP: expected all 80 addresses, got {sum(len(a) for a in r.answer)}")

    asyncio.run(scenario())


async def _udp_raw(query: bytes, port: int) -> bytes:
    """One datagram to meshdns and the bytes that come back (dnspython would not show the datagram's size)."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    class _Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            if not got.done():
                got.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(_Client, remote_addr=("127.0.0.1", port))
    try:
        transport.sendto(query)
        async with asyncio.timeout(2):
            return await got
    finally:
        transport.close()
