"""The API catalog as a part of the control plane: its routes on the management API (with "try it"
when ``try_it_proxy`` names the control plane's own sidecar), and the
supervised task that keeps each catalogued service's ``apis`` equal to its current catalog version
(a service written without them, by this replica's API or another front door, gets them back).

Replicas on a shared store follow each other's catalogs through the store itself (every read is of
the store's view); each replica reconciles only the service writes it made, so two never race to
put the same service back.
"""

from __future__ import annotations

import asyncio

from meshpilot.catalog.routes import catalog_routes
from meshpilot.catalog.tryit import TryIt
from meshpilot.catalog.versions import Catalog
from meshpilot.parts import Core, Part, Task
from meshpilot.registry import Change

__all__ = ["install"]


def install(core: Core) -> Part:
    registry = core.registry
    catalog = Catalog(registry)
    pending: set[str] = set()
    wake = asyncio.Event()

    def on_change(change: Change) -> None:
        if change.kind == "service" and change.op == "put" and not change.remote:
            pending.add(change.key)
            wake.set()

    registry.subscribe(on_change)

    async def catalog_apis() -> None:
        for svc in registry.services():  # writes made while this replica was down
            await catalog.reconcile(svc.key)
        while True:
            await wake.wait()
            wake.clear()
            keys = sorted(pending)
            pending.clear()
            for key in keys:
                await catalog.reconcile(key)
            await registry.store.sync()

    def own() -> set[tuple[str, int]]:
        """The control plane's listeners: the ports it bound (ControlPlane.ports, once serving) and the
        ones configured, on its listen address."""
        s = core.settings
        bound = getattr(core, "ports", None)
        ports = {p for p in (bound.values() if isinstance(bound, dict) else ()) if isinstance(p, int) and p}
        ports |= {p for p in (s.api_port, s.xds_port, s.consul_port, s.eureka_port) if p}
        return {(s.listen_address, p) for p in ports}

    try_it = TryIt(core.settings.try_it_proxy) if core.settings.try_it_proxy else None
    return Part(routes=catalog_routes(registry, try_it, own), tasks=[Task("catalog_apis", catalog_apis)])
