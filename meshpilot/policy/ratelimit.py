"""``RateLimitPolicy``: token-bucket limits on calls into one service, enforced by its sidecars.

Limits run in the callee's inbound WASM filter, with buckets for the whole service, per API, by calling
service (``x-mesh-caller``, which the caller's sidecar sets and overwrites) or by a request header.
``rate`` is per sidecar; ``total_rate`` is a cluster-wide rate the control plane divides among the
service's live sidecars by instance weight (each gets its share of the rate and of the burst) and
re-divides when sidecars come and go. policy/governance.py renders the filter configuration per
sidecar and delivers it by ECDS; docs/governance.md has the details.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from meshpilot.model import Service, field_errors
from meshpilot.policy._filterspec import ApiSelector, ReplySpec, Spec, check_rules, op_match, resolve_apis, rule_name
from meshpilot.policy.kinds import PolicyKind, ServicePolicy, TranslateContext, Translation, register_kind

__all__ = ["LIMIT", "HeaderKey", "RateLimitPolicy", "divide", "limit_rules", "per_second"]

_RATE = re.compile(r"^\s*(\d{1,12}(?:\.\d{1,6})?)\s*/\s*([smh])\s*$")
_HEADER = re.compile(r"^[a-z0-9_.\-]{1,128}$")


class HeaderKey(Spec):
    header: str = Field(description="a bucket per value of this request header (lower-case name)")

    @field_validator("header")
    @classmethod
    def _header(cls, v: str) -> str:
        v = v.lower()
        if not _HEADER.match(v):
            raise ValueError("header names are lower-case tokens of letters, digits and _ . -")
        return v


class RateLimitPolicy(ServicePolicy):
    """A token bucket (rate, burst) on calls into one service, per sidecar or cluster-wide."""

    kind_name = "RateLimitPolicy"

    api: ApiSelector | None = Field(default=None, description="only calls to this API (by name, or method + path); omitted: every call")
    per: Literal["service", "api", "caller"] | HeaderKey = Field(
        default="service",
        description="buckets (the filter's key) — service: one; api: one per API of the service; caller: one per calling service; {header: x}: one per header value",
    )
    rate: float | str | None = Field(default=None, description="tokens per second per sidecar: 100, '100/s', '6000/m'")
    total_rate: float | str | None = Field(default=None, description="tokens per second for the whole service, divided among its sidecars by weight")
    burst: int = Field(description="bucket size (with total_rate: for the whole service, divided like the rate)")
    reply: ReplySpec | None = Field(default=None, description="the local reply when limited (default 429, with retry-after)")

    @field_validator("per", mode="before")
    @classmethod
    def _per(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip() in ("service", "api", "caller"):
            return v.strip()
        if isinstance(v, HeaderKey):
            return v
        if isinstance(v, dict):
            try:
                return HeaderKey.model_validate(v)
            except ValidationError as exc:
                first = field_errors(exc)[0]
                raise ValueError(f"{first['field']}: {first['reason']}") from None
        raise ValueError(f"expected service, api, caller or {{header: <name>}}, got {v!r}")


def per_second(value: float | str) -> float:
    """A rate as tokens per second (``100``, ``'100/s'``, ``'6000/m'``, ``'10/h'``); ValueError if not one."""
    if isinstance(value, str):
        m = _RATE.match(value)
        if not m:
            raise ValueError(f"expected tokens per second or a rate like '100/s', '6000/m', got {value!r}")
        return float(m.group(1)) / {"s": 1, "m": 60, "h": 3600}[m.group(2)]
    return float(value)


def divide(total: float, weights: dict[str, int]) -> dict[str, float]:
    """Each member's share of ``total`` in proportion to its weight."""
    whole = sum(max(0, w) for w in weights.values())
    if whole <= 0:
        return {k: 0.0 for k in weights}
    return {k: total * max(0, w) / whole for k, w in weights.items()}


def _key(policy: RateLimitPolicy) -> Any:
    if isinstance(policy.per, HeaderKey):
        return {"header": policy.per.header}
    return {"service": "rule", "api": "rule", "caller": "caller"}[policy.per]


