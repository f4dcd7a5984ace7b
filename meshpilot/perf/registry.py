"""Registry benchmark through the Consul-compatible API: registrations per second, blocking-query
wakeup latency and disk syncs per acknowledged write.

It starts its own control plane (``meshpilot serve``, SQLite store in a temporary directory unless
``--store`` says otherwise), then (1) registers N services (one instance each, with a TTL check)
and deregisters them again with C requests in flight, (2) parks W blocking
``/v1/health/service/<name>?index=`` queries on one service, changes that service, and measures how
long each watcher takes to get its answer, and (3) with ``--sync-writes S``, counts the control
plane's fsync/fdatasync calls (strace attached to it) while S registrations are made one at a time
and then S with C in flight: at least one sync per acknowledged write one at a time, fewer than one
when writes share commits. Results are printed as one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp

from meshpilot.frontdoor import raise_fd_limit
from meshpilot.perf.served import stop

__all__ = ["add_arguments", "main", "strace_attached"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--services", type=int, default=1000, help="services to register and deregister (default 1000)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight while registering (default 64)")
    parser.add_argument("--watchers", type=int, default=1000, help="blocking queries parked on one service (default 1000)")
    parser.add_argument("--rounds", type=int, default=5, help="wakeup rounds to measure (default 5)")
    parser.add_argument("--store", default="", help="control-plane store (default: SQLite in a temporary directory)")
    parser.add_argument("--consul", default="", help="benchmark an already running Consul API at HOST:PORT instead")
    parser.add_argument("--sync-writes", type=int, default=0, help="count disk syncs for this many registrations, one at a time and "
                        "concurrently (needs strace; default 0: skip)")
    parser.add_argument("--output", default="", help="also write the JSON report here")


def _start_control_plane(work: Path, store: str) -> tuple[subprocess.Popen[bytes], str]:
    ready = work / "ready.json"
    exe = Path(sys.executable).parent / "meshpilot"
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "meshpilot.cli"]),
           "serve", "--store", store or f"sqlite:{work / 'bench.db'}", "--xds-port", "0", "--api-port", "0",
           "--consul-port", "0", "--eureka-port", "-1", "--ready-file", str(ready)]
    proc = subprocess.Popen(cmd, stdout=open(work / "control-plane.log", "wb"), stderr=subprocess.STDOUT, cwd=work,
                            env={**os.environ, "MESHPILOT_LOG_LEVEL": "WARNING"})
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"control plane did not start:\n{(work / 'control-plane.log').read_text()[-2000:]}")
        time.sleep(0.05)
    ports = json.loads(ready.read_text())
    return proc, f"127.0.0.1:{ports['consul']}"


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


async def _sync_counts(base: str, pid: int, work: Path, n: int, concurrency: int) -> dict[str, Any]:
    counts: dict[str, Any] = {"registrations": n}
    for label, in_flight in (("one_at_a_time", 1), (f"{concurrency}_in_flight", concurrency)):
        out = work / f"strace-{label}.txt"
        with strace_attached(pid, out, "-c", "-e", "trace=fsync,fdatasync"):
            reg = await _registrations(base, n, in_flight, prefix=f"sync-{in_flight}-", deregister=False)
        syncs = _syncs(out.read_text())
        counts[label] = {"syncs": syncs, "syncs_per_registration": round(syncs / n, 3), "register_per_s_traced": reg["register_per_s"]}
    return counts


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)

    def pct(p: float) -> float:
        return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]

    return {"p50_ms": round(pct(50) * 1000, 2), "p90_ms": round(pct(90) * 1000, 2), "p99_ms": round(pct(99) * 1000, 2),
            "max_ms": round(s[-1] * 1000, 2), "mean_ms": round(statistics.fmean(s) * 1000, 2)}


async def _registrations(base: str, n: int, concurrency: int, prefix: str = "bench-", deregister: bool = True) -> dict[str, Any]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:
        sem = asyncio.Semaphore(concurrency)

        async def call(method: str, path: str, body: Any = None) -> None:
            async with sem:
                async with http.request(method, base + path, json=body) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"{method} {path}: expected 200, got {resp.status} {await resp.text()}")
                    await resp.read()

        def reg(i: int) -> Any:
            return call("PUT", "/v1/agent/service/register",
                        {"Name": f"{prefix}{i}", "ID": f"{prefix}{i}-1", "Address": "127.0.0.1", "Port": 20000 + i % 40000,
                         "Tags": ["bench"], "Meta": {"version": "1"}, "Check": {"TTL": "60s"}})

        t0 = time.perf_counter()
        await asyncio.gather(*(reg(i) for i in range(n)))
        t1 = time.perf_counter()
        async with http.get(base + "/v1/catalog/services") as resp:
            listed = sum(1 for k in await resp.json() if k.startswith(prefix))
        if listed != n:
            raise RuntimeError(f"expected {n} registered services, the catalog lists {listed}")
        if not deregister:
            return {"services": n, "concurrency": concurrency, "register_per_s": round(n / (t1 - t0), 1)}
        t2 = time.perf_counter()
        await asyncio.gather(*(call("PUT", f"/v1/agent/service/deregister/{prefix}{i}-1") for i in range(n)))
        t3 = time.perf_counter()
    return {
        "services": n, "concurrency": concurrency,
        "register_per_s": round(n / (t1 - t0), 1), "deregister_per_s": round(n / (t3 - t2), 1),
        "register_plus_deregister_per_s": round(2 * n / ((t1 - t0) + (t3 - t2)), 1),
        "register_s": round(t1 - t0, 3), "deregister_s": round(t3 - t2, 3),
    }


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
    proc = None
    try:
        target = args.consul
        if not target:
            proc, target = _start_control_plane(work, args.store)
        base = f"http://{target}"

        async def run() -> dict[str, Any]:
            reg = await _registrations(base, args.services, args.concurrency)
            wake = await _wakeups(base, args.watchers, args.rounds)
            report = {"registrations": reg, "blocking_query_wakeup": wake}
            if args.sync_writes:
                if proc is None:
                    raise RuntimeError("--sync-writes traces the control plane this command starts; drop --consul")
                report["disk_syncs"] = await _sync_counts(base, proc.pid, work, args.sync_writes, args.concurrency)
            return report

        report = {"target": target, "cpus": os.cpu_count(), **asyncio.run(run())}
        text = json.dumps(report, indent=2)
        print(text)
        if args.output:
            Path(args.output).write_text(text + "\n")
        return 0
    finally:
        if proc is not None:
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="meshpilot perf registry", description=__doc__.splitlines()[0])
    add_arguments(p)
    sys.exit(main(p.parse_args()))
