"""The HDS core without I/O: node metadata → registration and specifier, a stream's messages →
registry updates, reports → check status, lost streams → critical then removed."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.core.v3 import health_check_pb2
from envoy.service.health.v3 import hds_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpilot.hds.liveness import Liveness
from meshpilot.hds.metadata import HdsError, registration
from meshpilot.hds.specifier import build_specifier, health_token
from meshpilot.hds.stream import HdsSession, HdsStream, Register, Reject, Send, SetCheck
from meshpilot.hds.synced import synced
from meshpilot.model import Check, CheckStatus, Instance, Service, ServicePort
from meshpilot.xds.resource import node_info


def _md(**over: Any) -> dict[str, Any]:
    md: dict[str, Any] = {
        "SERVICE": "b", "NAMESPACE": "default", "INBOUND_PORT": 15006, "APP_PORT": 8080, "OUTBOUND_PORT": 15001,
        "PORT_NAME": "http", "LABELS": {"version": "v2"}, "WEIGHT": 50,
        "HEALTH_CHECK": {"kind": "http", "path": "/healthz", "interval_s": 0.5, "timeout_s": 0.25,
                         "healthy_threshold": 1, "unhealthy_threshold": 2},
    }
    md.update(over)
    return md


def test_registration_from_node_metadata() -> None:
    reg = registration(node_info("b-1", "b", _md(), "z1"))
    inst = reg.instance
    got = (inst.id, inst.service, inst.address, inst.ports, inst.zone, inst.weight, inst.labels, inst.source)
    want = ("b-1", "b", "127.0.0.1", {"http": 15006}, "z1", 50, {"version": "v2"}, "mesh")
    assert got == want, f"expected {want}, got {got}"
    assert [(c.id, c.owner, c.status) for c in inst.checks] == [("hds", "hds", CheckStatus.critical)], inst.checks
    assert not inst.routable, "a new sidecar instance must not be routable before its first healthy report"
    # HTTP checks go through the inbound listener, TCP ones straight to the app
    assert (reg.plan.address, reg.plan.port, reg.plan.path) == ("127.0.0.1", 15006, "/healthz"), reg.plan
    tcp = registration(node_info("b-1", "b", _md(HEALTH_CHECK={"kind": "tcp"}, APP_ADDRESS="127.0.0.5")))
    assert (tcp.plan.kind, tcp.plan.address, tcp.plan.port) == ("tcp", "127.0.0.5", 8080), tcp.plan


def test_specifier_sets_every_interval_explicitly() -> None:
    reg = registration(node_info("b-1", "b", _md()))
    spec = build_specifier(reg, 0.5)
    assert spec.interval.ToMilliseconds() == 500, f"report interval: expected 500 ms, got {spec.interval}"
    (chc,) = spec.cluster_health_checks
    (hc,) = chc.health_checks
    got = {
        "interval": hc.interval.ToMilliseconds(), "timeout": hc.timeout.ToMilliseconds(),
        "no_traffic": hc.no_traffic_interval.ToMilliseconds(), "healthy": hc.healthy_threshold.value,
        "unhealthy": hc.unhealthy_threshold.value, "path": hc.http_health_check.path,
    }
    want = {"interval": 500, "timeout": 250, "no_traffic": 500, "healthy": 1, "unhealthy": 2, "path": "/healthz"}
    assert got == want, f"expected {want}, got {got}"
    ep = chc.locality_endpoints[0].endpoints[0].address.socket_address
    assert (ep.address, ep.port_value) == ("127.0.0.1", 15006), ep


@pytest.mark.parametrize(
    "over,field",
    [
        ({"SERVICE": ""}, "SERVICE"),
        ({"INBOUND_PORT": 0}, "INBOUND_PORT"),
        ({"APP_PORT": "x"}, "APP_PORT"),
        ({"BIND_ADDRESS": "0.0.0.0"}, "ADVERTISE_ADDRESS"),
        ({"HEALTH_CHECK": {"kind": "grpc"}}, "HEALTH_CHECK.kind"),
        ({"HEALTH_CHECK": {"kind": "http", "path": "healthz"}}, "HEALTH_CHECK.path"),
        ({"HEALTH_CHECK": {"interval_s": -1}}, "HEALTH_CHECK.interval_s"),
        ({"HEALTH_CHECK": {"timeout_s": "soon"}}, "HEALTH_CHECK.timeout_s"),
        ({"HEALTH_CHECK": []}, "HEALTH_CHECK"),
        ({"LABELS": {"a": 1}}, "LABELS"),
        ({"PORT_NAME": 7}, "PORT_NAME"),
    ],
)
def test_bad_metadata_is_rejected_naming_the_field(over: dict[str, Any], field: str) -> None:
    with pytest.raises(HdsError) as err:
        registration(node_info("b-1", "b", _md(**over)))
    assert err.value.field == field, f"expected the error to name {field}, got {err.value.field} ({err.value})"


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=10,
)
_keys = st.sampled_from(["SERVICE", "NAMESPACE", "INBOUND_PORT", "APP_PORT", "BIND_ADDRESS", "ADVERTISE_ADDRESS",
                         "PORT_NAME", "LABELS", "WEIGHT", "HEALTH_CHECK", "APP_ADDRESS"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_keys, _json, max_size=8), st.text(max_size=20))
def test_junk_metadata_gives_a_registration_or_a_named_error(md: dict[str, Any], node_id: str) -> None:
    try:
        reg = registration(node_info(node_id, "c", md))
    except HdsError as exc:
        assert exc.field and str(exc).startswith("node.metadata."), exc
        return
    build_specifier(reg, 1.0).SerializeToString()
    assert reg.instance.ports and reg.plan.port > 0


def _report(cluster: str, status: int) -> hds_pb2.EndpointHealthResponse:
    r = hds_pb2.EndpointHealthResponse()
    c = r.cluster_endpoints_health.add(cluster_name=cluster)
    c.locality_endpoints_health.add().endpoints_health.add(health_status=status)
    return r


def test_first_unhealthy_of_a_young_stream_is_not_news() -> None:
    reg = registration(node_info("b-1", "b", _md()))  # cycle 0.75 s
    s = HdsSession(reg, started=100.0)
    H, U = health_check_pb2.HEALTHY, health_check_pb2.UNHEALTHY
    seq = [(100.5, U), (101.0, H), (101.5, H), (102.0, U), (102.5, U), (103.0, H)]
    got = [s.report(_report(reg.cluster, st_), t) for t, st_ in seq]
    want = [None, CheckStatus.passing, None, CheckStatus.critical, None, CheckStatus.passing]
    assert got == want, f"expected {want}, got {got}"
    # once the stream is older than a cycle, an unhealthy app is news even without a healthy report
    s2 = HdsSession(reg, started=100.0)
    assert s2.report(_report(reg.cluster, U), 100.9) is CheckStatus.critical
    # reports for other clusters say nothing
    assert s2.report(_report("hds|other", H), 101.0) is None


def test_a_resumed_sidecar_gets_time_to_warm_its_listeners() -> None:
    """After an Envoy restart the instance stays as it was while the new Envoy warms up."""
    reg = registration(node_info("b-1", "b", _md()))
    U, H = health_check_pb2.UNHEALTHY, health_check_pb2.HEALTHY
    s = HdsSession(reg, started=100.0, resumed=True, warmup_s=10.0)
    assert [s.report(_report(reg.cluster, U), t) for t in (101.0, 105.0, 109.9)] == [None, None, None]
    assert s.report(_report(reg.cluster, U), 110.1) is CheckStatus.critical, "warm-up is bounded"
    s2 = HdsSession(reg, started=100.0, resumed=True, warmup_s=10.0)
    assert s2.report(_report(reg.cluster, H), 103.0) is CheckStatus.passing
    assert s2.report(_report(reg.cluster, U), 104.0) is CheckStatus.critical, "after a healthy report, failures count at once"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 5), st.sampled_from([0, 1, 2, 3, 4, 5])), max_size=30))
def test_session_emits_only_changes(reports: list[tuple[float, int]]) -> None:
    reg = registration(node_info("b-1", "b", _md()))
    s = HdsSession(reg, started=0.0)
    t = 0.0
    emitted = []
    for dt, status in reports:
        t += dt
        out = s.report(_report(reg.cluster, status), t)
        if out is not None:
            emitted.append(out)
    assert all(a != b for a, b in zip(emitted, emitted[1:])), f"repeated status emitted: {emitted}"


def test_liveness_marks_critical_then_removes() -> None:
    lv = Liveness(critical_after_s=45, remove_after_s=300)
    lv.opened("a")
    lv.opened("a")  # a second stream from the same node (Envoy hot restart)
    lv.closed("a", 0.0)
    assert lv.due(100.0) == ([], []), "a node with a stream left is alive"
    lv.closed("a", 10.0)
    assert lv.due(54.0) == ([], []), "within the grace period nothing happens"
    assert lv.due(55.0) == (["a"], []), "after the grace period the instance turns critical"
    assert lv.due(56.0) == ([], []), "critical is reported once"
    lv.opened("a")
    lv.closed("a", 60.0)
    assert lv.due(106.0) == (["a"], []), "a reconnect resets the clock"
    assert lv.due(360.0) == ([], ["a"]), "after the removal period the instance goes"
    assert lv.due(1000.0) == ([], []), "removal happens once"


def test_dead_sidecar_goes_critical_once_both_streams_have_been_closed_for_the_short_grace() -> None:
    lv = Liveness(critical_after_s=45, remove_after_s=300, dead_after_s=5)
    for n in ("dead", "hds-only", "late-ads", "back"):
        lv.opened(n)
        lv.ads_changed(n, True, 0.0)
    for n in ("dead", "hds-only", "late-ads", "back"):
        lv.closed(n, 10.0)
    lv.ads_changed("dead", False, 10.0)  # kill -9: both streams close at once
    lv.ads_changed("late-ads", False, 12.0)  # ADS noticed closed 2 s later
    lv.ads_changed("back", False, 10.0)  # a restarted Envoy reconnects both within the grace
    lv.ads_changed("back", True, 11.0)
    lv.opened("back")
    assert lv.due(14.9) == ([], []), "within the short grace nothing happens"
    assert lv.due(15.0) == (["dead"], []), "both streams closed for 5 s: critical"
    assert lv.due(16.9) == ([], []), "the short grace counts from the later of the two closes"
    assert lv.due(17.0) == (["late-ads"], []), "ADS closed at 12 s: critical at 17 s"
    assert lv.due(54.9) == ([], []), "an Envoy whose ADS stream stays open keeps the long grace"
    assert lv.due(55.0) == (["hds-only"], []), "HDS alone lost: critical after the long grace"


def test_instances_absent_at_start_keep_the_long_grace() -> None:
    """After a control-plane restart no stream of this process ever closed: every sidecar gets the
    long grace to reconnect, even with no ADS stream yet."""
    lv = Liveness(critical_after_s=45, remove_after_s=300, dead_after_s=5)
    lv.lost_at["old"] = 0.0
    assert lv.due(44.0) == ([], []), "expected no critical within the long grace for an instance never seen closing"
    assert lv.due(45.0) == (["old"], [])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["hds_open", "hds_close", "ads_open", "ads_close", "sweep"]),
                          st.floats(0, 3, allow_nan=False)), max_size=40))
def test_never_critical_while_a_stream_is_open_or_before_a_grace_has_passed(events: list[tuple[str, float]]) -> None:
    lv = Liveness(critical_after_s=45, remove_after_s=300, dead_after_s=5)
    lv.opened("n")
    lv.ads_changed("n", True, 0.0)
    now, hds, ads = 0.0, 1, True
    hds_lost, ads_lost = None, None
    for kind, dt in events:
        now += dt
        if kind == "hds_open":
            lv.opened("n")
            hds, hds_lost = hds + 1, None
        elif kind == "hds_close" and hds > 0:
            lv.closed("n", now)
            hds -= 1
            hds_lost = now if hds == 0 else hds_lost
        elif kind == "ads_open":
            lv.ads_changed("n", True, now)
            ads, ads_lost = True, None
        elif kind == "ads_close":
            lv.ads_changed("n", False, now)
            ads, ads_lost = False, now
        elif kind == "sweep":
            critical, _ = lv.due(now)
            if critical:
                assert hds == 0 and hds_lost is not None, f"critical with an open HDS stream at {now}: {events}"
                both = max(hds_lost, ads_lost) if not ads and ads_lost is not None else None
                assert now - hds_lost >= 45 or (both is not None and now - both >= 5), (
                    f"critical at {now} though HDS lost at {hds_lost}, ADS lost at {ads_lost} (open={ads}): {events}")


def test_http_check_carries_the_node_health_token() -> None:
    reg = registration(node_info("b-1", "b", _md()))
    token = health_token(b"k" * 32, "b-1")
    hc = build_specifier(reg, 1.0, token).cluster_health_checks[0].health_checks[0]
    got = [(h.header.key, h.header.value) for h in hc.http_health_check.request_headers_to_add]
    assert got == [("x-mesh-health-check", token)], f"expected the check to carry the node's token, got {got}"
    assert len(token) == 32 and token == health_token(b"k" * 32, "b-1"), f"expected a stable 32-hex token, got {token!r}"
    others = {health_token(b"k" * 32, "b-2"), health_token(b"j" * 32, "b-1")}
    assert token not in others, "expected another node or another key to give another token"
    tcp = registration(node_info("b-1", "b", _md(HEALTH_CHECK={"kind": "tcp"})))
    assert build_specifier(tcp, 1.0, token).cluster_health_checks[0].health_checks[0].HasField("tcp_health_check")


def _hello(node_id: str = "b-1", **md: Any) -> hds_pb2.HealthCheckRequestOrEndpointHealthResponse:
    msg = hds_pb2.HealthCheckRequestOrEndpointHealthResponse()
    node = msg.health_check_request.node
    node.id = node_id
    node.cluster = "b"
    node.metadata.update(_md(**md))
    return msg


def _reported(cluster: str, status: int) -> hds_pb2.HealthCheckRequestOrEndpointHealthResponse:
    msg = hds_pb2.HealthCheckRequestOrEndpointHealthResponse()
    msg.endpoint_health_response.CopyFrom(_report(cluster, status))
    return msg


_NOTHING: dict[str, Instance] = {}


def _kinds(effects: list[Any]) -> list[str]:
    return [type(e).__name__ for e in effects]


def test_stream_registers_sends_the_specifier_then_turns_reports_into_checks() -> None:
    stream = HdsStream(2.0, lambda node_id: f"token-of-{node_id}")
    stored: dict[str, Instance] = {}
    effects = stream.receive(_hello(), 100.0, stored.get)
    assert _kinds(effects) == ["Register", "Send"], f"expected the node registered then its specifier sent, got {_kinds(effects)}"
    reg, send = effects
    assert isinstance(reg, Register) and isinstance(send, Send)
    assert reg.instance.id == "b-1" and [c.status for c in reg.instance.checks] == [CheckStatus.critical], reg.instance
    assert send.specifier == build_specifier(reg.registration, 2.0, "token-of-b-1"), "expected the node's own specifier and token"
    stored["b-1"] = reg.instance
    cluster = reg.registration.cluster
    got = stream.receive(_reported(cluster, health_check_pb2.HEALTHY), 101.0, stored.get)
    assert got == [SetCheck("b-1", Check(id="hds", owner="hds", status=CheckStatus.passing, output="health check passing"))], got
    assert stream.receive(_reported(cluster, health_check_pb2.HEALTHY), 102.0, stored.get) == [], "the same status again is no news"
    assert stream.receive(_hello(), 102.5, stored.get) == [], "a later request changes nothing"
    del stored["b-1"]  # graceful offline deregistered it
    assert stream.receive(_reported(cluster, health_check_pb2.UNHEALTHY), 103.0, stored.get) == [], \
        "expected reports of a deregistered instance to write nothing"


def test_a_reconnecting_sidecar_keeps_its_check_and_warms_up() -> None:
    first = HdsStream(1.0, lambda node_id: "")
    reg = first.receive(_hello(), 0.0, _NOTHING.get)[0]
    assert isinstance(reg, Register)
    passing = reg.instance.model_copy(update={"checks": [Check(id="hds", owner="hds", status=CheckStatus.passing)], "ever_passed": True})
    again = HdsStream(1.0, lambda node_id: "")
    effects = again.receive(_hello(), 50.0, {"b-1": passing}.get)
    assert isinstance(effects[0], Register) and effects[0].instance.checks == [], \
        f"expected a reconnect to keep the stored hds check (no checks in the write), got {effects[0]}"
    assert again.session is not None and again.session.resumed, "expected a passing instance's reconnect to be a resume"


@pytest.mark.parametrize("first,reason", [
    (hds_pb2.HealthCheckRequestOrEndpointHealthResponse(), "carrying node.id"),
    (_hello(SERVICE=""), "node.metadata.SERVICE"),
    (_hello(HEALTH_CHECK={"kind": "udp"}), "node.metadata.HEALTH_CHECK.kind"),
])
def test_a_bad_first_message_is_rejected_and_ends_the_stream(first: Any, reason: str) -> None:
    stream = HdsStream(1.0, lambda node_id: "")
    effects = stream.receive(first, 0.0, _NOTHING.get)
    assert len(effects) == 1 and isinstance(effects[0], Reject) and reason in effects[0].reason, \
        f"expected one rejection naming {reason!r}, got {effects}"
    assert stream.receive(_hello(), 1.0, _NOTHING.get) == [], "expected nothing more from a rejected stream"


_MESSAGES = st.one_of(
    st.builds(_hello, st.sampled_from(["b-1", "b-2", ""])),
    st.builds(_reported, st.sampled_from(["hds|b-1", "hds|b-2"]), st.sampled_from([0, 1, 2, 3, 4, 5])),
    st.just(hds_pb2.HealthCheckRequestOrEndpointHealthResponse()),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 3), _MESSAGES), max_size=25), st.booleans())
def test_any_message_order_keeps_the_stream_machine_consistent(events: list[tuple[float, Any]], deregister: bool) -> None:
    """Whatever arrives: the first message registers (then sends) or rejects; checks are set only
    for the registered instance, only while it is stored, and never twice with the same status."""
    stream = HdsStream(1.0, lambda node_id: "")
    stored: dict[str, Instance] = {}
    t, kinds, statuses = 0.0, [], []
    for n, (dt, msg) in enumerate(events):
        t += dt
        for effect in stream.receive(msg, t, stored.get):
            kinds.append(type(effect).__name__)
            if isinstance(effect, Register):
                stored[effect.instance.id] = effect.instance
            elif isinstance(effect, SetCheck):
                assert effect.instance_id in stored, f"a check was set on {effect.instance_id}, which is not stored"
                statuses.append(effect.check.status)
        if deregister and n == len(events) // 2:
            stored.clear()
    if kinds:
        assert kinds[:2] == ["Register", "Send"] or kinds == ["Reject"], f"expected register+send or one rejection first, got {kinds}"
        assert kinds.count("Register") <= 1 and kinds.count("Send") <= 1, f"expected one registration per stream, got {kinds}"
    assert all(a != b for a, b in zip(statuses, statuses[1:])), f"repeated status set: {statuses}"


def test_synced_counts_consumers_and_names_the_pending_nodes() -> None:
    assert synced([]) == {"synced": True, "consumers": 0, "pending": []}, "no consumer: nothing to wait for"
    got = synced([("a", True), ("b", False), ("b", False), ("c", True)])
    assert got == {"synced": False, "consumers": 4, "pending": ["b"]}, f"expected b pending among 4 streams, got {got}"


async def test_synced_answers_not_yet_while_a_change_waits_and_polling_it_publishes_nothing() -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from meshpilot.controlplane import ControlPlane
    from meshpilot.hds.plugin import install
    from meshpilot.settings import Settings

    cp = ControlPlane(Settings(store="memory:", consul_port=None, eureka_port=None))
    cp.include(install(cp))
    cp.registry.put_service(Service(name="web", ports=(ServicePort(name="http", port=80),)))
    cp.flush()
    client = TestClient(TestServer(cp.api_app()))
    await client.start_server()
    try:
        r = await client.get("/v1/services/default/web/synced")
        body = await r.json()
        assert r.status == 200 and body["synced"] and not body["publishing"], f"expected synced with nothing pending, got {r.status} {body}"
        cp.registry.put_service(Service(name="web", ports=(ServicePort(name="http", port=81),)))
        for _ in range(20):  # a sidecar's graceful offline polls this
            r = await client.get("/v1/services/default/web/synced")
            body = await r.json()
            assert not body["synced"] and body["publishing"], f"expected not synced while the change waits, got {body}"
        assert cp.publishing("web.default"), "expected polling /synced to leave the change to the debounce, not publish it"
        cp.flush()
        body = await (await client.get("/v1/services/default/web/synced")).json()
        assert body["synced"] and not body["publishing"], f"expected synced once published (no consumer), got {body}"
    finally:
        await client.close()
