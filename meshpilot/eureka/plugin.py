"""Installs the Eureka-compatible API into the control plane: the HTTP app on ``eureka_port`` and
the supervised task that expires leases."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web

from meshpilot.eureka.front import EurekaFront
from meshpilot.eureka.http import build_eureka_app

if TYPE_CHECKING:
    from meshpilot.controlplane import ControlPlane

__all__ = ["install"]

_EXPIRY_TICK_S = 0.25


def install(cp: ControlPlane) -> EurekaFront | None:
    port = cp.settings.eureka_port
    if port is None:
        return None
    front = EurekaFront(cp.registry)
    token = cp.settings.token

    def factory() -> web.Application:
        return build_eureka_app(front, token)

    async def eureka_leases() -> None:
        while True:
            front.expire()
            await asyncio.sleep(_EXPIRY_TICK_S)

    cp.add_http_app("eureka", factory, port)
    cp.add_task(eureka_leases)
    return front
