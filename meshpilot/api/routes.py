"""An entry of the management API's route table. The API serves its own routes and the ones it is
given; each part of the product that adds routes (policies, HDS's sync view, the governance module)
hands its entries to the control plane when it is assembled, so nothing is registered globally."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import BaseModel

__all__ = ["Handler", "Route"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Route:
    """One route and how /openapi.json documents it. ``body``: the request body's model, or a model
    or JSON schema per value of the path's first parameter (documented once per value)."""

    method: str
    path: str
    handler: Handler
    summary: str
    body: type[BaseModel] | dict[str, Any] | None = None
