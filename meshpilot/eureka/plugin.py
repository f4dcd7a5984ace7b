"""The Eureka-compatible API as a part of the control plane: the HTTP app on ``eureka_port`` and
the supervised task that expires leases."""

from __future__ import annotations

import asyncio

from aiohttp import web

from meshpilot.eureka.front import EurekaFront
from meshpilot.eureka.http import build_eureka_app
from meshpilot.parts import Core, HttpApp, Part, Task

__all__ = ["install"]

_EXPIRY_TICK_S = 0.25


def install(core: Core) -> Part:
    port = core.settings.eureka_port
    if port is None:
        return Part()
    front = EurekaFront(core.registry)
    token = core.settings.token

    def factory() -> web.Application:
        return build_eureka_app(front, token)

    async def eureka_leases() -> None:
        while True:
            front.expire()
            await asyncio.sleep(_EXPIRY_TICK_S)

    return Part(http_apps=[HttpApp("eureka", port, factory)], tasks=[Task("eureka_leases", eureka_leases)])
