"""``RoutingPolicy``: subsets of a service's instances and weighted, matched routes between them.

One object carries what Istio splits into a DestinationRule (subsets by instance label) and a
VirtualService (matches, weights, timeouts, retries, fault injection). Routes are tried in order;
a request that no route matches goes to the whole service with the service's own settings. The
translation is a ``ServiceRouting`` overlay: the control plane builds a cluster (and an EDS
assignment with only the matching instances) per subset, and the service's virtual host routes
with ``weighted_clusters``, for Envoy sidecars and proxyless gRPC clients alike.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from meshpilot.model import Service, dns_label
from meshpilot.policy.authz import path_template_regex
from meshpilot.policy.kinds import PolicyKind, ServicePolicy, TranslateContext, Translation, register_kind
from meshpilot.translate.routes import Fault, HeaderMatch, RouteRule, ServiceRouting, Subset

__all__ = ["ROUTING", "RoutingPolicy"]

log = logging.getLogger("meshpilot.policy")

_HEADER = re.compile(r"^:?[a-z0-9!#$%&'*+.^_`|~-]{1,128}$")
_RETRY_ON = re.compile(r"^[a-z0-9-]+(,[a-z0-9-]+)*$")


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)


class SubsetSpec(_Spec):
    name: str = Field(description="subset name, a DNS label (becomes part of the cluster name)")
    labels: dict[str, str] = Field(min_length=1, max_length=16, description="instance labels the subset selects")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return dns_label(v, "subset name")


class HeaderMatchSpec(_Spec):
    name: str = Field(description="header name (lower-case; gRPC metadata keys too)")
    exact: str | None = Field(default=None, max_length=1024)
    prefix: str | None = Field(default=None, min_length=1, max_length=1024)
    regex: str | None = Field(default=None, min_length=1, max_length=1024, description="RE2 syntax, whole value")
    present: bool | None = Field(default=None, description="true: the header is present; false: absent")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        v = v.lower()
        if not _HEADER.match(v):
            raise ValueError("header name must be an HTTP token of 1-128 characters")
        return v

    @field_validator("regex")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return v

    @model_validator(mode="after")
    def _one(self) -> HeaderMatchSpec:
        given = [k for k in ("exact", "prefix", "regex", "present") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"exactly one of exact, prefix, regex, present must be given (got {', '.join(given) or 'none'})")
        return self


class MatchSpec(_Spec):
    path_prefix: str | None = Field(default=None, pattern=r"^/\S*$", max_length=1024)
    path_exact: str | None = Field(default=None, pattern=r"^/\S*$", max_length=1024)
    operation: str | None = Field(default=None, min_length=1, max_length=128,
                                  description="an operation of the service's API catalog, by operationId: its method and path template")
    headers: list[HeaderMatchSpec] = Field(default_factory=list, max_length=16)

    @model_validator(mode="after")
    def _paths(self) -> MatchSpec:
        if self.path_prefix is not None and self.path_exact is not None:
            raise ValueError("give path_prefix or path_exact, not both")
        if self.operation is not None and (self.path_prefix is not None or self.path_exact is not None):
            raise ValueError("an operation names its path: give operation, or path_prefix / path_exact")
        return self


class Destination(_Spec):
    subset: str | None = Field(default=None, description="a subset name; omitted: every instance of the service")
    weight: int = Field(default=100, ge=0, le=1_000_000, description="relative weight within the route")


class RetrySpec(_Spec):
    attempts: int = Field(ge=0, le=10, description="retries after the first try; 0 disables")
    retry_on: str | None = Field(
        default=None,
        max_length=256,
        description="Envoy retry conditions, comma-separated (5xx, reset, connect-failure, unavailable, ...); "
        "gRPC clients use the gRPC status ones (cancelled, deadline-exceeded, internal, resource-exhausted, unavailable)",
    )
    per_try_timeout_ms: int | None = Field(default=None, ge=1, le=3_600_000)

    @field_validator("retry_on")
    @classmethod
    def _retry_on(cls, v: str | None) -> str | None:
        if v is not None and not _RETRY_ON.match(v):
            raise ValueError("retry_on must be comma-separated conditions of lower-case letters, digits and '-'")
        return v


class DelaySpec(_Spec):
    percent: float = Field(gt=0, le=100, description="share of requests delayed")
    fixed_delay_ms: int = Field(ge=1, le=3_600_000)


class AbortSpec(_Spec):
    percent: float = Field(gt=0, le=100, description="share of requests aborted")
    http_status: int = Field(default=503, ge=200, le=599)
    grpc_status: int | None = Field(default=None, ge=0, le=16, description="abort gRPC calls with this status instead")


class FaultSpec(_Spec):
    delay: DelaySpec | None = None
    abort: AbortSpec | None = None

    @model_validator(mode="after")
    def _some(self) -> FaultSpec:
        if self.delay is None and self.abort is None:
            raise ValueError("give delay, abort or both")
        return self


class RouteSpec(_Spec):
    name: str | None = Field(default=None, description="route name, a DNS label (default: route-<index>)")
    match: MatchSpec | None = Field(default=None, description="omitted: every request")
    destinations: list[Destination] = Field(min_length=1, max_length=32)
    timeout_ms: int | None = Field(default=None, ge=0, le=3_600_000, description="0 = none; omitted: the service's")
    retries: RetrySpec | None = None
    fault: FaultSpec | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return None if v is None else dns_label(v, "route name")

    @property
    def matches_all(self) -> bool:
        m = self.match
        return m is None or (m.operation is None and m.path_exact is None and m.path_prefix in (None, "/") and not m.headers)


class RoutingPolicy(ServicePolicy):
    """Subsets of one service and the routes that split its traffic between them."""

    kind_name = "RoutingPolicy"

    port: str | None = Field(default=None, description="limit the policy to this port name; omitted: every HTTP/gRPC port")
    subsets: list[SubsetSpec] = Field(default_factory=list, max_length=32)
    routes: list[RouteSpec] = Field(min_length=1, max_length=64)



def _check(policy: RoutingPolicy) -> list[dict[str, str]]:
    problems: list[dict[str, str]] = []
    known: dict[str, int] = {}
    for i, s in enumerate(policy.subsets):
        if s.name in known:
            problems.append({"field": f"subsets.{i}.name", "reason": f"duplicate subset name {s.name!r} (also subsets.{known[s.name]})"})
        known.setdefault(s.name, i)
    names: dict[str, int] = {}
    catch_all: int | None = None
    for i, r in enumerate(policy.routes):
        where = f"routes.{i}"
        if catch_all is not None:
            problems.append({"field": where, "reason": f"unreachable: routes.{catch_all} already matches every request"})
        if r.name is not None:
            if r.name in names:
                problems.append({"field": f"{where}.name", "reason": f"duplicate route name {r.name!r} (also routes.{names[r.name]})"})
            names.setdefault(r.name, i)
        seen: set[str | None] = set()
        for j, d in enumerate(r.destinations):
            if d.subset is not None and d.subset not in known:
                has = ", ".join(sorted(known)) or "none defined"
                problems.append({"field": f"{where}.destinations.{j}.subset", "reason": f"no subset named {d.subset!r} (subsets: {has})"})
            if d.subset in seen:
                problems.append({"field": f"{where}.destinations.{j}.subset", "reason": "each destination may appear once per route"})
            seen.add(d.subset)
        if sum(d.weight for d in r.destinations) <= 0:
            problems.append({"field": f"{where}.destinations", "reason": "weights must add up to more than 0"})
        if r.matches_all and catch_all is None:
            catch_all = i
    return problems


def _operation_headers(m: MatchSpec | None, service: Service | None) -> tuple[HeaderMatch, ...] | None:
    """The method and path matchers of the route's catalog operation (none without one); None when
    the service has no such operation (any more): the route then matches nothing and is left out."""
    if m is None or m.operation is None:
        return ()
    op = next((o for o in (service.apis if service else ()) if o.name == m.operation), None)
    pattern = path_template_regex(op.path) if op is not None else None
    if op is None or pattern is None:
        return None
    method = (HeaderMatch(":method", exact=op.method),) if op.method != "*" else ()
    return (*method, HeaderMatch(":path", regex=pattern[:-1] + r"(\?.*)?$"))  # :path carries the query


def _rule(policy: RoutingPolicy, index: int, r: RouteSpec, operation: tuple[HeaderMatch, ...] = ()) -> RouteRule:
    m = r.match
    fault = None
    if r.fault is not None:
        fault = Fault(
            delay_percent=r.fault.delay.percent if r.fault.delay else 0.0,
            delay_ms=r.fault.delay.fixed_delay_ms if r.fault.delay else 0,
            abort_percent=r.fault.abort.percent if r.fault.abort else 0.0,
            abort_http_status=r.fault.abort.http_status if r.fault.abort else 0,
            abort_grpc_status=r.fault.abort.grpc_status if r.fault.abort else None,
        )
    return RouteRule(
        name=f"{policy.name}.{policy.namespace}/{r.name or f'route-{index}'}",
        destinations=tuple((d.subset or "", d.weight) for d in r.destinations),
        path_prefix=m.path_prefix if m else None,
        path_exact=m.path_exact if m else None,
        headers=operation + tuple(HeaderMatch(h.name, h.exact, h.prefix, h.regex, h.present) for h in (m.headers if m else ())),
        timeout_ms=r.timeout_ms,
        retries=r.retries.attempts if r.retries else None,
        retry_on=r.retries.retry_on if r.retries else None,
        per_try_timeout_ms=r.retries.per_try_timeout_ms if r.retries else None,
        fault=fault,
    )


def routing_of(policy: RoutingPolicy, service: Service | None = None) -> ServiceRouting:
    """The policy's overlay; a route naming an operation ``service`` does not have is left out."""
    rules = []
    for i, r in enumerate(policy.routes):
        operation = _operation_headers(r.match, service)
        if operation is None:
            log.warning("event=route_operation_unresolved policy=%s route=%d operation=%s", policy.key, i, r.match.operation if r.match else "")
            continue
        rules.append(_rule(policy, i, r, operation))
    return ServiceRouting(
        subsets=tuple(Subset(s.name, tuple(sorted(s.labels.items()))) for s in policy.subsets),
        rules=tuple(rules),
        ports=frozenset({policy.port}) if policy.port else None,
        source=policy.key,
    )


def _translate(policies: Sequence[Any], ctx: TranslateContext) -> Translation:
    out = Translation()
    for p in sorted(policies, key=lambda x: x.key):
        # the API allows one per service; on a conflict loaded from storage, the first key wins
        out.routing.setdefault(p.service_key, routing_of(p, ctx.registry.service(p.service_key)))
    return out


ROUTING = register_kind(
    PolicyKind(
        name="RoutingPolicy",
        model=RoutingPolicy,
        translate=_translate,
        summary="subsets by instance label, weighted and matched routes, timeout/retry/fault overrides",
        check=_check,
        exclusive=True,
        aliases=("routing", "routingpolicies", "routing-policy"),
    )
)
