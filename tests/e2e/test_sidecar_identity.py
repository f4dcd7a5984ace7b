"""Real Envoy with a workload identity: the bootstrap validates, Envoy takes its certificate from the
agent's SDS server over the unix socket, reaches a TLS control plane with it (the server sees the
workload's SPIFFE id), picks up a rotated certificate without a restart, and refuses a control plane
whose certificate does not carry the control plane's SPIFFE id."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Coroutine, TypeVar

import grpc
import pytest
from cryptography import x509

from meshpilot import pki
from meshpilot.sidecar.sds import SdsServer, SecretStore
from meshpilot.translate.bootstrap import BootstrapOptions, build_bootstrap
from tests.support import assert_envoy_accepts, envoy, wait_until

pytestmark = pytest.mark.e2e

TD = "corp.test"
T = TypeVar("T")


class Loop:
    """An asyncio loop in a thread: the SDS server and the stand-in control plane run there while the
    test drives Envoy synchronously."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@dataclass
class ControlPlane:
    """A TLS gRPC server that requires a client certificate and records who opened ADS streams."""

    key_pem: bytes
    chain_pem: bytes
    roots_pem: bytes
    peers: list[str] = field(default_factory=list)
    server: grpc.aio.Server | None = None
    port: int = 0

    async def start(self) -> None:
        async def ads(request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            peer = pki.peer_from_context(context)
            self.peers.append(peer.spiffe if peer else "")
            async for _ in request_iterator:
                pass

        handler = grpc.method_handlers_generic_handler("envoy.service.discovery.v3.AggregatedDiscoveryService", {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(ads),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(ads),
        })
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((handler,))
        creds = grpc.ssl_server_credentials([(self.key_pem, self.chain_pem)], root_certificates=self.roots_pem,
                                            require_client_auth=True)
        self.port = self.server.add_secure_port("127.0.0.1:0", creds)
        await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)


def _workload(ca: pki.Authority, node: str) -> tuple[bytes, pki.Issued]:
    key = pki.new_key()
    spiffe = pki.spiffe_id(TD, "shop", "web")
    return pki.key_pem(key), ca.sign(pki.build_csr(key, spiffe, node), spiffe, node, 3600)


@pytest.fixture
def loop() -> Iterator[Loop]:
    lp = Loop()
    try:
        yield lp
    finally:
        lp.close()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="sds", dir="/tmp"))  # a unix socket path must stay short
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _cert_serials(e: Any) -> set[str]:
    doc = json.loads(e.admin("/certs"))
    return {c.get("serial_number", "").lower().lstrip("0")
            for entry in doc.get("certificates", []) for c in entry.get("cert_chain", [])}


def _serial(issued: pki.Issued) -> str:
    return issued.serial.lower().lstrip("0")


def _bootstrap(port: int, sock: Path) -> dict[str, Any]:
    return build_bootstrap(BootstrapOptions(node_id="web-1", service="web", admin_port=0, control_plane_port=port,
                                            identity=True, sds_socket=str(sock), trust_domain=TD,
                                            tls_server_name="localhost", api_type="GRPC", hds=True))


def test_the_identity_bootstrap_validates(tmp_path: Path) -> None:
    assert_envoy_accepts(_bootstrap(15010, tmp_path / "sds.sock"), tmp_path, "the bootstrap with identity on")


def test_envoy_takes_its_certificate_over_sds_and_reaches_the_tls_control_plane(
        tmp_path: Path, loop: Loop, sockdir: Path) -> None:
    ca = pki.Authority.generate(TD)
    cp_key = pki.new_key()
    served = ca.serve(cp_key, pki.control_plane_id(TD), ["localhost"], ["127.0.0.1"], 3600)
    cp = ControlPlane(pki.key_pem(cp_key), served.chain_pem, ca.anchor_pem())
    key_pem, first = _workload(ca, "web-1")
    store = SecretStore()
    sds = SdsServer(store, sockdir / "sds" / "sds.sock")

    async def up() -> None:
        store.set(key_pem, first.chain_pem, ca.anchor_pem())
        await sds.start()
        await cp.start()

    loop.run(up())
    try:
        with envoy(tmp_path, _bootstrap(cp.port, sds.socket_path)) as e:
            wait_until(lambda: cp.peers, 20, what="an ADS stream from Envoy over TLS")
            assert cp.peers[0] == pki.spiffe_id(TD, "shop", "web"), f"the control plane saw {cp.peers}"
            wait_until(lambda: _serial(first) in _cert_serials(e), 10, what="Envoy listing its SDS certificate")
            key2, second = _workload(ca, "web-1")
            loop.loop.call_soon_threadsafe(store.set, key2, second.chain_pem, ca.anchor_pem())
            wait_until(lambda: _serial(second) in _cert_serials(e), 10, what="Envoy picking up the rotated certificate")
            assert e.proc is not None and e.proc.poll() is None
    finally:
        loop.run(cp.stop())
        loop.run(sds.stop())


