"""The pure parts of ``meshpilot perf xds-envoys --peer go-control-plane`` (perf/xds_peer.py): reading
Envoy's upstream log lines, deciding when an Envoy has applied a change, picking the state meshpilot
published for a change, and the peer's resources file."""

from __future__ import annotations

import base64
import datetime

from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
from google.protobuf import any_pb2

from meshpilot.perf import xds_peer
from meshpilot.perf.xds_peer import Membership, applied_at, parse_membership, published_state, resources_file
from meshpilot.xds.resource import TYPE

SVC0 = "outbound|80||svc0.default.svc.mesh"
# lines as Envoy 1.40 writes them with --log-format LOG_FORMAT and --component-log-level upstream:debug
EDS = f"[2026-12-02 07:33:32.937864][28351][debug][upstream] EDS hosts or locality weights changed for cluster: {SVC0} current hosts 11 priority 0"
TLS_MAIN = f"[2026-12-02 07:33:32.938138][28351][debug][upstream] batch membership update for TLS cluster {SVC0} across 1 priorities"
TLS_WORKER = f"[2026-12-02 07:33:32.940241][28417][debug][upstream] batch membership update for TLS cluster {SVC0} across 1 priorities"


def _stamp(text: str) -> float:
    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f").timestamp()


def test_parse_membership_reads_eds_updates_and_thread_updates() -> None:
    got = [parse_membership(line) for line in (EDS, TLS_MAIN, TLS_WORKER + "\n")]
    want = [
        Membership(_stamp("2026-12-02 07:33:32.937864"), 28351, SVC0, 11),
        Membership(_stamp("2026-12-02 07:33:32.938138"), 28351, SVC0, None),
        Membership(_stamp("2026-12-02 07:33:32.940241"), 28417, SVC0, None),
    ]
    assert got == want, f"expected {want}, got {got}"


def test_parse_membership_ignores_other_lines() -> None:
    others = [
        f"[2026-12-02 07:31:48.158390][28351][debug][upstream] adding TLS cluster {SVC0}",
        "[2026-12-02 07:47:59.752272][7013][warning][config] gRPC config: initial fetch timed out for x",
        TLS_MAIN.replace("[debug]", "[info]"),
        "",
    ]
    got = [parse_membership(line) for line in others]
    assert got == [None] * len(others), f"expected no membership in {others}, got {got}"


def _events(*lines: str) -> list[Membership]:
    return [e for e in map(parse_membership, lines) if e is not None]


def test_applied_at_is_the_last_thread_after_the_eds_update() -> None:
    got = applied_at(_events(EDS, TLS_MAIN, TLS_WORKER), SVC0, _stamp("2026-12-02 07:33:32.0"))
    want = _stamp("2026-12-02 07:33:32.940241")
    assert got == want, f"expected the worker's stamp {want}, got {got}"


def test_applied_at_waits_for_every_thread() -> None:
    got = applied_at(_events(EDS, TLS_MAIN), SVC0, _stamp("2026-12-02 07:33:32.0"))
    assert got is None, f"expected None while the worker has not applied the update, got {got}"


def test_applied_at_ignores_what_happened_before_the_write_and_other_clusters() -> None:
    since = _stamp("2026-12-02 07:33:32.938")  # after the EDS line: this change has not been seen yet
    assert applied_at(_events(EDS, TLS_MAIN, TLS_WORKER), SVC0, since) is None, "expected lines before the write to be ignored"
    other = "outbound|80||svc1.default.svc.mesh"
    lines = [line.replace(SVC0, other) for line in (EDS, TLS_MAIN, TLS_WORKER)]
    got = applied_at(_events(*lines), SVC0, _stamp("2026-12-02 07:33:32.0"))
    assert got is None, f"expected another cluster's update not to count for {SVC0}, got {got}"


def test_applied_at_does_not_count_thread_updates_before_the_eds_update() -> None:
    early = TLS_WORKER.replace("07:33:32.940241", "07:33:32.900000")  # an earlier add of the cluster, not this change
    got = applied_at(_events(early, EDS, TLS_MAIN), SVC0, _stamp("2026-12-02 07:33:32.0"))
    assert got is None, f"expected the worker's update before the EDS update not to count, got {got}"


def _cla(name: str, *addresses: str) -> bytes:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    lo = cla.endpoints.add()
    for a in addresses:
        lo.lb_endpoints.add().endpoint.address.socket_address.address = a
    raw: bytes = cla.SerializeToString()
    return raw


def test_published_state_is_the_first_version_holding_the_address() -> None:
    history = {SVC0: [_cla(SVC0, "10.0.0.1"), _cla(SVC0, "10.0.0.1", "10.250.0.10"), _cla(SVC0, "10.0.0.1", "10.250.0.10", "10.250.0.1")]}
    got = published_state(history, SVC0, "10.250.0.1")
    assert got == history[SVC0][2], "expected the version that added 10.250.0.1, not the one holding 10.250.0.10"
    assert published_state(history, SVC0, "10.250.0.10") == history[SVC0][1], "expected the first version holding 10.250.0.10"
    assert published_state(history, SVC0, "10.250.0.2") is None, "expected None for an address never published"
    assert published_state(history, "other", "10.0.0.1") is None, "expected None for a cluster never published"


def test_resources_file_holds_each_resource_in_base64_by_type_and_node() -> None:
    shared = {TYPE.ENDPOINT: {"b": b"\x01\x02", "a": b"\x03"}, TYPE.CLUSTER: {}}
    nodes = {"peer-0": {TYPE.LISTENER: {"outbound": b"\x04"}}}
    got = resources_file(shared, nodes)
    want = {
        "shared": {TYPE.ENDPOINT: [base64.b64encode(b"\x03").decode(), base64.b64encode(b"\x01\x02").decode()]},
        "nodes": {"peer-0": {TYPE.LISTENER: [base64.b64encode(b"\x04").decode()]}},
    }
    assert got == want, f"expected {want}, got {got}"


def test_listener_names_are_its_routes_and_discovered_filters() -> None:
    hcm = http_connection_manager_pb2.HttpConnectionManager(stat_prefix="outbound")
    hcm.rds.route_config_name = "outbound"
    hcm.http_filters.add(name="meshpilot.mesh").config_discovery.type_urls.append("type.googleapis.com/x")
    hcm.http_filters.add(name="envoy.filters.http.router")
    listener = listener_pb2.Listener(name="outbound")
    listener.filter_chains.add().filters.add(name="hcm", typed_config=any_pb2.Any(type_url=xds_peer._HCM, value=hcm.SerializeToString()))
    got = xds_peer._listener_names(listener.SerializeToString())
    want = {TYPE.ROUTE: {"outbound"}, TYPE.EXTENSION_CONFIG: {"meshpilot.mesh"}}
    assert got == want, f"expected {want}, got {got}"


def test_go_peer_serves_every_type_the_capture_follows() -> None:
    main_go = (xds_peer._GO_SOURCES / "main.go").read_text()
    for go_name in ("ClusterType", "EndpointType", "ListenerType", "RouteType", "ExtensionConfigType"):
        assert f"resource.{go_name}" in main_go, f"expected gcp_peer/main.go to accept resource.{go_name}"
