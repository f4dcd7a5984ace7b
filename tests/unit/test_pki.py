"""The mesh CA's pure crypto (meshpilot/pki): what a signed certificate says whatever the CSR asked,
refusals, chains through an operator's intermediate, reading peers, SPIFFE ids and join tokens."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from meshpilot import pki

TD = "mesh.local"
WEB = pki.spiffe_id(TD, "default", "web")


def _certs(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


def _verify(chain_pem: bytes, bundle: bytes, now: float | None = None) -> list[x509.Certificate]:
    """The verified path (leaf first) of a client certificate chain against a bundle, or raise."""
    leaf, *inter = _certs(chain_pem)
    t = dt.datetime.fromtimestamp(time.time() if now is None else now, tz=dt.timezone.utc)
    verifier = (
        verification.PolicyBuilder().store(verification.Store(_certs(bundle))).time(t).build_client_verifier()
    )
    return list(verifier.verify(leaf, inter).chain)


def _intermediate(root: pki.Authority) -> tuple[bytes, bytes]:
    """An operator's intermediate CA signed by ``root``: (cert PEM, key PEM)."""
    key = pki.new_key()
    now = dt.datetime.now(dt.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    root_ski = root.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "operator intermediate")]))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski), critical=False)
        .sign(root.key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), pki.key_pem(key)


@pytest.fixture(scope="module")
def root() -> pki.Authority:
    return pki.Authority.generate(TD)


def test_spiffe_ids() -> None:
    assert WEB == "spiffe://mesh.local/ns/default/sa/web"
    assert pki.parse_spiffe_id(WEB) == ("mesh.local", "default", "web")
    assert pki.control_plane_id(TD) == "spiffe://mesh.local/meshpilot/control-plane"
    assert pki.parse_spiffe_id(pki.control_plane_id(TD)) is None
    for bad in ["spiffe://mesh.local/ns/default/sa/web/x", "spiffe://mesh.local/ns/Default/sa/web",
                "http://mesh.local/ns/default/sa/web", "spiffe://mesh.local/ns/default/sa/web\n", ""]:
        assert pki.parse_spiffe_id(bad) is None, bad


@given(st.text())
def test_parse_spiffe_id_on_junk(uri: str) -> None:
    got = pki.parse_spiffe_id(uri)
    if got is not None:  # whatever it accepts, it gives back exactly
        assert pki.spiffe_id(*got) == uri


@given(st.from_regex(r"[a-z0-9]{1,10}(\.[a-z0-9]{1,5})?", fullmatch=True),
       st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True),
       st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True))
def test_spiffe_id_round_trips(td: str, ns: str, svc: str) -> None:
    assert pki.parse_spiffe_id(pki.spiffe_id(td, ns, svc)) == (td, ns, svc)


def test_signed_leaf_takes_its_identity_from_the_caller_not_the_csr(root: pki.Authority) -> None:
    key = pki.new_key()
    asked = pki.build_csr(key, pki.spiffe_id(TD, "kube-system", "admin"), "someone-else")
    issued = root.sign(asked, WEB, "node-1", ttl_s=3600, now=1_800_000_000.0)
    leaf = _certs(issued.chain_pem)[0]
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [WEB]
    assert list(sans) == [x509.UniformResourceIdentifier(WEB)], "expected exactly one SAN, the SPIFFE id"
    assert [a.value for a in leaf.subject] == ["node-1"]
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node-1"
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert leaf.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert leaf.not_valid_before_utc.timestamp() == 1_800_000_000.0 - 60
    assert issued.not_after == leaf.not_valid_after_utc.timestamp() == 1_800_003_600.0
    assert issued.serial == format(leaf.serial_number, "x")
    assert len(_certs(issued.chain_pem)) == 1, "a root's leaves carry no intermediates"


def test_chain_verifies_against_the_bundle_and_not_another(root: pki.Authority) -> None:
    issued = root.sign(pki.build_csr(pki.new_key(), WEB, "n"), WEB, "n", ttl_s=3600)
    bundle = pki.bundle_pem([root.anchor_pem()])
    path = _verify(issued.chain_pem, bundle)
    assert path[-1] == root.cert
    other = pki.Authority.generate(TD)
    with pytest.raises(verification.VerificationError):
        _verify(issued.chain_pem, other.anchor_pem())
    # two roots trusted at once: the leaf verifies through its own
    assert _verify(issued.chain_pem, pki.bundle_pem([other.anchor_pem(), root.anchor_pem()]))[-1] == root.cert


