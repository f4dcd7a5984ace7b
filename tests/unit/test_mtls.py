"""Mutual TLS between sidecars, as the translation builds it: the mode each service is in, callers'
clusters (TLS to sidecars with an identity, plaintext to the rest), callees' inbound listeners per
mode, and the MtlsPolicy kind. Pure: protobufs are built and inspected; tests/e2e has Envoy's verdict."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from hypothesis import given
from hypothesis import strategies as st

from meshpilot.model import Instance, Service, ServicePort
from meshpilot.policy.kinds import PolicyInvalid
from meshpilot.policy.mesh import Policies
from meshpilot.policy.mtls import MTLS, MtlsPolicy, modes
from meshpilot.publish import Changes
from meshpilot.publish.mesh import MeshProducer
from meshpilot.registry import Registry
from meshpilot.registry.store import MemoryStore
from meshpilot.translate.clusters import build_cluster
from meshpilot.translate.endpoints import build_endpoints
from meshpilot.translate.listeners import (
    CALLER_HEADER,
    INBOUND_LOCAL_ROUTE,
    INBOUND_ROUTE,
    build_inbound_listener,
    build_inbound_local_routes,
)
from meshpilot.translate.names import inbound_cluster_name
from meshpilot.translate.tls import DISABLE, PERMISSIVE, SDS_CLUSTER, STRICT, TLS_MATCH_KEY, TlsSettings
from meshpilot.xds.resource import META, TYPE, NodeInfo, node_info

WEB = Service(name="web", namespace="shop", ports=[ServicePort(name="http", port=80)])
NODE = NodeInfo(id="web-1", service="web", namespace="shop", inbound_port=15006, app_port=8080, identity=True)
ON = TlsSettings(enabled=True, trust_domain="example.org", default=PERMISSIVE)


def _manager(chain: listener_components_pb2.FilterChain) -> hcm.HttpConnectionManager:
    m = hcm.HttpConnectionManager()
    assert chain.filters[0].typed_config.Unpack(m), f"expected an HTTP connection manager on chain {chain.name!r}"
    return m


def _caller_rule(m: hcm.HttpConnectionManager) -> str:
    """What the chain does to x-mesh-caller: 'set:<value>', 'strip' or 'keep'."""
    for f in m.http_filters:
        if f.name.startswith("mesh.caller"):
            cfg = header_mutation_pb2.HeaderMutation()
            f.typed_config.Unpack(cfg)
            mut = cfg.mutations.request_mutations[0]
            if mut.remove == CALLER_HEADER:
                return "strip"
            assert mut.append.header.key == CALLER_HEADER
            return "set:" + str(mut.append.header.value)
    return "keep"


def _downstream(chain: listener_components_pb2.FilterChain) -> tls_pb2.DownstreamTlsContext:
    ctx = tls_pb2.DownstreamTlsContext()
    assert chain.transport_socket.typed_config.Unpack(ctx), f"expected a DownstreamTlsContext on chain {chain.name!r}"
    return ctx


# ---- the node and the modes ------------------------------------------------------------------


def test_node_metadata_says_whether_the_node_has_an_identity() -> None:
    assert node_info("n", "c", {META.IDENTITY: True}).identity
    assert node_info("n", "c", {META.IDENTITY: "true"}).identity
    assert not node_info("n", "c", {}).identity
    assert not node_info("n", "c", {META.IDENTITY: "yes please"}).identity


def test_a_service_mode_wins_over_its_namespace_which_wins_over_the_mesh() -> None:
    tls = TlsSettings(True, "td", STRICT, {"web.shop": DISABLE}, {"shop": PERMISSIVE})
    assert tls.mode("web.shop") == DISABLE
    assert tls.mode("api.shop") == PERMISSIVE
    assert tls.mode("api.default") == STRICT
    assert TlsSettings(False, "td", STRICT, {"web.shop": STRICT}).mode("web.shop") == DISABLE, "expected identities off to mean DISABLE"
    with pytest.raises(ValueError, match="mtls mode"):
        TlsSettings(True, "td", "LOOSE")


# ---- callers' clusters and endpoints ---------------------------------------------------------


def test_a_cluster_talks_tls_to_sidecars_with_an_identity_checking_the_service_id() -> None:
    c = build_cluster(WEB, WEB.ports[0], "mesh", tls=ON)
    assert len(c.transport_socket_matches) == 1, f"expected one TLS match, got {c.transport_socket_matches}"
    m = c.transport_socket_matches[0]
    assert dict(m.match) == {"tls": "mesh"}
    ctx = tls_pb2.UpstreamTlsContext()
    assert m.transport_socket.typed_config.Unpack(ctx)
    common = ctx.common_tls_context
    assert [s.name for s in common.tls_certificate_sds_secret_configs] == ["default"]
    sds = common.tls_certificate_sds_secret_configs[0].sds_config.api_config_source.grpc_services[0].envoy_grpc.cluster_name
    assert sds == SDS_CLUSTER
    validation = common.combined_validation_context
    assert validation.validation_context_sds_secret_config.name == "ROOTCA"
    sans = validation.default_validation_context.match_typed_subject_alt_names
    assert [(s.san_type, s.matcher.exact) for s in sans] == [(common_pb2.SubjectAltNameMatcher.URI, "spiffe://example.org/ns/shop/sa/web")], f"got {sans}"
    assert not c.HasField("transport_socket"), "expected endpoints without the mark to stay on the default (plaintext) socket"


def test_a_cluster_stays_plaintext_when_identities_are_off_or_the_service_is_disabled() -> None:
    assert not build_cluster(WEB, WEB.ports[0], "mesh").transport_socket_matches
    assert not build_cluster(WEB, WEB.ports[0], "mesh", tls=TlsSettings()).transport_socket_matches
    disabled = TlsSettings(True, "td", PERMISSIVE, {"web.shop": DISABLE})
    assert not build_cluster(WEB, WEB.ports[0], "mesh", tls=disabled).transport_socket_matches
    strict = TlsSettings(True, "td", DISABLE, namespace_modes={"shop": STRICT})
    assert build_cluster(WEB, WEB.ports[0], "mesh", "v1", strict).HasField("transport_socket"), "expected subset clusters to get TLS too"
    for off in (None, TlsSettings(), disabled):
        assert not build_cluster(WEB, WEB.ports[0], "mesh", tls=off).HasField("transport_socket")


def test_a_strict_service_cluster_talks_tls_to_every_endpoint_with_no_plaintext_fallback() -> None:
    """An instance registered at its own address (API, Consul) has no TLS mark: in STRICT mode it
    must not get requests in the clear with no server authentication."""
    strict = TlsSettings(True, "example.org", STRICT)
    for subset in ("", "v1"):
        c = build_cluster(WEB, WEB.ports[0], "mesh", subset, strict)
        assert not c.transport_socket_matches, f"expected no per-endpoint choice in STRICT mode, got {c.transport_socket_matches}"
        ctx = tls_pb2.UpstreamTlsContext()
        assert c.transport_socket.name == "envoy.transport_sockets.tls" and c.transport_socket.typed_config.Unpack(ctx), \
            "expected TLS as the cluster's default transport socket"
        sans = ctx.common_tls_context.combined_validation_context.default_validation_context.match_typed_subject_alt_names
        assert [s.matcher.exact for s in sans] == ["spiffe://example.org/ns/shop/sa/web"]
        assert [s.name for s in ctx.common_tls_context.tls_certificate_sds_secret_configs] == ["default"]


def test_only_endpoints_of_sidecars_with_an_identity_are_marked_for_tls() -> None:
    insts = [
        Instance(id="a", service="web", namespace="shop", address="10.0.0.1", ports={"http": 15006}, ever_passed=True,
                 metadata={"spiffe": "spiffe://example.org/ns/shop/sa/web"}),
        Instance(id="b", service="web", namespace="shop", address="10.0.0.2", ports={"http": 8080}, ever_passed=True),
    ]
    cla = build_endpoints(WEB, WEB.ports[0], insts, "mesh")
    marks = {ep.metadata.filter_metadata["meshpilot"]["instance"]: dict(ep.metadata.filter_metadata.get(TLS_MATCH_KEY, {}))
             for loc in cla.endpoints for ep in loc.lb_endpoints}
    assert marks == {"a": {"tls": "mesh"}, "b": {}}, f"expected only the sidecar with an identity marked, got {marks}"


# ---- callees' inbound listeners --------------------------------------------------------------


def test_permissive_takes_tls_with_the_caller_from_the_certificate_and_plaintext_without_it() -> None:
    lst = build_inbound_listener(NODE, (), ["10.0.0.9"], "http", PERMISSIVE)
    assert [f.name for f in lst.listener_filters] == ["envoy.filters.listener.tls_inspector"]
    assert [c.name for c in lst.filter_chains] == ["mtls"]
    tls = lst.filter_chains[0]
    assert tls.filter_chain_match.transport_protocol == "tls"
    ctx = _downstream(tls)
    assert ctx.require_client_certificate.value, "expected a client certificate required"
    assert [s.name for s in ctx.common_tls_context.tls_certificate_sds_secret_configs] == ["default"]
    assert ctx.common_tls_context.combined_validation_context.validation_context_sds_secret_config.name == "ROOTCA"
    assert _caller_rule(_manager(tls)) == "set:%DOWNSTREAM_PEER_URI_SAN%"
    assert lst.default_filter_chain.name == "plaintext"
    assert not lst.default_filter_chain.HasField("transport_socket")
    assert _caller_rule(_manager(lst.default_filter_chain)) == "strip", "expected plaintext callers' header stripped (trusted peers no longer count)"


def test_strict_takes_plaintext_only_from_the_node_itself_on_routes_of_its_own() -> None:
    lst = build_inbound_listener(NODE, (), [], "http", STRICT)
    assert not lst.HasField("default_filter_chain"), "expected no plaintext chain for other hosts"
    assert [c.name for c in lst.filter_chains] == ["mtls", "local"]
    local = lst.filter_chains[1]
    assert local.filter_chain_match.source_type == listener_components_pb2.FilterChainMatch.SAME_IP_OR_LOOPBACK
    assert not local.filter_chain_match.transport_protocol
    assert _manager(local).rds.route_config_name == INBOUND_LOCAL_ROUTE
    assert _manager(lst.filter_chains[0]).rds.route_config_name == INBOUND_ROUTE
    routes = build_inbound_local_routes(NODE, "t0k3n", ["mesh.governance"])
    health, rest = routes.virtual_hosts[0].routes
    assert health.match.headers[0].string_match.exact == "t0k3n" and health.route.cluster == inbound_cluster_name(8080)
    assert {"mesh.governance", "mesh.authz-deny", "mesh.authz-allow"} <= set(health.typed_per_filter_config)
    assert rest.direct_response.status == 403
    no_token = build_inbound_local_routes(NODE)
    assert [r.direct_response.status for r in no_token.virtual_hosts[0].routes] == [403]


def test_disable_is_todays_listener_with_the_authorization_filters() -> None:
    lst = build_inbound_listener(NODE, (), ["10.0.0.9"], "http", DISABLE)
    assert not lst.listener_filters and not any(c.HasField("transport_socket") for c in lst.filter_chains)
    assert [c.name for c in lst.filter_chains] == ["sidecars"] and lst.default_filter_chain.name == "others"
    assert _caller_rule(_manager(lst.filter_chains[0])) == "keep"
    names = [f.name for f in _manager(lst.filter_chains[0]).http_filters]
    assert names == ["mesh.authz-deny", "mesh.authz-allow", "envoy.filters.http.router"], f"got {names}"
    with pytest.raises(ValueError, match="mtls mode"):
        build_inbound_listener(NODE, (), None, "http", "permissive")


def test_a_tcp_app_in_strict_mode_takes_tls_only() -> None:
    """No plaintext chain, not even from the node itself: HDS checks a TCP app on the app's own
    port, so a local chain would only let the node's other processes in without an identity."""
    from meshpilot.hds.metadata import registration
    from tests.unit.test_hds import _md

    lst = build_inbound_listener(NODE, (), None, "tcp", STRICT)
    assert [c.name for c in lst.filter_chains] == ["mtls"], f"expected the TLS chain alone, got {[c.name for c in lst.filter_chains]}"
    assert not lst.HasField("default_filter_chain")
    md = _md()
    md[META.HEALTH_CHECK] = {"kind": "tcp"}
    plan = registration(node_info("db-1", "db", md)).plan
    node = node_info("db-1", "db", md)
    assert (plan.kind, plan.port) == ("tcp", node.app_port) and plan.port != node.inbound_port, \
        f"expected HDS to check a TCP app on its own port, not the inbound listener, got {plan}"
    assert lst.filter_chains[0].filters[0].name == "envoy.filters.network.tcp_proxy"
    assert lst.filter_chains[0].HasField("transport_socket")
    assert lst.continue_on_listener_filters_timeout and lst.listener_filters_timeout.seconds == 1, "expected server-first plaintext to go on after a second"


