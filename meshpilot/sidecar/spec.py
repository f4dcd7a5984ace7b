"""spec.yaml: what a sidecar needs to know about the app it fronts.

The document is a Kubernetes Service (``apiVersion``, ``kind: Service``, ``metadata`` with name,
namespace and labels, ``spec.ports`` with name/port/targetPort/protocol/appProtocol), so the same
file describes the service in a cluster and on a VM, plus a ``mesh`` section for what a VM needs:
the app's health check, zone and weight, drain time, an optional pre-stop command, an optional
``app`` the agent starts and supervises, the sidecar's own ports, the node's meshdns (``dns``, on by
default), the node's workload identity (``identity``: join token and trust bundle files, off by default),
the node's spans (``tracing``: receiver port, spool bounds, backend; on by default), the node's logs
(``logs``: Envoy's access log and app log files, spool bounds; on by default),
the control plane's replicas (``controlPlanes``: the list ``--control-plane`` gives, which overrides it) and an
optional API list.

``load_spec(text)`` validates and returns a frozen ``SidecarSpec``; every error names the field
(``spec.ports.0.targetPort: ...``). Pure: no I/O besides parsing the given text.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from meshpilot.model import PROTOCOLS, ApiOperation, Protocol, Service, ServicePort, field_errors

__all__ = ["DnsSpec", "IdentitySpec", "LogFileSpec", "LogsSpec", "SpecError", "SidecarSpec", "TracingSpec", "load_spec", "parse_duration"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")


class SpecError(ValueError):
    """A spec that cannot be used; ``fields`` is [{field, reason}]."""

    def __init__(self, fields: list[dict[str, str]]) -> None:
        self.fields = fields
        super().__init__("; ".join(f"{f['field']}: {f['reason']}" for f in fields))


def parse_duration(v: Any) -> float:
    """Seconds from ``1.5``, ``"1.5"``, ``"500ms"``, ``"2s"`` or ``"1m"``."""
    if isinstance(v, bool):
        raise ValueError("must be a duration such as 500ms, 2s or 1m")
    if isinstance(v, (int, float)):
        n = float(v)
    elif isinstance(v, str):
        m = _DURATION.match(v)
        if not m:
            raise ValueError(f"must be a duration such as 500ms, 2s or 1m, got {v!r}")
        n = float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[m.group(2)]
    else:
        raise ValueError("must be a duration such as 500ms, 2s or 1m")
    if n != n or n < 0 or n > 86_400:
        raise ValueError(f"must be between 0 and 24h, got {v!r}")
    return n


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, str_strip_whitespace=True)


def _durations(*names: str) -> Any:
    """A before-validator turning duration strings of these fields into seconds."""
    return field_validator(*names, mode="before")(lambda cls, v: parse_duration(v))


_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class Metadata(_Model):
    name: str
    namespace: str = "default"
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @field_validator("name", "namespace")
    @classmethod
    def _dns_label(cls, v: str) -> str:
        if not _LABEL.match(v):
            raise ValueError("must be a DNS label: lower-case letters, digits and '-', 1-63 characters")
        return v


class PortSpec(_Model):
    name: str
    port: int = Field(ge=1, le=65535)
    targetPort: int | None = Field(default=None, ge=1, le=65535, description="the app's port (default: port)")
    protocol: str = "TCP"
    appProtocol: str | None = None

    @field_validator("appProtocol")
    @classmethod
    def _app_protocol(cls, v: str | None) -> str | None:
        if v is not None and v.lower() not in ("http", "http2", "grpc", "tcp", "h2c", "kubernetes.io/h2c"):
            raise ValueError(f"must be http, http2, grpc, tcp or kubernetes.io/h2c, got {v!r}")
        return v

    @field_validator("targetPort", mode="before")
    @classmethod
    def _target(cls, v: Any) -> Any:
        if isinstance(v, str) and not v.isdigit():
            raise ValueError("named target ports are not supported outside Kubernetes; give the app's port number")
        return v

    @property
    def mesh_protocol(self) -> Protocol:
        """appProtocol first, then a mesh protocol in ``protocol``, then the port name's prefix
        (``http``, ``http-web``, ``grpc-api``), as Kubernetes meshes do; otherwise plain TCP."""
        for candidate in (self.appProtocol, self.protocol if self.protocol.upper() != "TCP" else None):
            p = (candidate or "").lower()
            if p in PROTOCOLS:
                return PROTOCOLS[p]
            if p in ("kubernetes.io/h2c", "h2c"):
                return "http2"
        prefix = self.name.split("-", 1)[0].lower()
        return PROTOCOLS.get(prefix, "tcp")

    @field_validator("protocol")
    @classmethod
    def _protocol(cls, v: str) -> str:
        if v.upper() in ("UDP", "SCTP"):
            raise ValueError(f"{v} is not carried by the mesh; use TCP (or http, http2, grpc, tcp)")
        if v.upper() != "TCP" and v.lower() not in ("http", "http2", "grpc", "tcp"):
            raise ValueError(f"must be TCP, http, http2, grpc or tcp, got {v!r}")
        return v


class ServiceSpecBody(_Model):
    ports: list[PortSpec] = Field(min_length=1, max_length=64)
    selector: dict[str, str] = Field(default_factory=dict)
    type: str = "ClusterIP"


class HttpCheck(_Model):
    path: str = Field(default="/", pattern=r"^/[^\s]*$", max_length=1024)


class TcpCheck(_Model):
    pass


class HealthCheck(_Model):
    _d = _durations("interval", "timeout")
    http: HttpCheck | None = None
    tcp: TcpCheck | None = None
    interval: float = Field(default=5.0, ge=0.05, le=3600)
    timeout: float = Field(default=1.0, ge=0.01, le=600)
    healthyThreshold: int = Field(default=1, ge=1, le=100)
    unhealthyThreshold: int = Field(default=3, ge=1, le=100)

    @model_validator(mode="after")
    def _one_kind(self) -> HealthCheck:
        if self.http is not None and self.tcp is not None:
            raise ValueError("give either http or tcp, not both")
        return self

    @property
    def kind(self) -> Literal["http", "tcp"]:
        return "http" if self.http is not None else "tcp"


class AppSpec(_Model):
    _d = _durations("stopTimeout")
    command: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    workingDir: str | None = None
    stopTimeout: float = Field(default=10.0, ge=0, le=600)

    @field_validator("command")
    @classmethod
    def _command(cls, v: list[str]) -> list[str]:
        if not v[0]:
            raise ValueError("the first element must be the program to run")
        return v


class PreStop(_Model):
    _d = _durations("timeout")
    command: list[str] = Field(min_length=1)
    timeout: float = Field(default=30.0, ge=0, le=3600)


class SidecarPorts(_Model):
    adminPort: int = Field(default=15000, ge=0, le=65535)
    # the read-only Prometheus listener (GET /stats/prometheus only) on bindAddress: unset means 15090, or
    # none when adminPort is 0 (it relays to the admin, so it needs the admin's port); 0 turns it off
    statsPort: int | None = Field(default=None, ge=0, le=65535)
    outboundPort: int = Field(default=15001, ge=0, le=65535)
    inboundPort: int = Field(default=15006, ge=1, le=65535)
    bindAddress: str = "127.0.0.1"
    advertiseAddress: str | None = None
    capture: bool = False
    port: str | None = Field(default=None, description="the spec port the sidecar fronts (default: the first)")


def _hostport(text: str, default_port: int) -> tuple[str, int]:
    """``"10.0.0.2"``, ``"10.0.0.2:5353"``, ``"[::1]:53"`` or ``"::1"`` → (IP address, port), or ValueError."""
    from meshpilot.meshdns.config import parse_hostport

    try:
        host, port = parse_hostport(text, default_port)
    except ValueError:
        raise ValueError(f"must be an IP address with an optional :PORT, got {text!r}") from None
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        raise ValueError(f"must be an IP address (not a host name) with an optional :PORT, got {text!r}") from None
    return host, port


def _upstream(text: str) -> str:
    host, port = _hostport(text, 53)
    if port == 0:
        raise ValueError(f"port 0 is not a resolver's port, got {text!r}")
    return text


_DNS_NAME = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?$")


def _dns_name(text: str) -> str:
    if len(text) > 253 or not _DNS_NAME.match(text):
        raise ValueError(f"must be a DNS name such as shop.svc.mesh, got {text!r}")
    return text.rstrip(".").lower()


class DnsSpec(_Model):
    """The node's meshdns, run by the agent: mesh names to VIPs, the rest forwarded (docs/meshdns.md)."""

    _d = _durations("upstreamTimeout")
    enabled: bool = True
    listen: str = Field(default="127.0.0.1:15053", description="UDP and TCP address; port 0 picks one")
    upstreams: list[Annotated[str, AfterValidator(_upstream)]] | None = Field(
        default=None, max_length=16, description="resolvers for other names (default: /etc/resolv.conf)")
    search: list[Annotated[str, AfterValidator(_dns_name)]] | None = Field(
        default=None, max_length=16, description="suffixes mesh names are also answered under "
                                                 "(default: <namespace>.svc.<domain>, svc.<domain>)")
    domain: Annotated[str, AfterValidator(_dns_name)] = "mesh"
    ttl: int = Field(default=30, ge=0, le=86_400)
    upstreamTimeout: float = Field(default=1.5, ge=0.05, le=60)
    upstreamMark: int | None = Field(default=0x539, ge=1, le=2**32 - 1,
                                     description="SO_MARK on upstream queries: the capture rules' exempt mark")

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        _hostport(v, 15053)
        return v

    @field_validator("upstreamMark", mode="before")
    @classmethod
    def _mark(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("must be a number such as 0x539, or null")
        if isinstance(v, str):
            try:
                return int(v, 0)
            except ValueError:
                raise ValueError(f"must be a number such as 0x539, or null, got {v!r}") from None
        return v

    @property
    def listen_address(self) -> tuple[str, int]:
        return _hostport(self.listen, 15053)

    @property
    def upstream_addresses(self) -> list[tuple[str, int]]:
        return [_hostport(u, 53) for u in self.upstreams or ()]

    def search_suffixes(self, namespace: str) -> list[str]:
        if self.search is not None:
            return list(self.search)
        return [f"{namespace}.svc.{self.domain}", f"svc.{self.domain}"]


class IdentitySpec(_Model):
    """The node's workload identity (docs/sidecar.md#identity); the agent's --trust-bundle and
    --join-token-file override the files, and a trust bundle from either turns it on."""

    enabled: bool = False
    joinTokenFile: str | None = Field(default=None, min_length=1, description="a join token, read at enrolment")
    trustBundleFile: str | None = Field(default=None, min_length=1,
                                        description="PEM roots the control plane's certificate is checked against")
    trustDomain: str | None = Field(default=None, pattern=r"^[a-z0-9]([a-z0-9.-]{0,253}[a-z0-9])?$",
                                    description="default: the trust domain of the issued certificate")
    controlPlaneName: str | None = Field(default=None, min_length=1, max_length=253,
                                         description="the name the control plane's certificate is checked for")


class TracingSpec(_Model):
    """The node's spans (docs/observability.md#tracing): Envoy reports them to the agent's receiver on
    loopback, the agent keeps them in bounded files and ships them to the control plane or ``backend``."""

    enabled: bool = True
    port: int = Field(default=0, ge=0, le=65535, description="loopback port of the agent's span receiver; 0 picks one")
    maxFileBytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=1024**3, description="size of one spool file")
    maxFiles: int = Field(default=8, ge=2, le=10_000, description="spool files kept; when full the oldest is dropped")
    backend: str | None = Field(default=None, pattern=r"^https?://[^\s]+$", max_length=2048,
                                description="a Zipkin v2 (POST .../api/v2/spans) or OTLP/HTTP (POST .../v1/traces) URL; "
                                            "default: the control plane's /v1/spans")
    backendFormat: Literal["zipkin", "otlp"] = Field(default="zipkin", description="what ``backend`` speaks")
    backendHeaders: dict[str, str] = Field(default_factory=dict, max_length=32, description="extra headers to the backend (its auth)")


