"""Registry benchmark through the Consul-compatible API: registrations and deregistrations per
second with their latency and cost, blocking-query wakeup latency, and disk syncs per acknowledged
write.

It starts its own control plane (``meshpilot serve``, SQLite store in a temporary directory unless
``--store`` says otherwise) and then:

1. makes N registrations (each with a TTL check; of N services, or N/K services with K instances
   each under ``--per-service K``) with C requests in flight, then deregisters them. For each
   phase it reports the rate, the latency percentiles of the requests, the CPU the control plane
   used per write (``/proc/<pid>/stat``, from the phase's first request until the work the writes
   started, the debounced publication included, is done), the CPU the load generator used per
   write, how busy the machine's cores were, the store's durable commits per write (its
   ``meshpilot_store_commits`` metric) and, on etcd, the members' WAL fsyncs per write from their
   ``/metrics``. The control plane runs untraced: under strace each fsync stops it. The load generator is
   HashiCorp's Go client (``consul_load/main.go``, built on first use with the Go toolchain from
   the module cache or the Go module proxy) when ``go`` is installed, else aiohttp in this
   process: measured here, 0.09-0.12 ms of CPU per request for the Go client against
   0.23-0.30 ms for aiohttp, which matters when the client shares two cores with the control plane.
2. parks W blocking ``/v1/health/service/<name>?index=`` queries on one service, changes that
   service, and measures how long each watcher takes to get its answer;
3. with ``--sync-writes S`` (default 200), counts the store's syncs (strace attached to the control
   plane; on etcd, the members' WAL fsyncs) while S registrations are made one at a time and then S
   with C in flight: at least one sync per acknowledged write one at a time, fewer than one when
   writes share commits.

``--profile FILE`` samples the control plane with py-spy during phase 1 and adds the functions
that took the most samples to the report. Results are printed as one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import importlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from meshpilot.frontdoor import raise_fd_limit
from meshpilot.perf.gobuild import go_binary
from meshpilot.perf.served import stop

__all__ = ["add_arguments", "main", "profile_summary", "strace_attached"]

_GO_SOURCES = Path(__file__).parent / "consul_load"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_QUIET_WINDOW_S = 0.1
_QUIET_CPU_S = 0.02  # a 100 ms window in which the control plane used at most this is quiet
_SETTLE_MAX_S = 3.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--services", type=int, default=5000, help="registrations to make and undo (default 5000; each of its own service unless --per-service)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight while registering (default 16)")
    parser.add_argument("--per-service", type=int, default=1, metavar="K", help="registrations per service: K instances of "
                        "services/K services (default 1: every registration creates its service)")
    parser.add_argument("--client", choices=("auto", "go", "python"), default="auto",
                        help="load generator: HashiCorp's Go client or aiohttp (default auto: go when a Go toolchain is installed)")
    parser.add_argument("--watchers", type=int, default=1000, help="blocking queries parked on one service (default 1000; 0 skips)")
    parser.add_argument("--rounds", type=int, default=5, help="wakeup rounds to measure (default 5)")
    parser.add_argument("--store", default="", help="control-plane store URL, e.g. sqlite:PATH or etcd://H:P,H:P,H:P "
                        "(default: SQLite in a temporary directory)")
    parser.add_argument("--etcd", type=int, default=0, metavar="N", help="start an N-member etcd cluster (/usr/bin/etcd, "
                        "tests/etcd_cluster.py of this checkout) and use it as the store")
    parser.add_argument("--consul", default="", help="benchmark an already running Consul API at HOST:PORT instead "
                        "(a Consul agent as a peer, or a control plane started elsewhere; no CPU or sync counts)")
    parser.add_argument("--sync-writes", type=int, default=200, help="count disk syncs for this many registrations, one at a time and "
                        "concurrently (strace, or etcd's metrics; default 200; 0 skips)")
    parser.add_argument("--profile", default="", metavar="FILE", help="sample the control plane with py-spy while it registers "
                        "and deregisters; write the collapsed stacks to FILE and the top functions into the report")
    parser.add_argument("--output", default="", help="also write the JSON report here")


# ---- the control plane and what it costs ---------------------------------------------------------


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of every thread of ``pid`` so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces; fields from state on
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _host_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the machine so far, from /proc/stat."""
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    total = sum(parts[:8])
    return (total - idle) / _CLK_TCK, total / _CLK_TCK


