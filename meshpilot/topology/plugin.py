"""The mesh's metrics and topology as a part of the control plane (parts.py).

It follows which sidecars are connected (a node watcher: ADS streams opening and closing) and which
control-plane replicas are live (the store's ``replicas`` table), and from them keeps:

- the file_sd file ``prometheus_sd_file`` (off when unset), replaced in one step whenever a target comes
  or goes, and checked every few seconds for replicas that came or went;
- ``GET /v1/prometheus/targets`` (scope read): the same document, for Prometheus' ``http_sd_configs``, with
  the sidecars connected to the other live replicas too (each is asked for its own, ``?local=1``, with the
  caller's token; one that does not answer within a second is left out and logged);
- ``GET /v1/topology`` (scope read): services and caller → callee edges over a window (``?window=``,
  default ``topology_window_s``; ``?namespace=``: only what touches it), computed from the Prometheus at
  ``prometheus_url`` (graph.py); a window whose raw samples exceed prometheus.MAX_SAMPLES is a 400 naming
  ``window`` and the longest one that fits.

The file lists the sidecars connected to this replica; with several replicas, Prometheus is given every
replica's file, or the URL of any one (docs/observability.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from meshpilot.api.app import ApiError
from meshpilot.api.routes import Route
from meshpilot.model import dns_label
from meshpilot.parts import Core, Part, Task
from meshpilot.policy.governance import REPLICAS
from meshpilot.topology.graph import Queried, topology
from meshpilot.topology.prometheus import PrometheusError, WindowTooLarge, query_all
from meshpilot.topology.targets import file_sd, host_port, merge_file_sd, write_file_sd
from meshpilot.xds.resource import NodeInfo

__all__ = ["install", "parse_window"]

log = logging.getLogger("meshpilot.topology")

_RECHECK_S = 5.0  # how often the replicas table is looked at again (it changes rarely, and not through a node)
_ASK_S = 1.0  # how long another replica has to give its own targets
_WINDOW = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_window(text: str) -> float:
    """``30s``, ``5m``, ``1h``, ``90`` (seconds) → seconds; ValueError naming ``window``."""
    m = _WINDOW.match(text.strip())
    if m is None:
        raise ValueError(f"window: expected a duration such as 30s, 5m or 1h, got {text!r}")
    seconds = float(m.group(1)) * _UNIT[m.group(2)]
    if not 1.0 <= seconds <= 86_400.0:
        raise ValueError(f"window: must be between 1s and 24h, got {text!r}")
    return seconds


class _Targets:
    """The connected sidecars and what was last written; ``changed`` wakes the writer."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.nodes: dict[str, NodeInfo] = {}
        self.changed = asyncio.Event()
        self.written: str | None = None

    def watch(self, node: NodeInfo, connected: bool) -> None:
        if connected:
            self.nodes[node.id] = node
        else:
            self.nodes.pop(node.id, None)
        self.changed.set()

    def document(self) -> list[dict[str, Any]]:
        return file_sd(self.nodes.values(), self.core.registry.store.items(REPLICAS))

    def write(self, path: str) -> bool:
        groups = self.document()
        text = json.dumps(groups, sort_keys=True)
        if text == self.written and Path(path).exists():
            return False
        write_file_sd(path, groups)
        self.written = text
        log.info("event=prometheus_sd_written path=%s targets=%d", path, len(groups))
        return True

    async def keep(self, path: str) -> None:
        while True:
            self.changed.clear()
            try:
                self.write(path)
            except OSError as exc:
                raise OSError(f"prometheus_sd_file: cannot write {path}: {exc}") from exc
            try:
                async with asyncio.timeout(_RECHECK_S):
                    await self.changed.wait()
            except TimeoutError:
                pass