def test_the_inbound_access_log_names_principals_and_details() -> None:
    lst = build_inbound_listener(NODE, (), None, "http", PERMISSIVE)
    from envoy.extensions.access_loggers.stream.v3 import stream_pb2

    out = stream_pb2.StdoutAccessLog()
    _manager(lst.filter_chains[0]).access_log[0].typed_config.Unpack(out)
    fields = dict(out.log_format.json_format)
    assert fields["source_principal"] == "%DOWNSTREAM_PEER_URI_SAN%"
    assert fields["destination_principal"] == "%DOWNSTREAM_LOCAL_URI_SAN%"
    assert fields["details"] == "%RESPONSE_CODE_DETAILS%"


# ---- the kind and the registry's translation -------------------------------------------------


def test_mtls_policy_validates_its_mode_and_service() -> None:
    p = MTLS.validate({"kind": "MtlsPolicy", "name": "strict", "namespace": "shop", "mode": "strict"})
    assert isinstance(p, MtlsPolicy) and p.mode == STRICT and p.target_services() == set()
    with pytest.raises(PolicyInvalid) as bad:
        MTLS.validate({"name": "x", "mode": "LOOSE", "service": "Not A Label"})
    assert {f["field"] for f in bad.value.fields} == {"mode", "service"}, f"got {bad.value.fields}"
    with pytest.raises(PolicyInvalid):
        MTLS.validate({"name": "x"})  # mode is required


