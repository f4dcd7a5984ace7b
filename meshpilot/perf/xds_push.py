"""``meshpilot perf xds``: how fast a registry change reaches every connected xDS client.

The harness starts a real control plane (``meshpilot serve``, in-memory store) as a subprocess,
fills it through the management API with S services × E endpoints, and connects N simulated ADS
clients (grpc.aio, sotw or delta) that subscribe like an Envoy sidecar does: every cluster, then
the endpoints of every cluster, ACKing each response. It then measures, per client, the time from
a change to the response that carries it:

- one endpoint change (a new instance of one service);
- a burst of registrations (default 500, sent one after another), timed from the first write and
  from the last acknowledged write. The writes are sequential, so a response carrying the last
  one carries all of them; clients recognise it by the new instance's unique address in the raw
  bytes, without decoding the resources.

Control-plane CPU seconds (for each phase) and peak RSS come from the kernel (psutil,
/proc/<pid>/status VmHWM). The clients share the machine with the control plane, so the numbers
include their load. Output: JSON on stdout and a one-line summary on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
from aiohttp import ClientSession, TCPConnector
from envoy.service.discovery.v3 import discovery_pb2

from meshpilot.translate.names import TYPE

__all__ = ["add_arguments", "main"]

_SOTW = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
_DELTA = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", type=int, default=1000, help="simulated ADS streams (default 1000)")
    p.add_argument("--services", type=int, default=1000, help="services in the mesh (default 1000)")
    p.add_argument("--endpoints", type=int, default=5, help="endpoints per service (default 5)")
    p.add_argument("--burst", type=int, default=500, help="registrations in the burst (default 500)")
    p.add_argument("--variants", default="delta,sotw", help="comma-separated: delta, sotw")
    p.add_argument("--streams-per-channel", type=int, default=100)
    p.add_argument("--timeout", type=float, default=120.0, help="give up waiting for a phase after this many seconds")


@dataclass
class _Client:
    idx: int
    delta: bool
    marker: bytes = b""
    marker_set_at: float = 0.0
    seen_at: float | None = None
    synced: asyncio.Event = field(default_factory=asyncio.Event)
    clusters: int = 0
    eds_responses: int = 0
    error: str = ""


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    v = sorted(values)
    return {
        "p50": round(v[len(v) // 2], 4),
        "p99": round(v[min(len(v) - 1, int(len(v) * 0.99))], 4),
        "max": round(v[-1], 4),
    }


async def _run_client(ch: grpc.aio.Channel, c: _Client, want_clusters: int) -> None:
    method = _DELTA if c.delta else _SOTW
    req_type = discovery_pb2.DeltaDiscoveryRequest if c.delta else discovery_pb2.DiscoveryRequest
    resp_type = discovery_pb2.DeltaDiscoveryResponse if c.delta else discovery_pb2.DiscoveryResponse
    call = ch.stream_stream(method, request_serializer=req_type.SerializeToString, response_deserializer=lambda b: b)()
    node = {"id": f"perf-{c.idx}", "cluster": "perf"}
    await call.write(req_type(type_url=TYPE.CLUSTER, node=node))
    eds_names: list[str] = []
    try:
        while True:
            raw = await call.read()
            if raw is grpc.aio.EOF:
                return
            if c.marker and c.seen_at is None and c.marker in raw:
                c.seen_at = time.monotonic()
            resp = resp_type.FromString(raw)
            if resp.type_url == TYPE.CLUSTER:
                if c.delta:
                    names = [r.name for r in resp.resources]
                    ack = req_type(type_url=TYPE.CLUSTER, response_nonce=resp.nonce)
                else:
                    names = [_cluster_name(a.value) for a in resp.resources]
                    ack = req_type(type_url=TYPE.CLUSTER, response_nonce=resp.nonce, version_info=resp.version_info)
                await call.write(ack)
                new = [n for n in names if n not in eds_names]
                if new:
                    eds_names.extend(new)
                    c.clusters = len(eds_names)
                    if c.delta:
                        await call.write(req_type(type_url=TYPE.ENDPOINT, resource_names_subscribe=new))
                    else:
                        await call.write(req_type(type_url=TYPE.ENDPOINT, resource_names=eds_names))
            elif resp.type_url == TYPE.ENDPOINT:
                c.eds_responses += 1
                if c.delta:
                    await call.write(req_type(type_url=TYPE.ENDPOINT, response_nonce=resp.nonce))
                else:
                    await call.write(req_type(type_url=TYPE.ENDPOINT, response_nonce=resp.nonce, version_info=resp.version_info, resource_names=eds_names))
                if c.clusters >= want_clusters:
                    c.synced.set()
    except (asyncio.CancelledError, grpc.aio.AioRpcError) as exc:
        if isinstance(exc, grpc.aio.AioRpcError):
            c.error = exc.details() or str(exc.code())
        raise


def _cluster_name(cluster_bytes: bytes) -> str:
    from envoy.config.cluster.v3 import cluster_pb2

    return cluster_pb2.Cluster.FromString(cluster_bytes).name


async def _seed(api: str, services: int, endpoints: int) -> None:
    async with ClientSession(connector=TCPConnector(limit=8)) as s:
        sem = asyncio.Semaphore(8)

        async def one(i: int) -> None:
            async with sem:
                async with s.post(f"{api}/v1/services", json={"name": f"svc{i}", "ports": [{"name": "http", "port": 80}]}) as r:
                    if r.status != 201:
                        raise RuntimeError(f"creating svc{i}: {r.status} {await r.text()}")
                for e in range(endpoints):
                    body = {"id": f"svc{i}-{e}", "address": f"10.{(i >> 8) & 255}.{i & 255}.{e + 1}", "ports": {"http": 8080}}
                    async with s.post(f"{api}/v1/services/default/svc{i}/instances", json=body) as r:
                        if r.status != 201:
                            raise RuntimeError(f"registering {body['id']}: {r.status} {await r.text()}")

        await asyncio.gather(*(one(i) for i in range(services)))


def _marker_address(n: int) -> str:
    return f"10.250.{(n >> 8) & 255}.{n & 255}"


async def _variant(args: argparse.Namespace, delta: bool) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="meshpilot-perf-"))
    ready = workdir / "ready.json"
    log = open(workdir / "control-plane.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshpilot.cli", "serve", "--store", "memory:", "--xds-port", "0", "--api-port", "0",
         "--consul-port", "-1", "--eureka-port", "-1", "--ready-file", str(ready)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MESHPILOT_LOG_LEVEL": "WARNING"},
    )
    channels: list[grpc.aio.Channel] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        async with asyncio.timeout(30):
            while not ready.exists():
                if proc.poll() is not None:
                    raise RuntimeError(f"control plane exited: {(workdir / 'control-plane.log').read_text()[-2000:]}")
                await asyncio.sleep(0.05)
        ports = json.loads(ready.read_text())
        api = f"http://127.0.0.1:{ports['api']}"
        ps = psutil.Process(proc.pid)
        t = time.monotonic()
        await _seed(api, args.services, args.endpoints)
        seed_s = time.monotonic() - t
        rss_seeded = ps.memory_info().rss

        clients = [_Client(i, delta) for i in range(args.clients)]
        opts = [("grpc.max_receive_message_length", 256 * 1024 * 1024)]
        for i in range(0, args.clients, args.streams_per_channel):
            channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{ports['xds']}", options=opts))
        cpu0 = ps.cpu_times()
        t = time.monotonic()
        for c in clients:
            ch = channels[c.idx // args.streams_per_channel]
            tasks.append(asyncio.create_task(_run_client(ch, c, args.services)))
        async with asyncio.timeout(args.timeout * 3):
            await asyncio.gather(*(c.synced.wait() for c in clients))
        sync_s = time.monotonic() - t
        sync_cpu = _cpu(ps) - (cpu0.user + cpu0.system)
        hwm_sync = _peak_rss(proc.pid)

        async with ClientSession() as s:
            # one endpoint change
            marker = _marker_address(1)
            for c in clients:
                c.marker, c.seen_at = marker.encode(), None
            cpu1 = _cpu(ps)
            t0 = time.monotonic()
            body = {"id": "perf-single", "address": marker, "ports": {"http": 8080}}
            async with s.post(f"{api}/v1/services/default/svc0/instances", json=body) as r:
                assert r.status == 201, await r.text()
            single = await _wait_seen(clients, t0, args.timeout)
            single_cpu = _cpu(ps) - cpu1
            hwm_single = _peak_rss(proc.pid)

            # a burst of registrations, one after another
            last = _marker_address(2 + args.burst - 1)
            for c in clients:
                c.marker, c.seen_at = last.encode(), None
            cpu2 = _cpu(ps)
            t0 = time.monotonic()
            for n in range(args.burst):
                svc = n % args.services
                body = {"id": f"perf-burst-{n}", "address": _marker_address(2 + n), "ports": {"http": 8080}}
                async with s.post(f"{api}/v1/services/default/svc{svc}/instances", json=body) as r:
                    assert r.status == 201, await r.text()
            t_last = time.monotonic()
            burst = await _wait_seen(clients, t0, args.timeout)
            burst_cpu = _cpu(ps) - cpu2
        errors = sorted({c.error for c in clients if c.error})
        return {
            "variant": "delta" if delta else "sotw",
            "clients": args.clients,
            "services": args.services,
            "endpoints_per_service": args.endpoints,
            "seed_seconds": round(seed_s, 2),
            "initial_sync_seconds": round(sync_s, 2),
            "initial_sync_cpu_seconds": round(sync_cpu, 2),
            "single_change": {**_percentiles(single), "received": len(single), "cpu_seconds": round(single_cpu, 3)},
            "burst": {
                "registrations": args.burst,
                "write_seconds": round(t_last - t0, 3),
                "from_first_write": {**_percentiles(burst), "received": len(burst)},
                "from_last_write": _percentiles([max(0.0, b - (t_last - t0)) for b in burst]),
                "cpu_seconds": round(burst_cpu, 3),
            },
            "rss_before_clients_mb": round(rss_seeded / 2**20, 1),
            "rss_end_mb": round(ps.memory_info().rss / 2**20, 1),
            "peak_rss_mb": round(_peak_rss(proc.pid) / 2**20, 1),
            "peak_rss_mb_by_phase": {
                "initial_sync": round(hwm_sync / 2**20, 1),
                "single_change": round(hwm_single / 2**20, 1),
            },
            "stream_errors": errors,
        }
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in channels:
            await ch.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


async def _wait_seen(clients: list[_Client], t0: float, timeout: float) -> list[float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(c.seen_at is not None for c in clients):
            break
        await asyncio.sleep(0.005)
    return [c.seen_at - t0 for c in clients if c.seen_at is not None]


def _cpu(ps: psutil.Process) -> float:
    t = ps.cpu_times()
    return t.user + t.system


def _peak_rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main(args: argparse.Namespace) -> int:
    results = []
    for v in [x.strip() for x in args.variants.split(",") if x.strip()]:
        if v not in ("delta", "sotw"):
            print(f"meshpilot perf xds: unknown variant {v!r} (delta, sotw)", file=sys.stderr)
            return 2
        try:
            import uvloop

            results.append(uvloop.run(_variant(args, v == "delta")))
        except ImportError:  # pragma: no cover
            results.append(asyncio.run(_variant(args, v == "delta")))
    report = {"benchmark": "xds_push", "machine_cpus": os.cpu_count(), "targets": {"p99_seconds": 1.0, "peak_rss_mb": 500}, "results": results}
    print(json.dumps(report, indent=2))
    for r in results:
        print(
            f"xds push [{r['variant']}] {r['clients']} clients, {r['services']}x{r['endpoints_per_service']}: "
            f"single change p50 {r['single_change']['p50']}s p99 {r['single_change']['p99']}s max {r['single_change']['max']}s; "
            f"burst of {r['burst']['registrations']} (written in {r['burst']['write_seconds']}s) p99 {r['burst']['from_first_write']['p99']}s "
            f"from first write, {r['burst']['from_last_write']['p99']}s from last; peak RSS {r['peak_rss_mb']} MB",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
