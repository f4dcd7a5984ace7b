"""Identity on: the attacks a stranger or a rogue node tries on the control plane's gRPC ports.

A real control plane (``identity: true``) in its own process; the attacker is a gRPC client on
the same machine, as one on the same network would be: without a certificate, with a certificate
of another service, with a revoked join token. Each attack used to work on the plaintext port."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.health.v3 import hds_pb2

from meshpilot.pki import build_csr, key_pem, new_key, peer_of, spiffe_id
from meshpilot.pki import ca_pb2
from meshpilot.xds.resource import TYPE
from tests.support import control_plane

TOKEN = "admin-secret"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
HDS = "/envoy.service.health.v3.HealthDiscoveryService/StreamHealthCheck"
SIGN = "/meshpilot.identity.v1.Identity/Sign"
_OPTS = [("grpc.ssl_target_name_override", "localhost")]


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[Any]:
    cfg = tmp_path / "cp.yaml"
    cfg.write_text(yaml.safe_dump({"identity": True, "token": TOKEN, "debounce_ms": 20}))
    with control_plane(tmp_path, extra=["--config", str(cfg)]) as c:
        for name in ("web", "db"):
            status, body = c.call("POST", "/v1/services", {"name": name, "ports": [{"name": "http", "port": 80, "protocol": "http"}]}, ADMIN)
            assert status == 201, (status, body)
        yield c


def _bundle(cp: Any) -> bytes:
    status, body = cp.call("GET", "/v1/identity/bundle", headers=ADMIN)
    assert status == 200 and "BEGIN CERTIFICATE" in str(body), (status, body)
    return str(body).encode()


def _token(cp: Any, service: str, **extra: Any) -> tuple[str, str]:
    status, body = cp.call("POST", "/v1/identity/tokens", {"namespace": "default", "service": service, **extra}, ADMIN)
    assert status == 201, (status, body)
    return body["id"], body["secret"]


def _channel(cp: Any, bundle: bytes, key: bytes | None = None, chain: bytes | None = None, port: int = 0) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=bundle, private_key=key, certificate_chain=chain)
    return grpc.aio.secure_channel(f"127.0.0.1:{port or cp.xds_port}", creds, options=_OPTS)


def _enrolment_port(cp: Any) -> int:
    status, body = cp.call("GET", "/v1/identity", headers=ADMIN)
    assert status == 200, (status, body)
    return int(body["enrolment_port"])


async def _sign(cp: Any, bundle: bytes, node_id: str, token: str) -> tuple[bytes, bytes]:
    """Enrol ``node_id`` with a join token on the enrolment port (TLS, no client certificate)."""
    key = new_key()
    csr = build_csr(key, "spiffe://ignored/ns/x/sa/y", node_id)
    async with _channel(cp, bundle, port=_enrolment_port(cp)) as ch:
        call = ch.unary_unary(SIGN, request_serializer=ca_pb2.SignRequest.SerializeToString,
                              response_deserializer=ca_pb2.SignResponse.FromString)
        resp = await call(ca_pb2.SignRequest(csr_pem=csr, node_id=node_id, token=token), timeout=10)
    return key_pem(key), resp.cert_chain_pem


def _enrol(cp: Any, bundle: bytes, node_id: str, service: str) -> tuple[bytes, bytes]:
    _, secret = _token(cp, service)
    return asyncio.run(_sign(cp, bundle, node_id, secret))


async def _ads(ch: grpc.aio.Channel, node_id: str, service: str = "") -> list[discovery_pb2.DiscoveryResponse]:
    """Ask for every cluster as ``node_id``; what came back before the stream ended (or 3 s passed)."""
    req = discovery_pb2.DiscoveryRequest(type_url=TYPE.CLUSTER)
    req.node.id = node_id
    if service:
        req.node.metadata.update({"SERVICE": service, "NAMESPACE": "default", "INBOUND_PORT": 15006, "APP_PORT": 8080})
    call = ch.stream_stream(ADS, request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                            response_deserializer=discovery_pb2.DiscoveryResponse.FromString)
    stream = call(iter([req]))
    got: list[discovery_pb2.DiscoveryResponse] = []
    try:
        async with asyncio.timeout(3):
            async for resp in stream:
                got.append(resp)
                break
    except TimeoutError:
        stream.cancel()
    return got


async def _ads_outcome(ch: grpc.aio.Channel, node_id: str, service: str = "") -> tuple[grpc.StatusCode | None, int]:
    try:
        got = await _ads(ch, node_id, service)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), 0
    return None, sum(len(r.resources) for r in got)


async def _hds_outcome(ch: grpc.aio.Channel, node_id: str, service: str, address: str = "127.0.0.1") -> grpc.StatusCode | None:
    msg = hds_pb2.HealthCheckRequestOrEndpointHealthResponse()
    n = msg.health_check_request.node
    n.id = node_id
    n.metadata.update({"SERVICE": service, "NAMESPACE": "default", "INBOUND_PORT": 15006, "APP_PORT": 8080,
                       "PORT_NAME": "http", "BIND_ADDRESS": address, "HEALTH_CHECK": {"kind": "tcp"}})
    call = ch.stream_stream(HDS, request_serializer=hds_pb2.HealthCheckRequestOrEndpointHealthResponse.SerializeToString,
                            response_deserializer=hds_pb2.HealthCheckSpecifier.FromString)
    stream = call(iter([msg]))
    try:
        async with asyncio.timeout(3):
            async for _ in stream:
                return None  # a specifier: the registration went through
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    except TimeoutError:
        stream.cancel()
    return None


async def _hold_ads(cp: Any, bundle: bytes, key: bytes, chain: bytes, node_id: str, timeout: float,
                    on_response: Callable[[discovery_pb2.DiscoveryResponse], Awaitable[None]] | None = None) -> Any:
    """Hold an ADS stream as ``node_id``, ACKing every response, as long as the server lets it live
    (at most ``timeout`` s): how it ended, a status code, "ended" or "timeout"."""
    req = discovery_pb2.DiscoveryRequest(type_url=TYPE.CLUSTER)
    req.node.id = node_id
    async with _channel(cp, bundle, key, chain) as ch:
        call = ch.stream_stream(ADS, request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                                response_deserializer=discovery_pb2.DiscoveryResponse.FromString)
        queue: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()
        await queue.put(req)

        async def requests() -> Any:
            while (r := await queue.get()) is not None:
                yield r

        stream = call(requests())
        try:
            async with asyncio.timeout(timeout):
                async for resp in stream:
                    await queue.put(discovery_pb2.DiscoveryRequest(type_url=TYPE.CLUSTER, version_info=resp.version_info,
                                                                   response_nonce=resp.nonce))
                    if on_response is not None:
                        await on_response(resp)
            return "ended"
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        except TimeoutError:
            stream.cancel()
            return "timeout"


def _instances(cp: Any, service: str) -> list[dict[str, Any]]:
    status, body = cp.call("GET", f"/v1/services/default/{service}/instances", headers=ADMIN)
    assert status == 200, (status, body)
    return list(body)


def test_a_stranger_without_a_certificate_gets_nothing_and_registers_nothing(cp: Any) -> None:
    bundle = _bundle(cp)
    key, chain = _enrol(cp, bundle, "web-1", "web")

    async def attack() -> tuple[Any, Any, Any, Any]:
        async with _channel(cp, bundle, key, chain) as ch:  # the port serves, to a client with a certificate
            served = await _ads_outcome(ch, "web-1", "web")
        async with _channel(cp, bundle) as ch:  # TLS, but no client certificate
            ads = await _ads_outcome(ch, "anyone")
            hds = await _hds_outcome(ch, "fake-web", "web")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{cp.xds_port}") as plain:  # the old plaintext way
            try:
                await _ads(plain, "anyone")
                plaintext: Any = "served"
            except grpc.aio.AioRpcError as exc:
                plaintext = exc.code()
        return served, ads, hds, plaintext

    served, ads, hds, plaintext = asyncio.run(attack())
    assert served[0] is None and served[1] > 0, f"expected the enrolled node served on the same port, got {served}"
    # the TLS handshake itself refuses a client without a certificate: nothing reaches a stream
    assert ads == (grpc.StatusCode.UNAVAILABLE, 0), f"expected an anonymous ADS stream refused with nothing sent, got {ads}"
    assert hds == grpc.StatusCode.UNAVAILABLE, f"expected an anonymous HDS registration refused, got {hds}"
    assert plaintext == grpc.StatusCode.UNAVAILABLE, f"expected no plaintext xDS with identity on, got {plaintext}"
    assert _instances(cp, "web") == [], "an anonymous stream registered an instance"


def test_a_valid_node_cannot_claim_another_node_or_service(cp: Any) -> None:
    bundle = _bundle(cp)
    key, chain = _enrol(cp, bundle, "web-1", "web")
    peer = peer_of(chain)
    assert peer is not None and peer.spiffe == spiffe_id("mesh.local", "default", "web") and peer.node_id == "web-1", peer

    async def attempts() -> dict[str, Any]:
        async with _channel(cp, bundle, key, chain) as ch:
            return {
                "own ADS": await _ads_outcome(ch, "web-1", "web"),
                "ADS as db-1": await _ads_outcome(ch, "db-1", "db"),
                "ADS as web-1 claiming db": await _ads_outcome(ch, "web-1", "db"),
                "HDS for db": await _hds_outcome(ch, "web-1", "db"),
                "HDS as web-2": await _hds_outcome(ch, "web-2", "web", "10.9.9.9"),
                # its own node, but an address it does not connect from: callers would be sent there
                "HDS at another address": await _hds_outcome(ch, "web-1", "web", "10.9.9.9"),
            }

    got = asyncio.run(attempts())
    code, n = got["own ADS"]
    assert code is None and n > 0, f"expected the node's own ADS stream served, got {got['own ADS']}"
    for what in ("ADS as db-1", "ADS as web-1 claiming db"):
        assert got[what] == (grpc.StatusCode.PERMISSION_DENIED, 0), f"{what}: expected PERMISSION_DENIED and nothing, got {got[what]}"
    for what in ("HDS for db", "HDS as web-2", "HDS at another address"):
        assert got[what] == grpc.StatusCode.PERMISSION_DENIED, f"{what}: expected PERMISSION_DENIED, got {got[what]}"
    assert _instances(cp, "db") == [], "web's certificate registered an instance of db"
    assert all(i["id"] != "web-2" for i in _instances(cp, "web")), "web-1's certificate registered another node"
    assert all(i["address"] != "10.9.9.9" for i in _instances(cp, "web")), "web-1 registered an address it does not connect from"


def test_a_revoked_or_used_join_token_enrols_nothing(cp: Any) -> None:
    bundle = _bundle(cp)
    token_id, secret = _token(cp, "web")
    status, body = cp.call("DELETE", f"/v1/identity/tokens/{token_id}", headers=ADMIN)
    assert status in (200, 204), (status, body)
    once_id, once = _token(cp, "web", single_use=True)

    def sign(node: str, token: str) -> Any:
        try:
            return asyncio.run(_sign(cp, bundle, node, token))
        except grpc.aio.AioRpcError as exc:
            return exc.code()

    assert sign("web-7", secret) == grpc.StatusCode.UNAUTHENTICATED, "a revoked token enrolled a node"
    assert isinstance(sign("web-8", once), tuple), "a fresh single-use token should enrol once"
    assert sign("web-9", once) == grpc.StatusCode.UNAUTHENTICATED, "a single-use token enrolled a second node"
    assert sign("web-10", "mpj.nosuch.secret") == grpc.StatusCode.UNAUTHENTICATED


def test_another_service_cannot_take_over_an_enrolled_node_id(cp: Any) -> None:
    bundle = _bundle(cp)
    _enrol(cp, bundle, "node-a", "web")
    _, db_token = _token(cp, "db")
    try:
        asyncio.run(_sign(cp, bundle, "node-a", db_token))
        outcome: Any = "signed"
    except grpc.aio.AioRpcError as exc:
        outcome = exc.code()
    assert outcome == grpc.StatusCode.PERMISSION_DENIED, f"expected db's token refused for web's node id, got {outcome}"


def test_a_stream_ends_with_its_certificate_and_an_expired_one_opens_nothing(tmp_path: Path) -> None:
    cfg = tmp_path / "cp.yaml"
    cfg.write_text(yaml.safe_dump({"identity": True, "token": TOKEN, "workload_cert_ttl_s": 10}))
    with control_plane(tmp_path, extra=["--config", str(cfg)]) as cp:
        status, body = cp.call("POST", "/v1/services", {"name": "web", "ports": [{"name": "http", "port": 80, "protocol": "http"}]}, ADMIN)
        assert status == 201, (status, body)
        bundle = _bundle(cp)
        key, chain = _enrol(cp, bundle, "web-1", "web")  # never renewed
        peer = peer_of(chain)
        assert peer is not None

        async def hold() -> tuple[float, Any]:
            how = await _hold_ads(cp, bundle, key, chain, "web-1", timeout=30)
            return time.time(), how

        ended_at, how = asyncio.run(hold())
        assert how != "timeout" and ended_at <= peer.not_after + 6, \
            f"expected the stream ended by the certificate's end ({peer.not_after:.1f}), got {how} at {ended_at:.1f}"
        while time.time() <= peer.not_after + 0.5:
            time.sleep(0.2)
        async def reconnect() -> tuple[grpc.StatusCode | None, int]:
            async with _channel(cp, bundle, key, chain) as ch:
                return await _ads_outcome(ch, "web-1")

        again = asyncio.run(reconnect())
        assert again == (grpc.StatusCode.UNAVAILABLE, 0), f"expected an expired certificate refused at the handshake, got {again}"


def test_a_removed_enrolment_ends_the_nodes_streams_and_it_cannot_come_back(cp: Any) -> None:
    bundle = _bundle(cp)
    key, chain = _enrol(cp, bundle, "web-1", "web")

    removed: list[float] = []

    async def remove_enrolment(resp: discovery_pb2.DiscoveryResponse) -> None:
        if resp.version_info and not removed:  # served: now the operator removes the node's enrolment
            removed.append(time.time())
            status, body = await asyncio.to_thread(cp.call, "DELETE", "/v1/identity/enrolments/web-1", None, ADMIN)
            assert status in (200, 204), (status, body)

    async def held_then_removed() -> Any:
        return await _hold_ads(cp, bundle, key, chain, "web-1", timeout=10, on_response=remove_enrolment)

    assert asyncio.run(held_then_removed()) == grpc.StatusCode.PERMISSION_DENIED

    async def again() -> Any:
        async with _channel(cp, bundle, key, chain) as ch:
            return await _ads_outcome(ch, "web-1", "web"), await _hds_outcome(ch, "web-1", "web")

    ads, hds = asyncio.run(again())
    assert ads == (grpc.StatusCode.PERMISSION_DENIED, 0), f"expected the removed node's valid certificate refused on ADS, got {ads}"
    assert hds == grpc.StatusCode.PERMISSION_DENIED, f"expected it refused on HDS, got {hds}"
