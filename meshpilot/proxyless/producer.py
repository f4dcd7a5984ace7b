"""Serves proxyless gRPC clients: a producer of ApiListeners and their route configurations.

The Listeners are published unlisted: a sidecar's wildcard LDS subscription never sees them, a
gRPC client that names one gets it. Clusters and endpoints are the shared ones every Envoy gets
(gRPC clients subscribe to them by name). Routes follow the services' routing overlays (routing
policies, staged ones included), so a weight change reaches gRPC clients in the same push as the
sidecars. One key per service; the publisher removes what a service no longer has.
"""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf.message import Message

from meshpilot.proxyless.resources import PROTOCOLS, build_api_listener, build_proxyless_routes, listener_names, route_name
from meshpilot.publish.publisher import Bundle, Changes, Output, Producer
from meshpilot.registry import Registry
from meshpilot.translate.routes import ServiceRouting, short_name_owners
from meshpilot.xds.resource import TYPE

__all__ = ["ProxylessProducer"]


class ProxylessProducer(Producer):
    def __init__(self, registry: Registry, domain: str, routing: Callable[[str], ServiceRouting | None]) -> None:
        self.registry = registry
        self.domain = domain
        self.routing = routing
        self._owners: set[str] = set()  # services that own their bare name

    def produce(self, changes: Changes, now: float) -> Output:
        reg = self.registry
        keys = changes.services | changes.rerouted
        if changes.everything or changes.services:
            services = reg.services()
            owners = short_name_owners(services)
            if changes.everything:
                keys = keys | {s.key for s in services}
            keys = keys | (owners ^ self._owners)  # a bare name changed hands
            self._owners = owners
        return {("", key): self._bundle(key) for key in sorted(keys)}

    def _bundle(self, key: str) -> Bundle | None:
        svc = self.registry.service(key)
        if svc is None:
            return None
        listeners: dict[str, Message] = {}
        routes: dict[str, Message] = {}
        routing = self.routing(key)
        for port in svc.ports:
            if port.protocol not in PROTOCOLS:
                continue
            rname = route_name(svc, port)
            routes[rname] = build_proxyless_routes(svc, port, self.domain, routing)
            for name in listener_names(svc, port, self.domain, short=key in self._owners):
                listeners[name] = build_api_listener(name, rname)
        return Bundle({TYPE.ROUTE: routes, TYPE.LISTENER: listeners}, unlisted=frozenset({TYPE.LISTENER}))
