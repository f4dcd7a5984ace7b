"""What a part of the product contributes to the control plane it is assembled into.

A plugin (HDS, the Consul and Eureka front doors, policies, proxyless clients) is a module with
``install(core) -> Part``: it reads what it needs from the assembled core (settings, registry, the
xDS server, the health-token function) and returns what it adds; it sets nothing on the control
plane and registers nothing globally. The control plane serves the gRPC handlers and HTTP apps,
gives the routes to the management API, owns the tasks (supervised: logged and restarted) and
tells the node watchers when one of a node's ADS streams opens and when its last one closes. With
identity on, one part (the mesh CA's) gives the TLS credentials the xDS port serves with and the
admission check every xDS and HDS stream passes (is the certificate's enrolment still standing).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from aiohttp import web

from meshpilot.api.routes import Route
from meshpilot.registry import Registry
from meshpilot.settings import Settings
from meshpilot.xds.resource import NodeInfo
from meshpilot.xds.server import XdsServer

__all__ = ["Core", "HttpApp", "NodeWatcher", "Part", "Task"]

NodeWatcher = Callable[[NodeInfo, bool], None]  # (node, connected)


@dataclass(frozen=True, slots=True)
class Task:
    """A long-running coroutine the control plane owns; ``name`` is what its logs call it."""

    name: str
    run: Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class HttpApp:
    """Another HTTP front door, served on its own port."""

    name: str
    port: int
    factory: Callable[[], web.Application]


@dataclass(slots=True)
class Part:
    grpc_handlers: list[grpc.GenericRpcHandler] = field(default_factory=list)
    http_apps: list[HttpApp] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    tasks: list[Task] = field(default_factory=list)
    node_watchers: list[NodeWatcher] = field(default_factory=list)
    # the TLS credentials of the xDS port (the mesh CA's part gives them when identity is on)
    server_credentials: Callable[[], grpc.ServerCredentials] | None = None
    # why a stream's client certificate may not speak now (its enrolment removed, ...): (code, detail)
    admission: Callable[[grpc.aio.ServicerContext[Any, Any]], tuple[grpc.StatusCode, str] | None] | None = None


class Core(Protocol):
    """What a plugin may read from the control plane it is assembled into."""

    @property
    def settings(self) -> Settings: ...

    @property
    def registry(self) -> Registry: ...

    @property
    def xds(self) -> XdsServer: ...

    @property
    def replica_id(self) -> str:
        """This control plane among the replicas of a shared store (its key in the ``replicas`` table)."""

    def health_token(self, node_id: str) -> str:
        """The node's health token: its own health checks carry it, its inbound routes match it."""

    def publishing(self, service_key: str) -> bool:
        """Whether a change to the service waits behind the debounce, not yet in the cache."""

    def disconnect(self, node_id: str, reason: str) -> None:
        """End the node's xDS streams now (and its auxiliary nodes', ``<node>~...``)."""

    def caller_refusal(self, context: grpc.aio.ServicerContext[Any, Any]) -> tuple[grpc.StatusCode, str] | None:
        """Why a stream's client certificate may not speak now (the mesh CA's judgement), or None."""