@given(st.dictionaries(st.sampled_from(["name", "namespace", "service", "mode", "extra"]),
                       st.one_of(st.text(max_size=8), st.integers(), st.none(), st.lists(st.integers(), max_size=2))))
def test_junk_mtls_policies_are_refused_with_field_errors(doc: dict[str, Any]) -> None:
    try:
        MTLS.validate(doc)
    except PolicyInvalid as exc:
        assert exc.fields and all(f["field"] for f in exc.fields)


def test_modes_resolve_the_first_policy_by_name() -> None:
    ps = [MtlsPolicy(name="b", namespace="shop", mode="STRICT"), MtlsPolicy(name="a", namespace="shop", mode="DISABLE"),
          MtlsPolicy(name="c", namespace="shop", service="web", mode="PERMISSIVE")]
    assert modes(ps) == ({"web.shop": PERMISSIVE}, {"shop": DISABLE})


def _mesh(identity: bool = True, mtls_mode: str = PERMISSIVE) -> tuple[Registry, MeshProducer, dict[str, NodeInfo]]:
    reg = Registry(MemoryStore())
    reg.put_service(WEB)
    reg.put_service(Service(name="api", namespace="shop", ports=[ServicePort(name="http", port=80)]))
    nodes: dict[str, NodeInfo] = {}
    policies = Policies(reg, "mesh", "127.0.0.1", nodes, {}, lambda key: None, trust_domain="example.org")
    mesh = MeshProducer(reg, "mesh", nodes, policies, lambda n: "tok-" + n, identity=identity, trust_domain="example.org", mtls_mode=mtls_mode)
    return reg, mesh, nodes


