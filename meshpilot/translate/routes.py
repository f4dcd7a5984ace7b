"""Services → the outbound RouteConfiguration (RDS): one virtual host per HTTP service port.

Every name form of the shared model is a domain of its virtual host. The short form ``<svc>``
belongs to the service in namespace ``default`` when there is one, else to the only service of
that name; when several namespaces share a name and none is ``default``, callers must qualify it.
Unknown hosts get a 404 that says so. The route configuration is shared by every sidecar, so
per-node details (the ``x-mesh-caller`` stamp) live in each node's listener instead.

A service may carry a routing overlay (``ServiceRouting``, produced from routing policies by
policy/): ordered routes, each matching a path and headers, splitting traffic by weight between
subsets of the service's instances (``weighted_clusters``) and overriding timeout, retries and
fault injection. The same virtual host, built with ``proxyless=True``, is what proxyless gRPC
clients get: gRPC reads a route's deadline from ``max_stream_duration``, not ``timeout``.

Some HTTP filters of the sidecar's outbound chain matter only for some services (the governance
filter, for services a breaker guards). The virtual hosts of every other service, and the
unknown-host fallback, switch such a filter off (``FilterConfig.disabled``), so their requests
never enter it; turning it back on is a route change, which reaches keep-alive connections at once
and drains nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from envoy.config.route.v3 import route_components_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.common.fault.v3 import fault_pb2 as common_fault
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from meshpilot.model import Service, ServicePort
from meshpilot.translate.clusters import duration_ms, subset_cluster_name
from meshpilot.translate.names import OUTBOUND_ROUTE, cluster_name, host_forms
from meshpilot.xds.resource import bytes_field, pack

__all__ = [
    "DESTINATION_SERVICE",
    "OutboundRoutes",
    "FAULT_FILTER",
    "Fault",
    "HeaderMatch",
    "RouteRule",
    "ServiceRouting",
    "Subset",
    "build_outbound_routes",
    "build_route_action",
    "build_service_routes",
    "build_virtual_host",
    "short_name_owners",
]

_PREVIOUS_HOSTS = "envoy.retry_host_predicates.previous_hosts"
FAULT_FILTER = "envoy.filters.http.fault"  # the HTTP filter name routes address their fault overrides to


# ---- the routing overlay (plain values; policy/ builds them from validated policy objects) ----


@dataclass(frozen=True, slots=True)
class Subset:
    """A named subset of a service's instances: those whose labels include all of ``labels``."""

    name: str
    labels: tuple[tuple[str, str], ...]

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.labels)


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    name: str
    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None
    present: bool | None = None  # True: the header is present; False: it is absent


@dataclass(frozen=True, slots=True)
class Fault:
    delay_percent: float = 0.0
    delay_ms: int = 0
    abort_percent: float = 0.0
    abort_http_status: int = 0
    abort_grpc_status: int | None = None


@dataclass(frozen=True, slots=True)
class RouteRule:
    """One route of a service's virtual host. ``destinations`` are (subset name, weight);
    the subset name ``""`` means every instance of the service."""

    name: str
    destinations: tuple[tuple[str, int], ...]
    path_prefix: str | None = None
    path_exact: str | None = None
    headers: tuple[HeaderMatch, ...] = ()
    timeout_ms: int | None = None
    retries: int | None = None
    retry_on: str | None = None
    per_try_timeout_ms: int | None = None
    fault: Fault | None = None

    @property
    def matches_all(self) -> bool:
        return self.path_exact is None and (self.path_prefix in (None, "/")) and not self.headers


@dataclass(frozen=True, slots=True)
class ServiceRouting:
    """Routing overlay of one service; ``ports`` limits it to these port names (None: all)."""

    subsets: tuple[Subset, ...] = ()
    rules: tuple[RouteRule, ...] = ()
    ports: frozenset[str] | None = None
    source: str = field(default="", compare=False)  # the policy it came from, for route names

    def applies_to(self, port: ServicePort) -> bool:
        return self.ports is None or port.name in self.ports


