"""Proxyless gRPC servers and clients with identities: the Listener an xDS-enabled gRPC server gets
(its address, mTLS on the bootstrap's certificate provider, the RBAC rules of the policies that
select its service, a non-forwarding route), the TLS clusters a client with an identity gets for
services with identities, and what a policy change or identities off rebuild. Pure; real grpcio
enforcing them: tests/interop/test_proxyless_server_authz.py."""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from meshpilot.model import Instance, Service, ServicePort
from meshpilot.policy.mesh import Policies
from meshpilot.proxyless.producer import SERVER_KEY, ProxylessProducer, tls_key
from meshpilot.proxyless.server import CERT_PROVIDER, server_addresses, server_listener_name
from meshpilot.publish import Changes
from meshpilot.publish.mesh import MeshProducer
from meshpilot.publish.publisher import Bundle, Output
from meshpilot.registry import Registry
from meshpilot.registry.store import MemoryStore
from meshpilot.translate.listeners import AUTHZ_ALLOW
from meshpilot.xds.resource import TYPE, NodeInfo, node_info

TD = "example.org"
ECHO_ID = f"spiffe://{TD}/ns/default/sa/echo"
ECHO_CLUSTER = "outbound|50051||echo.default.svc.mesh"
LISTENER = "grpc/server?xds.resource.listening_address=127.0.0.1:7000"


def _node(node_id: str, **metadata: Any) -> NodeInfo:
    return node_info(node_id, "", {"PROXYLESS": True, **metadata})


def _mesh(identity: bool = True, allow: str = "") -> tuple[Registry, dict[str, NodeInfo], MeshProducer, ProxylessProducer]:
    reg = Registry(MemoryStore())
    for name, port in (("echo", 50051), ("a", 50061), ("plain", 50071)):
        reg.put_service(Service(name=name, ports=[ServicePort(name="grpc", port=port, protocol="grpc")]))
    reg.register(Instance(id="echo-1", service="echo", address="127.0.0.1", ports={"grpc": 7000}, metadata={"spiffe": ECHO_ID}))
    reg.register(Instance(id="plain-1", service="plain", address="127.0.0.1", ports={"grpc": 7100}))
    nodes = {n.id: n for n in (
        _node("echo-1", SERVICE="echo", IDENTITY=True, GRPC_SERVER_ADDRESSES=["127.0.0.1:7000", "[::]:7000", "junk"]),
        _node("a-1", SERVICE="a", IDENTITY=True),
        _node("old-1"),  # a proxyless client without the certificate provider
    )}
    if allow:  # in the store before the control plane starts
        _allow(reg, allow)
    policies = Policies(reg, "mesh", "127.0.0.1", nodes, {}, lambda key: None, trust_domain=TD)
    mesh = MeshProducer(reg, "mesh", nodes, policies, lambda n: "tok", identity=identity, trust_domain=TD)
    return reg, nodes, mesh, ProxylessProducer(reg, "mesh", mesh.service_routing, nodes, policies, mesh.tls)


def _produce(mesh: MeshProducer, proxyless: ProxylessProducer, changes: Changes) -> Output:
    """In the publisher's order: the mesh (it takes in policy changes), the policies' own, then proxyless."""
    mesh.produce(changes, 0.0)
    assert isinstance(mesh.policy, Policies)
    for producer in mesh.policy.producers:
        producer.produce(changes, 0.0)
    return proxyless.produce(changes, 0.0)


def _bundle(out: Output, key: tuple[str, str]) -> Bundle:
    bundle = out.get(key)
    assert bundle is not None, f"expected a bundle for {key}, got keys {sorted(k for k, v in out.items() if v is not None)}"
    return bundle


def _listener(out: Output, name: str = LISTENER) -> listener_pb2.Listener:
    listener = _bundle(out, ("echo-1", SERVER_KEY)).resources[TYPE.LISTENER][name]
    assert isinstance(listener, listener_pb2.Listener)
    return listener


def _manager(listener: listener_pb2.Listener) -> hcm.HttpConnectionManager:
    manager = hcm.HttpConnectionManager()
    assert listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    return manager


def _allowed(listener: listener_pb2.Listener) -> list[str]:
    """The exact principal names of the listener's ALLOW filter."""
    manager = _manager(listener)
    allow = next(f for f in manager.http_filters if f.name == AUTHZ_ALLOW)
    rbac = rbac_pb2.RBAC()
    assert allow.typed_config.Unpack(rbac)
    return sorted(p.authenticated.principal_name.exact for pol in rbac.rules.policies.values() for p in pol.principals)


def _allow(reg: Registry, service: str) -> str:
    key = "AuthorizationPolicy/default/echo-callers"
    reg.put_document("policies", key, {"kind": "AuthorizationPolicy", "name": "echo-callers", "namespace": "default",
                                       "service": "echo", "rules": [{"from": [{"services": [service]}]}]})
    return key


def test_listening_addresses_are_read_as_ip_and_port_and_named_as_grpc_prints_them() -> None:
    assert server_addresses(["127.0.0.1:1", "[::]:2", "host:3", "1.2.3.4", 7]) == [("127.0.0.1", 1), ("::", 2)]
    assert server_addresses(" 0.0.0.0:5 , [::1]:6,0.0.0.0:5") == [("0.0.0.0", 5), ("::1", 6)]
    assert server_addresses(None) == [] and server_addresses("10.0.0.1:0") == []
    assert server_listener_name("::", 8) == "grpc/server?xds.resource.listening_address=[::]:8"


