"""The control plane's mesh CA (meshpilot/identity): roots kept in the store and rotated, operator
CAs, the serving certificate, join tokens, the Identity service's enrolment, renewal and refusals
(driven with fake gRPC contexts), bundle watching, the management routes and the plugin."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshpilot import metrics, pki
from meshpilot.controlplane import ControlPlane
from meshpilot.identity.ca import ENROLMENTS, ROOTS, MeshCa, RootRefused, UnknownRoot
from meshpilot.identity.plugin import install
from meshpilot.identity.service import EnrolmentServer, IdentityService
from meshpilot.identity.tokens import TOKENS, JoinTokens, TokenRefused
from meshpilot.parts import Part
from meshpilot.pki import ca_pb2
from meshpilot.registry import Registry
from meshpilot.registry.store import MemoryStore, SqliteStore
from meshpilot.settings import Settings
from tests.support import operator_ca_files

TD = "mesh.local"
T0 = 1_800_000_000.0


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _settings(**kw: Any) -> Settings:
    return Settings(identity=True, store="memory:", **kw)


def _certs(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


def _chains_to(chain_pem: bytes, root_pem: bytes) -> bool:
    """Whether the leaf of ``chain_pem`` is signed (through its intermediates) by the root in ``root_pem``."""
    leaf, *inter = _certs(chain_pem)
    root = _certs(root_pem)[0]
    below = leaf
    for above in [*inter, root]:
        try:
            below.verify_directly_issued_by(above)
        except Exception:
            return False
        below = above
    return True


def _doc(store: MemoryStore, table: str, key: str) -> dict[str, Any]:
    doc = store.get(table, key)
    assert isinstance(doc, dict), f"expected a document at {table}/{key}, found {doc!r}"
    return doc


def _root_pem(ca: MeshCa, serial: str) -> bytes:
    for cert in _certs(ca.bundle_pem()):
        if pki.serial_of(cert) == serial:
            return cert.public_bytes(serialization.Encoding.PEM)
    raise AssertionError(f"expected root {serial} in the bundle, found {[r['serial'] for r in ca.roots()]}")


# ---- the CA and its roots ------------------------------------------------------------------------


async def test_a_root_is_generated_once_and_kept_across_restarts(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db.sqlite")
    ca = MeshCa(store, _settings())
    await ca.durable()
    [root] = ca.roots()
    assert root["signing"] and root["source"] == "store"
    store.close()
    store = SqliteStore(tmp_path / "db.sqlite")
    again = MeshCa(store, _settings())
    assert again.roots() == [root], "expected the stored root after a restart, not a new one"
    assert again.bundle_pem() == ca.bundle_pem()
    store.close()


def test_signing_uses_the_ttl_setting_and_the_signing_root() -> None:
    clock = Clock()
    ca = MeshCa(MemoryStore(), _settings(workload_cert_ttl_s=3600), clock=clock)
    issued = ca.sign(pki.build_csr(pki.new_key(), "x", "y"), pki.spiffe_id(TD, "default", "web"), "n1")
    assert issued.not_after == T0 + 3600
    assert _chains_to(issued.chain_pem, ca.bundle_pem())


async def test_rotation_add_activate_remove() -> None:
    clock = Clock()
    store = MemoryStore()
    ca = MeshCa(store, _settings(), clock=clock)
    tokens = JoinTokens(store, clock)
    svc = IdentityService(ca, tokens, clock)
    seen: list[bytes] = []
    ca.watch(seen.append)
    old = ca.signing_serial

    # a node enrols under the old root
    key = pki.new_key()
    _rec, secret = tokens.create("default", "web")
    plain: Any = _Ctx()
    resp = await svc.sign(ca_pb2.SignRequest(csr_pem=pki.build_csr(key, "", ""), node_id="n1", token=secret), plain)
    assert _chains_to(resp.cert_chain_pem, _root_pem(ca, old))

    # 1. add: trusted, not signing
    new = (await ca.add_root())["serial"]
    assert {r["serial"]: r["signing"] for r in ca.roots()} == {old: True, new: False}
    assert len(_certs(ca.bundle_pem())) == 2 and seen == [ca.bundle_pem()], "watchers hear of the new bundle"
    assert ca.signing_serial == old

    # 2. activate: signs from now on; the old stays trusted
    await ca.activate_root(new)
    assert {r["serial"]: r["signing"] for r in ca.roots()} == {old: False, new: True}
    fresh = ca.sign(pki.build_csr(pki.new_key(), "", ""), pki.spiffe_id(TD, "default", "api"), "n2")
    assert _chains_to(fresh.chain_pem, _root_pem(ca, new)) and not _chains_to(fresh.chain_pem, _root_pem(ca, old))
    assert _doc(store, ROOTS, new)["signing"] is True and _doc(store, ROOTS, old)["signing"] is False

    # 3. remove: never the signing root; not the old while n1's certificate from it is still valid
    with pytest.raises(RootRefused, match="signs"):
        await ca.remove_root(new)
    with pytest.raises(RootRefused, match="1 node"):
        await ca.remove_root(old)
    # n1 renews: its certificate now chains to the new root, and the old can go
    leaf = _certs(resp.cert_chain_pem)[0].public_bytes(serialization.Encoding.PEM)
    with_cert: Any = _Ctx(leaf)
    renewed = await svc.sign(ca_pb2.SignRequest(csr_pem=pki.build_csr(key, "", "")), with_cert)
    assert _chains_to(renewed.cert_chain_pem, _root_pem(ca, new))
    await ca.remove_root(old)
    assert [r["serial"] for r in ca.roots()] == [new] and store.get(ROOTS, old) is None
    assert len(seen) == 2 and _certs(seen[-1]) == _certs(ca.bundle_pem())
    with pytest.raises(UnknownRoot):
        await ca.remove_root(old)
    with pytest.raises(UnknownRoot):
        await ca.activate_root("abc")


async def test_a_root_whose_nodes_expired_can_go_and_force_overrides() -> None:
    clock = Clock()
    store = MemoryStore()
    ca = MeshCa(store, _settings(workload_cert_ttl_s=3600), clock=clock)
    old = ca.signing_serial
    store.write({(ENROLMENTS, "n1"): {"node_id": "n1", "root": old, "not_after": T0 + 3600}})
    new = (await ca.add_root())["serial"]
    await ca.activate_root(new)
    with pytest.raises(RootRefused):
        await ca.remove_root(old)
    clock.t = T0 + 3601  # n1's certificate has expired
    await ca.remove_root(old)
    third = (await ca.add_root())["serial"]
    await ca.activate_root(third)
    store.write({(ENROLMENTS, "n2"): {"node_id": "n2", "root": new, "not_after": clock.t + 100}})
    await ca.remove_root(new, force=True)
    assert [r["serial"] for r in ca.roots()] == [third]


def _operator_files(tmp_path: Path) -> tuple[pki.Authority, dict[str, str]]:
    """An operator's root (not given to meshpilot) and an intermediate of it, written as files."""
    root, files = operator_ca_files(tmp_path)
    return root, files


