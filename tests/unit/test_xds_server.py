"""The ADS server's pure parts: per-stream flow control, the bound on bytes in flight across
streams, request limits, the client's user agent."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from hypothesis import given
from hypothesis import strategies as st

from meshpilot.xds.resource import TYPE
from meshpilot.xds.server import InFlight, StreamError, Unanswered, check_request, user_agent


def test_an_answer_covers_every_earlier_response_of_its_type_only() -> None:
    owed = Unanswered()
    owed.sent(TYPE.CLUSTER, "1", 100, now=10.0)
    owed.sent(TYPE.ENDPOINT, "2", 50, now=10.5)
    owed.sent(TYPE.CLUSTER, "3", 100, now=11.0)
    assert owed.oldest() == (TYPE.CLUSTER, 1, 10.0)
    assert owed.answer(TYPE.ENDPOINT, "3") is True, "an endpoint answer with a later nonce answers endpoint response 2"
    assert owed.answer(TYPE.CLUSTER, "3") is True
    assert (owed.bytes, owed.count, owed.oldest()) == (0, 0, None), f"everything answered, yet owed {owed.bytes} bytes in {owed.count}"


def test_an_answer_of_another_type_or_an_old_nonce_answers_nothing() -> None:
    owed = Unanswered()
    owed.sent(TYPE.CLUSTER, "5", 100, now=1.0)
    assert owed.answer(TYPE.ENDPOINT, "9") is False
    assert owed.answer(TYPE.CLUSTER, "4") is False
    assert owed.answer(TYPE.CLUSTER, "") is False
    assert owed.answer(TYPE.CLUSTER, "junk") is False
    assert owed.answer(TYPE.CLUSTER, "9" * 5000) is False, "a huge nonce must be ignored, not parsed"
    assert owed.oldest() == (TYPE.CLUSTER, 5, 1.0)


def test_a_stream_is_full_by_bytes_or_by_count() -> None:
    owed = Unanswered(window_bytes=1000, window_count=3)
    owed.sent(TYPE.CLUSTER, "1", 999, now=0)
    assert not owed.full
    owed.sent(TYPE.ENDPOINT, "2", 1, now=0)
    assert owed.full, "1,000 bytes owed with a window of 1,000 should be full"
    owed.answer(TYPE.CLUSTER, "1")
    owed.sent(TYPE.ENDPOINT, "3", 1, now=0)
    assert not owed.full
    owed.sent(TYPE.ENDPOINT, "4", 1, now=0)
    assert owed.full, "three responses owed with a window of three should be full"


async def test_streams_wait_for_room_among_the_bytes_in_flight_until_answers_come() -> None:
    bound = InFlight(cap=1000, hold_s=60.0)
    a, b = Unanswered(in_flight=bound), Unanswered(in_flight=bound)
    now = time.monotonic()
    a.sent(TYPE.CLUSTER, "1", 600, now)
    b.sent(TYPE.CLUSTER, "1", 600, now)
    assert bound.used == 1200
    waiting = asyncio.ensure_future(bound.room())
    await asyncio.sleep(0.05)
    assert not waiting.done(), "a stream went on building while 1,200 of 1,000 bytes were in flight"
    a.answer(TYPE.CLUSTER, "1")
    await asyncio.wait_for(waiting, 1.0)  # the answer made room
    assert bound.used == 600, f"expected the answered 600 bytes to stop counting, {bound.used} still count"
    b.answer(TYPE.CLUSTER, "1")
    b.answer(TYPE.CLUSTER, "1")  # answered twice: counted off once
    assert bound.used == 0


async def test_clients_that_never_answer_hold_room_for_at_most_the_hold_time() -> None:
    bound = InFlight(cap=1000, hold_s=0.2)
    silent = Unanswered(in_flight=bound)
    silent.sent(TYPE.ENDPOINT, "1", 5000, time.monotonic())
    started = time.monotonic()
    await asyncio.wait_for(bound.room(), 2.0)
    assert time.monotonic() - started >= 0.15, "room came before the silent client's response stopped counting"
    assert bound.used == 0, f"expected the unanswered response to stop counting after hold_s, {bound.used} bytes still count"
    silent.answer(TYPE.ENDPOINT, "1")  # a late answer counts nothing off twice
    assert bound.used == 0 and silent.bytes == 0


_types = st.sampled_from([TYPE.CLUSTER, TYPE.ENDPOINT, TYPE.LISTENER])


@given(st.lists(st.one_of(st.tuples(st.just("send"), _types, st.integers(1, 5000)), st.tuples(st.just("answer"), _types, st.integers(0, 40))), max_size=60))
def test_unanswered_matches_a_plain_list(steps: list[tuple[str, str, int]]) -> None:
    owed = Unanswered()
    model: list[tuple[str, int, int]] = []
    nonce = 0
    for op, type_url, n in steps:
        if op == "send":
            nonce += 1
            owed.sent(type_url, str(nonce), n, now=float(nonce))
            model.append((type_url, nonce, n))
        else:
            before = len(model)
            model = [m for m in model if not (m[0] == type_url and m[1] <= n)]
            assert owed.answer(type_url, str(n)) == (len(model) < before)
        assert owed.bytes == sum(m[2] for m in model)
        assert owed.count == len(model)
        expected = min(model, key=lambda m: m[1]) if model else None
        assert owed.oldest() == (expected and (expected[0], expected[1], float(expected[1])))


def _refused(req: discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest) -> StreamError:
    with pytest.raises(StreamError) as info:
        check_request(req)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, f"expected RESOURCE_EXHAUSTED, got {info.value.code}"
    return info.value


def test_requests_like_real_clients_send_pass() -> None:
    names = [f"outbound|80||svc{i}.default.svc.mesh" for i in range(50_000)]
    req = discovery_pb2.DiscoveryRequest(type_url=TYPE.ENDPOINT, resource_names=names)
    req.node.id = "envoy-1"
    req.node.metadata.update({"SERVICE": "web", "INBOUND_PORT": 15006})
    check_request(req)
    assert req.ByteSize() < 4 * 2**20, f"a 50,000-cluster request should fit the 4 MB message limit, is {req.ByteSize()} bytes"
    check_request(discovery_pb2.DeltaDiscoveryRequest(type_url=TYPE.ENDPOINT, initial_resource_versions={n: "0123456789abcdef" for n in names}))


def test_too_many_names_are_refused_naming_the_field() -> None:
    err = _refused(discovery_pb2.DiscoveryRequest(type_url=TYPE.ENDPOINT, resource_names=[str(i) for i in range(50_001)]))
    assert str(err) == "resource_names: 50001 names; at most 50000 in one request"
    err = _refused(discovery_pb2.DeltaDiscoveryRequest(type_url=TYPE.ENDPOINT, initial_resource_versions={str(i): "1" for i in range(50_001)}))
    assert str(err).startswith("initial_resource_versions: 50001 names")


def test_a_name_longer_than_any_resource_name_is_refused() -> None:
    err = _refused(discovery_pb2.DeltaDiscoveryRequest(type_url=TYPE.CLUSTER, resource_names_unsubscribe=["ok", "x" * 1025]))
    assert str(err) == "resource_names_unsubscribe: a name of 1025 characters; at most 1024"


def test_huge_node_metadata_is_refused() -> None:
    req = discovery_pb2.DiscoveryRequest(type_url=TYPE.CLUSTER)
    req.node.id = "n"
    req.node.metadata.update({"junk": "x" * 70_000})
    assert str(_refused(req)).startswith("node.metadata: ")


def test_user_agent_of_envoy_and_of_grpc_clients() -> None:
    envoy = base_pb2.Node(user_agent_name="envoy")
    envoy.user_agent_build_version.version.major_number = 1
    envoy.user_agent_build_version.version.minor_number = 40
    envoy.user_agent_build_version.version.patch = 2
    assert user_agent(envoy) == "envoy 1.40.2"
    grpc_go = base_pb2.Node(user_agent_name="gRPC Go", user_agent_version="1.85.0")
    assert user_agent(grpc_go) == "gRPC Go 1.85.0", f"grpc-go sends user_agent_version; got {user_agent(grpc_go)!r}"
    assert user_agent(base_pb2.Node(user_agent_name="grpc-node-js", user_agent_version="1.13.4")) == "grpc-node-js 1.13.4"
    assert user_agent(base_pb2.Node()) == ""


def test_the_names_of_sotw_acks_are_recognised_by_their_bytes_whatever_the_version_and_nonce() -> None:
    from meshpilot.xds.server import names_region

    names = [f"outbound|80||svc{i}" for i in range(300)]

    def region(**kw: Any) -> bytes | None:
        req = discovery_pb2.DiscoveryRequest(type_url=TYPE.ENDPOINT, **kw)
        return names_region(req.SerializeToString(), req)

    first = region(resource_names=names, node=base_pb2.Node(id="n1", cluster="c"))
    ack = region(resource_names=names, version_info="abc", response_nonce="7")
    later = region(resource_names=names, version_info="0123456789" * 20, response_nonce="123456")
    only = discovery_pb2.DiscoveryRequest(resource_names=names).SerializeToString()
    assert first == ack == later == only, "expected the same names to give the same bytes, the bytes of resource_names alone"
    assert region(resource_names=names[:-1], response_nonce="8") != ack, "a name less must give other bytes"
    assert region(resource_names=[*names[1:], names[0]], response_nonce="8") != ack, "another order must give other bytes"
    assert region(response_nonce="9") == b"", "no names: empty bytes"
    nack = discovery_pb2.DiscoveryRequest(type_url=TYPE.ENDPOINT, resource_names=names, response_nonce="7")
    nack.error_detail.message = "rejected"
    assert names_region(nack.SerializeToString(), nack) is None, "a NACK is read field by field"
    # fields out of order (type_url first): not recognised, read from the message instead
    odd = string_field_bytes(4, TYPE.ENDPOINT) + discovery_pb2.DiscoveryRequest(resource_names=names, response_nonce="7").SerializeToString()
    assert names_region(odd, discovery_pb2.DiscoveryRequest.FromString(odd)) is None


def string_field_bytes(number: int, value: str) -> bytes:
    from meshpilot.xds.resource import string_field

    return string_field(number, value)


def test_a_sotw_ack_repeating_the_names_is_parsed_without_them() -> None:
    from meshpilot.xds.server import _repeated, names_region

    names = [f"outbound|80||svc{i}" for i in range(300)]
    first = discovery_pb2.DiscoveryRequest(type_url=TYPE.ENDPOINT, resource_names=names, node=base_pb2.Node(id="n1"))
    raw = first.SerializeToString()
    region = names_region(raw, first)
    assert region is not None
    held = {TYPE.ENDPOINT: (region, tuple(names))}
    ack = discovery_pb2.DiscoveryRequest(type_url=TYPE.ENDPOINT, resource_names=names, version_info="v1", response_nonce="4")
    got = _repeated(ack.SerializeToString(), held)
    assert got is not None, "expected an ACK listing the same names to be recognised"
    req, listed = got
    assert listed == tuple(names) and (req.type_url, req.version_info, req.response_nonce) == (TYPE.ENDPOINT, "v1", "4")
    more = discovery_pb2.DiscoveryRequest(type_url=TYPE.ENDPOINT, resource_names=[*names, "x"], response_nonce="5")
    assert _repeated(more.SerializeToString(), held) is None, "a name more is not the same list"
    other = discovery_pb2.DiscoveryRequest(type_url=TYPE.ROUTE, resource_names=names, response_nonce="5")
    assert _repeated(other.SerializeToString(), held) is None, "the same names of another type are another subscription"


def test_an_answer_that_comes_while_the_response_is_still_being_written_is_not_lost() -> None:
    import asyncio

    from envoy.config.cluster.v3 import cluster_pb2

    from meshpilot.xds.cache import ResourceCache
    from meshpilot.xds.server import StreamHandle, XdsServer
    from meshpilot.xds.stream import SotwStream

    async def main() -> None:
        cache = ResourceCache()
        cache.put(TYPE.CLUSTER, {"a": cluster_pb2.Cluster(name="a")})
        server = XdsServer(cache)
        machine = SotwStream(cache, "n1")
        machine.receive(discovery_pb2.DiscoveryRequest(type_url=TYPE.CLUSTER))
        handle = StreamHandle(1, machine, asyncio.Event(), "peer")

        class Context:
            """A fast client: its ACK is read while the write has not returned yet."""

            async def write(self, payload: bytes) -> None:
                resp = discovery_pb2.DiscoveryResponse.FromString(payload)
                handle.unanswered.answer(resp.type_url, resp.nonce)

        context: Any = Context()
        assert await server._push(handle, context)
        assert handle.unanswered.count == 0 and handle.unanswered.bytes == 0, \
            f"expected the response answered, still owed: {handle.unanswered.count} ({handle.unanswered.bytes} bytes)"

    asyncio.run(main())


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_the_reader_holds_no_request_while_it_waits_for_the_next(delta: bool) -> None:
    """A sotw ACK repeats every subscribed name (~40 KB for 1,000): a fleet's streams waiting for their
    next request must not each hold their last one (nor its names) meanwhile."""
    import gc
    import sys

    from envoy.config.endpoint.v3 import endpoint_pb2

    from meshpilot.xds.cache import ResourceCache
    from meshpilot.xds.server import StreamHandle, XdsServer
    from meshpilot.xds.stream import DeltaStream, SotwStream

    names = [f"svc{i}.default.svc.cluster.local" for i in range(300)]
    node = base_pb2.Node(id="n1")
    if delta:
        first: Any = discovery_pb2.DeltaDiscoveryRequest(type_url=TYPE.ENDPOINT, node=node, resource_names_subscribe=names)
    else:
        first = discovery_pb2.DiscoveryRequest(type_url=TYPE.ENDPOINT, node=node, resource_names=names).SerializeToString()

    async def main() -> None:
        cache = ResourceCache()
        cache.put(TYPE.ENDPOINT, {n: endpoint_pb2.ClusterLoadAssignment(cluster_name=n) for n in names})
        server = XdsServer(cache)
        handle = StreamHandle(1, DeltaStream(cache) if delta else SotwStream(cache), asyncio.Event(), "peer")
        taken, more = asyncio.Event(), asyncio.Event()
        queue = [first]

        class Context:
            async def read(self) -> Any:
                if queue:
                    return queue.pop()
                taken.set()
                await more.wait()
                return grpc.aio.EOF

        reader = asyncio.create_task(server._read(handle, Context()))  # type: ignore[arg-type]
        await taken.wait()
        gc.collect()
        refs = sys.getrefcount(first) - 1  # ``first`` here, and the ``main`` closure cell
        holders = [type(r).__name__ for r in gc.get_referrers(first) if r is not queue]
        more.set()
        await reader
        assert handle.machine.types[TYPE.ENDPOINT].names == frozenset(names), "expected the request taken"
        assert refs <= 2, f"expected nothing but the test to hold the request while the reader waits; held by {holders}"

    asyncio.run(main())


def test_serving_xds_runs_the_collector_less_often_and_never_lowers_its_thresholds() -> None:
    import gc

    from meshpilot.xds.cache import ResourceCache
    from meshpilot.xds.server import COLLECTOR_THRESHOLDS, XdsServer

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 50)
        XdsServer(ResourceCache()).handler()
        got = gc.get_threshold()
        assert got == (COLLECTOR_THRESHOLDS[0], COLLECTOR_THRESHOLDS[1], 50), \
            f"expected the thresholds raised to {COLLECTOR_THRESHOLDS} and a higher one kept, got {got}"
        assert gc.get_freeze_count() > 0, "expected what the process held when serving began to be frozen"
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
