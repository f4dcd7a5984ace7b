"""The pure DNS core: mesh answers, negative answers, EDNS, truncation, and junk packets (hypothesis)."""

from __future__ import annotations

import struct

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpilot.meshdns.answer import DROP, FORWARD, REPLY, answer, flag_variants, respond
from meshpilot.meshdns.table import NameTable, Port, Service

SERVICES = [
    Service("web", "default", vip="240.240.0.1", ports=(Port("http", 80, "http"), Port("grpc", 9090, "grpc"))),
    Service("db", "prod", vip="240.240.0.2", vip6="fd00::2", ports=(Port("pg", 5432, "tcp"),)),
    Service("big", "default", vip="240.240.0.3", ports=tuple(Port(f"port{i}", 10000 + i) for i in range(40))),
    Service("web", "staging", vip="240.240.0.9", ports=(Port("http", 80),)),
]
TABLE = NameTable.build(SERVICES, search=["corp.test"], ttl=30)


def ask(name: str, rdtype: str = "A", *, edns: int = -1, payload: int = 1232, tcp: bool = False,
        flags: int | None = None) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, use_edns=edns, payload=payload)
    if flags is not None:
        q.flags = flags
    wire = q.to_wire()
    out = answer(wire, TABLE, tcp=tcp)
    assert out is not None, f"expected a mesh answer for {name} {rdtype}, got None (forward/drop)"
    r = dns.message.from_wire(out)
    assert r.id == q.id, f"expected id {q.id}, got {r.id}"
    return r


def addresses(r: dns.message.Message) -> list[str]:
    return sorted(rd.to_text() for rrset in r.answer for rd in rrset if rrset.rdtype in (1, 28))


@pytest.mark.parametrize("name,expected", [
    ("web", "240.240.0.1"),  # the node's namespace wins the bare name
    ("web.default", "240.240.0.1"),
    ("web.staging", "240.240.0.9"),
    ("web.staging.svc.mesh", "240.240.0.9"),
    ("db", "240.240.0.2"),  # unique across namespaces
    ("db.prod.svc.mesh.", "240.240.0.2"),
    ("db.corp.test", "240.240.0.2"),  # search suffix
    ("web.default.corp.test", "240.240.0.1"),
    ("DB.PrOd.SVC.Mesh", "240.240.0.2"),
])
def test_a_for_every_name_form(name: str, expected: str) -> None:
    r = ask(name)
    assert r.rcode() == dns.rcode.NOERROR, f"{name}: expected NOERROR, got {dns.rcode.to_text(r.rcode())}"
    assert addresses(r) == [expected], f"{name}: expected [{expected}], got {addresses(r)}"
    assert r.flags & dns.flags.AA, "mesh answers are authoritative"


def test_question_and_owner_echo_case() -> None:
    r = ask("WeB.DeFault.SVC.mesh")
    assert r.question[0].name.to_text() == "WeB.DeFault.SVC.mesh.", f"question echoed as {r.question[0].name}"
    assert r.answer[0].name.to_text() == "WeB.DeFault.SVC.mesh.", f"owner echoed as {r.answer[0].name}"


def test_aaaa_present_and_empty_with_soa() -> None:
    r = ask("db.prod", "AAAA")
    assert addresses(r) == ["fd00::2"], f"expected fd00::2, got {addresses(r)}"
    r = ask("web", "AAAA", edns=0)
    assert r.rcode() == dns.rcode.NOERROR and not r.answer, f"expected NODATA, got {r}"
    soa = [rr for rr in r.authority if rr.rdtype == dns.rdatatype.SOA]
    assert soa, f"expected an SOA in authority for negative caching, got {r.authority}"
    assert soa[0][0].minimum == 30 and soa[0].ttl == 30, f"expected SOA ttl/minimum 30, got {soa[0]}"


