"""``CircuitBreakerPolicy``: a circuit breaker in front of one service, for callers' sidecars.

The service-level (or per-API) breaker runs in every caller's outbound WASM filter (closed → open
by failure or slow-call rate over a sliding window, local 503 while open, a few probes half-open);
its ``instance`` section becomes Envoy outlier detection on the service's clusters, which ejects
single failing instances (a filter cannot steer host selection). The kind only validates and
describes; ``policy/governance.py`` turns the policies in force into the filter's configuration
(delivered by ECDS) and into the clusters' outlier overrides. docs/governance.md has the mapping.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field

from meshpilot.model import Outlier, Service
from meshpilot.policy._filterspec import ApiSelector, ReplySpec, Spec, check_rules, op_match, resolve_apis, rule_name
from meshpilot.policy.kinds import PolicyKind, ServicePolicy, TranslateContext, Translation, register_kind

__all__ = ["BREAKER", "CircuitBreakerPolicy", "InstanceSpec", "breaker_rules", "outlier_of"]


class InstanceSpec(Spec):
    """Instance-level breaking: Envoy outlier detection on the service's clusters."""

    consecutive_5xx: int = Field(default=5, ge=1, le=1000, description="eject an instance after this many 5xx in a row")
    consecutive_gateway_failure: int = Field(default=5, ge=1, le=1000, description="... or this many 502/503/504 in a row")
    interval_ms: int = Field(default=10_000, ge=100, le=3_600_000, description="ejection analysis sweep interval")
    base_ejection_time_ms: int = Field(default=30_000, ge=100, le=3_600_000, description="first ejection lasts this long (times the ejection count)")
    max_ejection_percent: int = Field(default=50, ge=0, le=100, description="never eject more than this share of instances")


class CircuitBreakerPolicy(ServicePolicy):
    """A breaker guarding one service (per service or per API), enforced by callers' sidecars."""

    kind_name = "CircuitBreakerPolicy"

    port: str | None = Field(default=None, description="only this port name; omitted: every HTTP/gRPC port")
    per: Literal["service", "api"] = Field(default="service", description="service: one breaker per service cluster; api: one per API")
    apis: list[ApiSelector] = Field(default_factory=list, max_length=16, description="per: api — the APIs with a breaker each; omitted: every API the service declares")
    sliding_window_type: Literal["count", "time"] = "count"
    sliding_window_size: int = Field(default=100, description="calls (count, 1..4096) or seconds (time, 1..600)")
    minimum_calls: int | None = Field(default=None, description="calls in the window before the rates count; default min(10, window size)")
    failure_rate_threshold: float = Field(default=50, description="percent of failed calls that opens the breaker")
    failure_status_codes: list[int | str] = Field(default_factory=lambda: list[int | str](["5xx"]), description="statuses that count as failures: 503, '5xx', '500-504'")
    slow_call_duration: float | str = Field(default=0, description="seconds or '500ms'; 0: no slow-call tracking")
    slow_call_rate_threshold: float = Field(default=100, description="percent of slow calls that opens the breaker")
    wait_duration_in_open: float | str = Field(default=30, description="seconds or '30s' before the first half-open probe")
    permitted_calls_in_half_open: int = Field(default=3, description="probes let through half-open, 1..1000")
    reply: ReplySpec | None = Field(default=None, description="the local reply while open (default 503)")
    instance: InstanceSpec | None = Field(default=None, description="outlier detection for the service's clusters; omitted: the service's own")


    def settings(self) -> dict[str, Any]:
        """The filter's breaker fields (everything but name and match)."""
        out: dict[str, Any] = {
            "sliding_window_type": self.sliding_window_type,
            "sliding_window_size": self.sliding_window_size,
            "failure_rate_threshold": self.failure_rate_threshold,
            "failure_status_codes": list(self.failure_status_codes),
            "slow_call_duration": self.slow_call_duration,
            "slow_call_rate_threshold": self.slow_call_rate_threshold,
            "wait_duration_in_open": self.wait_duration_in_open,
            "permitted_calls_in_half_open": self.permitted_calls_in_half_open,
        }
        if self.minimum_calls is not None:
            out["minimum_calls"] = self.minimum_calls
        if self.reply is not None:
            out["reply"] = self.reply.as_filter()
        return out


