"""Proxyless gRPC: xDS resources for gRPC clients that resolve ``xds:///`` targets themselves
(listeners named as the target, holding ApiListeners; per-service-port routes)."""
