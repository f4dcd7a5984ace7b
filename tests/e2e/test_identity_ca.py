"""The mesh CA in a real control plane, administered with the real CLI, its certificates checked
by the real ``openssl verify``: a node enrols with a join token on the enrolment port, renews on
the xDS port with its certificate, a root is rotated (add, activate, renew, remove) while a bundle
watcher on the xDS port sees each change (the enrolment port serves no WatchBundle), the root
survives a restart, and an operator's intermediate signs."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import grpc
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshpilot import pki
from meshpilot.pki import ca_pb2
from tests.support import VENV_BIN, control_plane, operator_ca_files

TOKEN = "admin-secret"
SIGN = "/meshpilot.identity.v1.Identity/Sign"
WATCH = "/meshpilot.identity.v1.Identity/WatchBundle"
_OPTS = [("grpc.ssl_target_name_override", "localhost")]


def _cli(cp: Any, *args: str) -> str:
    r = subprocess.run([str(VENV_BIN / "meshpilot"), "identity", *args, "--api", cp.api, "--token", TOKEN],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"meshpilot identity {' '.join(args)}: expected success, got {r.returncode}: {r.stderr}"
    return r.stdout


def _openssl_verify(tmp: Path, chain_pem: bytes, roots_pem: bytes) -> subprocess.CompletedProcess[str]:
    """``openssl verify`` of a chain's leaf as a TLS client, through its intermediates, against roots."""
    leaf, *inter = x509.load_pem_x509_certificates(chain_pem)
    pem = serialization.Encoding.PEM
    (tmp / "leaf.pem").write_bytes(leaf.public_bytes(pem))
    (tmp / "roots.pem").write_bytes(roots_pem)
    cmd = ["openssl", "verify", "-purpose", "sslclient", "-CAfile", str(tmp / "roots.pem")]
    if inter:
        (tmp / "inter.pem").write_bytes(b"".join(c.public_bytes(pem) for c in inter))
        cmd += ["-untrusted", str(tmp / "inter.pem")]
    return subprocess.run([*cmd, str(tmp / "leaf.pem")], capture_output=True, text=True, timeout=30)


def _assert_verifies(tmp: Path, chain_pem: bytes, roots_pem: bytes) -> None:
    r = _openssl_verify(tmp, chain_pem, roots_pem)
    assert r.returncode == 0 and r.stdout.strip().endswith(": OK"), f"openssl verify: expected OK, got {r.stdout}{r.stderr}"


def _channel(port: int, bundle: bytes, key: bytes | None = None, chain: bytes | None = None) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=bundle, private_key=key, certificate_chain=chain)
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=_OPTS)


async def _sign(port: int, bundle: bytes, csr: bytes, node_id: str = "", token: str = "",
                client: tuple[bytes, bytes] | None = None) -> ca_pb2.SignResponse:
    async with _channel(port, bundle, *(client or (None, None))) as ch:
        call = ch.unary_unary(SIGN, request_serializer=ca_pb2.SignRequest.SerializeToString,
                              response_deserializer=ca_pb2.SignResponse.FromString)
        resp: ca_pb2.SignResponse = await call(ca_pb2.SignRequest(csr_pem=csr, node_id=node_id, token=token), timeout=10)
        return resp


def _bundle_of(msg: object) -> bytes:
    assert isinstance(msg, ca_pb2.BundleResponse), f"expected a BundleResponse, got {msg!r}"
    return msg.trust_bundle_pem


