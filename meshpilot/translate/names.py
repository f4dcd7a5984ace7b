"""Names shared by translate/ and the front doors: cluster names and the host forms of a service.

Type URLs and the node-metadata keys live on the floor below, in xds/resource.py."""

from __future__ import annotations

from meshpilot.model import Service, ServicePort

__all__ = ["OUTBOUND_ROUTE", "cluster_name", "fqdn", "host_forms", "inbound_cluster_name", "portless_port"]

OUTBOUND_ROUTE = "outbound"


def fqdn(service: Service, domain: str) -> str:
    return f"{service.name}.{service.namespace}.svc.{domain}"


def cluster_name(service: Service, port: ServicePort, domain: str) -> str:
    """Istio-style outbound cluster name, also the EDS service name."""
    return f"outbound|{port.port}||{fqdn(service, domain)}"


def inbound_cluster_name(port: int) -> str:
    return f"inbound|{port}||"


def portless_port(service: Service) -> ServicePort:
    """The port a Host without ``:port`` means: the one numbered 80, else the first."""
    for p in service.ports:
        if p.port == 80:
            return p
    return service.ports[0]


def host_forms(service: Service, port: ServicePort, domain: str, *, short: bool = True) -> list[str]:
    """Every Host/authority a caller may use for this service port, lower-case.

    ``<svc>`` (only when ``short``), ``<svc>.<ns>``, ``<svc>.<ns>.svc.<domain>``, and the service's
    virtual IP, each with ``:<port>``; the forms without a port too for the service's portless port.
    """
    names = [f"{service.name}.{service.namespace}", fqdn(service, domain)]
    if short:
        names.insert(0, service.name)
    if service.vip:
        names.append(service.vip)
    out = [f"{n}:{port.port}" for n in names]
    if port is portless_port(service) or port == portless_port(service):
        out.extend(names)
    return out