async def test_an_operator_intermediate_signs_and_its_root_is_the_bundle(tmp_path: Path) -> None:
    root, files = _operator_files(tmp_path)
    store = MemoryStore()
    ca = MeshCa(store, _settings(**files))
    assert all("key" not in doc for _k, doc in store.items(ROOTS)), "the operator's key stays in its file"
    assert _certs(ca.bundle_pem()) == [root.cert]
    [info] = ca.roots()
    assert info["signing"] and info["source"] == "file" and info["serial"] == pki.serial_of(root.cert)
    issued = ca.sign(pki.build_csr(pki.new_key(), "", ""), pki.spiffe_id(TD, "default", "web"), "n1")
    assert len(_certs(issued.chain_pem)) == 2 and _chains_to(issued.chain_pem, root.anchor_pem())
    with pytest.raises(RootRefused, match="ca_cert_file"):
        await ca.remove_root(info["serial"])


@pytest.mark.parametrize("damage, setting", [
    ("missing_cert", "ca_cert_file"),
    ("no_key", "ca_key_file"),
    ("wrong_key", "ca_key_file"),
    ("junk_key", "ca_key_file"),
    ("wrong_chain", "ca_chain_file"),
    ("junk_cert", "ca_cert_file"),
])
def test_a_bad_operator_ca_names_the_setting(tmp_path: Path, damage: str, setting: str) -> None:
    _root, files = _operator_files(tmp_path)
    if damage == "missing_cert":
        files["ca_cert_file"] = str(tmp_path / "nope.pem")
    elif damage == "no_key":
        del files["ca_key_file"]
    elif damage == "wrong_key":
        Path(files["ca_key_file"]).write_bytes(pki.key_pem(pki.new_key()))
    elif damage == "junk_key":
        Path(files["ca_key_file"]).write_bytes(b"junk")
    elif damage == "wrong_chain":
        Path(files["ca_chain_file"]).write_bytes(pki.Authority.generate("x").anchor_pem())
    elif damage == "junk_cert":
        Path(files["ca_cert_file"]).write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValueError, match=f"^{setting}: "):
        MeshCa(MemoryStore(), _settings(**files))


