"""``meshpilot perf dns``: meshdns against dnsmasq and unbound, measured with dnsperf in one run.

The harness starts, on 127.0.0.1 ports chosen by the OS: an upstream unbound that serves ``f<i>.example`` names
from local data (static root zone, so nothing leaves the machine), then meshdns, dnsmasq and unbound, each
answering the same ``svc<i>.default.svc.mesh`` names itself (meshdns from a static table, dnsmasq from
``host-record``, unbound from ``local-data``) and forwarding everything else to that upstream. For each server it
measures two workloads: mesh names, and forwarded names after a warm-up pass (so they come from the server's
cache). Each workload gets throughput runs (dnsperf at full speed: qps), interleaved across the servers for
several rounds with the median reported, so that load from other processes falls on all of them alike. Saturated
qps measures dnsperf as much as the server (on a small machine dnsperf takes as much CPU as the server it drives),
so two measures at a fixed offered rate (dnsperf ``-Q``) stand beside it: the server's CPU per answered query
(``--cpu-qps``, utime+stime of the server process from ``/proc/<pid>/stat`` before and after the run, divided by
the queries dnsperf saw answered), and latency percentiles from per-query reporting (``--latency-qps``). Those
runs are interleaved across servers for the same number of rounds, with the median reported beside every round.
It prints the results as JSON and one summary line with the meshdns/dnsmasq qps ratios and the meshdns/unbound
ratios of CPU per query and of p99 latency (the bar is <= 1.0), for mesh names and cached forwarded names.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

__all__ = ["add_arguments", "free_udp_tcp_port", "main", "register_dns", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, default=10.0, help="seconds per throughput run (%(default)s)")
    p.add_argument("--names", type=int, default=200, help="mesh names and forwarded names (%(default)s)")
    p.add_argument("--clients", type=int, default=4, help="dnsperf -c (%(default)s)")
    p.add_argument("--outstanding", type=int, default=200, help="dnsperf -q (%(default)s)")
    p.add_argument("--cpu-qps", type=int, default=20000,
                   help="offered rate (dnsperf -Q) of the runs that measure server CPU per query (%(default)s)")
    p.add_argument("--cpu-duration", type=float, default=5.0, help="seconds per CPU run (%(default)s)")
    p.add_argument("--latency-qps", type=int, default=10000, help="rate of the latency runs (%(default)s)")
    p.add_argument("--latency-duration", type=float, default=3.0, help="seconds per latency run (%(default)s)")
    p.add_argument("--rounds", type=int, default=3,
                   help="throughput, CPU and latency runs per server and workload, interleaved across servers; the "
                        "median is reported, so load from other processes hits every server alike (%(default)s)")
    p.add_argument("--servers", default="meshdns,dnsmasq,unbound", help="comma-separated subset to run")
    p.add_argument("--json-out", default=None, help="also write the JSON report to this file")


def register_dns(subparsers: Any) -> None:
    p = subparsers.add_parser("dns", help="meshdns vs dnsmasq vs unbound with dnsperf")
    add_arguments(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    print(report["summary"])
    return 0


# -- processes -------------------------------------------------------------------------------------------------


def free_udp_tcp_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1, chosen by the OS (a DNS server takes both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return int(port)
    raise RuntimeError("no free port")


def _query(name: str) -> bytes:
    qname = b"".join(bytes((len(p),)) + p.encode() for p in name.split(".") if p) + b"\0"
    return struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)


def _wait_answering(port: int, name: str, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{cast(list[str], proc.args)[0]} exited with {proc.returncode}")  # see _process
            s.sendto(_query(name), ("127.0.0.1", port))
            try:
                data = s.recv(4096)
            except OSError:
                continue
            if len(data) >= 12 and data[3] & 0xF == 0 and struct.unpack_from("!H", data, 6)[0] > 0:
                return
    raise RuntimeError(f"port {port} did not answer {name} within {timeout}s")


@contextlib.contextmanager
def _process(cmd: list[str], **kw: Any) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(cmd, **kw)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _unbound_conf(port: int, workdir: Path, local: list[str], extra: str) -> str:
    lines = [
        "server:", f"  interface: 127.0.0.1@{port}", f"  port: {port}", "  do-daemonize: no", '  username: ""',
        '  chroot: ""', f'  directory: "{workdir}"', '  pidfile: ""', "  use-syslog: no", '  logfile: ""',
        "  do-ip6: no", "  num-threads: 1", "  access-control: 127.0.0.0/8 allow", '  module-config: "iterator"',
        "  do-not-query-localhost: no", "  verbosity: 0",
    ]
    lines += [f"  {line}" for line in local]
    return "\n".join(lines) + "\n" + extra + "remote-control:\n  control-enable: no\n"


@contextlib.contextmanager
def _upstream(workdir: Path, fwd_names: list[str]) -> Iterator[int]:
    port = free_udp_tcp_port()
    local = ['local-zone: "." static', 'local-zone: "example." static',
             'local-data: "example. 3600 IN SOA ns.example. hostmaster.example. 1 3600 600 86400 3600"']
    local += [f'local-data: "{n}. 3600 IN A 192.0.2.{i % 250 + 1}"' for i, n in enumerate(fwd_names)]
    conf = workdir / "upstream.conf"
    conf.write_text(_unbound_conf(port, workdir, local, ""))
    with _process([shutil.which("unbound") or "/usr/sbin/unbound", "-d", "-c", str(conf)],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        _wait_answering(port, fwd_names[0], proc)
        yield port


@contextlib.contextmanager
def _meshdns(workdir: Path, services: list[dict[str, Any]], upstream: int) -> Iterator[tuple[int, int]]:
    table = workdir / "table.json"
    table.write_text(json.dumps(services))
    cmd = [sys.executable, "-m", "meshpilot.cli", "meshdns", "--listen", "127.0.0.1:0", "--control-plane", "none",
           "--static-table", str(table), "--upstream", f"127.0.0.1:{upstream}", "--log-level", "warning",
           "--search", ""]
    with _process(cmd, stdout=subprocess.PIPE, stderr=open(workdir / "meshdns.log", "wb")) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if not line.startswith("meshdns listening"):
            raise RuntimeError(f"meshdns did not start: {line!r}: {(workdir / 'meshdns.log').read_text()[-2000:]}")
        port = int(line.rsplit(":", 1)[1])
        _wait_answering(port, "svc0.default.svc.mesh", proc)
        yield port, proc.pid


@contextlib.contextmanager
def _dnsmasq(workdir: Path, mesh: list[tuple[str, str]], upstream: int) -> Iterator[tuple[int, int]]:
    port = free_udp_tcp_port()
    conf = workdir / "dnsmasq.conf"
    lines = [f"port={port}", "listen-address=127.0.0.1", "bind-interfaces", "no-resolv", "no-hosts",
             f"server=127.0.0.1#{upstream}", "cache-size=10000", "local-ttl=30", "user=root", "pid-file=",
             "log-facility=-"]
    lines += [f"host-record={name},{ip}" for name, ip in mesh]
    conf.write_text("\n".join(lines) + "\n")
    exe = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    with _process([exe, "-k", "-C", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        _wait_answering(port, mesh[0][0], proc)
        yield port, proc.pid


@contextlib.contextmanager
def _unbound_peer(workdir: Path, mesh: list[tuple[str, str]], upstream: int) -> Iterator[tuple[int, int]]:
    port = free_udp_tcp_port()
    local = ['local-zone: "mesh." static']
    local += [f'local-data: "{name}. 30 IN A {ip}"' for name, ip in mesh]
    extra = f'forward-zone:\n  name: "."\n  forward-addr: 127.0.0.1@{upstream}\n'
    conf = workdir / "unbound-peer.conf"
    conf.write_text(_unbound_conf(port, workdir, local, extra))
    with _process([shutil.which("unbound") or "/usr/sbin/unbound", "-d", "-c", str(conf)],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        _wait_answering(port, mesh[0][0], proc)
        yield port, proc.pid


# -- dnsperf ---------------------------------------------------------------------------------------------------

_QPS = re.compile(r"Queries per second:\s+([\d.]+)")
_LOST = re.compile(r"Queries lost:\s+(\d+)")
_COMPLETED = re.compile(r"Queries completed:\s+(\d+)")
_AVG = re.compile(r"Average Latency \(s\):\s+([\d.]+)")
_RCODES = re.compile(r"Response codes:\s+(.*)")
_VERBOSE = re.compile(r"^> (\S+) .* ([\d.]+)$")


def _dnsperf(port: int, datafile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [shutil.which("dnsperf") or "dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(datafile), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _throughput(port: int, datafile: Path, args: argparse.Namespace) -> dict[str, Any]:
    out = _dnsperf(port, datafile, "-l", str(args.duration), "-c", str(args.clients), "-q", str(args.outstanding),
                   "-T", "1").stdout

    def grab(rx: re.Pattern[str], cast: Any = float) -> Any:
        m = rx.search(out)
        return cast(m.group(1)) if m else None

    return {"qps": grab(_QPS), "completed": grab(_COMPLETED, int), "lost": grab(_LOST, int),
            "avg_latency_ms": round((grab(_AVG) or 0) * 1000, 4), "rcodes": grab(_RCODES, str)}


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # fields 14 and 15 of proc(5)


def _cpu(pid: int, port: int, datafile: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Server CPU per answered query at a fixed offered rate."""
    before = _cpu_seconds(pid)
    out = _dnsperf(port, datafile, "-l", str(args.cpu_duration), "-Q", str(args.cpu_qps), "-c", "1",
                   "-T", "1").stdout
    cpu = _cpu_seconds(pid) - before
    m, q, lost = _COMPLETED.search(out), _QPS.search(out), _LOST.search(out)
    completed = int(m.group(1)) if m else 0
    return {"offered_qps": args.cpu_qps, "answered_qps": float(q.group(1)) if q else None,
            "completed": completed, "lost": int(lost.group(1)) if lost else None, "cpu_s": round(cpu, 3),
            "cpu_us_per_query": round(cpu * 1e6 / completed, 2) if completed else None}


