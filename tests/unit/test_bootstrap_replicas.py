"""The sidecar bootstrap with several control-plane replicas: every replica an endpoint of ``meshpilot-xds`` (the
cluster ADS and HDS use), keepalives and a short connect timeout so a dead replica is left fast, the same TLS
check of the control plane's SPIFFE id for each, and the ``--control-plane a:p,b:p`` list that names them.
Real Envoy's failover is in tests/e2e/test_replica_failover.py."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpilot import pki
from meshpilot.translate.bootstrap import (
    XDS_CLUSTER,
    BootstrapOptions,
    build_bootstrap,
    format_control_planes,
    parse_control_planes,
)

SOCK = "/var/run/meshpilot/sds/sds.sock"


def _xds(boot: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in boot["static_resources"]["clusters"] if c["name"] == XDS_CLUSTER)


def _endpoints(cluster: dict[str, Any]) -> list[tuple[str, int]]:
    return [(e["endpoint"]["address"]["socket_address"]["address"], e["endpoint"]["address"]["socket_address"]["port_value"])
            for group in cluster["load_assignment"]["endpoints"] for e in group["lb_endpoints"]]


def test_one_address_keeps_the_bootstrap_of_one_control_plane() -> None:
    one = build_bootstrap(BootstrapOptions(node_id="n", control_plane_host="10.0.0.5", control_plane_port=15010))
    same = build_bootstrap(BootstrapOptions(node_id="n", control_planes=(("10.0.0.5", 15010),)))
    assert one == same, "a list of one replica must give the bootstrap of --control-plane HOST:PORT"
    assert _endpoints(_xds(one)) == [("10.0.0.5", 15010)] and _xds(one)["type"] == "STATIC"


def test_every_replica_is_an_endpoint_of_the_cluster_ads_and_hds_use() -> None:
    replicas = (("10.0.0.5", 15010), ("10.0.0.6", 15010), ("10.0.0.7", 16010))
    boot = build_bootstrap(BootstrapOptions(node_id="n", control_planes=replicas, hds=True))
    xds = _xds(boot)
    assert _endpoints(xds) == list(replicas), f"expected every replica in order, got {_endpoints(xds)}"
    assert xds["type"] == "STATIC" and xds["lb_policy"] == "ROUND_ROBIN"
    for config in (boot["dynamic_resources"]["ads_config"], boot["hds_config"]):
        assert config["grpc_services"][0]["envoy_grpc"]["cluster_name"] == XDS_CLUSTER
        assert "retry_policy" in config["grpc_services"][0]["envoy_grpc"], "a failed stream must be retried"


def test_a_dead_replica_is_left_fast() -> None:
    xds = _xds(build_bootstrap(BootstrapOptions(node_id="n", control_planes=(("10.0.0.5", 1), ("10.0.0.6", 2)))))
    assert xds["connect_timeout"] == "1s"
    assert xds["upstream_connection_options"]["tcp_keepalive"] == {
        "keepalive_time": 10, "keepalive_interval": 3, "keepalive_probes": 3}
    h2 = xds["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert h2["explicit_http_config"]["http2_protocol_options"]["connection_keepalive"] == {"interval": "10s", "timeout": "3s"}
    quicker = _xds(build_bootstrap(BootstrapOptions(node_id="n", connect_timeout_s=0.25)))
    assert quicker["connect_timeout"] == "0.25s"


def test_names_are_resolved_by_dns() -> None:
    xds = _xds(build_bootstrap(BootstrapOptions(node_id="n", control_planes=(("cp-0.example", 15010), ("10.0.0.6", 15010)))))
    assert xds["type"] == "STRICT_DNS", "a name among the replicas needs DNS"


def test_every_replica_is_checked_for_the_control_planes_spiffe_id() -> None:
    boot = build_bootstrap(BootstrapOptions(node_id="n", control_planes=(("10.0.0.5", 1), ("10.0.0.6", 2)),
                                            identity=True, sds_socket=SOCK, trust_domain="corp.test"))
    xds = _xds(boot)
    # one transport socket for the cluster: every endpoint is held to it
    assert not any("transport_socket_match" in str(e) for e in xds["load_assignment"]["endpoints"])
    ctx = xds["transport_socket"]["typed_config"]["common_tls_context"]["combined_validation_context"]
    assert ctx["default_validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": pki.control_plane_id("corp.test")}}]


@pytest.mark.parametrize("text,expected", [
    ("127.0.0.1:15010", (("127.0.0.1", 15010),)),
    ("cp-0:15010, cp-1:15011", (("cp-0", 15010), ("cp-1", 15011))),
    ("cp", (("cp", 15010),)),
    (":15011", (("127.0.0.1", 15011),)),
    ("[::1]:15010,::2", (("::1", 15010), ("::2", 15010))),
])
def test_parse_control_planes(text: str, expected: tuple[tuple[str, int], ...]) -> None:
    assert parse_control_planes(text) == expected


@pytest.mark.parametrize("text,says", [
    ("", "empty entry"),
    ("a:1,,b:2", "empty entry"),
    ("a:x", "not a number"),
    ("a:0", "out of range"),
    ("a:70000", "out of range"),
    ("a:1,a:1", "listed twice"),
    ("[::1", "expected [IPV6]:PORT"),
])
def test_parse_control_planes_names_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says.replace("[", r"\[")):
        parse_control_planes(text)


_host = st.one_of(st.from_regex(r"[a-z][a-z0-9-]{0,8}(\.[a-z]{2,5})?", fullmatch=True),
                  st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str))


@given(st.lists(st.tuples(_host, st.integers(1, 65535)), min_size=1, max_size=5, unique=True))
@settings(max_examples=200, deadline=None)
def test_the_list_round_trips_through_its_text(replicas: list[tuple[str, int]]) -> None:
    assert parse_control_planes(format_control_planes(tuple(replicas))) == tuple(replicas)


@given(st.text(max_size=40))
@settings(max_examples=300, deadline=None)
def test_junk_is_refused_with_a_value_error_or_parsed(text: str) -> None:
    try:
        parsed = parse_control_planes(text)
    except ValueError:
        return
    assert parsed and all(host and 0 < port < 65536 for host, port in parsed)
