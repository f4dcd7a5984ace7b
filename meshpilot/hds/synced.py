"""``GET /v1/services/{namespace}/{name}/synced``, which the sidecar agent polls during graceful
offline: whether every Envoy consuming the service's endpoints has ACKed their current version.
It asks the xDS server's query; it never reads the streams themselves.

With replicas (a shared store) the Envoys are spread over them: the replica asked also asks every
other live replica (the ``replicas`` table) for its own streams (``?local=1``, with the caller's
credentials) and answers for all. A replica that cannot be reached, or does not answer within a
second, holds no stream that could still be fed (its Envoys have moved or are moving), nor does one
that says it is not current (503: it has handed its streams over), so they add nothing; one that
answers with another error makes the answer "not synced"."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

from meshpilot.api.app import ApiError
from meshpilot.api.routes import Route
from meshpilot.registry import Registry
from meshpilot.translate.names import cluster_name
from meshpilot.xds.resource import TYPE
from meshpilot.xds.server import XdsServer

__all__ = ["synced", "synced_route"]

log = logging.getLogger("meshpilot.hds.synced")

REPLICAS = "replicas"  # store table: every live control-plane replica's addresses
_ASK_S = 1.0


def synced(status: list[tuple[str, bool]]) -> dict[str, Any]:
    """The answer for the consuming streams' (node, ACKed) pairs."""
    pending = sorted({node for node, acked in status if not acked})
    return {"synced": not pending, "consumers": len(status), "pending": pending}


def combined(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """One answer for the replicas' answers."""
    return {
        "synced": all(a.get("synced") is True for a in answers),
        "consumers": sum(int(a.get("consumers", 0)) for a in answers),
        "pending": sorted({str(n) for a in answers for n in a.get("pending", [])}),
        "publishing": any(a.get("publishing") for a in answers),
    }


async def _ask(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> dict[str, Any] | None:
    """Another replica's answer for its own streams; None when it holds none that could be fed."""
    try:
        async with asyncio.timeout(_ASK_S):
            async with http.get(url, headers=headers) as r:
                if r.status == 200:
                    body = await r.json()
                    if isinstance(body, dict):
                        return body
                if r.status == 503:
                    return None
                log.warning("event=synced_replica_refused url=%s status=%d", url, r.status)
                return {"synced": False, "consumers": 0, "pending": [], "publishing": False}
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
        log.info("event=synced_replica_unreachable url=%s reason=%s", url, type(exc).__name__)
        return None


def synced_route(registry: Registry, xds: XdsServer, publishing: Callable[[str], bool], domain: str, replica: str = "") -> Route:
    """``publishing(service_key)``: whether a change to the service still waits to reach the cache; the
    route then answers "not synced" rather than publishing early, so polling it costs no publication.
    ``replica``: this control plane's id among the replicas of a shared store."""

    async def others(request: web.Request) -> list[dict[str, Any]]:
        urls = []
        for rid, doc in registry.store.items(REPLICAS):
            api = doc.get("api") if isinstance(doc, dict) else None
            if rid == replica or not (isinstance(api, list) and len(api) == 2):
                continue
            host = f"[{api[0]}]" if ":" in str(api[0]) else str(api[0])
            path = "/v1/services/{}/{}/synced".format(*(quote(request.match_info[k], safe="") for k in ("namespace", "name")))
            urls.append(f"http://{host}:{int(api[1])}{path}?local=1")
        if not urls:
            return []
        headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_ASK_S)) as http:
            got = await asyncio.gather(*(_ask(http, u, headers) for u in urls))
        return [a for a in got if a is not None]

    async def service_synced(request: web.Request) -> web.Response:
        key = f"{request.match_info['name']}.{request.match_info['namespace']}".lower()
        svc = registry.service(key)
        if svc is None:
            raise ApiError(404, f"service: no service {key!r}", [{"field": "service", "reason": "not found"}])
        names = {cluster_name(svc, p, domain) for p in svc.ports}
        answer = synced(xds.ack_status(TYPE.ENDPOINT, names))
        # while the latest state is not in the cache yet, nobody can have ACKed it
        waiting = publishing(key)
        here = {**answer, "synced": answer["synced"] and not waiting, "publishing": waiting}
        if registry.store.shared and request.query.get("local") != "1":
            here = combined([here, *await others(request)])
        return web.json_response({"service": key, **here})

    return Route("GET", "/v1/services/{namespace}/{name}/synced", service_synced,
                 "Whether every Envoy consuming the service's endpoints has ACKed their current version")
