"""The shared model: services, instances, checks and their traffic settings.

One model is used everywhere (registry, management API, SDK front doors, translate/). Values are
frozen pydantic models: validation happens where data enters (an HTTP body, a YAML file, a stored
row) and error messages name the field. Everything downstream trusts these values.
"""

from __future__ import annotations

import functools

import ipaddress
import re
from enum import Enum
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)

__all__ = [
    "PROTOCOLS",
    "ApiOperation",
    "Check",
    "CheckStatus",
    "Instance",
    "Outlier",
    "Protocol",
    "Service",
    "ServicePort",
    "Source",
    "Traffic",
    "ValidationError",
    "dns_label",
    "field_errors",
    "service_key",
]

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?$")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,252}$")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)


def dns_label(value: str, what: str = "value") -> str:
    """``value`` lower-cased, or ValueError naming ``what`` when it is not a DNS label."""
    value = value.lower()
    if not _LABEL.match(value):
        raise ValueError(
            f"{what} must be a DNS label: lower-case letters, digits and '-', 1-63 characters, "
            "starting and ending with a letter or digit"
        )
    return value


class CheckStatus(str, Enum):
    passing = "passing"
    warning = "warning"
    critical = "critical"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {CheckStatus.passing: 0, CheckStatus.warning: 1, CheckStatus.critical: 2}

Protocol = Literal["http", "http2", "grpc", "tcp"]
PROTOCOLS: dict[str, Protocol] = {p: p for p in get_args(Protocol)}  # a name to its Protocol value


class ServicePort(_Frozen):
    name: str = Field(description="port name, a short DNS label such as 'http' or 'grpc'")
    port: int = Field(ge=1, le=65535, description="the port callers use on the service's name or VIP")
    protocol: Protocol = "http"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        v = v.lower()
        if not _PORT_NAME.match(v):
            raise ValueError("port name must be a DNS label of at most 15 characters")
        return v


class ApiOperation(_Frozen):
    """One operation of a service's API, as in OpenAPI: a method and a path template."""

    method: Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "*"] = "*"
    path: str = Field(pattern=r"^/[^\s]*$", max_length=1024)
    name: str | None = Field(default=None, max_length=128)


class Outlier(_Frozen):
    """Passive health checking of a service's instances (Envoy outlier detection)."""

    consecutive_5xx: int = Field(default=5, ge=1, le=1000)
    consecutive_gateway_failure: int = Field(default=5, ge=1, le=1000)
    interval_ms: int = Field(default=10_000, ge=100, le=3_600_000)
    base_ejection_time_ms: int = Field(default=30_000, ge=100, le=3_600_000)
    max_ejection_percent: int = Field(default=50, ge=0, le=100)


class Traffic(_Frozen):
    """Per-service client-side traffic settings; the defaults are what a mesh user expects."""

    timeout_ms: int = Field(default=15_000, ge=0, le=3_600_000, description="route timeout, 0 = none")
    connect_timeout_ms: int = Field(default=1_000, ge=1, le=60_000)
    retries: int = Field(default=2, ge=0, le=10)
    retry_on: str = Field(default="connect-failure,refused-stream,reset", pattern=r"^[a-z0-9,\-]+$")
    per_try_timeout_ms: int = Field(default=0, ge=0, le=3_600_000, description="0 = the route timeout")
    lb_policy: Literal["round_robin", "least_request", "random"] = "least_request"
    zone_aware: bool = True
    outlier: Outlier = Outlier()


class Service(_Frozen):
    name: str = Field(description="service name, a DNS label")
    namespace: str = "default"
    ports: list[ServicePort] = Field(min_length=1, max_length=64)
    labels: dict[str, str] = Field(default_factory=dict)
    apis: list[ApiOperation] = Field(default_factory=list, max_length=1024)
    traffic: Traffic = Traffic()
    vip: str | None = Field(default=None, description="virtual IP, allocated by the control plane")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return dns_label(v, "name")

    @field_validator("namespace")
    @classmethod
    def _ns(cls, v: str) -> str:
        return dns_label(v, "namespace")

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        return _check_labels(v)

    @model_validator(mode="after")
    def _unique_ports(self) -> Service:
        names = [p.name for p in self.ports]
        numbers = [p.port for p in self.ports]
        if len(set(names)) != len(names):
            raise ValueError("ports: port names must be unique")
        if len(set(numbers)) != len(numbers):
            raise ValueError("ports: port numbers must be unique")
        return self

    @property
    def key(self) -> str:
        return service_key(self.name, self.namespace)

    def port(self, name: str) -> ServicePort | None:
        for p in self.ports:
            if p.name == name:
                return p
        return None