# ---- building ----------------------------------------------------------------------------------


def short_name_owners(services: list[Service]) -> set[str]:
    """Service keys that own their bare ``<svc>`` name."""
    counts = Counter(s.name for s in services)
    owners = set()
    default_names = {s.name for s in services if s.namespace == "default"}
    for s in services:
        if s.namespace == "default" or (counts[s.name] == 1 and s.name not in default_names):
            owners.add(s.key)
    return owners


def _pack(msg: object) -> any_pb2.Any:
    assert isinstance(msg, Message)
    return pack(msg)


def build_route_action(
    service: Service,
    cluster: str,
    rule: RouteRule | None = None,
    *,
    proxyless: bool = False,
) -> rc.RouteAction:
    """The action for ``cluster`` with the service's traffic settings, overridden by ``rule``."""
    t = service.traffic
    timeout = t.timeout_ms if rule is None or rule.timeout_ms is None else rule.timeout_ms
    retries = t.retries if rule is None or rule.retries is None else rule.retries
    retry_on = t.retry_on if rule is None or rule.retry_on is None else rule.retry_on
    per_try = t.per_try_timeout_ms if rule is None or rule.per_try_timeout_ms is None else rule.per_try_timeout_ms
    action = rc.RouteAction(cluster=cluster, timeout=duration_ms(timeout))
    if proxyless and timeout:
        # gRPC clients take the route's deadline from here (gRFC A31), Envoy from ``timeout``
        action.max_stream_duration.max_stream_duration.CopyFrom(duration_ms(timeout))
    if proxyless:
        retry_on = _grpc_retry_on(retry_on)
        if not retry_on:
            retries = 0
    if retries:
        from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2

        action.retry_policy.CopyFrom(
            rc.RetryPolicy(
                retry_on=retry_on,
                host_selection_retry_max_attempts=5,
                retry_host_predicate=[
                    rc.RetryPolicy.RetryHostPredicate(name=_PREVIOUS_HOSTS, typed_config=_pack(previous_hosts_pb2.PreviousHostsPredicate()))
                ],
            )
        )
        action.retry_policy.num_retries.value = retries
        if per_try:
            action.retry_policy.per_try_timeout.CopyFrom(duration_ms(per_try))
    return action


_GRPC_CODES = ("cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable")
_TRANSPORT = {"connect-failure", "refused-stream", "reset", "5xx", "gateway-error", "retriable-status-codes"}


def _grpc_retry_on(retry_on: str) -> str:
    """Envoy retry conditions as a gRPC client understands them (gRFC A44: status names only).
    Transport failures surface in gRPC as UNAVAILABLE, so they map to ``unavailable``."""
    conditions = set(retry_on.split(","))
    codes = {c for c in conditions if c in _GRPC_CODES}
    if conditions & _TRANSPORT:
        codes.add("unavailable")
    return ",".join(c for c in _GRPC_CODES if c in codes)


def _percent(p: float) -> percent_pb2.FractionalPercent:
    return percent_pb2.FractionalPercent(numerator=round(p * 10_000), denominator=percent_pb2.FractionalPercent.MILLION)


def build_fault(fault: Fault) -> fault_pb2.HTTPFault:
    out = fault_pb2.HTTPFault()
    if fault.delay_percent > 0 and fault.delay_ms > 0:
        out.delay.CopyFrom(common_fault.FaultDelay(fixed_delay=duration_ms(fault.delay_ms), percentage=_percent(fault.delay_percent)))
    if fault.abort_percent > 0:
        abort = fault_pb2.FaultAbort(percentage=_percent(fault.abort_percent))
        if fault.abort_grpc_status is not None:
            abort.grpc_status = fault.abort_grpc_status
        else:
            abort.http_status = fault.abort_http_status or 503
        out.abort.CopyFrom(abort)
    return out


