"""The xDS server's query "has node N ACKed these names of type T?", which HDS's graceful-offline
route asks instead of reading stream internals. Driven through the real stream machines."""

from __future__ import annotations

import asyncio

from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2

from meshpilot.xds.cache import ResourceCache
from meshpilot.xds.resource import TYPE, NodeInfo
from meshpilot.xds.server import StreamHandle, XdsServer
from meshpilot.xds.stream import DeltaStream, SotwStream

E = TYPE.ENDPOINT


def _cla(name: str, port: int) -> endpoint_pb2.ClusterLoadAssignment:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    sa = cla.endpoints.add().lb_endpoints.add().endpoint.address.socket_address
    sa.address, sa.port_value = "127.0.0.1", port
    return cla


def _attach(server: XdsServer, machine: SotwStream | DeltaStream, node_id: str) -> None:
    sid = len(server.streams) + 1
    server.streams[sid] = StreamHandle(sid, machine, asyncio.Event(), "peer", node=NodeInfo(node_id))


def test_sotw_and_delta_consumers_are_acked_only_once_they_answer_the_current_version() -> None:
    cache = ResourceCache()
    server = XdsServer(cache)
    cache.put(E, {"a": _cla("a", 1), "b": _cla("b", 2)})
    sotw, delta, other = SotwStream(cache, "s1"), DeltaStream(cache, "d1"), SotwStream(cache, "x1")
    for machine, node in ((sotw, "s1"), (delta, "d1"), (other, "x1")):
        cache.watch(machine.notify)
        _attach(server, machine, node)
    sotw.receive(discovery_pb2.DiscoveryRequest(type_url=E, resource_names=["a"]))
    delta.receive(discovery_pb2.DeltaDiscoveryRequest(type_url=E, resource_names_subscribe=["a", "b"]))
    other.receive(discovery_pb2.DiscoveryRequest(type_url=E, resource_names=["b"]))  # not a consumer of a
    [(_, raw)] = sotw.responses()
    s_resp = discovery_pb2.DiscoveryResponse.FromString(raw)
    [(_, raw)] = delta.responses()
    d_resp = discovery_pb2.DeltaDiscoveryResponse.FromString(raw)

    got = sorted(server.ack_status(E, {"a"}))
    assert got == [("d1", False), ("s1", False)], f"expected two consumers of a, neither ACKed yet, got {got}"
    sotw.receive(discovery_pb2.DiscoveryRequest(type_url=E, resource_names=["a"], version_info=s_resp.version_info, response_nonce=s_resp.nonce))
    delta.receive(discovery_pb2.DeltaDiscoveryRequest(type_url=E, response_nonce=d_resp.nonce))
    got = sorted(server.ack_status(E, {"a"}))
    assert got == [("d1", True), ("s1", True)], f"expected both ACKed after their answers, got {got}"
    assert server.has_acked("s1", E, {"a"}) and server.has_acked("nobody", E, {"a"}), "expected True for ACKed and for no stream"

    cache.put(E, {"a": _cla("a", 9)})  # a new version nobody has ACKed
    assert not server.has_acked("s1", E, {"a"}) and not server.has_acked("d1", E, {"a"}), \
        f"expected a new version to be un-ACKed, got {server.ack_status(E, {'a'})}"
    assert server.has_acked("x1", E, {"a"}), "a stream not subscribed to a has nothing to ACK"
    assert server.ack_status(TYPE.CLUSTER, {"a"}) == [], "no stream subscribes to clusters"


async def test_a_change_not_yet_told_to_the_streams_is_not_acked() -> None:
    """Inside the served loop a cache change reaches the streams a moment later; a query asked in
    that moment must not answer with the old state."""
    cache = ResourceCache()
    server = XdsServer(cache)
    cache.put(E, {"a": _cla("a", 1)})
    await asyncio.sleep(0)  # the server tells the streams
    sotw = SotwStream(cache, "s1")
    cache.watch(sotw.notify)
    _attach(server, sotw, "s1")
    sotw.receive(discovery_pb2.DiscoveryRequest(type_url=E, resource_names=["a"]))
    [(_, raw)] = sotw.responses()
    r = discovery_pb2.DiscoveryResponse.FromString(raw)
    sotw.receive(discovery_pb2.DiscoveryRequest(type_url=E, resource_names=["a"], version_info=r.version_info, response_nonce=r.nonce))
    assert server.has_acked("s1", E, {"a"}), f"expected the ACKed response to count, got {server.ack_status(E, {'a'})}"
    cache.put(E, {"a": _cla("a", 2)})
    assert not server.has_acked("s1", E, {"a"}), "expected a change still on its way to the stream to be un-ACKed"
    await asyncio.sleep(0)  # the server tells the streams
    assert sotw.pending and not server.has_acked("s1", E, {"a"}), "expected the told stream to owe the change"
    [(_, raw)] = sotw.responses()
    r = discovery_pb2.DiscoveryResponse.FromString(raw)
    sotw.receive(discovery_pb2.DiscoveryRequest(type_url=E, resource_names=["a"], version_info=r.version_info, response_nonce=r.nonce,
                                                error_detail={"message": "rejected"}))
    assert not server.has_acked("s1", E, {"a"}), "expected a NACKed change to be un-ACKed"
