"""Workload identity primitives, pure and store-free: SPIFFE ids, keys and CSRs, the certificate
authority's signing, trust bundles, reading a peer's certificate, join-token secrets. The control
plane's CA (meshpilot/identity/) and the node's agent (meshpilot/sidecar/) both stand on it."""

from __future__ import annotations

from meshpilot.pki.authority import (
    Authority,
    AuthorityError,
    Issued,
    build_csr,
    bundle_pem,
    key_pem,
    new_key,
    serial_of,
)
from meshpilot.pki.ids import (
    check_node_id,
    control_plane_id,
    new_token,
    parse_control_plane_id,
    parse_spiffe_id,
    spiffe_id,
    token_digest,
    token_id_of,
)
from meshpilot.pki.peer import Peer, peer_from_context, peer_of, verified_peer

__all__ = [
    "Authority",
    "AuthorityError",
    "Issued",
    "Peer",
    "build_csr",
    "bundle_pem",
    "check_node_id",
    "control_plane_id",
    "key_pem",
    "new_key",
    "new_token",
    "parse_control_plane_id",
    "parse_spiffe_id",
    "peer_from_context",
    "peer_of",
    "serial_of",
    "spiffe_id",
    "token_digest",
    "token_id_of",
    "verified_peer",
]
