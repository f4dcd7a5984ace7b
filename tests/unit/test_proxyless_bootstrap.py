"""The xDS bootstrap of a proxyless gRPC app (meshpilot/proxyless/bootstrap.py): one ``server_uri`` that names
every control-plane replica, so gRPC's xDS channel reconnects to another (a real grpcio client following a
killed replica is in tests/e2e/test_replica_failover.py)."""

from __future__ import annotations

import pytest

from meshpilot.proxyless.bootstrap import GrpcBootstrapOptions, build_grpc_bootstrap, xds_server_uri
from meshpilot.proxyless.server import LISTENER_TEMPLATE


@pytest.mark.parametrize("replicas,uri", [
    ((("127.0.0.1", 15010),), "127.0.0.1:15010"),
    ((("cp.example", 15010),), "cp.example:15010"),
    ((("::1", 15010),), "[::1]:15010"),
    ((("10.0.0.5", 15010), ("10.0.0.6", 15011)), "ipv4:10.0.0.5:15010,10.0.0.6:15011"),
    ((("fd00::5", 15010), ("fd00::6", 15010)), "ipv6:[fd00::5]:15010,[fd00::6]:15010"),
])
def test_one_target_names_every_replica(replicas: tuple[tuple[str, int], ...], uri: str) -> None:
    assert xds_server_uri(replicas) == uri


@pytest.mark.parametrize("replicas", [
    (("cp-0.example", 15010), ("cp-1.example", 15010)),
    (("cp-0.example", 15010), ("10.0.0.6", 15010)),
    (("10.0.0.5", 15010), ("fd00::6", 15010)),
])
def test_replicas_grpc_cannot_take_as_one_target_are_refused_with_the_way_out(replicas: tuple[tuple[str, int], ...]) -> None:
    with pytest.raises(ValueError, match="one DNS name that resolves to them all"):
        xds_server_uri(replicas)


def test_a_client_bootstrap() -> None:
    doc = build_grpc_bootstrap(GrpcBootstrapOptions(node_id="orders-7f9c", cluster="orders",
                                                    control_planes=(("10.0.0.5", 15010), ("10.0.0.6", 15010))))
    assert doc == {
        "xds_servers": [{"server_uri": "ipv4:10.0.0.5:15010,10.0.0.6:15010", "server_features": ["xds_v3"],
                         "channel_creds": [{"type": "insecure"}]}],
        "node": {"id": "orders-7f9c", "cluster": "orders", "metadata": {"PROXYLESS": True}, "locality": {"zone": ""}},
    }


def test_a_server_bootstrap_with_identity() -> None:
    doc = build_grpc_bootstrap(GrpcBootstrapOptions(
        node_id="echo-1", control_planes=(("cp.example", 15010),), service="echo", namespace="shop",
        server_addresses=("10.0.0.7:50051",), identity_dir="/run/echo/"))
    files = {"certificate_file": "/run/echo/cert.pem", "private_key_file": "/run/echo/key.pem",
             "ca_certificate_file": "/run/echo/bundle.pem", "refresh_interval": "60s"}
    assert doc["xds_servers"][0]["channel_creds"] == [{"type": "tls", "config": files}]
    assert doc["certificate_providers"] == {"mesh": {"plugin_name": "file_watcher", "config": files}}
    assert doc["server_listener_resource_name_template"] == LISTENER_TEMPLATE
    assert doc["node"]["cluster"] == "echo"
    assert doc["node"]["metadata"] == {"PROXYLESS": True, "IDENTITY": True, "SERVICE": "echo", "NAMESPACE": "shop",
                                       "GRPC_SERVER_ADDRESSES": ["10.0.0.7:50051"]}


def test_what_cannot_work_is_refused() -> None:
    with pytest.raises(ValueError, match="needs its service"):
        build_grpc_bootstrap(GrpcBootstrapOptions(node_id="s", control_planes=(("10.0.0.5", 1),),
                                                  server_addresses=("10.0.0.7:50051",)))
    with pytest.raises(ValueError, match="host name"):
        build_grpc_bootstrap(GrpcBootstrapOptions(node_id="c", control_planes=(("10.0.0.5", 1), ("10.0.0.6", 1)),
                                                  identity_dir="/run/c"))
