"""One metadata model for the SDK front doors: how Consul and Eureka fields map onto registry values.

Both front doors use these functions, so a value written through one is read back the same way
through the other and through EDS:

- ``version`` (Consul meta / Eureka metadata) ↔ instance label ``version``;
- ``zone`` ↔ instance ``zone`` (the EDS locality);
- ``protocol`` (or a Consul tag ``grpc``/``http2``/``tcp``) ↔ the protocol of the service port;
- tags ↔ instance metadata ``tags`` (comma-separated);
- any other key ↔ instance metadata, unchanged.

A service first registered through a front door is created with one port, named after its protocol
(``http``, ``http2``, ``grpc`` or ``tcp``) and numbered as the registering instance's port, and is
labelled ``created-by: <front door>``; it is deleted again when its last instance leaves. A service
that already exists (from the management API, say) is never changed: an instance joins the port whose
protocol matches, else the service's default port.
"""

from __future__ import annotations

from meshpilot.model import PROTOCOLS, Instance, Service, ServicePort
from meshpilot.registry import NotFound, Registry
from meshpilot.translate.names import portless_port

__all__ = [
    "CREATED_BY",
    "exported_meta",
    "instance_fields",
    "join_service",
    "primary_port",
    "release_service",
    "tags_of",
]

CREATED_BY = "created-by"


def join_service(reg: Registry, name: str, port: int, protocol: str, creator: str, labels: dict[str, str] | None = None) -> tuple[Service, str]:
    """The service ``name`` (created if missing, with ``labels``) and the name of the port an instance joins.

    A service created by an instance without a port (``0``) gets port 80 for callers of its name."""
    svc = reg.lookup(name)
    if svc is None:
        proto = PROTOCOLS.get(protocol, "http")
        svc = reg.put_service(
            Service(name=name, ports=[ServicePort(name=proto, port=port or 80, protocol=proto)],
                    labels={**(labels or {}), CREATED_BY: creator})
        )
    match = next((p for p in svc.ports if p.protocol == protocol), None)
    return svc, (match or portless_port(svc)).name


def release_service(reg: Registry, key: str, creator: str) -> None:
    """Delete a service the front door created once no instance is left."""
    svc = reg.service(key)
    if svc is None or svc.labels.get(CREATED_BY) != creator or reg.instances(key):
        return
    try:
        reg.delete_service(key)
    except NotFound:
        pass


def instance_fields(meta: dict[str, str], tags: tuple[str, ...] | list[str] = ()) -> tuple[dict[str, str], str, dict[str, str]]:
    """(labels, zone, metadata) of a registry instance from SDK metadata and tags."""
    labels: dict[str, str] = {}
    metadata: dict[str, str] = {}
    zone = ""
    for k, v in meta.items():
        if k == "version":
            labels["version"] = v
        elif k == "zone":
            zone = v[:128]
        elif k in ("protocol", "tags"):
            continue
        else:
            metadata[k] = v
    joined = ",".join(t for t in tags if t) or meta.get("tags", "")
    if joined:
        metadata["tags"] = joined[:512]
    return labels, zone, metadata


def tags_of(inst: Instance) -> list[str]:
    return [t for t in inst.metadata.get("tags", "").split(",") if t]


def primary_port(svc: Service | None, inst: Instance) -> tuple[str, int, str]:
    """(port name, instance port, protocol) that an SDK sees as the instance's one port."""
    if svc is not None:
        for p in (portless_port(svc), *svc.ports):
            if p.name in inst.ports:
                return p.name, inst.ports[p.name], p.protocol
    name, number = next(iter(sorted(inst.ports.items())))
    return name, number, "http"


def exported_meta(svc: Service | None, inst: Instance) -> dict[str, str]:
    """Metadata as the SDK APIs show it: the instance's metadata (without tags), labels, zone, protocol."""
    out = {k: v for k, v in inst.metadata.items() if k != "tags"}
    out.update(inst.labels)
    if inst.zone:
        out["zone"] = inst.zone
    _name, _port, protocol = primary_port(svc, inst)
    out["protocol"] = protocol
    if svc is not None and len(svc.ports) > 1:
        for p in svc.ports:
            if p.name in inst.ports:
                out[f"port-{p.name}"] = str(inst.ports[p.name])
    return out
