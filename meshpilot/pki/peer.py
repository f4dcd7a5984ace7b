"""Who is on the other end: the identity in a peer's certificate.

``peer_of`` reads a leaf certificate (PEM or DER) into a ``Peer``: its SPIFFE id and the parts of it,
the node id (the subject CN) and when it expires. It checks no signature: over TLS the handshake has
verified the chain; ``verified_peer`` verifies one against a trust bundle itself, for callers that
want both. ``peer_from_context`` reads the client certificate of a grpc.aio call.
"""

from __future__ import annotations

import datetime as dt
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.x509 import verification
from cryptography.x509.oid import NameOID

from meshpilot.pki.ids import parse_control_plane_id, parse_spiffe_id

__all__ = ["Peer", "peer_from_context", "peer_of", "verified_peer"]


@dataclass(frozen=True, slots=True)
class Peer:
    """A certificate's identity. The control plane's has namespace = service = ""."""

    spiffe: str
    trust_domain: str
    namespace: str
    service: str
    node_id: str
    not_after: float  # unix seconds


def _load(cert: bytes | x509.Certificate) -> x509.Certificate | None:
    if isinstance(cert, x509.Certificate):
        return cert
    if not isinstance(cert, (bytes, bytearray, memoryview)):
        return None
    data = bytes(cert)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            certs = x509.load_pem_x509_certificates(data)
            return certs[0] if certs else None
        return x509.load_der_x509_certificate(data)
    except ValueError:
        return None


def peer_of(cert: bytes | x509.Certificate) -> Peer | None:
    """The identity in a leaf certificate (the first of a PEM chain), or None when it has not
    exactly one parseable SPIFFE URI SAN (a workload's or the control plane's)."""
    leaf = _load(cert)
    if leaf is None:
        return None
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = [u for u in sans.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")]
        with warnings.catch_warnings():  # a CN over RFC 5280's 64 characters (long node ids) is fine
            warnings.simplefilter("ignore", UserWarning)
            cns = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        not_after = leaf.not_valid_after_utc.timestamp()
    except (ValueError, x509.ExtensionNotFound):
        return None
    if len(uris) != 1:
        return None
    node_id = cns[0].value if len(cns) == 1 else ""
    if not isinstance(node_id, str):
        node_id = ""
    workload = parse_spiffe_id(uris[0])
    if workload is not None:
        td, ns, svc = workload
        return Peer(uris[0], td, ns, svc, node_id, not_after)
    td_cp = parse_control_plane_id(uris[0])
    if td_cp is not None:
        return Peer(uris[0], td_cp, "", "", node_id, not_after)
    return None


def verified_peer(
    leaf_pem: bytes,
    roots_pem: bytes,
    intermediates: Sequence[x509.Certificate] | Iterable[bytes] = (),
    now: float | None = None,
) -> Peer | None:
    """``peer_of(leaf_pem)`` when the leaf (a client certificate) chains to one of ``roots_pem``
    through ``intermediates`` and is valid at ``now``; None otherwise."""
    leaf = _load(leaf_pem)
    if leaf is None:
        return None
    inter: list[x509.Certificate] = []
    for c in intermediates:
        loaded = _load(c)
        if loaded is not None:
            inter.append(loaded)
    try:
        roots = x509.load_pem_x509_certificates(roots_pem)
        t = dt.datetime.fromtimestamp(time.time() if now is None else now, tz=dt.timezone.utc)
        verifier = verification.PolicyBuilder().store(verification.Store(roots)).time(t).build_client_verifier()
        verifier.verify(leaf, inter)
    except (ValueError, verification.VerificationError):
        return None
    return peer_of(leaf)


class _AuthContextHolder(Protocol):
    def auth_context(self) -> Mapping[str, Iterable[bytes]]: ...


def peer_from_context(context: _AuthContextHolder) -> Peer | None:
    """The identity of a grpc.aio call's client certificate, or None when it presented none."""
    try:
        certs = list(context.auth_context().get("x509_pem_cert", ()))
    except Exception:  # a context without TLS, or an unusual one: no identity
        return None
    return peer_of(certs[0]) if certs else None
