"""Forwarding of non-mesh names to the node's resolvers, with a TTL-honouring cache.

Every upstream query gets a fresh random id and its own connected UDP socket (so a fresh source port from the
kernel's randomised ephemeral range), and only an answer from that upstream with the same id and question is
accepted (RFC 5452). Each upstream is tried in turn with a timeout; a truncated answer is retried over TCP; when
every upstream fails the client gets SERVFAIL straight away (a refused port fails in microseconds, not after a
timeout). Identical questions in flight share one upstream query. With ``mark`` set, every upstream socket
carries that SO_MARK, which the node's capture rules exempt, so meshdns's own queries to port 53 are not
redirected back to itself.

Answers are cached under the lower-cased name, type, class and the client's EDNS shape (OPT present, DO bit),
for the smallest TTL in the answer, or for a negative answer the SOA's TTL/MINIMUM (RFC 2308), capped at
``max_ttl``. A cached answer is replayed with the client's id, flags and question spelling and with TTLs
counted down; it never carries AA, always RA, and over UDP it is truncated (TC) beyond :func:`udp_limit`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from meshpilot.meshdns.answer import OUR_UDP_SIZE, RA, udp_limit
from meshpilot.meshdns.wire import (
    OPT, RCODE, SOA, FormatError, MessageWriter, Query, encode_name, scan_records,
)

__all__ = ["Forwarder", "servfail"]

log = logging.getLogger("meshpilot.meshdns")

_HEADER = struct.Struct("!HHHHHH")
_EXACT_LIMIT = 50_000
_CACHE_LIMIT = 50_000


@dataclass(slots=True)
class _Entry:
    """An upstream answer ready to replay: header flags and counts, the records after the question (OPT
    removed), where their TTLs sit and what they were, and when it was stored."""

    flags: int
    counts: tuple[int, int, int]
    body: bytes
    ttl_offsets: tuple[int, ...]
    ttls: tuple[int, ...]
    stored: float
    expires: float
    # (age in whole seconds, the records with TTLs counted down by it): one attribute, so the UDP thread and
    # the loop, which may both render an entry, never see one's age with the other's bytes
    rendered: tuple[int, bytes] = (-1, b"")


@dataclass(slots=True)
class _Inflight:
    future: asyncio.Future[_Entry | None]
    waiters: int = 1


#: what a replay needs to know about the client's packet: where its question ends, the OPT to send, the UDP limit
_Shape = tuple[int, bytes, int]


def _shape(q: Query) -> _Shape:
    opt = b""
    if q.opt is not None:
        opt = b"\0" + struct.pack("!HHBBHH", OPT, OUR_UDP_SIZE, 0, 0, 0x8000 if q.opt.do else 0, 0)
    return q.question_end, opt, udp_limit(q)


def servfail(query: Query, data: bytes) -> bytes:
    """SERVFAIL echoing the client's question and EDNS shape."""
    flags = 0x8000 | (query.flags & 0x7900) | RA | (query.flags & 0x0010) | RCODE.SERVFAIL
    head = _HEADER.pack(query.id, flags, 1, 0, 0, 1 if query.opt else 0)
    w = MessageWriter(head, data[12:query.question_end], query.labels)
    if query.opt is not None:
        w.opt(OUR_UDP_SIZE, 0, query.opt.do)
    return bytes(w.buf)


def _parse_upstream(resp: bytes, question_end: int, now: float, max_ttl: int) -> _Entry | None:
    """Turn an upstream response into a cache entry; None when it must not be used at all."""
    _, flags, _, an, ns, ar = _HEADER.unpack_from(resp)
    records = scan_records(resp, question_end, (an, ns, ar))
    keep = []
    for rec in records:
        if rec.rtype == OPT:
            break  # OPT is hop-by-hop; anything after it in the additional section is dropped with it
        keep.append(rec)
    body_end = keep[-1].end if keep else question_end
    body = resp[question_end:body_end]
    counts = [0, 0, 0]
    for rec in keep:
        counts[rec.section] += 1
    rcode = flags & 0xF
    ttl: int | None = None
    if rcode in (RCODE.NOERROR, RCODE.NXDOMAIN):
        if counts[0]:
            ttl = min(rec.ttl for rec in keep if rec.section == 0)
        else:
            for rec in keep:
                if rec.section == 1 and rec.rtype == SOA and rec.rdata_length >= 20:
                    (minimum,) = struct.unpack_from("!I", resp, rec.rdata_offset + rec.rdata_length - 4)
                    ttl = min(rec.ttl, minimum)
                    break
    cache_for = 0 if ttl is None else max(0, min(ttl, max_ttl))
    return _Entry(
        # AD and rcode from upstream; not AA (meshdns is not authoritative for this name) nor the upstream's RA (RA
        # says what meshdns offers); TC was dealt with by the TCP retry; RD/CD come from the client
        flags=(flags & 0x002F) | RA,
        counts=(counts[0], counts[1], counts[2]),
        body=body,
        ttl_offsets=tuple(rec.ttl_offset - question_end for rec in keep),
        ttls=tuple(rec.ttl for rec in keep),
        stored=now,
        expires=now + cache_for,
    )


