"""meshdns against real DNS clients and a real upstream resolver.

Clients: dnspython's stub resolver, knot's ``kdig``, and glibc (``getent hosts``) in a network namespace whose
resolv.conf points at meshdns. Upstream: a real ``unbound`` on 127.0.0.1 serving a few names from local data
(it is configured with a static root zone so it never queries anything beyond this machine). Every process and
namespace a test starts is stopped in a ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.resolver
import pytest

from meshpilot.perf.dns import free_udp_tcp_port


SERVICES = [
    {"name": "web", "namespace": "default", "vip": "240.240.0.1", "vip6": "",
     "ports": [{"name": "http", "port": 80, "protocol": "http"}, {"name": "grpc", "port": 9090, "protocol": "grpc"}]},
    {"name": "db", "namespace": "prod", "vip": "240.240.0.2", "vip6": "fd00::2",
     "ports": [{"name": "pg", "port": 5432, "protocol": "tcp"}]},
    {"name": "big", "namespace": "default", "vip": "240.240.0.3",
     "ports": [{"name": f"port{i}", "port": 10000 + i, "protocol": "tcp"} for i in range(40)]},
    # its SRV answer is about 1,350 bytes: more than 1232, less than the 4096 clients commonly offer
    {"name": "huge", "namespace": "default", "vip": "240.240.0.4",
     "ports": [{"name": f"port{i}", "port": 20000 + i, "protocol": "tcp"} for i in range(64)]},
]
#: an upstream answer of about 1,300 bytes
MANY = [f"192.0.{i}.1" for i in range(80)]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_answering(port: int, name: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            r = dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=0.2)
            if r.rcode() == dns.rcode.NOERROR:
                return
            last = dns.rcode.to_text(r.rcode())
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
    raise AssertionError(f"nothing answered {name} on port {port} within {timeout}s; last: {last!r}")


def start_meshdns(tmp: Path, *extra: str, prefix: list[str] | None = None,
                  listen: str = "127.0.0.1:0") -> tuple[subprocess.Popen[bytes], int]:
    table = tmp / "table.json"
    table.write_text(json.dumps(SERVICES))
    log = open(tmp / f"meshdns-{secrets.token_hex(3)}.log", "wb")
    cmd = [*(prefix or []), sys.executable, "-m", "meshpilot.cli", "meshdns", "--listen", listen,
           "--control-plane", "none", "--static-table", str(table), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, cwd=Path(__file__).resolve().parents[2])
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("meshdns listening"):
        _stop(proc)
        raise AssertionError(f"expected 'meshdns listening HOST:PORT', got {line!r}; "
                             f"log: {Path(log.name).read_text()[-2000:]}")
    return proc, int(line.rsplit(":", 1)[1])


@contextlib.contextmanager
def run_unbound(tmp_path: Path) -> Iterator[int]:
    """A real unbound on 127.0.0.1 answering a few example. names from local data, nothing else."""
    exe = shutil.which("unbound") or "/usr/sbin/unbound"
    port = free_udp_tcp_port()
    conf = tmp_path / "unbound.conf"
    conf.write_text(f"""server:
  interface: 127.0.0.1@{port}
  port: {port}
  do-daemonize: no
  username: ""
  chroot: ""
  directory: "{tmp_path}"
  pidfile: ""
  use-syslog: no
  logfile: ""
  do-ip6: no
  access-control: 127.0.0.0/8 allow
  module-config: "iterator"
  local-zone: "." static
  local-zone: "example." static
  local-data: "fwd.example. 300 IN A 192.0.2.10"
  local-data: "Mixed.example. 300 IN A 192.0.2.11"
  local-data: "example. 60 IN SOA ns.example. hostmaster.example. 1 3600 600 86400 60"
{"".join(f'  local-data: "many.example. 300 IN A {a}"{chr(10)}' for a in MANY)}remote-control:
  control-enable: no
