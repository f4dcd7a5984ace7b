"""The delta ADS client of meshdns: the protocol state machine, the state file, and reconnects over real gRPC."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpilot.meshdns import dns_pb2
from meshpilot.meshdns.ads import TYPE_URL, AdsState, load_state, run_ads, save_state, split_targets
from meshpilot.meshdns.table import Port, Service
from meshpilot.model import Service as MeshService
from meshpilot.translate.dns import build_dns_service, dns_resource_name


def resource(name: str, ns: str = "default", vip: str = "240.240.0.1", version: str = "v1",
             type_url: str = TYPE_URL, rname: str | None = None) -> discovery_pb2.Resource:
    msg = dns_pb2.DnsService(name=name, namespace=ns, domain="mesh", vip=vip,
                             ports=[dns_pb2.ServicePort(name="http", port=80, protocol="http")])
    body = any_pb2.Any(type_url=type_url, value=msg.SerializeToString())
    return discovery_pb2.Resource(name=rname or f"{name}.{ns}", version=version, resource=body)


def response(*resources: discovery_pb2.Resource, removed: tuple[str, ...] = (), nonce: str = "n1",
             type_url: str = TYPE_URL) -> discovery_pb2.DeltaDiscoveryResponse:
    return discovery_pb2.DeltaDiscoveryResponse(type_url=type_url, resources=resources,
                                                removed_resources=list(removed), nonce=nonce)


_label = st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9]", fullmatch=True)


@given(
    name=_label, namespace=_label, domain=st.sampled_from(["mesh", "corp.local"]),
    vip=st.sampled_from([None, "240.240.0.9"]), vip6=st.sampled_from([None, "fd00::9"]),
    ports=st.lists(st.tuples(st.integers(1, 65535), st.sampled_from(["http", "http2", "grpc", "tcp"])), min_size=1, max_size=4,
                   unique_by=lambda p: p[0]),
)
@settings(max_examples=60, deadline=None)
def test_the_control_planes_resource_is_the_table_meshdns_reads(name: str, namespace: str, domain: str, vip: str | None,
                                                                vip6: str | None, ports: list[tuple[int, str]]) -> None:
    svc = MeshService(name=name, namespace=namespace, vip=vip,
                      ports=[{"name": f"p{i}", "port": port, "protocol": proto} for i, (port, proto) in enumerate(ports)])
    msg = build_dns_service(svc, domain, vip, vip6)
    body = any_pb2.Any(type_url=TYPE_URL, value=msg.SerializeToString(deterministic=True))
    st_ = AdsState("n")
    ack, _ = st_.on_response(response(discovery_pb2.Resource(name=dns_resource_name(svc), version="1", resource=body)))
    assert not ack.HasField("error_detail"), f"expected meshdns to accept the control plane's resource, got {ack.error_detail}"
    expected = Service(name, namespace, domain, vip or "", vip6 or "",
                       tuple(Port(f"p{i}", port, proto) for i, (port, proto) in enumerate(ports)))
    got = st_.resources[dns_resource_name(svc)][1]
    assert got == expected, f"expected meshdns to read {expected}, got {got}"


def test_initial_request_is_wildcard_with_held_versions() -> None:
    st_ = AdsState("node-1", {"web.default": ("v7", Service("web", vip="240.240.0.1"))})
    req = st_.initial_request()
    assert req.node.id == "node-1", f"expected node id node-1, got {req.node.id!r}"
    assert req.type_url == TYPE_URL and list(req.resource_names_subscribe) == ["*"], f"got {req}"
    assert dict(req.initial_resource_versions) == {"web.default": "v7"}, f"got {req.initial_resource_versions}"


def test_ack_applies_adds_updates_and_removals() -> None:
    st_ = AdsState("n")
    ack, changed = st_.on_response(response(resource("web"), resource("db", "prod", "240.240.0.2"), nonce="a"))
    assert changed and ack.response_nonce == "a" and not ack.HasField("error_detail"), f"expected ACK a, got {ack}"
    assert sorted(st_.resources) == ["db.prod", "web.default"], f"got {sorted(st_.resources)}"
    ack, changed = st_.on_response(response(resource("web", vip="240.240.0.5", version="v2"), removed=("db.prod",),
                                            nonce="b"))
    assert changed and ack.response_nonce == "b", f"expected change + ACK b, got {changed} {ack}"
    assert {k: v[1].vip for k, v in st_.resources.items()} == {"web.default": "240.240.0.5"}
    _, changed = st_.on_response(response(resource("web", vip="240.240.0.5", version="v3"), nonce="c"))
    assert not changed, "a new version with the same content is not a table change"


@pytest.mark.parametrize("bad,why", [
    (resource("web", vip="not-an-ip"), "vip"),
    (resource("web", rname="other.default"), "name must be"),
    (resource("web", type_url="type.googleapis.com/other.Type"), "type_url"),
    (discovery_pb2.Resource(name="x.default", version="1",
                            resource=any_pb2.Any(type_url=TYPE_URL, value=b"\xff\xff\xff")), "x.default"),
])
def test_nack_keeps_last_good_table(bad: discovery_pb2.Resource, why: str) -> None:
    st_ = AdsState("n")
    st_.on_response(response(resource("db", "prod", "240.240.0.2"), nonce="a"))
    before = dict(st_.resources)
    nack, changed = st_.on_response(response(resource("ok", "default", "240.240.0.3"), bad, nonce="b"))
    assert not changed, "a NACKed response must not change the table"
    assert nack.response_nonce == "b" and nack.HasField("error_detail"), f"expected NACK for nonce b, got {nack}"
    assert why in nack.error_detail.message, f"expected {why!r} in the NACK reason, got {nack.error_detail.message!r}"
    assert st_.resources == before, "the whole response is rejected, including its valid resources"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.integers(0, 3), st.booleans(),
                          st.booleans()), max_size=30))
def test_table_tracks_model_through_random_updates(ops: list[tuple[str, int, bool, bool]]) -> None:
    """Random adds/removes/corrupt resources: the table equals a model that applies only valid responses."""
    st_ = AdsState("n")
    model: dict[str, str] = {}
    for i, (name, vip_octet, remove, corrupt) in enumerate(ops):
        nonce = f"n{i}"
        if remove:
            req, _ = st_.on_response(response(removed=(f"{name}.default",), nonce=nonce))
            model.pop(f"{name}.default", None)
        else:
            vip = "bad" if corrupt else f"240.240.0.{vip_octet}"
            req, _ = st_.on_response(response(resource(name, vip=vip, version=str(i)), nonce=nonce))
            if not corrupt:
                model[f"{name}.default"] = vip
        assert req.response_nonce == nonce, f"every response is answered with its nonce; got {req.response_nonce}"
        assert req.HasField("error_detail") == (corrupt and not remove), f"step {i}: wrong ACK/NACK"
        got = {k: v[1].vip for k, v in st_.resources.items()}
        assert got == model, f"step {i}: expected {model}, got {got}"


def test_state_file_round_trip_and_atomic(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "meshdns.json"
    res = {"web.default": ("v1", Service("web", vip="240.240.0.1"))}
    save_state(path, res)
    assert load_state(path) == res, "state file must round-trip"
    assert [p.name for p in path.parent.iterdir()] == ["meshdns.json"], "no temporary files left behind"
    path.write_text("{not json")
    assert load_state(path) == {}, "an unreadable state file gives an empty table, not a crash"
    assert load_state(tmp_path / "missing.json") == {}


class _FakeAds:
    """A scripted delta ADS server: each stream gets the next script of responses, then stays open or closes."""

    def __init__(self, scripts: list[list[discovery_pb2.DeltaDiscoveryResponse]]) -> None:
        self.scripts = scripts
        self.requests: list[discovery_pb2.DeltaDiscoveryRequest] = []
        self.streams = 0
        self.got_request = asyncio.Event()

    async def delta(self, requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
                    context: Any) -> AsyncIterator[discovery_pb2.DeltaDiscoveryResponse]:
        script = self.scripts[min(self.streams, len(self.scripts) - 1)]
        self.streams += 1
        it = requests.__aiter__()
        self.requests.append(await it.__anext__())
        self.got_request.set()
        for resp in script:
            yield resp
            self.requests.append(await it.__anext__())
            self.got_request.set()
        if self.streams < len(self.scripts):
            return  # end this stream; the client must reconnect
        async for req in it:
            self.requests.append(req)
            self.got_request.set()

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "envoy.service.discovery.v3.AggregatedDiscoveryService",
            {"DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self.delta,
                request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                response_serializer=discovery_pb2.DeltaDiscoveryResponse.SerializeToString)})


async def _wait_for(pred: Any, what: str, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.01)


def test_client_acks_reconnects_and_resumes_with_versions() -> None:
    async def main() -> None:
        fake = _FakeAds([
            [response(resource("web", version="v1"), nonce="a")],
            [response(resource("db", "prod", "240.240.0.2", version="v9"), nonce="b")],
        ])
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([fake.handler()])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        state = AdsState("node-x")
        changes: list[list[str]] = []

        async def on_change() -> None:
            changes.append(sorted(state.resources))

        task = asyncio.create_task(run_ads(f"127.0.0.1:{port}", state, on_change, backoff_initial=0.05))
        try:
            await _wait_for(lambda: len(fake.requests) >= 4, "two streams with an ACK each")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.stop(None)
        first, ack_a, second, ack_b = fake.requests[:4]
        assert first.node.id == "node-x" and list(first.resource_names_subscribe) == ["*"], f"got {first}"
        assert ack_a.response_nonce == "a" and not ack_a.HasField("error_detail"), f"expected ACK a, got {ack_a}"
        assert dict(second.initial_resource_versions) == {"web.default": "v1"}, (
            f"the reconnect must carry held versions, got {dict(second.initial_resource_versions)}")
        assert ack_b.response_nonce == "b", f"expected ACK b, got {ack_b}"
        assert changes == [["web.default"], ["db.prod", "web.default"]], f"got {changes}"

    asyncio.run(main())


def test_client_backs_off_while_control_plane_is_down() -> None:
    async def main() -> None:
        import socket

        with socket.socket() as s:  # a port with nothing listening
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        counters: dict[str, int] = {}
        state = AdsState("n", {"web.default": ("v1", Service("web", vip="240.240.0.1"))})

        async def on_change() -> None:
            raise AssertionError("no table change without a control plane")

        task = asyncio.create_task(run_ads(f"127.0.0.1:{port}", state, on_change, backoff_initial=0.05,
                                           backoff_max=0.2, counters=counters))
        await asyncio.sleep(1.0)  # observe the retry rate over a fixed window
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        errors = counters.get("ads_errors", 0)
        assert 3 <= errors <= 25, f"expected capped back-off (3..25 attempts in 1 s at 0.05-0.2 s), got {errors}"
        assert list(state.resources) == ["web.default"], "the held table survives the outage"

    asyncio.run(main())


async def _serve(fake: _FakeAds) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([fake.handler()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def _dead_port() -> int:
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_replica_that_ends_the_stream_hands_the_client_to_the_next_with_the_versions_it_holds() -> None:
    async def main() -> None:
        # replica a answers once and ends the stream (cut off from the store), replica b keeps it
        a = _FakeAds([[response(resource("web", version="v1"), nonce="a")], []])
        b = _FakeAds([[response(resource("db", "prod", "240.240.0.2", version="v9"), nonce="b")]])
        (sa, pa), (sb, pb) = await _serve(a), await _serve(b)
        state = AdsState("node-x")
        counters: dict[str, int] = {}

        async def on_change() -> None:
            pass

        task = asyncio.create_task(run_ads(f"127.0.0.1:{pa},127.0.0.1:{pb}", state, on_change, first=0,
                                           backoff_initial=5.0, counters=counters))
        try:
            await _wait_for(lambda: len(b.requests) >= 2, "the stream on replica b with an ACK", timeout=2.0)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await sa.stop(None)
            await sb.stop(None)
        assert a.streams == 1, f"expected one stream on replica a before the move, got {a.streams}"
        first_b = b.requests[0]
        assert dict(first_b.initial_resource_versions) == {"web.default": "v1"}, (
            f"the move must carry the versions held from replica a, got {dict(first_b.initial_resource_versions)}")
        assert sorted(state.resources) == ["db.prod", "web.default"], f"got {sorted(state.resources)}"
        assert counters.get("ads_replica_moves", 0) >= 1, f"expected a move to be counted, got {counters}"

    asyncio.run(main())


def test_a_dead_replica_is_skipped_at_once_and_a_full_round_of_failures_backs_off() -> None:
    async def main() -> None:
        live = _FakeAds([[response(resource("web"), nonce="a")]])
        server, port = await _serve(live)
        state = AdsState("node-x")

        async def on_change() -> None:
            pass

        # back-off 5 s: only skipping the dead replica without waiting reaches the live one within 1 s
        task = asyncio.create_task(run_ads([f"127.0.0.1:{_dead_port()}", f"127.0.0.1:{port}"], state, on_change,
                                           first=0, backoff_initial=0.2))
        try:
            await _wait_for(lambda: len(live.requests) >= 2, "the live replica's stream", timeout=1.0)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.stop(None)
        assert list(state.resources) == ["web.default"]

        counters: dict[str, int] = {}
        dead = [f"127.0.0.1:{_dead_port()}", f"127.0.0.1:{_dead_port()}"]
        task = asyncio.create_task(run_ads(dead, AdsState("n"), on_change, backoff_initial=0.05, backoff_max=0.2,
                                           counters=counters))
        await asyncio.sleep(1.0)  # observe the retry rate over a fixed window
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        errors = counters.get("ads_errors", 0)
        assert 4 <= errors <= 40, f"expected capped back-off over both replicas (4..40 attempts in 1 s), got {errors}"

    asyncio.run(main())


@pytest.mark.parametrize("text,expected", [
    ("127.0.0.1:15010", ["127.0.0.1:15010"]),
    ("a:1, b:2", ["a:1", "b:2"]),
])
def test_split_targets(text: str, expected: list[str]) -> None:
    assert split_targets(text) == expected


@pytest.mark.parametrize("text", ["", "a:1,,b:2", " , "])
def test_split_targets_refuses_empty_entries(text: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        split_targets(text)


def test_state_file_is_json_with_services(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    save_state(path, {"web.default": ("v1", Service("web", vip="240.240.0.1"))})
    doc = json.loads(path.read_text())
    assert doc["resources"]["web.default"]["service"]["vip"] == "240.240.0.1", f"got {doc}"
