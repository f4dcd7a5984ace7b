"""Sidecar liveness shared by control-plane replicas: a node is held while any replica's liveness
document names it, and the lost-stream clocks run only for nodes nobody holds, on the replicas that
survive. Two HDS servers over two registries play two replicas; what one writes reaches the other as
a shared store's watch would hand it on (the receiving view first, then ``apply_remote``)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import health_check_pb2
from envoy.service.health.v3 import hds_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpilot.hds.liveness import Liveness
from meshpilot.hds.server import HDS_SERVICE, LIVENESS, HdsServer
from meshpilot.hds.stream import HdsStream, Register
from meshpilot.model import Check, CheckStatus, Instance, Service, ServicePort
from meshpilot.registry import Registry
from meshpilot.registry.store import MemoryStore, RemoteChange

CRITICAL, REMOVE, DEAD = 45.0, 300.0, 5.0


class _Shared(MemoryStore):
    """One replica's view of a shared store: keeps the rows this replica writes, so the test can hand
    them to the other replicas as the store's watch would."""

    shared = True

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[RemoteChange] = []
        self.is_current = True

    def write(self, puts: Any, deletes: tuple[tuple[str, str], ...] = ()) -> None:
        super().write(puts, deletes)
        self.rows += [(t, k, v) for (t, k), v in puts.items()] + [(t, k, None) for t, k in deletes]

    def current(self) -> bool:
        return self.is_current

    def take_in(self, rows: list[RemoteChange]) -> None:
        """The view follows the other replicas' writes (not recorded as this replica's own)."""
        for t, k, v in rows:
            if v is None:
                MemoryStore.write(self, {}, ((t, k),))
            else:
                MemoryStore.write(self, {(t, k): v})


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Replica:
    def __init__(self, name: str, clock: _Clock, store: _Shared | None = None) -> None:
        self.name = name
        self.store = store or _Shared()
        self.registry = Registry(self.store)
        self.hds = HdsServer(self.registry, 1.0, CRITICAL, REMOVE, DEAD, replica=name, clock=clock)
        self.registry.subscribe(self.hds.on_change)


def _sync(*replicas: _Replica) -> None:
    """Hand every replica's writes to every other one, until nothing new is written."""
    while any(r.store.rows for r in replicas):
        for src in replicas:
            rows, src.store.rows = src.store.rows, []
            for dst in replicas:
                if dst is not src:
                    dst.store.take_in(rows)
                    dst.registry.apply_remote(rows)


def _expire(gone: _Replica, *survivors: _Replica) -> None:
    """etcd removes the liveness documents bound to ``gone``'s lease; the survivors' watches see the deletes."""
    for r in survivors:
        rows: list[RemoteChange] = [(LIVENESS, node, None) for node, doc in list(r.store.items(LIVENESS))
                                    if doc.get("replica") == gone.name]
        r.store.take_in(rows)
        r.registry.apply_remote(rows)


def _passing(node: str) -> Instance:
    return Instance(id=node, service="web", node=node, address="127.0.0.1", ports={"http": 15006}, source="mesh",
                    checks=[Check(id="hds", owner="hds", status=CheckStatus.passing, output="health check passing")])


def _setup(clock: _Clock) -> tuple[_Replica, _Replica]:
    a, b = _Replica("a", clock), _Replica("b", clock)
    a.registry.put_service(Service(name="web", ports=[ServicePort(name="http", port=80)]))
    a.registry.register(_passing("web-1"))
    _sync(a, b)
    return a, b


def _hds_status(r: _Replica, node: str) -> str | None:
    inst = r.registry.instance(node)
    if inst is None:
        return None
    return next((c.status.value for c in inst.checks if c.id == "hds"), "no hds check")


def _sweep(r: _Replica, clock: _Clock, at: float) -> None:
    clock.now = at
    r.hds.sweep(at)


def test_a_node_another_replica_holds_is_not_marked_when_the_first_holders_document_vanishes() -> None:
    clock = _Clock()
    a, b = _setup(clock)
    a.hds.opened("web-1")
    _sync(a, b)
    assert b.store.get(LIVENESS, "web-1") == {"replica": "a"}, "expected A's liveness document in B's view"
    # A dies; its sidecar reconnects to B before A's lease runs out, then the lease expires
    b.hds.opened("web-1")
    _expire(a, b)
    for t in (1001.0, 1000 + CRITICAL + 1, 1000 + REMOVE + 1):
        _sweep(b, clock, t)
        assert _hds_status(b, "web-1") == "passing", f"at +{t - 1000:.0f}s: expected web-1 still passing on B, got {_hds_status(b, 'web-1')}"
    assert b.hds.liveness.due(clock.now + REMOVE) == ([], []), "expected no clock running for a node B holds"


