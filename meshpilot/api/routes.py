"""An entry of the management API's route table. The API serves its own routes and the ones it is
given; each part of the product that adds routes (policies, HDS's sync view, the governance module)
hands its entries to the control plane when it is assembled, so nothing is registered globally."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel

__all__ = ["Handler", "Route", "RouteScope"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# the token a route needs when authorisation is on: "open" needs none (a build artefact Envoy fetches)
RouteScope = Literal["open", "read", "write", "admin"]


@dataclass(frozen=True, slots=True)
class Route:
    """One route and how /openapi.json documents it. ``body``: the request body's model, or a model
    or JSON schema per value of the path's first parameter (documented once per value). ``scope``: the
    token it needs when authorisation is on; None: read for GET and HEAD, write for the rest. Token
    and identity administration (/v1/access, /v1/identity/tokens, writes under /v1/identity/roots)
    needs admin whatever a route declares."""

    method: str
    path: str
    handler: Handler
    summary: str
    body: type[BaseModel] | dict[str, Any] | None = None
    scope: RouteScope | None = None
    # answers beyond those every route of its kind may give (e.g. "502", "503" from a route that asks
    # another system), documented with the API's error body
    errors: tuple[str, ...] = ()
