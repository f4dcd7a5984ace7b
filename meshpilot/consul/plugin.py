"""The Consul-compatible API as a part of the control plane: the HTTP app on ``consul_port`` and
the supervised task that runs HTTP/TCP checks and expires TTLs."""

from __future__ import annotations

from aiohttp import web

from meshpilot.access import AccessTokens
from meshpilot.consul.agent import ConsulAgent
from meshpilot.consul.checker import run_checks
from meshpilot.consul.http import build_consul_app
from meshpilot.parts import Core, HttpApp, Part, Task

__all__ = ["install"]


def install(core: Core) -> Part:
    port = core.settings.consul_port
    if port is None:
        return Part()
    agent = ConsulAgent(core.registry, replica=core.replica_id)
    tokens = AccessTokens(core.registry.store, core.settings.token)  # the management API's tokens, from the same store

    def factory() -> web.Application:
        return build_consul_app(agent, tokens)

    async def consul_checks() -> None:
        await run_checks(agent)

    return Part(http_apps=[HttpApp("consul", port, factory)], tasks=[Task("consul_checks", consul_checks)])