async def _ask(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> list[dict[str, Any]] | None:
    try:
        async with http.get(url, headers=headers) as r:
            body = await r.json(content_type=None)
            if r.status == 200 and isinstance(body, list) and all(isinstance(g, dict) for g in body):
                return body
            log.warning("event=replica_targets_refused url=%s status=%d", url, r.status)
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
        log.info("event=replica_targets_unreachable url=%s reason=%s", url, type(exc).__name__)
    return None


def install(core: Core) -> Part:
    s = core.settings
    targets = _Targets(core)

    async def others(request: web.Request) -> list[list[dict[str, Any]]]:
        urls = []
        for replica, record in core.registry.store.items(REPLICAS):
            api = record.get("api") if isinstance(record, dict) else None
            if replica != core.replica_id and isinstance(api, list) and len(api) == 2 and isinstance(api[1], int):
                urls.append(f"http://{host_port(str(api[0]), api[1])}/v1/prometheus/targets?local=1")
        if not urls:
            return []
        headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_ASK_S)) as http:
            got = await asyncio.gather(*(_ask(http, url, headers) for url in urls))
        return [g for g in got if g is not None]

    async def prometheus_targets(request: web.Request) -> web.Response:
        own = targets.document()
        if request.query.get("local") == "1":
            return web.json_response(own)
        return web.json_response(merge_file_sd([own, *await others(request)]))

    async def mesh_topology(request: web.Request) -> web.Response:
        try:
            window = parse_window(request.query["window"]) if "window" in request.query else s.topology_window_s
        except ValueError as exc:
            raise ApiError(400, str(exc), [{"field": "window", "reason": str(exc).partition(": ")[2]}]) from None
        namespace = request.query.get("namespace")
        if namespace is not None:
            try:
                namespace = dns_label(namespace, "the value")
            except ValueError as exc:
                raise ApiError(400, f"namespace: {exc}", [{"field": "namespace", "reason": str(exc)}]) from None
        if not s.prometheus_url:
            raise ApiError(503, "prometheus_url: not set; the topology is computed from the Prometheus that scrapes "
                                "the mesh (docs/observability.md)", [{"field": "prometheus_url", "reason": "not set"}])
        now = time.time()
        try:
            got = await query_all(s.prometheus_url, window, now)
        except PrometheusError as exc:
            raise ApiError(502, str(exc), [{"field": "prometheus_url", "reason": "no answer"}]) from None
        except WindowTooLarge as exc:
            raise ApiError(400, str(exc), [{"field": "window", "reason": str(exc).partition(": ")[2]}]) from None
        reg = core.registry
        return web.json_response(topology(Queried(
            requests=got["requests"], requests_before=got["requests_before"], errors=got["errors"],
            errors_before=got["errors_before"], buckets=got["buckets"], buckets_before=got["buckets_before"],
            direct=got["direct"], direct_before=got["direct_before"], direct_buckets=got["direct_buckets"],
            direct_buckets_before=got["direct_buckets_before"],
            services=reg.services(), instances=list(reg.iter_instances()),
            domain=s.domain, window_s=window, time=now,
        ), namespace))

    part = Part(
        routes=[
            Route("GET", "/v1/topology", mesh_topology,
                  "The mesh as a graph: services and caller → callee edges with requests, rate, 5xx share and latency "
                  "(p50, p99) over ?window= (e.g. 60s, 5m), from the Prometheus at prometheus_url; ?namespace=: the edges "
                  "that start or end there", scope="read", errors=("502", "503")),
            Route("GET", "/v1/prometheus/targets", prometheus_targets,
                  "Prometheus HTTP service discovery (http_sd): every connected sidecar's stats listener (of every "
                  "replica; ?local=1: of this one) and every control-plane replica's /metrics, labelled", scope="read"),
        ],
        node_watchers=[targets.watch],
    )
    if s.prometheus_sd_file:
        path = s.prometheus_sd_file

        async def prometheus_sd() -> None:
            await targets.keep(path)

        part.tasks.append(Task("prometheus_sd", prometheus_sd))
    return part