def test_a_node_the_survivor_holds_after_the_old_holders_lease_expired_first() -> None:
    """The lease expires before the sidecar reconnects: the survivor's clock starts, the reconnect stops it."""
    clock = _Clock()
    a, b = _setup(clock)
    a.hds.opened("web-1")
    _sync(a, b)
    _expire(a, b)
    clock.now = 1010.0
    b.hds.opened("web-1")
    _sweep(b, clock, 1000 + REMOVE + 20)
    assert _hds_status(b, "web-1") == "passing", f"expected web-1 passing after its reconnect to B, got {_hds_status(b, 'web-1')}"


def test_a_node_held_by_b_is_not_marked_by_a_when_as_old_stream_closes_late() -> None:
    """The sidecar moved to B while A still had a half-dead stream: A's close neither deletes B's
    document nor starts A's clock."""
    clock = _Clock()
    a, b = _setup(clock)
    a.hds.opened("web-1")
    _sync(a, b)
    b.hds.opened("web-1")
    _sync(a, b)
    assert a.store.get(LIVENESS, "web-1") == {"replica": "b"}, f"expected B's document in A's view, got {a.store.get(LIVENESS, 'web-1')}"
    a.hds.closed("web-1", 1001.0)
    _sync(a, b)
    assert b.store.get(LIVENESS, "web-1") == {"replica": "b"}, f"expected B's document kept, got {b.store.get(LIVENESS, 'web-1')}"
    _sweep(a, clock, 1000 + CRITICAL + 10)
    assert _hds_status(a, "web-1") == "passing", f"expected A to leave web-1 alone, got {_hds_status(a, 'web-1')}"


def test_a_node_nobody_holds_goes_critical_then_is_removed_on_the_survivor() -> None:
    clock = _Clock()
    a, b = _setup(clock)
    a.hds.opened("web-1")
    _sync(a, b)
    clock.now = 1002.0
    _expire(a, b)  # A died and the sidecar with it: nobody takes the node over
    _sweep(b, clock, 1002 + CRITICAL - 1)
    assert _hds_status(b, "web-1") == "passing", f"expected the long grace on B before critical, got {_hds_status(b, 'web-1')}"
    _sweep(b, clock, 1002 + CRITICAL)
    assert _hds_status(b, "web-1") == "critical", f"expected web-1 critical {CRITICAL:.0f}s after A's lease expired, got {_hds_status(b, 'web-1')}"
    _sweep(b, clock, 1002 + REMOVE - 1)
    assert b.registry.instance("web-1") is not None, "expected web-1 kept until the removal time"
    _sweep(b, clock, 1002 + REMOVE)
    assert b.registry.instance("web-1") is None, f"expected web-1 removed {REMOVE:.0f}s after A's lease expired, got {b.registry.instance('web-1')}"


def test_a_stream_closing_on_its_holder_starts_the_clock_on_every_replica_and_both_acting_is_harmless() -> None:
    clock = _Clock()
    a, b = _setup(clock)
    a.hds.opened("web-1")
    _sync(a, b)
    a.hds.closed("web-1", 1003.0)
    clock.now = 1003.0
    _sync(a, b)
    assert b.store.get(LIVENESS, "web-1") is None and a.store.get(LIVENESS, "web-1") is None, "expected the document deleted"
    # both sweep before either hears of the other's write
    _sweep(a, clock, 1003 + CRITICAL)
    _sweep(b, clock, 1003 + CRITICAL)
    writes = [r for r in a.store.rows + b.store.rows if r[0] == "instances"]
    _sync(a, b)
    assert (_hds_status(a, "web-1"), _hds_status(b, "web-1")) == ("critical", "critical"), \
        f"expected critical on both, got {_hds_status(a, 'web-1')}, {_hds_status(b, 'web-1')}"
    assert len(writes) == 2 and writes[0][2] == writes[1][2], f"expected the two marks to write the same document, got {writes}"
    _sweep(a, clock, 1003 + REMOVE)
    _sync(a, b)
    _sweep(b, clock, 1003 + REMOVE)
    assert a.registry.instance("web-1") is None and b.registry.instance("web-1") is None, "expected web-1 removed on both"
    assert not [r for r in b.store.rows if r[0] == "instances"], f"expected B not to remove what A already had, got {b.store.rows}"