def test_envoy_refuses_a_control_plane_without_the_control_plane_id(tmp_path: Path, loop: Loop, sockdir: Path) -> None:
    ca = pki.Authority.generate(TD)
    impostor_key, impostor = _workload(ca, "impostor")  # a workload certificate of the same CA
    cp = ControlPlane(impostor_key, impostor.chain_pem, ca.anchor_pem())
    key_pem, mine = _workload(ca, "web-1")
    store = SecretStore()
    sds = SdsServer(store, sockdir / "sds" / "sds.sock")

    async def up() -> None:
        store.set(key_pem, mine.chain_pem, ca.anchor_pem())
        await sds.start()
        await cp.start()

    loop.run(up())
    try:
        with envoy(tmp_path, _bootstrap(cp.port, sds.socket_path)) as e:
            wait_until(lambda: (e.stat("cluster.meshpilot-xds.ssl.fail_verify_san") or 0) > 0, 20,
                       what="Envoy refusing the impostor's certificate (ssl.fail_verify_san)")
            assert cp.peers == [], f"no ADS stream may reach an impostor, got {cp.peers}"
    finally:
        loop.run(cp.stop())
        loop.run(sds.stop())


# ---- the agent against a real control plane with identity on ---------------------------------------------


def test_the_agent_enrols_and_its_envoy_and_meshdns_reach_the_control_plane_over_tls(tmp_path: Path) -> None:
    import signal
    import stat
    import subprocess

    import yaml

    from tests.support import VENV_BIN, control_plane, tmpdir

    token = "s3cret"
    auth = {"Authorization": f"Bearer {token}"}
    config = tmp_path / "cp.yaml"
    config.write_text(yaml.safe_dump({"identity": True, "trust_domain": TD, "workload_cert_ttl_s": 60}))
    work = tmpdir("mpid-")  # short: the SDS socket lives in it
    with control_plane(tmp_path, extra=["--config", str(config), "--token", token]) as cp:
        status, made = cp.call("POST", "/v1/identity/tokens", {"namespace": "shop", "service": "web", "single_use": True},
                               auth)
        assert status == 201, made
        status, summary = cp.call("GET", "/v1/identity", None, auth)
        assert status == 200 and summary["enrolment_port"], summary
        (work / "token").write_text(made["secret"])
        (work / "bundle.pem").write_text(summary["bundle_pem"])
        spec = work / "spec.yaml"
        spec.write_text(yaml.safe_dump({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 9}]},
            "mesh": {"sidecar": {"adminPort": 0, "inboundPort": _free(), "outboundPort": _free()},
                     "dns": {"enabled": True, "listen": "127.0.0.1:0", "upstreams": ["127.0.0.1:9"]}},
        }))
        ready = work / "ready.json"
        log = work / "agent.log"
        proc = subprocess.Popen(
            [str(VENV_BIN / "meshpilot"), "sidecar", "--spec", str(spec), "--control-plane", f"127.0.0.1:{cp.xds_port}",
             "--api", cp.api, "--token", token, "--node-id", "web-1", "--workdir", str(work / "agent"),
             "--ready-file", str(ready), "--trust-bundle", str(work / "bundle.pem"),
             "--join-token-file", str(work / "token"), "--enrol-port", str(summary["enrolment_port"])],
            stdout=open(log, "ab"), stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: ready.exists() or proc.poll() is not None, 30, what="the agent's ready file")
            assert proc.poll() is None, f"the agent exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            info = json.loads(ready.read_text())
            assert info["spiffe_id"] == pki.spiffe_id(TD, "shop", "web"), info
            text = log.read_text()
            assert "event=enrolled" in text and made["secret"] not in text, "enrolled, and the token never logged"
            for name in ("key.pem", "cert.pem"):
                mode = stat.S_IMODE((work / "agent" / "identity" / name).stat().st_mode)
                assert mode == 0o600, f"{name}: {oct(mode)}"
            boot = (work / "agent" / "envoy.json").read_text()
            assert "key.pem" not in boot and "BEGIN" not in boot, "no key or certificate in the bootstrap"

            def connected() -> set[str]:
                status, proxies = cp.call("GET", "/v1/proxies", None, auth)
                return {p.get("node_id") or p.get("id") or p.get("node") for p in proxies} if status == 200 else set()

            wait_until(lambda: {"web-1", "web-1~meshdns"} <= connected(), 20,
                       what="Envoy's ADS stream and meshdns's table stream over TLS")
            # the agent renews at half-life (30 s of 60): Envoy serves the new certificate, meshdns reconnects with it
            wait_until(lambda: "event=renewed" in log.read_text(), 45, interval=0.5, what="the agent's renewal")
            def stored_serial() -> str:
                return format(x509.load_pem_x509_certificate(
                    (work / "agent" / "identity" / "cert.pem").read_bytes()).serial_number, "x")

            def envoy_serials() -> set[str]:
                with urllib.request.urlopen(f"http://127.0.0.1:{json.loads(ready.read_text())['admin_port']}/certs",
                                            timeout=5) as r:
                    doc = json.loads(r.read())
                return {c.get("serial_number", "").lower().lstrip("0")
                        for e in doc.get("certificates", []) for c in e.get("cert_chain", [])}

            wait_until(lambda: stored_serial().lstrip("0") in envoy_serials(), 10, what="Envoy holding the renewed certificate")
            assert "event=ads_reconnect reason=new_credentials" in log.read_text(), "meshdns must reconnect when renewed"
            assert proc.poll() is None
            # a renewal with the stored certificate on the xDS port (client certificate, no token), and the bundle
            renewed, bundle = asyncio.run(_renew_and_watch(work / "agent" / "identity", work / "bundle.pem",
                                                           cp.xds_port, summary["enrolment_port"]))
            assert renewed.spiffe == info["spiffe_id"] and renewed.node_id == "web-1"
            assert pki.bundle_pem([bundle]) == pki.bundle_pem([summary["bundle_pem"].encode()])
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            shutil.rmtree(work, ignore_errors=True)


