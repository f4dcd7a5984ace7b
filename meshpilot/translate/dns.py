"""Services → meshdns name-table resources (``meshpilot.dns.v1.DnsService``), one per service.

The message is the one ``meshdns/dns.proto`` defines, compiled by ``scripts/build-protos.sh``; meshdns parses
the same generated class (``meshdns/ads.py``), so both sides read one schema.
"""

from __future__ import annotations

from meshpilot.meshdns.dns_pb2 import DnsService, ServicePort
from meshpilot.model import Service

__all__ = ["build_dns_service", "dns_resource_name"]


def dns_resource_name(service: Service) -> str:
    return f"{service.name}.{service.namespace}"


def build_dns_service(service: Service, domain: str, vip: str | None, vip6: str | None) -> DnsService:
    return DnsService(
        name=service.name,
        namespace=service.namespace,
        domain=domain,
        vip=vip or "",
        vip6=vip6 or "",
        ports=[ServicePort(name=p.name, port=p.port, protocol=p.protocol) for p in service.ports],
    )