def _summary(cp: Any) -> dict[str, Any]:
    status, body = cp.call("GET", "/v1/identity", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200, (status, body)
    return dict(body)


def _start(tmp_path: Path, **settings: Any) -> Any:
    cfg = tmp_path / "cp.yaml"
    cfg.write_text(yaml.safe_dump({"identity": True, "token": TOKEN, **settings}))
    return control_plane(tmp_path, extra=["--config", str(cfg)])


def test_enrol_renew_and_rotate_a_root(tmp_path: Path) -> None:
    with _start(tmp_path) as cp:
        enrol_port = _summary(cp)["enrolment_port"]
        assert enrol_port > 0
        made = json.loads(_cli(cp, "token", "create", "--namespace", "shop", "--service", "cart", "--single-use",
                               "--ttl", "600", "--description", "vm pool"))
        assert made["single_use"] is True and made["expires_at"] is not None
        bundle = _cli(cp, "bundle").encode()
        old_root = x509.load_pem_x509_certificates(bundle)
        assert len(old_root) == 1

        # first contact: a join token on the enrolment port, no client certificate
        key = pki.new_key()
        csr = pki.build_csr(key, pki.spiffe_id("mesh.local", "kube-system", "admin"), "vm-1")
        first = asyncio.run(_sign(enrol_port, bundle, csr, node_id="vm-1", token=made["secret"]))
        peer = pki.peer_of(first.cert_chain_pem)
        assert peer is not None and (peer.spiffe, peer.node_id) == ("spiffe://mesh.local/ns/shop/sa/cart", "vm-1")
        _assert_verifies(tmp_path, first.cert_chain_pem, bundle)
        assert [t["used"] for t in json.loads(_cli(cp, "token", "list"))] == [1]

        # the xDS port wants a client certificate: without one there is no TLS session at all
        try:
            asyncio.run(_sign(cp.xds_port, bundle, csr))
            raise AssertionError("expected the xDS port to refuse a client without a certificate")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc

        # renewal on the xDS port, with the current certificate
        client = (pki.key_pem(key), first.cert_chain_pem)
        renewed = asyncio.run(_sign(cp.xds_port, bundle, csr, client=client))
        assert pki.peer_of(renewed.cert_chain_pem) == pki.Peer(peer.spiffe, "mesh.local", "shop", "cart", "vm-1",
                                                               renewed.not_after)

        # the enrolment port serves Sign only: a stranger holds no bundle watch open there
        async def watch_on_enrolment_port() -> grpc.StatusCode:
            async with _channel(enrol_port, bundle) as ch:
                watch = ch.unary_stream(WATCH, request_serializer=ca_pb2.BundleRequest.SerializeToString,
                                        response_deserializer=ca_pb2.BundleResponse.FromString)(ca_pb2.BundleRequest())
                try:
                    await asyncio.wait_for(watch.read(), 10)
                except grpc.aio.AioRpcError as exc:
                    return exc.code()
                raise AssertionError("expected no WatchBundle on the enrolment port, got a bundle")

        assert asyncio.run(watch_on_enrolment_port()) == grpc.StatusCode.UNIMPLEMENTED

        # rotation, watched on the xDS port with the node's certificate
        async def rotate() -> tuple[list[int], bytes, str]:
            async with _channel(cp.xds_port, bundle, *client) as ch:
                watch = ch.unary_stream(WATCH, request_serializer=ca_pb2.BundleRequest.SerializeToString,
                                        response_deserializer=ca_pb2.BundleResponse.FromString)(ca_pb2.BundleRequest())
                sizes = [len(x509.load_pem_x509_certificates(_bundle_of(await watch.read())))]
                added = json.loads(await asyncio.to_thread(_cli, cp, "roots", "add"))
                assert added["signing"] is False
                sizes.append(len(x509.load_pem_x509_certificates(_bundle_of(await watch.read()))))
                await asyncio.to_thread(_cli, cp, "roots", "activate", added["serial"])
                both = _cli(cp, "bundle").encode()
                third = await _sign(cp.xds_port, both, csr, client=client)
                watch.cancel()
                return sizes, third.cert_chain_pem, added["serial"]

        sizes, third, new_serial = asyncio.run(rotate())
        assert sizes == [1, 2], f"expected the watcher to see 1 then 2 roots, saw {sizes}"
        both = _cli(cp, "bundle").encode()
        new_root = [c for c in x509.load_pem_x509_certificates(both) if pki.serial_of(c) == new_serial]
        new_pem = new_root[0].public_bytes(serialization.Encoding.PEM)
        _assert_verifies(tmp_path, third, new_pem)
        assert _openssl_verify(tmp_path, renewed.cert_chain_pem, new_pem).returncode != 0, \
            "a certificate of the old root verified against the new root alone"
        _assert_verifies(tmp_path, renewed.cert_chain_pem, both)  # the old one stays trusted meanwhile

        # vm-1 renewed under the new root, so the old one can go; the signing one never
        old_serial = pki.serial_of(old_root[0])
        r = subprocess.run([str(VENV_BIN / "meshpilot"), "identity", "roots", "remove", new_serial, "--api", cp.api,
                            "--token", TOKEN], capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and "409" in r.stderr, f"removing the signing root: expected a 409, got {r.stderr}"
        _cli(cp, "roots", "remove", old_serial)
        roots = json.loads(_cli(cp, "roots", "list"))
        assert [(x["serial"], x["signing"]) for x in roots] == [(new_serial, True)]
        # the control plane's own certificate moved to the new root too: a client trusting only it connects
        fourth = asyncio.run(_sign(cp.xds_port, new_pem, csr, client=(pki.key_pem(key), third)))
        _assert_verifies(tmp_path, fourth.cert_chain_pem, new_pem)
        enrolled = json.loads(_cli(cp, "enrolments", "list"))
        assert [(e["node_id"], e["root"]) for e in enrolled] == [("vm-1", new_serial)]
        bundle_before_restart = _cli(cp, "bundle")

    with _start(tmp_path) as cp:
        assert _cli(cp, "bundle") == bundle_before_restart, "the roots did not survive a restart"
        assert [x["serial"] for x in json.loads(_cli(cp, "roots", "list"))] == [new_serial]


def _operator_ca(tmp: Path) -> tuple[bytes, dict[str, str]]:
    """An operator's offline root and an intermediate for the mesh: (root PEM, settings)."""
    root, files = operator_ca_files(tmp / "operator")
    return root.anchor_pem(), files


def test_an_operator_intermediate_signs_chains_openssl_accepts(tmp_path: Path) -> None:
    root_pem, files = _operator_ca(tmp_path)
    with _start(tmp_path, **files) as cp:
        bundle = _cli(cp, "bundle").encode()
        assert bundle == root_pem, "expected the operator's root as the whole bundle"
        made = json.loads(_cli(cp, "token", "create", "--namespace", "default", "--service", "web"))
        key = pki.new_key()
        long_node = "vm-" + "x" * 120 + ".corp.example:zone/a@b"  # longer than a CN's usual 64 characters
        csr = pki.build_csr(key, "", long_node)
        resp = asyncio.run(_sign(_summary(cp)["enrolment_port"], bundle, csr, node_id=long_node, token=made["secret"]))
        chain = x509.load_pem_x509_certificates(resp.cert_chain_pem)
        assert len(chain) == 2 and chain[1].subject.rfc4514_string() == "CN=corp mesh intermediate"
        _assert_verifies(tmp_path, resp.cert_chain_pem, root_pem)
        # and it renews over TLS with that chain as its client certificate
        renewed = asyncio.run(_sign(cp.xds_port, bundle, csr, client=(pki.key_pem(key), resp.cert_chain_pem)))
        peer = pki.peer_of(renewed.cert_chain_pem)
        assert peer is not None and peer.node_id == long_node and peer.spiffe == "spiffe://mesh.local/ns/default/sa/web"
