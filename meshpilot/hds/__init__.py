"""The Health Discovery Service: how sidecar apps join the registry and report their health.

A front door like consul/ and eureka/: a sidecar's Envoy opens
``envoy.service.health.v3.HealthDiscoveryService/StreamHealthCheck``, its first message carries the
node, and from the node's metadata (metadata.py) its app is registered as an instance; the answer
(specifier.py) tells that Envoy to check its own app, and its reports drive the instance's ``hds``
check. The stream is a machine without I/O (stream.py), the lost-stream rules are another
(liveness.py); server.py is the gRPC glue, synced.py the graceful-offline route, plugin.py puts the
parts together for the control plane.
"""
