"""``meshpilot perf xds-abuse``: whether abusive xDS clients delay anyone else.

The harness starts a real control plane (``meshpilot serve``, in-memory store) as a subprocess,
creates S services through the management API, then runs two phases:

- **dead readers**: N ADS streams (grpc.aio, sotw) subscribe to every cluster and every endpoint,
  then never read a response or answer one. Right behind them a well-behaved client connects, and
  the time to its first clusters and endpoints is measured; a second one connects once the server
  has sent every dead stream its first response. Then the harness waits (``--wait-closed`` seconds
  at most) for the server to close the N streams (``--write-timeout`` sets the server's deadline),
  and reads one of them to report the status it ended with.
- **huge requests**: K clients each send one endpoint request of ``--huge-mb`` MB (names of
  ``--name-bytes`` bytes) on their own connection, while the management API is polled every 50 ms;
  the API's worst and median latency, and the status each huge request got, are reported.

Output: JSON on stdout and a one-line summary on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from typing import Any

import grpc
import psutil
from aiohttp import ClientSession
from envoy.service.discovery.v3 import discovery_pb2

from meshpilot.perf.served import control_plane, seed
from meshpilot.xds.resource import TYPE

__all__ = ["add_arguments", "main"]

_SOTW = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dead", type=int, default=640, help="ADS streams that never read (default 640; 0 skips the phase)")
    p.add_argument("--services", type=int, default=300, help="services in the mesh (default 300)")
    p.add_argument("--streams-per-channel", type=int, default=32)
    p.add_argument("--huge", type=int, default=4, help="clients sending one huge request each (default 4; 0 skips the phase)")
    p.add_argument("--huge-mb", type=float, default=12.5, help="size of each huge request in MB (default 12.5)")
    p.add_argument("--name-bytes", type=int, default=8, help="length of each resource name in a huge request")
    p.add_argument("--write-timeout", type=float, default=10.0, help="the server's xds_write_timeout_s (default 10)")
    p.add_argument("--wait-closed", type=float, default=40.0, help="how long to wait for the server to close dead streams")
    p.add_argument("--timeout", type=float, default=120.0, help="give up waiting for a first config after this many seconds")


def _sotw_call(ch: grpc.aio.Channel) -> Any:
    return ch.stream_stream(_SOTW, request_serializer=lambda b: b, response_deserializer=lambda b: b)()


def _request(node: str, type_url: str, names: Sequence[str] = (), nonce: str = "", version: str = "") -> bytes:
    req = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names, response_nonce=nonce, version_info=version)
    if node:
        req.node.id, req.node.cluster = node, "perf"
    data: bytes = req.SerializeToString()
    return data


async def _dead_reader(ch: grpc.aio.Channel, idx: int, names: list[str]) -> Any:
    call = _sotw_call(ch)
    await call.write(_request(f"dead-{idx}", TYPE.CLUSTER))
    await call.write(_request("", TYPE.ENDPOINT, names))
    return call


async def _first_config(port: int, names: list[str]) -> tuple[float, float]:
    """Seconds to the first clusters and to the first endpoints of a client that reads and ACKs."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 256 * 2**20)]) as ch:
        call = _sotw_call(ch)
        t0 = time.monotonic()
        await call.write(_request("reader", TYPE.CLUSTER))
        await call.write(_request("", TYPE.ENDPOINT, names))
        got: dict[str, float] = {}
        while len(got) < 2:
            raw = await call.read()
            if raw is grpc.aio.EOF:
                raise RuntimeError("the reading client's stream ended")
            resp = discovery_pb2.DiscoveryResponse.FromString(raw)
            got.setdefault(resp.type_url, time.monotonic() - t0)
            names_ = names if resp.type_url == TYPE.ENDPOINT else []
            await call.write(_request("", resp.type_url, names_, resp.nonce, resp.version_info))
        call.cancel()
        return got[TYPE.CLUSTER], got[TYPE.ENDPOINT]


async def _dead_streams(s: ClientSession, api: str) -> tuple[int, int]:
    """(dead streams the server holds, how many of them it has sent a response)."""
    async with s.get(f"{api}/v1/proxies") as r:
        proxies = await r.json()
    dead = [p for p in proxies if p["node_id"].startswith("dead-")]
    return len(dead), sum(1 for p in dead if p["pushes"] > 0)


async def _status_after_reading(call: Any) -> str:
    try:
        async with asyncio.timeout(10):
            while await call.read() is not grpc.aio.EOF:
                pass
    except grpc.aio.AioRpcError as e:
        return f"{e.code().name}: {e.details()}"
    except TimeoutError:
        return "still open"
    return "OK"


def _huge_payload(mb: float, name_bytes: int) -> bytes:
    count = int(mb * 2**20) // (name_bytes + 2)
    return _request("huge", TYPE.ENDPOINT, [f"{i:0{name_bytes}d}"[-name_bytes:] for i in range(count)])


async def _huge_request(port: int, payload: bytes) -> str:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1)]) as ch:
        call = _sotw_call(ch)
        try:
            await call.write(payload)
            async with asyncio.timeout(60):
                await call.read()
            return "answered"
        except grpc.aio.AioRpcError as e:
            return f"{e.code().name}: {e.details()}"
        except TimeoutError:
            return "no answer within 60 s"
        finally:
            call.cancel()


