"""Names in the mesh's identity scheme: SPIFFE ids, node ids and join-token secrets.

A workload's id is ``spiffe://<trust domain>/ns/<namespace>/sa/<service>``; the control plane's is
``spiffe://<trust domain>/meshpilot/control-plane``, which no workload id can equal. A join token's
secret is ``mpj.<id>.<random>``: the id names the token in lists and logs, and the store keeps only
the secret's SHA-256 digest. Pure string functions, tested with hypothesis.
"""

from __future__ import annotations

import hashlib
import re
import secrets

__all__ = [
    "check_node_id",
    "control_plane_id",
    "new_token",
    "parse_control_plane_id",
    "parse_spiffe_id",
    "spiffe_id",
    "token_digest",
    "token_id_of",
]

_TRUST_DOMAIN = r"[a-z0-9](?:[a-z0-9.-]{0,253}[a-z0-9])?"
_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_WORKLOAD = re.compile(rf"spiffe://({_TRUST_DOMAIN})/ns/({_LABEL})/sa/({_LABEL})")
_CONTROL_PLANE = re.compile(rf"spiffe://({_TRUST_DOMAIN})/meshpilot/control-plane")
_NODE_ID = re.compile(r"[A-Za-z0-9_.:@/-]{1,253}")
_TOKEN = re.compile(r"mpj\.([0-9a-f]{16})\.([A-Za-z0-9_-]{43})")


def spiffe_id(trust_domain: str, namespace: str, service: str) -> str:
    """The SPIFFE id of a service's workloads."""
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service}"


def control_plane_id(trust_domain: str) -> str:
    """The SPIFFE id in the control plane's serving certificate (no workload id equals it)."""
    return f"spiffe://{trust_domain}/meshpilot/control-plane"


def parse_spiffe_id(uri: str) -> tuple[str, str, str] | None:
    """(trust domain, namespace, service) of a workload id, or None for anything else."""
    m = _WORKLOAD.fullmatch(uri) if isinstance(uri, str) else None
    if m is None:
        return None
    return m.group(1), m.group(2), m.group(3)


def parse_control_plane_id(uri: str) -> str | None:
    """The trust domain of a control-plane id, or None for anything else."""
    m = _CONTROL_PLANE.fullmatch(uri) if isinstance(uri, str) else None
    return None if m is None else m.group(1)


def check_node_id(node_id: str) -> str:
    """``node_id`` itself, or ValueError when it is not 1-253 characters of [A-Za-z0-9_.:@/-]."""
    if not isinstance(node_id, str) or not _NODE_ID.fullmatch(node_id):
        raise ValueError("node id must be 1-253 characters of letters, digits and _.:@/-")
    return node_id


def new_token() -> tuple[str, str]:
    """A fresh join token: (token id, secret). The secret is shown once and never stored."""
    token_id = secrets.token_hex(8)
    return token_id, f"mpj.{token_id}.{secrets.token_urlsafe(32)}"


def token_id_of(secret: str) -> str | None:
    """The id inside a join-token secret, or None when it is not shaped like one."""
    m = _TOKEN.fullmatch(secret) if isinstance(secret, str) else None
    return None if m is None else m.group(1)


def token_digest(secret: str) -> str:
    """What the store keeps of a secret: its SHA-256, hex."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()
