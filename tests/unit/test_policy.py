"""The policy framework and RoutingPolicy: validation with field-level errors, the kinds registry,
the engine's translation and change tracking, and the management-API surface."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpilot.controlplane import ControlPlane
from meshpilot.model import Check, Instance, Service
from meshpilot.policy.engine import PolicyEngine
from meshpilot.policy.kinds import PolicyInvalid, get_kind, parse_key
from meshpilot.policy.plugin import install
from meshpilot.policy.routing import ROUTING
from meshpilot.registry import Registry
from meshpilot.registry.store import MemoryStore
from meshpilot.settings import Settings
from meshpilot.xds.resource import TYPE

SUBSETS = [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]


def policy(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "split",
        "service": "web",
        "subsets": SUBSETS,
        "routes": [{"destinations": [{"subset": "v1", "weight": 90}, {"subset": "v2", "weight": 10}]}],
    }
    doc.update(over)
    return doc


def fields_of(data: Any) -> dict[str, str]:
    with pytest.raises(PolicyInvalid) as info:
        ROUTING.validate(data)
    return {f["field"]: f["reason"] for f in info.value.fields}


# ---- validation ---------------------------------------------------------------------------------


def test_valid_policy_round_trips_through_its_document() -> None:
    p = ROUTING.validate(policy())
    doc = ROUTING.document(p)
    assert doc["kind"] == "RoutingPolicy", f"expected kind RoutingPolicy in the document, got {doc.get('kind')!r}"
    again = ROUTING.validate(doc)
    assert again == p, f"expected the stored document to validate to the same policy, got {again!r}"
    assert p.key == "RoutingPolicy/default/split", f"expected key RoutingPolicy/default/split, got {p.key}"
    assert p.target_services() == {"web.default"}, f"expected target web.default, got {p.target_services()}"


@pytest.mark.parametrize(
    ("doc", "field", "reason"),
    [
        (policy(routes=[{"destinations": [{"subset": "v3"}]}]), "routes.0.destinations.0.subset", "no subset named 'v3'"),
        (policy(subsets=[*SUBSETS, {"name": "v1", "labels": {"a": "b"}}]), "subsets.2.name", "duplicate subset name"),
        (policy(routes=[{"destinations": [{}]}, {"destinations": [{}]}]), "routes.1", "unreachable"),
        (policy(routes=[{"destinations": [{"subset": "v1", "weight": 0}]}]), "routes.0.destinations", "more than 0"),
        (policy(routes=[{"destinations": [{"subset": "v1"}, {"subset": "v1"}]}]), "routes.0.destinations.1.subset", "once per route"),
        (policy(routes=[{"match": {"headers": [{"name": "x", "exact": "a", "prefix": "b"}]}, "destinations": [{}]}]), "routes.0.match.headers.0", "exactly one"),
        (policy(routes=[{"match": {"headers": [{"name": "x", "regex": "(("}]}, "destinations": [{}]}]), "routes.0.match.headers.0.regex", "regular expression"),
        (policy(routes=[{"match": {"path_prefix": "nope"}, "destinations": [{}]}]), "routes.0.match.path_prefix", "pattern"),
        (policy(routes=[{"destinations": [{}], "fault": {}}]), "routes.0.fault", "delay, abort"),
        (policy(routes=[{"destinations": [{}], "fault": {"abort": {"percent": 101}}}]), "routes.0.fault.abort.percent", "100"),
        (policy(routes=[{"destinations": [{}], "retries": {"attempts": 2, "retry_on": "5XX;reset"}}]), "routes.0.retries.retry_on", "comma-separated"),
        (policy(name="Bad_Name"), "name", "DNS label"),
        (policy(routes=[]), "routes", "at least 1"),
        (policy(colour="blue"), "colour", "Extra inputs"),
        ({**policy(), "kind": "CircuitBreakerPolicy"}, "kind", "expected RoutingPolicy"),
    ],
)
def test_invalid_policies_name_the_field(doc: dict[str, Any], field: str, reason: str) -> None:
    got = fields_of(doc)
    assert field in got, f"expected an error on {field!r}, got {got}"
    assert reason.lower() in got[field].lower(), f"expected {field!r} to say {reason!r}, got {got[field]!r}"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 200) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
policy_like = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["a", "split", "", "X"]) | st.text(max_size=5),
        "service": st.sampled_from(["web", ""]) | json_values,
        "subsets": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["v1", "v2", "-"]), "labels": json_values}), max_size=3) | json_values,
        "routes": st.lists(
            st.fixed_dictionaries(
                {"destinations": st.lists(st.fixed_dictionaries({}, optional={"subset": st.sampled_from(["v1", "v2", "v9"]), "weight": st.integers(-1, 5)}), max_size=3)},
                optional={"match": json_values, "fault": json_values, "retries": json_values, "timeout_ms": json_values},
            ),
            max_size=3,
        )
        | json_values,
        "port": json_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(policy_like | json_values)
def test_junk_is_rejected_with_fields_or_accepted(data: Any) -> None:
    try:
        p = ROUTING.validate(data)
    except PolicyInvalid as exc:
        assert exc.fields and all(f["field"] and f["reason"] for f in exc.fields), f"expected named fields and reasons, got {exc.fields}"
    else:
        # what validates must translate and be stored as a document that validates again
        assert ROUTING.validate(ROUTING.document(p)) == p


def test_kinds_registry_finds_by_name_and_alias() -> None:
    for name in ("RoutingPolicy", "routingpolicy", "routing"):
        kind = get_kind(name)
        assert kind is ROUTING, f"expected {name!r} to name RoutingPolicy, got {kind}"
    assert get_kind("nosuch") is None, "expected an unknown kind to be None"
    parsed = parse_key("RoutingPolicy/default/split")
    assert parsed is not None and parsed[1:] == ("default", "split"), f"expected (default, split), got {parsed}"
    for key in ("web.default", "config/app/x", "Unknown/a/b", "RoutingPolicy/a"):
        assert parse_key(key) is None, f"expected {key!r} not to parse as a policy key"


# ---- engine -------------------------------------------------------------------------------------


def _put(reg: Registry, doc: dict[str, Any]) -> str:
    p = ROUTING.validate(doc)
    reg.put_document("policies", p.key, ROUTING.document(p), service=p.service_key)
    return p.key


def test_engine_tracks_changes_and_ignores_bad_stored_documents() -> None:
    reg = Registry(MemoryStore())
    reg.store.write({("policies", "RoutingPolicy/default/broken"): {"kind": "RoutingPolicy", "name": "broken", "routes": "x"}})
    engine = PolicyEngine(reg, "mesh")
    assert engine.policies == {}, f"expected the invalid stored policy to be ignored, got {list(engine.policies)}"
    key = _put(reg, policy())
    assert engine.affected({key}) == {"web.default"}, "expected a new policy to reroute web.default"
    routing = engine.routing("web.default")
    assert routing is not None and [s.name for s in routing.subsets] == ["v1", "v2"], f"expected subsets v1, v2, got {routing}"
    assert routing.rules[0].destinations == (("v1", 90), ("v2", 10)), f"expected 90/10, got {routing.rules[0].destinations}"
    assert engine.affected({key}) == set(), "expected an unchanged policy to reroute nothing"
    assert engine.affected({"web.default", "kv/key"}) == set(), "expected non-policy keys to be ignored"
    reg.delete_document("policies", key, service="web.default")
    assert engine.affected({key}) == {"web.default"}, "expected a deleted policy to reroute web.default"
    assert engine.routing("web.default") is None, "expected no routing once the policy is deleted"


def test_control_plane_publishes_subset_clusters_and_endpoints() -> None:
    cp = ControlPlane(Settings(store="memory:"))
    cp.build_all()
    reg = cp.registry
    reg.put_service(Service(name="web", ports=[{"name": "http", "port": 80}]))
    for i, version in (("a", "v1"), ("b", "v2"), ("c", "v2")):
        reg.register(Instance(id=i, service="web", address="127.0.0.1", ports={"http": 8000 + ord(i)}, labels={"version": version}, checks=[Check(id="c", owner="t", status="passing")]))
    _put(reg, policy())
    cp.flush()
    want = {"outbound|80||web.default.svc.mesh", "outbound|80|v1|web.default.svc.mesh", "outbound|80|v2|web.default.svc.mesh"}
    assert set(cp.cache.names(TYPE.CLUSTER)) == want, f"expected clusters {sorted(want)}, got {cp.cache.names(TYPE.CLUSTER)}"
    assert set(cp.cache.names(TYPE.ENDPOINT)) == want, f"expected assignments {sorted(want)}, got {cp.cache.names(TYPE.ENDPOINT)}"
    from envoy.config.endpoint.v3 import endpoint_pb2
    from google.protobuf import any_pb2

    def hosts(name: str) -> int:
        entry = cp.cache.get(TYPE.ENDPOINT, name)
        assert entry is not None
        cla = endpoint_pb2.ClusterLoadAssignment()
        any_pb2.Any.FromString(entry.any_bytes).Unpack(cla)
        return sum(len(loc.lb_endpoints) for loc in cla.endpoints)

    assert hosts("outbound|80|v2|web.default.svc.mesh") == 2, "expected the v2 subset to hold the two v2 instances"
    reg.deregister("c")
    cp.flush()
    assert hosts("outbound|80|v2|web.default.svc.mesh") == 1, "expected the v2 subset to follow a deregistration"
    reg.delete_document("policies", "RoutingPolicy/default/split", service="web.default")
    cp.flush()
    assert cp.cache.names(TYPE.CLUSTER) == ["outbound|80||web.default.svc.mesh"], f"expected subset clusters gone, got {cp.cache.names(TYPE.CLUSTER)}"


# ---- API ----------------------------------------------------------------------------------------


@pytest.fixture
async def api() -> AsyncIterator[TestClient]:
    cp = ControlPlane(Settings(store="memory:"))
    cp.include(install(cp))
    client = TestClient(TestServer(cp.api_app()))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


async def test_api_create_get_list_put_delete(api: TestClient) -> None:
    r = await api.post("/v1/policies/RoutingPolicy", json=policy())
    assert r.status == 201, f"expected 201 on create, got {r.status}: {await r.text()}"
    r = await api.post("/v1/policies/routing", json=policy())
    assert r.status == 409, f"expected 409 on a second create, got {r.status}"
    r = await api.get("/v1/policies/RoutingPolicy/default/split")
    body = await r.json()
    assert r.status == 200 and body["routes"][0]["destinations"][0]["weight"] == 90, f"expected the stored policy, got {r.status}: {body}"
    r = await api.put("/v1/policies/RoutingPolicy/default/split", json=policy(routes=[{"destinations": [{"subset": "v2"}]}]))
    assert r.status == 200, f"expected 200 on replace, got {r.status}: {await r.text()}"
    listed = await (await api.get("/v1/policies/RoutingPolicy")).json()
    assert [p["name"] for p in listed] == ["split"], f"expected one policy listed, got {listed}"
    everything = await (await api.get("/v1/policies")).json()
    assert len(everything) == 1, f"expected /v1/policies to list the one policy, got {everything}"
    r = await api.delete("/v1/policies/RoutingPolicy/default/split")
    assert r.status == 200, f"expected 200 on delete, got {r.status}"
    r = await api.delete("/v1/policies/RoutingPolicy/default/split")
    assert r.status == 404, f"expected 404 deleting a missing policy, got {r.status}"


async def test_api_rejections_name_fields_and_store_nothing(api: TestClient) -> None:
    r = await api.post("/v1/policies/RoutingPolicy", json=policy(routes=[{"destinations": [{"subset": "nope"}]}]))
    body = await r.json()
    assert r.status == 400, f"expected 400, got {r.status}: {body}"
    assert [f["field"] for f in body["fields"]] == ["routes.0.destinations.0.subset"], f"expected the bad subset named, got {body['fields']}"
    r = await api.post("/v1/policies/NoSuchPolicy", json=policy())
    body = await r.json()
    assert r.status == 404 and body["fields"][0]["field"] == "kind", f"expected 404 on kind, got {r.status}: {body}"
    r = await api.post("/v1/policies/RoutingPolicy", data=b"{not json")
    assert r.status == 400, f"expected 400 on malformed JSON, got {r.status}"
    r = await api.put("/v1/policies/RoutingPolicy/default/other", json=policy(name="split"))
    body = await r.json()
    assert r.status == 400 and body["fields"][0]["field"] == "name", f"expected a name/URL mismatch, got {r.status}: {body}"
    assert await (await api.get("/v1/policies")).json() == [], "expected nothing stored after rejections"
    r = await api.post("/v1/policies/RoutingPolicy", json=policy())
    assert r.status == 201
    r = await api.post("/v1/policies/RoutingPolicy", json=policy(name="second"))
    body = await r.json()
    assert r.status == 409 and body["fields"][0]["field"] == "service", f"expected 409 on service (one RoutingPolicy per service), got {r.status}: {body}"


async def test_openapi_lists_policy_paths(api: TestClient) -> None:
    doc = await (await api.get("/openapi.json")).json()
    for kind in ("RoutingPolicy", "CircuitBreakerPolicy", "RateLimitPolicy"):  # each kind's body under its own path
        for path in (f"/v1/policies/{kind}", f"/v1/policies/{kind}/{{namespace}}/{{name}}"):
            assert path in doc["paths"], f"expected {path} in /openapi.json, got {sorted(doc['paths'])}"
        assert "requestBody" in doc["paths"][f"/v1/policies/{kind}"]["post"], f"expected a request schema for creating a {kind}"