def test_the_serving_certificate_is_renewed_at_half_life() -> None:
    clock = Clock()
    ca = MeshCa(MemoryStore(), _settings(workload_cert_ttl_s=1000, xds_server_names=["cp.example", "localhost"],
                                         listen_address="10.1.2.3"), clock=clock)
    key, chain = ca.serving_pem()
    leaf = _certs(chain)[0]
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [pki.control_plane_id(TD)]
    assert sans.get_values_for_type(x509.DNSName) == ["cp.example", "localhost"]
    assert [str(i) for i in sans.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    clock.t = T0 + 499
    assert ca.serving_pem() == (key, chain), "renewed before half-life"
    clock.t = T0 + 500
    key2, chain2 = ca.serving_pem()
    assert key2 != key and chain2 != chain, "not renewed at half-life"
    assert _certs(chain2)[0].not_valid_after_utc.timestamp() == T0 + 1500


def test_no_ip_san_for_a_hostname_or_any_address() -> None:
    for listen in ("0.0.0.0", "cp.internal"):
        ca = MeshCa(MemoryStore(), _settings(listen_address=listen))
        sans = _certs(ca.serving_pem()[1])[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.IPAddress) == []


def test_server_credentials_build_for_both_ports() -> None:
    ca = MeshCa(MemoryStore(), _settings())
    assert isinstance(ca.server_credentials(), grpc.ServerCredentials)
    assert isinstance(ca.server_credentials(require_client_cert=False), grpc.ServerCredentials)


# ---- join tokens ---------------------------------------------------------------------------------


def test_tokens_are_stored_as_digests_and_shown_once() -> None:
    store = MemoryStore()
    tokens = JoinTokens(store, Clock())
    record, secret = tokens.create("Default", "web", description="vm pool")
    assert record["namespace"] == "default" and record["service"] == "web" and record["id"] == pki.token_id_of(secret)
    stored = _doc(store, TOKENS, record["id"])
    assert stored["digest"] == pki.token_digest(secret)
    assert secret not in repr(list(store.items(TOKENS))), "the secret must never be stored"
    assert "digest" not in record and all("digest" not in r and "secret" not in r for r in tokens.list())
    assert tokens.redeem(secret) == ("default", "web")
    assert tokens.redeem(secret) == ("default", "web"), "a reusable token enrols many nodes"
    assert tokens.list()[0]["used"] == 2


def test_token_refusals() -> None:
    clock = Clock()
    tokens = JoinTokens(MemoryStore(), clock)
    _r, once = tokens.create("default", "web", single_use=True)
    assert tokens.check(once) == ("default", "web") and tokens.check(once) == ("default", "web"), "check spends nothing"
    tokens.redeem(once)
    with pytest.raises(TokenRefused, match="already used"):
        tokens.redeem(once)
    r, short = tokens.create("default", "web", ttl_s=60)
    assert r["expires_at"] == T0 + 60
    clock.t = T0 + 60
    with pytest.raises(TokenRefused, match="expired"):
        tokens.redeem(short)
    r, revoked = tokens.create("default", "web")
    assert tokens.revoke(r["id"])["revoked"] is True
    with pytest.raises(TokenRefused, match="revoked"):
        tokens.redeem(revoked)
    with pytest.raises(LookupError):
        tokens.revoke("0123456789abcdef")
    token_id = pki.token_id_of(revoked)
    assert token_id is not None
    forged = f"mpj.{token_id}.{'A' * 43}"
    for bad in (forged, "", "nonsense", f"mpj.{'0' * 16}.{'A' * 43}"):
        with pytest.raises(TokenRefused) as info:
            tokens.redeem(bad)
        assert info.value.reason == "unknown"


@pytest.mark.parametrize("kw, what", [
    ({"namespace": "Bad_NS", "service": "web"}, "namespace"),
    ({"namespace": "default", "service": "-web"}, "service"),
    ({"namespace": "default", "service": "web", "ttl_s": 0}, "ttl_s"),
    ({"namespace": "default", "service": "web", "description": "x" * 300}, "description"),
    ({"namespace": "default", "service": "web", "max_uses": 0}, "max_uses"),
    ({"namespace": "default", "service": "web", "max_uses": True}, "max_uses"),
])
def test_token_fields_are_validated(kw: dict[str, Any], what: str) -> None:
    with pytest.raises(ValueError, match=what):
        JoinTokens(MemoryStore()).create(**kw)


# ---- the Identity service ----------------------------------------------------------------------


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


class _Ctx:
    """A grpc.aio servicer context as the service uses it: the client certificate and abort."""

    def __init__(self, leaf_pem: bytes | None = None) -> None:
        self.auth: dict[str, list[bytes]] = {"transport_security_type": [b"ssl"]}
        if leaf_pem is not None:
            self.auth["x509_pem_cert"] = [leaf_pem]

    def auth_context(self) -> dict[str, list[bytes]]:
        return self.auth

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5555"

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise Aborted(code, details)


def _any(value: object) -> Any:
    return value


def _leaf(chain_pem: bytes) -> bytes:
    return _certs(chain_pem)[0].public_bytes(serialization.Encoding.PEM)


class World:
    def __init__(self, **settings: Any) -> None:
        self.clock = Clock()
        self.store = MemoryStore()
        self.ca = MeshCa(self.store, _settings(**settings), clock=self.clock)
        self.tokens = JoinTokens(self.store, self.clock)
        self.svc = IdentityService(self.ca, self.tokens, self.clock)

    async def sign(self, ctx: Any = None, **req: Any) -> ca_pb2.SignResponse:
        context: Any = ctx or _Ctx()
        return await self.svc.sign(ca_pb2.SignRequest(**req), context)

    async def enrol(self, node_id: str, token: str) -> tuple[pki.Issued, Any]:
        """Enrol ``node_id`` with ``token``: (what was issued, a context presenting its certificate)."""
        resp = await self.sign(csr_pem=pki.build_csr(pki.new_key(), "", ""), node_id=node_id, token=token)
        leaf = _leaf(resp.cert_chain_pem)
        issued = pki.Issued(resp.cert_chain_pem, resp.not_after, pki.serial_of(_certs(leaf)[0]))
        return issued, _Ctx(leaf)

    async def refused(self, code: grpc.StatusCode, ctx: Any = None, **req: Any) -> str:
        with pytest.raises(Aborted) as info:
            await self.sign(ctx, **req)
        assert info.value.code == code, f"expected {code}, got {info.value.code}: {info.value.details}"
        return info.value.details


def _refused_count(reason: str) -> float:
    return metrics.REGISTRY.get_sample_value("meshpilot_identity_sign_refused_total", {"reason": reason}) or 0.0


async def test_enrol_with_a_token_signs_the_tokens_identity_whatever_the_csr_asks() -> None:
    w = World()
    _r, secret = w.tokens.create("shop", "cart", single_use=True)
    csr = pki.build_csr(pki.new_key(), pki.spiffe_id(TD, "kube-system", "admin"), "other-node")
    resp = await w.sign(csr_pem=csr, node_id="vm-7", token=secret)
    peer = pki.peer_of(resp.cert_chain_pem)
    assert peer is not None and (peer.spiffe, peer.node_id) == (pki.spiffe_id(TD, "shop", "cart"), "vm-7")
    assert resp.trust_bundle_pem == w.ca.bundle_pem() and resp.not_after == peer.not_after
    enrolment = _doc(w.store, ENROLMENTS, "vm-7")
    assert enrolment["spiffe"] == peer.spiffe and enrolment["root"] == w.ca.signing_serial
    assert enrolment["token_id"] == pki.token_id_of(secret)
    # the single-use token is spent
    details = await w.refused(grpc.StatusCode.UNAUTHENTICATED, csr_pem=csr, node_id="vm-8", token=secret)
    assert "already used" in details


async def test_a_bad_csr_does_not_spend_a_single_use_token() -> None:
    w = World()
    _r, secret = w.tokens.create("shop", "cart", single_use=True)
    await w.refused(grpc.StatusCode.INVALID_ARGUMENT, csr_pem=b"junk", node_id="vm-1", token=secret)
    await w.sign(csr_pem=pki.build_csr(pki.new_key(), "", ""), node_id="vm-1", token=secret)


async def test_a_node_id_keeps_its_identity(caplog: pytest.LogCaptureFixture) -> None:
    w = World()
    _r, cart = w.tokens.create("shop", "cart")
    _r, pay = w.tokens.create("shop", "pay")
    csr = pki.build_csr(pki.new_key(), "", "")
    await w.sign(csr_pem=csr, node_id="vm-1", token=cart)
    w.clock.t += 86_400  # its certificate ran out: the same identity again, a rebuilt machine
    await w.sign(csr_pem=csr, node_id="vm-1", token=cart)
    before = _refused_count("node_taken")
    with caplog.at_level(logging.WARNING, logger="meshpilot.identity"):
        details = await w.refused(grpc.StatusCode.PERMISSION_DENIED, csr_pem=csr, node_id="vm-1", token=pay)
    assert "spiffe://mesh.local/ns/shop/sa/cart" in details
    assert _refused_count("node_taken") == before + 1
    assert any("event=enrol_refused" in r.getMessage() and "reason=node_taken" in r.getMessage()
               and "vm-1" in r.getMessage() for r in caplog.records)
    # once an operator removes the enrolment, the node id may enrol as another identity
    w.store.write({}, deletes=((ENROLMENTS, "vm-1"),))
    await w.sign(csr_pem=csr, node_id="vm-1", token=pay)


@pytest.mark.parametrize("node_id", ["", "has space", "x" * 254, "naïve", "a\nb"])
async def test_bad_node_ids_are_refused(node_id: str) -> None:
    w = World()
    _r, secret = w.tokens.create("shop", "cart")
    before = _refused_count("bad_node_id")
    await w.refused(grpc.StatusCode.INVALID_ARGUMENT, csr_pem=pki.build_csr(pki.new_key(), "", ""), node_id=node_id,
                    token=secret)
    assert _refused_count("bad_node_id") == before + 1


async def test_oversized_requests_are_refused() -> None:
    w = World()
    _r, secret = w.tokens.create("shop", "cart")
    await w.refused(grpc.StatusCode.INVALID_ARGUMENT, csr_pem=b"x" * 20_000, node_id="vm", token=secret)
    await w.refused(grpc.StatusCode.INVALID_ARGUMENT, csr_pem=b"x", node_id="vm", token="t" * 300)


async def test_renewal_reissues_the_certificates_own_identity() -> None:
    w = World()
    _r, secret = w.tokens.create("shop", "cart", single_use=True)
    first = await w.sign(csr_pem=pki.build_csr(pki.new_key(), "", ""), node_id="vm-1", token=secret)
    w.clock.t += 3600
    new_key = pki.new_key()
    asks = pki.build_csr(new_key, pki.spiffe_id(TD, "shop", "pay"), "vm-2")
    renewed = await w.sign(_Ctx(_leaf(first.cert_chain_pem)), csr_pem=asks)
    peer = pki.peer_of(renewed.cert_chain_pem)
    assert peer is not None and (peer.spiffe, peer.node_id) == (pki.spiffe_id(TD, "shop", "cart"), "vm-1")
    assert peer.not_after == T0 + 3600 + 86_400
    leaf = _certs(renewed.cert_chain_pem)[0]
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert leaf.public_key().public_bytes(*spki) == new_key.public_key().public_bytes(*spki), "the CSR's key"
    assert _doc(w.store, ENROLMENTS, "vm-1")["serial"] == pki.serial_of(leaf)
    # the same node id in the request is fine; another is refused
    await w.sign(_Ctx(_leaf(first.cert_chain_pem)), csr_pem=asks, node_id="vm-1")
    await w.refused(grpc.StatusCode.PERMISSION_DENIED, _Ctx(_leaf(first.cert_chain_pem)), csr_pem=asks, node_id="vm-2")


async def test_renewal_refusals() -> None:
    w = World()
    csr = pki.build_csr(pki.new_key(), "", "")
    details = await w.refused(grpc.StatusCode.UNAUTHENTICATED, csr_pem=csr)
    assert "join token" in details
    # a certificate from another CA (the TLS layer would refuse it too)
    stranger = pki.Authority.generate(TD).sign(csr, pki.spiffe_id(TD, "shop", "cart"), "vm-1", 3600)
    await w.refused(grpc.StatusCode.UNAUTHENTICATED, _Ctx(_leaf(stranger.chain_pem)), csr_pem=csr)
    # an expired certificate of ours
    _r, secret = w.tokens.create("shop", "cart")
    first = await w.sign(csr_pem=csr, node_id="vm-1", token=secret)
    w.clock.t += 86_400 + 1
    await w.refused(grpc.StatusCode.UNAUTHENTICATED, _Ctx(_leaf(first.cert_chain_pem)), csr_pem=csr)
    w.clock.t = T0 + 10
    # the control plane's own certificate is not a workload's
    _key, serving = w.ca.serving_pem()
    await w.refused(grpc.StatusCode.PERMISSION_DENIED, _Ctx(_leaf(serving)), csr_pem=csr)
    # an operator removed the node's enrolment: it can no longer renew
    w.store.write({}, deletes=((ENROLMENTS, "vm-1"),))
    details = await w.refused(grpc.StatusCode.PERMISSION_DENIED, _Ctx(_leaf(first.cert_chain_pem)), csr_pem=csr)
    assert "not enrolled" in details
    # junk in the auth context
    await w.refused(grpc.StatusCode.UNAUTHENTICATED, _Ctx(b"junk"), csr_pem=csr)


async def test_a_removed_root_no_longer_renews() -> None:
    w = World()
    csr = pki.build_csr(pki.new_key(), "", "")
    _r, secret = w.tokens.create("shop", "cart")
    first = await w.sign(csr_pem=csr, node_id="vm-1", token=secret)
    old = w.ca.signing_serial
    new = (await w.ca.add_root())["serial"]
    await w.ca.activate_root(new)
    await w.ca.remove_root(old, force=True)
    await w.refused(grpc.StatusCode.UNAUTHENTICATED, _Ctx(_leaf(first.cert_chain_pem)), csr_pem=csr)


async def test_watch_bundle_sends_now_and_on_every_change() -> None:
    w = World()
    _r, secret = w.tokens.create("shop", "cart")
    _issued, ctx = await w.enrol("vm-1", secret)
    stream: Any = w.svc.watch_bundle(ca_pb2.BundleRequest(), ctx)
    first = await asyncio.wait_for(anext(stream), 1)
    assert first.trust_bundle_pem == w.ca.bundle_pem()
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.01)
    assert not pending.done(), "sent again without a change"
    await w.ca.add_root()
    second = await asyncio.wait_for(pending, 1)
    assert len(_certs(second.trust_bundle_pem)) == 2
    await stream.aclose()
    assert w.ca._watchers == [], "the stream's watcher is removed when it ends"


