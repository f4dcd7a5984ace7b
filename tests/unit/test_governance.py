"""Unit tests for governance: CircuitBreakerPolicy and RateLimitPolicy validation (field errors,
and every accepted policy renders to a filter config the filter's encoder accepts), the division of
a cluster-wide rate, and the control plane's ECDS resources, per-node shares and outlier overrides."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import extension_pb2
from envoy.extensions.filters.http.wasm.v3 import wasm_pb2 as http_wasm_pb2
from google.protobuf import any_pb2, wrappers_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshpilot.controlplane import ControlPlane
from meshpilot.model import Check, Instance, Service
from meshpilot.policy.kinds import PolicyInvalid, get_kind
from meshpilot.policy.mesh import load_kinds
from meshpilot.policy.ratelimit import divide, per_second
from meshpilot.settings import Settings
from meshpilot.wasm import modules
from meshpilot.wasm.config import encode
from meshpilot.xds.resource import TYPE, NodeInfo

load_kinds()
BREAKER = get_kind("CircuitBreakerPolicy")
LIMIT = get_kind("RateLimitPolicy")
assert BREAKER is not None and LIMIT is not None

needs_module = pytest.mark.skipif(not (modules._DIR / "mesh.wasm").is_file(), reason="mesh.wasm is not built (scripts/build-filters.sh)")


def fields(kind: Any, body: dict[str, Any]) -> list[str]:
    try:
        kind.validate({"name": "p", **body})
    except PolicyInvalid as exc:
        return [f["field"] for f in exc.fields]
    return []


@pytest.mark.parametrize(("body", "field"), [
    ({"service": "orders", "failure_rate_threshold": 0}, "failure_rate_threshold"),
    ({"service": "orders", "failure_rate_threshold": 101}, "failure_rate_threshold"),
    ({"service": "orders", "sliding_window_size": 5000}, "sliding_window_size"),
    ({"service": "orders", "sliding_window_type": "time", "sliding_window_size": 601}, "sliding_window_size"),
    ({"service": "orders", "sliding_window_size": 10, "minimum_calls": 11}, "minimum_calls"),
    ({"service": "orders", "failure_status_codes": ["6xx"]}, "failure_status_codes.0"),
    ({"service": "orders", "wait_duration_in_open": 0}, "wait_duration_in_open"),
    ({"service": "orders", "permitted_calls_in_half_open": 0}, "permitted_calls_in_half_open"),
    ({"service": "orders", "reply": {"status": 99}}, "reply.status"),
    ({"service": "orders", "per": "api", "apis": [{"path": "/a/**/b"}]}, "apis.0.path"),
    ({"service": "orders", "per": "api", "apis": [{"method": "GET"}]}, "apis.0"),
    ({"service": "orders", "apis": [{"name": "get"}]}, "apis"),
    ({"service": "orders", "instance": {"max_ejection_percent": 101}}, "instance.max_ejection_percent"),
    ({"service": "orders", "surprise": 1}, "surprise"),
])
def test_breaker_rejections_name_the_field(body: dict[str, Any], field: str) -> None:
    got = fields(BREAKER, body)
    assert field in got, f"expected {field!r} among the errors for {body}, got {got}"


@pytest.mark.parametrize(("body", "field"), [
    ({"service": "api", "burst": 1}, "rate"),
    ({"service": "api", "rate": 1, "total_rate": 1, "burst": 1}, "rate"),
    ({"service": "api", "rate": "5/d", "burst": 1}, "rate"),
    ({"service": "api", "total_rate": 2_000_000, "burst": 1}, "total_rate"),
    ({"service": "api", "rate": 1, "burst": 0}, "burst"),
    ({"service": "api", "rate": 1, "burst": 1, "per": "everyone"}, "per"),
    ({"service": "api", "rate": 1, "burst": 1, "per": {"header": "x y"}}, "per"),
    ({"service": "api", "rate": 1, "burst": 1, "api": {"route": "r"}}, "api.route"),
    ({"service": "api", "rate": 1, "burst": 1, "api": {"path": "relative"}}, "api.path"),
    ({"service": "api", "rate": 1, "burst": 1, "per": "api", "api": {"path": "/x"}}, "per"),
    ({"service": "api", "rate": 1, "burst": 1, "reply": {"body": "a\r\nb"}}, "reply.body"),
])
def test_ratelimit_rejections_name_the_field(body: dict[str, Any], field: str) -> None:
    got = fields(LIMIT, body)
    assert field in got, f"expected {field!r} among the errors for {body}, got {got}"


_statuses = st.lists(st.one_of(st.integers(90, 610), st.sampled_from(["5xx", "4xx", "500-504", "6xx", "504-500"])), min_size=1, max_size=3)
_nan = st.just(float("nan"))
_durations = st.one_of(st.floats(-1, 90000), _nan, st.sampled_from(["500ms", "2s", "1m", "0", "x", "25h"]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(-1, 5000), minimum=st.one_of(st.none(), st.integers(-1, 5000)), kind=st.sampled_from(["count", "time"]),
    rate=st.one_of(st.floats(-5, 120), _nan), codes=_statuses, wait=_durations, slow=_durations,
    probes=st.integers(-1, 1100), path=st.sampled_from(["/orders/{id}", "/a/**", "/*/x", "bad", "/a/**/b", "/x{y}"]),
    status=st.one_of(st.none(), st.integers(100, 700)), header=st.sampled_from(["x-team", "X-Team", "bad name"]),
)
def test_an_accepted_breaker_always_renders_for_the_filter(size: int, minimum: int | None, kind: str, rate: float, codes: list[Any],
                                                         wait: Any, slow: Any, probes: int, path: str, status: int | None, header: str) -> None:
    from meshpilot.policy.breaker import breaker_rules

    body = {"name": "p", "service": "orders", "per": "api", "apis": [{"method": "GET", "path": path}, {"route": "r.default/x"}],
            "sliding_window_type": kind, "sliding_window_size": size, "minimum_calls": minimum, "failure_rate_threshold": rate,
            "failure_status_codes": codes, "wait_duration_in_open": wait, "slow_call_duration": slow,
            "permitted_calls_in_half_open": probes, "reply": {"status": status, "headers": {header: "v"}}}
    try:
        policy = BREAKER.validate(body)
    except PolicyInvalid as exc:
        assert exc.fields and all(f["field"] and f["reason"] for f in exc.fields), f"expected named fields, got {exc.fields}"
        return
    svc = Service(name="orders", ports=[{"name": "http", "port": 80}])
    encode({"breakers": breaker_rules(policy, svc, ["outbound|80||orders.default.svc.mesh"])})  # must not raise


@settings(max_examples=300, deadline=None)
@given(rate=st.one_of(st.floats(-1, 2e6), _nan, st.sampled_from(["100/s", "6000/m", "1/h", "0/s", "x"])),
       total=st.booleans(), burst=st.integers(-1, 200_000_000), fraction=st.floats(0.0001, 1.0),
       per=st.sampled_from(["service", "caller", "api", {"header": "x-user"}]))
def test_an_accepted_limit_always_renders_for_the_filter(rate: Any, total: bool, burst: int, fraction: float, per: Any) -> None:
    from meshpilot.policy.ratelimit import limit_rules

    body = {"name": "p", "service": "api", ("total_rate" if total else "rate"): rate, "burst": burst, "per": per}
    try:
        policy = LIMIT.validate(body)
    except PolicyInvalid as exc:
        assert exc.fields and all(f["field"] and f["reason"] for f in exc.fields), f"expected named fields, got {exc.fields}"
        return
    svc = Service(name="api", ports=[{"name": "http", "port": 80}], apis=[{"name": "list", "method": "GET", "path": "/items"}])
    rules = limit_rules(policy, svc, fraction)
    assert rules, f"expected rules for an accepted policy {body}"
    encode({"rate_limits": rules})  # must not raise


@given(total=st.floats(0.001, 1e6), weights=st.dictionaries(st.text(min_size=1, max_size=4), st.integers(1, 10_000), min_size=1, max_size=20))
def test_divide_is_proportional_and_sums_to_the_total(total: float, weights: dict[str, int]) -> None:
    shares = divide(total, weights)
    assert abs(sum(shares.values()) - total) <= 1e-6 * total, f"expected shares summing to {total}, got {sum(shares.values())}"
    a, b = max(weights, key=weights.__getitem__), min(weights, key=weights.__getitem__)
    assert shares[a] >= shares[b], f"expected a heavier member to get at least as much: {weights} -> {shares}"


def test_per_second() -> None:
    assert per_second("6000/m") == 100 and per_second("7200/h") == 2 and per_second(5) == 5, "expected rates in tokens per second"
    with pytest.raises(ValueError):
        per_second("5 per second")


# ---- the control plane's side -------------------------------------------------------------------


def _unpack(entry: Any, msg: Any) -> Any:
    any_pb2.Any.FromString(entry.any_bytes).Unpack(msg)
    return msg


def _filter_text(cp: ControlPlane, name: str, node_id: str = "") -> str:
    entry = cp.cache.get(TYPE.EXTENSION_CONFIG, name, node_id)
    assert entry is not None, f"expected an ECDS resource {name!r} (node {node_id!r})"
    tec = _unpack(entry, extension_pb2.TypedExtensionConfig())
    wasm = http_wasm_pb2.Wasm()
    tec.typed_config.Unpack(wasm)
    text = wrappers_pb2.StringValue()
    wasm.config.configuration.Unpack(text)
    return text.value


def _sidecar(cp: ControlPlane, node_id: str, service: str) -> NodeInfo:
    node = NodeInfo(id=node_id, service=service, inbound_port=15006, app_port=8080, outbound_port=15001)
    cp._node_connected(node)
    return node


@needs_module
def test_control_plane_publishes_filters_shares_and_outliers() -> None:
    cp = ControlPlane(Settings(store="memory:"))
    cp.ports["api"] = 15999  # as if serving
    cp.build_all()
    reg = cp.registry
    reg.put_service(Service(name="api", ports=[{"name": "http", "port": 80}]))
    reg.put_document("policies", "RateLimitPolicy/default/total", {"kind": "RateLimitPolicy", "name": "total", "service": "api", "total_rate": 300, "burst": 30}, service="api.default")
    reg.put_document("policies", "CircuitBreakerPolicy/default/cb", {"kind": "CircuitBreakerPolicy", "name": "cb", "service": "api", "instance": {"consecutive_5xx": 7}}, service="api.default")
    cp.flush()

    entry = cp.cache.get(TYPE.EXTENSION_CONFIG, "meshpilot.governance.outbound")
    assert entry is not None, "expected the shared outbound filter config"
    tec = _unpack(entry, extension_pb2.TypedExtensionConfig())
    wasm = http_wasm_pb2.Wasm()
    tec.typed_config.Unpack(wasm)
    remote = wasm.config.vm_config.code.remote
    assert remote.http_uri.uri == "http://meshpilot-api/v1/wasm/mesh.wasm" and remote.http_uri.cluster == "meshpilot-api", f"expected the module from the API, got {remote}"
    assert remote.sha256 == cp.policies.governance.module.sha256, "expected the config to pin the served bytes' sha256"
    assert "match.cluster = outbound|80||api.default.svc.mesh" in _filter_text(cp, "meshpilot.governance.outbound"), "expected the breaker on api's cluster"
    assert cp.cache.get(TYPE.CLUSTER, "meshpilot-api") is not None, "expected the cluster that serves the module"

    cluster = _unpack(cp.cache.get(TYPE.CLUSTER, "outbound|80||api.default.svc.mesh"), cluster_pb2.Cluster())
    assert cluster.outlier_detection.consecutive_5xx.value == 7, f"expected the policy's outlier detection, got {cluster.outlier_detection}"

    _sidecar(cp, "api-1", "api")
    assert "rate = 300/s" in _filter_text(cp, "meshpilot.governance.inbound", "api-1"), "expected a lone sidecar to hold the whole rate"
    _sidecar(cp, "api-2", "api")
    reg.register(Instance(id="api-2", service="api", node="api-2", address="127.0.0.2", ports={"http": 15006}, weight=200, ever_passed=True,
                          checks=[Check(id="hds", owner="hds", status="passing")]))
    cp.flush()  # a registration is published behind the debounce
    one, two = _filter_text(cp, "meshpilot.governance.inbound", "api-1"), _filter_text(cp, "meshpilot.governance.inbound", "api-2")
    assert "rate = 100/s" in one and "burst = 10" in one, f"expected api-1 (weight 100 of 300) to get 100/s and burst 10, got:\n{one}"
    assert "rate = 200/s" in two and "burst = 20" in two, f"expected api-2 (weight 200 of 300) to get 200/s and burst 20, got:\n{two}"
    assert "[ratelimit" not in _filter_text(cp, "meshpilot.governance.inbound"), "expected the shared inbound config to limit nothing"

    cp._node_gone(cp.nodes["api-2"])
    assert "rate = 300/s" in _filter_text(cp, "meshpilot.governance.inbound", "api-1"), "expected the rate re-divided when api-2 leaves"

    reg.delete_document("policies", "CircuitBreakerPolicy/default/cb", service="api.default")
    cp.flush()
    cluster = _unpack(cp.cache.get(TYPE.CLUSTER, "outbound|80||api.default.svc.mesh"), cluster_pb2.Cluster())
    assert cluster.outlier_detection.consecutive_5xx.value == 5, f"expected the service's own outlier detection back, got {cluster.outlier_detection}"
    assert "[breaker" not in _filter_text(cp, "meshpilot.governance.outbound"), "expected no breaker once the policy is deleted"


def _switched_off(cp: ControlPlane, route: str, node_id: str = "") -> dict[str, set[str]]:
    """Virtual host → the HTTP filters a route configuration (shared, or a node's) switches off."""
    from envoy.config.route.v3 import route_components_pb2 as rc
    from envoy.config.route.v3 import route_pb2

    entry = cp.cache.get(TYPE.ROUTE, route, node_id)
    assert entry is not None, f"expected the route configuration {route!r} (node {node_id!r})"
    def disabled(cfg: Any) -> bool:
        fc = rc.FilterConfig()
        return cfg.Unpack(fc) and fc.disabled

    return {vh.name: {name for name, cfg in vh.typed_per_filter_config.items() if disabled(cfg)}
            for vh in _unpack(entry, route_pb2.RouteConfiguration()).virtual_hosts}


def _outbound_filter_off(cp: ControlPlane) -> dict[str, bool]:
    """Virtual host → whether it switches the outbound governance filter off."""
    from meshpilot.policy.governance import OUTBOUND_FILTER
    from meshpilot.translate.names import OUTBOUND_ROUTE

    return {vh: OUTBOUND_FILTER in off for vh, off in _switched_off(cp, OUTBOUND_ROUTE).items()}


def _inbound_filter_off(cp: ControlPlane, node_id: str) -> bool:
    from meshpilot.policy.governance import INBOUND_FILTER
    from meshpilot.translate.listeners import INBOUND_ROUTE

    return INBOUND_FILTER in _switched_off(cp, INBOUND_ROUTE, node_id)["inbound"]


def _governed_plane(*services: str) -> ControlPlane:
    """A control plane with governance installed, serving (as far as the filters' URI needs), and
    one HTTP service per name."""
    cp = ControlPlane(Settings(store="memory:"))
    cp.ports["api"] = 15999
    cp.build_all()
    for name in services:
        cp.registry.put_service(Service(name=name, ports=[{"name": "http", "port": 80}]))
    cp.flush()
    return cp


@needs_module
def test_only_routes_to_guarded_services_run_the_outbound_filter() -> None:
    cp = _governed_plane("api", "web")
    reg = cp.registry
    off = _outbound_filter_off(cp)
    assert off == {"api.default:80": True, "web.default:80": True, "unknown-host": True}, f"expected every host to skip the filter without policies, got {off}"

    # a breaker without an instance section: only the set of guarded services changes
    reg.put_document("policies", "CircuitBreakerPolicy/default/cb", {"kind": "CircuitBreakerPolicy", "name": "cb", "service": "api"}, service="api.default")
    cp.flush()
    off = _outbound_filter_off(cp)
    assert off == {"api.default:80": False, "web.default:80": True, "unknown-host": True}, f"expected calls to api alone to run the filter, got {off}"

    reg.delete_document("policies", "CircuitBreakerPolicy/default/cb", service="api.default")
    cp.flush()
    off = _outbound_filter_off(cp)
    assert off["api.default:80"], f"expected api's routes to skip the filter again once the breaker is gone, got {off}"


@needs_module
def test_only_nodes_with_a_limit_run_the_inbound_filter() -> None:
    cp = _governed_plane("api", "web")
    reg = cp.registry
    _sidecar(cp, "api-1", "api")
    _sidecar(cp, "web-1", "web")
    assert _inbound_filter_off(cp, "api-1") and _inbound_filter_off(cp, "web-1"), "expected no node to run the inbound filter without limits"

    reg.put_document("policies", "RateLimitPolicy/default/rl", {"kind": "RateLimitPolicy", "name": "rl", "service": "api", "rate": 50, "burst": 5}, service="api.default")
    cp.flush()
    assert not _inbound_filter_off(cp, "api-1"), "expected api's node to run the inbound filter once a limit applies"
    assert _inbound_filter_off(cp, "web-1"), "expected web's node to keep skipping it"
    first: dict[str, bool] = {}  # the node's inbound routes as first published, before any refresh

    def seen(type_url: str, scope: str, names: frozenset[str], stamp: float) -> None:
        if type_url == TYPE.ROUTE and scope == "api-2" and not first:
            first["off"] = _inbound_filter_off(cp, "api-2")

    stop = cp.cache.watch(seen)
    _sidecar(cp, "api-2", "api")
    stop()
    assert first == {"off": False}, f"expected a node joining a limited service to run the filter from its first routes, got {first}"
    assert not _inbound_filter_off(cp, "api-2"), "expected a node joining a limited service to run the filter"

    reg.delete_document("policies", "RateLimitPolicy/default/rl", service="api.default")
    cp.flush()
    assert _inbound_filter_off(cp, "api-1") and _inbound_filter_off(cp, "api-2"), "expected the filter switched off again with the limit gone"


def test_sidecar_listeners_carry_ecds_filters_only() -> None:
    from meshpilot.policy.governance import INBOUND_FILTER, OUTBOUND_FILTER, ecds_filter

    f = ecds_filter(OUTBOUND_FILTER)
    assert not f.HasField("typed_config") and f.config_discovery.config_source.HasField("ads"), "expected the filter config by ECDS over ADS"
    assert list(f.config_discovery.type_urls)[0] == modules.WASM_TYPE_URL, f"expected the Wasm type URL first, got {f.config_discovery.type_urls}"
    assert f.config_discovery.HasField("default_config"), "expected a pass-through default config if the first fetch times out"
    assert f.config_discovery.config_source.initial_fetch_timeout.seconds > 0, "expected a bounded wait for the first config"
    assert ecds_filter(INBOUND_FILTER).name == INBOUND_FILTER


@needs_module
def test_a_wildcard_listen_address_is_resolved_once_not_per_publish(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    lookups: list[str] = []

    def gethostbyname(name: str) -> str:
        lookups.append(name)
        return "192.0.2.7"

    monkeypatch.setattr(socket, "gethostbyname", gethostbyname)
    cp = ControlPlane(Settings(store="memory:", listen_address="0.0.0.0"))
    cp.ports["api"] = 15999
    cp.build_all()
    reg = cp.registry
    reg.put_service(Service(name="api", ports=[{"name": "http", "port": 80}]))
    reg.put_document("policies", "RateLimitPolicy/default/rl", {"kind": "RateLimitPolicy", "name": "rl", "service": "api", "rate": 50, "burst": 5}, service="api.default")
    cp.flush()
    _sidecar(cp, "api-1", "api")
    _sidecar(cp, "api-2", "api")
    reg.put_document("policies", "CircuitBreakerPolicy/default/cb", {"kind": "CircuitBreakerPolicy", "name": "cb", "service": "api"}, service="api.default")
    cp.flush()

    cluster = _unpack(cp.cache.get(TYPE.CLUSTER, "meshpilot-api"), cluster_pb2.Cluster())
    address = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address
    assert address == "192.0.2.7", f"expected the module's cluster at the host's resolved address, got {address!r}"
    port = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value
    assert port == 15999, f"expected the module's cluster at the API port, got {port}"
    assert "http://meshpilot-api/" in str(_unpack(cp.cache.get(TYPE.EXTENSION_CONFIG, "meshpilot.governance.inbound", "api-1"),
                                                  extension_pb2.TypedExtensionConfig())), "expected the module URI through meshpilot-api"
    assert len(lookups) == 1, f"expected one host name lookup for the whole run, got {len(lookups)}: {lookups}"