def _latency(port: int, datafile: Path, args: argparse.Namespace) -> dict[str, Any]:
    out = _dnsperf(port, datafile, "-l", str(args.latency_duration), "-Q", str(args.latency_qps), "-c", "1", "-v",
                   "-T", "1").stdout
    lat = sorted(float(m.group(2)) for line in out.splitlines() if (m := _VERBOSE.match(line)))
    if not lat:
        return {"samples": 0}

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1000, 4)

    return {"rate_qps": args.latency_qps, "samples": len(lat), "p50_ms": pct(50), "p90_ms": pct(90),
            "p99_ms": pct(99), "p999_ms": pct(99.9), "max_ms": round(lat[-1] * 1000, 4),
            # the distribution in 101 points (0, 1, ..., 100 %) instead of every query's latency
            "quantiles_ms": [pct(q) for q in range(100)] + [round(lat[-1] * 1000, 4)]}


_KINDS = ("mesh", "forwarded_cached")
_SHORT = {"mesh": "mesh", "forwarded_cached": "cached-fwd"}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the upstream and the three servers, measure, stop everything; returns the report."""
    n = args.names
    mesh = [(f"svc{i}.default.svc.mesh", f"240.240.{i // 250}.{i % 250 + 1}") for i in range(n)]
    fwd = [f"f{i}.example" for i in range(n)]
    services = [{"name": f"svc{i}", "namespace": "default", "vip": ip,
                 "ports": [{"name": "http", "port": 80, "protocol": "http"}]} for i, (_, ip) in enumerate(mesh)]
    wanted = [s.strip() for s in args.servers.split(",") if s.strip()]
    starters = {"meshdns": lambda w, u: _meshdns(w, services, u), "dnsmasq": lambda w, u: _dnsmasq(w, mesh, u),
                "unbound": lambda w, u: _unbound_peer(w, mesh, u)}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="meshpilot-perf-dns-") as tmp:
        workdir = Path(tmp)
        mesh_file = workdir / "mesh.txt"
        mesh_file.write_text("".join(f"{name} A\n" for name, _ in mesh))
        fwd_file = workdir / "forwarded.txt"
        fwd_file.write_text("".join(f"{name} A\n" for name in fwd))
        with _upstream(workdir, fwd) as upstream, contextlib.ExitStack() as stack:
            started = {server: stack.enter_context(starters[server](workdir, upstream)) for server in wanted}
            ports = {server: port for server, (port, _) in started.items()}
            for port in ports.values():
                _dnsperf(port, fwd_file, "-n", "1")  # warm the forwarding caches
            files = {"mesh": mesh_file, "forwarded_cached": fwd_file}
            measures: dict[str, tuple[Callable[[str, int, Path], dict[str, Any]], str]] = {
                "throughput": (lambda s, p, f: _throughput(p, f, args), "qps"),
                "cpu": (lambda s, p, f: _cpu(started[s][1], p, f, args), "cpu_us_per_query"),
                "latency": (lambda s, p, f: _latency(p, f, args), "p99_ms")}
            rounds: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {
                s: {k: {m: [] for m in measures} for k in files} for s in wanted}
            for _ in range(max(1, args.rounds)):
                for measure, (measure_run, _key) in measures.items():
                    for kind, datafile in files.items():
                        for server, port in ports.items():
                            rounds[server][kind][measure].append(measure_run(server, port, datafile))
            for server in ports:
                results[server] = {}
                for kind in files:
                    results[server][kind] = {}
                    for measure, (_run, key) in measures.items():
                        runs = rounds[server][kind][measure]
                        median = dict(sorted(runs, key=lambda r: r.get(key) or 0)[len(runs) // 2])
                        median[f"{key}_rounds"] = [r.get(key) for r in runs]
                        results[server][kind][measure] = median

    def ratio(measure: str, key: str, kind: str, peer: str) -> float | None:
        try:
            value: float = results["meshdns"][kind][measure][key] / results[peer][kind][measure][key]
            return round(value, 3)
        except (KeyError, TypeError, ZeroDivisionError):
            return None

    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "load_avg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "settings": {"duration_s": args.duration, "rounds": args.rounds, "names": n, "clients": args.clients,
                     "outstanding": args.outstanding, "cpu_qps": args.cpu_qps, "cpu_duration_s": args.cpu_duration,
                     "latency_qps": args.latency_qps, "latency_duration_s": args.latency_duration},
        "results": results,
        "ratio_meshdns_over_dnsmasq": {k: ratio("throughput", "qps", k, "dnsmasq") for k in _KINDS},
        "ratio_meshdns_over_unbound": {
            "cpu_us_per_query": {k: ratio("cpu", "cpu_us_per_query", k, "unbound") for k in _KINDS},
            "p99_ms": {k: ratio("latency", "p99_ms", k, "unbound") for k in _KINDS},
        },
    }
    parts = []
    for server, r in results.items():
        parts.append(server + " " + ", ".join(
            f"{_SHORT[k]} {r[k]['throughput']['qps'] or 0:.0f} qps {r[k]['cpu'].get('cpu_us_per_query')} us/q "
            f"p99 {r[k]['latency'].get('p99_ms')} ms" for k in _KINDS))

    def verdict(value: float | None, bar: float, below: bool) -> str:
        if value is None:
            return "n/a"
        return f"{value} ({'meets' if (value <= bar if below else value >= bar) else 'MISSES'})"

    over_dnsmasq, over_unbound = report["ratio_meshdns_over_dnsmasq"], report["ratio_meshdns_over_unbound"]
    report["summary"] = (
        f"perf dns (us/q at {args.cpu_qps} qps offered, p99 at {args.latency_qps}): {'; '.join(parts)}; "
        f"meshdns/dnsmasq qps mesh = {verdict(over_dnsmasq['mesh'], 1.0, False)}, "
        f"cached-fwd = {over_dnsmasq['forwarded_cached']}; "
        + "; ".join(f"meshdns/unbound {label} {_SHORT[k]} = {verdict(over_unbound[m][k], 1.0, True)}"
                    for m, label in (("cpu_us_per_query", "us/q"), ("p99_ms", "p99")) for k in _KINDS))
    return report