# ---- routes and the plugin ------------------------------------------------------------------------


async def _api(tmp_path: Path, **kw: Any) -> tuple[ControlPlane, TestClient[Any, Any]]:
    cp = ControlPlane(Settings(store=f"sqlite:{tmp_path / 'db.sqlite'}", identity=True, xds_port=0, **kw))
    cp.include(install(cp))
    client = TestClient(TestServer(cp.api_app()))
    await client.start_server()
    return cp, client


async def test_token_routes(tmp_path: Path) -> None:
    cp, client = await _api(tmp_path)
    try:
        r = await client.post("/v1/identity/tokens", json={"namespace": "shop", "service": "cart", "single_use": True,
                                                            "ttl_s": 600, "description": "vm pool"})
        assert r.status == 201, await r.text()
        made = await r.json()
        assert made["secret"].startswith(f"mpj.{made['id']}.") and made["single_use"] is True
        listed = await (await client.get("/v1/identity/tokens")).json()
        assert [t["id"] for t in listed] == [made["id"]] and "secret" not in listed[0] and "digest" not in listed[0]
        r = await client.delete(f"/v1/identity/tokens/{made['id']}")
        assert r.status == 200 and (await r.json())["revoked"] is True
        assert (await client.delete("/v1/identity/tokens/0000000000000000")).status == 404
        for body, field in [({"namespace": "Bad!", "service": "cart"}, "namespace"),
                            ({"namespace": "shop"}, "service"),
                            ({"namespace": "shop", "service": "cart", "ttl_s": "600"}, "ttl_s"),
                            ({"namespace": "shop", "service": "cart", "colour": "red"}, "colour")]:
            r = await client.post("/v1/identity/tokens", json=body)
            assert r.status == 400, await r.text()
            assert [f["field"] for f in (await r.json())["fields"]] == [field]
    finally:
        await client.close()
        cp.registry.store.close()


