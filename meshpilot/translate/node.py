"""What the control plane knows about a connected Envoy, read from its bootstrap node metadata.

The sidecar bootstrap (see bootstrap.py) writes these keys; a node without them (a gateway, a
proxyless client) gets only the shared resources. Sidecars started by ``meshpilot sidecar`` add
the keys the HDS server reads to register their app (HEALTH_CHECK, PORT_NAME, LABELS, WEIGHT,
ADVERTISE_ADDRESS); those stay in ``extra`` and are validated by xds/hds.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["NodeInfo", "node_info"]


@dataclass(frozen=True, slots=True)
class NodeInfo:
    id: str
    cluster: str = ""
    service: str = ""
    namespace: str = "default"
    zone: str = ""
    outbound_port: int = 0  # 0: no outbound listener
    inbound_port: int = 0  # 0: no inbound listener
    app_port: int = 0
    app_address: str = "127.0.0.1"
    bind_address: str = "127.0.0.1"
    capture: bool = False  # outbound listener recovers original destinations (iptables capture)
    advertise_address: str = ""  # where callers reach the inbound listener ("" = bind_address)
    proxyless: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def service_key(self) -> str:
        return f"{self.service}.{self.namespace}" if self.service else ""

    @property
    def address(self) -> str:
        """The address other sidecars use to reach this node's inbound listener."""
        return self.advertise_address or self.bind_address


def _int(v: Any, default: int = 0) -> int:
    try:
        n = int(float(v))
    except (TypeError, ValueError, OverflowError):  # junk, NaN, infinity
        return default
    return n if 0 <= n <= 65535 else default


def node_info(node_id: str, cluster: str, metadata: dict[str, Any], zone: str = "") -> NodeInfo:
    """Build a NodeInfo from an Envoy node's metadata (a JSON-like dict), tolerating junk."""
    md = metadata if isinstance(metadata, dict) else {}

    def s(key: str, default: str = "") -> str:
        v = md.get(key, default)
        return v if isinstance(v, str) else default

    return NodeInfo(
        id=node_id,
        cluster=cluster,
        service=s("SERVICE").lower(),
        namespace=(s("NAMESPACE", "default") or "default").lower(),
        zone=zone,
        outbound_port=_int(md.get("OUTBOUND_PORT")),
        inbound_port=_int(md.get("INBOUND_PORT")),
        app_port=_int(md.get("APP_PORT")),
        app_address=s("APP_ADDRESS", "127.0.0.1") or "127.0.0.1",
        bind_address=s("BIND_ADDRESS", "127.0.0.1") or "127.0.0.1",
        capture=md.get("CAPTURE") in (True, "true", "1"),
        advertise_address=s("ADVERTISE_ADDRESS"),
        proxyless="TRAFFICDIRECTOR_GRPC_HOSTNAME" in md or md.get("PROXYLESS") in (True, "true", "1"),
        extra=md,
    )
