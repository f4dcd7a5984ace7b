"""The certificate authority's crypto: keys, CSRs, signing workload and control-plane certificates,
and trust bundles.

An ``Authority`` is the CA that signs: a root generated here, or an operator's certificate and key
(a root, or an intermediate with the chain above it). It signs a workload's CSR only after checking
the CSR's own signature, and takes nothing else from it: the SPIFFE id (the one URI SAN) and the node
id (the subject CN) are the ones the caller proved, not the ones the CSR asks for. Keys are EC P-256,
signatures SHA-256. No I/O and no clock of its own (``now`` is a parameter), so the store-backed CA
(meshpilot/identity/ca.py) and the tests drive it with plain values.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Authority", "AuthorityError", "Issued", "build_csr", "bundle_pem", "key_pem", "new_key", "serial_of"]

_BACKDATE_S = 60.0  # not_before = now - this, so a peer's clock a little behind still accepts it
_PEM = serialization.Encoding.PEM


class AuthorityError(ValueError):
    """An operator's CA material that will not do; ``part`` names the file: cert, key or chain."""

    def __init__(self, part: Literal["cert", "key", "chain"], message: str) -> None:
        super().__init__(message)
        self.part = part


@dataclass(frozen=True, slots=True)
class Issued:
    """A signed certificate: ``chain_pem`` is the leaf then any intermediates (never the root)."""

    chain_pem: bytes
    not_after: float  # unix seconds
    serial: str  # lower-case hex


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    """The key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def serial_of(cert: x509.Certificate) -> str:
    """A certificate's serial number as the API names it: lower-case hex without separators."""
    return format(cert.serial_number, "x")


def _common_name(value: str) -> x509.NameAttribute[str]:
    # RFC 5280's upper bound for a CN is 64 characters; node ids may be longer (up to 253), and the
    # TLS libraries that read these certificates (BoringSSL, OpenSSL) do not enforce the bound.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return x509.NameAttribute(NameOID.COMMON_NAME, value, _validate=len(value) <= 64)


