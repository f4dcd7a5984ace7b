"""The registry of policy kinds: what a kind is, how its objects are validated and translated.

A kind is a pydantic model (the object operators write, validated at the edge with field-level
errors), a semantic check for what pydantic cannot express (references between fields, unreachable
routes), and a translate hook that turns every policy of the kind into xDS inputs: routing overlays
for services (consumed when clusters, endpoints and routes are built) and shared resources (for
example ECDS filter configs). Kinds register themselves with ``register_kind``; the API, the CLI
and the control-plane plugin only ever speak to this registry, so a new kind plugs in without
touching them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from google.protobuf.message import Message
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from meshpilot.model import dns_label, field_errors, service_key

if TYPE_CHECKING:
    from meshpilot.registry import Registry
    from meshpilot.translate.routes import ServiceRouting

__all__ = [
    "PolicyBase",
    "ServicePolicy",
    "PolicyInvalid",
    "PolicyKind",
    "TranslateContext",
    "Translation",
    "get_kind",
    "kinds",
    "parse_key",
    "policy_key",
    "register_kind",
]

class PolicyBase(BaseModel):
    """Fields every policy has. A kind's model adds its own and says which services it targets."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)
    kind_name: ClassVar[str] = ""

    name: str = Field(description="policy name, a DNS label, unique per kind and namespace")
    namespace: str = Field(default="default", description="the policy's namespace; services it names are in it")
    description: str = Field(default="", max_length=1024)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return dns_label(v, "name")

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        return dns_label(v, "namespace")

    @property
    def key(self) -> str:
        return policy_key(self.kind_name, self.namespace, self.name)

    def target_services(self) -> set[str]:
        """Keys of the services this policy governs (the registry files it under the first)."""
        return set()


class ServicePolicy(PolicyBase):
    """A policy that governs one service of its namespace (and, where the kind has ``port``, one
    of its ports)."""

    service: str = Field(description="the target service's name (in the policy's namespace)")

    @field_validator("service")
    @classmethod
    def _service(cls, v: str) -> str:
        return dns_label(v, "service")

    @field_validator("port", check_fields=False)
    @classmethod
    def _port(cls, v: str | None) -> str | None:
        return None if v is None else dns_label(v, "port")

    @property
    def service_key(self) -> str:
        return service_key(self.service, self.namespace)

    def target_services(self) -> set[str]:
        return {self.service_key}


class PolicyInvalid(Exception):
    """A policy failed validation; ``fields`` are ``[{field, reason}]`` with dotted paths."""

    def __init__(self, fields: list[dict[str, str]]) -> None:
        super().__init__("; ".join(f"{f['field']}: {f['reason']}" for f in fields))
        self.fields = fields


@dataclass(slots=True)
class TranslateContext:
    registry: Registry
    domain: str


@dataclass(slots=True)
class Translation:
    """What a kind's policies become: routing overlays per service key, and shared resources
    (type URL → name → resource) that the control plane puts into the cache as they are."""

    routing: dict[str, ServiceRouting] = field(default_factory=dict)
    resources: dict[str, dict[str, Message | bytes]] = field(default_factory=dict)


Translate = Callable[[Sequence[Any], TranslateContext], Translation]
Check = Callable[[Any], list[dict[str, str]]]


@dataclass(frozen=True, slots=True)
class PolicyKind:
    name: str  # e.g. "RoutingPolicy"; also the first part of stored keys
    model: type[PolicyBase]
    translate: Translate
    summary: str = ""
    check: Check | None = None  # semantic checks beyond the model: [{field, reason}]
    exclusive: bool = False  # at most one policy of this kind per target service
    aliases: tuple[str, ...] = ()  # other names accepted in URLs and the CLI (lower-case)

    def validate(self, data: Any) -> PolicyBase:
        """The policy object for ``data``, or PolicyInvalid naming every bad field."""
        if isinstance(data, dict) and "kind" in data:
            if str(data["kind"]).lower() not in self.names():
                raise PolicyInvalid([{"field": "kind", "reason": f"expected {self.name}, got {data['kind']!r}"}])
            data = {k: v for k, v in data.items() if k != "kind"}
        try:
            policy = self.model.model_validate(data)
        except ValidationError as exc:
            raise PolicyInvalid(field_errors(exc)) from None
        problems = self.check(policy) if self.check else []
        if problems:
            raise PolicyInvalid(problems)
        return policy

    def names(self) -> set[str]:
        return {self.name.lower(), *self.aliases}

    def document(self, policy: PolicyBase) -> dict[str, Any]:
        """The stored and returned form: the policy's fields plus ``kind``."""
        return {"kind": self.name, **policy.model_dump(mode="json")}


_KINDS: dict[str, PolicyKind] = {}


def register_kind(kind: PolicyKind) -> PolicyKind:
    if not kind.model.kind_name:
        raise ValueError(f"{kind.model.__name__}.kind_name must be set")
    if kind.model.kind_name != kind.name:
        raise ValueError(f"{kind.model.__name__}.kind_name is {kind.model.kind_name!r}, the kind is {kind.name!r}")
    _KINDS[kind.name] = kind
    return kind


def kinds() -> list[PolicyKind]:
    return [_KINDS[k] for k in sorted(_KINDS)]


def get_kind(name: str) -> PolicyKind | None:
    """A kind by its name or an alias, case-insensitive."""
    low = name.lower()
    for kind in _KINDS.values():
        if low in kind.names():
            return kind
    return None


def policy_key(kind: str, namespace: str, name: str) -> str:
    return f"{kind}/{namespace}/{name}"


def parse_key(key: str) -> tuple[PolicyKind, str, str] | None:
    """(kind, namespace, name) of a stored policy key, or None for any other key."""
    parts = key.split("/")
    if len(parts) != 3:
        return None
    kind = _KINDS.get(parts[0])
    if kind is None:
        return None
    return kind, parts[1], parts[2]