@dataclass
class _ControlPlane:
    proc: subprocess.Popen[bytes]  # the control plane, or strace running it
    pid: int  # the control plane's own process
    target: str
    store: str
    api: str  # the management API, whose /metrics counts the store's commits
    store_pids: tuple[int, ...] = ()  # the store's own processes (etcd members this command started)

    def cpu_s(self) -> float:
        return process_cpu_s(self.pid)

    def store_cpu_s(self) -> float | None:
        return sum(process_cpu_s(p) for p in self.store_pids) if self.store_pids else None

    def syncs(self) -> int | None:
        """Store syncs so far where they can be read without slowing the control plane: etcd's WAL
        fsyncs (SQLite's are counted by strace in the ``--sync-writes`` phase)."""
        return etcd_wal_fsyncs(self.store) if self.store.startswith("etcd://") else None

    def commits(self) -> int | None:
        """The store's durable commits so far, from the control plane's /metrics."""
        try:
            with urllib.request.urlopen(f"http://{self.api}/metrics", timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            return None
        value = _metric(text, "meshpilot_store_commits")
        return None if value is None else int(value)

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            stop(self.proc)


def etcd_wal_fsyncs(url: str) -> int | None:
    """WAL fsyncs so far, summed over the etcd members of a store URL (etcd's own /metrics)."""
    total = 0
    for member in url.removeprefix("etcd://").split(","):
        try:
            with urllib.request.urlopen(f"http://{member}/metrics", timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            return None
        total += int(_metric(text, "etcd_disk_wal_fsync_duration_seconds_count") or 0)
    return total


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


@contextmanager
def _etcd(work: Path, members: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    """An etcd cluster of ``members`` started the way the e2e tests start one: (store URL, pids)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "tests" / "etcd_cluster.py").exists():
        raise RuntimeError(f"--etcd needs tests/etcd_cluster.py of a meshpilot checkout (not under {root})")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    etcd_cluster = importlib.import_module("tests.etcd_cluster").etcd_cluster
    (work / "etcd").mkdir()
    with etcd_cluster(work / "etcd", members) as cluster:
        yield cluster.url, tuple(m.proc.pid for m in cluster.members if m.proc is not None)


def _start_control_plane(work: Path, store: str) -> _ControlPlane:
    ready = work / "ready.json"
    exe = Path(sys.executable).parent / "meshpilot"
    url = store or f"sqlite:{work / 'bench.db'}"
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "meshpilot.cli"]),
           "serve", "--store", url, "--xds-port", "0", "--api-port", "0",
           "--consul-port", "0", "--eureka-port", "-1", "--ready-file", str(ready)]
    # no strace around the throughput phases: each traced fsync stops the control plane (measured:
    # ~10 % fewer registrations/s); ``--sync-writes`` attaches it for a phase of its own
    proc = subprocess.Popen(cmd, stdout=open(work / "control-plane.log", "wb"), stderr=subprocess.STDOUT, cwd=work,
                            env={**os.environ, "MESHPILOT_LOG_LEVEL": "WARNING"})
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"control plane did not start:\n{(work / 'control-plane.log').read_text()[-2000:]}")
        time.sleep(0.05)
    info = json.loads(ready.read_text())
    return _ControlPlane(proc, int(info["pid"]), f"127.0.0.1:{info['consul']}", url, f"127.0.0.1:{info['api']}")


@contextmanager
def strace_attached(pid: int, out: Path, *options: str) -> Iterator[None]:
    """Trace every thread of process ``pid`` with strace into ``out`` while the block runs."""
    strace = shutil.which("strace")
    if strace is None:
        raise RuntimeError("strace (Debian package strace) is needed to trace the control plane")
    tracer = subprocess.Popen([strace, "-f", *options, "-o", str(out), "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not all("TracerPid:\t0\n" not in (t / "status").read_text() for t in Path(f"/proc/{pid}/task").iterdir()):
            if tracer.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"strace did not attach to every thread of process {pid}")
            time.sleep(0.02)
        yield
    finally:
        tracer.send_signal(signal.SIGINT)  # strace detaches; the traced process runs on
        tracer.wait(10)


def _syncs(summary: str) -> int:
    """fsync + fdatasync calls in an ``strace -c`` summary."""
    return sum(int(line.split()[3]) for line in summary.splitlines() if line.split()[-1:] in (["fsync"], ["fdatasync"]))


async def _sync_counts(base: str, cp: _ControlPlane, work: Path, n: int, concurrency: int) -> dict[str, Any]:
    """Syncs while ``n`` registrations are made one at a time, then ``concurrency`` at a time: etcd's
    WAL fsyncs, or the control plane's counted by an strace attached for the purpose (so the
    throughput phases run untraced)."""
    counts: dict[str, Any] = {"registrations": n}
    for label, in_flight in (("one_at_a_time", 1), (f"{concurrency}_in_flight", concurrency)):
        prefix = f"sync-{in_flight}-"
        before = cp.syncs()  # etcd: its members' WAL fsyncs
        if before is not None:
            load = await _python_load(base, "register", n, in_flight, prefix=prefix)
            syncs = (cp.syncs() or 0) - before
        else:
            out = work / f"strace-{label}.txt"
            with strace_attached(cp.pid, out, "-c", "-e", "trace=fsync,fdatasync"):
                load = await _python_load(base, "register", n, in_flight, prefix=prefix)
            syncs = _syncs(out.read_text())
        counts[label] = {"syncs": syncs, "syncs_per_registration": round(syncs / n, 3), "register_per_s_traced": round(n / load.seconds, 1)}
    return counts


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)

    def pct(p: float) -> float:
        return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]

    return {"p50_ms": round(pct(50) * 1000, 2), "p90_ms": round(pct(90) * 1000, 2), "p99_ms": round(pct(99) * 1000, 2),
            "max_ms": round(s[-1] * 1000, 2), "mean_ms": round(statistics.fmean(s) * 1000, 2)}


# ---- load generators -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Load:
    seconds: float  # from the first request sent to the last answer
    latencies: list[float]  # seconds, one per request
    client_cpu_s: float  # CPU the load generator used meanwhile


def _registration(prefix: str, i: int, per_service: int = 1) -> dict[str, Any]:
    return {"Name": f"{prefix}{i // per_service}", "ID": f"{prefix}{i}-1", "Address": "127.0.0.1", "Port": 20000 + i % 40000,
            "Tags": ["bench"], "Meta": {"version": "1"}, "Check": {"TTL": "60s"}}


async def _python_load(base: str, phase: str, n: int, concurrency: int, prefix: str, per_service: int = 1) -> _Load:
    """aiohttp in this process: C workers, one kept-alive connection each."""
    latencies = [0.0] * n
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:
        todo = iter(range(n))

        async def worker() -> None:
            for i in todo:
                if phase == "register":
                    method, path, body = "PUT", "/v1/agent/service/register", _registration(prefix, i, per_service)
                else:
                    method, path, body = "PUT", f"/v1/agent/service/deregister/{prefix}{i}-1", None
                start = time.perf_counter()
                async with http.request(method, base + path, json=body) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"{method} {path}: expected 200, got {resp.status} {await resp.text()}")
                    await resp.read()
                latencies[i] = time.perf_counter() - start

        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        t1, cpu1 = time.perf_counter(), time.process_time()
    return _Load(t1 - t0, latencies, cpu1 - cpu0)


def go_client(cache: Path) -> Path:
    """The Go load generator, built from ``consul_load/`` unless a build newer than its sources is cached."""
    return go_binary(_GO_SOURCES, cache, "consulload", "--client go (the Go load generator)", timeout_s=600)


async def _go_load(binary: Path, target: str, phase: str, n: int, concurrency: int, prefix: str, per_service: int = 1) -> _Load:
    proc = await asyncio.create_subprocess_exec(str(binary), "-addr", target, "-phase", phase, "-n", str(n), "-c", str(concurrency),
                                                "-prefix", prefix, "-per-service", str(per_service),
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the Go load generator's {phase} failed: {err.decode()[-2000:]}")
    got = json.loads(out)
    return _Load(float(got["seconds"]), [us / 1e6 for us in got["latencies_us"]], float(got["cpu_s"]))


# ---- phases --------------------------------------------------------------------------------------


async def _settle(cp: _ControlPlane) -> float:
    """Wait until the control plane is quiet (a 100 ms window with at most 20 ms of CPU), at most 3 s;
    the seconds waited."""
    t0 = time.perf_counter()
    prev = cp.cpu_s()
    while time.perf_counter() - t0 < _SETTLE_MAX_S:
        await asyncio.sleep(_QUIET_WINDOW_S)
        now = cp.cpu_s()
        if now - prev <= _QUIET_CPU_S:
            break
        prev = now
    return time.perf_counter() - t0


async def _phase(cp: _ControlPlane | None, n: int, load: Callable[[], Awaitable[_Load]]) -> dict[str, Any]:
    cpu0 = cp.cpu_s() if cp else 0.0
    store0 = cp.store_cpu_s() if cp else None
    syncs0 = cp.syncs() if cp else None
    commits0 = cp.commits() if cp else None
    host0 = _host_cpu()
    got = await load()
    host1 = _host_cpu()
    cpu_during = (cp.cpu_s() - cpu0) if cp else 0.0
    out: dict[str, Any] = {"per_s": round(n / got.seconds, 1), "seconds": round(got.seconds, 3), **_percentiles(got.latencies),
                           "client_cpu_ms_per_write": round(got.client_cpu_s * 1000 / n, 3),
                           "host_busy_cores": round((host1[0] - host0[0]) / got.seconds, 2)}
    if cp is None:
        return out
    tail = await _settle(cp)
    cpu = cp.cpu_s() - cpu0
    store1 = cp.store_cpu_s()
    syncs1 = cp.syncs()
    commits1 = cp.commits()
    out |= {"control_plane_cpu_ms_per_write": round(cpu * 1000 / n, 3), "control_plane_busy_cores": round(cpu_during / got.seconds, 2),
            "settle_s": round(tail, 2)}
    if store0 is not None and store1 is not None:
        out["store_cpu_ms_per_write"] = round((store1 - store0) * 1000 / n, 3)
    if syncs0 is not None and syncs1 is not None:
        out["store_syncs_per_write"] = round((syncs1 - syncs0) / n, 3)
    if commits0 is not None and commits1 is not None:
        out["store_commits_per_write"] = round((commits1 - commits0) / n, 3)
    return out


async def _listed(base: str, prefix: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(base + "/v1/catalog/services") as resp:
        return sum(1 for k in await resp.json() if k.startswith(prefix))


async def _registrations(cp: _ControlPlane | None, target: str, n: int, concurrency: int,
                         client: Callable[[str, int, int, str], Awaitable[_Load]], per_service: int = 1) -> dict[str, Any]:
    prefix = "bench-"
    services = -(-n // per_service)
    report: dict[str, Any] = {"registrations": n, "services": services, "concurrency": concurrency}
    report["register"] = await _phase(cp, n, lambda: client("register", n, concurrency, prefix))
    listed = await _listed(f"http://{target}", prefix)
    if listed != services:
        raise RuntimeError(f"expected {services} registered services, the catalog lists {listed}")
    if cp is not None:
        # what n registered services cost while nothing changes (TTL and health bookkeeping)
        cpu0, t0 = cp.cpu_s(), time.perf_counter()
        await asyncio.sleep(1.0)
        report["idle_busy_cores_registered"] = round((cp.cpu_s() - cpu0) / (time.perf_counter() - t0), 3)
    report["deregister"] = await _phase(cp, n, lambda: client("deregister", n, concurrency, prefix))
    listed = await _listed(f"http://{target}", prefix)
    if listed:
        raise RuntimeError(f"expected no services left after deregistering, the catalog lists {listed}")
    return report


# ---- profile -------------------------------------------------------------------------------------


@contextmanager
def _profiled(pid: int, out: Path) -> Iterator[None]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise RuntimeError("--profile needs py-spy (pip install py-spy)")
    proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "--nonblocking",
                             "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # py-spy attaches before the load starts
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes what it sampled and exits
        _out, err = proc.communicate(timeout=30)
        if not out.exists():
            raise RuntimeError(f"py-spy wrote no profile: {err.decode()[-1000:]}")


def _frame(frame: str) -> str:
    """``func (path/to/module.py:123)`` -> ``func module.py:123``."""
    name, _, where = frame.partition(" (")
    return f"{name} {where.rstrip(')').rsplit('/', 1)[-1]}".strip()


def profile_summary(collapsed: str, top: int = 30) -> dict[str, Any]:
    """The functions that took the most samples in py-spy's collapsed stacks: inclusive (on the
    stack) and self (at its top), each as a share of all samples."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame(f) for f in stack.split(";")]
        for f in set(frames):
            inclusive[f] += n
        own[frames[-1]] += n

    def shares(c: collections.Counter[str]) -> list[list[Any]]:
        return [[f, round(100 * v / total, 1)] for f, v in c.most_common(top)]

    return {"samples": total, "inclusive_pct": shares(inclusive) if total else [], "self_pct": shares(own) if total else []}


async def _wakeups(base: str, watchers: int, rounds: int) -> dict[str, Any]:
    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=120)) as http:
        async def put(path: str, body: Any = None) -> None:
            async with http.put(base + path, json=body) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"PUT {path}: expected 200, got {resp.status} {await resp.text()}")

        await put("/v1/agent/service/register", {"Name": "watched", "ID": "watched-1", "Address": "127.0.0.1", "Port": 9999,
                                                 "Check": {"TTL": "300s"}})
        status = "critical"
        for _ in range(rounds):
            async with http.get(base + "/v1/health/service/watched") as resp:
                index = resp.headers["X-Consul-Index"]
            done: list[float] = []
            changed_at = [0.0]
            tasks = [asyncio.create_task(_parked(http, base, index, done, changed_at, watchers)) for _ in range(watchers)]
            await _wait_parked(http, base, watchers)
            status = "passing" if status == "critical" else "critical"
            changed_at[0] = time.perf_counter()
            await put(f"/v1/agent/check/{'pass' if status == 'passing' else 'fail'}/service:watched-1")
            await asyncio.gather(*tasks)
            latencies.extend(done)
        await put("/v1/agent/service/deregister/watched-1")
    return {"watchers": watchers, "rounds": rounds, "wakeups": len(latencies), **_percentiles(latencies)}


