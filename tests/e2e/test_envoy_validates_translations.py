"""What meshpilot builds for Envoy is accepted by real Envoy (``envoy --mode validate``): the resources
translate/ builds for generated registries, routes with every routing-overlay feature, a sidecar's capture
and inbound listeners, the bootstrap the sidecar agent renders from spec.yaml and the health check HDS
sends. The unit tests check the same builders' shapes; these check Envoy's verdict on them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshpilot.hds.metadata import registration
from meshpilot.hds.specifier import build_specifier
from meshpilot.model import Check, Instance, Outlier, Service, ServicePort, Traffic
from meshpilot.sidecar.render import SidecarOptions, render_bootstrap
from meshpilot.sidecar.spec import load_spec
from meshpilot.translate.bootstrap import BootstrapOptions, build_bootstrap
from meshpilot.translate.clusters import build_cluster, build_clusters, build_inbound_cluster
from meshpilot.translate.endpoints import build_endpoints
from meshpilot.translate.listeners import build_inbound_listener, build_inbound_routes, build_outbound_listener
from meshpilot.translate.routes import FAULT_FILTER, Fault, HeaderMatch, RouteRule, build_outbound_routes
from meshpilot.xds.resource import NodeInfo, node_info
from tests.support import assert_envoy_accepts
from tests.unit.test_hds import _md
from tests.unit.test_routes import SPLIT, WEB, routing
from tests.unit.test_sidecar_listeners import NODE, SERVICES
from tests.unit.test_sidecar_spec import GOOD


def _js(msg: Any) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


# ---- generated registries ---------------------------------------------------------------------

label = st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True)
traffic = st.builds(
    Traffic,
    timeout_ms=st.integers(0, 60_000),
    connect_timeout_ms=st.integers(1, 10_000),
    retries=st.integers(0, 5),
    retry_on=st.sampled_from(["connect-failure,refused-stream,reset", "5xx", "gateway-error,reset"]),
    per_try_timeout_ms=st.integers(0, 5000),
    lb_policy=st.sampled_from(["round_robin", "least_request", "random"]),
    zone_aware=st.booleans(),
    outlier=st.builds(Outlier, consecutive_5xx=st.integers(1, 50), max_ejection_percent=st.integers(0, 100)),
)


@st.composite
def registries(draw: st.DrawFn) -> tuple[list[Service], list[Instance]]:
    names = draw(st.lists(st.tuples(label, st.sampled_from(["default", "prod", "a-b"])), min_size=1, max_size=5, unique=True))
    services, instances = [], []
    for n, (name, ns) in enumerate(names):
        nports = draw(st.integers(1, 3))
        ports = [
            ServicePort(name=f"p{i}", port=draw(st.sampled_from([80, 8080, 9000, 443])) + i, protocol=draw(st.sampled_from(["http", "http2", "grpc", "tcp"])))
            for i in range(nports)
        ]
        svc = Service(name=name, namespace=ns, ports=ports, traffic=draw(traffic), vip=f"240.240.0.{n + 1}")
        services.append(svc)
        for k in range(draw(st.integers(0, 4))):
            instances.append(
                Instance(
                    id=f"{name}-{ns}-{k}",
                    service=name,
                    namespace=ns,
                    address=draw(st.sampled_from(["127.0.0.1", "10.1.2.3", "::1", "fd00::5"])),
                    ports={p.name: 10000 + k for p in ports},
                    zone=draw(st.sampled_from(["", "z1", "z2"])),
                    weight=draw(st.integers(1, 1000)),
                    checks=[Check(id="c", owner="t", status=draw(st.sampled_from(["passing", "warning", "critical"])))],
                    ever_passed=draw(st.booleans()),
                    labels={"version": draw(st.sampled_from(["v1", "v2"]))},
                )
            )
    return services, instances


def _registry_config(services: list[Service], instances: list[Instance]) -> dict[str, Any]:
    domain = "mesh"
    boot = build_bootstrap(BootstrapOptions(node_id="n1", service=services[0].name, admin_port=0, app_port=9999, zone="z1", local_cluster="x"))
    clusters = [_js(c) for c in build_clusters(services, domain)]
    node = NodeInfo(id="n1", service=services[0].name, outbound_port=15001, inbound_port=15006, app_port=9999)
    clusters.append(_js(build_inbound_cluster(node, "http2")))
    for n, s in enumerate(services):
        for p in s.ports:
            cla = _js(build_endpoints(s, p, [i for i in instances if i.service_key == s.key], domain))
            cla["cluster_name"] = f"eds-{n}-{p.name}"
            clusters.append({"name": f"eds-{n}-{p.name}", "type": "STATIC", "connect_timeout": "1s", "load_assignment": cla})
    outbound = _js(build_outbound_listener(node))
    hcm = outbound["filter_chains"][0]["filters"][0]["typed_config"]
    del hcm["rds"]
    hcm["route_config"] = _js(build_outbound_routes(services, domain))
    listeners = [outbound, _js(build_inbound_listener(node))]
    boot["static_resources"]["clusters"].extend(clusters)
    boot["static_resources"]["listeners"] = listeners
    boot.pop("cluster_manager", None)
    return boot


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(registries())
def test_generated_registries_validate_in_envoy(tmp_path: Path, reg: tuple[list[Service], list[Instance]]) -> None:
    assert_envoy_accepts(_registry_config(*reg), tmp_path, "the config built for a generated registry")


# ---- routing overlays -------------------------------------------------------------------------


def test_envoy_accepts_routes_with_splits_matches_and_faults(tmp_path: Path) -> None:
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm

    from meshpilot.policy.mesh import fault_filter

    rule = RouteRule("p/r", (("v1", 3), ("v2", 1)), path_exact="/x", headers=(HeaderMatch("x-a", regex="b.*"), HeaderMatch("x-c", prefix="d")), fault=Fault(abort_percent=50, abort_grpc_status=14))
    overlay = {WEB.key: routing(rule, SPLIT)}
    node = NodeInfo(id="n", service="caller", outbound_port=15001)
    listener = build_outbound_listener(node, [fault_filter()])
    # serve the routes inline instead of over RDS, so validation covers them
    manager_any = listener.filter_chains[0].filters[0].typed_config
    manager = hcm.HttpConnectionManager()
    manager_any.Unpack(manager)
    manager.ClearField("rds")
    other = Service(name="other", ports=[{"name": "http", "port": 80}], vip="240.240.0.10")
    manager.route_config.CopyFrom(build_outbound_routes([WEB, other], "mesh", overlay, {FAULT_FILTER: frozenset({WEB.key})}))
    manager_any.Pack(manager)
    clusters = [build_cluster(WEB, p, "mesh", s) for p in WEB.ports for s in ("", "v1", "v2")]
    boot = build_bootstrap(BootstrapOptions(node_id="n", admin_port=0))
    boot["static_resources"]["clusters"] += [json_format.MessageToDict(c) for c in clusters]
    boot["static_resources"]["listeners"] = [json_format.MessageToDict(listener)]
    assert_envoy_accepts(boot, tmp_path, "routes with a weighted split, matches and a fault")


# ---- the sidecar's listeners, bootstrap and health check ------------------------------------


def test_capture_and_inbound_listeners_validate_in_envoy(tmp_path: Path) -> None:
    boot = build_bootstrap(BootstrapOptions(node_id="n1", service="web", admin_port=0, app_port=9999))
    clusters = [_js(c) for c in build_clusters(SERVICES, "mesh")]
    for c in clusters:  # static stand-ins for the EDS clusters
        c.pop("eds_cluster_config")
        c["type"] = "STATIC"
        c["load_assignment"] = {"cluster_name": c["name"], "endpoints": []}
    clusters.append(_js(build_inbound_cluster(NODE)))
    routes = _js(build_outbound_routes(SERVICES, "mesh"))
    out = _js(build_outbound_listener(NODE, (), SERVICES, "mesh"))
    for chain in [*out["filter_chains"], out["default_filter_chain"]]:
        cfg = chain["filters"][0]["typed_config"]
        if "rds" in cfg:
            del cfg["rds"]
            cfg["route_config"] = routes
    inbound = _js(build_inbound_listener(NODE, (), ["127.0.0.1", "::1"]))
    for chain in [*inbound["filter_chains"], inbound["default_filter_chain"]]:
        cfg = chain["filters"][0]["typed_config"]
        del cfg["rds"]
        cfg["route_config"] = _js(build_inbound_routes(NODE, ["mesh.caller-strip"], "t0k3n", ["mesh.caller-strip"]))
    boot["static_resources"]["clusters"].extend(clusters)
    boot["static_resources"]["listeners"] = [out, inbound]
    assert_envoy_accepts(boot, tmp_path, "the sidecar's capture and inbound listeners")


def test_rendered_sidecar_bootstrap_validates_in_envoy(tmp_path: Path) -> None:
    boot = render_bootstrap(load_spec(GOOD), SidecarOptions(control_plane_port=15999, node_id="reviews-1"))
    assert_envoy_accepts(boot, tmp_path, "the bootstrap rendered from spec.yaml")


def test_hds_health_check_validates_in_envoy(tmp_path: Path) -> None:
    """The health check HDS sends, embedded in a static cluster."""
    reg = registration(node_info("b-1", "b", _md()))
    hc = json_format.MessageToDict(build_specifier(reg, 1.0, "0" * 32).cluster_health_checks[0].health_checks[0])
    cfg = {
        "static_resources": {"clusters": [{
            "name": "hds", "type": "STATIC", "connect_timeout": "1s", "health_checks": [hc],
            "load_assignment": {"cluster_name": "hds", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 15006}}}}]}]},
        }]}
    }
    assert_envoy_accepts(cfg, tmp_path, "the health check HDS sends")