async def test_root_routes_and_bundle(tmp_path: Path) -> None:
    cp, client = await _api(tmp_path)
    try:
        r = await client.get("/v1/identity/bundle")
        assert r.status == 200 and r.content_type == "text/plain"
        assert len(_certs(await r.read())) == 1
        [old] = await (await client.get("/v1/identity/roots")).json()
        r = await client.post("/v1/identity/roots")
        assert r.status == 201
        new = await r.json()
        assert new["signing"] is False
        assert (await client.delete(f"/v1/identity/roots/{old['serial']}")).status == 409, "the signing root"
        assert (await client.post(f"/v1/identity/roots/{new['serial']}/activate")).status == 200
        assert (await client.post("/v1/identity/roots/abc/activate")).status == 404
        r = await client.delete(f"/v1/identity/roots/{old['serial']}")
        assert r.status == 200, await r.text()
        assert [x["serial"] for x in (await r.json())["roots"]] == [new["serial"]]
        assert (await client.delete(f"/v1/identity/roots/{old['serial']}")).status == 404
        summary = await (await client.get("/v1/identity")).json()
        assert summary["trust_domain"] == TD and summary["signing_root"] == new["serial"]
        assert len(_certs(summary["bundle_pem"].encode())) == 1
    finally:
        await client.close()
        cp.registry.store.close()


async def test_identity_routes_need_admin_when_tokens_are_on(tmp_path: Path) -> None:
    cp, client = await _api(tmp_path, token="boot-admin")
    try:
        assert (await client.post("/v1/identity/tokens", json={"namespace": "a", "service": "b"})).status == 401
        r = await client.post("/v1/identity/tokens", json={"namespace": "a", "service": "b"},
                              headers={"Authorization": "Bearer boot-admin"})
        assert r.status == 201
    finally:
        await client.close()
        cp.registry.store.close()


def test_plugin_contributes_nothing_when_identity_is_off() -> None:
    core: Any = SimpleNamespace(settings=Settings(store="memory:"), registry=SimpleNamespace(store=MemoryStore()))
    part = install(core)
    assert part == Part()


def test_plugin_contributes_the_service_routes_task_and_credentials() -> None:
    store = MemoryStore()
    core: Any = SimpleNamespace(settings=_settings(), registry=Registry(store))
    part = install(core)
    assert len(part.grpc_handlers) == 1 and part.server_credentials is not None
    assert [t.name for t in part.tasks] == ["identity-enrolment"]
    paths = {(r.method, r.path) for r in part.routes}
    assert {("POST", "/v1/identity/tokens"), ("GET", "/v1/identity/bundle"),
            ("POST", "/v1/identity/roots/{serial}/activate"), ("DELETE", "/v1/identity/roots/{serial}")} <= paths
    assert len(list(store.items(ROOTS))) == 1


async def test_enrolment_routes_remove_a_node_whatever_its_id(tmp_path: Path) -> None:
    cp, client = await _api(tmp_path)
    try:
        store = cp.registry.store
        node = "vm-1.corp:zone/a@b"
        store.write({(ENROLMENTS, node): {"node_id": node, "spiffe": pki.spiffe_id(TD, "shop", "cart")}})
        closed: list[tuple[str, str]] = []

        def disconnect(node_id: str, reason: str) -> int:
            closed.append((node_id, reason))
            return 1

        cp.xds.disconnect = disconnect  # type: ignore[method-assign]
        listed = await (await client.get("/v1/identity/enrolments")).json()
        assert [e["node_id"] for e in listed] == [node]
        r = await client.delete("/v1/identity/enrolments/" + node.replace("/", "%2F").replace(":", "%3A").replace("@", "%40"))
        assert r.status == 200, await r.text()
        assert store.get(ENROLMENTS, node) is None
        assert closed == [(node, "enrolment removed")], f"expected the control plane to close the node's streams, got {closed}"
        assert (await client.delete("/v1/identity/enrolments/nope")).status == 404
        assert len(closed) == 1
    finally:
        await client.close()
        cp.registry.store.close()


async def test_an_operators_next_root_is_trusted_before_the_files_change(tmp_path: Path) -> None:
    """Rotating an operator CA: trust the next root (certificate only) and the current one, switch
    the files, restart; certificates of both verify throughout, and the old root goes at the end."""
    (tmp_path / "first").mkdir()
    (tmp_path / "next").mkdir()
    first_root, files = _operator_files(tmp_path / "first")
    next_root, next_files = _operator_files(tmp_path / "next")
    store = MemoryStore()
    ca = MeshCa(store, _settings(**files))
    csr = pki.build_csr(pki.new_key(), "", "")
    old_leaf = ca.sign(csr, pki.spiffe_id(TD, "default", "web"), "n1")
    added = await ca.add_root(next_root.anchor_pem())
    assert added["source"] == "added" and added["signing"] is False
    await ca.add_root(_certs(first_root.anchor_pem())[0].public_bytes(serialization.Encoding.PEM))
    with pytest.raises(RootRefused, match="already"):
        await ca.add_root(next_root.anchor_pem())
    ca_no_files = MeshCa(MemoryStore(), _settings())
    await ca_no_files.add_root(next_root.anchor_pem())
    with pytest.raises(RootRefused, match="without its key"):
        await ca_no_files.activate_root(pki.serial_of(next_root.cert))
    assert {pki.serial_of(c) for c in _certs(ca.bundle_pem())} == {pki.serial_of(first_root.cert),
                                                                    pki.serial_of(next_root.cert)}
    # the files change to the next CA; the restart keeps trusting the first root from the store
    after = MeshCa(store, _settings(**next_files))
    new_leaf = after.sign(csr, pki.spiffe_id(TD, "default", "web"), "n1")
    bundle = after.bundle_pem()
    # the old intermediate travels in the old leaf's chain, as a TLS peer sends it
    assert pki.verified_peer(old_leaf.chain_pem, bundle, _certs(old_leaf.chain_pem)[1:]) is not None
    assert _chains_to(new_leaf.chain_pem, next_root.anchor_pem())
    # a node whose certificate came from the first intermediate renews through the next one
    svc_before = IdentityService(ca, JoinTokens(store))
    _r, secret = svc_before.tokens.create("default", "web")
    enrolled = await svc_before.sign(ca_pb2.SignRequest(csr_pem=csr, node_id="n9", token=secret), _any(_Ctx()))
    renewed = await IdentityService(after, JoinTokens(store)).sign(
        ca_pb2.SignRequest(csr_pem=csr), _any(_Ctx(_leaf(enrolled.cert_chain_pem))))
    assert _chains_to(renewed.cert_chain_pem, next_root.anchor_pem())
    await after.remove_root(pki.serial_of(first_root.cert), force=True)
    assert _certs(after.bundle_pem()) == [next_root.cert]
    for bad, why in [(b"junk", "not a PEM"), (old_leaf.chain_pem, "one certificate"),
                     (_certs(old_leaf.chain_pem)[0].public_bytes(serialization.Encoding.PEM), "not a CA")]:
        with pytest.raises(ValueError, match=why):
            await after.add_root(bad)


