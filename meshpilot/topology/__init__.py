"""The mesh as a graph: a Prometheus scrape configuration for every sidecar and the control plane, and
request rate, errors and latency per service and per caller → callee edge, served by the management API."""