def _listener(mesh: MeshProducer, node: NodeInfo) -> listener_pb2.Listener:
    bundle = mesh.node_bundle(node)
    assert bundle is not None
    lst = bundle.resources[TYPE.LISTENER]["inbound"]
    assert isinstance(lst, listener_pb2.Listener)
    return lst


def test_only_nodes_with_an_identity_get_tls_and_only_when_identities_are_on() -> None:
    _, mesh, _ = _mesh(identity=True, mtls_mode=STRICT)
    assert [c.name for c in _listener(mesh, NODE).filter_chains] == ["mtls", "local"]
    bundle = mesh.node_bundle(NODE)
    assert bundle is not None and INBOUND_LOCAL_ROUTE in bundle.resources[TYPE.ROUTE]
    plain = NodeInfo(id="web-2", service="web", namespace="shop", inbound_port=15006, app_port=8080)
    plain_listener = _listener(mesh, plain)
    assert not plain_listener.listener_filters and not any(c.HasField("transport_socket") for c in plain_listener.filter_chains)
    _, off, _ = _mesh(identity=False, mtls_mode=STRICT)
    assert not _listener(off, NODE).listener_filters, "expected identities off to leave the listener as it was"
    out = off.produce(Changes(everything=True), 0.0)
    cluster = out[("", "web.shop")]
    assert cluster is not None and not cluster.resources[TYPE.CLUSTER]["outbound|80||web.shop.svc.mesh"].transport_socket_matches  # type: ignore[union-attr]