def test_unknown_name_in_domain_is_nxdomain_with_soa() -> None:
    r = ask("nosuch.default.svc.mesh")
    assert r.rcode() == dns.rcode.NXDOMAIN, f"expected NXDOMAIN, got {dns.rcode.to_text(r.rcode())}"
    assert r.authority and r.authority[0].rdtype == dns.rdatatype.SOA, f"expected SOA, got {r.authority}"
    assert r.authority[0].name.to_text() == "mesh.", f"expected SOA owner mesh., got {r.authority[0].name}"


def test_empty_non_terminal_is_nodata() -> None:
    r = ask("default.svc.mesh")
    assert r.rcode() == dns.rcode.NOERROR and not r.answer, f"expected NODATA for an interior name, got {r}"


def test_other_names_are_forwarded() -> None:
    q = dns.message.make_query("example.org", "A").to_wire()
    out = respond(q, TABLE)
    assert out.kind == FORWARD, f"expected FORWARD, got {out.kind}"


def test_srv_for_port_and_for_all_ports() -> None:
    r = ask("_grpc._tcp.web.default.svc.mesh", "SRV")
    srv = [(rd.port, rd.target.to_text()) for rd in r.answer[0]]
    assert srv == [(9090, "web.default.svc.mesh.")], f"expected one SRV 9090, got {srv}"
    assert any(rr.rdtype == dns.rdatatype.A for rr in r.additional), f"expected glue A, got {r.additional}"
    r = ask("web.default", "SRV")
    assert sorted(rd.port for rd in r.answer[0]) == [80, 9090], f"got {r.answer}"
    r = ask("_nope._tcp.web.default.svc.mesh", "SRV")
    assert r.rcode() == dns.rcode.NXDOMAIN, f"unknown port: expected NXDOMAIN, got {dns.rcode.to_text(r.rcode())}"


def test_truncation_over_udp_and_full_over_tcp() -> None:
    r = ask("big.default.svc.mesh", "SRV")
    assert r.flags & dns.flags.TC and not r.answer, f"expected TC and no answer over UDP/512, got {r.flags}"
    r = ask("big.default.svc.mesh", "SRV", tcp=True)
    assert not r.flags & dns.flags.TC and len(r.answer[0]) == 40, "expected all 40 SRV records over TCP"
    r = ask("big.default.svc.mesh", "SRV", edns=0, payload=4096)
    assert not r.flags & dns.flags.TC and len(r.answer[0]) == 40, "expected all SRV records with EDNS 4096"


def test_opt_only_when_asked_and_badvers() -> None:
    assert ask("web").edns == -1, "no OPT in the answer when the query had none"
    r = ask("web", edns=0)
    assert r.edns == 0 and r.payload == 1232, f"expected OPT v0 payload 1232, got {r.edns} {r.payload}"
    r = ask("web", edns=1)
    assert r.rcode() == dns.rcode.BADVERS, f"expected BADVERS, got {dns.rcode.to_text(r.rcode())}"


def test_rd_cd_copied_and_variants_match_fresh_builds() -> None:
    for flags in (0, dns.flags.RD, dns.flags.CD, dns.flags.RD | dns.flags.CD):
        q = dns.message.make_query("web", "A")
        q.flags = flags
        wire = q.to_wire()
        fresh = answer(wire, TABLE)
        assert fresh is not None
        r = dns.message.from_wire(fresh)
        assert (r.flags & (dns.flags.RD | dns.flags.CD)) == flags, f"flags {flags:#x} not copied: {r.flags:#x}"
        # the prebuilt variant the server would pick must equal the fresh build
        variants = flag_variants(fresh)
        idx = (wire[2] & 1) | ((wire[3] & 0x10) >> 3)
        assert wire[:2] + variants[idx] == fresh, f"variant {idx} differs from a fresh build"


