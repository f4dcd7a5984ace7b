"""The policies in force, as the mesh's translation and the publisher see them.

``Policies`` loads every kind, holds the engine (the validated policies and their translations)
and governance (breaker and limit policies in the data plane), and answers the registry's
translation (publish/mesh.py ``MeshPolicy``): routing overlays, outlier overrides, the filters
sidecars' listeners carry and where routes switch them off. Sidecars' outbound listeners get
Envoy's fault filter (idle unless a route carries a fault override), so a policy that adds or
removes a fault changes only routes, never listeners, and keep-alive connections see it at once.
Its producers (``producers``) are the engine's kind resources and governance's filter configs;
``routes`` serves the governance WASM module through the management API. The identity kinds
(MtlsPolicy, AuthorizationPolicy) reach the translation as each service's mTLS mode
(``mtls_modes``) and the RBAC rules of each node's inbound routes (``inbound_authz``); TracingPolicy
as the sampling rate of each node's listeners (``trace_sampling``); a change to one of them marks
the services it selects (all of its namespace's, for a namespace-wide policy).
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Callable, Mapping
from types import ModuleType

from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm

import meshpilot.policy
from meshpilot.api.routes import Route
from meshpilot.model import Service, service_key
from meshpilot.policy.authz import AUTHZ, AuthorizationPolicy, inbound_authz
from meshpilot.policy.engine import PolicyEngine
from meshpilot.policy.governance import Governance, WasmModule
from meshpilot.policy.kinds import PolicyBase
from meshpilot.policy.mtls import MTLS, MtlsPolicy, modes
from meshpilot.policy.tracing import TRACING, TracingPolicy, sampling
from meshpilot.publish.publisher import Producer
from meshpilot.registry import Registry
from meshpilot.translate.listeners import InboundAuthz
from meshpilot.translate.routes import FAULT_FILTER, ServiceRouting
from meshpilot.xds.resource import NodeInfo, pack

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
    return hcm.HttpFilter(name=FAULT_FILTER, typed_config=pack(fault_pb2.HTTPFault()))


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
        trust_domain: str = "mesh.local",
    ) -> None:
        """``routing``: the overlays services are built with (staged ones included), which the
        breakers' rules follow. ``trust_domain``: of the SPIFFE ids authorization rules name."""
        load_kinds()
        self.registry = registry
        self.trust_domain = trust_domain
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
        identity = {k for k in changed if k.startswith((AUTHZ.name + "/", MTLS.name + "/", TRACING.name + "/"))}
        before = {k: self.engine.policies.get(k) for k in identity}
        out = self.engine.affected(changed) | self.governance.affected(changed)
        for key in identity:
            after = self.engine.policies.get(key)
            if after != before[key]:
                out |= self._selected(before[key]) | self._selected(after)
        return out

    def _selected(self, policy: PolicyBase | None) -> set[str]:
        """The services an identity policy selects: its service, or every service of its namespace."""
        if policy is None:
            return set()
        name = getattr(policy, "service", None)
        if name:
            return {service_key(name, policy.namespace)}
        return {s.key for s in self.registry.services() if s.namespace == policy.namespace}

    def mtls_modes(self) -> tuple[dict[str, str], dict[str, str]]:
        """(service key → mode, namespace → mode) of the MtlsPolicies in force."""
        return modes(p for p in self.engine.of_kind(MTLS.name) if isinstance(p, MtlsPolicy))

    def trace_sampling(self, node: NodeInfo) -> float:
        """The percentage of new traces the node's sidecar samples (its service's TracingPolicy)."""
        policies = [p for p in self.engine.of_kind(TRACING.name) if isinstance(p, TracingPolicy)]
        return sampling(policies, node.service, node.namespace)

    def inbound_authz(self, node: NodeInfo, ports: frozenset[int]) -> InboundAuthz | None:
        """The RBAC rules of the node's inbound routes (None: no AuthorizationPolicy selects its service)."""
        if not node.service:
            return None
        policies = [p for p in self.engine.of_kind(AUTHZ.name) if isinstance(p, AuthorizationPolicy)]
        svc = self.registry.service(node.service_key)  # its API list resolves selectors by name
        return inbound_authz(policies, node.namespace, node.service, ports, self.trust_domain,
                             apis=svc.apis if svc is not None else None)

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
