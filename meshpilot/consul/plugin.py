"""Installs the Consul-compatible API into the control plane: the HTTP app on ``consul_port`` and
the supervised task that runs HTTP/TCP checks and expires TTLs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from meshpilot.consul.agent import ConsulAgent
from meshpilot.consul.checker import run_checks
from meshpilot.consul.http import build_consul_app

if TYPE_CHECKING:
    from meshpilot.controlplane import ControlPlane

__all__ = ["install"]


def install(cp: ControlPlane) -> ConsulAgent | None:
    port = cp.settings.consul_port
    if port is None:
        return None
    agent = ConsulAgent(cp.registry)
    token = cp.settings.token

    def factory() -> web.Application:
        return build_consul_app(agent, token)

    async def consul_checks() -> None:
        await run_checks(agent)

    cp.add_http_app("consul", factory, port)
    cp.add_task(consul_checks)
    return agent
