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

A stream that fails (the server refuses or ends it) is opened again the way Envoy does it: after
a jittered exponential back-off (a random delay below 500 ms, doubled per failure up to 30 s, back
to 500 ms once a response arrives), subscribing to what it followed (sotw: with the version of each
type it holds). Failures are counted by status code in the report.

Control-plane CPU seconds (for each phase) and peak RSS come from the kernel (psutil,
/proc/<pid>/status VmHWM). The clients share the machine with the control plane, so latencies
include their load; ``--cp-cpus``/``--client-cpus`` pin each side to its own cores, and the CPU
seconds are the control plane's own either way.

``--churn R`` measures something else, with real Envoys (``--envoys``, sotw or delta): R rounds of
two writes sent back to back, a service update (a new ``connect_timeout_ms``, so its cluster is
re-created and warms in Envoy) and a new instance of another service, and per round the time from
the last write until the last Envoy has applied both (its CDS update counted, no cluster warming,
the other service's membership grown by one; read from each Envoy's admin /stats every 10 ms).

Output: JSON on stdout and a one-line summary on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
import uvloop
from aiohttp import ClientSession
from envoy.service.discovery.v3 import discovery_pb2

from meshpilot.perf.served import Served, control_plane, seed
from meshpilot.xds.resource import TYPE

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
    p.add_argument("--cp-cpus", default="", help="pin the control plane to these CPUs (e.g. 0 or 0,1)")
    p.add_argument("--client-cpus", default="", help="pin the simulated clients (this process) to these CPUs")
    p.add_argument("--timeout", type=float, default=120.0, help="give up waiting for a phase after this many seconds")
    p.add_argument("--churn", type=int, default=0, metavar="ROUNDS",
                   help="instead: ROUNDS of a service update beside another service's new instance, to real Envoys")
    p.add_argument("--envoys", type=int, default=10, help="real Envoys for --churn (default 10)")
    p.add_argument("--round-timeout", type=float, default=20.0, help="--churn: give up on a round after this many seconds")


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
    error: str = ""  # the last failure's status and details
    eds_names: list[str] = field(default_factory=list)  # the endpoint names subscribed
    failures: dict[str, int] = field(default_factory=dict)  # status code -> streams of this client that failed
    versions: dict[str, str] = field(default_factory=dict)  # sotw: type -> version_info held, to resume with


