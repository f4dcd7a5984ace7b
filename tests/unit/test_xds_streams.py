"""The xDS stream state machines, driven with plain values (no gRPC, no Envoy)."""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpilot.xds.cache import ResourceCache
from meshpilot.xds.resource import TYPE
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


# ---- endpoints behind changed clusters; make before break -------------------------------------

R = TYPE.ROUTE


def _route(name: str, clusters: list[str]) -> route_pb2.RouteConfiguration:
    rc = route_pb2.RouteConfiguration(name=name)
    vh = rc.virtual_hosts.add(name="vh", domains=["*"])
    for c in clusters:
        r = vh.routes.add()
        r.match.prefix = f"/{c}"
        r.route.cluster = c
    return rc


def _ack(s: SotwStream, type_url: str, resp: discovery_pb2.DiscoveryResponse, names: list[str] | None = None) -> None:
    s.receive(discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names or [], version_info=resp.version_info, response_nonce=resp.nonce))


def test_sotw_sends_endpoints_behind_a_changed_cluster_with_another_endpoint_change() -> None:
    """Issue 10 B: a cluster changes and another cluster's endpoints change in one window."""
    cache = ResourceCache()
    s = SotwStream(cache, "n1")
    _wire(cache, s)
    cache.put(C, {"a": _cluster("a"), "b": _cluster("b")})
    cache.put(E, {"a": _cla("a", 1), "b": _cla("b", 1)})
    s.receive(discovery_pb2.DiscoveryRequest(type_url=C))
    [(_, raw)] = s.responses()
    _ack(s, C, _sotw_decode(raw))
    s.receive(discovery_pb2.DiscoveryRequest(type_url=E, resource_names=["a", "b"]))
    [(_, raw)] = s.responses()
    eds = _sotw_decode(raw)
    _ack(s, E, eds, ["a", "b"])
    cache.put(C, {"a": _cluster("a", 9)})  # a service update: a's cluster changes
    cache.put(E, {"b": _cla("b", 2)})  # and a new instance of b
    out = s.responses()
    assert [t for t, _ in out] == [C, E], f"expected CDS then EDS, got {[t for t, _ in out]}"
    assert sorted(_names(_sotw_decode(out[1][1]))) == ["a", "b"], (
        f"expected the endpoints of the changed cluster a behind it (with b's), got {_names(_sotw_decode(out[1][1]))}"
    )
    # Envoy's own re-request of a's endpoints carries the nonce of the EDS response it had: not needed now
    s.receive(discovery_pb2.DiscoveryRequest(type_url=E, resource_names=["a", "b"], version_info=eds.version_info, response_nonce=eds.nonce))
    assert s.responses() == []


def _held_clusters(out: list[tuple[str, bytes]]) -> list[list[str]]:
    return [_names(_sotw_decode(raw)) for t, raw in out if t == C]


def test_sotw_removes_a_cluster_only_after_the_routes_naming_it_are_acked() -> None:
    cache = ResourceCache()
    s = SotwStream(cache, "n1")
    _wire(cache, s)
    cache.put(C, {"a": _cluster("a"), "a-v1": _cluster("a-v1")})
    cache.put(R, {"r": _route("r", ["a", "a-v1"])})
    s.receive(discovery_pb2.DiscoveryRequest(type_url=C))
    s.receive(discovery_pb2.DiscoveryRequest(type_url=R, resource_names=["r"]))
    for t, raw in s.responses():
        _ack(s, t, _sotw_decode(raw), ["r"] if t == R else [])
    # a routing policy is deleted: its subset cluster and the route naming it go in one rebuild
    cache.remove(C, ["a-v1"])
    cache.put(R, {"r": _route("r", ["a"])})
    out = s.responses()
    assert [t for t, _ in out] == [R], f"expected only the route update while it is not acked, got {[t for t, _ in out]}"
    assert s.responses() == [], "the subset cluster must stay until the route that named it is acked"
    _ack(s, R, _sotw_decode(out[0][1]), ["r"])
    out = s.responses()
    assert _held_clusters(out) == [["a"]], f"expected the cluster removed once the route is acked, got {_held_clusters(out)}"