async def test_root_route_takes_a_certificate(tmp_path: Path) -> None:
    cp, client = await _api(tmp_path)
    try:
        other = pki.Authority.generate("corp")
        r = await client.post("/v1/identity/roots", json={"cert_pem": other.anchor_pem().decode()})
        assert r.status == 201, await r.text()
        assert (await r.json())["source"] == "added"
        r = await client.post("/v1/identity/roots", json={"cert_pem": other.anchor_pem().decode()})
        assert r.status == 409
        r = await client.post("/v1/identity/roots", json={"cert_pem": "junk"})
        assert r.status == 400 and [f["field"] for f in (await r.json())["fields"]] == ["cert_pem"]
        r = await client.post("/v1/identity/roots", json={"cert": "x"})
        assert r.status == 400
        assert len(_certs(await (await client.get("/v1/identity/bundle")).read())) == 2
    finally:
        await client.close()
        cp.registry.store.close()


async def test_bundle_watchers_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from meshpilot.identity import service as service_module

    monkeypatch.setattr(service_module, "MAX_WATCHERS", 1)
    w = World()
    _r, secret = w.tokens.create("shop", "cart")
    _issued, ctx = await w.enrol("vm-1", secret)
    first: Any = w.svc.watch_bundle(ca_pb2.BundleRequest(), ctx)
    await anext(first)
    second: Any = w.svc.watch_bundle(ca_pb2.BundleRequest(), ctx)
    with pytest.raises(Aborted) as info:
        await anext(second)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    await first.aclose()
    assert w.svc.watchers == 0
    third: Any = w.svc.watch_bundle(ca_pb2.BundleRequest(), ctx)
    await anext(third)
    await third.aclose()


def test_a_chain_certificate_that_is_no_ca_names_the_chain_setting(tmp_path: Path) -> None:
    _root, files = _operator_files(tmp_path)
    leaf = pki.Authority.generate("x").sign(pki.build_csr(pki.new_key(), "", ""), "spiffe://x/ns/a/sa/b", "n", 3600)
    Path(files["ca_chain_file"]).write_bytes(leaf.chain_pem)
    with pytest.raises(ValueError, match="^ca_chain_file: .*not a CA"):
        MeshCa(MemoryStore(), _settings(**files))


async def test_the_serving_certificate_follows_the_signing_root() -> None:
    ca = MeshCa(MemoryStore(), _settings())
    old = ca.signing_serial
    _key, chain = ca.serving_pem()
    assert _chains_to(chain, _root_pem(ca, old))
    new = (await ca.add_root())["serial"]
    assert ca.serving_pem()[1] == chain, "adding a root changes nothing that signs"
    await ca.activate_root(new)
    _key, after = ca.serving_pem()
    assert _chains_to(after, _root_pem(ca, new)), "expected a serving certificate from the new signing root"


# ---- the security review's findings --------------------------------------------------------------


