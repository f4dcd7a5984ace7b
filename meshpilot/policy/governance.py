"""Governance in the data plane: circuit-breaker and rate-limit policies delivered to sidecars.

Every sidecar's listeners carry two HTTP filters whose configuration comes by ECDS (never inside
the listener, so a policy change does not drain connections and keep-alive clients see it at
once): ``meshpilot.governance.outbound`` (callers' breakers, one shared resource) and
``meshpilot.governance.inbound`` (the limits on calls into the node's service, one resource per
node, because a cluster-wide ``total_rate`` is divided among the service's live sidecars by
instance weight). A governed filter is meshpilot's WASM module (``meshpilot/wasm/mesh.wasm``),
whose code Envoy fetches from this control plane's management API (``/v1/wasm/mesh.wasm``,
through the ``meshpilot-api`` cluster pushed by CDS) and checks against its sha256; an ungoverned
one is a no-op header-mutation filter. The routes switch the filter off where no rule can apply (a
route change, no drain): outbound, routes to services no breaker guards; inbound, the routes of
nodes whose service has no rate limit. Only governed calls enter the VM. The
same policies' ``instance`` sections become outlier detection on the guarded services' clusters
(an override the registry's translation applies). ``Governance`` is a producer for the publisher
(meshpilot/publish/): it returns these resources and never writes the cache itself.
docs/governance.md is the user's view.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, extension_pb2, http_uri_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.filters.http.wasm.v3 import wasm_pb2 as http_wasm_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.extensions.wasm.v3 import wasm_pb2
from google.protobuf import duration_pb2, wrappers_pb2

from meshpilot.model import Outlier, Service
from meshpilot.policy.breaker import CircuitBreakerPolicy, breaker_rules, outlier_of
from meshpilot.policy.ratelimit import RateLimitPolicy, divide, limit_rules
from meshpilot.publish.publisher import Bundle, Changes, Output, Producer
from meshpilot.registry import Registry
from meshpilot.translate.clusters import ads_source, subset_cluster_name
from meshpilot.translate.names import cluster_name
from meshpilot.translate.routes import ServiceRouting
from meshpilot.wasm import modules
from meshpilot.wasm.config import FilterConfigError, encode
from meshpilot.xds.resource import TYPE, NodeInfo, pack

if TYPE_CHECKING:
    from aiohttp import web

    from meshpilot.policy.engine import PolicyEngine

__all__ = [
    "API_CLUSTER",
    "REPLICAS",
    "INBOUND_FILTER",
    "OUTBOUND_FILTER",
    "WASM_PATH",
    "Governance",
    "WasmModule",
    "ecds_filter",
    "passthrough_config",
    "wasm_config",
]

log = logging.getLogger("meshpilot.governance")

OUTBOUND_FILTER = "meshpilot.governance.outbound"
INBOUND_FILTER = "meshpilot.governance.inbound"
API_CLUSTER = "meshpilot-api"
REPLICAS = "replicas"  # store table: each live control-plane replica's addresses (ephemeral)
WASM_PATH = "/v1/wasm/mesh.wasm"
VM_ID = "meshpilot"
INITIAL_FETCH_TIMEOUT_S = 10  # a listener waits at most this long for its filter config and code
MAX_RULES = 64  # per section of one filter configuration (the filter's limit)

_WASM_TYPE = modules.WASM_TYPE_URL
_PASSTHROUGH_TYPE = "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation"


_pack = pack


@dataclass(frozen=True, slots=True)
class WasmModule:
    """The module's bytes as served, and their sha256 (read once, so what is served is what the
    configuration pins, even if the file is rebuilt while the control plane runs)."""

    data: bytes
    sha256: str

    @classmethod
    def load(cls, name: str = "mesh") -> WasmModule:
        data = modules.module_path(name).read_bytes()
        return cls(data, hashlib.sha256(data).hexdigest())


def passthrough_config(name: str) -> extension_pb2.TypedExtensionConfig:
    """An ungoverned filter: a header mutation that mutates nothing."""
    return extension_pb2.TypedExtensionConfig(name=name, typed_config=_pack(header_mutation_pb2.HeaderMutation()))


def _ecds_source() -> config_source_pb2.ConfigSource:
    source = ads_source()
    source.initial_fetch_timeout.CopyFrom(duration_pb2.Duration(seconds=INITIAL_FETCH_TIMEOUT_S))
    return source


def ecds_filter(name: str) -> hcm.HttpFilter:
    """The listener's side: an HTTP filter whose config comes by ECDS over ADS. Until the first
    config arrives it passes everything (the listener never waits for it)."""
    return hcm.HttpFilter(
        name=name,
        config_discovery=config_source_pb2.ExtensionConfigSource(
            config_source=_ecds_source(),
            default_config=passthrough_config(name).typed_config,
            apply_default_config_without_warming=False,
            type_urls=[_WASM_TYPE, _PASSTHROUGH_TYPE],
        ),
    )


def wasm_config(name: str, configuration: str, uri: str, sha256: str, cluster: str = API_CLUSTER) -> extension_pb2.TypedExtensionConfig:
    """The ECDS resource of a governed filter: the WASM module fetched over HTTP (pinned by
    sha256) with the filter's text configuration. FAIL_OPEN: if the VM fails at runtime,
    requests pass ungoverned rather than failing."""
    remote = base_pb2.RemoteDataSource(
        http_uri=http_uri_pb2.HttpUri(uri=uri, cluster=cluster, timeout=duration_pb2.Duration(seconds=10)),
        sha256=sha256,
        retry_policy=base_pb2.RetryPolicy(num_retries=wrappers_pb2.UInt32Value(value=10)),
    )
    config = wasm_pb2.PluginConfig(
        name=name,
        root_id="meshpilot",
        vm_config=wasm_pb2.VmConfig(vm_id=VM_ID, runtime="envoy.wasm.runtime.v8", code=base_pb2.AsyncDataSource(remote=remote)),
        configuration=_pack(wrappers_pb2.StringValue(value=configuration)),
        failure_policy=wasm_pb2.FAIL_OPEN,
    )
    return extension_pb2.TypedExtensionConfig(name=name, typed_config=_pack(http_wasm_pb2.Wasm(config=config)))


def api_cluster(addresses: list[tuple[str, int]]) -> cluster_pb2.Cluster:
    """The cluster Envoys fetch WASM code through: the management API of every control-plane replica."""
    return cluster_pb2.Cluster(
        name=API_CLUSTER,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=duration_pb2.Duration(seconds=2),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=API_CLUSTER,
            endpoints=[endpoint_components_pb2.LocalityLbEndpoints(
                lb_endpoints=[endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(
                    address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=port))))
                    for host, port in addresses]
            )],
        ),
    )


def _reachable(listen_address: str) -> str:
    """The address sidecars use for the management API: the listen address, or for a wildcard
    listen address the host's primary address."""
    try:
        if not ipaddress.ip_address(listen_address).is_unspecified:
            return listen_address
    except ValueError:
        return listen_address
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class Governance(Producer):
    """Turns the breaker and limit policies in force into ECDS resources, per-node shares and
    outlier overrides: a producer (the filters' configurations and the cluster that serves the
    module) and the part of the mesh's policy that overrides services and switches filters."""

    def __init__(
        self,
        registry: Registry,
        engine: PolicyEngine,
        module: WasmModule | None,
        domain: str,
        listen_address: str,
        nodes: Mapping[str, NodeInfo],
        ports: Mapping[str, int],
        routing: Callable[[str], ServiceRouting | None],
    ) -> None:
        self.registry = registry
        self.engine = engine
        self.module = module
        self.domain = domain
        self.nodes = nodes
        self.ports = ports
        self.routing = routing  # the overlays services are built with (staged ones included)
        # resolved once here: a wildcard listen address costs a name lookup, which must not block each publish
        self.api_host = _reachable(listen_address)
        self.outliers: dict[str, Outlier] = self._outliers()
        self.guarded: frozenset[str] = self._guarded()
        self.limited: frozenset[str] = self._limited()
        self._published_uri: str | None = None
        self._node_services: dict[str, str] = {}  # node id -> service key, as last divided

    # ---- instance level: outlier detection (a service override) -----------------------------

    def _outliers(self) -> dict[str, Outlier]:
        out: dict[str, Outlier] = {}
        for p in self.engine.of_kind("CircuitBreakerPolicy"):
            assert isinstance(p, CircuitBreakerPolicy)
            o = outlier_of(p)
            if o is not None:
                out.setdefault(p.service_key, o)
        return out

    def _guarded(self) -> frozenset[str]:
        return frozenset(p.service_key for p in self.engine.of_kind("CircuitBreakerPolicy") if isinstance(p, CircuitBreakerPolicy))

    def _limited(self) -> frozenset[str]:
        return frozenset(p.service_key for p in self.engine.of_kind("RateLimitPolicy") if isinstance(p, RateLimitPolicy))

    def limits_node(self, node: NodeInfo) -> bool:
        """Whether a rate limit applies to the node's service: the only nodes whose inbound routes
        run the filter. Asked from the policies, not from the published configs, so a node
        (re)connecting to a limited service gets its routes on from the first push."""
        return node.service_key in self.limited

    def affected(self, changed: set[str]) -> set[str]:
        """Services whose outlier override changed (their clusters are rebuilt), that a breaker
        started or stopped guarding (their routes switch the filter on or off) or that a limit
        started or stopped applying to (their nodes' inbound routes switch it)."""
        out: set[str] = set()
        if any(k.startswith("CircuitBreakerPolicy/") for k in changed):
            old, self.outliers = self.outliers, self._outliers()
            old_guarded, self.guarded = self.guarded, self._guarded()
            out |= {k for k in old.keys() | self.outliers.keys() if old.get(k) != self.outliers.get(k)} | (old_guarded ^ self.guarded)
        if any(k.startswith("RateLimitPolicy/") for k in changed):
            old_limited, self.limited = self.limited, self._limited()
            out |= old_limited ^ self.limited
        return out

    def override(self, service: Service) -> Service:
        o = self.outliers.get(service.key)
        if o is None:
            return service
        return service.model_copy(update={"traffic": service.traffic.model_copy(update={"outlier": o})})

    # ---- the listeners' side ----------------------------------------------------------------

    def node_filters(self, node: NodeInfo, direction: str) -> list[hcm.HttpFilter]:
        if self.module is None or node.proxyless:
            return []
        return [ecds_filter(OUTBOUND_FILTER if direction == "outbound" else INBOUND_FILTER)]

    def optional_route_filters(self) -> dict[str, frozenset[str]]:
        return {OUTBOUND_FILTER: self.guarded} if self.module is not None else {}

    def inbound_filters(self, node: NodeInfo) -> tuple[list[str], list[str]]:
        if self.module is None:
            return [], []
        return ([] if self.limits_node(node) else [INBOUND_FILTER]), [INBOUND_FILTER]

    # ---- the filters' configuration ---------------------------------------------------------

    @property
    def uri(self) -> str | None:
        """The module's URI: fetched through ``meshpilot-api`` (whose endpoints say where), so it is
        the same on every replica."""
        if not self.ports.get("api"):
            return None  # not serving yet: published once the API listens
        return f"http://{API_CLUSTER}{WASM_PATH}"

    def api_addresses(self) -> list[tuple[str, int]]:
        """Every live replica's management API (the ``replicas`` table), this one's while it is not there yet."""
        found: set[tuple[str, int]] = set()
        for _replica, doc in self.registry.store.items(REPLICAS):
            api = doc.get("api") if isinstance(doc, dict) else None
            if isinstance(api, list) and len(api) == 2 and isinstance(api[0], str) and isinstance(api[1], int):
                found.add((api[0], api[1]))
        return sorted(found) or [(self.api_host, self.ports["api"])]

    def _clusters(self, svc: Service, port: str | None) -> list[str]:
        routing = self.routing(svc.key)
        out = []
        for p in svc.ports:
            if p.protocol == "tcp" or (port is not None and p.name != port):
                continue
            out.append(cluster_name(svc, p, self.domain))
            if routing is not None and routing.applies_to(p):
                out.extend(subset_cluster_name(svc, p, s.name, self.domain) for s in routing.subsets)
        return out

    def outbound_document(self) -> dict[str, Any]:
        rules: list[dict[str, Any]] = []
        for p in self.engine.of_kind("CircuitBreakerPolicy"):
            assert isinstance(p, CircuitBreakerPolicy)
            svc = self.registry.service(p.service_key)
            if svc is None:
                continue
            rules += _valid(breaker_rules(p, svc, self._clusters(svc, p.port)), "breakers", p.key)
        return {"breakers": _capped(rules, "breakers")}

    def shares(self, service_key: str) -> dict[str, float]:
        """Each live sidecar's fraction of the service's cluster-wide limits, by instance weight.
        A sidecar whose instance is registered but not routable gets what it would get if it were."""
        weights: dict[str, int] = {}
        waiting: dict[str, int] = {}
        for node in self.nodes.values():
            if node.proxyless or node.service_key != service_key or not (node.inbound_port and node.app_port):
                continue
            inst = self.registry.instance(node.id)
            if inst is None:
                weights[node.id] = 100
            elif inst.routable:
                weights[node.id] = inst.weight
            else:
                waiting[node.id] = inst.weight
        out = divide(1.0, weights)
        for nid, w in waiting.items():
            out[nid] = divide(1.0, {**weights, nid: w})[nid]
        return out

    def inbound_document(self, node: NodeInfo, fraction: float) -> dict[str, Any]:
        svc = self.registry.service(node.service_key)
        rules: list[dict[str, Any]] = []
        for p in self.engine.of_kind("RateLimitPolicy"):
            assert isinstance(p, RateLimitPolicy)
            if p.service_key == node.service_key:
                rules += _valid(limit_rules(p, svc, fraction), "rate_limits", p.key)
        return {"rate_limits": _capped(rules, "rate_limits")}

    def _resource(self, name: str, document: dict[str, Any], uri: str) -> extension_pb2.TypedExtensionConfig:
        assert self.module is not None
        return wasm_config(name, encode(document), uri, self.module.sha256)

    def next_deadline(self) -> float | None:
        """Due at once when the management API's address is new: the filters' URI names it."""
        return 0.0 if self.module is not None and self.uri is not None and self.uri != self._published_uri else None

    def produce(self, changes: Changes, now: float) -> Output:
        """The shared filter configurations (whenever services or policies change, or the API's
        address), and each affected sidecar's inbound filter with its share of the limits (when
        its service's sidecars or instances change)."""
        uri = self.uri
        if self.module is None or uri is None:
            return {}
        out: Output = {}
        services: set[str] = set(changes.endpoints)
        if changes.everything or changes.services or changes.other or changes.rerouted or uri != self._published_uri:
            self._published_uri = uri
            out[("", "governance")] = Bundle({
                TYPE.CLUSTER: {API_CLUSTER: api_cluster(self.api_addresses())},
                TYPE.EXTENSION_CONFIG: {
                    OUTBOUND_FILTER: self._resource(OUTBOUND_FILTER, self.outbound_document(), uri),
                    INBOUND_FILTER: self._resource(INBOUND_FILTER, {}, uri),
                },
            })
            services |= {n.service_key for n in self.nodes.values() if n.service_key}
        for nid in changes.nodes:
            node = self.nodes.get(nid)
            key = node.service_key if node is not None else self._node_services.pop(nid, "")
            if key:
                services.add(key)
        for key in sorted(services):
            for nid, fraction in self.shares(key).items():
                node = self.nodes[nid]
                self._node_services[nid] = key
                document = self.inbound_document(node, fraction)
                resource = self._resource(INBOUND_FILTER, document, uri) if any(document.values()) else None
                out[(nid, "governance")] = Bundle({TYPE.EXTENSION_CONFIG: {INBOUND_FILTER: resource}}) if resource is not None else None
        return out

    # ---- serving the module -----------------------------------------------------------------

    async def serve_module(self, request: web.Request) -> web.Response:
        from aiohttp import web

        from meshpilot.api.app import ApiError

        if request.match_info["name"] != "mesh.wasm" or self.module is None:
            raise ApiError(404, f"name: no module {request.match_info['name']!r} (modules: mesh.wasm)", [{"field": "name", "reason": "not found"}])
        etag = f'"{self.module.sha256}"'
        headers = {"ETag": etag, "X-Meshpilot-Sha256": self.module.sha256, "Cache-Control": "public, max-age=31536000, immutable"}
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers=headers)
        return web.Response(body=self.module.data, content_type="application/wasm", headers=headers)


def _valid(rules: list[dict[str, Any]], section: str, source: str) -> list[dict[str, Any]]:
    """Rules the filter accepts. Policies are validated when written, but a rule built from a
    service's declared apis (a path template the filter cannot read) is dropped and logged."""
    out = []
    for rule in rules:
        try:
            encode({section: [rule]})
        except FilterConfigError as exc:
            log.error("event=governance_rule_dropped policy=%s rule=%s reason=%r", source, rule.get("name"), str(exc))
        else:
            out.append(rule)
    return out


def _capped(rules: list[dict[str, Any]], section: str) -> list[dict[str, Any]]:
    seen: set[str] = set()
    unique = []
    for r in rules:
        if r["name"] not in seen:
            seen.add(r["name"])
            unique.append(r)
    if len(unique) > MAX_RULES:
        log.error("event=governance_rules_capped section=%s rules=%d kept=%d", section, len(unique), MAX_RULES)
    return unique[:MAX_RULES]