def test_sotw_removal_with_no_route_change_is_immediate() -> None:
    cache = ResourceCache()
    s = SotwStream(cache, "n1")
    _wire(cache, s)
    cache.put(C, {"a": _cluster("a"), "b": _cluster("b")})
    s.receive(discovery_pb2.DiscoveryRequest(type_url=C))
    s.receive(discovery_pb2.DiscoveryRequest(type_url=R, resource_names=["r"]))
    [(_, raw)] = s.responses()
    _ack(s, C, _sotw_decode(raw))
    cache.remove(C, ["b"])
    assert _held_clusters(s.responses()) == [["a"]]


def test_delta_removes_clusters_and_endpoints_only_after_the_routes_are_acked() -> None:
    cache = ResourceCache()
    s = DeltaStream(cache, "n1")
    _wire(cache, s)
    cache.put(C, {"a": _cluster("a"), "a-v1": _cluster("a-v1")})
    cache.put(E, {"a": _cla("a", 1), "a-v1": _cla("a-v1", 1)})
    cache.put(R, {"r": _route("r", ["a", "a-v1"])})
    s.receive(discovery_pb2.DeltaDiscoveryRequest(type_url=C))
    s.receive(discovery_pb2.DeltaDiscoveryRequest(type_url=E, resource_names_subscribe=["a", "a-v1"]))
    s.receive(discovery_pb2.DeltaDiscoveryRequest(type_url=R, resource_names_subscribe=["r"]))
    for t, raw in s.responses():
        s.receive(discovery_pb2.DeltaDiscoveryRequest(type_url=t, response_nonce=_delta_decode(raw).nonce))
    cache.remove(E, ["a-v1"])
    cache.remove(C, ["a-v1"])
    cache.put(R, {"r": _route("r", ["a"])})
    out = s.responses()
    assert [t for t, _ in out] == [R], f"expected only the route update first, got {[(t, list(_delta_decode(r).removed_resources)) for t, r in out]}"
    s.receive(discovery_pb2.DeltaDiscoveryRequest(type_url=R, response_nonce=_delta_decode(out[0][1]).nonce))
    out = s.responses()
    removed = [(t, list(_delta_decode(raw).removed_resources)) for t, raw in out]
    assert removed == [(C, ["a-v1"]), (E, ["a-v1"])], f"expected a-v1 removed (cluster, endpoints) after the route ACK, got {removed}"