async def _parked(http: aiohttp.ClientSession, base: str, index: str, done: list[float], changed_at: list[float], watchers: int) -> None:
    async with http.get(base + f"/v1/health/service/watched?index={index}&wait=60s") as resp:
        await resp.read()
        if resp.headers.get("X-Consul-Index") == index:
            raise RuntimeError("a watcher returned without a change")
        done.append(time.perf_counter() - changed_at[0])


async def _wait_parked(http: aiohttp.ClientSession, base: str, watchers: int) -> None:
    """Wait until the server holds every watcher: its connections show in the client's pool."""
    deadline = time.monotonic() + 60
    connector = http.connector
    assert connector is not None
    while time.monotonic() < deadline:
        acquired = len(getattr(connector, "_acquired", ()))
        if acquired >= watchers:
            break
        await asyncio.sleep(0.01)
    # the requests are written; give the server's loop a moment to read them all
    await asyncio.sleep(0.5)


def main(args: argparse.Namespace) -> int:
    raise_fd_limit()  # each watcher holds a connection
    work = Path(tempfile.mkdtemp(prefix="meshpilot-perf-registry-"))
    cp = None
    stack = ExitStack()
    etcd_url, etcd_pids = "", tuple[int, ...]()
    try:
        use_go = args.client == "go" or (args.client == "auto" and (shutil.which("go") or Path("/usr/local/go/bin/go").exists()))
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "meshpilot" / "consul-load"
        binary = go_client(cache) if use_go else None
        target = args.consul
        if args.etcd and (args.store or args.consul):
            raise RuntimeError("--etcd starts the store itself: drop --store and --consul")
        if args.etcd:
            etcd_url, etcd_pids = stack.enter_context(_etcd(work, args.etcd))
        if not target:
            cp = _start_control_plane(work, etcd_url if args.etcd else args.store)
            cp.store_pids = etcd_pids if args.etcd else ()
            target = cp.target
        base = f"http://{target}"

        async def client(phase: str, n: int, concurrency: int, prefix: str) -> _Load:
            if binary is not None:
                return await _go_load(binary, target, phase, n, concurrency, prefix, args.per_service)
            return await _python_load(base, phase, n, concurrency, prefix, args.per_service)

        async def run() -> dict[str, Any]:
            if args.profile:
                if cp is None:
                    raise RuntimeError("--profile samples the control plane this command starts; drop --consul")
                with _profiled(cp.pid, Path(args.profile)):
                    reg = await _registrations(cp, target, args.services, args.concurrency, client, args.per_service)
                reg["profile"] = {"file": args.profile, **profile_summary(Path(args.profile).read_text())}
            else:
                reg = await _registrations(cp, target, args.services, args.concurrency, client, args.per_service)
            report: dict[str, Any] = {"registrations": reg}
            if args.watchers:
                report["blocking_query_wakeup"] = await _wakeups(base, args.watchers, args.rounds)
            if args.sync_writes:
                if cp is None:
                    raise RuntimeError("--sync-writes traces the control plane this command starts; drop --consul")
                report["disk_syncs"] = await _sync_counts(base, cp, work, args.sync_writes, args.concurrency)
            return report

        report = {"target": target, "store": (f"{args.etcd}-member etcd: " if args.etcd else "") + (cp.store if cp else "(external)"),
                  "cpus": os.cpu_count(),
                  "client": "go: github.com/hashicorp/consul/api" if binary else "python: aiohttp",
                  "syncs_counted_by": _sync_source(cp), **asyncio.run(run())}
        text = json.dumps(report, indent=2)
        print(text)
        print(_summary(report["registrations"]), file=sys.stderr)
        if args.output:
            Path(args.output).write_text(text + "\n")
        return 0
    finally:
        if cp is not None:
            cp.stop()
        stack.close()  # the etcd members, after the control plane that uses them
        shutil.rmtree(work, ignore_errors=True)


def _sync_source(cp: _ControlPlane | None) -> str:
    if cp is None:
        return "none (external target)"
    if cp.store.startswith("etcd://"):
        return "etcd /metrics: WAL fsyncs of every member"
    return "strace attached in the sync phase (--sync-writes): fsync + fdatasync of the control plane; commits from its /metrics"


def _summary(reg: dict[str, Any]) -> str:
    parts = []
    for phase in ("register", "deregister"):
        p = reg[phase]
        cost = f", control plane {p['control_plane_cpu_ms_per_write']} ms CPU/write" if "control_plane_cpu_ms_per_write" in p else ""
        parts.append(f"{phase} {p['per_s']:,.0f}/s p50 {p['p50_ms']} ms p99 {p['p99_ms']} ms{cost}")
    return (f"registry ({reg['registrations']} registrations of {reg['services']} services, {reg['concurrency']} in flight): "
            + "; ".join(parts))


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="meshpilot perf registry", description=(__doc__ or "").splitlines()[0])
    add_arguments(p)
    sys.exit(main(p.parse_args()))
