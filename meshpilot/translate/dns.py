"""Services → meshdns name-table resources (``meshpilot.dns.v1.DnsService``), one per service.

Encoded straight to protobuf wire format (the message is small and fixed; see meshdns/dns.proto),
so the control plane does not depend on generated code for it.
"""

from __future__ import annotations

from meshpilot.model import Service
from meshpilot.xds.wire import bytes_field, string_field, varint

__all__ = ["build_dns_service", "dns_resource_name"]


def dns_resource_name(service: Service) -> str:
    return f"{service.name}.{service.namespace}"


def build_dns_service(service: Service, domain: str, vip: str | None, vip6: str | None) -> bytes:
    out = [
        string_field(1, service.name),
        string_field(2, service.namespace),
        string_field(3, domain),
        string_field(4, vip or ""),
        string_field(5, vip6 or ""),
    ]
    for p in service.ports:
        port = string_field(1, p.name) + varint(2 << 3) + varint(p.port) + string_field(3, p.protocol)
        out.append(bytes_field(6, port))
    return b"".join(out)
