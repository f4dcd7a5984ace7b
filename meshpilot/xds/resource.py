"""The ground floor of xDS: what a resource is called, in which order it travels, how its bytes are
laid out, and who asks for it.

translate/ builds resources, xds/cache.py holds them, xds/stream.py sends them, and the sidecar,
HDS and the publisher speak about nodes; all of them import this module and it imports none of
them (go-control-plane keeps its ``resource`` package on the same floor). It holds:

- ``TYPE``: the type URLs the control plane serves;
- ``PUSH_ORDER``, ``NAMERS``, ``NAMED``: make before break. Clusters and endpoints go before the
  listeners and routes that name them; a cluster or its endpoints leave a client only once the
  listeners and routes sent with or before the removal are answered;
- ``varint``, ``bytes_field``, ``string_field``, ``strings_field``: hand-assembled protobuf fields.
  A DiscoveryResponse is per-stream fields (version, nonce) around resources that are the same for
  every stream; protobuf lets fields come in any order and repeated fields be concatenated, so each
  resource is serialised once and each stream's response is a join of ready-made bytes;
- ``pack``: a message inside an ``Any``, its bytes the same in every process (map fields sorted), so
  a resource's version, a hash of its bytes, is the same on every control-plane replica;
- ``META``, ``NodeInfo``, ``node_info``: the node-metadata contract. A sidecar's bootstrap
  (translate/bootstrap.py, sidecar/render.py) writes these keys; the xDS server reads them back to
  build the node's own listeners, HDS to register the node's app. A node without them (a gateway, a
  proxyless client) gets only the shared resources.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import any_pb2
from google.protobuf.message import Message

__all__ = [
    "META",
    "NAMED",
    "NAMERS",
    "PUSH_ORDER",
    "TYPE",
    "NodeInfo",
    "bytes_field",
    "node_info",
    "pack",
    "string_field",
    "strings_field",
    "varint",
]


class TYPE:
    CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
    LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
    ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
    EXTENSION_CONFIG = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
    DNS = "type.googleapis.com/meshpilot.dns.v1.DnsService"  # meshdns/dns.proto


PUSH_ORDER = (TYPE.CLUSTER, TYPE.ENDPOINT, TYPE.LISTENER, TYPE.ROUTE, TYPE.EXTENSION_CONFIG, TYPE.DNS)
NAMERS = (TYPE.LISTENER, TYPE.ROUTE)  # the types whose resources name clusters
NAMED = (TYPE.CLUSTER, TYPE.ENDPOINT)  # the types whose removal waits for the namers to be answered


# ---- protobuf wire format ------------------------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def bytes_field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return varint((number << 3) | 2) + varint(len(payload)) + payload


def string_field(number: int, value: str) -> bytes:
    return bytes_field(number, value.encode()) if value else b""


def strings_field(number: int, values: Iterable[str]) -> bytes:
    return b"".join(bytes_field(number, v.encode()) for v in values)


# ---- the node ------------------------------------------------------------------------------------


class META:
    """Node-metadata keys. The first group shapes the node's listeners; the second registers its
    app over HDS (validated by the HDS front door); the last two mark a proxyless gRPC client."""

    SERVICE = "SERVICE"
    NAMESPACE = "NAMESPACE"
    OUTBOUND_PORT = "OUTBOUND_PORT"
    INBOUND_PORT = "INBOUND_PORT"
    APP_PORT = "APP_PORT"
    APP_ADDRESS = "APP_ADDRESS"
    BIND_ADDRESS = "BIND_ADDRESS"
    CAPTURE = "CAPTURE"
    IDENTITY = "IDENTITY"  # true: the agent serves SDS (secrets ``default``, ``ROOTCA``) on ``meshpilot-sds``
    STATS_PORT = "STATS_PORT"  # the read-only Prometheus listener's port (0 or absent: none); Prometheus targets

    ADVERTISE_ADDRESS = "ADVERTISE_ADDRESS"
    PORT_NAME = "PORT_NAME"
    LABELS = "LABELS"
    WEIGHT = "WEIGHT"
    HEALTH_CHECK = "HEALTH_CHECK"

    PROXYLESS = "PROXYLESS"
    GRPC_HOSTNAME = "TRAFFICDIRECTOR_GRPC_HOSTNAME"  # set by gRPC's own xDS clients


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
    identity: bool = False  # the node has a workload certificate over SDS: it may get mTLS config
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def service_key(self) -> str:
        return f"{self.service}.{self.namespace}" if self.service else ""

    @property
    def address(self) -> str:
        """The address other sidecars use to reach this node's inbound listener."""
        return self.advertise_address or self.bind_address


def _port(v: Any, default: int = 0) -> int:
    try:
        n = int(float(v))
    except (TypeError, ValueError, OverflowError):  # junk, NaN, infinity
        return default
    return n if 0 <= n <= 65535 else default


def _flag(v: Any) -> bool:
    return v in (True, "true", "1")


def node_info(node_id: str, cluster: str, metadata: dict[str, Any], zone: str = "") -> NodeInfo:
    """Build a NodeInfo from an Envoy node's metadata (a JSON-like dict), tolerating junk."""
    md = metadata if isinstance(metadata, dict) else {}

    def s(key: str, default: str = "") -> str:
        v = md.get(key, default)
        return v if isinstance(v, str) else default

    return NodeInfo(
        id=node_id,
        cluster=cluster,
        service=s(META.SERVICE).lower(),
        namespace=(s(META.NAMESPACE, "default") or "default").lower(),
        zone=zone,
        outbound_port=_port(md.get(META.OUTBOUND_PORT)),
        inbound_port=_port(md.get(META.INBOUND_PORT)),
        app_port=_port(md.get(META.APP_PORT)),
        app_address=s(META.APP_ADDRESS, "127.0.0.1") or "127.0.0.1",
        bind_address=s(META.BIND_ADDRESS, "127.0.0.1") or "127.0.0.1",
        capture=_flag(md.get(META.CAPTURE)),
        advertise_address=s(META.ADVERTISE_ADDRESS),
        proxyless=META.GRPC_HOSTNAME in md or _flag(md.get(META.PROXYLESS)),
        identity=_flag(md.get(META.IDENTITY)),
        extra=md,
    )


def pack(msg: Message) -> any_pb2.Any:
    """``msg`` in an ``Any``, serialised deterministically: a Struct or map field would otherwise come
    out in an order that differs between processes."""
    a = any_pb2.Any()
    a.Pack(msg, deterministic=True)
    return a
