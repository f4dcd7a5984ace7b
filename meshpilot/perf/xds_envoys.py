"""``meshpilot perf xds-envoys``: single changes and a burst to N real Envoys, timed from the write to
each Envoy's ACK of the new endpoints (the control plane's ``/synced`` route, polled; Envoy ACKs once
it has applied them). Envoy's admin ``/stats`` costs ~50 ms per read at 1,000 clusters, too much to
poll twenty of them, so it is read once after each phase to check that every Envoy holds the new
endpoints. Single changes come ``--gap`` apart (an idle control plane: the debounce's leading edge);
then a burst of ``--burst`` registrations one after another, timed from the last write to the last
Envoy's ACK. Publications are ``meshpilot_translate_rebuilds_total``. Reuses the harness's served
control plane and seed (perf/served.py) and the xDS benchmark's Envoy stats reader (perf/xds_push.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from typing import Any

import uvloop
from aiohttp import ClientSession

from meshpilot.perf.served import control_plane, seed
from meshpilot.perf.xds_push import _WARMING, _envoy_stats, _marker_address, _percentiles, _rounded, start_envoys
from meshpilot.wasm import testbed

__all__ = ["add_arguments", "main"]


async def _rebuilds(s: ClientSession, api: str) -> float:
    async with s.get(f"{api}/metrics") as r:
        text = await r.text()
    m = re.search(r"^meshpilot_translate_rebuilds_total (\S+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


async def run(args: argparse.Namespace, delta: bool) -> dict[str, Any]:
    with control_plane("meshpilot-perf-single-") as cp:
        workdir, ports, api = cp.workdir, cp.ports, cp.api
        envoys: list[testbed.Envoy] = []
        try:
            await seed(api, args.services, args.endpoints)
            await start_envoys(envoys, workdir, ports["xds"], args.envoys, delta, "single")
            members = {f"svc{i}": args.endpoints for i in range(args.services)}
            async with ClientSession() as s:

                async def reach(e: testbed.Envoy, service: str, want: int, t0: float, limit: float) -> float | None:
                    while time.monotonic() - t0 < limit:
                        st = await _envoy_stats(s, e.admin, service)
                        if st.get("members") == want and st.get(_WARMING, 1) == 0:
                            return time.monotonic() - t0
                        await asyncio.sleep(args.poll)
                    return None

                t = time.monotonic()
                ready = await asyncio.gather(*(reach(e, f"svc{args.services - 1}", args.endpoints, t, 300) for e in envoys))
                assert all(r is not None for r in ready), "Envoys did not sync"
                t = time.monotonic()
                await _envoy_stats(s, envoys[0].admin, "svc0")
                stats_call_s = time.monotonic() - t
                await asyncio.sleep(1.0)
                nodes = {f"single-{i}" for i in range(len(envoys))}

                async def acked(svc: str, t0: float) -> tuple[float | None, list[float]]:
                    """Poll the control plane's /synced (the consuming Envoys' ACKs of the service's
                    current endpoints): when each Envoy and the last one ACKed the new version."""
                    seen: dict[str, float] = {}
                    while time.monotonic() - t0 < args.round_timeout:
                        async with s.get(f"{api}/v1/services/default/{svc}/synced") as resp:
                            j = await resp.json()
                        now = time.monotonic() - t0
                        if not j["publishing"]:
                            for n in nodes - set(j["pending"]) - set(seen):
                                seen[n] = now
                            if j["synced"] and j["consumers"] >= len(nodes):
                                return now, list(seen.values())
                        await asyncio.sleep(args.poll)
                    return None, list(seen.values())

                last_envoy: list[float] = []
                every: list[float] = []
                r0 = await _rebuilds(s, api)
                for r in range(args.rounds):
                    svc = f"svc{(7 * r) % args.services}"
                    members[svc] += 1
                    body = {"id": f"single-{r}", "address": _marker_address(r), "ports": {"http": 8080}}
                    t0 = time.monotonic()
                    async with s.post(f"{api}/v1/services/default/{svc}/instances", json=body) as resp:
                        assert resp.status == 201, await resp.text()
                    last, each = await acked(svc, t0)
                    every.extend(each)
                    last_envoy.append(last if last is not None else args.round_timeout)
                    await asyncio.sleep(args.gap)
                single_rebuilds = await _rebuilds(s, api) - r0
                check = await asyncio.gather(*(reach(e, svc, members[svc], time.monotonic(), 30) for e in envoys))
                assert all(c is not None for c in check), "an Envoy does not hold the last round's endpoints"

                r0 = await _rebuilds(s, api)
                t0 = time.monotonic()
                for n in range(args.burst):
                    svc = f"svc{n % args.services}"
                    members[svc] += 1
                    body = {"id": f"burst-{n}", "address": _marker_address(1000 + n), "ports": {"http": 8080}}
                    async with s.post(f"{api}/v1/services/default/{svc}/instances", json=body) as resp:
                        assert resp.status == 201, await resp.text()
                t_last = time.monotonic()
                last_svc = f"svc{(args.burst - 1) % args.services}"
                burst_last, _ = await acked(last_svc, t_last)
                await asyncio.sleep(1.5)  # room for a late publication to be counted
                burst_rebuilds = await _rebuilds(s, api) - r0
                check = await asyncio.gather(*(reach(e, last_svc, members[last_svc], time.monotonic(), 30) for e in envoys))
                assert all(c is not None for c in check), "an Envoy does not hold the burst's endpoints"
            return {
                "variant": "delta" if delta else "sotw",
                "envoys": args.envoys,
                "services": args.services,
                "endpoints_per_service": args.endpoints,
                "stats_call_seconds": round(stats_call_s, 4),
                "single_change": {
                    "rounds": args.rounds,
                    "write_to_last_envoy_ack": _percentiles(last_envoy),
                    "write_to_each_envoy_ack": _percentiles(every),
                    "rebuilds": single_rebuilds,
                    "samples": {"write_to_last_envoy_ack_s": _rounded(last_envoy), "write_to_each_envoy_ack_s": _rounded(every)},
                },
                "burst": {
                    "registrations": args.burst,
                    "write_seconds": round(t_last - t0, 3),
                    "last_write_to_last_envoy_ack": None if burst_last is None else round(burst_last, 4),
                    "rebuilds": burst_rebuilds,
                },
            }
        finally:
            for e in envoys:
                e.stop()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--envoys", type=int, default=20)
    p.add_argument("--services", type=int, default=1000)
    p.add_argument("--endpoints", type=int, default=10)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--burst", type=int, default=500)
    p.add_argument("--gap", type=float, default=0.5, help="idle time between single changes")
    p.add_argument("--poll", type=float, default=0.002)
    p.add_argument("--round-timeout", type=float, default=20.0)
    p.add_argument("--variants", default="delta,sotw", help="delta, sotw or both (comma-separated)")
    p.add_argument("--peer", choices=["go-control-plane"],
                   help="instead: meshpilot and this peer side by side, timed from each Envoy's log (perf/xds_peer.py)")


def main(args: argparse.Namespace) -> int:
    if args.peer:
        from meshpilot.perf import xds_peer

        return xds_peer.main(args)
    results = [uvloop.run(run(args, v == "delta")) for v in args.variants.split(",")]
    print(json.dumps({"benchmark": "xds_single_real_envoys", "results": results}, indent=2))
    for r in results:
        sc, b = r["single_change"], r["burst"]
        print(f"[{r['variant']}] {r['envoys']} Envoys {r['services']}x{r['endpoints_per_service']}: single change write->last Envoy "
              f"p50 {sc['write_to_last_envoy_ack']['p50']} p99 {sc['write_to_last_envoy_ack']['p99']} max {sc['write_to_last_envoy_ack']['max']} "
              f"({sc['rounds']} rounds, {sc['rebuilds']} rebuilds); burst {b['registrations']} written in {b['write_seconds']}s, "
              f"last write->last Envoy {b['last_write_to_last_envoy_ack']}s, {b['rebuilds']} rebuilds; stats call {r['stats_call_seconds']}s",
              file=sys.stderr)
    return 0

