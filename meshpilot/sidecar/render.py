"""spec.yaml + command-line options → the sidecar's Envoy bootstrap and its node identity.

The node metadata written here (``META`` in xds/resource.py) is what the control plane reads back:
the xDS server for the node's listeners, HDS to register the app (health check, port name, labels,
weight, advertised address). :func:`identity_settings` resolves the workload identity's files and
names from the command line over spec.yaml (a trust bundle from either turns identity on); with identity
on, the bootstrap reaches the agent's SDS socket and talks TLS to the control plane. Several control-plane
replicas (``control_planes``) all go into the bootstrap; the first one names the control plane's certificate
when no ``--control-plane-name`` does (the replicas share one serving name and SPIFFE id).
Pure: values in, a JSON-serialisable bootstrap out.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from typing import Any, Literal

from meshpilot.sidecar.identity import server_name_for
from meshpilot.sidecar.spec import SidecarSpec
from meshpilot.translate.bootstrap import BootstrapOptions, build_bootstrap, grpc_target
from meshpilot.xds.resource import META

__all__ = ["IdentitySettings", "SidecarOptions", "bootstrap_options", "control_plane_addresses",
           "control_plane_targets", "default_node_id", "identity_settings", "render_bootstrap"]

_BAD = re.compile(r"[^A-Za-z0-9_.:@/-]+")
DEFAULT_STATS_PORT = 15090  # Istio's: what Prometheus setups for meshes look for


@dataclass(frozen=True, slots=True)
class SidecarOptions:
    control_plane_host: str = "127.0.0.1"
    control_plane_port: int = 15010
    # every replica, in the operator's order (``--control-plane a:p,b:p``); () means the one host and port above
    control_planes: tuple[tuple[str, int], ...] = ()
    node_id: str = ""
    api_type: Literal["GRPC", "DELTA_GRPC"] = "DELTA_GRPC"
    admin_port: int | None = None  # None: from the spec
    inbound_port: int | None = None
    outbound_port: int | None = None
    retry_max_s: float = 1.0
    advertise_address: str = ""  # overrides mesh.sidecar.advertiseAddress (a pod's IP)
    # workload identity; each overrides its mesh.identity field, and a trust bundle turns identity on
    join_token_file: str = ""
    trust_bundle_file: str = ""
    trust_domain: str = ""
    control_plane_name: str = ""  # the name the control plane's certificate is checked for
    enrol_port: int | None = None  # the control plane's enrolment port (None: control_plane_port + 2)


def control_plane_addresses(o: SidecarOptions) -> tuple[tuple[str, int], ...]:
    """Every replica of the control plane the options name."""
    return o.control_planes or ((o.control_plane_host, o.control_plane_port),)


def control_plane_targets(o: SidecarOptions) -> list[str]:
    """Every replica's xDS port as a gRPC target."""
    return [grpc_target(h, p) for h, p in control_plane_addresses(o)]


@dataclass(frozen=True, slots=True)
class IdentitySettings:
    trust_bundle_file: str
    join_token_file: str  # "" when none is given: the node renews a stored certificate or cannot start
    trust_domain: str  # "" means: the issued certificate's
    server_name: str  # checked against the control plane's certificate (and sent as SNI by Envoy)


def identity_settings(spec: SidecarSpec, o: SidecarOptions) -> IdentitySettings | None:
    """The node's identity settings, or None when identity is off; ValueError when it is on without a
    trust bundle (the control plane's certificate could not be checked)."""
    i = spec.mesh.identity
    bundle = o.trust_bundle_file or i.trustBundleFile or ""
    if not bundle and not i.enabled:
        return None
    if not bundle:
        raise ValueError("mesh.identity.enabled needs a trust bundle: give --trust-bundle or mesh.identity.trustBundleFile")
    return IdentitySettings(
        trust_bundle_file=bundle,
        join_token_file=o.join_token_file or i.joinTokenFile or "",
        trust_domain=o.trust_domain or i.trustDomain or "",
        server_name=server_name_for(control_plane_addresses(o)[0][0], o.control_plane_name or i.controlPlaneName or ""),
    )


def default_node_id(spec: SidecarSpec, inbound_port: int, host: str | None = None) -> str:
    host = host if host is not None else socket.gethostname()
    raw = f"{spec.metadata.name}.{spec.metadata.namespace}-{host}-{inbound_port}"
    return _BAD.sub("-", raw).strip("-_.:@/")[:253] or "sidecar"


def bootstrap_options(spec: SidecarSpec, o: SidecarOptions, *, sds_socket: str = "", trust_domain: str = "",
                      tls_server_name: str = "") -> BootstrapOptions:
    """Bootstrap options for this spec; with ``sds_socket`` (the agent serves SDS there), identity on."""
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
    admin = o.admin_port if o.admin_port is not None else sc.adminPort
    stats = sc.statsPort if sc.statsPort is not None else (DEFAULT_STATS_PORT if admin else 0)
    if stats and not admin:
        raise ValueError("mesh.sidecar.statsPort: the stats listener relays to the admin, which then needs a fixed adminPort (not 0)")
    return BootstrapOptions(
        node_id=o.node_id or default_node_id(spec, inbound),
        service=spec.metadata.name,
        namespace=spec.metadata.namespace,
        zone=spec.mesh.zone,
        control_planes=control_plane_addresses(o),
        api_type=o.api_type,
        admin_port=admin,
        stats_port=stats,
        outbound_port=o.outbound_port if o.outbound_port is not None else sc.outboundPort,
        inbound_port=inbound,
        app_port=spec.app_port,
        bind_address=sc.bindAddress,
        capture=sc.capture,
        retry_max_s=o.retry_max_s,
        hds=True,
        metadata=metadata,
        identity=bool(sds_socket),
        sds_socket=sds_socket,
        trust_domain=trust_domain or "mesh.local",
        tls_server_name=tls_server_name,
    )


def render_bootstrap(spec: SidecarSpec, o: SidecarOptions) -> dict[str, Any]:
    return build_bootstrap(bootstrap_options(spec, o))