_SETTING_FIELDS = {
    "sliding_window_type", "sliding_window_size", "minimum_calls", "failure_rate_threshold",
    "failure_status_codes", "slow_call_duration", "slow_call_rate_threshold", "wait_duration_in_open",
    "permitted_calls_in_half_open",
}


def _field_of(policy: CircuitBreakerPolicy, index: int, field: str) -> str:
    head, _, rest = field.partition(".")
    head = head.split("[")[0]
    if head == "match" and policy.per == "api" and policy.apis:
        return f"apis.{index}.{rest or 'path'}"
    if head == "reply":
        return "reply" + ("." + rest if rest else "")
    if head in _SETTING_FIELDS:
        return field.replace("[", ".").replace("]", "")
    return field or "(body)"


def _check(policy: CircuitBreakerPolicy) -> list[dict[str, str]]:
    problems: list[dict[str, str]] = []
    if policy.per == "service" and policy.apis:
        problems.append({"field": "apis", "reason": "apis select per-API breakers: set per: api, or remove apis"})
    # render with the filter's encoder: the filter accepts exactly what it accepts
    rules = []
    selectors = policy.apis if policy.per == "api" and policy.apis else [None]
    for i, sel in enumerate(selectors):
        match: dict[str, str] = {"cluster": "outbound|1||validate.svc.mesh"}
        if sel is not None and sel.named is None:
            match.update(resolve_apis([sel], None)[0][1])
        rules.append({"name": f"r{i}", "match": match, **policy.settings()})
    problems += check_rules("breakers", rules, lambda i, f: _field_of(policy, i, f))
    return problems


def breaker_rules(policy: CircuitBreakerPolicy, service: Service, clusters: Sequence[str]) -> list[dict[str, Any]]:
    """The filter's breaker rules for one policy: per service, one rule per cluster (a breaker per
    upstream cluster); per API, one rule per cluster and API (independent breakers)."""
    base = rule_name(policy.name, policy.namespace)
    settings = policy.settings()
    rules: list[dict[str, Any]] = []
    if policy.per == "service":
        for k, cluster in enumerate(clusters):
            name = base if k == 0 else rule_name(policy.name, policy.namespace, str(k))
            rules.append({"name": name, "match": {"cluster": cluster}, "per": "service", **settings})
        return rules
    if policy.apis:
        apis = [(sel.label(), m) for sel, m in resolve_apis(policy.apis, service)]
    else:
        apis = [(op.name or f"{op.method} {op.path}", op_match(op)) for op in service.apis]
    for k, cluster in enumerate(clusters):
        for label, match in apis:
            parts = [policy.name, policy.namespace, label] + ([str(k)] if k else [])
            rules.append({"name": rule_name(*parts), "match": {"cluster": cluster, **match}, "per": "rule", **settings})
    return rules


def outlier_of(policy: CircuitBreakerPolicy) -> Outlier | None:
    """The outlier detection the policy's ``instance`` section asks for, if any."""
    if policy.instance is None:
        return None
    return Outlier(**policy.instance.model_dump())


def _translate(policies: Sequence[Any], ctx: TranslateContext) -> Translation:
    # Filter configuration and outlier overrides need the services' clusters and the connected
    # sidecars; policy/governance.py builds them from the engine's policies on every rebuild.
    return Translation()


BREAKER = register_kind(
    PolicyKind(
        name="CircuitBreakerPolicy",
        model=CircuitBreakerPolicy,
        translate=_translate,
        summary="circuit breaker per service or API in callers' sidecars (WASM), instance ejection by outlier detection",
        check=_check,
        exclusive=True,
        aliases=("breaker", "circuitbreaker", "circuitbreakerpolicies", "circuit-breaker"),
    )
)
