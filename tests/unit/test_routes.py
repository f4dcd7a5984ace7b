"""translate/ with routing overlays: weighted subset routes, matches, overrides and faults, subset
clusters and assignments, proxyless route shapes (Envoy's verdict on them: tests/e2e/test_envoy_validates_translations.py)."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2

from meshpilot.model import Check, Instance, Service
from meshpilot.proxyless.resources import build_api_listener, build_proxyless_routes
from meshpilot.translate.clusters import build_cluster, subset_cluster_name
from meshpilot.translate.endpoints import build_endpoints
from meshpilot.translate.routes import FAULT_FILTER, Fault, HeaderMatch, RouteRule, ServiceRouting, Subset, build_outbound_routes

WEB = Service(name="web", ports=[{"name": "http", "port": 80}, {"name": "grpc", "port": 9000, "protocol": "grpc"}], vip="240.240.0.9")
SUBSETS = (Subset("v1", (("version", "v1"),)), Subset("v2", (("version", "v2"),)))
SPLIT = RouteRule("split/route-0", (("v1", 90), ("v2", 10)))


def routing(*rules: RouteRule, ports: frozenset[str] | None = None) -> ServiceRouting:
    return ServiceRouting(subsets=SUBSETS, rules=rules or (SPLIT,), ports=ports)


def vhost(cfg: object, name: str) -> object:
    for vh in cfg.virtual_hosts:  # type: ignore[attr-defined]
        if vh.name == name:
            return vh
    raise AssertionError(f"expected a virtual host {name!r}")


def test_no_overlay_keeps_one_route_to_the_service() -> None:
    cfg = build_outbound_routes([WEB], "mesh")
    vh = vhost(cfg, "web.default:80")
    assert [r.route.cluster for r in vh.routes] == ["outbound|80||web.default.svc.mesh"], f"expected one route to the service, got {vh.routes}"


def test_weighted_split_between_subset_clusters() -> None:
    vh = vhost(build_outbound_routes([WEB], "mesh", {WEB.key: routing()}), "web.default:80")
    assert len(vh.routes) == 1, f"expected the catch-all rule alone (no default after it), got {len(vh.routes)} routes"
    got = [(c.name, c.weight.value) for c in vh.routes[0].route.weighted_clusters.clusters]
    want = [("outbound|80|v1|web.default.svc.mesh", 90), ("outbound|80|v2|web.default.svc.mesh", 10)]
    assert got == want, f"expected {want}, got {got}"


def test_matches_overrides_and_fault_then_default() -> None:
    rule = RouteRule(
        "p/beta",
        (("v2", 1),),
        path_prefix="/api",
        headers=(HeaderMatch("x-user", exact="beta"), HeaderMatch("x-debug", present=False)),
        timeout_ms=250,
        retries=3,
        retry_on="5xx",
        fault=Fault(delay_percent=12.5, delay_ms=100, abort_percent=1, abort_http_status=418),
    )
    vh = vhost(build_outbound_routes([WEB], "mesh", {WEB.key: routing(rule)}), "web.default:80")
    first, default = vh.routes
    assert first.match.prefix == "/api" and [h.name for h in first.match.headers] == ["x-user", "x-debug"], f"expected the match, got {first.match}"
    assert first.match.headers[1].invert_match, "expected present=False to become an inverted presence match"
    assert first.route.cluster == "outbound|80|v2|web.default.svc.mesh", f"expected a single-destination route to name its cluster, got {first.route}"
    assert first.route.timeout.ToMilliseconds() == 250 and first.route.retry_policy.num_retries.value == 3, f"expected overrides, got {first.route}"
    fault = fault_pb2.HTTPFault()
    first.typed_per_filter_config[FAULT_FILTER].Unpack(fault)
    assert fault.delay.percentage.numerator == 125_000 and fault.abort.http_status == 418, f"expected 12.5% delay and 418 aborts, got {fault}"
    assert default.route.cluster == "outbound|80||web.default.svc.mesh", f"expected a default route to the whole service last, got {default}"


def test_overlay_limited_to_a_port() -> None:
    cfg = build_outbound_routes([WEB], "mesh", {WEB.key: routing(ports=frozenset({"grpc"}))})
    assert vhost(cfg, "web.default:80").routes[0].route.cluster == "outbound|80||web.default.svc.mesh", "expected port http untouched"
    assert vhost(cfg, "web.default:9000").routes[0].route.HasField("weighted_clusters"), "expected port grpc split"


def test_proxyless_routes_carry_deadline_and_grpc_retry_conditions() -> None:
    port = WEB.port("grpc")
    assert port is not None
    cfg = build_proxyless_routes(WEB, port, "mesh", routing(RouteRule("r", (("v1", 1),), timeout_ms=1500, retries=2, retry_on="reset,5xx,internal")))
    action = cfg.virtual_hosts[0].routes[0].route
    assert action.max_stream_duration.max_stream_duration.ToMilliseconds() == 1500, f"expected a 1.5 s max_stream_duration, got {action.max_stream_duration}"
    assert action.retry_policy.retry_on == "internal,unavailable", f"expected gRPC status conditions, got {action.retry_policy.retry_on!r}"
    none = build_proxyless_routes(WEB, port, "mesh", routing(RouteRule("r", (("v1", 1),), retries=2, retry_on="retriable-headers")))
    assert not none.virtual_hosts[0].routes[0].route.HasField("retry_policy"), "expected no retry policy when no condition means anything to gRPC"


def _instance(i: str, version: str, zone: str = "") -> Instance:
    return Instance(id=i, service="web", address="127.0.0.1", ports={"http": 8000, "grpc": 9000}, zone=zone, labels={"version": version}, checks=[Check(id="c", owner="t", status="passing")], ever_passed=True)


def test_optional_filter_runs_only_for_its_services() -> None:
    from envoy.config.route.v3 import route_components_pb2 as rc

    other = Service(name="other", ports=[{"name": "http", "port": 80}], vip="240.240.0.10")
    cfg = build_outbound_routes([WEB, other], "mesh", None, {"gov": frozenset({WEB.key})})
    for vh in cfg.virtual_hosts:
        switched = vh.typed_per_filter_config.get("gov")
        if vh.name.startswith("web.default:"):
            assert switched is None, f"a guarded service's host {vh.name} must run the filter, got {switched}"
            continue
        assert switched is not None, f"host {vh.name} must switch the filter off"
        fc = rc.FilterConfig()
        assert switched.Unpack(fc) and fc.disabled, f"host {vh.name}: expected FilterConfig(disabled=true), got {switched}"
    names = {vh.name for vh in cfg.virtual_hosts}
    assert {"web.default:80", "web.default:9000", "other.default:80", "unknown-host"} <= names, f"unexpected hosts {names}"


def test_subset_assignment_selects_by_label_and_always_has_locality() -> None:
    port = WEB.port("http")
    assert port is not None
    insts = [_instance("a", "v1"), _instance("b", "v2", "z1"), _instance("c", "v2")]
    cla = build_endpoints(WEB, port, insts, "mesh", ("v2", {"version": "v2"}))
    assert cla.cluster_name == subset_cluster_name(WEB, port, "v2", "mesh"), f"expected the subset's name, got {cla.cluster_name}"
    ids = sorted(ep.metadata.filter_metadata["meshpilot"]["instance"] for loc in cla.endpoints for ep in loc.lb_endpoints)
    assert ids == ["b", "c"], f"expected the v2 instances b and c, got {ids}"
    assert all(loc.HasField("locality") and loc.load_balancing_weight.value > 0 for loc in cla.endpoints), "expected locality and weight on every locality entry"


@pytest.mark.parametrize("policy", ["least_request", "random", "round_robin"])
def test_cluster_lb_shapes(policy: str) -> None:
    svc = WEB.model_copy(update={"traffic": WEB.traffic.model_copy(update={"lb_policy": policy})})
    port = svc.port("grpc")
    assert port is not None
    c = build_cluster(svc, port, "mesh", "v1")
    assert c.name == "outbound|9000|v1|web.default.svc.mesh", f"expected the subset cluster name, got {c.name}"
    if policy == "round_robin":
        assert c.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN and not c.HasField("load_balancing_policy"), "expected the classic enum"
    else:
        names = [p.typed_extension_config.name for p in c.load_balancing_policy.policies]
        assert names == [f"envoy.load_balancing_policies.{policy}", "envoy.load_balancing_policies.wrr_locality"], f"expected {policy} then a gRPC fallback, got {names}"


def test_api_listener_shape() -> None:
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm

    listener = build_api_listener("web:9000", "proxyless|web.default:9000")
    manager = hcm.HttpConnectionManager()
    listener.api_listener.api_listener.Unpack(manager)
    assert listener.name == "web:9000" and not listener.HasField("address"), "expected an address-less listener named as the target"
    assert manager.rds.route_config_name == "proxyless|web.default:9000" and manager.rds.config_source.HasField("ads"), f"expected RDS over ADS, got {manager.rds}"
    assert [f.name for f in manager.http_filters][-1] == "envoy.filters.http.router", "expected the router filter last"