def _header_matcher(h: HeaderMatch) -> rc.HeaderMatcher:
    m = rc.HeaderMatcher(name=h.name)
    if h.exact is not None:
        m.string_match.CopyFrom(string_pb2.StringMatcher(exact=h.exact))
    elif h.prefix is not None:
        m.string_match.CopyFrom(string_pb2.StringMatcher(prefix=h.prefix))
    elif h.regex is not None:
        m.string_match.CopyFrom(string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=h.regex)))
    else:
        m.present_match = True
        if h.present is False:
            m.invert_match = True
    return m


def _rule_route(service: Service, port: ServicePort, domain: str, rule: RouteRule, *, proxyless: bool) -> rc.Route:
    route = rc.Route(name=rule.name)
    if rule.path_exact is not None:
        route.match.path = rule.path_exact
    else:
        route.match.prefix = rule.path_prefix or "/"
    route.match.headers.extend(_header_matcher(h) for h in rule.headers)
    dests = [(s, w) for s, w in rule.destinations if w > 0] or list(rule.destinations[:1])

    def cluster_of(subset: str) -> str:
        return subset_cluster_name(service, port, subset, domain) if subset else cluster_name(service, port, domain)

    if len(dests) == 1:
        action = build_route_action(service, cluster_of(dests[0][0]), rule, proxyless=proxyless)
    else:
        action = build_route_action(service, "", rule, proxyless=proxyless)
        action.ClearField("cluster")
        for subset, weight in dests:
            cw = action.weighted_clusters.clusters.add(name=cluster_of(subset))
            cw.weight.value = weight
    route.route.CopyFrom(action)
    if rule.fault is not None:
        route.typed_per_filter_config[FAULT_FILTER].CopyFrom(_pack(build_fault(rule.fault)))
    return route


def build_service_routes(
    service: Service, port: ServicePort, domain: str, routing: ServiceRouting | None = None, *, proxyless: bool = False
) -> list[rc.Route]:
    """The ordered routes of one service port: the overlay's rules, then (unless a rule already
    matches every request) the default route to the whole service."""
    cluster = cluster_name(service, port, domain)
    routes: list[rc.Route] = []
    if routing is not None and routing.applies_to(port):
        for rule in routing.rules:
            routes.append(_rule_route(service, port, domain, rule, proxyless=proxyless))
            if rule.matches_all:
                return routes
    default = rc.Route(name=cluster)
    default.match.prefix = "/"
    default.route.CopyFrom(build_route_action(service, cluster, proxyless=proxyless))
    routes.append(default)
    return routes


DESTINATION_SERVICE = "%METADATA(ROUTE:meshpilot:service)%"


def build_virtual_host(
    service: Service,
    port: ServicePort,
    domain: str,
    routing: ServiceRouting | None = None,
    *,
    short: bool = True,
    proxyless: bool = False,
    filters_off: Sequence[str] = (),
) -> rc.VirtualHost:
    """``filters_off``: HTTP filters the host's requests skip (see the module docstring)."""
    vh = rc.VirtualHost(name=f"{service.key}:{port.port}")
    vh.domains.extend(host_forms(service, port, domain, short=short))
    vh.routes.extend(build_service_routes(service, port, domain, routing, proxyless=proxyless))
    if not proxyless:
        # the destination service, for access logs (%METADATA(ROUTE:meshpilot:service)%)
        for r in vh.routes:
            r.metadata.filter_metadata["meshpilot"].update({"service": service.key})
    _switch_off(vh, filters_off)
    return vh


def _switch_off(vh: rc.VirtualHost, filters: Sequence[str]) -> None:
    for name in filters:
        vh.typed_per_filter_config[name].CopyFrom(_pack(rc.FilterConfig(disabled=True)))


