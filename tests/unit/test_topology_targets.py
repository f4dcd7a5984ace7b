"""The Prometheus targets the control plane keeps (file_sd / http_sd) and the sidecar's read-only stats listener."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from meshpilot.topology.targets import file_sd, sidecar_target, stats_port, write_file_sd
from meshpilot.translate.bootstrap import ADMIN_CLUSTER, STATS_LISTENER, STATS_PORT_META, BootstrapOptions, build_bootstrap
from meshpilot.xds.resource import NodeInfo, node_info


def node(node_id: str, service: str = "web", port: object = 15090, zone: str = "", **meta: object) -> NodeInfo:
    md = {"SERVICE": service, "NAMESPACE": "shop", "BIND_ADDRESS": "10.0.0.5", STATS_PORT_META: port, **meta}
    return node_info(node_id, service, md, zone=zone)


def test_a_sidecar_target_names_its_stats_listener_with_the_labels_operators_filter_by() -> None:
    got = sidecar_target(node("web-1", zone="eu-1"))
    assert got == {"targets": ["10.0.0.5:15090"], "labels": {
        "kind": "sidecar", "service": "web", "namespace": "shop", "node": "web-1", "zone": "eu-1",
        "instance": "10.0.0.5:15090", "__metrics_path__": "/stats/prometheus"}}, f"expected web-1's target, got {got}"


def test_the_advertised_address_wins_and_ipv6_is_bracketed() -> None:
    got = sidecar_target(node("web-1", ADVERTISE_ADDRESS="fd00::7"))
    assert got is not None and got["targets"] == ["[fd00::7]:15090"], f"expected the advertised IPv6 address, got {got}"


@pytest.mark.parametrize("port", [0, None, "junk", -1, 70000, True, [15090]])
def test_a_node_without_a_usable_stats_port_has_no_target(port: object) -> None:
    n = node("web-1", port=port)
    assert stats_port(n) == 0 and sidecar_target(n) is None, f"expected no target for STATS_PORT={port!r}, got {sidecar_target(n)}"


def test_a_wildcard_bind_address_without_an_advertised_one_is_not_a_target() -> None:
    got = sidecar_target(node("web-1", BIND_ADDRESS="0.0.0.0"))
    assert got is None, f"expected no target Prometheus could not reach, got {got}"


def test_file_sd_lists_the_replicas_then_the_sidecars_sorted_and_skips_junk_records() -> None:
    replicas = [("r2", {"api": ["10.0.0.2", 15014]}), ("r1", {"api": ["10.0.0.1", 15014]}), ("bad", {"api": "x"}),
                ("wild", {"api": ["0.0.0.0", 15014]})]
    nodes = [node("b", "api", 15091), node("a", "web", 15090), node("no-stats", "web", 0)]
    got = file_sd(nodes, replicas)
    assert [g["targets"][0] for g in got] == ["10.0.0.1:15014", "10.0.0.2:15014", "10.0.0.5:15090", "10.0.0.5:15091"], \
        f"expected two replicas then two sidecars in address order, got {got}"
    assert got[0]["labels"] == {"kind": "controlplane", "service": "meshpilot", "node": "r1", "instance": "10.0.0.1:15014",
                                "__metrics_path__": "/metrics"}, f"expected the replica's labels, got {got[0]}"
    assert file_sd(reversed(nodes), reversed(replicas)) == got, "expected the same document whatever order the inputs come in"


def test_the_file_is_replaced_whole_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "sd" / "mesh.json"
    write_file_sd(path, file_sd([node("a")], []))
    write_file_sd(path, [])
    assert json.loads(path.read_text()) == [], f"expected the second document, got {path.read_text()}"
    assert [p.name for p in path.parent.iterdir()] == ["mesh.json"], f"expected only the file, got {list(path.parent.iterdir())}"


def test_the_stats_listener_serves_only_get_stats_prometheus_from_the_loopback_admin() -> None:
    boot = build_bootstrap(BootstrapOptions(node_id="n", service="web", admin_port=15000, stats_port=15090, bind_address="10.0.0.5"))
    assert boot["node"]["metadata"][STATS_PORT_META] == 15090, f"expected the port in the node metadata, got {boot['node']['metadata']}"
    assert boot["admin"]["address"]["socket_address"]["address"] == "127.0.0.1", "expected the admin to stay on loopback"
    [listener] = boot["static_resources"]["listeners"]
    assert listener["name"] == STATS_LISTENER and listener["address"]["socket_address"] == {"address": "10.0.0.5", "port_value": 15090}
    routes = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    assert [r["match"] for r in routes] == [
        {"path": "/stats/prometheus", "headers": [{"name": ":method", "string_match": {"safe_regex": {"regex": "GET|HEAD"}}}]},
        {"prefix": "/"}], f"expected one exact route and a catch-all, got {routes}"
    assert routes[0]["route"]["cluster"] == ADMIN_CLUSTER and routes[1]["direct_response"]["status"] == 404
    admin = [c for c in boot["static_resources"]["clusters"] if c["name"] == ADMIN_CLUSTER]
    assert admin and admin[0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] == \
        {"address": "127.0.0.1", "port_value": 15000}, f"expected the admin cluster to reach the loopback admin, got {admin}"


def test_without_a_stats_port_there_is_no_listener_and_an_os_chosen_admin_port_is_refused() -> None:
    boot = build_bootstrap(BootstrapOptions(node_id="n", admin_port=0))
    assert "listeners" not in boot["static_resources"] and STATS_PORT_META not in boot["node"]["metadata"]
    with pytest.raises(ValueError, match="stats_port"):
        build_bootstrap(BootstrapOptions(node_id="n", admin_port=0, stats_port=15090))


def _spec(sidecar: str) -> Any:
    from meshpilot.sidecar.spec import load_spec

    return load_spec(f"""
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  ports: [{{name: http, port: 80, targetPort: 9080}}]
mesh:
  sidecar: {sidecar}