def test_long_node_ids_fit_in_the_cn(root: pki.Authority) -> None:
    node = "n" * 200 + "/a:b@c_d.e-f"
    issued = root.sign(pki.build_csr(pki.new_key(), WEB, node), WEB, node, ttl_s=3600)
    peer = pki.peer_of(issued.chain_pem)
    assert peer is not None and peer.node_id == node


def test_a_csr_with_a_bad_signature_is_refused(root: pki.Authority) -> None:
    csr = x509.load_pem_x509_csr(pki.build_csr(pki.new_key(), WEB, "n"))
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x55  # inside the signature
    forged = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(ValueError, match="signature"):
        root.sign(forged, WEB, "n", ttl_s=3600)
    with pytest.raises(ValueError, match="PEM"):
        root.sign(b"not a csr", WEB, "n", ttl_s=3600)


def test_a_weak_csr_key_is_refused(root: pki.Authority) -> None:
    key = ec.generate_private_key(ec.SECP521R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ValueError, match="P-256"):
        root.sign(csr, WEB, "n", ttl_s=3600)


def test_a_leaf_never_outlives_its_ca() -> None:
    short = pki.Authority.generate(TD, now=1_800_000_000.0, ttl_days=1)
    issued = short.sign(pki.build_csr(pki.new_key(), WEB, "n"), WEB, "n", ttl_s=30 * 86_400, now=1_800_000_000.0)
    assert issued.not_after == short.not_after == 1_800_000_000.0 + 86_400


def test_an_operator_intermediate_signs_and_its_chain_is_carried(root: pki.Authority) -> None:
    cert_pem, key_pem = _intermediate(root)
    ca = pki.Authority.from_pem(cert_pem, key_pem, root.anchor_pem())
    assert ca.anchor == root.cert
    issued = ca.sign(pki.build_csr(pki.new_key(), WEB, "n"), WEB, "n", ttl_s=3600)
    chain = _certs(issued.chain_pem)
    assert len(chain) == 2 and chain[1] == ca.cert, "expected leaf + intermediate (not the root)"
    path = _verify(issued.chain_pem, pki.bundle_pem([ca.anchor_pem()]))
    assert [c.subject for c in path] == [chain[0].subject, ca.cert.subject, root.cert.subject]
    # to_pem / from_pem round-trip keeps the chain
    again = pki.Authority.from_pem(*ca.to_pem())
    assert again.anchor == root.cert and again.cert == ca.cert


def test_an_operator_ca_that_is_wrong_is_refused_with_the_reason(root: pki.Authority) -> None:
    cert_pem, key_pem = _intermediate(root)
    other_key = pki.key_pem(pki.new_key())
    with pytest.raises(ValueError, match="does not belong"):
        pki.Authority.from_pem(cert_pem, other_key)
    with pytest.raises(ValueError, match="does not run upwards"):
        pki.Authority.from_pem(cert_pem, key_pem, pki.Authority.generate(TD).anchor_pem())
    leaf = root.sign(pki.build_csr(pki.new_key(), WEB, "n"), WEB, "n", ttl_s=3600)
    with pytest.raises(ValueError, match="not a CA"):
        pki.Authority.from_pem(leaf.chain_pem, pki.key_pem(pki.new_key()))
    with pytest.raises(ValueError, match="not PEM"):
        pki.Authority.from_pem(b"junk", key_pem)
    with pytest.raises(ValueError, match="private key"):
        pki.Authority.from_pem(cert_pem, b"junk")


def test_control_plane_serving_cert(root: pki.Authority) -> None:
    key = pki.new_key()
    issued = root.serve(key, pki.control_plane_id(TD), ["localhost", "cp.example"], ["127.0.0.1"], ttl_s=3600)
    leaf = _certs(issued.chain_pem)[0]
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [pki.control_plane_id(TD)]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "cp.example"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    t = dt.datetime.now(dt.timezone.utc)
    verifier = (verification.PolicyBuilder().store(verification.Store([root.cert])).time(t)
                .build_server_verifier(x509.DNSName("cp.example")))
    verifier.verify(leaf, [])
    peer = pki.peer_of(issued.chain_pem)
    assert peer is not None and (peer.namespace, peer.service, peer.trust_domain) == ("", "", TD)


