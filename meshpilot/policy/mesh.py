"""The policies in force, as the mesh's translation and the publisher see them.

``Policies`` loads every kind, holds the engine (the validated policies and their translations)
and governance (breaker and limit policies in the data plane), and answers the registry's
translation (publish/mesh.py ``MeshPolicy``): routing overlays, outlier overrides, the filters
sidecars' listeners carry and where routes switch them off. Sidecars' outbound listeners get
Envoy's fault filter (idle unless a route carries a fault override), so a policy that adds or
removes a fault changes only routes, never listeners, and keep-alive connections see it at once.
Its producers (``producers``) are the engine's kind resources and governance's filter configs;
``routes`` serves the governance WASM module through the management API.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Callable, Mapping
from types import ModuleType

from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from google.protobuf import any_pb2

import meshpilot.policy
from meshpilot.api.routes import Route
from meshpilot.model import Service
from meshpilot.policy.engine import PolicyEngine
from meshpilot.policy.governance import Governance, WasmModule
from meshpilot.publish.publisher import Producer
from meshpilot.registry import Registry
from meshpilot.translate.routes import FAULT_FILTER, ServiceRouting
from meshpilot.xds.resource import NodeInfo

__all__ = ["Policies", "fault_filter", "load_kinds"]

log = logging.getLogger("meshpilot.policy")

_FRAMEWORK = {"api", "command", "engine", "governance", "kinds", "mesh", "plugin"}


def load_kinds() -> list[ModuleType]:
    """Import every kind module of this package (each registers its kind)."""
    return [
        importlib.import_module(f"meshpilot.policy.{info.name}")
        for info in pkgutil.iter_modules(meshpilot.policy.__path__)
        if info.name not in _FRAMEWORK and not info.name.startswith("_")
    ]


def fault_filter() -> hcm.HttpFilter:
    """Envoy's fault filter with no fault of its own: routes switch it on per route."""
    cfg = any_pb2.Any()
    cfg.Pack(fault_pb2.HTTPFault())
    return hcm.HttpFilter(name=FAULT_FILTER, typed_config=cfg)


def _module() -> WasmModule | None:
    try:
        return WasmModule.load("mesh")
    except (FileNotFoundError, ValueError) as exc:
        log.error("event=governance_disabled reason=%r", str(exc))
        return None


class Policies:
    def __init__(
        self,
        registry: Registry,
        domain: str,
        listen_address: str,
        nodes: Mapping[str, NodeInfo],
        ports: Mapping[str, int],
        routing: Callable[[str], ServiceRouting | None],
    ) -> None:
        """``routing``: the overlays services are built with (staged ones included), which the
        breakers' rules follow."""
        load_kinds()
        self.engine = PolicyEngine(registry, domain)
        self.governance = Governance(registry, self.engine, _module(), domain, listen_address, nodes, ports, routing)

    @property
    def producers(self) -> list[Producer]:
        return [self.engine, self.governance]

    def routes(self) -> list[Route]:
        """The management API's route to the governance module, as sidecars fetch it."""
        summary = "The governance WASM module, as sidecars fetch it (ETag and X-Meshpilot-Sha256: its sha256)"
        return [Route("GET", "/v1/wasm/{name}", self.governance.serve_module, summary)]

    def affected(self, changed: set[str]) -> set[str]:
        return self.engine.affected(changed) | self.governance.affected(changed)

    def routing(self, service_key: str) -> ServiceRouting | None:
        return self.engine.routing(service_key)

    def override(self, service: Service) -> Service:
        return self.governance.override(service)

    def optional_route_filters(self) -> dict[str, frozenset[str]]:
        return self.governance.optional_route_filters()

    def node_filters(self, node: NodeInfo, direction: str) -> list[hcm.HttpFilter]:
        own = [fault_filter()] if direction == "outbound" else []
        return own + self.governance.node_filters(node, direction)

    def inbound_filters(self, node: NodeInfo) -> tuple[list[str], list[str]]:
        return self.governance.inbound_filters(node)
