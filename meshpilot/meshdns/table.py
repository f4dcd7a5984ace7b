"""The name table: which DNS names are mesh services, and what they resolve to.

The control plane sends one ``DnsService`` per mesh service (see ``dns.proto``); a static file or the state file
on disk gives the same shape as JSON/YAML. :class:`NameTable` turns that list into a dictionary from lower-cased
label tuples to services, for every name form of the shared model (``<svc>``, ``<svc>.<ns>``,
``<svc>.<ns>.svc.<domain>``) and every node search suffix. It is immutable: a table update builds a new one and
swaps it in, which also throws away the prebuilt responses of the old one.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshpilot.meshdns.wire import split_name

if TYPE_CHECKING:
    from meshpilot.meshdns.dns_pb2 import DnsService

__all__ = ["Lookup", "NameTable", "Port", "Service", "load_services_file"]

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$", re.IGNORECASE)
_PROTOCOLS = {"", "http", "http2", "grpc", "tcp", "udp"}


@dataclass(slots=True, frozen=True)
class Port:
    name: str
    port: int
    protocol: str = "tcp"

    @property
    def transport(self) -> bytes:
        return b"_udp" if self.protocol == "udp" else b"_tcp"


@dataclass(slots=True, frozen=True)
class Service:
    """One mesh service as meshdns sees it; validated on construction (``ValueError`` names the field)."""

    name: str
    namespace: str = "default"
    domain: str = ""
    vip: str = ""
    vip6: str = ""
    ports: tuple[Port, ...] = ()

    def __post_init__(self) -> None:
        for fname in ("name", "namespace"):
            value = getattr(self, fname)
            if not _LABEL.match(value):
                raise ValueError(f"{fname}: {value!r} is not a DNS label (letters, digits, '-', 1-63 chars)")
        if self.domain and not all(_LABEL.match(p) for p in self.domain.strip(".").split(".")):
            raise ValueError(f"domain: {self.domain!r} is not a DNS name")
        if self.vip:
            try:
                ipaddress.IPv4Address(self.vip)
            except ValueError:
                raise ValueError(f"vip: {self.vip!r} is not an IPv4 address") from None
        if self.vip6:
            try:
                ipaddress.IPv6Address(self.vip6)
            except ValueError:
                raise ValueError(f"vip6: {self.vip6!r} is not an IPv6 address") from None
        for i, p in enumerate(self.ports):
            if not _LABEL.match(p.name):
                raise ValueError(f"ports[{i}].name: {p.name!r} is not a DNS label")
            if not 0 < p.port < 65536:
                raise ValueError(f"ports[{i}].port: {p.port} is not in 1..65535")
            if p.protocol not in _PROTOCOLS:
                raise ValueError(f"ports[{i}].protocol: {p.protocol!r} is not one of {sorted(_PROTOCOLS - {''})}")

    @property
    def resource_name(self) -> str:
        return f"{self.name}.{self.namespace}"

    @classmethod
    def from_proto(cls, msg: DnsService) -> Service:
        return cls(
            name=msg.name,
            namespace=msg.namespace or "default",
            domain=msg.domain,
            vip=msg.vip,
            vip6=msg.vip6,
            ports=tuple(Port(p.name, p.port, p.protocol or "tcp") for p in msg.ports),
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Service:
        if not isinstance(d, Mapping):
            raise ValueError(f"service: expected a mapping, got {type(d).__name__}")
        unknown = set(d) - {"name", "namespace", "domain", "vip", "vip6", "ports"}
        if unknown:
            raise ValueError(f"service: unknown field(s) {sorted(unknown)}")
        ports = []
        for i, p in enumerate(d.get("ports") or ()):
            if not isinstance(p, Mapping) or not isinstance(p.get("port"), int):
                raise ValueError(f"ports[{i}]: expected {{name, port, protocol}} with an integer port, got {p!r}")
            ports.append(Port(str(p.get("name", "")), p["port"], str(p.get("protocol") or "tcp")))
        return cls(
            name=str(d.get("name", "")),
            namespace=str(d.get("namespace") or "default"),
            domain=str(d.get("domain") or ""),
            vip=str(d.get("vip") or ""),
            vip6=str(d.get("vip6") or ""),
            ports=tuple(ports),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "namespace": self.namespace, "domain": self.domain, "vip": self.vip,
            "vip6": self.vip6, "ports": [{"name": p.name, "port": p.port, "protocol": p.protocol} for p in self.ports],
        }


@dataclass(slots=True, frozen=True)
class Lookup:
    """A mesh name found in the table: the service, the port an SRV prefix selected (None for the bare name),
    the label tuple of the service's FQDN, and how many labels of the question belong to the name's zone."""

    service: Service
    port: Port | None
    fqdn: tuple[bytes, ...]
    a: bytes | None
    aaaa: bytes | None


@dataclass(slots=True)
class NameTable:
    """Services by every name they answer to. Build with :meth:`build`."""

    services: tuple[Service, ...] = ()
    domain: str = "mesh"
    ttl: int = 30
    serial: int = 1
    names: dict[tuple[bytes, ...], Lookup] = field(default_factory=dict)
    zones: frozenset[tuple[bytes, ...]] = frozenset()
    interior: frozenset[tuple[bytes, ...]] = frozenset()

    @classmethod
    def build(
        cls,
        services: Iterable[Service],
        *,
        domain: str = "mesh",
        ttl: int = 30,
        search: Iterable[str] = (),
        namespace: str = "default",
        serial: int = 1,
    ) -> NameTable:
        svcs = tuple(services)
        suffixes = [split_name(s) for s in search if s.strip(".")]
        by_name: dict[str, int] = {}
        for s in svcs:
            by_name[s.name.lower()] = by_name.get(s.name.lower(), 0) + 1
        # (priority, labels, lookup): later, higher-priority entries overwrite earlier ones on a clash
        entries: list[tuple[int, tuple[bytes, ...], Lookup]] = []
        zones = {split_name(domain)}
        for s in svcs:
            zone = split_name(s.domain or domain)
            zones.add(zone)
            name, ns = s.name.encode().lower(), s.namespace.encode().lower()
            fqdn = (name, ns, b"svc") + zone
            a = ipaddress.IPv4Address(s.vip).packed if s.vip else None
            aaaa = ipaddress.IPv6Address(s.vip6).packed if s.vip6 else None
            bare = Lookup(s, None, fqdn, a, aaaa)
            forms: list[tuple[int, tuple[bytes, ...]]] = [(3, (name, ns)), (4, fqdn)]
            if s.namespace.lower() == namespace.lower():
                forms.append((2, (name,)))
            elif by_name[s.name.lower()] == 1:
                forms.append((1, (name,)))
            for prio, labels in list(forms):
                for suffix in suffixes:
                    if labels[-len(suffix):] != suffix:
                        forms.append((prio, labels + suffix))
            for prio, labels in forms:
                entries.append((prio, labels, bare))
                for p in s.ports:
                    entries.append((prio, (b"_" + p.name.encode().lower(), p.transport) + labels,
                                    Lookup(s, p, fqdn, a, aaaa)))
        entries.sort(key=lambda e: e[0])
        names = {labels: lookup for _, labels, lookup in entries}
        interior: set[tuple[bytes, ...]] = set()
        for labels in names:
            for zone in zones:
                if len(labels) > len(zone) and labels[-len(zone):] == zone:
                    for i in range(1, len(labels) - len(zone)):
                        interior.add(labels[i:])
        return cls(svcs, domain, ttl, serial, names, frozenset(zones), frozenset(interior))

    def zone_of(self, labels: tuple[bytes, ...]) -> tuple[bytes, ...] | None:
        """The mesh zone (domain) a lower-cased name falls in, if any."""
        for zone in self.zones:
            if len(labels) >= len(zone) and labels[len(labels) - len(zone):] == zone:
                return zone
        return None


def load_services_file(path: str | Path) -> list[Service]:
    """Read a static table: a JSON or YAML list of services (or ``{"services": [...]}``)."""
    text = Path(path).read_text()
    data: Any
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        import yaml

        data = yaml.safe_load(text)
    if isinstance(data, Mapping):
        data = data.get("services")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of services, got {type(data).__name__}")
    out = []
    for i, item in enumerate(data):
        try:
            out.append(Service.from_dict(item))
        except ValueError as exc:
            raise ValueError(f"{path}: services[{i}]: {exc}") from None
    return out
