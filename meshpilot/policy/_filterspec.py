"""Pieces shared by the governance kinds (``CircuitBreakerPolicy``, ``RateLimitPolicy``): API
selectors, local replies, and the bridge from the WASM filter's config encoder to policy fields.

Both kinds validate by rendering their rules with ``meshpilot.wasm.config.encode``, the encoder
that enforces exactly the filter's own limits, so a policy the API accepts is never rejected by
the filter in ``proxy_on_configure``. The encoder names fields of the filter config
(``breakers[0].match.path``); ``policy_field`` maps them back to the policy's own fields.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from meshpilot.model import ApiOperation, Service
from meshpilot.wasm.config import FilterConfigError, encode

__all__ = ["ApiSelector", "ReplySpec", "Spec", "check_rules", "op_match", "resolve_apis", "rule_name"]

_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE")


class Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)


class ApiSelector(Spec):
    """One API of the target service: by the name it has in the service's ``apis``, by its catalog
    operationId (``operation``: the API catalog names the service's apis by operationId, and a
    policy naming one the service does not have is refused), by method and path template, or
    (outbound only) by route name as Envoy sees it (``xds.route_name``)."""

    name: str | None = Field(default=None, min_length=1, max_length=128, description="an entry of the service's apis, by name")
    operation: str | None = Field(default=None, min_length=1, max_length=128, description="an operation of the service's API catalog, by operationId")
    method: str | None = Field(default=None, description="upper-case HTTP method; omitted: any")
    path: str | None = Field(default=None, max_length=512, description="path template: /orders/{id}, /static/*, /api/**")
    route: str | None = Field(default=None, min_length=1, max_length=256, description="a route name (RoutingPolicy routes are <policy>.<namespace>/<route>)")

    @model_validator(mode="after")
    def _one(self) -> ApiSelector:
        given = [k for k in ("name", "operation", "path", "route") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of name, operation, path (with an optional method) or route (got {', '.join(given) or 'none'})")
        if self.method is not None and self.path is None:
            raise ValueError("method needs a path")
        if self.method is not None and self.method not in _METHODS:
            raise ValueError(f"method must be one of {', '.join(_METHODS)}")
        return self

    @property
    def named(self) -> str | None:
        """The name an entry of the service's apis has to have (``name`` or ``operation``), if any."""
        return self.name if self.name is not None else self.operation

    def label(self) -> str:
        if self.named is not None:
            return self.named
        if self.route is not None:
            return self.route
        return f"{self.method or 'any'} {self.path}"


class ReplySpec(Spec):
    """The local reply while a breaker is open or a limit is exceeded."""

    status: int | None = Field(default=None, description="HTTP status, 200..599 (defaults: 503 breaker, 429 limit)")
    body: str | None = Field(default=None, description="response body, at most 4096 bytes")
    headers: dict[str, str] = Field(default_factory=dict, description="extra response headers (lower-case names)")

    def as_filter(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.status is not None:
            out["status"] = self.status
        if self.body is not None:
            out["body"] = self.body
        if self.headers:
            out["headers"] = dict(self.headers)
        return out


def resolve_apis(selectors: list[ApiSelector], service: Service | None) -> list[tuple[ApiSelector, dict[str, str]]]:
    """Each selector with the filter ``match`` fields it stands for. A ``name`` is looked up in the
    service's apis (as is an ``operation``); one the service does not declare (or a service not
    registered yet) is dropped."""
    out = []
    for sel in selectors:
        if sel.named is not None:
            op = _named(service, sel.named)
            if op is None:
                continue
            out.append((sel, op_match(op)))
        elif sel.route is not None:
            out.append((sel, {"route": sel.route}))
        else:
            m = {"path": sel.path or "/"}
            if sel.method:
                m["method"] = sel.method
            out.append((sel, m))
    return out


def _named(service: Service | None, name: str) -> ApiOperation | None:
    if service is None:
        return None
    for op in service.apis:
        if op.name == name:
            return op
    return None


def op_match(op: ApiOperation) -> dict[str, str]:
    m = {"path": op.path}
    if op.method != "*":
        m["method"] = op.method
    return m


_SAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


def rule_name(*parts: str) -> str:
    """A filter rule name (``[A-Za-z0-9_.-]{1,64}``) from readable parts, unique per parts."""
    text = ".".join(_SAFE.sub("-", p).strip("-") or "x" for p in parts)
    if len(text) <= 64:
        return text
    import hashlib

    digest = hashlib.blake2b(text.encode(), digest_size=4).hexdigest()
    return f"{text[:55]}.{digest}"


_FIELD = re.compile(r"^(breakers|rate_limits)\[(\d+)\]\.?(.*)$")


def check_rules(
    section: str, rules: list[dict[str, Any]], field_of: Callable[[int, str], str]
) -> list[dict[str, str]]:
    """Render ``rules`` with the filter's encoder; a failure becomes ``{field, reason}`` with the
    policy's field path (``field_of(rule_index, filter_field)``)."""
    try:
        encode({section: rules})
    except FilterConfigError as exc:
        m = _FIELD.match(exc.field)
        if m is None:
            return [{"field": "(body)", "reason": exc.reason}]
        return [{"field": field_of(int(m.group(2)), m.group(3)), "reason": exc.reason}]
    return []