def test_the_holder_puts_its_status_back_when_a_stale_mark_crosses_its_reconnect() -> None:
    clock = _Clock()
    a, b = _setup(clock)
    stream = _open_stream(b, "web-1")  # A has not heard of B's hold yet
    a.hds.liveness.lost_at["web-1"] = 900.0
    _sweep(a, clock, 900 + CRITICAL)
    assert _hds_status(a, "web-1") == "critical"
    # A's view had no holder: its write and B's document cross
    _sync(a, b)
    assert stream.session is not None and stream.session.last is CheckStatus.passing
    assert _hds_status(b, "web-1") == "passing" and _hds_status(a, "web-1") == "passing", \
        f"expected B (the holder) to put passing back, got A={_hds_status(a, 'web-1')} B={_hds_status(b, 'web-1')}"
    assert "web-1" in a.hds.liveness.elsewhere and "web-1" not in a.hds.liveness.lost_at, "expected A to know B holds web-1"


def test_a_holder_puts_its_document_back_when_another_replica_removed_it() -> None:
    clock = _Clock()
    a, b = _setup(clock)
    b.hds.opened("web-1")
    _sync(a, b)
    # A's view was behind: it removes the document as if it were still its own
    a.store.write({}, ((LIVENESS, "web-1"),))
    _sync(a, b)
    assert a.store.get(LIVENESS, "web-1") == {"replica": "b"}, f"expected B to write its document again, got {a.store.get(LIVENESS, 'web-1')}"
    _sweep(a, clock, 1000 + REMOVE + 1)
    assert _hds_status(a, "web-1") == "passing", f"expected A to leave web-1 alone, got {_hds_status(a, 'web-1')}"


def test_a_replica_that_starts_while_another_holds_a_node_gives_only_the_others_the_restart_grace() -> None:
    clock = _Clock()
    a, b = _setup(clock)
    a.registry.register(_passing("web-2"))
    a.hds.opened("web-1")
    _sync(a, b)
    # B restarts: a new process over the same shared state (its view loaded from the store)
    view = _Shared()
    view.take_in([(t, k, v) for t in ("services", "instances", LIVENESS) for k, v in b.store.items(t)])
    clock.now = 2000.0
    b2 = _Replica("b2", clock, view)
    _sweep(b2, clock, 2000 + CRITICAL)
    assert _hds_status(b2, "web-1") == "passing", f"expected web-1 (held by A) not lost after B's start, got {_hds_status(b2, 'web-1')}"
    assert _hds_status(b2, "web-2") == "critical", f"expected web-2 (held by nobody) critical after the long grace, got {_hds_status(b2, 'web-2')}"
    # A dies later: the clock of web-1 starts on B from the lease expiry
    clock.now = 2100.0
    _expire(a, b2)
    _sweep(b2, clock, 2100 + CRITICAL - 1)
    assert _hds_status(b2, "web-1") == "passing"
    _sweep(b2, clock, 2100 + CRITICAL)
    assert _hds_status(b2, "web-1") == "critical", f"expected web-1 critical once A's hold ended, got {_hds_status(b2, 'web-1')}"


def test_the_short_grace_needs_the_ads_close_seen_here_on_a_shared_store() -> None:
    clock = _Clock()
    a, b = _setup(clock)
    a.registry.register(_passing("web-2"))
    _sync(a, b)
    for node in ("web-1", "web-2"):
        a.hds.opened(node)
    a.hds.on_node("web-1", True)  # web-1's ADS stream is here, web-2's on another replica
    clock.now = 1010.0
    for node in ("web-1", "web-2"):
        a.hds.closed(node, 1010.0)
    a.hds.on_node("web-1", False)
    _sweep(a, clock, 1010 + DEAD)
    got = (_hds_status(a, "web-1"), _hds_status(a, "web-2"))
    assert got == ("critical", "passing"), f"expected the short grace only where both closes were seen, got {got}"