def test_errors() -> None:
    q = dns.message.make_query("web", "A").to_wire()
    assert respond(q[:11], TABLE).kind == DROP, "a packet shorter than a header is dropped"
    resp = bytearray(q)
    resp[2] |= 0x80
    assert respond(bytes(resp), TABLE).kind == DROP, "responses are never answered"
    notify = bytearray(q)
    notify[2] = (notify[2] & 0x87) | (4 << 3)
    r = dns.message.from_wire(answer(bytes(notify), TABLE) or b"")
    assert r.rcode() == dns.rcode.NOTIMP, f"opcode NOTIFY: expected NOTIMP, got {dns.rcode.to_text(r.rcode())}"
    two = q[:4] + struct.pack("!H", 2) + q[6:]
    out = answer(two, TABLE)
    assert out is not None and (out[3] & 0xF) == 1, "QDCOUNT 2 must be FORMERR"
    dns.message.from_wire(out, question_only=True)


def _check_reply(data: bytes) -> None:
    outcome = respond(data, TABLE)
    for tcp in (False, True):
        outcome = respond(data, TABLE, tcp=tcp)
        if outcome.kind == REPLY:
            assert len(outcome.response) >= 12, "a reply must have a header"
            assert outcome.response[:2] == data[:2], "a reply carries the query id"
            try:
                dns.message.from_wire(outcome.response)
            except dns.message.ShortHeader:
                raise AssertionError("reply is shorter than a header") from None
            except Exception as exc:  # noqa: BLE001 - any parse failure is the bug we are hunting
                raise AssertionError(f"unparsable reply {outcome.response!r} to {data!r}: {exc!r}") from None
            flags = struct.unpack_from("!H", outcome.response, 2)[0]
            assert flags & 0x0080, f"every reply says meshdns offers recursion (RA), got flags {flags:#06x}"
            if not tcp:
                assert len(outcome.response) <= 1232, (
                    f"UDP replies stay within 1232 bytes, got {len(outcome.response)}")


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=600))
def test_random_packets_never_raise_nor_produce_garbage(data: bytes) -> None:
    _check_reply(data)


_SEEDS = [
    dns.message.make_query(n, t, use_edns=e).to_wire()
    for n, t, e in [("web", "A", -1), ("db.prod.svc.mesh", "AAAA", 0), ("_http._tcp.web.default", "SRV", 0),
                    ("big.default.svc.mesh", "SRV", -1), ("nosuch.svc.mesh", "TXT", 0), ("mesh", "SOA", -1)]
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.integers(0, 3))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == 0 and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == 1:
            data.insert(pos, draw(st.integers(0, 255)))
        elif op == 2 and data:
            del data[pos]
        else:
            data = data[:pos]
    return bytes(data)


@settings(max_examples=5000, deadline=None)
@given(mutated())
def test_mutated_queries_never_raise_nor_produce_garbage(data: bytes) -> None:
    _check_reply(data)


# -- opcodes other than QUERY: NOTIMP from the header alone (RFC 1035 4.1.1, RFC 8490 5.1) ------------------------

#: a DSO Keepalive request (RFC 8490 7.1; opcode 6, no question, one TLV: type 1, inactivity and interval timeouts)
DSO_KEEPALIVE = struct.pack("!HHHHHH", 0x1234, 6 << 11, 0, 0, 0, 0) + struct.pack("!HHII", 1, 8, 15000, 15000)


def _assert_notimp(data: bytes, out: bytes | None) -> None:
    assert out is not None, f"expected NOTIMP for opcode {(data[2] >> 3) & 0xF}, got no reply"
    head = struct.unpack_from("!HHHHHH", out)
    qid, flags, counts = head[0], head[1], head[2:]
    got = f"id={qid:#x} flags={flags:#06x} counts={counts} ({len(out)} bytes)"
    assert len(out) == 12 and qid == struct.unpack_from("!H", data)[0], f"expected a bare header, got {got}"
    assert flags & 0xF == dns.rcode.NOTIMP, f"expected rcode NOTIMP (4), got {flags & 0xF}: {got}"
    assert (flags >> 11) & 0xF == (data[2] >> 3) & 0xF, f"expected the opcode echoed, got {got}"
    assert flags & 0x8000 and not flags & 0x0400 and flags & 0x0080, f"expected QR, no AA, RA: {got}"
    assert counts == (0, 0, 0, 0), f"expected no sections, got {got}"


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_dso_keepalive_and_unknown_opcode_without_question_get_notimp(tcp: bool) -> None:
    _assert_notimp(DSO_KEEPALIVE, answer(DSO_KEEPALIVE, TABLE, tcp=tcp))
    bare15 = struct.pack("!HHHHHH", 7, 15 << 11, 0, 0, 0, 0)
    _assert_notimp(bare15, answer(bare15, TABLE, tcp=tcp))