""")


@pytest.mark.parametrize(("sidecar", "want"), [
    ("{}", 15090),  # the stock admin port: Istio's stats port
    ("{adminPort: 15100, statsPort: 15190}", 15190),
    ("{statsPort: 0}", 0),  # off
    ("{adminPort: 0}", 0),  # an OS-chosen admin port (several sidecars on one machine): no stats listener unless asked
])
def test_the_sidecar_spec_decides_the_stats_port(sidecar: str, want: int) -> None:
    from meshpilot.sidecar.render import SidecarOptions, bootstrap_options

    got = bootstrap_options(_spec(sidecar), SidecarOptions(node_id="web-1"))
    assert got.stats_port == want, f"expected stats port {want} for mesh.sidecar {sidecar}, got {got.stats_port}"


def test_a_stats_port_with_an_os_chosen_admin_port_is_refused_naming_the_field() -> None:
    from meshpilot.sidecar.render import SidecarOptions, bootstrap_options

    with pytest.raises(ValueError, match=r"^mesh\.sidecar\.statsPort: "):
        bootstrap_options(_spec("{adminPort: 0, statsPort: 15090}"), SidecarOptions(node_id="web-1"))


def test_the_inbound_listener_counts_requests_without_a_callers_sidecar_by_peer_but_not_health_checks() -> None:
    from google.protobuf import json_format

    from meshpilot.translate.listeners import build_inbound_listener
    from meshpilot.xds.resource import NodeInfo

    lst = json_format.MessageToDict(build_inbound_listener(
        NodeInfo(id="web-1", service="web", inbound_port=15006, app_port=8080), trusted_peers=["10.0.0.7"]))
    logs = lst["filterChains"][0]["filters"][0]["typedConfig"]["accessLog"]
    stats = [log for log in logs if log["name"] == "envoy.access_loggers.stats"]
    assert len(stats) == 1, f"expected one stats access logger on the inbound listener, got {logs}"
    cfg = stats[0]["typedConfig"]
    [counter] = cfg["counters"]
    tags = {t["name"]: t["valueFormat"] for t in counter["stat"]["tags"]}
    assert (cfg["statPrefix"], counter["stat"]["name"]) == ("meshpilot", "direct_requests") and tags == {
        "destination_service": "web.default", "peer": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", "response_code": "%RESPONSE_CODE%",
    }, f"expected envoy_meshpilot_direct_requests by destination, peer and code, got {cfg}"
    expression = stats[0]["filter"]["extensionFilter"]["typedConfig"]["expression"]
    assert expression == "xds.route_name != 'health' && !('x-mesh-caller' in request.headers)", \
        f"expected only requests without a caller header and outside the health route, got {expression!r}"


def test_merged_documents_list_each_target_once_in_file_sd_order_and_drop_junk() -> None:
    from meshpilot.topology.targets import merge_file_sd

    here = file_sd([node("a", "web", 15090)], [("r1", {"api": ["10.0.0.1", 15014]}), ("r2", {"api": ["10.0.0.2", 15014]})])
    there = file_sd([node("b", "api", 15091, BIND_ADDRESS="10.0.0.6")], [("r2", {"api": ["10.0.0.2", 15014]}), ("r1", {"api": ["10.0.0.1", 15014]})])
    junk = [{"targets": ["x:1", "y:2"], "labels": {}}, {"targets": ["z:1"], "labels": {"a": 1}}, "nope", {"labels": {}}]
    got = merge_file_sd([here, there, junk, {"not": "a list"}])
    assert [g["targets"][0] for g in got] == ["10.0.0.1:15014", "10.0.0.2:15014", "10.0.0.5:15090", "10.0.0.6:15091"], \
        f"expected both replicas once, then both replicas' sidecars, without the junk, got {got}"
    assert got == file_sd([node("a", "web", 15090), node("b", "api", 15091, BIND_ADDRESS="10.0.0.6")],
                          [("r1", {"api": ["10.0.0.1", 15014]}), ("r2", {"api": ["10.0.0.2", 15014]})]), \
        "expected the merge to equal one replica holding every sidecar"