def _fallback_host(filters_off: Sequence[str] = ()) -> route_components_pb2.VirtualHost:
    fallback = rc.VirtualHost(name="unknown-host", domains=["*"])
    _switch_off(fallback, filters_off)
    r = fallback.routes.add(name="unknown-host")
    r.match.prefix = "/"
    r.direct_response.status = 404
    r.direct_response.body.inline_string = "meshpilot: no mesh service answers to this host\n"
    return fallback


def _service_hosts(
    s: Service, domain: str, routing: ServiceRouting | None, short: bool, filters_off: Sequence[str] = ()
) -> list[rc.VirtualHost]:
    return [build_virtual_host(s, p, domain, routing, short=short, filters_off=filters_off) for p in s.ports if p.protocol != "tcp"]


def build_outbound_routes(
    services: list[Service],
    domain: str,
    routing: Mapping[str, ServiceRouting] | None = None,
    optional_filters: Mapping[str, frozenset[str]] | None = None,
) -> route_pb2.RouteConfiguration:
    """``optional_filters``: filter name → the service keys whose requests run it; every other
    service's virtual hosts (and the unknown-host fallback) switch it off."""
    owners = short_name_owners(services)
    routing = routing or {}
    optional = optional_filters or {}
    cfg = route_pb2.RouteConfiguration(name=OUTBOUND_ROUTE, validate_clusters={"value": False})
    for s in sorted(services, key=lambda x: x.key):
        cfg.virtual_hosts.extend(_service_hosts(s, domain, routing.get(s.key), s.key in owners, _off(optional, s.key)))
    cfg.virtual_hosts.append(_fallback_host(sorted(optional)))
    return cfg


def _off(optional: Mapping[str, frozenset[str]], key: str) -> tuple[str, ...]:
    return tuple(sorted(name for name, wanted in optional.items() if key not in wanted))


class OutboundRoutes:
    """The outbound RouteConfiguration as wire bytes, rebuilt incrementally.

    Equal to ``build_outbound_routes`` (a unit test holds them to it), but each service's virtual
    hosts are serialised once and reused while the service object, its routing overlay and its
    claim on the short name stay the same, so a change to one service of a thousand costs one
    service's worth of building.
    """

    def __init__(self) -> None:
        self._memo: dict[str, tuple[Service, str, ServiceRouting | None, bool, tuple[str, ...], bytes]] = {}
        head = route_pb2.RouteConfiguration(name=OUTBOUND_ROUTE, validate_clusters={"value": False})
        self._head = head.SerializeToString(deterministic=True)
        self._tails: dict[tuple[str, ...], bytes] = {}

    def _tail(self, filters_off: tuple[str, ...]) -> bytes:
        tail = self._tails.get(filters_off)
        if tail is None:
            tail = self._tails[filters_off] = bytes_field(2, _fallback_host(filters_off).SerializeToString(deterministic=True))
        return tail

    def build(
        self,
        services: list[Service],
        domain: str,
        routing: Mapping[str, ServiceRouting] | None = None,
        optional_filters: Mapping[str, frozenset[str]] | None = None,
    ) -> bytes:
        owners = short_name_owners(services)
        routing = routing or {}
        optional = optional_filters or {}
        parts = [self._head]
        memo: dict[str, tuple[Service, str, ServiceRouting | None, bool, tuple[str, ...], bytes]] = {}
        for s in sorted(services, key=lambda x: x.key):
            overlay, short, off = routing.get(s.key), s.key in owners, _off(optional, s.key)
            hit = self._memo.get(s.key)
            if hit is not None and hit[0] is s and hit[1] == domain and hit[2] == overlay and hit[3] == short and hit[4] == off:
                chunk = hit[5]
            else:
                chunk = b"".join(
                    bytes_field(2, vh.SerializeToString(deterministic=True))
                    for vh in _service_hosts(s, domain, overlay, short, off)
                )
            memo[s.key] = (s, domain, overlay, short, off, chunk)
            parts.append(chunk)
        self._memo = memo
        parts.append(self._tail(tuple(sorted(optional))))
        return b"".join(parts)