def _free() -> int:
    from tests.support import free_port

    return free_port()


async def _renew_and_watch(state: Path, bundle: Path, xds_port: int, enrol_port: int) -> tuple[Any, bytes]:
    from meshpilot.sidecar.identity import GrpcSigner, Phase, WorkloadIdentity

    signer = GrpcSigner(f"127.0.0.1:{xds_port}", "localhost", enrol_target=f"127.0.0.1:{enrol_port}")
    ident = WorkloadIdentity(node_id="web-1", signer=signer, trust_bundle_file=bundle, state_dir=state)
    held = ident.material
    assert held is not None, "the agent's stored certificate must load"
    renewed = await ident.attempt(Phase.RENEW)
    assert renewed.key_pem != held.key_pem and renewed.not_after >= held.not_after
    async for first in signer.watch_bundle(held, ident.trust_pem()):
        return renewed, first
    raise AssertionError("WatchBundle ended without a bundle")


def test_identity_files_keeps_a_proxyless_apps_certificate_as_files(tmp_path: Path) -> None:
    import signal
    import stat
    import subprocess

    import yaml

    from meshpilot.sidecar.identity import GrpcSigner, material_of
    from tests.support import VENV_BIN, control_plane

    token = "s3cret"
    auth = {"Authorization": f"Bearer {token}"}
    config = tmp_path / "cp.yaml"
    config.write_text(yaml.safe_dump({"identity": True, "trust_domain": TD}))
    with control_plane(tmp_path, extra=["--config", str(config), "--token", token]) as cp:
        status, made = cp.call("POST", "/v1/identity/tokens", {"namespace": "shop", "service": "grpc-client"}, auth)
        assert status == 201, made
        status, summary = cp.call("GET", "/v1/identity", None, auth)
        (tmp_path / "token").write_text(made["secret"])
        (tmp_path / "bundle.pem").write_text(summary["bundle_pem"])
        out = tmp_path / "files"
        log = tmp_path / "identity-files.log"
        proc = subprocess.Popen(
            [str(VENV_BIN / "meshpilot"), "identity-files", "--out", str(out), "--control-plane",
             f"127.0.0.1:{cp.xds_port}", "--enrol-port", str(summary["enrolment_port"]), "--node-id", "grpc-client-1",
             "--join-token-file", str(tmp_path / "token"), "--trust-bundle", str(tmp_path / "bundle.pem")],
            stdout=open(log, "ab"), stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: (out / "cert.pem").exists() or proc.poll() is not None, 30, what="cert.pem")
            assert proc.poll() is None, f"identity-files exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            m = material_of((out / "key.pem").read_bytes(), (out / "cert.pem").read_bytes(),
                            (out / "bundle.pem").read_bytes())
            assert m.spiffe == pki.spiffe_id(TD, "shop", "grpc-client") and m.node_id == "grpc-client-1"
            assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
            # the files are a working client identity: the xDS port (client certificates required) accepts them
            signer = GrpcSigner(f"127.0.0.1:{cp.xds_port}", "localhost")

            async def first_bundle() -> bytes:
                async for b in signer.watch_bundle(m, m.bundle_pem):
                    return b
                raise AssertionError("WatchBundle ended without a bundle")

            assert b"BEGIN CERTIFICATE" in asyncio.run(first_bundle())
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
        assert code == 0, f"identity-files must stop cleanly on SIGTERM, got {code}:\n{log.read_text()[-2000:]}"