def _poll_api(api: str, stop: threading.Event, latencies: list[float]) -> None:
    """GET /v1/services every 50 ms, on its own thread so the harness's own loop cannot delay it."""
    while not stop.is_set():
        t = time.monotonic()
        with urllib.request.urlopen(f"{api}/v1/services", timeout=120) as r:
            r.read()
        latencies.append(time.monotonic() - t)
        stop.wait(0.05)


async def _dead_readers(args: argparse.Namespace, api: str, port: int, names: list[str], ps: psutil.Process) -> dict[str, Any]:
    alone_cds, alone_eds = await _first_config(port, names)
    rss = [ps.memory_info().rss]
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(0, args.dead, args.streams_per_channel)]
    try:
        t_open = time.monotonic()
        calls = await asyncio.gather(*(_dead_reader(channels[i // args.streams_per_channel], i, names) for i in range(args.dead)))
        async with asyncio.timeout(args.timeout):
            cds_s, eds_s = await _first_config(port, names)
        async with ClientSession() as s:
            async with asyncio.timeout(args.timeout):
                while (await _dead_streams(s, api))[1] < args.dead:
                    await asyncio.sleep(0.1)
            all_pushed_s = time.monotonic() - t_open
            rss.append(ps.memory_info().rss)
            async with asyncio.timeout(args.timeout):
                later_cds, later_eds = await _first_config(port, names)
            held = args.dead
            while time.monotonic() - t_open < args.wait_closed and held:
                await asyncio.sleep(0.25)
                held = (await _dead_streams(s, api))[0]
            closed_s = time.monotonic() - t_open
            rss.append(ps.memory_info().rss)
        status = await _status_after_reading(calls[0])
        for c in calls:
            c.cancel()
    finally:
        for ch in channels:
            await ch.close()
    return {
        "streams": args.dead,
        "first_config_alone_seconds": {"clusters": round(alone_cds, 3), "endpoints": round(alone_eds, 3)},
        "first_config_seconds": {"clusters": round(cds_s, 3), "endpoints": round(eds_s, 3)},
        "all_dead_streams_sent_a_response_after_seconds": round(all_pushed_s, 2),
        "first_config_after_that_seconds": {"clusters": round(later_cds, 3), "endpoints": round(later_eds, 3)},
        "server_write_timeout_seconds": args.write_timeout,
        "closed_by_server": args.dead - held,
        "closed_after_seconds": round(closed_s, 1),
        "status_a_dead_stream_reads": status,
        "control_plane_rss_mb": dict(zip(("before", "all_sent_a_response", "after_closing"), (round(r / 2**20, 1) for r in rss))),
    }


async def _huge_requests(args: argparse.Namespace, api: str, port: int) -> dict[str, Any]:
    payload = _huge_payload(args.huge_mb, args.name_bytes)
    stop = threading.Event()
    latencies: list[float] = []
    poller = threading.Thread(target=_poll_api, args=(api, stop, latencies))
    poller.start()
    try:
        await asyncio.sleep(0.5)
        t = time.monotonic()
        outcomes = await asyncio.gather(*(_huge_request(port, payload) for _ in range(args.huge)))
        huge_s = time.monotonic() - t
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.to_thread(poller.join)
    return {
        "clients": args.huge,
        "mb_each": args.huge_mb,
        "names_each": int(args.huge_mb * 2**20) // (args.name_bytes + 2),
        "outcomes": sorted(set(outcomes)),
        "seconds": round(huge_s, 2),
        "api_latency_seconds": {
            "median": round(statistics.median(latencies), 3),
            "max": round(max(latencies), 3),
            "samples": len(latencies),
        },
    }


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    with control_plane(env={"MESHPILOT_XDS_WRITE_TIMEOUT_S": str(args.write_timeout)}) as cp:
        await seed(cp.api, args.services, 1)
        names = [f"outbound|80||svc{i}.default.svc.mesh" for i in range(args.services)]
        out: dict[str, Any] = {"services": args.services}
        if args.dead:
            out["dead_readers"] = await _dead_readers(args, cp.api, cp.ports["xds"], names, psutil.Process(cp.proc.pid))
        if args.huge:
            out["huge_requests"] = await _huge_requests(args, cp.api, cp.ports["xds"])
        return out


def main(args: argparse.Namespace) -> int:
    import uvloop

    r = uvloop.run(_run(args))
    print(json.dumps({"benchmark": "xds_abuse", "machine_cpus": os.cpu_count(), "result": r}, indent=2))
    parts = []
    if "dead_readers" in r:
        d = r["dead_readers"]
        parts.append(
            f"first config right behind {d['streams']} dead readers: clusters {d['first_config_seconds']['clusters']}s, "
            f"endpoints {d['first_config_seconds']['endpoints']}s (alone {d['first_config_alone_seconds']['endpoints']}s; "
            f"once all were sent a response, after {d['all_dead_streams_sent_a_response_after_seconds']}s: "
            f"{d['first_config_after_that_seconds']['endpoints']}s); {d['closed_by_server']} closed by the server after "
            f"{d['closed_after_seconds']}s"
        )
    if "huge_requests" in r:
        h = r["huge_requests"]
        parts.append(
            f"{h['clients']} requests of {h['mb_each']} MB: API latency max {h['api_latency_seconds']['max']}s "
            f"median {h['api_latency_seconds']['median']}s, outcomes {h['outcomes']}"
        )
    print("xds abuse: " + "; ".join(parts), file=sys.stderr)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
