"""``MtlsPolicy``: the mutual-TLS mode of one service, or of every service of a namespace.

With workload identities on (settings ``identity``), sidecars talk mutual TLS in the mode the
destination service is in: ``STRICT`` (TLS only), ``PERMISSIVE`` (TLS from sidecars with an
identity, plaintext from everyone else) or ``DISABLE`` (plaintext, the trusted-peers rule for the
caller header). A policy naming a ``service`` wins over one for its namespace (no ``service``),
which wins over the mesh-wide ``mtls_mode`` setting. The kind only validates; the policies in force
become a ``TlsSettings`` (translate/tls.py) through ``modes`` (read by policy/mesh.py), which
shapes callers' clusters (STRICT: TLS to every endpoint, no plaintext fallback; PERMISSIVE: TLS to
the endpoints of sidecars with an identity) and callees' inbound listeners. docs/policy.md has the
operator's view.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

from pydantic import Field, field_validator

from meshpilot.model import dns_label, service_key
from meshpilot.policy.kinds import PolicyBase, PolicyKind, TranslateContext, Translation, register_kind

__all__ = ["MTLS", "MtlsPolicy", "modes"]


class MtlsPolicy(PolicyBase):
    """The mTLS mode of one service of the policy's namespace, or (no ``service``) of all of them."""

    kind_name = "MtlsPolicy"

    service: str | None = Field(default=None, description="the service (in the policy's namespace); omitted: every service of the namespace")
    mode: Literal["DISABLE", "PERMISSIVE", "STRICT"] = Field(description="STRICT: mutual TLS only; PERMISSIVE: mutual TLS or plaintext; DISABLE: plaintext")

    @field_validator("service")
    @classmethod
    def _service(cls, v: str | None) -> str | None:
        return None if v is None else dns_label(v, "service")

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, v: Any) -> Any:
        return v.strip().upper() if isinstance(v, str) else v

    def target_services(self) -> set[str]:
        return {service_key(self.service, self.namespace)} if self.service else set()


def modes(policies: Iterable[MtlsPolicy]) -> tuple[dict[str, str], dict[str, str]]:
    """(service key → mode, namespace → mode) of the policies in force. Two policies for the same
    namespace (which the API cannot refuse, as they name no service) resolve to the first by name."""
    by_service: dict[str, str] = {}
    by_namespace: dict[str, str] = {}
    for p in sorted(policies, key=lambda p: (p.namespace, p.name)):
        if p.service:
            by_service.setdefault(service_key(p.service, p.namespace), p.mode)
        else:
            by_namespace.setdefault(p.namespace, p.mode)
    return by_service, by_namespace


def _translate(policies: Sequence[Any], ctx: TranslateContext) -> Translation:
    # the modes shape clusters and listeners the registry's translation builds (policy/mesh.py)
    return Translation()


MTLS = register_kind(
    PolicyKind(
        name="MtlsPolicy",
        model=MtlsPolicy,
        translate=_translate,
        summary="mutual TLS mode (STRICT, PERMISSIVE, DISABLE) per service or namespace",
        exclusive=True,
        aliases=("mtls", "mtlspolicies", "peerauthentication"),
    )
)
