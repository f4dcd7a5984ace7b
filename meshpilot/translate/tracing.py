"""Tracing in a sidecar's HTTP connection managers: Envoy's Zipkin tracer, reporting to the node agent.

``with_tracing`` gives every HTTP connection manager of a built listener (inbound and outbound, every
filter chain) Envoy's ``tracing`` config: the Zipkin tracer posting Zipkin v2 JSON to the bootstrap's
``meshpilot-traces`` cluster (the agent's local receiver, meshpilot/sidecar/traces.py), B3 headers
extracted and injected, W3C ``traceparent`` extracted when no B3 header came and injected beside them
(``USE_B3_WITH_W3C_PROPAGATION``), 128-bit trace ids, client and server spans with ids of their own
(so a trace is a tree of parent ids), and ``random_sampling`` at the node's TracingPolicy percentage.
A request that carries a sampling decision keeps it. Every span is tagged with the node's service key
(``mesh.service``). A node is only given tracing when its bootstrap has the collector cluster (node
metadata ``TRACE_COLLECTOR``): Envoy refuses a tracer whose cluster it does not know. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass

from envoy.config.listener.v3 import listener_pb2
from envoy.config.trace.v3 import http_tracer_pb2, zipkin_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.type.tracing.v3 import custom_tag_pb2
from envoy.type.v3 import percent_pb2

from meshpilot.telemetry.spans import COLLECTOR_CLUSTER, COLLECTOR_PATH, META_TRACE_COLLECTOR, SERVICE_TAG
from meshpilot.xds.resource import NodeInfo, pack

__all__ = ["DEFAULT_SAMPLING", "HCM_FILTER", "Tracing", "build_tracing", "node_tracing", "with_tracing"]

HCM_FILTER = "envoy.filters.network.http_connection_manager"
DEFAULT_SAMPLING = 1.0  # percent of new traces sampled where no TracingPolicy says otherwise


@dataclass(frozen=True, slots=True)
class Tracing:
    """A node's tracing: the sampling percentage of new traces, the collector cluster, the node's service key."""

    sampling: float
    cluster: str = COLLECTOR_CLUSTER
    service_key: str = ""


def node_tracing(node: NodeInfo, sampling: float) -> Tracing | None:
    """The node's tracing, or None when its bootstrap has no collector cluster (an agent without the
    receiver, or a bare Envoy)."""
    cluster = node.extra.get(META_TRACE_COLLECTOR)
    if not isinstance(cluster, str) or not cluster:
        return None
    return Tracing(sampling=min(100.0, max(0.0, sampling)), cluster=cluster, service_key=node.service_key)


def build_tracing(t: Tracing) -> hcm.HttpConnectionManager.Tracing:
    zipkin = zipkin_pb2.ZipkinConfig(
        collector_cluster=t.cluster,
        collector_endpoint=COLLECTOR_PATH,
        collector_endpoint_version=zipkin_pb2.ZipkinConfig.HTTP_JSON,
        trace_id_128bit=True,
        trace_context_option=zipkin_pb2.ZipkinConfig.USE_B3_WITH_W3C_PROPAGATION,
    )
    zipkin.shared_span_context.value = False
    out = hcm.HttpConnectionManager.Tracing(
        provider=http_tracer_pb2.Tracing.Http(name="envoy.tracers.zipkin", typed_config=pack(zipkin)),
        random_sampling=percent_pb2.Percent(value=t.sampling),
    )
    if t.service_key:
        out.custom_tags.append(custom_tag_pb2.CustomTag(tag=SERVICE_TAG, literal=custom_tag_pb2.CustomTag.Literal(value=t.service_key)))
    return out


def with_tracing(listener: listener_pb2.Listener, t: Tracing | None) -> listener_pb2.Listener:
    """The listener with tracing in every HTTP connection manager of its filter chains (in place)."""
    if t is None:
        return listener
    config = build_tracing(t)
    chains = [*listener.filter_chains, *([listener.default_filter_chain] if listener.HasField("default_filter_chain") else [])]
    for chain in chains:
        for f in chain.filters:
            if f.name != HCM_FILTER:
                continue
            manager = hcm.HttpConnectionManager()
            f.typed_config.Unpack(manager)
            manager.tracing.CopyFrom(config)
            f.typed_config.CopyFrom(pack(manager))
    return listener
