"""Wires policies into a ControlPlane: kinds, the engine, the API routes and the fault filter.

Every module of this package other than the framework's own is a kind module that registers its
kind on import, so adding a kind is adding a module. The engine becomes the control plane's
routing source and a shared builder and the policy routes join the management API's route table; sidecars' outbound listeners get Envoy's fault filter (idle
unless a route carries a fault override), so a policy that adds or removes a fault changes only
routes, never listeners, and keep-alive connections see it at once.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from google.protobuf import any_pb2

import meshpilot.policy
from meshpilot.controlplane import ControlPlane
from meshpilot.parts import Part
from meshpilot.policy.api import policy_routes
from meshpilot.policy.engine import PolicyEngine
from meshpilot.translate.routes import FAULT_FILTER
from meshpilot.xds.resource import NodeInfo

__all__ = ["fault_filter", "install", "load_kinds"]

_FRAMEWORK = {"api", "command", "engine", "kinds", "plugin"}


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


def _outbound_filters(node: NodeInfo, direction: str) -> list[hcm.HttpFilter]:
    return [fault_filter()] if direction == "outbound" else []


def install(cp: ControlPlane) -> Part:
    modules = load_kinds()
    engine = PolicyEngine(cp.registry, cp.settings.domain, cp.cache)
    cp.add_routing_source(engine)
    cp.add_shared_builder(engine.publish)
    cp.add_node_filters(_outbound_filters)
    part = Part(routes=policy_routes(cp.registry))
    # a module may also wire itself into the control plane (after the engine, which it may read)
    # and contribute routes and tasks of its own
    for module in modules:
        attach = getattr(module, "attach", None)
        if callable(attach):
            more = attach(cp, engine)
            part.routes.extend(more.routes)
            part.tasks.extend(more.tasks)
    return part