async def test_a_fleet_token_does_not_take_over_an_enrolled_node_id(caplog: pytest.LogCaptureFixture) -> None:
    """S5: with one multi-use token per fleet, a second machine must not enrol under a node id that
    is enrolled and whose certificate is still valid (it would take over that node's identity)."""
    w = World()
    _r, fleet = w.tokens.create("shop", "cart")
    victim, _ctx = await w.enrol("vm-1", fleet)
    before = _refused_count("node_enrolled")
    with caplog.at_level(logging.WARNING, logger="meshpilot.identity"):
        details = await w.refused(grpc.StatusCode.PERMISSION_DENIED, csr_pem=pki.build_csr(pki.new_key(), "", ""),
                                  node_id="vm-1", token=fleet)
    assert "vm-1" in details and "/v1/identity/enrolments/" in details, details
    assert _refused_count("node_enrolled") == before + 1
    assert any("event=enrol_refused" in r.getMessage() and "reason=node_enrolled" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert _doc(w.store, ENROLMENTS, "vm-1")["serial"] == victim.serial, "the refused enrolment changed the victim's"
    assert w.tokens.list()[0]["used"] == 1, "a refused enrolment spent a use of the token"
    # the node lost its state: an operator removes its enrolment, and it enrols again with the token
    w.store.write({}, deletes=((ENROLMENTS, "vm-1"),))
    again, _ctx = await w.enrol("vm-1", fleet)
    assert _doc(w.store, ENROLMENTS, "vm-1")["previous_serial"] == "", "a new enrolment renews from no older certificate"
    # an enrolment whose certificate has run out can be made again (the node was down too long)
    w.clock.t = again.not_after
    await w.enrol("vm-1", fleet)


async def test_renewal_takes_the_current_certificate_or_the_one_presented_last(caplog: pytest.LogCaptureFixture) -> None:
    """S5: a renewal presents the enrolment's current certificate, or the one it presented at the
    last renewal (that answer may have been lost); an older copy or an earlier lineage is refused."""
    w = World()
    _r, fleet = w.tokens.create("shop", "cart")
    _c0, ctx0 = await w.enrol("vm-1", fleet)
    csr = pki.build_csr(pki.new_key(), "", "")
    lost = await w.sign(ctx0, csr_pem=csr)  # the answer never reaches the node
    c2 = await w.sign(ctx0, csr_pem=csr)  # so it retries with the certificate it has
    before = _refused_count("stale_certificate")
    with caplog.at_level(logging.WARNING, logger="meshpilot.identity"):
        details = await w.refused(grpc.StatusCode.PERMISSION_DENIED, _Ctx(_leaf(lost.cert_chain_pem)), csr_pem=csr)
    assert "is not the current certificate of node 'vm-1'" in details, details
    assert any("reason=stale_certificate" in r.getMessage() and "node='vm-1'" in r.getMessage() for r in caplog.records), \
        "expected the refusal logged with the certificate's node"
    assert _refused_count("stale_certificate") == before + 1
    c3 = await w.sign(_Ctx(_leaf(c2.cert_chain_pem)), csr_pem=csr)
    await w.refused(grpc.StatusCode.PERMISSION_DENIED, ctx0, csr_pem=csr)  # an older copy
    await w.sign(_Ctx(_leaf(c2.cert_chain_pem)), csr_pem=csr)  # c3's answer lost: c2 renews once more
    # the enrolment removed and made again: the earlier lineage renews no more
    w.store.write({}, deletes=((ENROLMENTS, "vm-1"),))
    _fresh, fresh_ctx = await w.enrol("vm-1", fleet)
    for old in (c2, c3):
        await w.refused(grpc.StatusCode.PERMISSION_DENIED, _Ctx(_leaf(old.cert_chain_pem)), csr_pem=csr)
    await w.sign(fresh_ctx, csr_pem=csr)


async def test_the_enrolment_port_serves_sign_only() -> None:
    """S10: strangers on the enrolment port (no client certificate) get no WatchBundle stream, so
    they cannot use up the watchers' limit; a token's Sign works there."""
    store = MemoryStore()
    ca = MeshCa(store, _settings())
    tokens = JoinTokens(store)
    server = EnrolmentServer(IdentityService(ca, tokens), "127.0.0.1", 0)
    task = asyncio.ensure_future(server.run())
    try:
        await asyncio.wait_for(server.started.wait(), 10)
        creds = grpc.ssl_channel_credentials(root_certificates=ca.bundle_pem())
        async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}", creds,
                                           options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
            watch = ch.unary_stream("/meshpilot.identity.v1.Identity/WatchBundle",
                                    request_serializer=ca_pb2.BundleRequest.SerializeToString,
                                    response_deserializer=ca_pb2.BundleResponse.FromString)(ca_pb2.BundleRequest())
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await asyncio.wait_for(watch.read(), 10)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED, info.value
            _r, secret = tokens.create("shop", "cart")
            sign = ch.unary_unary("/meshpilot.identity.v1.Identity/Sign",
                                  request_serializer=ca_pb2.SignRequest.SerializeToString,
                                  response_deserializer=ca_pb2.SignResponse.FromString)
            resp = await sign(ca_pb2.SignRequest(csr_pem=pki.build_csr(pki.new_key(), "", ""), node_id="vm-1",
                                                 token=secret), timeout=10)
            assert pki.peer_of(resp.cert_chain_pem) is not None
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_bundle_watch_needs_an_enrolled_nodes_certificate() -> None:
    w = World()
    no_cert: Any = w.svc.watch_bundle(ca_pb2.BundleRequest(), _any(_Ctx()))
    with pytest.raises(Aborted) as info:
        await anext(no_cert)
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    _r, secret = w.tokens.create("shop", "cart")
    _issued, ctx = await w.enrol("vm-1", secret)
    w.store.write({}, deletes=((ENROLMENTS, "vm-1"),))
    removed: Any = w.svc.watch_bundle(ca_pb2.BundleRequest(), ctx)
    with pytest.raises(Aborted) as info:
        await anext(removed)
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED and "not enrolled" in info.value.details
    assert w.svc.watchers == 0


async def test_removing_an_enrolment_cuts_the_node_off_once_it_is_durable() -> None:
    """S8: DELETE /v1/identity/enrolments/{node} ends the node's bundle watches and asks the control
    plane to close its xDS streams, after the removal is written."""
    store = MemoryStore()
    disconnected: list[tuple[str, str, object]] = []

    def disconnect(node_id: str, reason: str) -> None:
        disconnected.append((node_id, reason, store.get(ENROLMENTS, node_id)))

    core: Any = SimpleNamespace(settings=_settings(), registry=Registry(store), disconnect=disconnect)
    part = install(core)
    details: Any = SimpleNamespace(method="/meshpilot.identity.v1.Identity/WatchBundle", invocation_metadata=())
    handler: Any = part.grpc_handlers[0].service(details)
    svc: IdentityService = handler.unary_stream.__self__  # the plugin's service, as its handler holds it
    _r, secret = svc.tokens.create("shop", "cart")
    resp = await svc.sign(ca_pb2.SignRequest(csr_pem=pki.build_csr(pki.new_key(), "", ""), node_id="vm-1",
                                             token=secret), _any(_Ctx()))
    ctx: Any = _Ctx(_leaf(resp.cert_chain_pem))
    watches: list[Any] = [svc.watch_bundle(ca_pb2.BundleRequest(), ctx) for _ in range(2)]
    for watch in watches:
        await anext(watch)
    pending = [asyncio.ensure_future(anext(watch)) for watch in watches]
    await asyncio.sleep(0.01)
    [route] = [r for r in part.routes if (r.method, r.path) == ("DELETE", "/v1/identity/enrolments/{node}")]
    answer = await route.handler(make_mocked_request("DELETE", "/v1/identity/enrolments/vm-1", match_info={"node": "vm-1"}))
    assert answer.status == 200
    assert disconnected == [("vm-1", "enrolment removed", None)], \
        f"expected one disconnect of vm-1 after its enrolment was gone, got {disconnected}"
    for fut in pending:
        with pytest.raises(Aborted) as info:
            await asyncio.wait_for(fut, 1)
        assert info.value.code == grpc.StatusCode.PERMISSION_DENIED and "enrolment removed" in info.value.details
    assert svc.watchers == 0


async def test_activating_a_root_is_one_store_write() -> None:
    """A crash between two writes could leave no root (or two) marked signing."""
    writes: list[dict[tuple[str, str], Any]] = []

    class Recording(MemoryStore):
        def write(self, puts: Any, deletes: tuple[tuple[str, str], ...] = ()) -> None:
            writes.append(dict(puts))
            super().write(puts, deletes)

    ca = MeshCa(Recording(), _settings())
    old = ca.signing_serial
    new = (await ca.add_root())["serial"]
    writes.clear()
    await ca.activate_root(new)
    assert [{k: v["signing"] for k, v in w.items()} for w in writes] == [{(ROOTS, old): False, (ROOTS, new): True}], \
        f"expected one write switching both roots, got writes of {[sorted(w) for w in writes]}"