class LogFileSpec(_Model):
    """An app log file the agent follows; its lines belong to ``service`` (default: this spec's) and
    ``instance`` (default: this node's)."""

    path: str = Field(min_length=1, max_length=4096)
    service: str | None = Field(default=None, pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)?$",
                                description="name or name.namespace")
    instance: str | None = Field(default=None, min_length=1, max_length=256)


class LogsSpec(_Model):
    """The node's logs (docs/observability.md#logs-and-alerts): Envoy's access log and the app log
    files, kept in bounded files and shipped to the control plane's /v1/logs."""

    enabled: bool = True
    access: bool = Field(default=True, description="collect the sidecar Envoy's access-log lines")
    files: list[LogFileSpec] = Field(default_factory=list, max_length=64, description="app log files to follow")
    maxFileBytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=1024**3, description="size of one spool file")
    maxFiles: int = Field(default=8, ge=2, le=10_000, description="spool files kept; when full the oldest is dropped")


def _control_plane(text: str) -> str:
    """One replica, ``HOST:PORT`` (``HOST`` alone: port 15010; ``[IPV6]:PORT``) → ``host:port`` as gRPC names it."""
    from meshpilot.translate.bootstrap import grpc_target, parse_control_planes

    if "," in text:
        raise ValueError(f"one HOST:PORT per entry, got {text!r}")
    try:
        ((host, port),) = parse_control_planes(text)
    except ValueError as exc:
        raise ValueError(f"must be HOST:PORT: {exc}") from None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if len(host) > 253 or not _DNS_NAME.match(host):
            raise ValueError(f"must be HOST:PORT, the host an IP address or a DNS name, got {text!r}") from None
    return grpc_target(host, port)


