"""TracingPolicy: validated with field errors, resolved service > namespace > default, and translated
into the Zipkin tracing config of every HTTP connection manager of a node's listeners, only for nodes
whose bootstrap has the span collector; the registry's producer builds it for a node of the service."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.trace.v3 import zipkin_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from google.protobuf.message import Message

from meshpilot.policy.kinds import PolicyInvalid, get_kind
from meshpilot.policy.tracing import TRACING, TracingPolicy, sampling
from meshpilot.model import Service, ServicePort
from meshpilot.policy.mesh import Policies
from meshpilot.publish import Changes
from meshpilot.publish.mesh import MeshProducer, NoPolicy
from meshpilot.registry import Registry
from meshpilot.registry.store import MemoryStore
from meshpilot.telemetry.spans import META_TRACE_COLLECTOR
from meshpilot.translate.bootstrap import BootstrapOptions, build_bootstrap
from meshpilot.translate.listeners import build_inbound_listener, build_outbound_listener
from meshpilot.translate.tracing import DEFAULT_SAMPLING, HCM_FILTER, node_tracing, with_tracing
from meshpilot.xds.resource import TYPE, NodeInfo, node_info


@pytest.mark.parametrize("body,field", [
    ({"name": "t", "sampling": 101}, "sampling"),
    ({"name": "t", "sampling": -1}, "sampling"),
    ({"name": "t", "sampling": "lots"}, "sampling"),
    ({"name": "t", "sampling": "5"}, "sampling"),
    ({"name": "t", "sampling": True}, "sampling"),
    ({"name": "t", "service": "Bad_Name"}, "service"),
    ({"name": "Bad Name"}, "name"),
    ({"name": "t", "rate": 5}, "rate"),
    ({"kind": "MtlsPolicy", "name": "t"}, "kind"),
])
def test_bad_policies_name_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(PolicyInvalid) as err:
        TRACING.validate(body)
    fields = [f["field"] for f in err.value.fields]
    assert field in fields, f"expected {field!r} named, got {err.value.fields}"


def test_good_policies_and_their_defaults() -> None:
    assert TRACING.validate({"name": "t"}).sampling == DEFAULT_SAMPLING == 1.0  # type: ignore[attr-defined]
    assert TRACING.validate({"kind": "TracingPolicy", "name": "t", "sampling": 2.5}).sampling == 2.5  # type: ignore[attr-defined]
    assert get_kind("tracing") is TRACING, "expected the kind found by its alias"
    assert TRACING.validate({"name": "t", "service": "web"}).target_services() == {"web.default"}


def test_a_service_policy_wins_over_its_namespace_which_wins_over_the_default() -> None:
    wide = TracingPolicy(name="wide", namespace="shop", sampling=10)
    own = TracingPolicy(name="own", namespace="shop", service="cart", sampling=50)
    other = TracingPolicy(name="o", namespace="ops", sampling=90)
    policies = [wide, own, other]
    assert sampling(policies, "cart", "shop") == 50
    assert sampling(policies, "web", "shop") == 10
    assert sampling(policies, "web", "default") == DEFAULT_SAMPLING


def _managers(listener: Message) -> list[hcm.HttpConnectionManager]:
    chains = [*listener.filter_chains, *([listener.default_filter_chain] if listener.HasField("default_filter_chain") else [])]  # type: ignore[attr-defined]
    out = []
    for chain in chains:
        for f in chain.filters:
            if f.name == HCM_FILTER:
                m = hcm.HttpConnectionManager()
                f.typed_config.Unpack(m)
                out.append(m)
    return out


TRACED = NodeInfo(id="n1", service="web", outbound_port=15001, inbound_port=15006, app_port=9999,
                  extra={META_TRACE_COLLECTOR: "meshpilot-traces"})


@pytest.mark.parametrize("mtls", ["DISABLE", "PERMISSIVE", "STRICT"])
def test_every_connection_manager_of_a_traced_node_gets_the_zipkin_tracer(mtls: str) -> None:
    t = node_tracing(TRACED, 25.0)
    assert t is not None
    listeners = [with_tracing(build_outbound_listener(TRACED), t),
                 with_tracing(build_inbound_listener(TRACED, trusted_peers=["10.0.0.1"], mtls=mtls), t)]
    managers = [m for lst in listeners for m in _managers(lst)]
    assert len(managers) >= 2, f"expected HTTP connection managers, got {len(managers)}"
    for m in managers:
        assert m.tracing.random_sampling.value == 25.0, f"expected 25 % sampling, got {m.tracing}"
        z = zipkin_pb2.ZipkinConfig()
        m.tracing.provider.typed_config.Unpack(z)
        assert (z.collector_cluster, z.collector_endpoint) == ("meshpilot-traces", "/api/v2/spans"), f"got {z}"
        assert z.trace_context_option == zipkin_pb2.ZipkinConfig.USE_B3_WITH_W3C_PROPAGATION, f"expected W3C and B3, got {z}"
        assert z.collector_endpoint_version == zipkin_pb2.ZipkinConfig.HTTP_JSON and z.trace_id_128bit
        assert z.HasField("shared_span_context") and not z.shared_span_context.value, "expected spans with ids of their own"
        assert [(c.tag, c.literal.value) for c in m.tracing.custom_tags] == [("mesh.service", "web.default")]


def test_a_node_without_the_collector_gets_no_tracing() -> None:
    bare = NodeInfo(id="n2", service="web", outbound_port=15001, inbound_port=15006, app_port=9999)
    assert node_tracing(bare, 100.0) is None
    lst = with_tracing(build_outbound_listener(bare), node_tracing(bare, 100.0))
    assert not any(m.HasField("tracing") for m in _managers(lst)), "expected no tracing without the collector cluster"


def test_the_bootstrap_names_the_collector_the_node_metadata_advertises() -> None:
    b = build_bootstrap(BootstrapOptions(node_id="n1", service="web", app_port=9999, trace_collector_port=41000))
    cluster = next(c for c in b["static_resources"]["clusters"] if c["name"] == "meshpilot-traces")
    addr = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert addr == {"address": "127.0.0.1", "port_value": 41000}, f"got {addr}"
    node = node_info("n1", "web", b["node"]["metadata"])
    assert node_tracing(node, 5.0) is not None, "expected the rendered node to be given tracing"
    plain = build_bootstrap(BootstrapOptions(node_id="n1", service="web", app_port=9999))
    assert META_TRACE_COLLECTOR not in plain["node"]["metadata"], "expected no collector without a receiver port"


def _rates(out: Any, node: NodeInfo) -> list[float]:
    bundle = out[(node.id, "node")]
    assert bundle is not None, f"expected the node's listeners rebuilt, got {sorted(out)}"
    listeners = bundle.resources[TYPE.LISTENER]
    return sorted({m.tracing.random_sampling.value for lst in listeners.values() for m in _managers(lst)})


def test_a_stored_policy_reaches_the_listeners_of_its_services_nodes() -> None:
    reg = Registry(MemoryStore())
    reg.put_service(Service(name="web", namespace="default", ports=[ServicePort(name="http", port=80)]))
    nodes = {TRACED.id: TRACED}
    policies = Policies(reg, "mesh", "127.0.0.1", nodes, {}, lambda key: None)
    mesh = MeshProducer(reg, "mesh", nodes, policies, lambda n: "tok")
    try:
        assert _rates(mesh.produce(Changes(everything=True), 0.0), TRACED) == [DEFAULT_SAMPLING], "expected the default first"
        reg.put_document("policies", "TracingPolicy/default/wide", {"kind": "TracingPolicy", "name": "wide", "sampling": 20})
        assert _rates(mesh.produce(Changes(other={"TracingPolicy/default/wide"}), 1.0), TRACED) == [20.0], \
            "expected the namespace's policy on every listener of the node"
        reg.put_document("policies", "TracingPolicy/default/web", {"kind": "TracingPolicy", "name": "web", "service": "web", "sampling": 100})
        assert _rates(mesh.produce(Changes(other={"TracingPolicy/default/web"}), 2.0), TRACED) == [100.0], \
            "expected the service's own policy to win"
        assert NoPolicy().trace_sampling(TRACED) == DEFAULT_SAMPLING
    finally:
        reg.store.close()


def test_the_nodes_health_checks_are_never_traced() -> None:
    from meshpilot.translate.listeners import build_inbound_local_routes, build_inbound_routes

    for routes in (build_inbound_routes(TRACED, health_token="tok"), build_inbound_local_routes(TRACED, health_token="tok")):
        health = next(r for r in routes.virtual_hosts[0].routes if r.name == "health")
        t = health.tracing
        assert health.HasField("tracing") and all(
            p.numerator == 0 and t.HasField(f) for f, p in (("client_sampling", t.client_sampling), ("random_sampling", t.random_sampling),
                                                       ("overall_sampling", t.overall_sampling))), f"expected 0 % tracing on the health route, got {t}"
        others = [r for r in routes.virtual_hosts[0].routes if r.name != "health"]
        assert not any(r.HasField("tracing") for r in others), "expected other routes to keep the listener's sampling"
