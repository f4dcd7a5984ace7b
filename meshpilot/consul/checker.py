"""Runs the checks of Consul-registered services: HTTP and TCP probes, TTL expiry, and
``DeregisterCriticalServiceAfter``.

Consul agents run the checks of the services registered with them; meshpilot is that agent, so the
control plane runs them (one supervised task, probes in a task group with bounded concurrency). With
replicas, each runs only the instances it is the runner of (agent.py), once a second takes over
what a replica that went away ran, and does nothing while its store is not current (a frozen
replica that runs again must not expire TTLs passed meanwhile on another replica).
Results go into the registry as checks owned by ``consul``, which is what moves an instance in and
out of EDS. HTTP: 2xx passing, 429 warning, anything else critical (as Consul does).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time

import aiohttp

from meshpilot.consul.agent import OWNER, ConsulAgent
from meshpilot.consul.definitions import CheckDef
from meshpilot.registry import RegistryError

__all__ = ["run_checks"]

log = logging.getLogger("meshpilot.consul.checks")

_TICK_S = 0.05
_MAX_PARALLEL = 64
_ADOPT_EVERY_S = 1.0
_SCAN_S = 0.25  # how often TTL expiry, deregistration after critical and session TTLs are looked at


async def run_checks(agent: ConsulAgent) -> None:
    """Keep every Consul check current until cancelled. A tick costs what is due in it: probes wait in
    a heap by due time (the set of probes is rebuilt only when a check definition changed), and TTL
    expiry, deregistration after critical and session expiry are looked at every ``_SCAN_S``. The probe
    set follows the instances whose definitions changed (``agent.changed``), not a rescan of them all."""
    heap: list[tuple[float, str, str]] = []  # (due, instance id, check id)
    scheduled: set[tuple[str, str]] = set()  # the probes with an entry in the heap
    probes: dict[tuple[str, str], CheckDef] = {}
    probed: dict[str, set[str]] = {}  # instance id -> its check ids in ``probes``
    agent.changed.update(agent.checks)  # everything defined before the checker started
    running: set[tuple[str, str]] = set()
    limit = asyncio.Semaphore(_MAX_PARALLEL)
    timeout = aiohttp.ClientTimeout(total=None)
    adopt_at = scan_at = 0.0
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(force_close=True, limit=_MAX_PARALLEL)) as http, asyncio.TaskGroup() as tg:
        while True:
            now = time.monotonic()
            if not agent.reg.store.current():
                # cut off from the shared store (or just thawed from a freeze): its view of who runs
                # what, and of the last TTL passes, may be old; act on no clock until it is current
                await asyncio.sleep(_TICK_S)
                continue
            if now >= adopt_at:  # replicas: take over what a replica that went away ran
                agent.adopt_orphans(now)
                adopt_at = now + _ADOPT_EVERY_S
            agent.flush()
            if now >= scan_at:
                agent.kv.expire(now, agent.check_status)
                _expire_ttls(agent, now)
                _deregister_critical(agent, now)
                scan_at = now + _SCAN_S
            while agent.changed:  # checks defined, changed or removed since the last tick
                iid = agent.changed.pop()
                for cid in probed.pop(iid, ()):
                    del probes[(iid, cid)]
                for cid, d in agent.checks.get(iid, {}).items():
                    if d.kind in ("http", "tcp"):
                        key = (iid, cid)
                        probes[key] = d
                        probed.setdefault(iid, set()).add(cid)
                        if key not in scheduled:
                            heapq.heappush(heap, (now, iid, cid))
                            scheduled.add(key)
            while heap and heap[0][0] <= now:
                _due, iid, cid = heapq.heappop(heap)
                key = (iid, cid)
                probe = probes.get(key)
                if probe is None:
                    scheduled.discard(key)
                    continue
                heapq.heappush(heap, (now + probe.interval_s, iid, cid))
                if key in running or not agent.runs(iid):
                    continue
                running.add(key)
                tg.create_task(_probe(agent, http, limit, iid, probe, running))
            await asyncio.sleep(_TICK_S)


def _expire_ttls(agent: ConsulAgent, now: float) -> None:
    for iid, cid in agent.ttl_deadline.due(now):
        if not agent.runs(iid):  # another replica runs it: look again later, as this one may take it over
            agent.ttl_deadline[(iid, cid)] = now + _SCAN_S
            continue
        inst = agent.reg.instance(iid)
        if inst is None:
            agent.ttl_deadline.pop((iid, cid), None)
            continue
        current = next((c for c in inst.checks if c.id == cid and c.owner == OWNER), None)
        d = agent.checks.get(iid, {}).get(cid)
        if current is None or d is None:
            agent.ttl_deadline.pop((iid, cid), None)
            continue
        # push the deadline out so an expired TTL is reported once, not on every tick
        agent.ttl_deadline[(iid, cid)] = now + max(d.ttl_s, 1.0)
        if current.status.value != "critical":
            log.info("event=ttl_expired instance=%s check=%s", iid, cid)
            _set(agent, iid, cid, "critical", f"TTL expired (last output: {agent.output(iid, current)})"[:4096])


def _deregister_critical(agent: ConsulAgent, now: float) -> None:
    for iid, cid in list(agent.deregister_after):
        since = agent.critical_since.get((iid, cid))
        if since is None or not agent.runs(iid):
            continue
        d = agent.checks.get(iid, {}).get(cid)
        if d is None:
            agent.critical_since.pop((iid, cid), None)
            continue
        if d.deregister_after_s and now - since >= d.deregister_after_s:
            inst = agent.reg.instance(iid)
            agent.critical_since.pop((iid, cid), None)
            if inst is not None:
                log.info("event=deregister_critical instance=%s check=%s after_s=%.1f", iid, cid, d.deregister_after_s)
                try:
                    agent.deregister(inst.node, agent.service_id(inst))
                except Exception:  # already gone
                    log.debug("event=deregister_critical_failed instance=%s", iid, exc_info=True)


def _set(agent: ConsulAgent, iid: str, cid: str, status: str, output: str) -> None:
    if cid not in agent.checks.get(iid, {}):
        return  # deregistered while the probe ran
    try:
        agent.set_status(iid, cid, status, output)
    except (RegistryError, Exception) as exc:  # the instance went away meanwhile
        log.debug("event=check_result_dropped instance=%s check=%s reason=%s", iid, cid, exc)


async def _probe(agent: ConsulAgent, http: aiohttp.ClientSession, limit: asyncio.Semaphore, iid: str, d: CheckDef, running: set[tuple[str, str]]) -> None:
    try:
        async with limit:
            if d.kind == "http":
                status, output = await _http(http, d)
            else:
                status, output = await _tcp(d)
        _set(agent, iid, d.id, status, output)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("event=probe_failed instance=%s check=%s", iid, d.id)
    finally:
        running.discard((iid, d.id))


async def _http(http: aiohttp.ClientSession, d: CheckDef) -> tuple[str, str]:
    headers = {"User-Agent": "Consul Health Check", "Accept": "text/plain, text/*, */*"}
    for k, v in d.headers:
        headers[k] = v
    try:
        async with asyncio.timeout(d.timeout_s):
            async with http.request(d.method, d.url, headers=headers, allow_redirects=False, ssl=False) as resp:
                body = await resp.content.read(4096)
                text = body.decode(errors="replace")
                line = f"HTTP {d.method} {d.url}: {resp.status} {resp.reason} Output: {text}"
                if 200 <= resp.status < 300:
                    return "passing", line
                if resp.status == 429:
                    return "warning", line
                return "critical", line
    except TimeoutError:
        return "critical", f"Get {d.url!r}: timed out after {d.timeout_s:g}s"
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        return "critical", f"Get {d.url!r}: {exc}"


async def _tcp(d: CheckDef) -> tuple[str, str]:
    host, _, port = d.tcp.rpartition(":")
    host = host.strip("[]")
    try:
        async with asyncio.timeout(d.timeout_s):
            _reader, writer = await asyncio.open_connection(host, int(port))
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        return "passing", f"TCP connect {d.tcp}: Success"
    except TimeoutError:
        return "critical", f"dial tcp {d.tcp}: i/o timeout"
    except OSError as exc:
        return "critical", f"dial tcp {d.tcp}: {exc}"