def _rate_and_burst(policy: RateLimitPolicy, fraction: float) -> tuple[Any, int]:
    if policy.total_rate is None:
        return policy.rate, policy.burst
    rate = round(per_second(policy.total_rate) * fraction, 6)
    return max(rate, 0.000001), max(1, round(policy.burst * fraction))


def limit_rules(policy: RateLimitPolicy, service: Service | None, fraction: float = 1.0) -> list[dict[str, Any]]:
    """The filter's rate-limit rules for one sidecar of the service; ``fraction`` is the sidecar's
    share of a ``total_rate`` (ignored for per-sidecar ``rate``)."""
    if (policy.rate is None) == (policy.total_rate is None):
        return []
    rate, burst = _rate_and_burst(policy, fraction)
    common: dict[str, Any] = {"key": _key(policy), "rate": rate, "burst": burst}
    common["reply"] = policy.reply.as_filter() if policy.reply is not None else {"status": 429, "body": "rate limited\n"}
    base = rule_name(policy.name, policy.namespace)
    if policy.per == "api":
        if policy.api is not None:
            apis = [(sel.label(), m) for sel, m in resolve_apis([policy.api], service)]
        else:
            apis = [(op.name or f"{op.method} {op.path}", op_match(op)) for op in (service.apis if service else [])]
        return [{"name": rule_name(policy.name, policy.namespace, label), "match": m, **common} for label, m in apis]
    match: dict[str, str] = {}
    if policy.api is not None:
        resolved = resolve_apis([policy.api], service)
        if not resolved:
            return []  # a named API the service does not declare (yet): nothing to limit
        match = resolved[0][1]
    return [{"name": base, "match": match, **common}]


def _field_of(policy: RateLimitPolicy, index: int, field: str) -> str:
    head, _, rest = field.partition(".")
    if head == "match":
        return f"api.{rest or 'path'}"
    if head == "reply":
        return "reply" + ("." + rest if rest else "")
    if head == "rate":
        return "total_rate" if policy.total_rate is not None else "rate"
    if head == "key":
        return "per.header" if isinstance(policy.per, HeaderKey) else "per"
    return field or "(body)"


def _check(policy: RateLimitPolicy) -> list[dict[str, str]]:
    problems: list[dict[str, str]] = []
    if (policy.rate is None) == (policy.total_rate is None):
        problems.append({"field": "rate", "reason": "give exactly one of rate (per sidecar) or total_rate (for the whole service)"})
    if policy.api is not None and policy.api.route is not None:
        problems.append({"field": "api.route", "reason": "limits run in the service's inbound listener, which has no per-API routes: select by name or method + path"})
    if policy.per == "api" and policy.api is not None:
        problems.append({"field": "per", "reason": "per: api makes a bucket per API of the service; with one api selected use per: service"})
    for name in ("rate", "total_rate"):
        value = getattr(policy, name)
        if value is None:
            continue
        try:
            per_second(value)
        except ValueError as exc:
            problems.append({"field": name, "reason": str(exc)})
    if problems:
        return problems
    rule: dict[str, Any] = {"name": "r0", "key": _key(policy), "burst": policy.burst}
    rule["rate"] = policy.rate if policy.rate is not None else policy.total_rate
    if policy.api is not None and policy.api.named is None:
        rule["match"] = resolve_apis([policy.api], None)[0][1]
    if policy.reply is not None:
        rule["reply"] = policy.reply.as_filter()
    return check_rules("rate_limits", [rule], lambda i, f: _field_of(policy, i, f))


def _translate(policies: Sequence[Any], ctx: TranslateContext) -> Translation:
    # Per-sidecar shares need the connected sidecars; policy/governance.py renders them.
    return Translation()


LIMIT = register_kind(
    PolicyKind(
        name="RateLimitPolicy",
        model=RateLimitPolicy,
        translate=_translate,
        summary="token-bucket limits on calls into a service (per sidecar or cluster-wide), in its sidecars (WASM)",
        check=_check,
        exclusive=False,
        aliases=("ratelimit", "rate-limit", "ratelimitpolicies", "limit"),
    )
)