def test_bundle_holds_each_root_once(root: pki.Authority) -> None:
    other = pki.Authority.generate(TD)
    both = pki.bundle_pem([root.anchor_pem(), other.anchor_pem(), root.anchor_pem() + other.anchor_pem()])
    assert _certs(both) == [root.cert, other.cert]
    assert pki.bundle_pem([]) == b""


def test_peer_of_reads_a_workload_cert(root: pki.Authority) -> None:
    issued = root.sign(pki.build_csr(pki.new_key(), WEB, "n"), WEB, "node-7", ttl_s=3600, now=1_800_000_000.0)
    want = pki.Peer(WEB, TD, "default", "web", "node-7", 1_800_003_600.0)
    assert pki.peer_of(issued.chain_pem) == want
    assert pki.peer_of(_certs(issued.chain_pem)[0].public_bytes(serialization.Encoding.DER)) == want


def test_peer_of_wants_one_spiffe_uri(root: pki.Authority) -> None:
    no_spiffe = root.sign(pki.build_csr(pki.new_key(), WEB, "n"), "https://example.com/x", "n", ttl_s=3600)
    assert pki.peer_of(no_spiffe.chain_pem) is None
    foreign = root.sign(pki.build_csr(pki.new_key(), WEB, "n"), "spiffe://mesh.local/other/path", "n", ttl_s=3600)
    assert pki.peer_of(foreign.chain_pem) is None


@given(st.binary(max_size=600))
def test_peer_of_on_junk_is_none(junk: bytes) -> None:
    assert pki.peer_of(junk) is None
    assert pki.peer_of(b"-----BEGIN CERTIFICATE-----\n" + junk) is None


def test_verified_peer(root: pki.Authority) -> None:
    issued = root.sign(pki.build_csr(pki.new_key(), WEB, "n"), WEB, "n", ttl_s=3600, now=1_800_000_000.0)
    bundle = root.anchor_pem()
    assert pki.verified_peer(issued.chain_pem, bundle, now=1_800_000_100.0) is not None
    assert pki.verified_peer(issued.chain_pem, bundle, now=1_800_003_601.0) is None, "expired"
    assert pki.verified_peer(issued.chain_pem, pki.Authority.generate(TD).anchor_pem(), now=1_800_000_100.0) is None
    assert pki.verified_peer(b"junk", bundle) is None


class _Context:
    def __init__(self, auth: dict[str, list[bytes]]) -> None:
        self._auth = auth

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth


def test_peer_from_context(root: pki.Authority) -> None:
    issued = root.sign(pki.build_csr(pki.new_key(), WEB, "n"), WEB, "node-3", ttl_s=3600)
    leaf_pem = _certs(issued.chain_pem)[0].public_bytes(serialization.Encoding.PEM)
    got = pki.peer_from_context(_Context({"transport_security_type": [b"ssl"], "x509_pem_cert": [leaf_pem]}))
    assert got is not None and got.spiffe == WEB and got.node_id == "node-3"
    assert pki.peer_from_context(_Context({"transport_security_type": [b"ssl"]})) is None
    broken: Any = object()
    assert pki.peer_from_context(broken) is None


def test_tokens() -> None:
    token_id, secret = pki.new_token()
    assert secret.startswith(f"mpj.{token_id}.") and len(token_id) == 16
    assert pki.token_id_of(secret) == token_id
    assert pki.token_digest(secret) != pki.token_digest(pki.new_token()[1])
    assert len(pki.token_digest(secret)) == 64 and secret not in pki.token_digest(secret)
    assert pki.new_token() != pki.new_token()
    for bad in ["", "mpj..x", f"mpj.{token_id}", f"mpx.{token_id}.{secret[-43:]}", secret + "x", secret + "\n"]:
        assert pki.token_id_of(bad) is None, bad


@given(st.text(max_size=120))
def test_token_id_of_junk(junk: str) -> None:
    got = pki.token_id_of(junk)
    if got is not None:
        assert junk.startswith(f"mpj.{got}.")
    pki.token_digest(junk)  # never raises, whatever the text


def test_node_ids() -> None:
    assert pki.check_node_id("vm-1.example:a/b@c_d") == "vm-1.example:a/b@c_d"
    for bad in ["", "a b", "x" * 254, "é", "a\n"]:
        with pytest.raises(ValueError, match="node id"):
            pki.check_node_id(bad)
