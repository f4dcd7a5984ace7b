"""The agent's SDS server, driven in-process by a grpc.aio client over a unix socket: both secrets arrive,
a rotation is a new version, NACKs are not answered with the same content, unknown names get nothing.
The stream machines are also driven directly, without a socket, and by hypothesis through any order of
requests, ACKs, NACKs, stale nonces and rotations."""

from __future__ import annotations

import asyncio
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from meshpilot.sidecar.sds import (
    DEFAULT,
    ROOTCA,
    SDS_SERVICE,
    SECRET_TYPE,
    DeltaSecrets,
    SdsServer,
    SecretStore,
    SotwSecrets,
)

KEY1, CHAIN1, BUNDLE1 = b"-----key one-----", b"-----chain one-----", b"-----root one-----"
CHAIN2, KEY2 = b"-----chain two-----", b"-----key two-----"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # a unix socket path must fit in 108 bytes; pytest's tmp_path may not
    d = Path(tempfile.mkdtemp(prefix="sds", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _secret(resource: Any) -> Any:
    assert resource.type_url == SECRET_TYPE
    s = secret_pb2.Secret()
    s.ParseFromString(resource.value)
    return s


class Client:
    """One client stream read by a task of its own (cancelling a pending read would cancel the RPC);
    ``next()`` is the next response or a TimeoutError."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while True:
            resp = await self.call.read()
            await self.inbox.put(resp)
            if resp is grpc.aio.EOF:
                return

    async def send(self, req: Any) -> None:
        await self.call.write(req)

    async def next(self, within_s: float = 2.0) -> Any:
        resp = await asyncio.wait_for(self.inbox.get(), within_s)
        assert resp is not grpc.aio.EOF, "the server closed the stream"
        return resp

    async def nothing(self, for_s: float = 0.3) -> None:
        try:
            resp = await asyncio.wait_for(self.inbox.get(), for_s)
        except TimeoutError:
            return
        raise AssertionError(f"expected no response, got {resp}")

    def close(self) -> None:
        self.reader.cancel()
        self.call.cancel()


@pytest.fixture
async def served(short_dir: Path) -> AsyncIterator[tuple[SecretStore, SdsServer, grpc.aio.Channel]]:
    store = SecretStore()
    store.set(KEY1, CHAIN1, BUNDLE1)
    async with SdsServer(store, short_dir / "sds" / "sds.sock") as server:
        async with grpc.aio.insecure_channel(f"unix:{server.socket_path}") as channel:
            yield store, server, channel


def _sotw(channel: grpc.aio.Channel) -> Client:
    return Client(channel.stream_stream(f"/{SDS_SERVICE}/StreamSecrets",
                                        request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                                        response_deserializer=discovery_pb2.DiscoveryResponse.FromString)())


def _delta(channel: grpc.aio.Channel) -> Client:
    return Client(channel.stream_stream(f"/{SDS_SERVICE}/DeltaSecrets",
                                        request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
                                        response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString)())


async def test_the_socket_is_for_this_user_only(served: tuple[SecretStore, SdsServer, grpc.aio.Channel]) -> None:
    _, server, _ = served
    assert stat.S_ISSOCK(server.socket_path.stat().st_mode)
    assert stat.S_IMODE(server.socket_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(server.socket_path.parent.stat().st_mode) == 0o700


async def test_the_socket_directory_is_created_private(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The directory that guards the socket (the key is served through it) is 0700 from its creation, not
    created wider and narrowed afterwards: with a umask that hides nothing and chmod disabled it still is."""
    import os

    monkeypatch.setattr(os, "chmod", lambda *a, **k: None)
    old = os.umask(0)
    try:
        async with SdsServer(SecretStore(), short_dir / "sds" / "sds.sock") as server:
            mode = stat.S_IMODE(server.socket_path.parent.stat().st_mode)
    finally:
        os.umask(old)
    assert mode == 0o700, oct(mode)


async def test_sotw_gives_both_secrets_and_a_rotation_as_a_new_version(
        served: tuple[SecretStore, SdsServer, grpc.aio.Channel]) -> None:
    store, _, channel = served
    c = _sotw(channel)
    await c.send(discovery_pb2.DiscoveryRequest(type_url=SECRET_TYPE, resource_names=[DEFAULT, ROOTCA]))
    first = await c.next()
    secrets = {s.name: s for s in map(_secret, first.resources)}
    assert set(secrets) == {DEFAULT, ROOTCA}
    assert secrets[DEFAULT].tls_certificate.certificate_chain.inline_bytes == CHAIN1
    assert secrets[DEFAULT].tls_certificate.private_key.inline_bytes == KEY1
    assert secrets[ROOTCA].validation_context.trusted_ca.inline_bytes == BUNDLE1
    await c.send(discovery_pb2.DiscoveryRequest(type_url=SECRET_TYPE, resource_names=[DEFAULT, ROOTCA],
                                                version_info=first.version_info, response_nonce=first.nonce))
    await c.nothing()  # an ACK is not answered
    store.set(KEY2, CHAIN2, BUNDLE1)
    second = await c.next()
    assert second.version_info != first.version_info and second.nonce != first.nonce
    rotated = {s.name: s for s in map(_secret, second.resources)}
    assert rotated[DEFAULT].tls_certificate.certificate_chain.inline_bytes == CHAIN2
    assert rotated[DEFAULT].tls_certificate.private_key.inline_bytes == KEY2
    store.set(KEY2, CHAIN2, BUNDLE1)  # the same again is no change
    await c.nothing()
    c.close()


async def test_sotw_one_stream_per_secret_as_envoy_opens_them(
        served: tuple[SecretStore, SdsServer, grpc.aio.Channel]) -> None:
    store, server, channel = served
    cert, roots = _sotw(channel), _sotw(channel)
    await cert.send(discovery_pb2.DiscoveryRequest(type_url=SECRET_TYPE, resource_names=[DEFAULT]))
    await roots.send(discovery_pb2.DiscoveryRequest(type_url=SECRET_TYPE, resource_names=[ROOTCA]))
    assert [_secret(r).name for r in (await cert.next()).resources] == [DEFAULT]
    r1 = await roots.next()
    assert [_secret(r).name for r in r1.resources] == [ROOTCA]
    await roots.send(discovery_pb2.DiscoveryRequest(type_url=SECRET_TYPE, resource_names=[ROOTCA],
                                                    version_info=r1.version_info, response_nonce=r1.nonce))
    store.set(KEY1, CHAIN1, b"-----root one-----\n-----root two-----")  # only the bundle changes
    r2 = await roots.next()
    assert _secret(r2.resources[0]).validation_context.trusted_ca.inline_bytes.endswith(b"root two-----")
    await cert.nothing()
    assert server.streams == 2
    cert.close()
    roots.close()


async def test_unknown_secret_names_get_nothing(served: tuple[SecretStore, SdsServer, grpc.aio.Channel]) -> None:
    _, _, channel = served
    c = _sotw(channel)
    await c.send(discovery_pb2.DiscoveryRequest(type_url=SECRET_TYPE, resource_names=["other"]))
    await c.nothing()
    d = _delta(channel)
    await d.send(discovery_pb2.DeltaDiscoveryRequest(type_url=SECRET_TYPE, resource_names_subscribe=["other"]))
    await d.nothing()
    c.close()
    d.close()


async def test_a_nack_is_not_answered_with_the_same_secret(
        served: tuple[SecretStore, SdsServer, grpc.aio.Channel]) -> None:
    store, _, channel = served
    c = _sotw(channel)
    await c.send(discovery_pb2.DiscoveryRequest(type_url=SECRET_TYPE, resource_names=[DEFAULT]))
    first = await c.next()
    await c.send(discovery_pb2.DiscoveryRequest(
        type_url=SECRET_TYPE, resource_names=[DEFAULT], response_nonce=first.nonce,
        error_detail=status_pb2.Status(code=3, message="Failed to load certificate chain")))
    await c.nothing()
    store.set(KEY2, CHAIN2, BUNDLE1)  # a fixed certificate goes out
    fixed = await c.next()
    assert _secret(fixed.resources[0]).tls_certificate.certificate_chain.inline_bytes == CHAIN2
    c.close()


async def test_delta_gives_both_secrets_and_rotations(served: tuple[SecretStore, SdsServer, grpc.aio.Channel]) -> None:
    store, _, channel = served
    d = _delta(channel)
    await d.send(discovery_pb2.DeltaDiscoveryRequest(type_url=SECRET_TYPE, resource_names_subscribe=[DEFAULT, ROOTCA]))
    first = await d.next()
    assert sorted(r.name for r in first.resources) == [ROOTCA, DEFAULT]
    versions = {r.name: r.version for r in first.resources}
    await d.send(discovery_pb2.DeltaDiscoveryRequest(type_url=SECRET_TYPE, response_nonce=first.nonce))
    await d.nothing()
    store.set(KEY2, CHAIN2, BUNDLE1)
    second = await d.next()
    assert [r.name for r in second.resources] == [DEFAULT], "only the changed secret is sent"
    assert second.resources[0].version != versions[DEFAULT]
    assert _secret(second.resources[0].resource).tls_certificate.private_key.inline_bytes == KEY2
    d.close()


async def test_delta_reconnect_with_current_versions_gets_nothing_new(
        served: tuple[SecretStore, SdsServer, grpc.aio.Channel]) -> None:
    _, _, channel = served
    d = _delta(channel)
    await d.send(discovery_pb2.DeltaDiscoveryRequest(type_url=SECRET_TYPE, resource_names_subscribe=[DEFAULT, ROOTCA]))
    versions = {r.name: r.version for r in (await d.next()).resources}
    d.close()
    again = _delta(channel)
    await again.send(discovery_pb2.DeltaDiscoveryRequest(type_url=SECRET_TYPE, resource_names_subscribe=[DEFAULT, ROOTCA],
                                                         initial_resource_versions=versions))
    await again.nothing()
    again.close()


async def test_fetch_returns_the_named_secrets(served: tuple[SecretStore, SdsServer, grpc.aio.Channel]) -> None:
    _, _, channel = served
    fetch = channel.unary_unary(f"/{SDS_SERVICE}/FetchSecrets",
                                request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                                response_deserializer=discovery_pb2.DiscoveryResponse.FromString)
    resp = await fetch(discovery_pb2.DiscoveryRequest(type_url=SECRET_TYPE, resource_names=[ROOTCA, "other"]))
    assert [_secret(r).name for r in resp.resources] == [ROOTCA]


def test_sotw_machine_ignores_a_stale_nonce_and_follows_subscriptions() -> None:
    store = SecretStore()
    store.set(KEY1, CHAIN1, BUNDLE1)
    m = SotwSecrets()
    r1 = m.on_request(discovery_pb2.DiscoveryRequest(resource_names=[DEFAULT]), store.snapshot())
    assert r1 is not None
    store.set(KEY2, CHAIN2, BUNDLE1)
    r2 = m.on_change(store.snapshot())
    assert r2 is not None and r2.nonce != r1.nonce
    # the ACK of the first response arrives late: ignored
    assert m.on_request(discovery_pb2.DiscoveryRequest(resource_names=[DEFAULT, ROOTCA], response_nonce=r1.nonce),
                        store.snapshot()) is None
    assert m.names == frozenset({DEFAULT})
    r3 = m.on_request(discovery_pb2.DiscoveryRequest(resource_names=[DEFAULT, ROOTCA], response_nonce=r2.nonce,
                                                     version_info=r2.version_info), store.snapshot())
    assert r3 is not None and sorted(_secret(r).name for r in r3.resources) == [ROOTCA, DEFAULT]
    assert m.acked == r2.version_info


def test_delta_machine_forgets_unsubscribed_names() -> None:
    store = SecretStore()
    store.set(KEY1, CHAIN1, BUNDLE1)
    m = DeltaSecrets()
    r1 = m.on_request(discovery_pb2.DeltaDiscoveryRequest(resource_names_subscribe=[DEFAULT, ROOTCA]), store.snapshot())
    assert r1 is not None and len(r1.resources) == 2
    m.on_request(discovery_pb2.DeltaDiscoveryRequest(resource_names_unsubscribe=[DEFAULT], response_nonce=r1.nonce),
                 store.snapshot())
    store.set(KEY2, CHAIN2, BUNDLE1)
    assert m.on_change(store.snapshot()) is None, "an unsubscribed secret is not pushed"
    r2 = m.on_request(discovery_pb2.DeltaDiscoveryRequest(resource_names_subscribe=[DEFAULT]), store.snapshot())
    assert r2 is not None and [r.name for r in r2.resources] == [DEFAULT]


# ---- the machines under any order of events -------------------------------------------------------------

_NAMES = st.lists(st.sampled_from([DEFAULT, ROOTCA, "other"]), max_size=3, unique=True)
_EVENTS = st.lists(st.one_of(
    st.tuples(st.just("request"), _NAMES, st.sampled_from(["none", "current", "stale"]), st.booleans()),
    st.tuples(st.just("rotate"), st.integers(0, 3), st.integers(0, 3), st.just(False)),
), max_size=25)


def _set(store: SecretStore, cert: int, root: int) -> None:
    store.set(b"key%d" % cert, b"chain%d" % cert, b"root%d" % root)


@given(_EVENTS)
def test_sotw_always_holds_the_current_secrets_of_what_it_subscribes(events: list[Any]) -> None:
    store = SecretStore()
    _set(store, 0, 0)
    m = SotwSecrets()
    nonces: list[str] = []
    for kind, a, b, nack in events:
        if kind == "rotate":
            _set(store, a, b)
            resp = m.on_change(store.snapshot())
        else:
            nonce = {"none": "", "current": nonces[-1] if nonces else "", "stale": nonces[0] if nonces else ""}[b]
            req = discovery_pb2.DiscoveryRequest(resource_names=a, response_nonce=nonce)
            if nack and nonce:
                req.error_detail.CopyFrom(status_pb2.Status(code=3, message="bad"))
            resp = m.on_request(req, store.snapshot())
        secrets = store.snapshot()
        wanted = {n: secrets[n].version for n in m.names if n in secrets}
        if resp is not None:
            nonces.append(resp.nonce)
            assert {_secret(r).name for r in resp.resources} == set(wanted), "a response holds every subscribed secret"
        if wanted:
            assert m.sent == wanted, f"the stream must have sent the current secrets {wanted}, sent {m.sent}"
        assert "other" not in m.sent


@given(_EVENTS)
def test_delta_sends_each_version_once_and_keeps_the_client_current(events: list[Any]) -> None:
    store = SecretStore()
    _set(store, 0, 0)
    m = DeltaSecrets()
    client: dict[str, str] = {}
    for kind, a, b, nack in events:
        if kind == "rotate":
            _set(store, a, b)
            resp = m.on_change(store.snapshot())
        else:
            unsubscribe = [n for n in m.names if n not in a]
            req = discovery_pb2.DeltaDiscoveryRequest(resource_names_subscribe=a, resource_names_unsubscribe=unsubscribe,
                                                      response_nonce=m.nonce if b == "current" else "")
            for n in unsubscribe:
                client.pop(n, None)
            resp = m.on_request(req, store.snapshot())
        if resp is not None:
            for r in resp.resources:
                assert client.get(r.name) != r.version, f"{r.name} sent again at the version the client holds"
                client[r.name] = r.version
        secrets = store.snapshot()
        for n in m.names:
            if n in secrets:
                assert client.get(n) == secrets[n].version, f"{n}: client holds {client.get(n)}, current {secrets[n].version}"
        assert "other" not in client
