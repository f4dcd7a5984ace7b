"""spec.yaml + command-line options → the sidecar's Envoy bootstrap and its node identity.

The node metadata written here (``META`` in xds/resource.py) is what the control plane reads back:
the xDS server for the node's listeners, HDS to register the app (health check, port name, labels,
weight, advertised address). Pure: values in, a JSON-serialisable bootstrap out.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from typing import Any, Literal

from meshpilot.sidecar.spec import SidecarSpec
from meshpilot.translate.bootstrap import BootstrapOptions, build_bootstrap
from meshpilot.xds.resource import META

__all__ = ["SidecarOptions", "bootstrap_options", "default_node_id", "render_bootstrap"]

_BAD = re.compile(r"[^A-Za-z0-9_.:@/-]+")


@dataclass(frozen=True, slots=True)
class SidecarOptions:
    control_plane_host: str = "127.0.0.1"
    control_plane_port: int = 15010
    node_id: str = ""
    api_type: Literal["GRPC", "DELTA_GRPC"] = "DELTA_GRPC"
    admin_port: int | None = None  # None: from the spec
    inbound_port: int | None = None
    outbound_port: int | None = None
    retry_max_s: float = 1.0
    advertise_address: str = ""  # overrides mesh.sidecar.advertiseAddress (a pod's IP)


def default_node_id(spec: SidecarSpec, inbound_port: int, host: str | None = None) -> str:
    host = host if host is not None else socket.gethostname()
    raw = f"{spec.metadata.name}.{spec.metadata.namespace}-{host}-{inbound_port}"
    return _BAD.sub("-", raw).strip("-_.:@/")[:253] or "sidecar"


def bootstrap_options(spec: SidecarSpec, o: SidecarOptions) -> BootstrapOptions:
    sc = spec.mesh.sidecar
    hc = spec.mesh.healthCheck
    inbound = o.inbound_port if o.inbound_port is not None else sc.inboundPort
    metadata: dict[str, Any] = {
        META.PORT_NAME: spec.fronted.name,
        META.LABELS: dict(spec.metadata.labels),
        META.WEIGHT: spec.mesh.weight,
        META.HEALTH_CHECK: {
            "kind": hc.kind,
            "path": hc.http.path if hc.http else "/",
            "interval_s": hc.interval,
            "timeout_s": hc.timeout,
            "healthy_threshold": hc.healthyThreshold,
            "unhealthy_threshold": hc.unhealthyThreshold,
        },
    }
    if o.advertise_address or sc.advertiseAddress:
        metadata[META.ADVERTISE_ADDRESS] = o.advertise_address or sc.advertiseAddress
    return BootstrapOptions(
        node_id=o.node_id or default_node_id(spec, inbound),
        service=spec.metadata.name,
        namespace=spec.metadata.namespace,
        zone=spec.mesh.zone,
        control_plane_host=o.control_plane_host,
        control_plane_port=o.control_plane_port,
        api_type=o.api_type,
        admin_port=o.admin_port if o.admin_port is not None else sc.adminPort,
        outbound_port=o.outbound_port if o.outbound_port is not None else sc.outboundPort,
        inbound_port=inbound,
        app_port=spec.app_port,
        bind_address=sc.bindAddress,
        capture=sc.capture,
        retry_max_s=o.retry_max_s,
        hds=True,
        metadata=metadata,
    )


def render_bootstrap(spec: SidecarSpec, o: SidecarOptions) -> dict[str, Any]:
    return build_bootstrap(bootstrap_options(spec, o))
