"""``GET /v1/services/{namespace}/{name}/synced``, which the sidecar agent polls during graceful
offline: whether every Envoy consuming the service's endpoints has ACKed their current version.
It asks the xDS server's query; it never reads the streams themselves."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from meshpilot.api.app import ApiError
from meshpilot.api.routes import Route
from meshpilot.registry import Registry
from meshpilot.translate.names import cluster_name
from meshpilot.xds.resource import TYPE
from meshpilot.xds.server import XdsServer

__all__ = ["synced", "synced_route"]


def synced(status: list[tuple[str, bool]]) -> dict[str, Any]:
    """The answer for the consuming streams' (node, ACKed) pairs."""
    pending = sorted({node for node, acked in status if not acked})
    return {"synced": not pending, "consumers": len(status), "pending": pending}


def synced_route(registry: Registry, xds: XdsServer, publishing: Callable[[str], bool], domain: str) -> Route:
    """``publishing(service_key)``: whether a change to the service still waits to reach the cache; the
    route then answers "not synced" rather than publishing early, so polling it costs no publication."""

    async def service_synced(request: web.Request) -> web.Response:
        key = f"{request.match_info['name']}.{request.match_info['namespace']}".lower()
        svc = registry.service(key)
        if svc is None:
            raise ApiError(404, f"service: no service {key!r}", [{"field": "service", "reason": "not found"}])
        names = {cluster_name(svc, p, domain) for p in svc.ports}
        answer = synced(xds.ack_status(TYPE.ENDPOINT, names))
        # while the latest state is not in the cache yet, nobody can have ACKed it
        waiting = publishing(key)
        return web.json_response({"service": key, **answer, "synced": answer["synced"] and not waiting, "publishing": waiting})

    return Route("GET", "/v1/services/{namespace}/{name}/synced", service_synced,
                 "Whether every Envoy consuming the service's endpoints has ACKed their current version")
