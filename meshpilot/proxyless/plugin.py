"""Serves proxyless gRPC clients: ApiListeners and their route configurations in the shared cache.

The Listeners are put with ``wildcard=False``: a sidecar's wildcard LDS subscription never sees
them, a gRPC client that names one gets it. Clusters and endpoints are the shared ones every Envoy
gets (gRPC clients subscribe to them by name). Routes follow the services' routing overlays
(routing policies), so a weight change reaches gRPC clients in the same push as the sidecars.
"""

from __future__ import annotations

from google.protobuf.message import Message

from meshpilot.controlplane import ControlPlane
from meshpilot.proxyless.resources import PROTOCOLS, build_api_listener, build_proxyless_routes, listener_names, route_name
from meshpilot.xds.resource import TYPE
from meshpilot.translate.routes import short_name_owners

__all__ = ["ProxylessBuilder", "install"]


class ProxylessBuilder:
    """Shared builder: keeps each service's proxyless listeners and routes up to date."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self._listeners: dict[str, set[str]] = {}  # service key -> listener names
        self._routes: dict[str, set[str]] = {}  # service key -> route configuration names
        self._owners: set[str] = set()

    def __call__(self, changed: set[str]) -> None:
        reg = self.cp.registry
        services = reg.services()
        owners = short_name_owners(services)
        if "*" in changed:
            keys = {s.key for s in services} | set(self._listeners)
        else:
            keys = {k for k in changed if k in self._listeners or reg.service(k) is not None}
            keys |= owners ^ self._owners  # a bare name changed hands
        self._owners = owners
        for key in sorted(keys):
            self._build(key, key in owners)

    def _build(self, key: str, short: bool) -> None:
        domain = self.cp.settings.domain
        svc = self.cp.registry.service(key)
        listeners: dict[str, Message] = {}
        routes: dict[str, Message] = {}
        if svc is not None:
            routing = self.cp.service_routing(key)
            for port in svc.ports:
                if port.protocol not in PROTOCOLS:
                    continue
                rname = route_name(svc, port)
                routes[rname] = build_proxyless_routes(svc, port, domain, routing)
                for name in listener_names(svc, port, domain, short=short):
                    listeners[name] = build_api_listener(name, rname)
        cache = self.cp.cache
        # routes before listeners: a new listener finds its routes already there
        cache.put(TYPE.ROUTE, routes)
        cache.put(TYPE.LISTENER, listeners, wildcard=False)
        cache.remove(TYPE.LISTENER, self._listeners.get(key, set()) - set(listeners))
        cache.remove(TYPE.ROUTE, self._routes.get(key, set()) - set(routes))
        if svc is None:
            self._listeners.pop(key, None)
            self._routes.pop(key, None)
        else:
            self._listeners[key] = set(listeners)
            self._routes[key] = set(routes)


def install(cp: ControlPlane) -> ProxylessBuilder:
    builder = ProxylessBuilder(cp)
    cp.add_shared_builder(builder)
    return builder
