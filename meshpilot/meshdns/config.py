"""meshdns settings: one frozen object built from the command line or by the sidecar agent.

Defaults follow the port table in DESIGN.md (meshdns on 127.0.0.1:15053, the control plane's xDS port on
15010). Upstream resolvers and search suffixes default to the node's /etc/resolv.conf; an upstream that is
meshdns's own listening address is always removed, so meshdns can never forward to itself. With a
workload identity, ``tls`` gives the table stream its TLS credentials (the sidecar agent's certificate) and
says when they change, so the stream reconnects with the renewed certificate.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc

__all__ = ["MeshDnsConfig", "TableTls", "parse_hostport", "read_resolv_conf", "without_self"]


class TableTls(Protocol):
    """TLS for the table stream: current credentials with a generation, and a wait for a newer one."""

    def channel_credentials(self) -> tuple[int, grpc.ChannelCredentials, Sequence[tuple[str, Any]]]:
        """(generation, credentials, channel options such as ``grpc.ssl_target_name_override``)."""
        ...

    async def wait_newer(self, generation: int) -> int:
        """Return once the credentials are newer than ``generation``."""
        ...


@dataclass(slots=True, frozen=True)
class MeshDnsConfig:
    host: str = "127.0.0.1"
    port: int = 15053
    control_plane: str | None = "127.0.0.1:15010"
    # never an Envoy's node id: the control plane builds a node's listeners from its stream's metadata
    node_id: str = field(default_factory=lambda: f"{socket.gethostname()}~meshdns")
    state_file: str | None = None
    upstreams: tuple[tuple[str, int], ...] = ()
    ttl: int = 30
    domain: str = "mesh"
    search: tuple[str, ...] = ()
    namespace: str = "default"
    static_table: str | None = None
    upstream_timeout: float = 1.5
    backoff_max: float = 5.0
    udp_batch: bool = True  # recvmmsg/sendmmsg fast path where available
    upstream_mark: int | None = None  # SO_MARK on upstream sockets, exempt from the node's capture rules
    tls: TableTls | None = field(default=None, compare=False)  # None: a plaintext table stream


def parse_hostport(text: str, default_port: int) -> tuple[str, int]:
    """``"10.0.0.2"``, ``"10.0.0.2:5353"``, ``"[::1]:53"`` or ``"::1"`` → (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else default_port
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = int(p)
    else:
        host, port = text, default_port
    if not host:
        raise ValueError(f"{text!r}: no host")
    if not 0 <= port < 65536:
        raise ValueError(f"{text!r}: port {port} out of range")
    return host, port


def read_resolv_conf(path: str | Path = "/etc/resolv.conf") -> tuple[list[tuple[str, int]], list[str]]:
    """The nameservers (port 53) and search suffixes of a resolv.conf; empty lists if it cannot be read."""
    servers: list[tuple[str, int]] = []
    search: list[str] = []
    try:
        text = Path(path).read_text()
    except OSError:
        return servers, search
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                ipaddress.ip_address(words[1].split("%", 1)[0])
            except ValueError:
                continue
            servers.append((words[1], 53))
        elif words and words[0] in ("search", "domain"):
            search = [w.rstrip(".") for w in words[1:] if w.strip(".")]
    return servers, search


def _is_local(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.bind((host, 0))  # only an address of this host can be bound
        except OSError:
            return False
    return True


def without_self(upstreams: Iterable[tuple[str, int]], host: str, port: int) -> list[tuple[str, int]]:
    """Drop upstreams that are meshdns's own listening address (a forwarding loop)."""
    out = []
    wildcard = host in ("0.0.0.0", "::", "")
    for uh, up in upstreams:
        if up == port and (uh == host or (wildcard and _is_local(uh))):
            continue
        try:
            if up == port and ipaddress.ip_address(uh) == ipaddress.ip_address(host):
                continue
        except ValueError:
            pass
        out.append((uh, up))
    return out