class MeshSection(_Model):
    _d = _durations("drainTime", "syncTimeout")
    controlPlanes: list[Annotated[str, AfterValidator(_control_plane)]] | None = Field(
        default=None, min_length=1, max_length=64,
        description="the control plane's replicas, HOST:PORT each (or one string a:p,b:p); --control-plane overrides")
    zone: str = Field(default="", max_length=128)
    weight: int = Field(default=100, ge=1, le=10_000)
    healthCheck: HealthCheck = HealthCheck()
    drainTime: float = Field(default=3.0, ge=0, le=3600, description="graceful drain of inbound listeners")
    syncTimeout: float = Field(default=10.0, ge=0, le=600, description="bound on waiting for consumers to ACK")
    preStop: PreStop | None = None
    app: AppSpec | None = None
    sidecar: SidecarPorts = SidecarPorts()
    dns: DnsSpec = DnsSpec()
    identity: IdentitySpec = IdentitySpec()
    tracing: TracingSpec = TracingSpec()
    logs: LogsSpec = LogsSpec()
    apis: list[ApiOperation] = Field(default_factory=list, max_length=1024)

    @field_validator("controlPlanes", mode="before")
    @classmethod
    def _one_string(cls, v: Any) -> Any:
        # the flag's form, "a:15010,b:15010" (or a single "a:15010"), as well as a YAML list
        return [item.strip() for item in v.split(",")] if isinstance(v, str) else v

    @field_validator("controlPlanes")
    @classmethod
    def _distinct(cls, v: list[str] | None) -> list[str] | None:
        for i, target in enumerate(v or ()):
            if target in (v or [])[:i]:
                raise ValueError(f"entry {i} ({target}) is listed twice")
        return v

    @property
    def control_plane_addresses(self) -> tuple[tuple[str, int], ...]:
        """The replicas as (host, port), in the spec's order; () when the spec names none."""
        from meshpilot.translate.bootstrap import parse_control_planes

        return parse_control_planes(",".join(self.controlPlanes)) if self.controlPlanes else ()


