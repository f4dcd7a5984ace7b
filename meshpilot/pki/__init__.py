"""Workload identity primitives, pure and store-free: SPIFFE ids, keys and CSRs, the certificate
authority's signing, trust bundles, reading a peer's certificate, join-token secrets. The control
plane's CA (meshpilot/identity/) and the node's agent (meshpilot/sidecar/) both stand on it."""
