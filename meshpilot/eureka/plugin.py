"""The Eureka-compatible API as a part of the control plane: the HTTP app on ``eureka_port`` and
the supervised task that expires leases."""

from __future__ import annotations

import asyncio

from aiohttp import web

from meshpilot.access import AccessTokens
from meshpilot.eureka.front import EurekaFront
from meshpilot.eureka.http import build_eureka_app
from meshpilot.parts import Core, HttpApp, Part, Task

__all__ = ["install"]

_EXPIRY_TICK_S = 0.25
_ADOPT_EVERY = 4  # ticks: leases of a replica that went away are looked for once a second


def install(core: Core) -> Part:
    port = core.settings.eureka_port
    if port is None:
        return Part()
    front = EurekaFront(core.registry, replica=core.replica_id)
    tokens = AccessTokens(core.registry.store, core.settings.token)  # the management API's tokens, from the same store

    def factory() -> web.Application:
        return build_eureka_app(front, tokens)

    async def eureka_leases() -> None:
        store = core.registry.store
        tick = 0
        while True:
            # a replica cut off from the shared store (or thawed from a freeze) acts on no clock: the
            # renewals it missed may have gone to another replica
            if store.current():
                if tick % _ADOPT_EVERY == 0:
                    front.adopt_orphans()
                front.expire()
            tick += 1
            await asyncio.sleep(_EXPIRY_TICK_S)

    return Part(http_apps=[HttpApp("eureka", port, factory)], tasks=[Task("eureka_leases", eureka_leases)])