async def test_credential_threads_read_one_immutable_snapshot() -> None:
    """gRPC reads the bundle and the serving certificate from its own threads while the event loop
    adds and removes roots: what they read is replaced whole, never changed in place."""
    ca = MeshCa(MemoryStore(), _settings())
    before = ca._trust
    bundle = ca.bundle_pem()
    new = (await ca.add_root())["serial"]
    assert ca._trust is not before and before.bundle == bundle and len(before.roots) == 1, \
        "adding a root changed the snapshot a reader may hold"
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.signing = new  # type: ignore[misc]
    assert all(isinstance(getattr(before, f.name), (tuple, bytes, str, type(None)))
               for f in dataclasses.fields(before) if f.name != "operator")
    # readers on another thread during rotations see whole bundles and never fail
    stop = threading.Event()
    seen: set[int] = set()
    errors: list[BaseException] = []

    def read() -> None:
        while not stop.is_set():
            try:
                seen.add(len(_certs(ca.bundle_pem())))
                ca.serving_pem()
                ca.roots()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(20):
            old = ca.signing_serial
            await ca.activate_root(new)
            await ca.remove_root(old, force=True)
            new = (await ca.add_root())["serial"]
            await asyncio.sleep(0)
    finally:
        stop.set()
        reader.join(10)
    assert errors == [] and seen <= {1, 2, 3} and seen, f"readers failed: {errors!r}, bundle sizes {seen}"


async def test_renewal_refuses_a_leaf_another_ca_under_the_operators_root_issued(tmp_path: Path) -> None:
    """S11: with an operator intermediate, the trusted anchor is the corporate root; a leaf that
    root (or another CA under it) issued for an enrolled node's identity must not renew."""
    corp, files = _operator_files(tmp_path)
    store = MemoryStore()
    ca = MeshCa(store, _settings(**files))
    svc = IdentityService(ca, JoinTokens(store))
    _r, secret = svc.tokens.create("shop", "cart")
    csr = pki.build_csr(pki.new_key(), "", "")
    mine = await svc.sign(ca_pb2.SignRequest(csr_pem=csr, node_id="vm-1", token=secret), _any(_Ctx()))
    forged = corp.sign(csr, pki.spiffe_id(TD, "shop", "cart"), "vm-1", 3600)
    before = _refused_count("foreign_issuer")
    with pytest.raises(Aborted) as info:
        await svc.sign(ca_pb2.SignRequest(csr_pem=csr), _any(_Ctx(_leaf(forged.chain_pem))))
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED and "not issued by the mesh CA" in info.value.details
    assert _refused_count("foreign_issuer") == before + 1
    assert not ca.issued_here(_certs(forged.chain_pem)[0]) and ca.issued_here(_certs(mine.cert_chain_pem)[0])
    # the mesh's own certificate still renews
    await svc.sign(ca_pb2.SignRequest(csr_pem=csr), _any(_Ctx(_leaf(mine.cert_chain_pem))))


async def test_a_token_enrols_at_most_max_uses_nodes(tmp_path: Path) -> None:
    w = World()
    record, secret = w.tokens.create("shop", "cart", max_uses=2)
    assert record["max_uses"] == 2
    await w.enrol("vm-1", secret)
    await w.enrol("vm-2", secret)
    before = _refused_count("token_used_up")
    details = await w.refused(grpc.StatusCode.UNAUTHENTICATED, csr_pem=pki.build_csr(pki.new_key(), "", ""),
                              node_id="vm-3", token=secret)
    assert "used up" in details and _refused_count("token_used_up") == before + 1
    cp, client = await _api(tmp_path)
    try:
        r = await client.post("/v1/identity/tokens", json={"namespace": "shop", "service": "cart", "max_uses": 5})
        assert r.status == 201 and (await r.json())["max_uses"] == 5, await r.text()
        r = await client.post("/v1/identity/tokens", json={"namespace": "shop", "service": "cart", "max_uses": 0})
        assert r.status == 400 and [f["field"] for f in (await r.json())["fields"]] == ["max_uses"]
    finally:
        await client.close()
        cp.registry.store.close()


async def test_caller_refusal_tells_stream_admission_whether_an_enrolment_stands_for_the_certificate() -> None:
    w = World()
    _r, secret = w.tokens.create("shop", "cart")
    _issued, ctx = await w.enrol("vm-1", secret)
    assert w.svc.caller_refusal(ctx) is None
    anonymous = w.svc.caller_refusal(_any(_Ctx()))
    assert anonymous is not None and anonymous[0] == grpc.StatusCode.UNAUTHENTICATED, anonymous
    w.store.write({}, deletes=((ENROLMENTS, "vm-1"),))
    removed = w.svc.caller_refusal(ctx)
    assert removed is not None and removed[0] == grpc.StatusCode.PERMISSION_DENIED and "not enrolled" in removed[1], removed


async def test_leaves_of_a_previous_operator_root_renew_after_the_files_change(tmp_path: Path) -> None:
    """The issuer rule keeps every operator CA that signed here: an operator CA that is its own
    root (no ca_chain_file) and was then replaced in the files still renews its nodes."""
    paths: dict[str, dict[str, str]] = {}
    for name in ("first", "next"):
        cert, key, _chain = pki.Authority.generate("corp").to_pem()
        (tmp_path / f"{name}.crt").write_bytes(cert)
        (tmp_path / f"{name}.key").write_bytes(key)
        paths[name] = {"ca_cert_file": str(tmp_path / f"{name}.crt"), "ca_key_file": str(tmp_path / f"{name}.key")}
    store = MemoryStore()
    ca = MeshCa(store, _settings(**paths["first"]))
    svc = IdentityService(ca, JoinTokens(store))
    _r, secret = svc.tokens.create("shop", "cart")
    csr = pki.build_csr(pki.new_key(), "", "")
    enrolled = await svc.sign(ca_pb2.SignRequest(csr_pem=csr, node_id="vm-1", token=secret), _any(_Ctx()))
    await ca.add_root((tmp_path / "next.crt").read_bytes())
    await ca.add_root((tmp_path / "first.crt").read_bytes())
    after = MeshCa(store, _settings(**paths["next"]))
    renewed = await IdentityService(after, JoinTokens(store)).sign(
        ca_pb2.SignRequest(csr_pem=csr), _any(_Ctx(_leaf(enrolled.cert_chain_pem))))
    assert _chains_to(renewed.cert_chain_pem, (tmp_path / "next.crt").read_bytes())
