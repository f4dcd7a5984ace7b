"""AuthorizationPolicy: validation with field errors, its translation into the inbound RBAC rules
(deny first, then allow; default allow until an ALLOW policy selects the service), the rules'
place in the node's inbound routes, and which services a change touches. Pure; tests/e2e has
real Envoy enforcing them."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter
from google.protobuf import json_format
from hypothesis import given
from hypothesis import strategies as st

from meshpilot.model import ApiOperation, Service, ServicePort
from meshpilot.policy.authz import AUTHZ, AuthorizationPolicy, inbound_authz, path_template_regex
from meshpilot.policy.kinds import PolicyInvalid
from meshpilot.policy.mesh import Policies
from meshpilot.publish import Changes
from meshpilot.publish.mesh import MeshProducer
from meshpilot.registry import Registry
from meshpilot.registry.store import MemoryStore
from meshpilot.translate.listeners import AUTHZ_ALLOW, AUTHZ_DENY, InboundAuthz, build_inbound_routes
from meshpilot.xds.resource import TYPE, NodeInfo

TD = "example.org"
NODE = NodeInfo(id="web-1", service="web", namespace="shop", inbound_port=15006, app_port=8080)


def _policy(**kw: Any) -> AuthorizationPolicy:
    p = AUTHZ.validate({"name": "p", "namespace": "shop", **kw})
    assert isinstance(p, AuthorizationPolicy)
    return p


def _js(msg: Any) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


# ---- validation ---------------------------------------------------------------------------------


def test_a_policy_round_trips_through_its_stored_form_with_from_spelled_from() -> None:
    p = _policy(service="web", action="deny", rules=[{"from": [{"services": ["api", "batch.jobs"]}], "to": [{"methods": ["POST"]}]}])
    doc = AUTHZ.document(p)
    assert doc["rules"][0]["from"][0]["services"] == ["api", "batch.jobs"] and "from_" not in doc["rules"][0]
    assert doc["action"] == "DENY"
    assert AUTHZ.validate(doc) == p


@pytest.mark.parametrize(("body", "field"), [
    ({"action": "MAYBE"}, "action"),
    ({"rules": [{"from": [{"principals": ["web"]}]}]}, "rules.0.from.0.principals"),
    ({"rules": [{"from": [{"services": ["Bad Name"]}]}]}, "rules.0.from.0.services"),
    ({"rules": [{"to": [{"methods": ["get"]}]}]}, "rules.0.to.0.methods"),
    ({"rules": [{"to": [{"ports": [0]}]}]}, "rules.0.to.0.ports"),
    ({"rules": [{"to": [{"paths": ["no-slash"]}]}]}, "rules.0.to.0.paths"),
    ({"rules": [{"when": [{"header": "x a", "values": ["1"]}]}]}, "rules.0.when.0.header"),
    ({"rules": [{"when": [{"header": "x-a", "values": []}]}]}, "rules.0.when.0.values"),
    ({"rules": [{"from": [{}]}]}, "rules.0.from.0"),
    ({"rules": [{"to": [{}]}]}, "rules.0.to.0"),
    ({"rules": [{"when": [{"header": "x-a", "values": ["1"]}, {"header": "X-A", "values": ["2"]}]}]}, "rules.0.when.1.header"),
    ({"rules": [{"unknown": 1}]}, "rules.0.unknown"),
])
def test_bad_policies_are_refused_naming_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(PolicyInvalid) as bad:
        _policy(**body)
    fields = [f["field"] for f in bad.value.fields]
    assert field in fields, f"expected a complaint about {field}, got {bad.value.fields}"


_junk = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.text(max_size=12), st.sampled_from(["ALLOW", "DENY", "/x", "GET", "spiffe://a/b"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["from", "to", "when", "principals", "services", "namespaces", "ports", "paths", "prefixes", "methods", "header", "values", "apis", "name", "path", "method"]), inner, max_size=3)),
    max_leaves=12,
)


@given(st.dictionaries(st.sampled_from(["name", "service", "action", "rules", "namespace"]), _junk, max_size=5))
def test_junk_is_refused_with_field_errors_or_accepted_and_translatable(doc: dict[str, Any]) -> None:
    try:
        p = AUTHZ.validate({"name": "j", **{k: v for k, v in doc.items() if k != "name"}})
    except PolicyInvalid as exc:
        assert exc.fields and all(f["field"] and f["reason"] for f in exc.fields), f"got {exc.fields}"
        return
    assert isinstance(p, AuthorizationPolicy)
    built = inbound_authz([p], p.namespace, p.service or "svc", {80}, TD)
    assert built is not None and (built.deny is not None) == (p.action == "DENY")


# ---- translation ------------------------------------------------------------------------------


def test_no_policy_means_no_rules_and_policies_select_by_namespace_and_service() -> None:
    assert inbound_authz([], "shop", "web", {80}, TD) is None
    other_ns = _policy(service="web").model_copy(update={"namespace": "prod"})
    assert inbound_authz([other_ns], "shop", "web", {80}, TD) is None
    assert inbound_authz([_policy(service="api")], "shop", "web", {80}, TD) is None
    assert inbound_authz([_policy()], "shop", "web", {80}, TD) is not None, "expected a policy without service to select every service of its namespace"


def test_an_allow_policy_without_rules_allows_nothing_and_a_deny_without_rules_denies_nothing() -> None:
    allow = inbound_authz([_policy(action="ALLOW")], "shop", "web", {80}, TD)
    assert allow is not None and allow.deny is None
    assert allow.allow is not None and allow.allow.action == rbac_pb2.RBAC.ALLOW and not allow.allow.policies
    deny = inbound_authz([_policy(action="DENY")], "shop", "web", {80}, TD)
    assert deny is not None and deny.allow is None
    assert deny.deny is not None and deny.deny.action == rbac_pb2.RBAC.DENY and not deny.deny.policies


def test_callers_are_principals_from_their_certificates() -> None:
    p = _policy(service="web", rules=[{"from": [{"services": ["api", "batch.jobs"]}, {"namespaces": ["ops"]}, {"principals": ["*"]}]}])
    built = inbound_authz([p], "shop", "web", {80}, TD)
    assert built is not None and built.allow is not None
    rule = _js(built.allow.policies["shop/p/0"])
    assert rule["permissions"] == [{"any": True}]
    ors = rule["principals"][0]["or_ids"]["ids"]
    services = [i["authenticated"]["principal_name"]["exact"] for i in ors[0]["or_ids"]["ids"]]
    # 'api' is in the policy's namespace; 'batch.jobs' is service batch of namespace jobs
    assert services == [f"spiffe://{TD}/ns/shop/sa/api", f"spiffe://{TD}/ns/jobs/sa/batch"], f"got {services}"
    assert ors[1]["authenticated"]["principal_name"]["prefix"] == f"spiffe://{TD}/ns/ops/sa/"
    assert ors[2]["authenticated"]["principal_name"]["prefix"] == "spiffe://"


def test_fields_of_an_entry_all_match_and_values_of_a_field_any() -> None:
    p = _policy(rules=[{
        "from": [{"services": ["api"], "namespaces": ["shop"]}],
        "to": [{"paths": ["/a"], "prefixes": ["/b/"], "methods": ["GET", "HEAD"]}],
        "when": [{"header": "x-tenant", "values": ["t1", "t2"]}],
    }])
    built = inbound_authz([p], "shop", "web", {80}, TD)
    assert built is not None and built.allow is not None
    rule = _js(built.allow.policies["shop/p/0"])
    peer = rule["principals"][0]["and_ids"]["ids"]
    assert len(peer) == 2, f"expected services AND namespaces, got {peer}"
    perm = rule["permissions"][0]["and_rules"]["rules"]
    to = perm[0]["and_rules"]["rules"]
    assert [p["url_path"]["path"] for p in to[0]["or_rules"]["rules"]] == [{"exact": "/a"}, {"prefix": "/b/"}]
    assert [m["header"]["string_match"]["exact"] for m in to[1]["or_rules"]["rules"]] == ["GET", "HEAD"]
    assert [h["header"]["string_match"]["exact"] for h in perm[1]["or_rules"]["rules"]] == ["t1", "t2"]


def test_a_rule_for_ports_the_node_does_not_serve_is_dropped() -> None:
    p = _policy(rules=[{"to": [{"ports": [9090]}]}, {"to": [{"ports": [80, 9090], "methods": ["GET"]}]}])
    built = inbound_authz([p], "shop", "web", {80}, TD)
    assert built is not None and built.allow is not None
    assert list(built.allow.policies) == ["shop/p/1"], f"expected the 9090-only rule dropped, got {list(built.allow.policies)}"


def test_deny_and_allow_policies_go_to_their_own_rule_sets() -> None:
    ps = [_policy(action="DENY", rules=[{}]).model_copy(update={"name": "d"}), _policy(rules=[{}]).model_copy(update={"name": "a"})]
    built = inbound_authz(ps, "shop", "web", {80}, TD)
    assert built is not None and built.deny is not None and built.allow is not None
    assert list(built.deny.policies) == ["shop/d/0"] and list(built.allow.policies) == ["shop/a/0"]


# ---- the node's inbound routes -----------------------------------------------------------------


def _per_route(cfg: route_pb2.RouteConfiguration, name: str) -> rbac_filter.RBACPerRoute | None:
    any_cfg = cfg.virtual_hosts[0].typed_per_filter_config.get(name)
    if any_cfg is None:
        return None
    out = rbac_filter.RBACPerRoute()
    assert any_cfg.Unpack(out), f"expected RBACPerRoute for {name}, got {any_cfg.type_url}"
    return out


def test_rules_ride_on_the_inbound_virtual_host_and_the_health_route_skips_them() -> None:
    authz = InboundAuthz(deny=rbac_pb2.RBAC(action=rbac_pb2.RBAC.DENY), allow=rbac_pb2.RBAC(action=rbac_pb2.RBAC.ALLOW))
    cfg = build_inbound_routes(NODE, (), "tok", (), authz)
    deny, allow = _per_route(cfg, AUTHZ_DENY), _per_route(cfg, AUTHZ_ALLOW)
    assert deny is not None and deny.rbac.rules.action == rbac_pb2.RBAC.DENY and deny.rbac.rules_stat_prefix == "authz_deny"
    assert allow is not None and allow.rbac.rules.action == rbac_pb2.RBAC.ALLOW and allow.rbac.HasField("rules")
    health = cfg.virtual_hosts[0].routes[0]
    assert health.name == "health" and {AUTHZ_DENY, AUTHZ_ALLOW} <= set(health.typed_per_filter_config)
    plain = build_inbound_routes(NODE, (), "tok", ())
    assert _per_route(plain, AUTHZ_DENY) is None and _per_route(plain, AUTHZ_ALLOW) is None


def test_a_namespace_wide_policy_change_reaches_every_node_of_the_namespace_by_routes_only() -> None:
    reg = Registry(MemoryStore())
    for name, ns in (("web", "shop"), ("api", "shop"), ("ext", "other")):
        reg.put_service(Service(name=name, namespace=ns, ports=[ServicePort(name="http", port=80)]))
    nodes = {NODE.id: NODE, "ext-1": NodeInfo(id="ext-1", service="ext", namespace="other", inbound_port=15006, app_port=8080)}
    policies = Policies(reg, "mesh", "127.0.0.1", nodes, {}, lambda key: None, trust_domain=TD)
    mesh = MeshProducer(reg, "mesh", nodes, policies, lambda n: "tok", identity=True, trust_domain=TD)
    before = mesh.produce(Changes(everything=True), 0.0)
    bundle = before[(NODE.id, "node")]
    assert bundle is not None
    listener_before = bundle.resources[TYPE.LISTENER]["inbound"]
    reg.put_document("policies", "AuthorizationPolicy/shop/only-api", {
        "kind": "AuthorizationPolicy", "name": "only-api", "namespace": "shop", "rules": [{"from": [{"services": ["api"]}]}]})
    out = mesh.produce(Changes(other={"AuthorizationPolicy/shop/only-api"}), 1.0)
    assert (NODE.id, "node") in out and ("ext-1", "node") not in out, f"expected only the namespace's nodes rebuilt, got {sorted(out)}"
    node_out = out[(NODE.id, "node")]
    assert node_out is not None
    assert node_out.resources[TYPE.LISTENER]["inbound"] == listener_before, "expected the listener unchanged (no drain): rules travel by RDS"
    routes = node_out.resources[TYPE.ROUTE]["inbound"]
    assert isinstance(routes, route_pb2.RouteConfiguration)
    allow = _per_route(routes, AUTHZ_ALLOW)
    assert allow is not None and list(allow.rbac.rules.policies) == ["shop/only-api/0"]


# ---- paths the rules see -----------------------------------------------------------------------


def test_every_inbound_http_chain_normalises_paths_before_the_rules() -> None:
    """The rules and the app must see one path: normalised, slashes merged, escaped slashes refused
    (tests/e2e/test_authz_paths.py has Envoy refusing //admin, /./admin, /%61dmin, ...)."""
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm

    from meshpilot.translate.listeners import build_inbound_listener
    from meshpilot.translate.tls import DISABLE, PERMISSIVE, STRICT

    node = NodeInfo(id="web-1", service="web", namespace="shop", inbound_port=15006, app_port=8080, identity=True)
    listeners = [build_inbound_listener(node, (), peers, "http", mode)
                 for mode in (DISABLE, PERMISSIVE, STRICT) for peers in (None, ["10.0.0.9"])]
    chains = [c for lst in listeners for c in [*lst.filter_chains, *([lst.default_filter_chain] if lst.HasField("default_filter_chain") else [])]]
    assert len(chains) >= 7
    for chain in chains:
        m = hcm.HttpConnectionManager()
        assert chain.filters[0].typed_config.Unpack(m)
        assert m.normalize_path.value and m.merge_slashes, f"expected chain {chain.name!r} to normalise paths"
        assert m.path_with_escaped_slashes_action == hcm.HttpConnectionManager.REJECT_REQUEST, f"chain {chain.name!r}"


# ---- TCP services ------------------------------------------------------------------------------


def _network_rbac(chain: Any) -> dict[str, rbac_pb2.RBAC]:
    from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac

    out: dict[str, rbac_pb2.RBAC] = {}
    for f in chain.filters:
        cfg = network_rbac.RBAC()
        if f.typed_config.Unpack(cfg):
            out[f.name] = cfg.rules
            assert cfg.stat_prefix == f"inbound_tcp.{'authz_deny' if f.name == AUTHZ_DENY else 'authz_allow'}."
    return out


def test_tcp_rules_never_let_an_http_only_condition_open_the_service() -> None:
    """A DENY rule's paths, methods and headers are ignored on TCP (it refuses more); an ALLOW rule
    that needs one never matches (it admits less); ports still select the node."""
    deny = _policy(name="d", action="DENY", rules=[
        {"from": [{"services": ["ops"]}], "to": [{"methods": ["POST"]}]},
        {"to": [{"paths": ["/x"]}], "when": [{"header": "x-a", "values": ["1"]}]},
        {"to": [{"ports": [9090]}]},
    ])
    allow = _policy(name="a", rules=[
        {"from": [{"services": ["api"]}]},
        {"from": [{"services": ["batch"]}], "to": [{"paths": ["/x"]}]},
        {"from": [{"services": ["cron"]}], "when": [{"header": "x-a", "values": ["1"]}]},
        {"from": [{"services": ["web"]}], "to": [{"prefixes": ["/a"]}, {"ports": [5432]}]},
    ])
    built = inbound_authz([deny, allow], "shop", "db", {5432}, TD)
    assert built is not None and built.tcp_deny is not None and built.tcp_allow is not None
    assert sorted(built.tcp_deny.policies) == ["shop/d/0", "shop/d/1"], f"expected the 9090-only rule dropped, got {sorted(built.tcp_deny.policies)}"
    d0, d1 = (_js(built.tcp_deny.policies[k]) for k in ("shop/d/0", "shop/d/1"))
    assert d0["permissions"] == [{"any": True}] and d0["principals"][0]["authenticated"]["principal_name"]["exact"] == "spiffe://example.org/ns/shop/sa/ops"
    assert d1 == {"permissions": [{"any": True}], "principals": [{"any": True}]}, f"expected a DENY rule of paths and headers to refuse every connection, got {d1}"
    assert sorted(built.tcp_allow.policies) == ["shop/a/0", "shop/a/3"], f"expected ALLOW rules needing HTTP dropped, got {sorted(built.tcp_allow.policies)}"
    assert _js(built.tcp_allow.policies["shop/a/3"])["permissions"] == [{"any": True}]
    assert built.tcp_deny.action == rbac_pb2.RBAC.DENY and built.tcp_allow.action == rbac_pb2.RBAC.ALLOW
    only_http = inbound_authz([_policy(rules=[{"to": [{"methods": ["GET"]}]}])], "shop", "db", {5432}, TD)
    assert only_http is not None and only_http.tcp_allow is not None and not only_http.tcp_allow.policies, \
        "expected an ALLOW policy whose every rule needs HTTP to allow no TCP connection"


def test_every_tcp_chain_carries_the_rules_deny_then_allow_before_the_proxy() -> None:
    from meshpilot.translate.listeners import build_inbound_listener
    from meshpilot.translate.tls import DISABLE, PERMISSIVE, STRICT

    node = NodeInfo(id="db-1", service="db", namespace="shop", inbound_port=15006, app_port=5432, identity=True)
    authz = inbound_authz([_policy(action="DENY", rules=[{}]).model_copy(update={"name": "d"}), _policy(rules=[{"from": [{"services": ["api"]}]}])],
                          "shop", "db", {5432}, TD)
    assert authz is not None
    for mode in (DISABLE, PERMISSIVE, STRICT):
        lst = build_inbound_listener(node, (), None, "tcp", mode, authz)
        chains = [*lst.filter_chains, *([lst.default_filter_chain] if lst.HasField("default_filter_chain") else [])]
        for chain in chains:
            names = [f.name for f in chain.filters]
            assert names == [AUTHZ_DENY, AUTHZ_ALLOW, "envoy.filters.network.tcp_proxy"], f"{mode} chain {chain.name!r}: {names}"
            rules = _network_rbac(chain)
            assert list(rules[AUTHZ_DENY].policies) == ["shop/d/0"] and list(rules[AUTHZ_ALLOW].policies) == ["shop/p/0"]
        assert build_inbound_listener(node, (), None, "tcp", mode) == build_inbound_listener(node, (), None, "tcp", mode, None)
        assert all(len(c.filters) == 1 for c in build_inbound_listener(node, (), None, "tcp", mode).filter_chains)
    http = build_inbound_listener(node, (), None, "http", PERMISSIVE, authz)
    assert http == build_inbound_listener(node, (), None, "http", PERMISSIVE), "expected an HTTP listener to take its rules from routes only"


def test_a_policy_change_reaches_a_tcp_service_through_its_listener() -> None:
    reg = Registry(MemoryStore())
    reg.put_service(Service(name="db", namespace="shop", ports=[ServicePort(name="tcp", port=5432, protocol="tcp")]))
    node = NodeInfo(id="db-1", service="db", namespace="shop", inbound_port=15006, app_port=5432)
    nodes = {node.id: node}
    policies = Policies(reg, "mesh", "127.0.0.1", nodes, {}, lambda key: None, trust_domain=TD)
    mesh = MeshProducer(reg, "mesh", nodes, policies, lambda n: "tok", identity=True, trust_domain=TD)
    before = mesh.produce(Changes(everything=True), 0.0)[(node.id, "node")]
    assert before is not None
    listener = before.resources[TYPE.LISTENER]["inbound"]
    assert isinstance(listener, listener_pb2.Listener) and [f.name for f in listener.filter_chains[0].filters] == ["envoy.filters.network.tcp_proxy"]
    reg.put_document("policies", "AuthorizationPolicy/shop/only-api", {
        "kind": "AuthorizationPolicy", "name": "only-api", "namespace": "shop", "rules": [{"from": [{"services": ["api"]}]}]})
    after = mesh.produce(Changes(other={"AuthorizationPolicy/shop/only-api"}), 1.0)[(node.id, "node")]
    assert after is not None
    changed = after.resources[TYPE.LISTENER]["inbound"]
    assert isinstance(changed, listener_pb2.Listener)
    rules = _network_rbac(changed.filter_chains[0])
    assert set(rules) == {AUTHZ_ALLOW} and list(rules[AUTHZ_ALLOW].policies) == ["shop/only-api/0"], \
        f"expected the TCP listener to carry the ALLOW rules, got {rules}"


# ---- API selectors -----------------------------------------------------------------------------

USERS = [
    ApiOperation(method="GET", path="/users/{id}", name="getUser"),
    ApiOperation(method="DELETE", path="/users/{id}", name="deleteUser"),
    ApiOperation(method="*", path="/users/{id}/photos/**", name="photos"),
    ApiOperation(method="GET", path="/healthz", name="health"),
]


def _perms(built: rbac_pb2.RBAC | None, key: str = "shop/p/0") -> dict[str, Any]:
    assert built is not None and key in built.policies, f"expected rule {key}, got {list(built.policies) if built else None}"
    perms = _js(built.policies[key])["permissions"]
    assert len(perms) == 1
    return dict(perms[0])


def _regex(perm: dict[str, Any]) -> str:
    return str(perm["url_path"]["path"]["safe_regex"]["regex"])


@pytest.mark.parametrize(("template", "pattern", "matches", "misses"), [
    ("/users/{id}", r"^/users/[^/]+$", ["/users/7", "/users/a.b;c=d"], ["/users", "/users/", "/users/7/photos", "/users/7/", "/xusers/7", "/users7"]),
    ("/healthz", r"^/healthz$", ["/healthz"], ["/healthz/", "/healthzz", "/Healthz", "/x/healthz"]),
    ("/", r"^/$", ["/"], ["/x", ""]),
    ("/static/*", r"^/static/[^/]+$", ["/static/a.css"], ["/static/", "/static/a/b"]),
    ("/api/**", r"^/api(/.*)?$", ["/api", "/api/", "/api/a/b"], ["/apix", "/ap", "/x/api"]),
    ("/users/{id}/", r"^/users/[^/]+/$", ["/users/7/"], ["/users/7"]),
    ("/a.b/{x}/c+d", r"^/a\.b/[^/]+/c\+d$", ["/a.b/1/c+d"], ["/aXb/1/c+d", "/a.b/1/cd"]),
    ("//a/./b/../c", r"^/a/c$", ["/a/c"], ["/a/b/c", "//a/c"]),
    ("/%7Eme/%41", r"^/\~me/A$", ["/~me/A"], ["/%7Eme/%41"]),
])
def test_a_path_template_is_an_anchored_regex_on_the_normalised_path(template: str, pattern: str, matches: list[str], misses: list[str]) -> None:
    import re

    got = path_template_regex(template)
    assert got == pattern, f"expected {template!r} as {pattern!r}, got {got!r}"
    for path in matches:
        assert re.fullmatch(got, path), f"expected {template!r} to match {path!r}"
    for path in misses:
        assert not re.fullmatch(got, path), f"expected {template!r} not to match {path!r}"


@pytest.mark.parametrize("template", ["users", "/a/**/b", "/a{b}", "/{a}b", "/a*", "/a?b=1", "/a#x", "/a b", "/{id}/" + "x" * 90])
def test_what_is_not_a_template_has_no_regex(template: str) -> None:
    assert path_template_regex(template) is None, f"expected {template!r} refused"


def test_a_template_stays_within_envoys_regex_program_limit() -> None:
    """Envoy refuses a route configuration with a regex of more than 100 RE2 instructions. The
    literal prefix is free; after a parameter (3) each character is one, plus 4: /{id}/ and 82
    characters reach the margin (90), one more passes it. tests/e2e/test_authz_paths.py has Envoy
    accept the largest and measures the estimate."""
    assert path_template_regex("/a-long-literal-prefix/" * 10 + "{id}") is not None
    assert path_template_regex("/{id}/" + "x" * 82) is not None
    assert path_template_regex("/{id}/" + "x" * 83) is None


def test_api_names_resolve_in_the_services_operations_to_method_and_path() -> None:
    p = _policy(service="web", action="DENY", rules=[{"to": [{"apis": [{"name": "deleteUser"}]}]}])
    built = inbound_authz([p], "shop", "web", {80}, TD, apis=USERS)
    assert built is not None
    rules = _perms(built.deny)["and_rules"]["rules"]
    assert rules[0] == {"header": {"name": ":method", "string_match": {"exact": "DELETE"}}}, f"got {rules}"
    assert _regex(rules[1]) == r"^/users/[^/]+$"
    any_method = _perms(inbound_authz([_policy(service="web", rules=[{"to": [{"apis": [{"name": "photos"}]}]}])], "shop", "web", {80}, TD, apis=USERS).allow)  # type: ignore[union-attr]
    assert "and_rules" not in any_method and _regex(any_method) == r"^/users/[^/]+/photos(/.*)?$", f"expected method '*' to match any method, got {any_method}"


def test_method_and_path_selectors_need_no_declared_api() -> None:
    p = _policy(rules=[{"to": [{"apis": [{"method": "GET", "path": "/users/{id}"}, {"path": "/healthz"}], "ports": [80]}]}])
    built = inbound_authz([p], "shop", "web", {80}, TD)
    assert built is not None
    either = _perms(built.allow)["or_rules"]["rules"]
    get_user, health = either
    assert get_user["and_rules"]["rules"][0]["header"]["string_match"]["exact"] == "GET" and _regex(get_user["and_rules"]["rules"][1]) == r"^/users/[^/]+$"
    assert _regex(health) == r"^/healthz$" and "header" not in health, f"expected no method condition, got {health}"
    assert inbound_authz([p], "shop", "web", {9090}, TD).allow.policies == {}, "expected ports to still select the node"  # type: ignore[union-attr]


def test_a_selector_naming_no_api_never_widens_an_allow_and_never_drops_a_deny() -> None:
    for declared in (USERS, [], None):  # declared elsewhere, no apis, the service unknown
        allow = _policy(service="web", rules=[{"to": [{"apis": [{"name": "nope"}]}]}, {"to": [{"apis": [{"name": "nope"}, {"name": "getUser"}]}]}])
        built = inbound_authz([allow], "shop", "web", {80}, TD, apis=declared)
        assert built is not None and built.allow is not None
        assert "shop/p/0" not in built.allow.policies, f"expected an ALLOW rule of unknown APIs to match nothing ({declared!r})"
        if declared:
            rules = _perms(built.allow, "shop/p/1")["and_rules"]["rules"]
            assert rules[0]["header"]["string_match"]["exact"] == "GET", f"expected only getUser allowed, got {rules}"
        else:
            assert "shop/p/1" not in built.allow.policies
        deny = _policy(service="web", action="DENY", rules=[{"from": [{"services": ["api"]}], "to": [{"apis": [{"name": "deleteUser"}, {"name": "nope"}]}]}])
        d = inbound_authz([deny], "shop", "web", {80}, TD, apis=declared)
        assert d is not None and _perms(d.deny) == {"any": True}, f"expected a DENY naming an unknown API to refuse every operation of its callers ({declared!r})"
    named = _policy(service="web", action="DENY", rules=[{"to": [{"apis": [{"name": "deleteUser"}]}]}])
    assert _perms(inbound_authz([named], "shop", "web", {80}, TD, apis=USERS).deny) != {"any": True}  # type: ignore[union-attr]


def test_an_unmatchable_declared_template_is_treated_as_no_api() -> None:
    bad = [ApiOperation(method="GET", path="/a/**/b", name="odd")]
    allow = inbound_authz([_policy(service="web", rules=[{"to": [{"apis": [{"name": "odd"}]}]}])], "shop", "web", {80}, TD, apis=bad)
    assert allow is not None and allow.allow is not None and not allow.allow.policies
    deny = inbound_authz([_policy(service="web", action="DENY", rules=[{"to": [{"apis": [{"name": "odd"}]}]}])], "shop", "web", {80}, TD, apis=bad)
    assert deny is not None and _perms(deny.deny) == {"any": True}


@pytest.mark.parametrize(("body", "field"), [
    ({"service": "web", "rules": [{"to": [{"apis": [{"route": "r"}]}]}]}, "rules.0.to.0.apis.0.route"),
    ({"rules": [{"to": [{"apis": [{"name": "getUser"}]}]}]}, "rules.0.to.0.apis.0.name"),
    ({"rules": [{"to": [{"apis": [{"path": "/a/**/b"}]}]}]}, "rules.0.to.0.apis.0.path"),
    ({"rules": [{"to": [{"apis": [{"path": "/{id}/" + "x" * 90}]}]}]}, "rules.0.to.0.apis.0.path"),
    ({"rules": [{"to": [{"apis": [{"path": "/a"}], "methods": ["GET"]}]}]}, "rules.0.to.0.apis"),
    ({"rules": [{"to": [{"apis": [{"method": "GET"}]}]}]}, "rules.0.to.0.apis.0"),
    ({"rules": [{"to": [{"apis": [{"path": "/a", "method": "get"}]}]}]}, "rules.0.to.0.apis.0"),
])
def test_bad_api_selectors_are_refused_naming_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(PolicyInvalid) as bad:
        _policy(**body)
    fields = [f["field"] for f in bad.value.fields]
    assert field in fields, f"expected a complaint about {field}, got {bad.value.fields}"


def test_an_entry_of_apis_and_ports_is_accepted_and_round_trips() -> None:
    p = _policy(service="web", rules=[{"to": [{"apis": [{"name": "getUser"}, {"method": "POST", "path": "/users"}], "ports": [80]}]}])
    assert AUTHZ.validate(AUTHZ.document(p)) == p


def test_on_tcp_an_api_never_opens_and_a_deny_by_api_refuses_the_connection() -> None:
    allow = _policy(name="a", service="db", rules=[{"to": [{"apis": [{"path": "/x"}]}]}])
    deny = _policy(name="d", service="db", action="DENY", rules=[{"to": [{"apis": [{"path": "/x"}]}]}])
    built = inbound_authz([allow, deny], "shop", "db", {5432}, TD)
    assert built is not None and built.tcp_allow is not None and built.tcp_deny is not None
    assert not built.tcp_allow.policies, "expected an ALLOW by API to admit no TCP connection"
    assert _js(built.tcp_deny.policies["shop/d/0"])["permissions"] == [{"any": True}]


def test_a_named_api_in_a_deny_becomes_that_operation_through_the_registry() -> None:
    """Policies.inbound_authz resolves API names against the service's registered API list."""
    reg = Registry(MemoryStore())
    reg.put_service(Service(name="web", namespace="shop", ports=[ServicePort(name="http", port=80)],
                            apis=[ApiOperation(method="DELETE", path="/users/{id}", name="deleteUser")]))
    nodes = {NODE.id: NODE}
    policies = Policies(reg, "mesh", "127.0.0.1", nodes, {}, lambda key: None, trust_domain=TD)
    mesh = MeshProducer(reg, "mesh", nodes, policies, lambda n: "tok", identity=True, trust_domain=TD)
    mesh.produce(Changes(everything=True), 0.0)
    reg.put_document("policies", "AuthorizationPolicy/shop/no-deletes", {
        "kind": "AuthorizationPolicy", "name": "no-deletes", "namespace": "shop", "service": "web", "action": "DENY",
        "rules": [{"to": [{"apis": [{"name": "deleteUser"}]}]}]})
    out = mesh.produce(Changes(other={"AuthorizationPolicy/shop/no-deletes"}), 1.0)
    bundle = out[(NODE.id, "node")]
    assert bundle is not None
    routes = bundle.resources[TYPE.ROUTE]["inbound"]
    assert isinstance(routes, route_pb2.RouteConfiguration)
    deny = _per_route(routes, AUTHZ_DENY)
    assert deny is not None, "expected a deny rule"
    text = json_format.MessageToJson(deny.rbac.rules.policies["shop/no-deletes/0"])
    assert "DELETE" in text and path_template_regex("/users/{id}") in text.replace("\\\\", "\\"), \
        f"expected the named API resolved to DELETE on its path template, got {text}"