def build_csr(key: ec.EllipticCurvePrivateKey, spiffe: str, node_id: str) -> bytes:
    """A PEM CSR for ``key`` asking for URI SAN ``spiffe`` and CN ``node_id`` (the CA decides anyway;
    an empty one is left out)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([_common_name(node_id)] if node_id else []))
    )
    if spiffe:
        csr = csr.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe)]), critical=False)
    return csr.sign(key, hashes.SHA256()).public_bytes(_PEM)


def bundle_pem(roots: Iterable[bytes]) -> bytes:
    """The trust bundle: every certificate in ``roots`` (PEM, one or more each) once, in order."""
    seen: set[bytes] = set()
    out: list[bytes] = []
    for pem in roots:
        for cert in x509.load_pem_x509_certificates(pem):
            der = cert.public_bytes(serialization.Encoding.DER)
            if der not in seen:
                seen.add(der)
                out.append(cert.public_bytes(_PEM))
    return b"".join(out)


def _utc(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, tz=dt.timezone.utc)


def _serial() -> int:
    return secrets.randbits(159) | (1 << 158)  # positive, 20 octets at most, never a short serial


def _public_der(key: object) -> bytes:
    if not isinstance(key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
        raise ValueError("the key must be an EC or RSA key")
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class Authority:
    """The signing CA: its certificate, its private key and the certificates above it (if any)."""

    def __init__(
        self, cert: x509.Certificate, key: CertificateIssuerPrivateKeyTypes, chain: Sequence[x509.Certificate] = ()
    ) -> None:
        self.cert = cert
        self.key = key
        self.chain = tuple(chain)

    # ---- making one ----------------------------------------------------------------------

    @classmethod
    def generate(cls, trust_domain: str, now: float | None = None, ttl_days: int = 3650) -> Authority:
        """A new self-signed root for ``trust_domain`` (EC P-256, valid ``ttl_days``)."""
        now = time.time() if now is None else now
        key = new_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshpilot"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"meshpilot mesh CA {trust_domain}"[:64]),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(_serial())
            .not_valid_before(_utc(now - _BACKDATE_S))
            .not_valid_after(_utc(now + ttl_days * 86_400.0))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes, chain_pem: bytes = b"") -> Authority:
        """An operator's CA. AuthorityError (a ValueError) says which part is wrong and how: not a
        CA, a key that does not match, a chain whose certificates do not sign each other
        (``chain_pem`` runs upwards to the root)."""
        try:
            certs = _load_certs(cert_pem, "the CA certificate")
            if len(certs) != 1:
                raise ValueError(f"the CA certificate file must hold one certificate, not {len(certs)}")
            cert = certs[0]
            _check_ca(cert)
        except ValueError as exc:
            raise AuthorityError("cert", str(exc)) from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise AuthorityError("key", f"the CA key is not an unencrypted PEM private key: {exc}") from None
        if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
            raise AuthorityError("key", "the CA key must be an EC or RSA key")
        if _public_der(key.public_key()) != _public_der(cert.public_key()):
            raise AuthorityError("key", "the CA key does not belong to the CA certificate")
        try:
            chain = _load_certs(chain_pem, "the CA chain") if chain_pem.strip() else []
            for c in chain:
                _check_ca(c)
        except ValueError as exc:
            raise AuthorityError("chain", str(exc)) from None
        below = cert
        for above in chain:
            try:
                below.verify_directly_issued_by(above)
            except (ValueError, TypeError, InvalidSignature):
                raise AuthorityError(
                    "chain",
                    f"the CA chain does not run upwards: {below.subject.rfc4514_string()} is not signed by "
                    f"{above.subject.rfc4514_string()}",
                ) from None
            below = above
        return cls(cert, key, chain)

    def to_pem(self) -> tuple[bytes, bytes, bytes]:
        """(certificate, unencrypted PKCS#8 key, chain above the certificate), each PEM."""
        return self.cert.public_bytes(_PEM), key_pem(self.key), b"".join(c.public_bytes(_PEM) for c in self.chain)

    # ---- what it is ---------------------------------------------------------------------

    @property
    def serial(self) -> str:
        return serial_of(self.cert)

    @property
    def not_after(self) -> float:
        return self.cert.not_valid_after_utc.timestamp()

    @property
    def anchor(self) -> x509.Certificate:
        """The certificate peers trust: the top of the chain (the authority's own if it has none)."""
        return self.chain[-1] if self.chain else self.cert

    def anchor_pem(self) -> bytes:
        return self.anchor.public_bytes(_PEM)

    def intermediates(self) -> list[x509.Certificate]:
        """What a leaf's chain carries after the leaf: every certificate up to, not including, the anchor."""
        return [c for c in (self.cert, *self.chain) if c is not self.anchor]

    # ---- signing ------------------------------------------------------------------------

    def sign(self, csr_pem: bytes, spiffe: str, node_id: str, ttl_s: float, now: float | None = None) -> Issued:
        """A workload certificate for the CSR's key: URI SAN ``spiffe``, CN ``node_id``, server and
        client auth. ValueError when the CSR is not PEM, its signature is bad or its key is weak."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise ValueError("csr_pem is not a PEM certificate signing request") from None
        if not csr.is_signature_valid:
            raise ValueError("the CSR's signature does not verify with its own key")
        public = csr.public_key()
        if isinstance(public, ec.EllipticCurvePublicKey):
            if not isinstance(public.curve, (ec.SECP256R1, ec.SECP384R1)):
                raise ValueError("the CSR's key must be EC P-256 or P-384 (or RSA of 2048 bits or more)")
        elif isinstance(public, rsa.RSAPublicKey):
            if public.key_size < 2048:
                raise ValueError("the CSR's RSA key must have 2048 bits or more")
        else:
            raise ValueError("the CSR's key must be EC P-256 or P-384 (or RSA of 2048 bits or more)")
        return self._issue(public, spiffe, node_id, [], [], ttl_s, now)

    def serve(
        self,
        key: ec.EllipticCurvePrivateKey,
        spiffe: str,
        dns_names: Iterable[str],
        ip_addresses: Iterable[str],
        ttl_s: float,
        now: float | None = None,
    ) -> Issued:
        """The control plane's own serving certificate for ``key``."""
        ips = [ipaddress.ip_address(a) for a in ip_addresses]
        return self._issue(key.public_key(), spiffe, "meshpilot control plane", list(dns_names), ips, ttl_s, now)

    def _issue(
        self,
        public: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
        spiffe: str,
        common_name: str,
        dns_names: list[str],
        ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
        ttl_s: float,
        now: float | None,
    ) -> Issued:
        now = time.time() if now is None else now
        # never outlive the CA: a leaf past its issuer's not_after fails verification anyway
        not_after = min(now + ttl_s, self.not_after)
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe)]
        sans += [x509.DNSName(n) for n in dns_names]
        sans += [x509.IPAddress(ip) for ip in ips]
        issuer_ski = _subject_key_id(self.cert)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([_common_name(common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(public)
            .serial_number(_serial())
            .not_valid_before(_utc(now - _BACKDATE_S))
            .not_valid_after(_utc(not_after))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False,
                    key_encipherment=isinstance(public, rsa.RSAPublicKey), data_encipherment=False,
                    key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        chain = b"".join(c.public_bytes(_PEM) for c in [leaf, *self.intermediates()])
        return Issued(chain_pem=chain, not_after=leaf.not_valid_after_utc.timestamp(), serial=serial_of(leaf))


def _subject_key_id(cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        public = cert.public_key()
        if not isinstance(public, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
            raise ValueError("the CA key must be an EC or RSA key") from None
        return x509.SubjectKeyIdentifier.from_public_key(public)


def _load_certs(pem: bytes, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise ValueError(f"{what} is not PEM certificates") from None
    return certs


def _check_ca(cert: x509.Certificate) -> None:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    except ValueError as exc:
        raise ValueError(f"{cert.subject.rfc4514_string()}: unreadable extensions: {exc}") from None
    if bc is None or not bc.ca:
        raise ValueError(f"{cert.subject.rfc4514_string()} is not a CA certificate (basicConstraints CA:TRUE)")
