"""The ground floor, xds/resource.py: what a sidecar's bootstrap writes is what the control plane
reads back, hand-assembled fields parse as protobuf, and the type URLs name the messages served."""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import extension_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import wrappers_pb2
from hypothesis import given
from hypothesis import strategies as st

from meshpilot.meshdns.dns_pb2 import DnsService
from meshpilot.sidecar.render import SidecarOptions, render_bootstrap
from meshpilot.sidecar.spec import load_spec
from meshpilot.translate.bootstrap import BootstrapOptions, build_bootstrap
from meshpilot.xds.resource import META, PUSH_ORDER, TYPE, NodeInfo, node_info, string_field, strings_field, varint

_name = st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True)
_port = st.integers(1, 65535)
_address = st.sampled_from(["127.0.0.1", "10.0.0.7", "::1", "0.0.0.0"])

SPEC = """
metadata: {name: reviews, namespace: shop, labels: {version: v2}}
spec: {ports: [{name: http, port: 80, targetPort: 9080}]}
mesh:
  healthCheck: {http: {path: /healthz}}
  sidecar: {advertiseAddress: 10.0.0.9}
"""


def _keys() -> set[str]:
    return {v for k, v in vars(META).items() if not k.startswith("_")}


@given(service=_name, namespace=_name, outbound=_port, inbound=_port, app=st.integers(0, 65535), app_address=_address,
       bind=_address, capture=st.booleans())
def test_the_node_read_back_is_the_node_the_bootstrap_describes(service: str, namespace: str, outbound: int, inbound: int,
                                                                 app: int, app_address: str, bind: str, capture: bool) -> None:
    o = BootstrapOptions(node_id="n1", service=service, namespace=namespace, zone="z1", outbound_port=outbound,
                         inbound_port=inbound, app_port=app, app_address=app_address, bind_address=bind, capture=capture)
    node = build_bootstrap(o)["node"]
    got = node_info(node["id"], node["cluster"], node["metadata"], node["locality"]["zone"])
    want = NodeInfo(id="n1", cluster=service, service=service, namespace=namespace, zone="z1", outbound_port=outbound,
                    inbound_port=inbound if app else 0, app_port=app, app_address=app_address, bind_address=bind,
                    capture=capture)
    assert got == want, f"expected {want}, got {got}"


def test_a_sidecar_writes_only_keys_the_contract_names() -> None:
    md: dict[str, Any] = render_bootstrap(load_spec(SPEC), SidecarOptions(node_id="reviews-1"))["node"]["metadata"]
    unnamed = set(md) - _keys()
    assert not unnamed, f"expected every metadata key to be a META constant, these are not: {sorted(unnamed)}"
    unwritten = _keys() - set(md) - {META.PROXYLESS, META.GRPC_HOSTNAME}
    assert not unwritten, f"expected a sidecar to write every META key but the proxyless ones, missing: {sorted(unwritten)}"


@given(st.sampled_from([META.PROXYLESS, META.GRPC_HOSTNAME]), st.sampled_from([True, "true", "1"]))
def test_proxyless_clients_are_told_apart(key: str, value: object) -> None:
    got = node_info("grpc-1", "", {key: value})
    assert got.proxyless and not node_info("envoy-1", "", {}).proxyless, f"expected {key}={value!r} to mark a proxyless node, got {got}"


@given(st.dictionaries(st.sampled_from(sorted(_keys())), st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                                                                    st.text(max_size=5), st.lists(st.integers(), max_size=2))))
def test_junk_metadata_yields_a_node_in_bounds(md: dict[str, Any]) -> None:
    got = node_info("n", "c", md)
    ports = (got.outbound_port, got.inbound_port, got.app_port)
    assert all(0 <= p <= 65535 for p in ports) and got.namespace and got.bind_address, f"expected ports in range and defaults, got {got}"


@given(version=st.text(max_size=40), type_url=st.text(max_size=80), nonce=st.text(max_size=12),
       removed=st.lists(st.text(max_size=20), max_size=4))
def test_hand_assembled_fields_parse_as_protobuf(version: str, type_url: str, nonce: str, removed: list[str]) -> None:
    raw = string_field(1, version) + string_field(4, type_url) + string_field(5, nonce)
    got = discovery_pb2.DiscoveryResponse.FromString(raw)
    assert (got.version_info, got.type_url, got.nonce) == (version, type_url, nonce), f"expected {(version, type_url, nonce)}, got {got}"
    delta = discovery_pb2.DeltaDiscoveryResponse.FromString(string_field(5, nonce) + strings_field(6, removed))
    assert list(delta.removed_resources) == removed, f"expected {removed}, got {list(delta.removed_resources)}"


@given(st.integers(0, 2**64 - 1))
def test_varint_matches_protobuf(n: int) -> None:
    got = wrappers_pb2.UInt64Value.FromString(varint(1 << 3) + varint(n)).value  # field 1, wire type 0
    assert got == n, f"expected {n}, got {got}"


def test_each_type_url_names_the_message_served() -> None:
    messages = (cluster_pb2.Cluster, endpoint_pb2.ClusterLoadAssignment, listener_pb2.Listener, route_pb2.RouteConfiguration,
                extension_pb2.TypedExtensionConfig, DnsService)
    want = [f"type.googleapis.com/{m.DESCRIPTOR.full_name}" for m in messages]
    assert list(PUSH_ORDER) == want, f"expected the push order {want}, got {list(PUSH_ORDER)}"
    named = {v for k, v in vars(TYPE).items() if not k.startswith("_")}
    assert named == set(want), f"expected every type URL to have its place in the push order, got {sorted(named ^ set(want))}"


def test_a_packed_message_has_its_map_fields_in_key_order_whatever_the_process() -> None:
    # an Envoy moving between control-plane replicas is sent nothing again only if every replica
    # gives the same resource the same bytes (its version is their hash); a Struct's map would
    # otherwise come out in the order of the process's hash table
    from google.protobuf import struct_pb2

    from meshpilot.xds.resource import pack

    keys = [f"field-{i:02d}" for i in range(24)]
    s = struct_pb2.Struct()
    for k in reversed(keys):
        s.fields[k].string_value = k
    raw = pack(s).value
    where = [raw.index(k.encode()) for k in keys]
    assert where == sorted(where), f"expected the keys in sorted order on the wire, got positions {where}"