def test_an_mtls_policy_changes_the_clusters_and_listeners_of_the_services_it_selects() -> None:
    reg, mesh, nodes = _mesh(identity=True, mtls_mode=PERMISSIVE)
    nodes[NODE.id] = NODE
    mesh.produce(Changes(everything=True), 0.0)
    assert _listener(mesh, NODE).HasField("default_filter_chain"), "expected PERMISSIVE first"
    reg.put_document("policies", "MtlsPolicy/shop/strict", {"kind": "MtlsPolicy", "name": "strict", "namespace": "shop", "mode": "STRICT"})
    out = mesh.produce(Changes(other={"MtlsPolicy/shop/strict"}), 1.0)
    assert ("", "web.shop") in out and ("", "api.shop") in out, f"expected both services of the namespace rebuilt, got {sorted(out)}"
    node_out = out[(NODE.id, "node")]
    assert node_out is not None
    lst = node_out.resources[TYPE.LISTENER]["inbound"]
    assert isinstance(lst, listener_pb2.Listener) and [c.name for c in lst.filter_chains] == ["mtls", "local"]
    reg.put_document("policies", "MtlsPolicy/shop/web-off", {"kind": "MtlsPolicy", "name": "web-off", "namespace": "shop", "service": "web", "mode": "DISABLE"})
    out = mesh.produce(Changes(other={"MtlsPolicy/shop/web-off"}), 2.0)
    assert ("", "api.shop") not in out, "expected a service policy to touch its service only"
    web = out[("", "web.shop")]
    assert web is not None and not web.resources[TYPE.CLUSTER]["outbound|80||web.shop.svc.mesh"].transport_socket_matches  # type: ignore[union-attr]


def test_secrets_are_named_exactly_as_the_bootstrap_names_them() -> None:
    """Envoy shares one SDS subscription per identical secret config: the clusters' and listeners'
    references must equal the bootstrap's, or each opens a stream of its own to the agent."""
    from google.protobuf import json_format

    from meshpilot.translate.bootstrap import sds_config
    from meshpilot.translate.tls import sds_secret

    ours = json_format.MessageToDict(sds_secret("default").sds_config, preserving_proto_field_name=True)
    assert ours == sds_config(), f"expected the bootstrap's SDS config {sds_config()}, got {ours}"