class Backoff:
    """Envoy's xDS retry back-off (JitteredExponentialBackOffStrategy, 500 ms base, 30 s cap): each
    delay is uniformly random below an interval that doubles per failure, up to the cap; a response
    received resets it."""

    __slots__ = ("base_s", "cap_s", "_interval", "_random")

    def __init__(self, base_s: float = 0.5, cap_s: float = 30.0, rng: random.Random | None = None) -> None:
        self.base_s, self.cap_s = base_s, cap_s
        self._interval = base_s
        self._random = rng or random.Random()

    def next_delay(self) -> float:
        interval = self._interval
        self._interval = min(self.cap_s, interval * 2)
        return min(self._random.random() * interval, self.cap_s)

    def reset(self) -> None:
        self._interval = self.base_s


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    v = sorted(values)
    return {
        "p50": round(v[len(v) // 2], 4),
        "p99": round(v[min(len(v) - 1, int(len(v) * 0.99))], 4),
        "max": round(v[-1], 4),
    }


def _rounded(values: list[float]) -> list[float]:
    """Every sample, sorted, to 0.1 ms: the report's CDFs (perf/report.py) are drawn from them."""
    return [round(v, 4) for v in sorted(values)]


async def _run_client(ch: grpc.aio.Channel, c: _Client, want_clusters: int) -> None:
    """One simulated Envoy: a stream, opened again after a back-off whenever it fails, until cancelled."""
    backoff = Backoff()
    while True:
        try:
            await _stream(ch, c, want_clusters, backoff)
            code = "EOF"  # the server ended the stream without a status error
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
            c.error = f"{code}: {exc.details()}"
        except asyncio.InvalidStateError:  # grpc.aio: a write to a call that has just ended
            code = "ENDED"
        c.failures[code] = c.failures.get(code, 0) + 1
        await asyncio.sleep(backoff.next_delay())


async def _stream(ch: grpc.aio.Channel, c: _Client, want_clusters: int, backoff: Backoff) -> None:
    method = _DELTA if c.delta else _SOTW
    req_type = discovery_pb2.DeltaDiscoveryRequest if c.delta else discovery_pb2.DiscoveryRequest
    resp_type = discovery_pb2.DeltaDiscoveryResponse if c.delta else discovery_pb2.DiscoveryResponse
    call = ch.stream_stream(method, request_serializer=req_type.SerializeToString, response_deserializer=lambda b: b)()
    node = {"id": f"perf-{c.idx}", "cluster": "perf"}
    try:
        await _subscribe(call, c, req_type, node)
        eds_names = list(c.eds_names)
        while True:
            raw = await call.read()
            if not isinstance(raw, bytes):  # grpc.aio.EOF; every message is bytes (identity deserializer)
                return
            backoff.reset()
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
                    c.versions[TYPE.CLUSTER] = resp.version_info
                await call.write(ack)
                known = set(eds_names)
                new = [n for n in names if n not in known]
                if new:
                    eds_names.extend(new)
                    c.eds_names = eds_names
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
                    c.versions[TYPE.ENDPOINT] = resp.version_info
                    await call.write(req_type(type_url=TYPE.ENDPOINT, response_nonce=resp.nonce, version_info=resp.version_info, resource_names=eds_names))
                if c.clusters >= want_clusters:
                    c.synced.set()
    finally:
        call.cancel()


async def _subscribe(call: Any, c: _Client, req_type: Any, node: dict[str, str]) -> None:
    """The first requests of a stream: clusters, and, on a stream opened again, the endpoints the
    client already follows; sotw with the versions it holds, as Envoy resumes. A delta client is
    sent everything again (it does not keep each resource's version: decoding every resource of
    every response cost the clients more CPU than the control plane spends on them)."""
    if c.delta:
        await call.write(req_type(type_url=TYPE.CLUSTER, node=node))
        if c.eds_names:
            await call.write(req_type(type_url=TYPE.ENDPOINT, resource_names_subscribe=c.eds_names))
    else:
        await call.write(req_type(type_url=TYPE.CLUSTER, node=node, version_info=c.versions.get(TYPE.CLUSTER, "")))
        if c.eds_names:
            await call.write(req_type(type_url=TYPE.ENDPOINT, resource_names=c.eds_names, version_info=c.versions.get(TYPE.ENDPOINT, "")))


def _cluster_name(cluster_bytes: bytes) -> str:
    from envoy.config.cluster.v3 import cluster_pb2

    name: str = cluster_pb2.Cluster.FromString(cluster_bytes).name
    return name




# Writes (path, JSON body) read from stdin, one after another, to the API given as argv[1]; prints
# [monotonic time of the first write, of the last write's answer, each write's seconds]. CLOCK_MONOTONIC
# is the same in every process of the machine.
_WRITER = """
import json, sys, time, urllib.request
api, writes, took = sys.argv[1], json.load(sys.stdin), []
t0 = time.monotonic()
for path, body in writes:
    t = time.monotonic()
    req = urllib.request.Request(api + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        if r.status != 201:
            sys.exit(f"{path}: {r.status} {r.read()[:500]!r}")
    took.append(time.monotonic() - t)
print(json.dumps([t0, time.monotonic(), took]))
"""


def _marker_address(n: int) -> str:
    return f"10.250.{(n >> 8) & 255}.{n & 255}"


async def _variant(args: argparse.Namespace, delta: bool) -> dict[str, Any]:
    load0 = _loadavg()
    with control_plane() as cp:
        proc, ports, api = cp.proc, cp.ports, cp.api
        channels: list[grpc.aio.Channel] = []
        tasks: list[asyncio.Task[None]] = []
        try:
            ps = psutil.Process(proc.pid)
            if args.cp_cpus:
                _pin(proc.pid, args.cp_cpus)
            if args.client_cpus:
                _pin(os.getpid(), args.client_cpus)
            t = time.monotonic()
            await seed(api, args.services, args.endpoints)
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
            rss_synced = ps.memory_info().rss

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
                rebuilds0 = await _rebuilds(s, api)
                cpu2 = _cpu(ps)
                writes = [
                    (f"/v1/services/default/svc{n % args.services}/instances",
                     {"id": f"perf-burst-{n}", "address": _marker_address(2 + n), "ports": {"http": 8080}})
                    for n in range(args.burst)
                ]
                # from another process: the simulated clients keep this one's loop busy, and a write
                # that waits for them looks like a pause in the burst to the control plane's debounce
                writer = await asyncio.create_subprocess_exec(
                    sys.executable, "-c", _WRITER, api, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                )
                out, _ = await writer.communicate(json.dumps(writes).encode())
                if writer.returncode != 0:
                    raise RuntimeError(f"the burst writer failed: {out.decode()[-2000:]}")
                t0, t_last, write_s = json.loads(out)
                burst = await _wait_seen(clients, t0, args.timeout)
                burst_cpu = _cpu(ps) - cpu2
                publications = await _rebuilds(s, api) - rebuilds0
            by_code: dict[str, int] = {}
            for c in clients:
                for code, n in c.failures.items():
                    by_code[code] = by_code.get(code, 0) + n
            return {
                "variant": "delta" if delta else "sotw",
                "clients": args.clients,
                "services": args.services,
                "endpoints_per_service": args.endpoints,
                "seed_seconds": round(seed_s, 2),
                "initial_sync_seconds": round(sync_s, 2),
                "initial_sync_cpu_seconds": round(sync_cpu, 2),
                "single_change": {**_percentiles(single), "received": len(single), "cpu_seconds": round(single_cpu, 3),
                                  "samples_s": _rounded(single)},
                "burst": {
                    "registrations": args.burst,
                    "write_seconds": round(t_last - t0, 3),
                    "from_first_write": {**_percentiles(burst), "received": len(burst)},
                    "from_last_write": _percentiles([max(0.0, b - (t_last - t0)) for b in burst]),
                    "samples_from_first_write_s": _rounded(burst),
                    "samples_from_last_write_s": _rounded([max(0.0, b - (t_last - t0)) for b in burst]),
                    "publications": publications,
                    "write_latency": _percentiles(write_s),
                    "slowest_writes": [round(w, 3) for w in sorted(write_s)[-5:]],
                    "cpu_seconds": round(burst_cpu, 3),
                },
                "rss_before_clients_mb": round(rss_seeded / 2**20, 1),
                "rss_per_stream_kb": round((rss_synced - rss_seeded) / args.clients / 1024, 1),
                "cpu_seconds_per_change": {
                    "single": round(single_cpu, 3),
                    "burst_per_registration": round(burst_cpu / max(1, args.burst), 4),
                },
                "pinned": {"control_plane": args.cp_cpus or "any", "clients": args.client_cpus or "any"},
                "loadavg": {"start": load0, "end": _loadavg()},
                "rss_end_mb": round(ps.memory_info().rss / 2**20, 1),
                "peak_rss_mb": round(_peak_rss(proc.pid) / 2**20, 1),
                "peak_rss_mb_by_phase": {
                    "initial_sync": round(hwm_sync / 2**20, 1),
                    "single_change": round(hwm_single / 2**20, 1),
                },
                "stream_failures": {
                    "total": sum(by_code.values()),
                    "by_code": dict(sorted(by_code.items())),
                    "clients": sum(1 for c in clients if c.failures),
                    "examples": sorted({c.error for c in clients if c.error})[:5],
                },
            }
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for ch in channels:
                await ch.close()




_WARMING, _CDS_UPDATES = "cluster_manager.warming_clusters", "cluster_manager.cds.update_success"


async def start_envoys(envoys: list[Any], workdir: Path, xds_port: int, count: int, delta: bool, name: str) -> None:
    """Start ``count`` real Envoys (``<name>-<i>``, outbound listener only) on the control plane at
    ``xds_port``, appending each to ``envoys`` as it runs (so the caller stops those that started)."""
    from meshpilot.translate.bootstrap import BootstrapOptions, build_bootstrap
    from meshpilot.wasm import testbed

    for i in range(count):
        out = testbed.free_port()
        boot = build_bootstrap(BootstrapOptions(
            node_id=f"{name}-{i}", service=name, control_plane_port=xds_port, api_type="DELTA_GRPC" if delta else "GRPC",
            admin_port=0, outbound_port=out, inbound_port=0,
        ))
        (workdir / f"envoy-{i}").mkdir()
        envoys.append(await asyncio.to_thread(testbed.Envoy(boot, out, workdir=workdir / f"envoy-{i}").start))


async def _envoy_stats(s: ClientSession, admin: str, service: str) -> dict[str, int]:
    """The warming gauge, the CDS update counter and ``service``'s membership, from one /stats call."""
    members = f"cluster.outbound|80||{service}_default_svc_mesh.membership_total"
    pattern = "|".join(f"^{re.escape(n)}$" for n in (_WARMING, _CDS_UPDATES, members))
    async with s.get(f"http://{admin}/stats", params={"filter": pattern}) as r:
        text = await r.text()
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit():
            out["members" if name == members else name] = int(value)
    return out


async def _churn(args: argparse.Namespace, delta: bool) -> dict[str, Any]:
    with control_plane("meshpilot-perf-churn-") as cp:
        return await _churn_served(args, delta, cp)


async def _churn_served(args: argparse.Namespace, delta: bool, cp: Served) -> dict[str, Any]:
    from meshpilot.wasm import testbed

    workdir, ports, api = cp.workdir, cp.ports, cp.api
    envoys: list[testbed.Envoy] = []
    services = max(2, args.services)
    try:
        await seed(api, services, args.endpoints)
        await start_envoys(envoys, workdir, ports["xds"], args.envoys, delta, "churn")
        members = {f"svc{i}": args.endpoints for i in range(services)}
        last_envoy: list[float] = []
        every: list[float] = []
        late = 0
        async with ClientSession() as s:
            for r in range(args.churn):
                a, b = f"svc{(2 * r) % services}", f"svc{(2 * r + 1) % services}"
                before = [(await _envoy_stats(s, e.admin, b)).get(_CDS_UPDATES, 0) for e in envoys]
                update = {"ports": [{"name": "http", "port": 80}], "traffic": {"connect_timeout_ms": 1500 + r}}  # never the default
                async with s.put(f"{api}/v1/services/default/{a}", json=update) as resp:
                    assert resp.status == 200, await resp.text()
                body = {"id": f"churn-{r}", "address": _marker_address(r), "ports": {"http": 8080}}
                async with s.post(f"{api}/v1/services/default/{b}/instances", json=body) as resp:
                    assert resp.status == 201, await resp.text()
                t_last = time.monotonic()
                members[b] += 1

                async def applied(e: testbed.Envoy, cds_before: int, service: str = b, want: int = members[b]) -> float | None:
                    while time.monotonic() - t_last < args.round_timeout:
                        st = await _envoy_stats(s, e.admin, service)
                        if st.get(_CDS_UPDATES, 0) > cds_before and st.get(_WARMING, 1) == 0 and st.get("members") == want:
                            return time.monotonic() - t_last
                        await asyncio.sleep(0.01)
                    return None

                took = await asyncio.gather(*(applied(e, c) for e, c in zip(envoys, before)))
                done = [t for t in took if t is not None]
                late += len(took) - len(done)
                every.extend(done)
                last_envoy.append(max(done) if len(done) == len(took) else float(args.round_timeout))
        return {
            "variant": "delta" if delta else "sotw",
            "envoys": args.envoys,
            "services": services,
            "rounds": args.churn,
            "writes": 2 * args.churn,
            "last_write_to_last_envoy": _percentiles(last_envoy),
            "last_write_to_each_envoy": _percentiles(every),
            "envoy_rounds_timed_out": late,
            "samples": {"last_write_to_last_envoy_s": _rounded(last_envoy), "last_write_to_each_envoy_s": _rounded(every)},
        }
    finally:
        for e in envoys:
            e.stop()


async def _wait_seen(clients: list[_Client], t0: float, timeout: float) -> list[float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(c.seen_at is not None for c in clients):
            break
        await asyncio.sleep(0.005)
    return [c.seen_at - t0 for c in clients if c.seen_at is not None]


async def _rebuilds(s: ClientSession, api: str) -> int:
    """The control plane's publications so far (meshpilot_translate_rebuilds_total)."""
    async with s.get(f"{api}/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith("meshpilot_translate_rebuilds_total "):
            return int(float(line.split()[1]))
    return 0


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return ""


def _pin(pid: int, cpus: str) -> None:
    """Every thread of ``pid`` (threads it starts later inherit it) to the CPUs ``cpus`` ("0", "0,1")."""
    want = {int(x) for x in cpus.split(",") if x.strip()}
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), want)


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
    run = _churn if args.churn > 0 else _variant
    for v in [x.strip() for x in args.variants.split(",") if x.strip()]:
        if v not in ("delta", "sotw"):
            print(f"meshpilot perf xds: unknown variant {v!r} (delta, sotw)", file=sys.stderr)
            return 2
        results.append(uvloop.run(run(args, v == "delta")))
    if args.churn > 0:
        print(json.dumps({"benchmark": "xds_churn", "machine_cpus": os.cpu_count(), "targets": {"p99_seconds": 0.5}, "results": results}, indent=2))
        for r in results:
            w = r["last_write_to_last_envoy"]
            print(
                f"xds churn [{r['variant']}] {r['envoys']} Envoys, {r['rounds']} rounds ({r['writes']} writes): last write to last Envoy "
                f"p50 {w['p50']}s p99 {w['p99']}s max {w['max']}s; Envoy-rounds timed out: {r['envoy_rounds_timed_out']}",
                file=sys.stderr,
            )
        return 0
    report = {"benchmark": "xds_push", "machine_cpus": os.cpu_count(), "targets": {"p99_seconds": 1.0, "peak_rss_mb": 500}, "results": results}
    print(json.dumps(report, indent=2))
    for r in results:
        print(
            f"xds push [{r['variant']}] {r['clients']} clients, {r['services']}x{r['endpoints_per_service']}: "
            f"single change p50 {r['single_change']['p50']}s p99 {r['single_change']['p99']}s max {r['single_change']['max']}s; "
            f"burst of {r['burst']['registrations']} (written in {r['burst']['write_seconds']}s) p99 {r['burst']['from_first_write']['p99']}s "
            f"from first write, {r['burst']['from_last_write']['p99']}s from last, {r['burst']['publications']} publications; peak RSS {r['peak_rss_mb']} MB; "
            f"CPU {r['cpu_seconds_per_change']['single']}s per single change; stream failures {r['stream_failures']['total']} "
            f"{r['stream_failures']['by_code']}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