@settings(max_examples=2000, deadline=None)
@given(st.integers(1, 15), st.integers(0, 0xFFFF), st.integers(0, 0x7FF),
       st.tuples(*[st.integers(0, 0xFFFF)] * 4), st.binary(max_size=300), st.booleans())
def test_every_other_opcode_is_notimp_whatever_follows(opcode: int, qid: int, low_flags: int,
                                                       counts: tuple[int, int, int, int], rest: bytes,
                                                       tcp: bool) -> None:
    data = struct.pack("!HHHHHH", qid, (opcode << 11) | low_flags, *counts) + rest
    _assert_notimp(data, answer(data, TABLE, tcp=tcp))


# -- the UDP size: the client's EDNS size, never more than 1232 (DNS flag day 2020) -------------------------------

@settings(max_examples=400, deadline=None)
@given(st.integers(1, 120), st.one_of(st.none(), st.integers(0, 0xFFFF)), st.booleans())
def test_udp_answers_stay_within_the_clients_size_and_1232(ports: int, payload: int | None, tcp: bool) -> None:
    table = NameTable.build([Service("many", "default", vip="240.240.0.4",
                                     ports=tuple(Port(f"p{i}", 20000 + i) for i in range(ports)))])
    q = dns.message.make_query("many.default.svc.mesh", "SRV", use_edns=-1 if payload is None else 0,
                               payload=payload or 0)
    out = answer(q.to_wire(), table, tcp=tcp)
    assert out is not None, "expected a mesh answer"
    r = dns.message.from_wire(out)
    limit = 512 if payload is None else max(512, min(payload, 1232))
    truncated = bool(r.flags & dns.flags.TC)
    srv = len(r.answer[0]) if r.answer else 0
    if tcp:
        assert not truncated and srv == ports, f"TCP: expected all {ports} SRV records, got {srv} TC={truncated}"
    else:
        assert len(out) <= limit, (f"UDP with payload {payload}: expected at most {limit} bytes, got {len(out)} "
                                   f"({srv} SRV, TC={truncated})")
        assert srv == (0 if truncated else ports), f"expected all {ports} SRV or TC with none, got {srv} TC={truncated}"


def test_an_answer_over_1232_bytes_is_truncated_for_a_client_offering_4096() -> None:
    r = ask("big.default.svc.mesh", "SRV", edns=0, payload=4096)  # 865 bytes: fits
    assert not r.flags & dns.flags.TC and len(r.answer[0]) == 40, "expected all 40 SRV records under 1232 bytes"
    table = NameTable.build([Service("many", "default", vip="240.240.0.4",
                                     ports=tuple(Port(f"p{i}", 20000 + i) for i in range(64)))])
    q = dns.message.make_query("many.default.svc.mesh", "SRV", use_edns=0, payload=4096)
    full = answer(q.to_wire(), table, tcp=True)
    assert full is not None and len(full) > 1232, f"the full answer must exceed 1232 bytes, got {len(full or b'')}"
    out = answer(q.to_wire(), table)
    assert out is not None and len(out) <= 1232, f"expected at most 1232 bytes over UDP, got {len(out or b'')}"
    r = dns.message.from_wire(out)
    assert r.flags & dns.flags.TC and not r.answer and r.payload == 1232, (
        f"expected TC, no answer and OPT 1232, got flags {r.flags:#x} answer {r.answer} payload {r.payload}")
