"""The small part of the DNS wire format that meshdns reads and writes itself.

meshdns answers from prebuilt responses and parses a packet only when that lookup misses; this module is that
parser (header, one question, the records after it, the OPT pseudo-record) and a compressing message writer.
It is deliberately tiny and strict: anything it cannot read raises :class:`FormatError`, which the server turns
into FORMERR or a silent drop. Names are kept as tuples of raw label bytes so that a label containing a dot can
never be confused with two labels.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "ANY", "AAAA", "A", "CLASS_ANY", "CLASS_IN", "FormatError", "MessageWriter", "Opt", "Query", "Record", "SOA",
    "SRV", "OPT", "RCODE", "parse_query", "scan_records", "skip_name", "encode_name", "split_name",
]

A = 1
NS = 2
SOA = 6
AAAA = 28
SRV = 33
OPT = 41
ANY = 255
CLASS_IN = 1
CLASS_ANY = 255


class RCODE:
    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5
    BADVERS = 16


_HEADER = struct.Struct("!HHHHHH")
_TYPE_CLASS = struct.Struct("!HH")
_RR_FIXED = struct.Struct("!HHIH")


class FormatError(ValueError):
    """The packet is not a DNS message meshdns can read; ``question_end`` is set when the question was readable."""

    def __init__(self, reason: str, question_end: int = 0) -> None:
        super().__init__(reason)
        self.question_end = question_end


@dataclass(slots=True, frozen=True)
class Opt:
    """The EDNS(0) OPT pseudo-record of a message (RFC 6891)."""

    udp_size: int
    ext_rcode: int
    version: int
    do: bool
    options: bytes


@dataclass(slots=True, frozen=True)
class Query:
    """A parsed query: header fields, the single question and the OPT record if there was one."""

    id: int
    flags: int
    labels: tuple[bytes, ...]
    qtype: int
    qclass: int
    question_end: int
    opt: Opt | None
    counts: tuple[int, int, int, int]

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF

    @property
    def is_response(self) -> bool:
        return bool(self.flags & 0x8000)

    def lower_labels(self) -> tuple[bytes, ...]:
        return tuple(label.lower() for label in self.labels)


@dataclass(slots=True, frozen=True)
class Record:
    """Where one resource record sits in a message: offsets are absolute, ``section`` is 0 answer, 1 authority,
    2 additional."""

    start: int
    rtype: int
    rclass: int
    ttl: int
    ttl_offset: int
    rdata_offset: int
    rdata_length: int
    end: int
    section: int


def _read_question_name(data: bytes, off: int) -> tuple[tuple[bytes, ...], int]:
    labels: list[bytes] = []
    total = 1
    n = len(data)
    while True:
        if off >= n:
            raise FormatError("name runs past the end of the packet")
        length = data[off]
        if length == 0:
            return tuple(labels), off + 1
        if length > 63:
            # a question is the first name in a query, so a compression pointer has nothing to point at
            raise FormatError("compression pointer or reserved label type in the question")
        total += length + 1
        if total > 255:
            raise FormatError("name longer than 255 octets")
        end = off + 1 + length
        if end > n:
            raise FormatError("label runs past the end of the packet")
        labels.append(data[off + 1:end])
        off = end


def skip_name(data: bytes, off: int) -> int:
    """Offset just after the (possibly compressed) name at ``off``."""
    n = len(data)
    total = 0
    while True:
        if off >= n:
            raise FormatError("name runs past the end of the packet")
        length = data[off]
        if length == 0:
            return off + 1
        if length & 0xC0 == 0xC0:
            if off + 2 > n:
                raise FormatError("truncated compression pointer")
            return off + 2
        if length > 63:
            raise FormatError("reserved label type")
        total += length + 1
        if total > 255:
            raise FormatError("name longer than 255 octets")
        off += 1 + length


def scan_records(data: bytes, off: int, counts: tuple[int, int, int]) -> list[Record]:
    """Locate every record of the answer, authority and additional sections starting at ``off``."""
    records: list[Record] = []
    n = len(data)
    for section, count in enumerate(counts):
        for _ in range(count):
            start = off
            off = skip_name(data, off)
            if off + 10 > n:
                raise FormatError("record header runs past the end of the packet")
            rtype, rclass, ttl, rdlen = _RR_FIXED.unpack_from(data, off)
            rdata = off + 10
            end = rdata + rdlen
            if end > n:
                raise FormatError("record data runs past the end of the packet")
            records.append(Record(start, rtype, rclass, ttl, off + 4, rdata, rdlen, end, section))
            off = end
    return records


def parse_query(data: bytes) -> Query:
    """Parse a query: header, exactly one question, and the additional records (for OPT)."""
    if len(data) < 12:
        raise FormatError("shorter than a DNS header")
    qid, flags, qd, an, ns, ar = _HEADER.unpack_from(data)
    if qd != 1:
        raise FormatError(f"QDCOUNT is {qd}, expected 1")
    labels, off = _read_question_name(data, 12)
    if off + 4 > len(data):
        raise FormatError("question type and class run past the end of the packet")
    qtype, qclass = _TYPE_CLASS.unpack_from(data, off)
    question_end = off + 4
    try:
        records = scan_records(data, question_end, (an, ns, ar))
    except FormatError as exc:
        raise FormatError(str(exc), question_end) from None
    opt: Opt | None = None
    for rec in records:
        if rec.rtype != OPT:
            continue
        if rec.section != 2 or opt is not None or data[rec.start] != 0:
            raise FormatError("OPT record misplaced, repeated or not owned by the root", question_end)
        ttl = rec.ttl
        opt = Opt(
            udp_size=rec.rclass,
            ext_rcode=ttl >> 24,
            version=(ttl >> 16) & 0xFF,
            do=bool(ttl & 0x8000),
            options=data[rec.rdata_offset:rec.end],
        )
    return Query(qid, flags, labels, qtype, qclass, question_end, opt, (qd, an, ns, ar))


def encode_name(labels: tuple[bytes, ...]) -> bytes:
    """Uncompressed wire form of a name."""
    return b"".join(bytes((len(label),)) + label for label in labels) + b"\0"


def split_name(name: str) -> tuple[bytes, ...]:
    """``"web.default.svc.mesh."`` → ``(b"web", b"default", b"svc", b"mesh")``, lower-cased."""
    return tuple(part.encode("ascii").lower() for part in name.strip(".").split(".") if part)


class MessageWriter:
    """Writes a response after a copied header and question, compressing names against everything written.

    Compression is keyed on lower-cased label tuples, so a later name may point at the question as the client
    spelled it; DNS names compare case-insensitively, which is what makes that valid.
    """

    def __init__(self, header: bytes, question: bytes, qlabels: tuple[bytes, ...]) -> None:
        self.buf = bytearray(header)
        self.buf += question
        self._names: dict[tuple[bytes, ...], int] = {}
        off = 12
        lowered = tuple(label.lower() for label in qlabels)
        for i in range(len(lowered)):
            self._names.setdefault(lowered[i:], off)
            off += 1 + len(lowered[i])

    def name(self, labels: tuple[bytes, ...]) -> None:
        lowered = tuple(label.lower() for label in labels)
        for i in range(len(lowered)):
            target = self._names.get(lowered[i:])
            if target is not None:
                self.buf += struct.pack("!H", 0xC000 | target)
                return
            if len(self.buf) < 0x3FFF:
                self._names[lowered[i:]] = len(self.buf)
            self.buf.append(len(labels[i]))
            self.buf += labels[i]
        self.buf.append(0)

    def record(self, owner: tuple[bytes, ...], rtype: int, ttl: int, *rdata: bytes | tuple[bytes, ...]) -> None:
        self.name(owner)
        self.buf += struct.pack("!HHI", rtype, CLASS_IN, ttl)
        length_at = len(self.buf)
        self.buf += b"\0\0"
        for part in rdata:
            if isinstance(part, tuple):
                self.name(part)
            else:
                self.buf += part
        struct.pack_into("!H", self.buf, length_at, len(self.buf) - length_at - 2)

    def opt(self, udp_size: int, ext_rcode: int, do: bool) -> None:
        self.buf += b"\0" + struct.pack("!HHBBHH", OPT, udp_size, ext_rcode, 0, 0x8000 if do else 0, 0)
