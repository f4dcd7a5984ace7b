"""What a sidecar node's metadata says about its app: the instance to register and the check its
Envoy must run. Pure: a NodeInfo in, a Registration (or an HdsError naming the metadata field) out.

The keys are the node-metadata contract in ``meshpilot.xds.resource.META``, written by the
sidecar's bootstrap; here they are validated where they enter the registry.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Final, Literal

from meshpilot.model import Check, CheckStatus, Instance, ValidationError, field_errors
from meshpilot.xds.resource import META, NodeInfo

__all__ = ["CHECK_ID", "OWNER", "SOURCE", "CheckPlan", "HdsError", "Registration", "registration"]

CHECK_ID = "hds"  # the check HDS reports drive
OWNER = "hds"
SOURCE: Final = "mesh"  # instances registered over HDS


class HdsError(ValueError):
    """Node metadata that cannot describe an instance; names the metadata field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"node.metadata.{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True, slots=True)
class CheckPlan:
    """What the node's Envoy is told to check, and how often."""

    kind: Literal["http", "tcp"]
    address: str
    port: int
    path: str = "/"
    host: str = ""
    interval_s: float = 5.0
    timeout_s: float = 1.0
    healthy_threshold: int = 1
    unhealthy_threshold: int = 3

    @property
    def cycle_s(self) -> float:
        """One check: Envoy reports a host failed until its first check has completed."""
        return self.interval_s + self.timeout_s


@dataclass(frozen=True, slots=True)
class Registration:
    instance: Instance
    plan: CheckPlan

    @property
    def cluster(self) -> str:
        return f"hds|{self.instance.id}"


def _number(md: dict[str, Any], key: str, default: float, lo: float, hi: float, where: str) -> float:
    v = md.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise HdsError(f"{where}.{key}", f"must be a number between {lo} and {hi}")
    try:
        n = float(v)
    except ValueError:
        raise HdsError(f"{where}.{key}", f"must be a number between {lo} and {hi}, got {v!r}") from None
    if not lo <= n <= hi or n != n:
        raise HdsError(f"{where}.{key}", f"must be between {lo} and {hi}, got {v!r}")
    return n


def _str_map(v: Any, where: str) -> dict[str, str]:
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise HdsError(where, "must be a mapping of strings to strings")
    return dict(v)


def _wildcard(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_unspecified
    except ValueError:
        return False


def registration(node: NodeInfo) -> Registration:
    """The instance a sidecar node stands for and the check its Envoy must run. Pure."""
    md = node.extra if isinstance(node.extra, dict) else {}
    if not node.service:
        raise HdsError(META.SERVICE, "a sidecar node must name its service")
    if not node.inbound_port:
        raise HdsError(META.INBOUND_PORT, "a sidecar node needs an inbound port between 1 and 65535")
    if not node.app_port:
        raise HdsError(META.APP_PORT, "a sidecar node needs its app's port between 1 and 65535")
    address = node.address
    if _wildcard(address):
        raise HdsError(META.ADVERTISE_ADDRESS, f"{META.BIND_ADDRESS} is {address}; set an address callers can reach")
    port_name = md.get(META.PORT_NAME, "http")
    if not isinstance(port_name, str) or not port_name:
        raise HdsError(META.PORT_NAME, "must be the name of one of the service's ports")
    hc = md.get(META.HEALTH_CHECK, {})
    if not isinstance(hc, dict):
        raise HdsError(META.HEALTH_CHECK, "must be a mapping")
    kind = hc.get("kind", "tcp")
    if kind not in ("http", "tcp"):
        raise HdsError(f"{META.HEALTH_CHECK}.kind", f"must be 'http' or 'tcp', got {kind!r}")
    path = hc.get("path", "/")
    if not isinstance(path, str) or not path.startswith("/") or len(path) > 1024:
        raise HdsError(f"{META.HEALTH_CHECK}.path", "must be an absolute path such as /healthz")
    w = META.HEALTH_CHECK
    interval = _number(hc, "interval_s", 5.0, 0.05, 3600, w)
    timeout = _number(hc, "timeout_s", 1.0, 0.01, 600, w)
    healthy = int(_number(hc, "healthy_threshold", 1, 1, 100, w))
    unhealthy = int(_number(hc, "unhealthy_threshold", 3, 1, 100, w))
    weight = int(_number(md, META.WEIGHT, 100, 1, 10_000, "") if META.WEIGHT in md else 100)
    if kind == "http":
        # through the inbound listener: healthy then means callers can reach the app
        check_addr = "127.0.0.1" if _wildcard(node.bind_address) else node.bind_address
        check_port = node.inbound_port
    else:
        check_addr, check_port = node.app_address, node.app_port
    plan = CheckPlan(kind, check_addr, check_port, path, node.service, interval, timeout, healthy, unhealthy)
    try:
        inst = Instance(
            id=node.id,
            service=node.service,
            namespace=node.namespace,
            node=node.id,
            address=address,
            ports={port_name: node.inbound_port},
            zone=node.zone,
            weight=weight,
            labels=_str_map(md.get(META.LABELS), META.LABELS),
            metadata={"sidecar": "true"},
            source=SOURCE,
            checks=[Check(id=CHECK_ID, owner=OWNER, status=CheckStatus.critical, output="waiting for the first health report")],
        )
    except ValidationError as exc:
        f = field_errors(exc)[0]
        raise HdsError(f["field"], f["reason"]) from None
    return Registration(inst, plan)
