"""The pure DNS core of meshdns: query bytes and a name table in, response bytes out, no I/O.

:func:`respond` decides what a packet deserves: a mesh answer built from the table, an error (FORMERR, NOTIMP,
REFUSED, BADVERS), a silent drop, or "forward this upstream". Mesh answers are what the server stores in its
prebuilt-response dictionary, so they must depend only on the bytes after the query id and flags; the id, RD
and CD are patched per query (see :func:`flag_variants`). :func:`answer` is the same core with the simple
signature the property tests drive.

Answer rules: A/AAAA for every name form of a service; SRV for ``_<port>._tcp.<name>`` (one port) and for the
bare name (all ports), target ``<svc>.<ns>.svc.<domain>.`` with its addresses as additional records; a known
name without the asked type is NOERROR with an SOA in the authority section (RFC 2308), an unknown name inside
a mesh domain NXDOMAIN with the SOA; OPT only when the query had one (RFC 6891); TC when the response does not
fit the client's UDP size, which is never taken as more than 1232 bytes (:func:`udp_limit`). AA is set on mesh
answers only, RA on every response (meshdns recurses for the names it does not own, by forwarding them).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from meshpilot.meshdns.table import Lookup, NameTable
from meshpilot.meshdns.wire import (
    AAAA, ANY, CLASS_ANY, CLASS_IN, RCODE, SOA, SRV, A, FormatError, MessageWriter, Query, parse_query,
    split_name,
)

__all__ = ["DROP", "FORWARD", "REPLY", "RA", "Outcome", "answer", "flag_variants", "respond", "udp_limit",
           "OUR_UDP_SIZE"]

REPLY = 0
FORWARD = 1
DROP = 2

#: the UDP payload size meshdns advertises and the largest it will send (DNS flag day 2020)
OUR_UDP_SIZE = 1232
#: RA: every response says meshdns offers recursion, whoever built it
RA = 0x0080
_SOA_LABELS = (b"ns",), (b"hostmaster",)


@dataclass(slots=True, frozen=True)
class Outcome:
    """What to do with a packet. ``cacheable`` marks a REPLY that depends only on ``packet[4:]``."""

    kind: int
    response: bytes = b""
    query: Query | None = None
    cacheable: bool = False
    reason: str = ""


def udp_limit(query: Query) -> int:
    """The largest UDP response meshdns sends this client: 512 without EDNS, else the client's size taken between
    512 and 1232; a larger offer is not trusted, since a path that fragments such datagrams loses them."""
    if query.opt is None:
        return 512
    return max(512, min(query.opt.udp_size, OUR_UDP_SIZE))


def _flags(query_flags: int, rcode: int, *, aa: bool, tc: bool = False) -> int:
    # QR, opcode echoed, AA, TC, RD copied; RA (we recurse by forwarding); CD copied; rcode
    return (0x8000 | (query_flags & 0x7800) | (0x0400 if aa else 0) | (0x0200 if tc else 0)
            | (query_flags & 0x0100) | RA | (query_flags & 0x0010) | (rcode & 0xF))


def _error(data: bytes, rcode: int, question_end: int, query: Query | None) -> bytes:
    """An error response echoing the question when it could be read (and the OPT when there was one)."""
    qid, qflags = struct.unpack_from("!HH", data)
    has_q = question_end > 12 and (qflags >> 11) & 0xF == 0  # other opcodes give the sections other meanings
    ext = 0
    if rcode > 15:
        ext, rcode = rcode >> 4, rcode & 0xF
    opt = query.opt if query is not None else None
    head = struct.pack("!HHHHHH", qid, _flags(qflags, rcode, aa=False), 1 if has_q else 0, 0, 0,
                       1 if opt is not None else 0)
    w = MessageWriter(head, data[12:question_end] if has_q else b"", query.labels if query else ())
    if opt is not None:
        w.opt(OUR_UDP_SIZE, ext, opt.do)
    return bytes(w.buf)


def _soa(w: MessageWriter, owner: tuple[bytes, ...], table: NameTable, zone: tuple[bytes, ...]) -> None:
    ttl = table.ttl
    w.record(owner, SOA, ttl, _SOA_LABELS[0] + zone, _SOA_LABELS[1] + zone,
             struct.pack("!IIIII", table.serial & 0xFFFFFFFF, 3600, 600, 86400, ttl))


_Rdata = tuple[bytes | tuple[bytes, ...], ...]  # a record's parts, as MessageWriter.record takes them


def _build(data: bytes, q: Query, table: NameTable, tcp: bool) -> bytes | None:
    labels = q.lower_labels()
    found: Lookup | None = table.names.get(labels)
    zone = table.zone_of(labels)
    if found is None and zone is None:
        return None
    if q.qclass not in (CLASS_IN, CLASS_ANY):
        return _error(data, RCODE.REFUSED, q.question_end, q)
    ttl = table.ttl
    answers: list[tuple[int, _Rdata]] = []
    additional: list[tuple[int, _Rdata]] = []
    rcode = RCODE.NOERROR
    qname = q.labels
    if found is not None:
        if found.port is None and q.qtype in (A, ANY) and found.a:
            answers.append((A, (found.a,)))
        if found.port is None and q.qtype in (AAAA, ANY) and found.aaaa:
            answers.append((AAAA, (found.aaaa,)))
        if q.qtype in (SRV, ANY):
            ports = (found.port,) if found.port is not None else found.service.ports
            for p in ports:
                answers.append((SRV, (struct.pack("!HHH", 10, 100, p.port), found.fqdn)))
            if ports:
                if found.a:
                    additional.append((A, (found.a,)))
                if found.aaaa:
                    additional.append((AAAA, (found.aaaa,)))
    elif labels == zone and q.qtype in (SOA, ANY):
        answers.append((SOA, ()))
    elif labels != zone and labels not in table.interior:
        rcode = RCODE.NXDOMAIN
    negative = not answers
    if q.opt is not None and q.opt.version != 0:
        return _error(data, RCODE.BADVERS, q.question_end, q)

    def render(with_records: bool) -> bytes:
        an = len(answers) if with_records else 0
        ns = 1 if (negative and with_records) else 0
        ar = (len(additional) if with_records else 0) + (1 if q.opt is not None else 0)
        head = struct.pack("!HHHHHH", q.id, _flags(q.flags, rcode, aa=True, tc=not with_records), 1, an, ns, ar)
        w = MessageWriter(head, data[12:q.question_end], q.labels)
        if with_records:
            for rtype, rdata in answers:
                if rtype == SOA:
                    assert zone is not None
                    _soa(w, qname, table, zone)
                else:
                    w.record(qname, rtype, ttl, *rdata)
            if negative:
                # owner: the zone apex for names inside a mesh domain, else the asked name itself
                owner = qname[len(qname) - len(zone):] if zone is not None else qname
                _soa(w, owner, table, zone if zone is not None else split_name(table.domain))
            for rtype, rdata in additional:
                assert found is not None
                w.record(found.fqdn, rtype, ttl, *rdata)
        if q.opt is not None:
            w.opt(OUR_UDP_SIZE, 0, q.opt.do)
        return bytes(w.buf)

    out = render(True)
    if not tcp and len(out) > udp_limit(q):
        out = render(False)
    return out


def respond(data: bytes, table: NameTable, *, tcp: bool = False) -> Outcome:
    """Decide what ``data`` deserves. Never raises for any input."""
    if len(data) < 12:
        return Outcome(DROP, reason="short")
    if data[2] & 0x80:
        return Outcome(DROP, reason="response")  # never answer a response: that is how loops start
    if data[2] & 0x78:
        # read before the sections, which other opcodes give other meanings (a DSO message has no question, an
        # UPDATE's zone section must be SOA): NOTIMP with the header only (RFC 1035 4.1.1, RFC 8490 5.1)
        return Outcome(REPLY, _error(data, RCODE.NOTIMP, 0, None), reason="notimp")
    try:
        q = parse_query(data)
    except FormatError as exc:
        return Outcome(REPLY, _error(data, RCODE.FORMERR, exc.question_end, None), reason="formerr")
    if q.qtype in (251, 252):  # IXFR, AXFR
        return Outcome(REPLY, _error(data, RCODE.REFUSED, q.question_end, q), q, reason="refused")
    out = _build(data, q, table, tcp)
    if out is None:
        if q.opt is not None and q.opt.version != 0:
            return Outcome(REPLY, _error(data, RCODE.BADVERS, q.question_end, q), q, reason="badvers")
        return Outcome(FORWARD, query=q)
    return Outcome(REPLY, out, q, cacheable=True)


def answer(data: bytes, table: NameTable, *, tcp: bool = False) -> bytes | None:
    """The response for ``data`` from the table alone; None when it is dropped or must be forwarded."""
    outcome = respond(data, table, tcp=tcp)
    return outcome.response if outcome.kind == REPLY else None


def flag_variants(response: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """A prebuilt response from byte 2 on, in the four RD/CD combinations a query can ask for.

    Indexed by ``(query[2] & 1) | ((query[3] & 0x10) >> 3)``; the server prepends the query's id.
    """
    b2, b3 = response[2] & 0xFE, response[3] & 0xEF
    rest = response[4:]

    def variant(i: int) -> bytes:
        return bytes((b2 | (i & 1), b3 | (0x10 if i & 2 else 0))) + rest

    return variant(0), variant(1), variant(2), variant(3)
