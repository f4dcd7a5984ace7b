"""The xDS stream state machines, driven with plain values (no gRPC, no Envoy)."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpilot.translate.names import TYPE
from meshpilot.xds.cache import ResourceCache
from meshpilot.xds.stream import DeltaStream, SotwStream

C, E, L = TYPE.CLUSTER, TYPE.ENDPOINT, TYPE.LISTENER


def _cluster(name: str, timeout: int = 1) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name)
    c.connect_timeout.seconds = timeout
    return c


def _cla(name: str, n: int = 0) -> endpoint_pb2.ClusterLoadAssignment:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    for i in range(n):
        ep = cla.endpoints.add().lb_endpoints.add()
        ep.endpoint.address.socket_address.address = "127.0.0.1"
        ep.endpoint.address.socket_address.port_value = 1000 + i
    return cla


def _sotw_decode(raw: bytes) -> discovery_pb2.DiscoveryResponse:
    return discovery_pb2.DiscoveryResponse.FromString(raw)


def _delta_decode(raw: bytes) -> discovery_pb2.DeltaDiscoveryResponse:
    return discovery_pb2.DeltaDiscoveryResponse.FromString(raw)


def _names(resp: discovery_pb2.DiscoveryResponse) -> list[str]:
    out = []
    for a in resp.resources:
        if a.type_url == C:
            m = cluster_pb2.Cluster()
            a.Unpack(m)
            out.append(m.name)
        else:
            m2 = endpoint_pb2.ClusterLoadAssignment()
            a.Unpack(m2)
            out.append(m2.cluster_name)
    return out


def _wire(cache: ResourceCache, stream: SotwStream | DeltaStream) -> None:
    cache.watch(stream.notify)


def test_hand_made_wire_matches_protobuf() -> None:
    cache = ResourceCache()
    cache.put(C, {"a": _cluster("a"), "b": _cluster("b")})
    s = SotwStream(cache, "n1")
    s.receive(discovery_pb2.DiscoveryRequest(type_url=C))
    [(t, raw)] = s.responses()
    resp = _sotw_decode(raw)
    assert t == C and resp.type_url == C and resp.nonce == "1" and resp.version_info
    assert _names(resp) == ["a", "b"]
    any_a = any_pb2.Any()
    any_a.Pack(_cluster("a"))
    assert resp.resources[0] == any_a


def test_sotw_ack_nack_and_no_resend_of_rejected_version() -> None:
    cache = ResourceCache()
    s = SotwStream(cache, "n1")
    _wire(cache, s)
    cache.put(C, {"a": _cluster("a")})
    s.receive(discovery_pb2.DiscoveryRequest(type_url=C))
    [(_, raw)] = s.responses()
    r1 = _sotw_decode(raw)
    s.receive(discovery_pb2.DiscoveryRequest(type_url=C, version_info=r1.version_info, response_nonce=r1.nonce))
    assert s.responses() == [], "an ACK must not trigger a response"
    cache.put(C, {"bad": _cluster("bad", 99)})
    [(_, raw)] = s.responses()
    r2 = _sotw_decode(raw)
    nack = discovery_pb2.DiscoveryRequest(type_url=C, version_info=r1.version_info, response_nonce=r2.nonce)
    nack.error_detail.message = "rejected: bad"
    s.receive(nack)
    assert s.last_nack is not None and s.last_nack.message == "rejected: bad" and s.nacks == 1
    assert s.responses() == [], "the rejected version must not be sent again"
    assert s.types[C].acked_version == r1.version_info
    cache.remove(C, ["bad"])
    [(_, raw)] = s.responses()
    assert _names(_sotw_decode(raw)) == ["a"]


def test_sotw_answers_a_repeated_request_for_warming_clusters() -> None:
    cache = ResourceCache()
    s = SotwStream(cache, "n1")
    _wire(cache, s)
    cache.put(E, {"a": _cla("a", 1)})
    s.receive(discovery_pb2.DiscoveryRequest(type_url=E, resource_names=["a"]))
    [(_, raw)] = s.responses()
    r = _sotw_decode(raw)
    s.receive(discovery_pb2.DiscoveryRequest(type_url=E, resource_names=["a"], version_info=r.version_info, response_nonce=r.nonce))
    assert s.responses() == []
    # Envoy re-sends the same request after re-creating the cluster: answer even though nothing changed
    s.receive(discovery_pb2.DiscoveryRequest(type_url=E, resource_names=["a"], version_info=r.version_info, response_nonce=r.nonce))
    [(_, raw)] = s.responses()
    assert _names(_sotw_decode(raw)) == ["a"]


def test_sotw_stale_nonce_is_ignored_and_order_is_clusters_first() -> None:
    cache = ResourceCache()
    s = SotwStream(cache, "n1")
    _wire(cache, s)
    s.receive(discovery_pb2.DiscoveryRequest(type_url=E, resource_names=["a"]))
    s.receive(discovery_pb2.DiscoveryRequest(type_url=C))
    cache.put(C, {"a": _cluster("a")})
    cache.put(E, {"a": _cla("a")})
    types = [t for t, _ in s.responses()]
    assert types == [C, E], f"clusters must go before endpoints, got {types}"
    s.receive(discovery_pb2.DiscoveryRequest(type_url=C, response_nonce="stale-nonce"))
    assert s.responses() == []


def test_node_scoped_resources_reach_only_their_node() -> None:
    cache = ResourceCache()
    s1, s2 = DeltaStream(cache, "n1"), DeltaStream(cache, "n2")
    for s in (s1, s2):
        _wire(cache, s)
        s.receive(discovery_pb2.DeltaDiscoveryRequest(type_url=L))
        s.responses()
    cache.put(L, {"inbound": _cluster("x")}, scope="n1")
    assert len(s1.responses()) == 1
    assert s2.responses() == []


def test_delta_sends_only_changes_and_removals() -> None:
    cache = ResourceCache()
    s = DeltaStream(cache, "n1")
    _wire(cache, s)
    cache.put(C, {"a": _cluster("a"), "b": _cluster("b")})
    s.receive(discovery_pb2.DeltaDiscoveryRequest(type_url=C))
    [(_, raw)] = s.responses()
    r = _delta_decode(raw)
    assert sorted(x.name for x in r.resources) == ["a", "b"]
    s.receive(discovery_pb2.DeltaDiscoveryRequest(type_url=C, response_nonce=r.nonce))
    cache.put(C, {"a": _cluster("a", 5), "b": _cluster("b")})
    [(_, raw)] = s.responses()
    r = _delta_decode(raw)
    assert [x.name for x in r.resources] == ["a"] and not r.removed_resources
    cache.remove(C, ["b"])
    [(_, raw)] = s.responses()
    r = _delta_decode(raw)
    assert list(r.removed_resources) == ["b"] and not r.resources


def test_delta_resends_endpoints_behind_a_changed_cluster() -> None:
    cache = ResourceCache()
    s = DeltaStream(cache, "n1")
    _wire(cache, s)
    cache.put(C, {"a": _cluster("a")})
    cache.put(E, {"a": _cla("a", 1)})
    s.receive(discovery_pb2.DeltaDiscoveryRequest(type_url=C))
    s.receive(discovery_pb2.DeltaDiscoveryRequest(type_url=E, resource_names_subscribe=["a"]))
    assert [t for t, _ in s.responses()] == [C, E]
    cache.put(C, {"a": _cluster("a", 7)})
    out = s.responses()
    assert [t for t, _ in out] == [C, E], "endpoints must follow a changed cluster"
    assert [x.name for x in _delta_decode(out[1][1]).resources] == ["a"]


def test_delta_reconnect_with_initial_versions_sends_only_what_differs() -> None:
    cache = ResourceCache()
    cache.put(C, {"a": _cluster("a"), "b": _cluster("b")})
    va = cache.get(C, "a").version
    s = DeltaStream(cache, "n1")
    s.receive(discovery_pb2.DeltaDiscoveryRequest(type_url=C, initial_resource_versions={"a": va, "gone": "x"}))
    [(_, raw)] = s.responses()
    r = _delta_decode(raw)
    assert [x.name for x in r.resources] == ["b"]
    assert list(r.removed_resources) == ["gone"]


def test_delta_named_subscription_of_missing_resource_is_answered_removed() -> None:
    cache = ResourceCache()
    s = DeltaStream(cache, "n1")
    s.receive(discovery_pb2.DeltaDiscoveryRequest(type_url=E, resource_names_subscribe=["nope"]))
    [(_, raw)] = s.responses()
    assert list(_delta_decode(raw).removed_resources) == ["nope"]


# ---- properties -------------------------------------------------------------------------------

names = st.sampled_from(["a", "b", "c", "d"])
ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), names, st.integers(1, 3)),
        st.tuples(st.just("remove"), names, st.just(0)),
        st.tuples(st.just("ack"), st.just(""), st.just(0)),
        st.tuples(st.just("nack"), st.just(""), st.just(0)),
        st.tuples(st.just("junk"), st.text(max_size=8), st.just(0)),
    ),
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_delta_client_view_converges_to_cache(steps: list[tuple[str, str, int]]) -> None:
    """Whatever happens, after the client applies every response it holds exactly the cache."""
    cache = ResourceCache()
    s = DeltaStream(cache, "n1")
    _wire(cache, s)
    s.receive(discovery_pb2.DeltaDiscoveryRequest(type_url=C, node={"id": "n1"}))
    client: dict[str, str] = {}
    last_nonce = ""
    for op, name, val in steps:
        if op == "put":
            cache.put(C, {name: _cluster(name, val)})
        elif op == "remove":
            cache.remove(C, [name])
        elif op in ("ack", "nack") and last_nonce:
            req = discovery_pb2.DeltaDiscoveryRequest(type_url=C, response_nonce=last_nonce)
            if op == "nack":
                req.error_detail.message = "no"
            s.receive(req)
        elif op == "junk":
            s.receive(discovery_pb2.DeltaDiscoveryRequest(type_url=C, response_nonce=name))
        for _, raw in s.responses():
            r = _delta_decode(raw)
            last_nonce = r.nonce
            for res in r.resources:
                client[res.name] = res.version
            for n in r.removed_resources:
                client.pop(n, None)
    expected = {n: cache.get(C, n).version for n in cache.names(C)}
    assert client == expected


@settings(max_examples=200, deadline=None)
@given(ops)
def test_sotw_client_view_converges_to_cache(steps: list[tuple[str, str, int]]) -> None:
    cache = ResourceCache()
    s = SotwStream(cache, "n1")
    _wire(cache, s)
    s.receive(discovery_pb2.DiscoveryRequest(type_url=C))
    client: list[str] = []
    last: discovery_pb2.DiscoveryResponse | None = None
    accepted: list[str] = []
    for op, name, val in steps:
        if op == "put":
            cache.put(C, {name: _cluster(name, val)})
        elif op == "remove":
            cache.remove(C, [name])
        elif op in ("ack", "nack") and last is not None:
            req = discovery_pb2.DiscoveryRequest(type_url=C, response_nonce=last.nonce, version_info=last.version_info)
            if op == "nack":
                req.error_detail.message = "no"
            s.receive(req)
        elif op == "junk":
            s.receive(discovery_pb2.DiscoveryRequest(type_url=C, response_nonce=name))
        for _, raw in s.responses():
            last = _sotw_decode(raw)
            client = _names(last)
            accepted.append(last.version_info)
    assert client == cache.names(C)


@settings(max_examples=200, deadline=None)
@given(ops, st.lists(names, min_size=1, max_size=4, unique=True))
def test_sotw_endpoints_are_incremental_and_converge(steps: list[tuple[str, str, int]], subscribed: list[str]) -> None:
    """Endpoint responses carry only changes, yet the client ends up with every subscribed resource."""
    cache = ResourceCache()
    s = SotwStream(cache, "n1")
    _wire(cache, s)
    s.receive(discovery_pb2.DiscoveryRequest(type_url=E, resource_names=subscribed))
    client: dict[str, bytes] = {}
    last: discovery_pb2.DiscoveryResponse | None = None
    for op, name, val in steps:
        if op == "put":
            cache.put(E, {name: _cla(name, val)})
        elif op == "remove":
            cache.remove(E, [name])
        elif op in ("ack", "nack") and last is not None:
            req = discovery_pb2.DiscoveryRequest(type_url=E, resource_names=subscribed, response_nonce=last.nonce, version_info=last.version_info)
            if op == "nack":
                req.error_detail.message = "no"
            s.receive(req)
        elif op == "junk":
            s.receive(discovery_pb2.DiscoveryRequest(type_url=E, resource_names=subscribed, response_nonce=name))
        for _, raw in s.responses():
            last = _sotw_decode(raw)
            assert len(last.resources) <= len(subscribed)
            for a in last.resources:
                m = endpoint_pb2.ClusterLoadAssignment()
                a.Unpack(m)
                assert m.cluster_name in subscribed, f"sent unsubscribed {m.cluster_name}"
                client[m.cluster_name] = a.value
    for n in subscribed:
        e = cache.get(E, n)
        if e is not None:
            assert n in client, f"{n}: never sent"
            assert e.any_bytes.endswith(client[n]), f"{n}: the client holds a stale version"
