"""meshpilot: a service-mesh control plane for stock Envoy, without Kubernetes.

See the README for a tour and DESIGN.md (shared) for the architecture.
"""

__version__ = "0.1.0"