def _open_stream(r: _Replica, node: str) -> HdsStream:
    """A stream of ``node`` on ``r`` as the server runs it: registered, then one healthy report."""
    stream = HdsStream(1.0, lambda n: "")
    hello = hds_pb2.HealthCheckRequestOrEndpointHealthResponse()
    hello.health_check_request.node.id = node
    hello.health_check_request.node.metadata.update({"SERVICE": "web", "INBOUND_PORT": 15006, "APP_PORT": 8080,
                                                     "HEALTH_CHECK": {"kind": "tcp", "interval_s": 0.1, "timeout_s": 0.1}})
    effects = stream.receive(hello, r.hds.clock(), r.registry.instance)
    reg = effects[0]
    assert isinstance(reg, Register)
    r.registry.register(reg.instance, replace=True)
    r.hds.opened(node, stream)
    report = hds_pb2.HealthCheckRequestOrEndpointHealthResponse()
    c = report.endpoint_health_response.cluster_endpoints_health.add(cluster_name=reg.registration.cluster)
    c.locality_endpoints_health.add().endpoints_health.add(health_status=health_check_pb2.HEALTHY)
    for effect in stream.receive(report, r.hds.clock() + 1, r.registry.instance):
        r.registry.set_check(effect.instance_id, effect.check)  # type: ignore[union-attr]
    return stream


async def test_a_replica_cut_off_from_its_store_ends_its_hds_streams_and_refuses_new_ones_until_current() -> None:
    clock = _Clock()
    a, b = _setup(clock)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([a.hds.handler()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    method = f"/{HDS_SERVICE}/StreamHealthCheck"

    def call() -> Any:
        return channel.stream_stream(method, request_serializer=hds_pb2.HealthCheckRequestOrEndpointHealthResponse.SerializeToString,
                                     response_deserializer=hds_pb2.HealthCheckSpecifier.FromString)()

    hello = hds_pb2.HealthCheckRequestOrEndpointHealthResponse()
    hello.health_check_request.node.id = "web-1"
    hello.health_check_request.node.metadata.update({"SERVICE": "web", "INBOUND_PORT": 15006, "APP_PORT": 8080})
    try:
        first = call()
        await first.write(hello)
        spec = await asyncio.wait_for(first.read(), 5)
        assert spec.cluster_health_checks[0].cluster_name == "hds|web-1", f"expected web-1's specifier, got {spec}"
        assert a.store.get(LIVENESS, "web-1") == {"replica": "a"}, "expected A to hold web-1"
        a.store.is_current = False
        assert a.hds.follow_store(a.store.current()) == 1, "expected the one open stream ended"
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(first.read(), 5)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, f"expected UNAVAILABLE (reconnect elsewhere), got {ended.value}"
        assert a.store.get(LIVENESS, "web-1") is None, "expected A's document deleted with its stream"
        refused = call()
        await refused.write(hello)
        with pytest.raises(grpc.aio.AioRpcError) as no:
            await asyncio.wait_for(refused.read(), 5)
        assert no.value.code() == grpc.StatusCode.UNAVAILABLE, f"expected a new stream refused while cut off, got {no.value}"
        _sweep(a, clock, 1000 + REMOVE + 1)
        assert _hds_status(a, "web-1") == "passing", "expected a cut-off replica to act on no clock"
        a.store.is_current = True
        a.hds.follow_store(a.store.current())
        again = call()
        await again.write(hello)
        spec = await asyncio.wait_for(again.read(), 5)
        assert spec.cluster_health_checks[0].cluster_name == "hds|web-1", "expected streams served again once current"
        again.cancel()
    finally:
        await channel.close()
        await server.stop(None)


def test_the_plugin_follows_the_store_only_when_it_is_shared() -> None:
    from meshpilot.controlplane import ControlPlane
    from meshpilot.hds.plugin import install
    from meshpilot.settings import Settings

    local = ControlPlane(Settings(store="memory:", consul_port=None, eureka_port=None))
    shared = ControlPlane(Settings(store="memory:", consul_port=None, eureka_port=None), store=_Shared())
    got = ([t.name for t in install(local).tasks], [t.name for t in install(shared).tasks])
    assert got == (["hds_sweeps"], ["hds_sweeps", "hds_follow_store"]), f"expected the currency task on a shared store only, got {got}"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["open", "close", "held", "released", "ads_open", "ads_close", "sweep"]),
                          st.floats(0, 20, allow_nan=False)), max_size=40))