def test_a_server_node_gets_its_listeners_with_mtls_rbac_and_a_non_forwarding_route() -> None:
    reg, _, mesh, proxyless = _mesh(allow="a")
    out = _produce(mesh, proxyless, Changes(everything=True))
    bundle = _bundle(out, ("echo-1", SERVER_KEY))
    assert sorted(bundle.resources[TYPE.LISTENER]) == sorted([LISTENER, server_listener_name("::", 7000)]), \
        f"expected one listener per listening address, got {sorted(bundle.resources[TYPE.LISTENER])}"
    assert TYPE.LISTENER in bundle.unlisted, "expected the server's listeners out of wildcard LDS"
    listener = _listener(out)
    assert listener.address.socket_address.address == "127.0.0.1" and listener.address.socket_address.port_value == 7000
    chain = listener.filter_chains[0]
    ctx = tls_pb2.DownstreamTlsContext()
    assert chain.transport_socket.typed_config.Unpack(ctx), f"expected a DownstreamTlsContext, got {chain.transport_socket}"
    common = ctx.common_tls_context
    assert ctx.require_client_certificate.value, "expected a client certificate required"
    assert common.tls_certificate_provider_instance.instance_name == CERT_PROVIDER
    assert common.validation_context.ca_certificate_provider_instance.instance_name == CERT_PROVIDER
    assert not common.validation_context.match_subject_alt_names, "expected any mesh caller accepted at TLS (RBAC decides)"
    manager = _manager(listener)
    assert [f.name for f in manager.http_filters] == [AUTHZ_ALLOW, "envoy.filters.http.router"]
    assert _allowed(listener) == [f"spiffe://{TD}/ns/default/sa/a"]
    route = manager.route_config.virtual_hosts[0].routes[0]
    assert manager.route_config.virtual_hosts[0].domains == ["*"] and route.HasField("non_forwarding_action"), f"got {route}"
    # nodes that serve nothing get no server listeners
    assert ("a-1", SERVER_KEY) not in out and ("old-1", SERVER_KEY) not in out


def test_a_policy_change_rebuilds_the_server_listener_and_no_policy_means_no_rbac() -> None:
    reg, _, mesh, proxyless = _mesh()
    out = _produce(mesh, proxyless, Changes(everything=True))
    assert [f.name for f in _manager(_listener(out)).http_filters] == ["envoy.filters.http.router"], "expected no RBAC without a policy"
    key = _allow(reg, "c")
    out = _produce(mesh, proxyless, Changes(other={key}))
    assert _allowed(_listener(out)) == [f"spiffe://{TD}/ns/default/sa/c"], "expected the server's listener to follow the policy"


def test_clients_with_an_identity_get_tls_clusters_for_services_with_identities_only() -> None:
    reg, _, mesh, proxyless = _mesh()
    out = _produce(mesh, proxyless, Changes(everything=True))
    clusters = _bundle(out, ("a-1", tls_key("echo.default"))).resources[TYPE.CLUSTER]
    cluster = clusters[ECHO_CLUSTER]
    assert isinstance(cluster, cluster_pb2.Cluster)
    ctx = tls_pb2.UpstreamTlsContext()
    assert cluster.transport_socket.typed_config.Unpack(ctx), f"expected an UpstreamTlsContext, got {cluster.transport_socket}"
    common = ctx.common_tls_context
    assert common.tls_certificate_provider_instance.instance_name == CERT_PROVIDER
    assert common.validation_context.ca_certificate_provider_instance.instance_name == CERT_PROVIDER
    assert [m.exact for m in common.validation_context.match_subject_alt_names] == [ECHO_ID]
    assert not cluster.transport_socket_matches and cluster.eds_cluster_config.service_name == ECHO_CLUSTER
    assert out.get(("a-1", tls_key("plain.default"))) is None, "expected no TLS to a service without identities"
    assert not any(k[0] == "old-1" and v is not None for k, v in out.items()), "expected nothing of its own for a client without identity"
    # the echo server node is a client too (it has an identity): it gets them as well
    assert out.get(("echo-1", tls_key("echo.default"))) is not None
    # the service's instances lose their identity: the client's TLS copy goes, the shared cluster applies again
    reg.register(Instance(id="echo-1", service="echo", address="127.0.0.1", ports={"grpc": 7000}), replace=True)
    out = _produce(mesh, proxyless, Changes(endpoints={"echo.default"}, instances={"echo-1"}))
    assert (("a-1", tls_key("echo.default")) in out) and out[("a-1", tls_key("echo.default"))] is None


def test_identities_off_mean_a_plaintext_server_listener_and_no_tls_clusters() -> None:
    reg, _, mesh, proxyless = _mesh(identity=False, allow="a")
    out = _produce(mesh, proxyless, Changes(everything=True))
    listener = _listener(out)
    assert not listener.filter_chains[0].HasField("transport_socket"), "expected plaintext without identities"
    assert _allowed(listener) == [f"spiffe://{TD}/ns/default/sa/a"], "expected the rules still there (a plaintext caller matches none)"
    assert not any(k[1].startswith("tls-clusters") and v is not None for k, v in out.items())