def test_a_removed_root_leaves_a_proxyless_apps_trust_though_its_bundle_file_still_names_it(tmp_path: Path) -> None:
    """identity-files installed with a bundle file holding the first root A. The operator adds B, activates
    it and removes A (the response to a leaked root): the app's bundle.pem and the saved state then hold B
    only, while the file still holds A only, and the node goes on renewing under B. A restart uses the saved
    bundle, not the file (here deleted)."""
    import signal
    import subprocess

    import yaml

    from tests.support import VENV_BIN, control_plane

    token = "s3cret"
    auth = {"Authorization": f"Bearer {token}"}
    config = tmp_path / "cp.yaml"
    config.write_text(yaml.safe_dump({"identity": True, "trust_domain": TD, "workload_cert_ttl_s": 10}))
    with control_plane(tmp_path, extra=["--config", str(config), "--token", token]) as cp:
        status, made = cp.call("POST", "/v1/identity/tokens", {"namespace": "shop", "service": "grpc-client"}, auth)
        assert status == 201, made
        status, summary = cp.call("GET", "/v1/identity", None, auth)
        root_a = pki.bundle_pem([summary["bundle_pem"].encode()])
        (tmp_path / "token").write_text(made["secret"])
        (tmp_path / "bundle.pem").write_bytes(root_a)
        out = tmp_path / "files"
        log = tmp_path / "identity-files.log"
        argv = [str(VENV_BIN / "meshpilot"), "identity-files", "--out", str(out), "--control-plane",
                f"127.0.0.1:{cp.xds_port}", "--enrol-port", str(summary["enrolment_port"]), "--node-id", "grpc-client-1",
                "--join-token-file", str(tmp_path / "token"), "--trust-bundle", str(tmp_path / "bundle.pem")]

        def start() -> subprocess.Popen[bytes]:
            return subprocess.Popen(argv, stdout=open(log, "ab"), stderr=subprocess.STDOUT)

        def stop(proc: subprocess.Popen[bytes]) -> None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

        proc = start()
        try:
            wait_until(lambda: (out / "cert.pem").exists() or proc.poll() is not None, 30, what="cert.pem")
            assert proc.poll() is None, f"identity-files exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            old = [r["serial"] for r in cp.call("GET", "/v1/identity/roots", headers=auth)[1]]
            status, added = cp.call("POST", "/v1/identity/roots", {}, auth)
            assert status in (200, 201), (status, added)
            new = next(r["serial"] for r in cp.call("GET", "/v1/identity/roots", headers=auth)[1] if r["serial"] not in old)
            status, body = cp.call("POST", f"/v1/identity/roots/{new}/activate", {}, auth)
            assert status == 200, (status, body)
            # refused until the node renewed under B (at half of the 10 s life)
            wait_until(lambda: cp.call("DELETE", f"/v1/identity/roots/{old[0]}", headers=auth)[0] == 200, 30,
                       what="root A removable once the node renewed under B")
            root_b = pki.bundle_pem([cp.call("GET", "/v1/identity", None, auth)[1]["bundle_pem"].encode()])
            assert root_b and root_b != root_a and root_a not in root_b
            wait_until(lambda: pki.bundle_pem([(out / "bundle.pem").read_bytes()]) == root_b, 15,
                       what="the app's bundle.pem holding B only")
            assert pki.bundle_pem([(out / ".state" / "bundle.pem").read_bytes()]) == root_b, "the saved state"
            assert (tmp_path / "bundle.pem").read_bytes() == root_a, "the installed file still names only A"
            renewed = log.read_text().count("event=renewed")
            wait_until(lambda: log.read_text().count("event=renewed") > renewed, 15,
                       what="a renewal with only B trusted")
        finally:
            stop(proc)
        # a restart trusts the saved bundle: the file is not needed (nor read) any more
        (tmp_path / "bundle.pem").unlink()
        (tmp_path / "token").unlink()
        before = log.read_text().count("event=renewed")
        proc = start()
        try:
            wait_until(lambda: log.read_text().count("event=renewed") > before or proc.poll() is not None, 20,
                       what="a renewal after the restart")
            assert proc.poll() is None, log.read_text()[-3000:]
            assert pki.bundle_pem([(out / "bundle.pem").read_bytes()]) == root_b
        finally:
            stop(proc)