class _Envoy:
    """A client as Envoy behaves over ADS: a changed or new cluster warms until an EDS response
    carries its endpoints; after a CDS update it re-requests endpoints with the EDS nonce it has.
    It applies a whole batch of responses before the server sees any of its requests."""

    def __init__(self, stream: SotwStream | DeltaStream) -> None:
        self.s = stream
        self.delta = isinstance(stream, DeltaStream)
        self.clusters: dict[str, str] = {}
        self.routes: dict[str, list[str]] = {}
        self.warming: set[str] = set()
        self.eds_seen: discovery_pb2.DiscoveryResponse | None = None
        self.broken: list[str] = []  # make before break violations, as they happened

    def start(self) -> None:
        if self.delta:
            self.s.receive(discovery_pb2.DeltaDiscoveryRequest(type_url=C))
            self.s.receive(discovery_pb2.DeltaDiscoveryRequest(type_url=R, resource_names_subscribe=["r"]))
        else:
            self.s.receive(discovery_pb2.DiscoveryRequest(type_url=C))
            self.s.receive(discovery_pb2.DiscoveryRequest(type_url=R, resource_names=["r"]))

    def _eds_request(self, new: set[str], gone: set[str]) -> Any:
        if self.delta:
            return discovery_pb2.DeltaDiscoveryRequest(type_url=E, resource_names_subscribe=sorted(new), resource_names_unsubscribe=sorted(gone))
        last = self.eds_seen
        return discovery_pb2.DiscoveryRequest(
            type_url=E, resource_names=sorted(self.clusters),
            version_info=last.version_info if last else "", response_nonce=last.nonce if last else "",
        )

    def apply(self, batch: list[tuple[str, bytes]]) -> list[Any]:
        requests: list[Any] = []
        for t, raw in batch:
            r = _delta_decode(raw) if self.delta else _sotw_decode(raw)
            if t == C:
                before = dict(self.clusters)
                if self.delta:
                    for res in r.resources:
                        self.clusters[res.name] = res.version
                    for n in r.removed_resources:
                        self.clusters.pop(n, None)
                else:
                    self.clusters = {}
                    for a in r.resources:
                        m = cluster_pb2.Cluster()
                        a.Unpack(m)
                        self.clusters[m.name] = m.SerializeToString(deterministic=True).hex()
                changed = {n for n, v in self.clusters.items() if before.get(n) != v}
                self.warming = (self.warming | changed) & set(self.clusters)
                if changed or set(before) != set(self.clusters):
                    requests.append(self._eds_request(set(self.clusters) - set(before), set(before) - set(self.clusters)))
            elif t == E:
                got = [res.name for res in r.resources] if self.delta else _names(r)
                self.warming -= set(got)
                if not self.delta:
                    self.eds_seen = r
            elif t == R:
                items = [res.resource for res in r.resources] if self.delta else list(r.resources)
                for a in items:
                    m = route_pb2.RouteConfiguration()
                    a.Unpack(m)
                    self.routes[m.name] = [x.route.cluster for x in m.virtual_hosts[0].routes]
            for name in sorted({c for cs in self.routes.values() for c in cs} - set(self.clusters)):
                self.broken.append(f"route names {name} after {t.rsplit('.', 1)[-1]} but the client has no such cluster")
            if self.delta:
                requests.append(discovery_pb2.DeltaDiscoveryRequest(type_url=t, response_nonce=r.nonce))
            else:
                names = sorted(self.clusters) if t == E else ["r"] if t == R else []
                requests.append(discovery_pb2.DiscoveryRequest(type_url=t, resource_names=names, version_info=r.version_info, response_nonce=r.nonce))
        return requests

    def settle(self) -> None:
        for _ in range(20):
            batch = self.s.responses()
            if not batch:
                return
            for req in self.apply(batch):
                self.s.receive(req)
        raise AssertionError("the stream kept sending after 20 rounds")


# a world step: a cluster changes, its endpoints change, or a subset cluster comes or goes with the route
world = st.lists(
    st.one_of(
        st.tuples(st.just("cluster"), st.sampled_from(["a", "b", "c"]), st.integers(1, 4)),
        st.tuples(st.just("endpoints"), st.sampled_from(["a", "b", "c"]), st.integers(1, 4)),
        st.tuples(st.just("split"), st.sampled_from(["a", "b", "c"]), st.booleans()),
    ),
    min_size=1,
    max_size=4,
)


def _apply_world(cache: ResourceCache, split: set[str], step: list[tuple[str, str, Any]]) -> None:
    """One debounce window, applied as the control plane does: endpoints, clusters, then routes."""
    for op, name, val in step:
        if op == "cluster":
            cache.put(C, {name: _cluster(name, val)})
        elif op == "endpoints":
            cache.put(E, {name: _cla(name, val)})
        elif val:
            cache.put(E, {f"{name}-v1": _cla(f"{name}-v1", 1)})
            cache.put(C, {f"{name}-v1": _cluster(f"{name}-v1")})
            split.add(name)
        else:
            cache.remove(C, [f"{name}-v1"])
            cache.remove(E, [f"{name}-v1"])
            split.discard(name)
    cache.put(R, {"r": _route("r", ["a", "b", "c", *sorted(f"{n}-v1" for n in split)])})


