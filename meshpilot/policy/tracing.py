"""``TracingPolicy``: the share of requests a service's sidecars trace, per service or namespace.

Sidecars trace with Envoy's Zipkin tracer (B3 and W3C ``traceparent`` propagated), writing spans to
their node's spool (meshpilot/sidecar/traces.py). A policy naming a ``service`` wins over one for its
namespace (no ``service``), which wins over the mesh default of ``DEFAULT_SAMPLING`` percent. The
sampling percentage applies where a trace starts: a request that arrives with a sampling decision in
its B3 or W3C headers keeps that decision. The kind only validates; the percentage in force for a
node (``sampling``, read by policy/mesh.py) becomes the HCM tracing config of its inbound and outbound
listeners (translate/tracing.py), so a change re-sends those listeners. docs/observability.md has the
operator's view.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import Field, field_validator

from meshpilot.model import dns_label, service_key
from meshpilot.policy.kinds import PolicyBase, PolicyKind, TranslateContext, Translation, register_kind
from meshpilot.translate.tracing import DEFAULT_SAMPLING

__all__ = ["DEFAULT_SAMPLING", "TRACING", "TracingPolicy", "sampling"]


class TracingPolicy(PolicyBase):
    """The sampling rate of one service of the policy's namespace, or (no ``service``) of all of them."""

    kind_name = "TracingPolicy"

    service: str | None = Field(default=None, description="the service (in the policy's namespace); omitted: every service of the namespace")
    sampling: float = Field(default=DEFAULT_SAMPLING, ge=0.0, le=100.0,
                            description="percent of requests that start a trace at this service's sidecars (0-100)")

    @field_validator("service")
    @classmethod
    def _service(cls, v: str | None) -> str | None:
        return None if v is None else dns_label(v, "service")

    @field_validator("sampling", mode="before")
    @classmethod
    def _sampling(cls, v: Any) -> Any:
        if isinstance(v, (bool, str)):
            raise ValueError(f"expected a number, a percentage from 0 to 100 such as 1 or 2.5, got {v!r}")
        return v

    def target_services(self) -> set[str]:
        return {service_key(self.service, self.namespace)} if self.service else set()


def sampling(policies: Iterable[TracingPolicy], service: str, namespace: str) -> float:
    """The sampling percentage in force for a service: its own policy's, its namespace's, else the
    default. Two namespace-wide policies (which the API cannot refuse, as they name no service)
    resolve to the first by name."""
    own: TracingPolicy | None = None
    wide: TracingPolicy | None = None
    for p in sorted(policies, key=lambda p: (p.namespace, p.name)):
        if p.namespace != namespace:
            continue
        if p.service == service and own is None:
            own = p
        elif p.service is None and wide is None:
            wide = p
    chosen = own or wide
    return chosen.sampling if chosen is not None else DEFAULT_SAMPLING


def _translate(policies: Sequence[Any], ctx: TranslateContext) -> Translation:
    # the sampling rate shapes the listeners the registry's translation builds (policy/mesh.py)
    return Translation()


TRACING = register_kind(
    PolicyKind(
        name="TracingPolicy",
        model=TracingPolicy,
        translate=_translate,
        summary="trace sampling percentage (0-100) of a service's sidecars, per service or namespace",
        exclusive=True,
        aliases=("tracing", "tracingpolicies", "trace"),
    )
)
