"""Prometheus metrics of the control plane, served as text on the management API's ``/metrics``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["REGISTRY", "render"]

REGISTRY = CollectorRegistry(auto_describe=True)

XDS_STREAMS = Gauge("meshpilot_xds_streams", "Connected xDS streams", ["stream_type"], registry=REGISTRY)
XDS_PUSHES = Counter("meshpilot_xds_pushes", "xDS responses sent", ["type", "stream_type"], registry=REGISTRY)
XDS_NACKS = Counter("meshpilot_xds_nacks", "xDS responses rejected by a client", ["type"], registry=REGISTRY)
XDS_STREAMS_ABORTED = Counter(
    "meshpilot_xds_streams_aborted", "xDS streams the server ended with an error status", ["code"], registry=REGISTRY
)
XDS_REFUSED = Counter(
    "meshpilot_xds_streams_refused", "xDS and HDS streams refused for their client's identity (no certificate, or another node's)",
    ["reason"], registry=REGISTRY
)
XDS_PUSH_SECONDS = Histogram(
    "meshpilot_xds_push_seconds",
    "Time from a cache change to the response that carries it",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
STORE_CURRENT = Gauge("meshpilot_store_current", "1 while this replica's view of its store is current, 0 while it is cut off",
                      registry=REGISTRY)
STORE_CURRENT.set(1)
STORE_COMMITS = Gauge("meshpilot_store_commits", "Durable commits the store has made (SQLite transactions, etcd Txns); "
                      "registrations per commit grow with concurrent writers", registry=REGISTRY)
REGISTRY_WRITES = Counter("meshpilot_registry_changes", "Registry change events", ["kind"], registry=REGISTRY)
REBUILDS = Counter("meshpilot_translate_rebuilds", "Debounced rebuilds of Envoy resources", registry=REGISTRY)
API_REQUESTS = Counter("meshpilot_api_requests", "Management API requests", ["method", "status"], registry=REGISTRY)
IDENTITY_ISSUED = Counter(
    "meshpilot_identity_certificates_issued", "Workload certificates the mesh CA signed", ["kind"], registry=REGISTRY
)
IDENTITY_REFUSED = Counter(
    "meshpilot_identity_sign_refused", "Sign requests the mesh CA refused", ["reason"], registry=REGISTRY
)


def render() -> bytes:
    return generate_latest(REGISTRY)