class Check(_Frozen):
    id: str = Field(min_length=1, max_length=256)
    owner: str = Field(min_length=1, max_length=64, description="the writer that owns this check")
    status: CheckStatus = CheckStatus.critical
    output: str = Field(default="", max_length=4096)


Source = Literal["mesh", "consul", "eureka", "api"]


def _port_number(value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
    # Consul accepts services without a port (0); such an instance is listed but never routed to.
    # Every other source, and the schema the management API publishes, keep 1-65535.
    if type(value) is int and value == 0 and info.data.get("source") == "consul":
        return 0
    return handler(value)


class Instance(_Frozen):
    id: str = Field(description="instance id, unique in the registry")
    service: str
    namespace: str = "default"
    node: str = Field(default="", max_length=253)
    address: str = Field(description="IPv4 or IPv6 address")
    source: Source = "api"  # before ports: a port 0 is valid only from the Consul API
    ports: dict[str, Annotated[int, Field(ge=1, le=65535), WrapValidator(_port_number)]] = Field(
        description="port per named service port", min_length=1
    )
    zone: str = Field(default="", max_length=128)
    weight: int = Field(default=100, ge=1, le=10_000)
    labels: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, str] = Field(default_factory=dict)
    checks: list[Check] = Field(default_factory=list, max_length=64)
    maintenance: bool = False
    ever_passed: bool = Field(default=False, description="set once the instance has been healthy")

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not _ID.match(v):
            raise ValueError("id must be 1-253 characters of letters, digits and _.:@/-")
        return v

    @field_validator("service")
    @classmethod
    def _service(cls, v: str) -> str:
        return dns_label(v, "service")

    @field_validator("namespace")
    @classmethod
    def _ns(cls, v: str) -> str:
        return dns_label(v, "namespace")

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        try:
            return str(ipaddress.ip_address(v))
        except ValueError:
            raise ValueError("address must be an IPv4 or IPv6 address") from None

    @field_validator("labels", "metadata")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        return _check_labels(v)

    @model_validator(mode="after")
    def _unique_checks(self) -> Instance:
        ids = [c.id for c in self.checks]
        if len(set(ids)) != len(ids):
            raise ValueError("checks: check ids must be unique")
        return self

    @property
    def service_key(self) -> str:
        return service_key(self.service, self.namespace)

    @property
    def health(self) -> CheckStatus:
        """The worst status among the instance's checks; maintenance mode makes it critical."""
        if self.maintenance:
            return CheckStatus.critical
        worst = CheckStatus.passing
        for c in self.checks:
            if c.status.rank > worst.rank:
                worst = c.status
        return worst

    @property
    def routable(self) -> bool:
        """Whether the instance belongs in EDS: healthy once, not critical now, and with a port."""
        return self.ever_passed and self.health is not CheckStatus.critical and all(self.ports.values())


@functools.lru_cache(maxsize=1 << 16)
def service_key(name: str, namespace: str = "default") -> str:
    """A service's registry key; asked for on every read of ``Service.key`` and ``Instance.service_key``,
    so remembered for the names in use."""
    return f"{name.lower()}.{namespace.lower()}"


def _check_labels(v: dict[str, str]) -> dict[str, str]:
    if len(v) > 64:
        raise ValueError("at most 64 entries")
    for k, val in v.items():
        if not k or len(k) > 128 or len(val) > 512:
            raise ValueError(f"entry {k!r}: keys must be 1-128 characters, values at most 512")
    return v


def field_errors(exc: ValidationError) -> list[dict[str, str]]:
    """Pydantic errors as [{field, reason}] with dotted field paths."""
    out = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "(body)"
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        out.append({"field": loc, "reason": msg})
    return out
