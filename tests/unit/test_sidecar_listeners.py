"""Sidecar listeners: per-VIP capture chains, caller-header stripping for unknown peers, access logs,
traffic direction; checked structurally (Envoy's verdict on them: tests/e2e/test_envoy_validates_translations.py)."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from meshpilot.model import Service, ServicePort
from meshpilot.translate.listeners import build_inbound_listener, build_inbound_routes, build_outbound_listener
from meshpilot.xds.resource import NodeInfo

SERVICES = [
    Service(name="web", ports=[ServicePort(name="http", port=80)], vip="240.240.0.10"),
    Service(name="db", ports=[ServicePort(name="tcp", port=5432, protocol="tcp")], vip="240.240.0.11"),
    Service(name="api", namespace="prod", ports=[ServicePort(name="grpc", port=9000, protocol="grpc"),
                                                 ServicePort(name="http", port=8080)], vip="240.240.0.12"),
]
NODE = NodeInfo(id="n1", service="web", outbound_port=15001, inbound_port=15006, app_port=9999, capture=True)


def _js(msg: Any) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def _filters(chain: dict[str, Any]) -> list[str]:
    cfg = chain["filters"][0]["typed_config"]
    return [f["name"] for f in cfg.get("http_filters", [])]


def test_capture_listener_has_one_chain_per_vip_port() -> None:
    lst = _js(build_outbound_listener(NODE, (), SERVICES, "mesh"))
    assert lst["traffic_direction"] == "OUTBOUND", lst.get("traffic_direction")
    assert [f["name"] for f in lst["listener_filters"]] == ["envoy.filters.listener.original_dst"], lst["listener_filters"]
    got = sorted(
        (c["filter_chain_match"]["prefix_ranges"][0]["address_prefix"], c["filter_chain_match"]["destination_port"],
         c["filters"][0]["name"].rsplit(".", 1)[-1])
        for c in lst["filter_chains"]
    )
    want = [("240.240.0.10", 80, "http_connection_manager"), ("240.240.0.11", 5432, "tcp_proxy"),
            ("240.240.0.12", 8080, "http_connection_manager"), ("240.240.0.12", 9000, "http_connection_manager")]
    assert got == want, f"expected {want}, got {got}"
    tcp = next(c for c in lst["filter_chains"] if c["filters"][0]["name"].endswith("tcp_proxy"))
    assert tcp["filters"][0]["typed_config"]["cluster"] == "outbound|5432||db.default.svc.mesh", tcp
    assert "default_filter_chain" in lst, "apps calling the outbound port by Host need the default chain"
    plain = _js(build_outbound_listener(NodeInfo(id="n2", service="web", outbound_port=15001), (), SERVICES))
    assert "listener_filters" not in plain and len(plain["filter_chains"]) == 1, "no capture: one plain chain"


def test_inbound_strips_caller_header_from_unknown_peers() -> None:
    lst = _js(build_inbound_listener(NODE, (), ["127.0.0.1", "10.0.0.7"]))
    assert lst["traffic_direction"] == "INBOUND", lst.get("traffic_direction")
    (trusted,) = lst["filter_chains"]
    got = sorted(r["address_prefix"] for r in trusted["filter_chain_match"]["source_prefix_ranges"])
    assert got == ["10.0.0.7", "127.0.0.1"], got
    assert "mesh.caller-strip" not in _filters(trusted), _filters(trusted)
    assert _filters(lst["default_filter_chain"])[0] == "mesh.caller-strip", _filters(lst["default_filter_chain"])
    nobody = _js(build_inbound_listener(NODE, (), []))
    assert not nobody.get("filter_chains") and _filters(nobody["default_filter_chain"])[0] == "mesh.caller-strip"
    legacy = _js(build_inbound_listener(NODE))
    assert "mesh.caller-strip" not in _filters(legacy["filter_chains"][0]), "no peer list: header kept"


def test_access_logs_name_source_and_destination() -> None:
    out = _js(build_outbound_listener(NODE, (), SERVICES))
    tcp = next(c for c in out["filter_chains"] if c["filters"][0]["name"].endswith("tcp_proxy"))
    fmt = tcp["filters"][0]["typed_config"]["access_log"][0]["typed_config"]["log_format"]["json_format"]
    assert (fmt["source_service"], fmt["destination_service"]) == ("web.default", "db.default"), fmt
    inbound = _js(build_inbound_listener(NODE, (), ["127.0.0.1"]))
    fmt = inbound["filter_chains"][0]["filters"][0]["typed_config"]["access_log"][0]["typed_config"]["log_format"]["json_format"]
    assert (fmt["source_service"], fmt["destination_service"]) == ("%REQ(x-mesh-caller)%", "web.default"), fmt


def test_health_checks_take_a_route_past_the_governance_filters() -> None:
    gov = "meshpilot.governance.inbound"
    routes = _js(build_inbound_routes(NODE, (), "t0k3n", [gov]))
    (vh,) = routes["virtual_hosts"]
    health, rest = vh["routes"]
    assert health["match"]["headers"] == [{"name": "x-mesh-health-check", "string_match": {"exact": "t0k3n"}}], health["match"]
    assert health["typed_per_filter_config"][gov].get("disabled") is True, f"expected the health route to skip {gov}: {health}"
    assert health["request_headers_to_remove"] == ["x-mesh-health-check"], "the token must not reach the app"
    assert health["route"] == rest["route"], "health checks must reach the same app as callers"
    assert gov not in rest.get("typed_per_filter_config", {}) and gov not in vh.get("typed_per_filter_config", {}), (
        f"expected callers' requests to run {gov} while a limit applies, got {vh}")
    plain = _js(build_inbound_routes(NODE, [gov]))["virtual_hosts"][0]
    assert [r["name"] for r in plain["routes"]] == ["inbound"], "without a token there is no health route"