@settings(max_examples=150, deadline=None)
@given(st.booleans(), st.lists(world, min_size=1, max_size=5))
def test_envoy_never_waits_for_endpoints_and_routes_never_name_missing_clusters(delta: bool, steps: list[list[tuple[str, str, Any]]]) -> None:
    cache = ResourceCache()
    for n in "abc":
        cache.put(C, {n: _cluster(n)})
        cache.put(E, {n: _cla(n, 1)})
    cache.put(R, {"r": _route("r", ["a", "b", "c"])})
    s: SotwStream | DeltaStream = DeltaStream(cache, "n1") if delta else SotwStream(cache, "n1")
    _wire(cache, s)
    envoy = _Envoy(s)
    envoy.start()
    envoy.settle()
    split: set[str] = set()
    for step in steps:
        _apply_world(cache, split, step)
        envoy.settle()
        assert not envoy.warming, f"expected no cluster left warming after {step}, got {sorted(envoy.warming)} ({s.kind})"
        assert sorted(envoy.clusters) == cache.names(C), f"expected the client to hold {cache.names(C)}, got {sorted(envoy.clusters)}"
    assert not envoy.broken, f"make before break violated ({s.kind}): {envoy.broken}"


def test_sotw_client_that_holds_the_current_version_from_another_stream_is_sent_nothing_until_a_change() -> None:
    # what an Envoy sees moving between control-plane replicas: the same content has the same version
    first_cache, other_cache = ResourceCache(), ResourceCache()
    for cache in (first_cache, other_cache):
        cache.put(C, {"a": _cluster("a"), "b": _cluster("b")})
        cache.put(E, {"a": _cla("a", 2)})
    s1 = SotwStream(first_cache, "n1")
    s1.receive(discovery_pb2.DiscoveryRequest(type_url=C))
    s1.receive(discovery_pb2.DiscoveryRequest(type_url=E, resource_names=["a"]))
    held = {t: _sotw_decode(raw).version_info for t, raw in s1.responses()}
    assert set(held) == {C, E}

    s2 = SotwStream(other_cache, "n1")
    _wire(other_cache, s2)
    s2.receive(discovery_pb2.DiscoveryRequest(type_url=C, version_info=held[C]))
    s2.receive(discovery_pb2.DiscoveryRequest(type_url=E, resource_names=["a"], version_info=held[E]))
    assert s2.responses() == [], "expected nothing sent to a client that already holds the current versions"
    other_cache.put(C, {"c": _cluster("c")})
    [(t, raw)] = s2.responses()
    assert t == C and _names(_sotw_decode(raw)) == ["a", "b", "c"], "expected the change sent whole"

    s3 = SotwStream(other_cache, "n2")
    s3.receive(discovery_pb2.DiscoveryRequest(type_url=C, version_info="an-older-version"))
    [(t, raw)] = s3.responses()
    assert t == C and _names(_sotw_decode(raw)) == ["a", "b", "c"], "expected a client with another version sent everything"


class _CountingCache(ResourceCache):
    """A cache that counts the lookups of single resources a stream makes (``get``, and ``get`` on
    the views ``scopes`` hands out): the per-name work of building a response."""

    def __init__(self) -> None:
        super().__init__()
        self.lookups = 0

    def get(self, type_url: str, name: str, node_id: str = "") -> Any:
        self.lookups += 1
        return super().get(type_url, name, node_id)

    def scopes(self, type_url: str, node_id: str = "") -> Any:
        own, shared = super().scopes(type_url, node_id)
        counter = self

        class _View(dict):  # type: ignore[type-arg]
            def get(self, key: Any, default: Any = None) -> Any:
                counter.lookups += 1
                return super().get(key, default)

        return _View(own), _View(shared)