class _UpstreamUdp(asyncio.DatagramProtocol):
    def __init__(self, qid: int, question: bytes, future: asyncio.Future[bytes]) -> None:
        self.qid, self.question, self.future = qid, question, future

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.future.done() or not _matches(data, self.qid, self.question):
            return
        self.future.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.future.done():
            self.future.set_exception(exc or ConnectionError("upstream socket closed"))


def _matches(data: bytes, qid: int, question: bytes) -> bool:
    """An answer is ours only with our id, QR set, one question, and our question (case-insensitively)."""
    if len(data) < 12 + len(question):
        return False
    rid, flags, qd = struct.unpack_from("!HHH", data)
    return rid == qid and bool(flags & 0x8000) and qd == 1 and data[12:12 + len(question)].lower() == question


@dataclass(slots=True)
class Forwarder:
    upstreams: Sequence[tuple[str, int]]
    timeout: float = 1.5
    max_ttl: int = 3600
    counters: dict[str, int] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic
    mark: int | None = None  # SO_MARK for upstream sockets (the capture rules' exempt mark)
    _cache: dict[tuple[bytes, int, int, int], _Entry] = field(default_factory=dict)
    _exact: dict[bytes, tuple[_Entry, tuple[bytes, int, int, int], _Shape]] = field(default_factory=dict)
    _inflight: dict[tuple[bytes, int, int, int], _Inflight] = field(default_factory=dict)

    @staticmethod
    def _key(q: Query) -> tuple[bytes, int, int, int]:
        edns = 0 if q.opt is None else (2 if q.opt.do else 1)
        return b".".join(q.lower_labels()), q.qtype, q.qclass, edns

    def cached(self, data: bytes, q: Query | None, tcp: bool, now: float | None = None) -> bytes | None:
        """Replay a cached answer for this packet; with ``q`` None only an exact-bytes hit is possible."""
        hit = self.cached_until(data, q, tcp, now)
        return None if hit is None else hit[0]

    def cached_until(self, data: bytes, q: Query | None, tcp: bool,
                     now: float | None = None) -> tuple[bytes, float] | None:
        """Like :meth:`cached`, plus the instant until which the same response (after its id) stays exact: the
        next whole second of the entry's age (when every TTL in it drops by one) or its expiry, if sooner.
        The server keeps such a response in its prebuilt-answer dictionary until then."""
        now = self.clock() if now is None else now
        hit = self._exact.get(data[4:])
        if hit is not None:
            entry, key, shape = hit
            if entry.expires > now and self._cache.get(key) is entry:
                return self._render(entry, data, shape, tcp, now), self._valid_until(entry, now)
            self._exact.pop(data[4:], None)  # the UDP thread and the loop may both find it stale
        if q is None:
            return None
        key = self._key(q)
        entry2 = self._cache.get(key)
        if entry2 is None:
            return None
        if entry2.expires <= now:
            del self._cache[key]
            return None
        if len(self._exact) >= _EXACT_LIMIT:
            self._exact.clear()
        shape = _shape(q)
        self._exact[data[4:]] = (entry2, key, shape)
        return self._render(entry2, data, shape, tcp, now), self._valid_until(entry2, now)

    @staticmethod
    def _valid_until(entry: _Entry, now: float) -> float:
        return min(entry.expires, entry.stored + int(now - entry.stored) + 1)

    def forget_exact(self) -> None:
        """Drop the exact-bytes index (not the cache): the next packet of each spelling is classified again, so a
        name that has just become a mesh name is answered from the table, not from an older upstream answer."""
        self._exact.clear()

    def _render(self, entry: _Entry, data: bytes, shape: _Shape, tcp: bool, now: float) -> bytes:
        age = int(now - entry.stored)
        rendered_age, records = entry.rendered
        if rendered_age != age:
            body = bytearray(entry.body)
            for off, ttl in zip(entry.ttl_offsets, entry.ttls):
                struct.pack_into("!I", body, off, max(0, ttl - age))
            records = bytes(body)
            entry.rendered = (age, records)
        an, ns, ar = entry.counts
        question_end, opt, limit = shape
        flags = 0x8000 | entry.flags | (((data[2] << 8) | data[3]) & 0x0110)
        head = _HEADER.pack(0, flags, 1, an, ns, ar + (1 if opt else 0))
        question = data[12:question_end]
        out = data[:2] + head[2:] + question + records + opt
        if not tcp and len(out) > limit:
            head = _HEADER.pack(0, flags | 0x0200, 1, 0, 0, 1 if opt else 0)
            out = data[:2] + head[2:] + question + opt
        return out

    async def resolve(self, data: bytes, q: Query, tcp: bool) -> bytes:
        """Answer ``q`` through the upstreams (or the cache); SERVFAIL when none of them answers."""
        key = self._key(q)
        now = self.clock()
        entry = self._cache.get(key)
        if entry is None or entry.expires <= now:
            flight = self._inflight.get(key)
            if flight is None:
                flight = _Inflight(asyncio.get_running_loop().create_future())
                self._inflight[key] = flight
                try:
                    entry = await self._exchange(q, key)
                    flight.future.set_result(entry)
                except BaseException as exc:
                    flight.future.set_result(None)
                    if not isinstance(exc, Exception):
                        raise
                    log.warning("event=forward_error name=%s error=%r", key[0].decode(errors="replace"), exc)
                    entry = None
                finally:
                    del self._inflight[key]
            else:
                flight.waiters += 1
                entry = await asyncio.shield(flight.future)
        if entry is None:
            self.counters["servfail_sent"] = self.counters.get("servfail_sent", 0) + 1
            return servfail(q, data)
        return self._render(entry, data, _shape(q), tcp, self.clock())

    async def _exchange(self, q: Query, key: tuple[bytes, int, int, int]) -> _Entry | None:
        question = encode_name(q.lower_labels()) + struct.pack("!HH", q.qtype, q.qclass)
        do = q.opt is not None and q.opt.do
        for host, port in self.upstreams:
            qid = int.from_bytes(os.urandom(2), "big")
            msg = (_HEADER.pack(qid, 0x0100 | (q.flags & 0x0010), 1, 0, 0, 1) + question
                   + b"\0" + struct.pack("!HHBBHH", OPT, OUR_UDP_SIZE, 0, 0, 0x8000 if do else 0, 0))
            self.counters["upstream_queries"] = self.counters.get("upstream_queries", 0) + 1
            try:
                async with asyncio.timeout(self.timeout):
                    resp = await self._udp(host, port, msg, qid, question)
                    if resp[2] & 0x02:  # TC: the same question over TCP
                        resp = await self._tcp(host, port, msg, qid, question)
                entry = _parse_upstream(resp, 12 + len(question), self.clock(), self.max_ttl)
            except (OSError, TimeoutError, FormatError, EOFError, asyncio.IncompleteReadError) as exc:
                self.counters["upstream_failures"] = self.counters.get("upstream_failures", 0) + 1
                log.debug("event=upstream_failed upstream=%s:%d error=%r", host, port, exc)
                continue
            if entry is None or entry.flags & 0xF in (RCODE.SERVFAIL, RCODE.REFUSED, RCODE.NOTIMP,
                                                      RCODE.FORMERR):
                self.counters["upstream_failures"] = self.counters.get("upstream_failures", 0) + 1
                continue
            if entry.expires > entry.stored:
                if len(self._cache) >= _CACHE_LIMIT:
                    self._cache.clear()
                    self._exact.clear()
                self._cache[key] = entry
            return entry
        return None

    def _socket(self, host: str, kind: int) -> socket.socket:
        """A non-blocking socket for one upstream query, carrying ``mark`` (SO_MARK) when one is configured, so
        the node's capture rules let it pass instead of sending it back to meshdns."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, kind)
        try:
            sock.setblocking(False)
            if self.mark is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
                except OSError as exc:  # needs CAP_NET_ADMIN; a uid exemption may cover us instead
                    log.warning("event=so_mark_unavailable mark=%#x error=%r (upstream queries go unmarked)",
                                self.mark, exc)
                    self.mark = None
        except BaseException:
            sock.close()
            raise
        return sock

    async def _udp(self, host: str, port: int, msg: bytes, qid: int, question: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        sock = self._socket(host, socket.SOCK_DGRAM)
        try:
            sock.connect((host, port))  # a fresh ephemeral source port, and only this peer's datagrams
        except BaseException:
            sock.close()
            raise
        transport, _ = await loop.create_datagram_endpoint(lambda: _UpstreamUdp(qid, question, future), sock=sock)
        try:
            transport.sendto(msg)
            return await future
        finally:
            transport.close()

    async def _tcp(self, host: str, port: int, msg: bytes, qid: int, question: bytes) -> bytes:
        sock = self._socket(host, socket.SOCK_STREAM)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(struct.pack("!H", len(msg)) + msg)
            await writer.drain()
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                resp = await reader.readexactly(length)
                if _matches(resp, qid, question):
                    return resp
        finally:
            writer.close()