class SidecarSpec(_Model):
    apiVersion: str = "v1"
    kind: Literal["Service"] = "Service"
    metadata: Metadata
    spec: ServiceSpecBody
    mesh: MeshSection = MeshSection()

    @model_validator(mode="after")
    def _consistent(self) -> SidecarSpec:
        names = [p.name for p in self.spec.ports]
        if self.mesh.sidecar.port is not None and self.mesh.sidecar.port not in names:
            raise ValueError(f"mesh.sidecar.port: {self.mesh.sidecar.port!r} is not one of spec.ports ({', '.join(names)})")
        self._dns_consistent()
        # the service model carries the same rules (DNS labels, unique names/ports): check them here
        try:
            self.service()
        except ValidationError as exc:
            f = field_errors(exc)[0]
            field, reason = f["field"], f["reason"]
            if field == "(body)" and ": " in reason:
                field, _, reason = reason.partition(": ")
            top = field.split(".")[0]
            where = f"metadata.{field}" if top in ("name", "namespace", "labels") else f"spec.{field}" if top == "ports" else field
            raise ValueError(f"{where}: {reason}") from None
        return self

    def _dns_consistent(self) -> None:
        dns, sc = self.mesh.dns, self.mesh.sidecar
        if not dns.enabled:
            return
        host, port = dns.listen_address
        for name, other in (("adminPort", sc.adminPort), ("outboundPort", sc.outboundPort),
                            ("inboundPort", sc.inboundPort)):
            if port and port == other:
                raise ValueError(f"mesh.dns.listen: port {port} is also mesh.sidecar.{name}")
        for i, (upstream, (uh, up)) in enumerate(zip(dns.upstreams or (), dns.upstream_addresses)):
            if up == port and ipaddress.ip_address(uh.split("%", 1)[0]) == ipaddress.ip_address(host.split("%", 1)[0]):
                raise ValueError(f"mesh.dns.upstreams.{i}: {upstream!r} is meshdns's own address "
                                 "(it would forward to itself)")

    @property
    def fronted(self) -> PortSpec:
        want = self.mesh.sidecar.port
        return next((p for p in self.spec.ports if p.name == want), self.spec.ports[0])

    @property
    def app_port(self) -> int:
        p = self.fronted
        return p.targetPort or p.port

    def service(self) -> Service:
        return Service(
            name=self.metadata.name,
            namespace=self.metadata.namespace,
            ports=[ServicePort(name=p.name, port=p.port, protocol=p.mesh_protocol) for p in self.spec.ports],
            labels={k: v for k, v in self.metadata.labels.items() if k != "version"},
            apis=self.mesh.apis,
        )


def _pretty(errors: list[dict[str, str]]) -> list[dict[str, str]]:
    out = []
    for e in errors:
        f = e["field"]
        # "Value error, ..." from a model validator already names its field
        if f == "(body)" and ":" in e["reason"].split(" ", 1)[0]:
            f, _, r = e["reason"].partition(": ")
            out.append({"field": f, "reason": r})
        else:
            out.append({"field": f, "reason": e["reason"]})
    return out


def load_spec(text: str | bytes) -> SidecarSpec:
    """Parse and validate a spec.yaml document; raises SpecError naming each bad field."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError([{"field": "(document)", "reason": f"not valid YAML: {exc}".replace("\n", " ")}]) from None
    if not isinstance(data, dict):
        raise SpecError([{"field": "(document)", "reason": "must be a mapping (a Kubernetes Service with a mesh section)"}])
    try:
        return SidecarSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_pretty(field_errors(exc))) from None