def _fleet_cache(n: int) -> _CountingCache:
    cache = _CountingCache()
    cache.put(C, {f"c{i}": _cluster(f"c{i}") for i in range(n)})
    cache.put(E, {f"c{i}": _cla(f"c{i}", 1) for i in range(n)})
    return cache


def _delta_sync(cache: ResourceCache, node: str, names: list[str]) -> DeltaStream:
    s = DeltaStream(cache, node)
    _wire(cache, s)
    s.receive(discovery_pb2.DeltaDiscoveryRequest(type_url=C))
    s.receive(discovery_pb2.DeltaDiscoveryRequest(type_url=E, resource_names_subscribe=names))
    for t, raw in s.responses():
        s.receive(discovery_pb2.DeltaDiscoveryRequest(type_url=t, response_nonce=_delta_decode(raw).nonce))
    return s


def _sotw_sync(cache: ResourceCache, node: str, names: list[str]) -> SotwStream:
    s = SotwStream(cache, node)
    _wire(cache, s)
    s.receive(discovery_pb2.DiscoveryRequest(type_url=C))
    s.receive(discovery_pb2.DiscoveryRequest(type_url=E, resource_names=names))
    _sotw_ack(s, s.responses(), names)
    return s


def _sotw_ack(s: SotwStream, out: list[tuple[str, bytes]], names: list[str]) -> None:
    for t, raw in out:
        r = _sotw_decode(raw)
        s.receive(discovery_pb2.DiscoveryRequest(
            type_url=t, response_nonce=r.nonce, version_info=r.version_info, resource_names=names if t == E else [],
        ))


def test_delta_first_sync_of_a_fleet_looks_each_resource_up_once_not_once_per_stream() -> None:
    cache = _fleet_cache(200)
    names = [f"c{i}" for i in range(200)]
    first = _delta_sync(cache, "n0", names)
    one = cache.lookups
    others = [_delta_sync(cache, f"n{k}", names) for k in range(1, 6)]
    more = cache.lookups - one
    assert more < 20, f"expected 5 more streams subscribed alike to cost (almost) no lookups after the first ({one}); got {more}"
    for s in (first, *others):
        assert s.types[E].sent == first.types[E].sent and len(s.types[E].sent) == 200 and len(s.types[C].sent) == 200
    # one stream's own change (it unsubscribes a name) leaves the others' record of what they hold alone
    first.receive(discovery_pb2.DeltaDiscoveryRequest(type_url=E, resource_names_unsubscribe=["c0"]))
    for t, raw in first.responses():
        assert _delta_decode(raw).removed_resources == ["c0"], f"expected c0 removed from {t}, got {_delta_decode(raw)}"
    assert "c0" not in first.types[E].sent, "the unsubscribed name stayed in the stream's record"
    for s in others:
        assert len(s.types[E].sent) == 200 and "c0" in s.types[E].sent, "another stream's change reached this stream's record"


def test_delta_streams_that_hold_the_same_share_one_record_through_a_push() -> None:
    cache = _fleet_cache(200)
    names = [f"c{i}" for i in range(200)]
    fleet = [_delta_sync(cache, f"n{k}", names) for k in range(4)]
    assert len({id(s.types[E].sent) for s in fleet}) == 1, "streams sent the same first sync hold separate records"
    cache.put(E, {"c7": _cla("c7", 2)})
    for s in fleet:
        out = s.responses()
        assert [t for t, _ in out] == [E], f"expected one endpoint push per stream, got {[t for t, _ in out]}"
        r = _delta_decode(out[0][1])
        assert [x.name for x in r.resources] == ["c7"], f"expected c7 pushed, got {[x.name for x in r.resources]}"
        s.receive(discovery_pb2.DeltaDiscoveryRequest(type_url=E, response_nonce=r.nonce))
    records = {id(s.types[E].sent) for s in fleet}
    assert len(records) == 1, f"after the same push the streams hold {len(records)} records, expected one shared"
    assert fleet[0].types[E].sent["c7"] == cache.scopes(E, "n0")[1]["c7"].version, "the shared record missed the push"
    # a stream that then diverges takes its own copy; the others keep the shared one unchanged
    fleet[0].receive(discovery_pb2.DeltaDiscoveryRequest(type_url=E, resource_names_unsubscribe=["c1"]))
    fleet[0].responses()
    assert "c1" not in fleet[0].types[E].sent and all("c1" in s.types[E].sent for s in fleet[1:])