""")
    proc = subprocess.Popen([exe, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_answering(port, "fwd.example")
        yield port
    finally:
        _stop(proc)


@pytest.fixture
def unbound(tmp_path: Path) -> Iterator[int]:
    with run_unbound(tmp_path) as port:
        yield port


@pytest.fixture
def meshdns(tmp_path: Path, unbound: int) -> Iterator[int]:
    proc, port = start_meshdns(tmp_path, "--upstream", f"127.0.0.1:{unbound}", "--search", "corp.test")
    try:
        yield port
    finally:
        _stop(proc)


def resolver(port: int) -> dns.resolver.Resolver:
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = ["127.0.0.1"]
    r.port = port
    r.lifetime = 3.0
    r.cache = None
    return r


@pytest.mark.parametrize("name,expected", [
    ("web", "240.240.0.1"), ("web.default", "240.240.0.1"), ("web.default.svc.mesh", "240.240.0.1"),
    ("DB.Prod.Svc.MESH", "240.240.0.2"), ("db.corp.test", "240.240.0.2"), ("web.default.corp.test", "240.240.0.1"),
])
def test_dnspython_mesh_names(meshdns: int, name: str, expected: str) -> None:
    ans = resolver(meshdns).resolve(name, "A", search=False)
    got = [r.to_text() for r in ans]
    assert got == [expected], f"{name}: expected [{expected}], got {got}"
    assert ans.response.question[0].name.to_text().rstrip(".") == name.rstrip("."), (
        f"question must echo the case asked: {ans.response.question[0].name}")


def test_dnspython_aaaa_empty_nxdomain_and_srv(meshdns: int) -> None:
    r = resolver(meshdns)
    assert [a.to_text() for a in r.resolve("db.prod", "AAAA")] == ["fd00::2"]
    with pytest.raises(dns.resolver.NoAnswer):
        r.resolve("web.default.svc.mesh", "AAAA")
    with pytest.raises(dns.resolver.NXDOMAIN):
        r.resolve("nosuch.default.svc.mesh", "A")
    srv = r.resolve("_grpc._tcp.web.default.svc.mesh", "SRV")
    got = [(s.port, s.target.to_text()) for s in srv]
    assert got == [(9090, "web.default.svc.mesh.")], f"expected SRV 9090 -> web.default.svc.mesh., got {got}"


def test_truncation_then_tcp_retry(meshdns: int) -> None:
    q = dns.message.make_query("big.default.svc.mesh", "SRV")
    udp = dns.query.udp(q, "127.0.0.1", port=meshdns, timeout=2, ignore_trailing=True)
    assert udp.flags & dns.flags.TC, f"expected TC over UDP (answer > 512 bytes), got flags {udp.flags:#x}"
    tcp = dns.query.tcp(q, "127.0.0.1", port=meshdns, timeout=2)
    assert len(tcp.to_wire()) > 512, "the full SRV answer is larger than 512 bytes"
    assert not tcp.flags & dns.flags.TC and len(tcp.answer[0]) == 40, f"expected 40 SRV over TCP, got {tcp.answer}"
    # a stub resolver does the retry by itself
    ans = resolver(meshdns).resolve("big.default.svc.mesh", "SRV")
    assert len(ans) == 40, f"dnspython resolver: expected 40 SRV records after TCP fallback, got {len(ans)}"


def kdig(port: int, *args: str) -> str:
    out = subprocess.run([shutil.which("kdig") or "kdig", "@127.0.0.1", "-p", str(port), "+timeout=2", "+retry=0",
                          *args], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, f"kdig {args} failed: {out.stderr}"
    return out.stdout


def test_kdig(meshdns: int) -> None:
    def run(*args: str) -> str:
        return kdig(meshdns, *args)

    out = run("WEB.default.svc.mesh", "A", "+edns")
    assert "240.240.0.1" in out and "status: NOERROR" in out and "EDNS PSEUDOSECTION" in out, out
    out = run("web.default.svc.mesh", "A", "+noedns")
    assert "EDNS PSEUDOSECTION" not in out, f"no OPT when the query had none:\n{out}"
    out = run("big.default.svc.mesh", "SRV", "+noedns")
    assert out.count("\tSRV\t") == 40 and "(TCP)" in out, f"expected kdig to retry over TCP and get 40 SRV:\n{out}"
    out = run("nope.svc.mesh", "A")
    assert "status: NXDOMAIN" in out and "SOA" in out, f"expected NXDOMAIN with SOA:\n{out}"
    out = run("fwd.example", "A")
    assert "192.0.2.10" in out, f"expected a forwarded answer:\n{out}"


def _kdig_flags(out: str) -> set[str]:
    line = next((ln for ln in out.splitlines() if ln.startswith(";; Flags:")), None)
    assert line is not None, f"no ';; Flags:' line in kdig's output:\n{out}"
    return set(line.split(";")[2].split(":", 1)[1].split())


def test_kdig_sees_aa_only_on_mesh_answers_and_ra_on_every_answer(meshdns: int) -> None:
    # unbound answers its local data as an authority (AA): meshdns, which forwards it, is not one
    for name, rtype, status, aa in [
        ("web.default.svc.mesh", "A", "NOERROR", True), ("nosuch.default.svc.mesh", "A", "NXDOMAIN", True),
        ("fwd.example", "A", "NOERROR", False), ("fwd.example", "A", "NOERROR", False),  # forwarded, then cached
        ("missing.example", "A", "NXDOMAIN", False), ("fwd.example", "AAAA", "NOERROR", False),
    ]:
        for transport in ("+notcp", "+tcp"):
            out = kdig(meshdns, name, rtype, transport)
            flags = _kdig_flags(out)
            assert f"status: {status}" in out, f"{name} {rtype} {transport}: expected {status}:\n{out}"
            assert ("aa" in flags) == aa and "ra" in flags, (
                f"{name} {rtype} {transport}: expected flags with ra{' and aa' if aa else ', without aa'}, "
                f"got {sorted(flags)}")


def _udp_exchange(wire: bytes, port: int) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.sendto(wire, ("127.0.0.1", port))
        return sock.recv(65535)


@pytest.mark.parametrize("name,rtype,records", [("huge.default.svc.mesh", "SRV", 64), ("many.example", "A", 80)],
                         ids=["mesh", "forwarded"])
def test_answers_over_1232_bytes_go_over_tcp_even_for_clients_offering_4096(meshdns: int, name: str, rtype: str,
                                                                            records: int) -> None:
    q = dns.message.make_query(name, rtype, use_edns=0, payload=4096)
    for attempt in ("first", "repeated"):  # the second comes from meshdns's prebuilt answers
        wire = _udp_exchange(q.to_wire(), meshdns)
        r = dns.message.from_wire(wire)
        assert len(wire) <= 1232 and r.flags & dns.flags.TC, (
            f"{name} {rtype} ({attempt}): expected at most 1232 bytes with TC over UDP, got {len(wire)} bytes, "
            f"flags {dns.flags.to_text(r.flags)}")
    out = kdig(meshdns, name, rtype, "+bufsize=4096")
    got = out.count(f"\t{rtype}\t")
    assert "(TCP)" in out and got == records, (
        f"expected kdig to retry over TCP and get {records} {rtype} records, got {got}:\n{out}")
    ans = resolver(meshdns).resolve(name, rtype)
    assert len(ans) == records, f"dnspython: expected {records} records after its TCP retry, got {len(ans)}"


def test_dso_keepalive_and_unknown_opcodes_get_notimp(meshdns: int) -> None:
    def check(reply: bytes, opcode: int, how: str) -> None:
        qid, flags, *counts = struct.unpack_from("!HHHHHH", reply)
        got = f"{len(reply)} bytes, id {qid:#x}, flags {flags:#06x}, counts {counts}"
        assert (qid, flags & 0xF, (flags >> 11) & 0xF) == (0x4D50, dns.rcode.NOTIMP, opcode), (
            f"{how}: expected id 0x4d50, NOTIMP (4) and opcode {opcode} echoed, got {got}")
        assert len(reply) == 12 and flags & 0x8000, f"{how}: expected a bare response header, got {got}"

    # DSO Keepalive (RFC 8490 7.1): opcode 6, no question, one TLV; a server without DSO answers NOTIMP (5.1)
    keepalive = struct.pack("!HHHHHH", 0x4D50, 6 << 11, 0, 0, 0, 0) + struct.pack("!HHII", 1, 8, 15000, 15000)
    with socket.create_connection(("127.0.0.1", meshdns), timeout=2) as sock:
        dns.query.send_tcp(sock, keepalive)
        (length,) = struct.unpack("!H", _recv_exactly(sock, 2))
        check(_recv_exactly(sock, length), 6, "DSO keepalive over TCP")
        # the connection stays usable for ordinary queries
        dns.query.send_tcp(sock, dns.message.make_query("web", "A"))
        r, _ = dns.query.receive_tcp(sock)
        assert [a.to_text() for rr in r.answer for a in rr] == ["240.240.0.1"], f"after DSO: got {r}"
    for opcode in (3, 15):  # unassigned, with no question
        check(_udp_exchange(struct.pack("!HHHHHH", 0x4D50, opcode << 11, 0, 0, 0, 0), meshdns), opcode,
              f"opcode {opcode} over UDP")


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, f"connection closed after {len(buf)} of {n} bytes"
        buf += chunk
    return buf


def test_forwarding_to_unbound_with_cache(tmp_path: Path, unbound: int) -> None:
    proc, port = start_meshdns(tmp_path, "--upstream", f"127.0.0.1:{unbound}")
    try:
        r = resolver(port)
        first = r.resolve("fwd.example", "A")
        assert [a.to_text() for a in first] == ["192.0.2.10"], f"got {list(first)}"
        assert first.rrset is not None and first.rrset.ttl <= 300
        mixed = r.resolve("mIXed.EXAMPLE", "A")
        assert mixed.response.question[0].name.to_text() == "mIXed.EXAMPLE.", "question case must be echoed"
        with pytest.raises(dns.resolver.NXDOMAIN):
            r.resolve("missing.example", "A")
        q = dns.message.make_query("fwd.example", "A", use_edns=0, payload=1232)
        resp = dns.query.udp(q, "127.0.0.1", port=port, timeout=2)
        assert resp.edns == 0, "OPT answered when asked"
        resp = dns.query.udp(dns.message.make_query("fwd.example", "A"), "127.0.0.1", port=port, timeout=2)
        assert resp.edns == -1, "no OPT in a forwarded answer when the client sent none"
    finally:
        _stop(proc)


def test_cache_serves_while_upstream_is_gone_and_ttl_counts_down(tmp_path: Path) -> None:
    # a private unbound we can stop mid-test
    upstream_dir = tmp_path / "u"
    upstream_dir.mkdir()
    upstream = run_unbound(upstream_dir)
    uport = upstream.__enter__()
    proc, port = start_meshdns(tmp_path, "--upstream", f"127.0.0.1:{uport}")
    try:
        r = resolver(port)
        ttl1 = r.resolve("fwd.example", "A").rrset.ttl  # type: ignore[union-attr]
        with pytest.raises(dns.resolver.NXDOMAIN):
            r.resolve("gone.example", "A")  # negative answer, cached for the SOA minimum (60 s)
        upstream.__exit__(None, None, None)
        time.sleep(1.1)  # let at least one second of TTL elapse; the countdown is what is checked
        ans = r.resolve("fwd.example", "A")
        assert [a.to_text() for a in ans] == ["192.0.2.10"], "the cached answer is served without the upstream"
        assert ans.rrset is not None and ans.rrset.ttl < ttl1, f"expected TTL below {ttl1}, got {ans.rrset.ttl}"
        with pytest.raises(dns.resolver.NXDOMAIN):
            r.resolve("gone.example", "A")
    finally:
        _stop(proc)
        upstream.__exit__(None, None, None)  # a second exit is a no-op: the process is already stopped


def test_upstream_down_is_servfail_fast(tmp_path: Path) -> None:
    dead = free_udp_tcp_port()  # nothing listens there
    proc, port = start_meshdns(tmp_path, "--upstream", f"127.0.0.1:{dead}", "--upstream-timeout", "1.0")
    try:
        t0 = time.monotonic()
        resp = dns.query.udp(dns.message.make_query("fwd.example", "A"), "127.0.0.1", port=port, timeout=5)
        took = time.monotonic() - t0
        assert resp.rcode() == dns.rcode.SERVFAIL, f"expected SERVFAIL, got {dns.rcode.to_text(resp.rcode())}"
        assert took < 0.5, f"expected SERVFAIL well under the 1 s upstream timeout, took {took:.3f}s"
        r = dns.query.udp(dns.message.make_query("web", "A"), "127.0.0.1", port=port, timeout=2)
        assert r.rcode() == dns.rcode.NOERROR, "mesh names keep working while the upstream is down"
    finally:
        _stop(proc)


def test_glibc_getent_in_network_namespace(tmp_path: Path) -> None:
    ns = f"mdns{secrets.token_hex(4)}"
    etc = Path("/etc/netns") / ns
    proc: subprocess.Popen[bytes] | None = None
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        etc.mkdir(parents=True)
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\nsearch corp.test\noptions timeout:2 attempts:1\n")
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        # meshdns on port 53 inside the namespace; upstreams from the namespace's resolv.conf are itself and
        # must be dropped (no loops), so there is no upstream at all here
        proc, _ = start_meshdns(tmp_path, prefix=["ip", "netns", "exec", ns], listen="127.0.0.1:53")

        def getent(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["ip", "netns", "exec", ns, "getent", *args], capture_output=True, text=True,
                                  timeout=20)

        # getent hosts asks AAAA first and falls back to A (ahosts would hide loopback-only A via AI_ADDRCONFIG)
        for name, want in [("web.default.svc.mesh", "240.240.0.1"), ("web", "240.240.0.1"),
                           ("DB.prod", "fd00::2"), ("db.corp.test", "fd00::2"), ("big.default", "240.240.0.3")]:
            out = getent("hosts", name)
            assert out.returncode == 0 and out.stdout.split()[:1] == [want], (
                f"getent hosts {name}: expected {want}, got rc={out.returncode} {out.stdout!r} {out.stderr!r}")
        out = getent("hosts", "nosuch.default.svc.mesh")
        assert out.returncode == 2, f"expected 'not found' (rc 2) for an unknown mesh name, got {out.returncode}"
    finally:
        if proc is not None:
            _stop(proc)
        subprocess.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(etc, ignore_errors=True)