def test_never_critical_while_any_replica_holds_the_node_nor_before_a_grace_has_passed(events: list[tuple[str, float]]) -> None:
    lv = Liveness(critical_after_s=CRITICAL, remove_after_s=REMOVE, dead_after_s=DEAD, shared=True)
    now, here, elsewhere = 0.0, 0, False
    unheld_since: float | None = 0.0
    lv.lost_at["n"] = 0.0  # as after a start: nobody holds it
    for kind, dt in events:
        now += dt
        if kind == "open":
            lv.opened("n")
            # this replica's document replaces the other's; a holder elsewhere writes its own again
            # when this one's goes (a later "held")
            here, elsewhere = here + 1, False
        elif kind == "close" and here:
            lv.closed("n", now)
            here -= 1
        elif kind == "held":
            lv.held_elsewhere("n")
            elsewhere = True
        elif kind == "released":
            lv.released_elsewhere("n", now)
            elsewhere = False
        elif kind == "ads_open":
            lv.ads_changed("n", True, now)
        elif kind == "ads_close":
            lv.ads_changed("n", False, now)
        held = here > 0 or elsewhere
        if held:
            unheld_since = None
        elif unheld_since is None:
            unheld_since = now
        if kind == "sweep":
            critical, removed = lv.due(now)
            if critical or removed:
                assert not held, f"acted at {now} on a node held (here={here}, elsewhere={elsewhere}): {events}"
                assert unheld_since is not None and now - unheld_since >= min(DEAD, CRITICAL), (
                    f"acted at {now}, {now - (unheld_since or now):.1f}s after the last hold ended: {events}")
            if removed:
                assert unheld_since is not None and now - unheld_since >= REMOVE, f"removed too early at {now}: {events}"


def test_back_from_a_cut_off_a_replica_removes_its_leftover_documents_and_gives_the_unheld_nodes_the_long_grace() -> None:
    clock = _Clock()
    a, b = _setup(clock)
    a.hds.opened("web-1")
    a.hds.on_node("web-1", True)
    _sync(a, b)
    a.store.is_current = False
    a.hds.follow_store(False)
    # its stream ended while cut off; its document stayed (here: put back, as a store that lost the delete)
    a.hds.closed("web-1", 1001.0)
    a.hds.on_node("web-1", False)
    a.store.write({(LIVENESS, "web-1"): {"replica": "a"}})
    a.store.rows.clear()
    _sweep(a, clock, 1001 + REMOVE)
    assert _hds_status(a, "web-1") == "passing", "expected no clock acted on while cut off"
    clock.now = 2000.0
    a.store.is_current = True
    a.hds.follow_store(True)
    assert a.store.get(LIVENESS, "web-1") is None, f"expected A's leftover document removed, got {a.store.get(LIVENESS, 'web-1')}"
    _sweep(a, clock, 2000 + DEAD)
    _sweep(a, clock, 2000 + CRITICAL - 1)
    assert _hds_status(a, "web-1") == "passing", \
        f"expected the long grace from the return for a node nobody holds (the short one as good as spent), got {_hds_status(a, 'web-1')}"
    _sweep(a, clock, 2000 + CRITICAL)
    assert _hds_status(a, "web-1") == "critical", f"expected critical {CRITICAL:.0f}s after the return, got {_hds_status(a, 'web-1')}"


def test_a_document_of_this_replica_put_back_after_its_hold_ended_is_removed() -> None:
    """A store that renews a lost lease puts the replica's ephemeral documents back and hands them to it:
    one for a node whose stream has since ended here must go."""
    clock = _Clock()
    a, b = _setup(clock)
    a.hds.opened("web-1")
    a.hds.opened("web-2")
    a.hds.closed("web-2", 1001.0)
    _sync(a, b)
    back: list[RemoteChange] = [(LIVENESS, "web-1", {"replica": "a"}), (LIVENESS, "web-2", {"replica": "a"})]
    for r in (a, b):
        r.store.take_in(back)
        r.registry.apply_remote(back)
    _sync(a, b)
    got = (a.store.get(LIVENESS, "web-1"), a.store.get(LIVENESS, "web-2"))
    assert got == ({"replica": "a"}, None), f"expected A to keep web-1's document and remove web-2's, got {got}"
    got = (b.store.get(LIVENESS, "web-1"), b.store.get(LIVENESS, "web-2"))
    assert got == ({"replica": "a"}, None), f"expected web-1 still held by A and web-2's stale document removed, got {got}"
