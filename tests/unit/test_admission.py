"""Which node a client certificate may speak for, on the xDS and HDS streams (identity on)."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.service.health.v3 import hds_pb2

from meshpilot.hds.stream import HdsStream, Refused, Register, Reject
from meshpilot.model import Instance
from meshpilot.pki import Peer
from meshpilot.pki.admission import refusal
from meshpilot.xds.resource import NodeInfo

TD = "mesh.local"
WEB = Peer("spiffe://mesh.local/ns/default/sa/web", TD, "default", "web", "web-1", 2e9)


def test_a_node_may_speak_for_itself_and_its_auxiliary_streams() -> None:
    assert refusal(WEB, TD, "web-1", "web", "default") is None
    assert refusal(WEB, TD, "web-1~meshdns") is None, "the node's meshdns table stream is the node's own"
    assert refusal(WEB, TD, "web-1", "") is None, "a node that names no service gets the shared resources"


@pytest.mark.parametrize(
    ("peer", "node_id", "service", "namespace", "authenticated", "says"),
    [
        (None, "web-1", "web", "default", False, "client certificate"),
        (WEB, "db-1", "db", "default", True, "not the certificate's node"),
        (WEB, "web-10", "web", "default", True, "not the certificate's node"),  # a prefix is not the node
        (WEB, "web-1", "db", "default", True, "claims service db.default"),
        (WEB, "web-1", "web", "prod", True, "claims service web.prod"),
        (Peer("spiffe://other.td/ns/default/sa/web", "other.td", "default", "web", "web-1", 2e9), "web-1", "web", "default", True, "trust domain"),
        (Peer("spiffe://mesh.local/meshpilot/control-plane", TD, "", "", "", 2e9), "web-1", "", "default", True, "no node's"),
        (Peer("spiffe://mesh.local/ns/default/sa/web", TD, "default", "web", "", 2e9), "", "", "default", True, "names no node"),
    ],
)
def test_everything_else_is_refused_with_the_reason(
    peer: Peer | None, node_id: str, service: str, namespace: str, authenticated: bool, says: str
) -> None:
    no = refusal(peer, TD, node_id, service, namespace)
    assert no is not None, f"expected {node_id} ({service}.{namespace}) refused for {peer}"
    assert no.authenticated is authenticated and says in no.reason, no


def _hello(node_id: str, service: str) -> hds_pb2.HealthCheckRequestOrEndpointHealthResponse:
    msg = hds_pb2.HealthCheckRequestOrEndpointHealthResponse()
    node = msg.health_check_request.node
    node.id = node_id
    node.metadata.update({
        "SERVICE": service, "NAMESPACE": "default", "INBOUND_PORT": 15006, "APP_PORT": 8080, "PORT_NAME": "http",
        "HEALTH_CHECK": {"kind": "tcp"},
    })
    return msg


def _admit_as(peer: Peer | None) -> Any:
    def admit(node: NodeInfo) -> str:
        no = refusal(peer, TD, node.id, node.service, node.namespace)
        if no is not None:
            raise Refused(no.reason, no.authenticated)
        assert peer is not None
        return peer.spiffe
    return admit


def test_an_admitted_sidecar_registers_its_instance_with_its_identity() -> None:
    effects = HdsStream(1.0, lambda n: "", _admit_as(WEB)).receive(_hello("web-1", "web"), 0.0, {}.get)
    reg = effects[0]
    assert isinstance(reg, Register), effects
    assert reg.instance.metadata.get("spiffe") == WEB.spiffe, f"expected the instance to carry its SPIFFE id: {reg.instance.metadata}"


@pytest.mark.parametrize(
    ("peer", "node_id", "service", "code"),
    [
        (None, "web-1", "web", "UNAUTHENTICATED"),  # anonymous: registers nothing
        (WEB, "db-1", "db", "PERMISSION_DENIED"),  # another node of another service
        (WEB, "web-1", "db", "PERMISSION_DENIED"),  # its own node id, another service's instance
        (WEB, "web-2", "web", "PERMISSION_DENIED"),  # another node of its own service
        (WEB, "web-1~meshdns", "web", "PERMISSION_DENIED"),  # an auxiliary stream registers nothing
    ],
)
def test_hds_registers_nothing_for_a_stranger_or_another_node(peer: Peer | None, node_id: str, service: str, code: str) -> None:
    stream = HdsStream(1.0, lambda n: "", _admit_as(peer))
    effects = stream.receive(_hello(node_id, service), 0.0, {}.get)
    assert len(effects) == 1 and isinstance(effects[0], Reject) and effects[0].code == code, \
        f"expected one {code} refusal and nothing registered, got {effects}"


def test_hds_does_not_take_over_an_instance_another_front_door_registered() -> None:
    consul = Instance(id="web-1", service="web", namespace="default", address="10.0.0.9", ports={"http": 8080}, source="consul")
    effects = HdsStream(1.0, lambda n: "", _admit_as(WEB)).receive(_hello("web-1", "web"), 0.0, {"web-1": consul}.get)
    assert len(effects) == 1 and isinstance(effects[0], Reject) and "consul" in effects[0].reason, effects


def test_identity_needs_a_token_for_the_management_api(tmp_path: Any) -> None:
    from meshpilot.settings import load_settings

    with pytest.raises(ValueError, match="identity: needs token"):
        load_settings(identity=True, store="memory:")
    secret = tmp_path / "token"
    secret.write_text("s3cret\n")
    assert load_settings(identity=True, store="memory:", token_file=str(secret)).token == "s3cret"
    assert load_settings(identity=False, store="memory:").token is None, "a plaintext development mesh may run without one"


@pytest.mark.parametrize(
    ("peer", "ip"),
    [("ipv4:10.0.0.5:4321", "10.0.0.5"), ("ipv6:[::1]:4321", "::1"), ("ipv6:[::ffff:10.0.0.5]:80", "10.0.0.5"),
     ("unix:/tmp/sock", None), ("ipv4:junk:1", None), ("", None)],
)
def test_the_address_a_sidecar_connects_from(peer: str, ip: str | None) -> None:
    import ipaddress

    from meshpilot.hds.plugin import _peer_ip

    assert _peer_ip(peer) == (ipaddress.ip_address(ip) if ip else None)