def test_sotw_endpoint_change_to_a_fleet_is_built_once_not_once_per_stream() -> None:
    cache = _fleet_cache(200)
    names = [f"c{i}" for i in range(200)]
    fleet = [_sotw_sync(cache, f"n{k}", names) for k in range(6)]
    cache.put(E, {f"c{i}": _cla(f"c{i}", 2) for i in range(100)})  # a burst: half the services change
    before = cache.lookups
    versions = set()
    for s in fleet:
        out = s.responses()
        assert [t for t, _ in out] == [E], f"expected one endpoint response per stream, got {[t for t, _ in out]}"
        r = _sotw_decode(out[0][1])
        assert len(r.resources) == 100, f"expected the 100 changed endpoint sets, got {len(r.resources)}"
        versions.add(r.version_info)
        _sotw_ack(s, out, names)
    spent = cache.lookups - before
    assert spent <= 120, f"expected the changed endpoints looked up once for 6 streams (~100 lookups), got {spent}"
    assert len(versions) == 1, f"expected every stream sent the same version, got {versions}"


def test_sotw_streams_subscribed_alike_share_one_set_of_names_and_an_ack_keeps_it() -> None:
    cache = _fleet_cache(50)
    names = [f"c{i}" for i in range(50)]
    a, b = _sotw_sync(cache, "a", names), _sotw_sync(cache, "b", names)
    assert a.types[E].names is b.types[E].names, "expected one shared set of subscribed names, got a copy per stream"
    held = a.types[E].names
    cache.put(E, {"c1": _cla("c1", 3)})
    _sotw_ack(a, a.responses(), names)
    assert a.types[E].names is held, "expected an ACK repeating the subscription to keep the set it has"
    a.receive(discovery_pb2.DiscoveryRequest(type_url=E, resource_names=["c1", "c1"], response_nonce=a.types[E].sent_nonce,
                                             version_info=a.types[E].sent_version))
    assert sorted(a.types[E].names) == ["c1"], f"expected a list with a repeated name to subscribe to it alone, got {sorted(a.types[E].names)}"


def test_delta_endpoint_change_to_a_fleet_is_built_once_and_each_client_gets_only_what_it_lacks() -> None:
    cache = _fleet_cache(200)
    names = [f"c{i}" for i in range(200)]
    fleet = [_delta_sync(cache, f"n{k}", names) for k in range(6)]
    narrow = _delta_sync(cache, "narrow", names[:50])  # subscribed to part of what changes
    cache.put(E, {f"c{i}": _cla(f"c{i}", 2) for i in range(100)})  # a burst: half the services change
    before = cache.lookups
    for s in fleet:
        out = s.responses()
        assert [t for t, _ in out] == [E], f"expected one endpoint response per stream, got {[t for t, _ in out]}"
        got = sorted(r.name for r in _delta_decode(out[0][1]).resources)
        assert got == sorted(f"c{i}" for i in range(100)), f"expected the 100 changed endpoint sets, got {len(got)}"
    spent = cache.lookups - before
    assert spent <= 120, f"expected the changed endpoints looked up once for 6 streams (~100 lookups), got {spent}"
    now = {n: e.version for n, e in cache.scopes(E)[1].items()}
    for s in fleet:
        assert s.types[E].sent == now, "expected each stream's record of what it holds to be the cache's versions"
    [(t, raw)] = narrow.responses()
    assert sorted(r.name for r in _delta_decode(raw).resources) == sorted(names[:50]), "a stream subscribed to fewer gets only its own"
