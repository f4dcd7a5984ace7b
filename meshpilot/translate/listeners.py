"""Per-node Listeners (LDS): the outbound listener apps call through, the inbound one in front of the app.

The outbound listener routes HTTP by Host/authority with the shared ``outbound`` route configuration
(RDS) and stamps ``x-mesh-caller`` with the node's own service, overwriting what the app sent. On a
node with outbound capture (iptables, ``CAPTURE``) it also recovers the original destination
(``original_dst`` listener filter) and picks a filter chain per service virtual IP and port: HTTP
ports go through the same routes, TCP ports straight to the service's cluster. The inbound listener
forwards everything to the node's app on loopback, through the node's own ``inbound`` route
configuration (RDS, so routes can switch filters on and off without a listener update); its first
route takes the node's own health checks (HDS, meshpilot/hds/), recognised by a per-node token in
``x-mesh-health-check`` that is sent to the node's own xDS streams only, past every governance
filter: a rate limit or breaker must never fail the check that keeps the instance in EDS. It keeps ``x-mesh-caller`` only on connections
from registered sidecar addresses (``trusted_peers``) and strips it from everyone else. Both write a
JSON access log line per request naming source and destination service (request counts, status
and latency per destination are Envoy's cluster stats, tagged with the source service by the
bootstrap). The inbound listener also counts the requests that came without a caller's sidecar (no
``x-mesh-caller`` left once the strip or certificate filters ran: an SDK app, a client outside the mesh),
per peer address and response code (``envoy_meshpilot_direct_requests``, ``..._direct_request_time``;
Envoy's stats access logger), so the topology can name such a caller by its registered address; health
checks (the ``health`` route) are not counted. Extra HTTP filters (the WASM governance
filters, delivered over ECDS) are passed in by the caller and run before the router.

Mutual TLS (tls.py): on a node with an identity whose service is in PERMISSIVE or STRICT mode, the
inbound listener inspects the first bytes (``tls_inspector``); a TLS connection takes a chain that
requires a client certificate from the mesh's trust bundle and overwrites ``x-mesh-caller`` with
the peer's URI SAN (its SPIFFE id). PERMISSIVE keeps a plaintext chain that strips the header;
STRICT keeps plaintext only from the node itself (``SAME_IP_OR_LOOPBACK``: the node's own HDS
health checks), on a route configuration of its own (``inbound-local``) that answers the health
route and 403 to everything else; a STRICT TCP listener has no plaintext chain at all (HDS checks
TCP apps on their own port). Every HTTP inbound chain carries two RBAC filters (deny, then
allow) without rules of their own: the rules of the AuthorizationPolicies in force arrive as
per-route config in the node's ``inbound`` routes (RDS), so a rule change never drains a listener.
A TCP app has no routes to read them from: its chains carry network RBAC filters (deny, then
allow) with the rules themselves, so there a rule change is a listener change (and a drain).
Every inbound HTTP connection manager normalises paths before the filters run (see
``_normalise_paths``), so the rules and the app see the same path.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, substitution_format_string_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.access_loggers.filters.cel.v3 import cel_pb2
from envoy.extensions.access_loggers.stats.v3 import stats_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from envoy.config.rbac.v3 import rbac_pb2 as rbac_config
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2
from google.protobuf.message import Message

from meshpilot.model import Service
from meshpilot.translate.clusters import ads_source
from meshpilot.translate.names import OUTBOUND_ROUTE, cluster_name, inbound_cluster_name
from meshpilot.translate.routes import DESTINATION_SERVICE
from meshpilot.translate.tls import DISABLE, MODES, STRICT, downstream_tls, tls_socket
from meshpilot.xds.resource import NodeInfo, pack

__all__ = [
    "AUTHZ_ALLOW", "AUTHZ_DENY", "CALLER_HEADER", "DIRECT_REQUESTS", "DIRECT_REQUEST_TIME", "HEALTH_HEADER", "INBOUND", "INBOUND_LOCAL_ROUTE", "INBOUND_ROUTE", "OUTBOUND",
    "InboundAuthz", "access_log", "build_inbound_listener", "build_inbound_local_routes", "build_inbound_routes",
    "build_outbound_listener",
]

CALLER_HEADER = "x-mesh-caller"
HEALTH_HEADER = "x-mesh-health-check"  # carries the node's health token on its own health checks
OUTBOUND = "outbound"
INBOUND = "inbound"
INBOUND_ROUTE = "inbound"  # the node's own route configuration (RDS, scoped to the node)
INBOUND_LOCAL_ROUTE = "inbound-local"  # STRICT mode: the node's own plaintext (health checks only)
AUTHZ_DENY = "mesh.authz-deny"  # the inbound RBAC filters, by name (routes carry their rules)
AUTHZ_ALLOW = "mesh.authz-allow"
# requests without a caller's sidecar, as Prometheus names them (stats access logger: envoy_<prefix>_<name>)
DIRECT_REQUESTS = "envoy_meshpilot_direct_requests"  # counter: destination_service, peer, response_code
DIRECT_REQUEST_TIME = "envoy_meshpilot_direct_request_time"  # histogram (ms): destination_service, peer
_STAT = {AUTHZ_DENY: "authz_deny", AUTHZ_ALLOW: "authz_allow"}  # stats: http.inbound.rbac.authz_deny.denied, ...


@dataclass(frozen=True, slots=True)
class InboundAuthz:
    """The RBAC rules of the AuthorizationPolicies that select a node's service: DENY rules (None:
    no deny policy) and ALLOW rules (None: no allow policy, everything not denied is allowed), for
    HTTP (per route) and for TCP (network filters on the listener's chains)."""

    deny: rbac_config.RBAC | None = None
    allow: rbac_config.RBAC | None = None
    tcp_deny: rbac_config.RBAC | None = None
    tcp_allow: rbac_config.RBAC | None = None




def _router() -> hcm.HttpFilter:
    return hcm.HttpFilter(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router()))


def _address(host: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=port))


def _chain(manager: Message, name: str = "") -> listener_components_pb2.FilterChain:
    filter_name = (
        "envoy.filters.network.tcp_proxy" if isinstance(manager, tcp_proxy_pb2.TcpProxy)
        else "envoy.filters.network.http_connection_manager"
    )
    return listener_components_pb2.FilterChain(
        name=name, filters=[listener_components_pb2.Filter(name=filter_name, typed_config=pack(manager))]
    )


def _listener(name: str, host: str, port: int, manager: hcm.HttpConnectionManager) -> listener_pb2.Listener:
    return listener_pb2.Listener(name=name, address=_address(host, port), filter_chains=[_chain(manager)])


def access_log(direction: str, fields: dict[str, str]) -> accesslog_pb2.AccessLog:
    """One JSON line per request (or TCP connection) on Envoy's stdout; ``trace_id`` is the request's
    trace (its spans in /v1/traces), so the node's log collector links the line to it."""
    fmt = struct_pb2.Struct()
    fmt.update({
        "time": "%START_TIME%", "direction": direction, "protocol": "%PROTOCOL%", "method": "%REQ(:METHOD)%",
        "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH):1024%", "authority": "%REQ(:AUTHORITY)%", "status": "%RESPONSE_CODE%",
        "flags": "%RESPONSE_FLAGS%", "duration_ms": "%DURATION%", "bytes_in": "%BYTES_RECEIVED%",
        "bytes_out": "%BYTES_SENT%", "upstream_host": "%UPSTREAM_HOST%", "upstream_cluster": "%UPSTREAM_CLUSTER%",
        "peer": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", "trace_id": "%TRACE_ID%", **fields,
    })
    out = stream_pb2.StdoutAccessLog(log_format=substitution_format_string_pb2.SubstitutionFormatString(json_format=fmt))
    return accesslog_pb2.AccessLog(name="envoy.access_loggers.stdout", typed_config=pack(out))


_Stats = stats_pb2.Config


def _direct_requests_log(node: NodeInfo) -> accesslog_pb2.AccessLog:
    """Counts (and times) the requests no caller's sidecar stamped, by peer address: one series per client
    host that calls the service directly. Envoy's stats carry no request header or peer otherwise."""
    service = _Stats.Tag(name="destination_service", value_format=node.service_key or "-")
    peer = _Stats.Tag(name="peer", value_format="%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%")
    cfg = _Stats(
        stat_prefix="meshpilot",
        counters=[_Stats.Counter(stat=_Stats.Stat(name="direct_requests", tags=[
            service, peer, _Stats.Tag(name="response_code", value_format="%RESPONSE_CODE%")]), value_fixed={"value": 1})],
        histograms=[_Stats.Histogram(stat=_Stats.Stat(name="direct_request_time", tags=[service, peer]),
                                     unit=_Stats.Histogram.Milliseconds, value_format="%DURATION%")],
    )
    expression = f"xds.route_name != 'health' && !('{CALLER_HEADER}' in request.headers)"
    only = accesslog_pb2.AccessLogFilter(extension_filter=accesslog_pb2.ExtensionFilter(
        name="envoy.access_loggers.extension_filters.cel", typed_config=pack(cel_pb2.ExpressionFilter(expression=expression))))
    return accesslog_pb2.AccessLog(name="envoy.access_loggers.stats", filter=only, typed_config=pack(cfg))


def _header_filter(name: str, mutation: mutation_rules_pb2.HeaderMutation) -> hcm.HttpFilter:
    cfg = header_mutation_pb2.HeaderMutation(mutations=header_mutation_pb2.Mutations(request_mutations=[mutation]))
    return hcm.HttpFilter(name=name, typed_config=pack(cfg))


def _stamp_caller(service: str) -> hcm.HttpFilter:
    return _header_filter("mesh.caller", mutation_rules_pb2.HeaderMutation(
        append=base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=CALLER_HEADER, value=service),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
        )
    ))


def _strip_caller() -> hcm.HttpFilter:
    return _header_filter("mesh.caller-strip", mutation_rules_pb2.HeaderMutation(remove=CALLER_HEADER))


def _peer_caller() -> hcm.HttpFilter:
    """On a TLS chain: the caller is the peer certificate's URI SAN, whatever the request said."""
    return _header_filter("mesh.caller-peer", mutation_rules_pb2.HeaderMutation(
        append=base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=CALLER_HEADER, value="%DOWNSTREAM_PEER_URI_SAN%"),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
        )
    ))


def _rbac_filters() -> list[hcm.HttpFilter]:
    """Deny, then allow; neither has rules of its own (no ``rules``: Envoy enforces nothing), so
    requests pass until a route's RBACPerRoute brings the rules."""
    return [
        hcm.HttpFilter(name=name, typed_config=pack(rbac_pb2.RBAC(rules_stat_prefix=_STAT[name])))
        for name in (AUTHZ_DENY, AUTHZ_ALLOW)
    ]


def _rbac_per_route(name: str, rules: rbac_config.RBAC) -> any_pb2.Any:
    return pack(rbac_pb2.RBACPerRoute(rbac=rbac_pb2.RBAC(rules=rules, rules_stat_prefix=_STAT[name])))


def _outbound_manager(node: NodeInfo, extra_filters: Sequence[hcm.HttpFilter], destination: str) -> hcm.HttpConnectionManager:
    filters: list[hcm.HttpFilter] = []
    if node.service:
        filters.append(_stamp_caller(node.service))
    filters.extend(extra_filters)
    filters.append(_router())
    return hcm.HttpConnectionManager(
        stat_prefix="outbound",
        codec_type=hcm.HttpConnectionManager.AUTO,
        rds=hcm.Rds(config_source=ads_source(), route_config_name=OUTBOUND_ROUTE),
        http_filters=filters,
        access_log=[access_log("outbound", {"source_service": node.service_key, "destination_service": destination})],
    )


def _vip_chains(
    node: NodeInfo, extra_filters: Sequence[hcm.HttpFilter], services: Sequence[Service], domain: str
) -> list[listener_components_pb2.FilterChain]:
    chains = []
    for svc in sorted(services, key=lambda s: s.key):
        if not svc.vip:
            continue
        try:
            vip = ipaddress.ip_address(svc.vip)
        except ValueError:
            continue
        for port in svc.ports:
            cluster = cluster_name(svc, port, domain)
            manager: Message
            if port.protocol == "tcp":
                manager = tcp_proxy_pb2.TcpProxy(
                    stat_prefix=f"outbound_tcp|{port.port}|{svc.key}", cluster=cluster,
                    access_log=[access_log("outbound", {"source_service": node.service_key, "destination_service": svc.key})],
                )
            else:
                manager = _outbound_manager(node, extra_filters, svc.key)
            chain = _chain(manager, f"{svc.vip}:{port.port}")
            chain.filter_chain_match.prefix_ranges.add(address_prefix=str(vip), prefix_len={"value": vip.max_prefixlen})
            chain.filter_chain_match.destination_port.value = port.port
            chains.append(chain)
    return chains


def build_outbound_listener(
    node: NodeInfo,
    extra_filters: Sequence[hcm.HttpFilter] = (),
    services: Sequence[Service] = (),
    domain: str = "mesh",
) -> listener_pb2.Listener:
    """The listener apps call through. With ``node.capture``, ``services`` give the per-VIP chains."""
    manager = _outbound_manager(node, extra_filters, DESTINATION_SERVICE)
    listener = listener_pb2.Listener(name=OUTBOUND, address=_address(node.bind_address, node.outbound_port))
    listener.traffic_direction = base_pb2.OUTBOUND
    if node.capture:
        listener.listener_filters.append(
            listener_components_pb2.ListenerFilter(
                name="envoy.filters.listener.original_dst", typed_config=pack(original_dst_pb2.OriginalDst())
            )
        )
        listener.filter_chains.extend(_vip_chains(node, extra_filters, services, domain))
        listener.default_filter_chain.CopyFrom(_chain(manager, "default"))
    else:
        listener.filter_chains.append(_chain(manager))
    return listener


def _untraced(route: rc.Route) -> None:
    """The node's own health checks are never traced (at a high sampling rate they would bury the
    traces of real requests); the listener's tracing config stays as it is for every other route."""
    for percent in (route.tracing.client_sampling, route.tracing.random_sampling, route.tracing.overall_sampling):
        percent.SetInParent()  # 0 %


def build_inbound_routes(
    node: NodeInfo,
    filters_off: Sequence[str] = (),
    health_token: str = "",
    health_skips: Sequence[str] = (),
    authz: InboundAuthz | None = None,
) -> route_pb2.RouteConfiguration:
    """The inbound listener's routes: everything to the app. They come by RDS (scoped to the node)
    rather than inside the listener so that ``filters_off`` (HTTP filters the node's inbound requests
    skip, the governance filter while no limit applies to its service) can change without a listener
    update, which would drain the app's connections. With a ``health_token``, requests carrying it in
    ``x-mesh-health-check`` (the node's own health checks) take a first route that switches off every
    filter in ``health_skips`` and drops the header before the app sees it. ``authz``: the RBAC
    rules of the AuthorizationPolicies in force, on the virtual host for the inbound RBAC filters
    (the health route skips them: an ALLOW policy must not fail the node's own checks)."""
    route = route_pb2.RouteConfiguration(name=INBOUND_ROUTE)
    vh = route.virtual_hosts.add(name="inbound", domains=["*"])
    action = rc.RouteAction(cluster=inbound_cluster_name(node.app_port))
    action.timeout.SetInParent()  # 0: the caller's sidecar owns the timeout
    if health_token:
        h = vh.routes.add(name="health")
        h.match.prefix = "/"
        h.match.headers.add(name=HEALTH_HEADER).string_match.exact = health_token
        h.route.CopyFrom(action)
        h.request_headers_to_remove.append(HEALTH_HEADER)
        _untraced(h)
        for name in health_skips:
            h.typed_per_filter_config[name].CopyFrom(pack(rc.FilterConfig(disabled=True)))
        if authz is not None and (authz.deny is not None or authz.allow is not None):
            for name in (AUTHZ_DENY, AUTHZ_ALLOW):
                h.typed_per_filter_config[name].CopyFrom(pack(rc.FilterConfig(disabled=True)))
    r = vh.routes.add(name="inbound")
    r.match.prefix = "/"
    r.route.CopyFrom(action)
    for name in filters_off:
        vh.typed_per_filter_config[name].CopyFrom(pack(rc.FilterConfig(disabled=True)))
    if authz is not None:
        if authz.deny is not None:
            vh.typed_per_filter_config[AUTHZ_DENY].CopyFrom(_rbac_per_route(AUTHZ_DENY, authz.deny))
        if authz.allow is not None:
            vh.typed_per_filter_config[AUTHZ_ALLOW].CopyFrom(_rbac_per_route(AUTHZ_ALLOW, authz.allow))
    return route


def build_inbound_local_routes(
    node: NodeInfo, health_token: str = "", health_skips: Sequence[str] = ()
) -> route_pb2.RouteConfiguration:
    """STRICT mode's plaintext routes from the node itself: its health checks (by their token) reach
    the app past every optional filter; everything else is refused with 403 (plaintext callers are
    not admitted in STRICT mode, the node's own processes included)."""
    route = route_pb2.RouteConfiguration(name=INBOUND_LOCAL_ROUTE)
    vh = route.virtual_hosts.add(name="inbound-local", domains=["*"])
    if health_token:
        action = rc.RouteAction(cluster=inbound_cluster_name(node.app_port))
        action.timeout.SetInParent()
        h = vh.routes.add(name="health")
        h.match.prefix = "/"
        h.match.headers.add(name=HEALTH_HEADER).string_match.exact = health_token
        h.route.CopyFrom(action)
        h.request_headers_to_remove.append(HEALTH_HEADER)
        _untraced(h)
        for name in (*health_skips, AUTHZ_DENY, AUTHZ_ALLOW):
            h.typed_per_filter_config[name].CopyFrom(pack(rc.FilterConfig(disabled=True)))
    r = vh.routes.add(name="strict")
    r.match.prefix = "/"
    r.direct_response.status = 403
    r.direct_response.body.inline_string = "meshpilot: this service accepts mutual TLS only (mtls mode STRICT)\n"
    return route


def _inbound_manager(
    node: NodeInfo, extra_filters: Sequence[hcm.HttpFilter], strip: bool, *, peer: bool = False, route: str = INBOUND_ROUTE
) -> hcm.HttpConnectionManager:
    """``strip``: drop the caller header; ``peer``: set it from the peer certificate (TLS chains)."""
    filters = [_peer_caller()] if peer else [_strip_caller()] if strip else []
    manager = hcm.HttpConnectionManager(
        stat_prefix="inbound",
        codec_type=hcm.HttpConnectionManager.AUTO,
        rds=hcm.Rds(config_source=ads_source(), route_config_name=route),
        http_filters=[*filters, *_rbac_filters(), *extra_filters, _router()],
        access_log=[access_log("inbound", {
            "source_service": f"%REQ({CALLER_HEADER})%", "destination_service": node.service_key,
            "source_principal": "%DOWNSTREAM_PEER_URI_SAN%", "destination_principal": "%DOWNSTREAM_LOCAL_URI_SAN%",
            "details": "%RESPONSE_CODE_DETAILS%",
        }), _direct_requests_log(node)],
    )
    _normalise_paths(manager)
    return manager


def _normalise_paths(manager: hcm.HttpConnectionManager) -> None:
    """The path the RBAC rules see is the path the app gets: RFC 3986 normalisation (dot segments
    out, percent-encoded unreserved characters decoded) and doubled slashes merged before any
    filter runs. A path with an escaped slash or backslash (``%2F``, ``%5C``) is refused (400):
    apps disagree on whether it separates segments, so no rule could say what it names; a redirect
    to the unescaped path instead would reach gRPC and most API clients as an error anyway, and
    would turn a request the caller's rules chose into one it did not. Case is kept: path rules
    are case-sensitive, as in Istio (docs/policy.md)."""
    manager.normalize_path.value = True
    manager.merge_slashes = True
    manager.path_with_escaped_slashes_action = hcm.HttpConnectionManager.REJECT_REQUEST


def _tls_chain(chain: listener_components_pb2.FilterChain) -> listener_components_pb2.FilterChain:
    chain.filter_chain_match.transport_protocol = "tls"
    chain.transport_socket.CopyFrom(tls_socket(downstream_tls()))
    return chain


def _inbound_tcp(node: NodeInfo, direction_fields: dict[str, str]) -> tcp_proxy_pb2.TcpProxy:
    return tcp_proxy_pb2.TcpProxy(
        stat_prefix="inbound_tcp", cluster=inbound_cluster_name(node.app_port),
        access_log=[access_log("inbound", {"destination_service": node.service_key, **direction_fields})],
    )


def _mtls_listener(listener: listener_pb2.Listener, node: NodeInfo, extra_filters: Sequence[hcm.HttpFilter],
                   protocol: str, mode: str) -> listener_pb2.Listener:
    """PERMISSIVE: TLS (caller from the certificate) or plaintext (caller stripped). STRICT: TLS,
    and for HTTP plaintext only from the node itself (its health checks, which go through this
    listener). A STRICT TCP listener takes TLS only: HDS checks a TCP app by connecting to the
    app's own port (hds/metadata.py), so no plaintext chain is needed for it, and one would let
    any process on the node reach the app without an identity."""
    listener.listener_filters.append(listener_components_pb2.ListenerFilter(
        name="envoy.filters.listener.tls_inspector", typed_config=pack(tls_inspector_pb2.TlsInspector())))
    if protocol == "tcp":
        # a server-first protocol (the app speaks first: SMTP, MySQL) gives the inspector nothing to
        # read: after a second the connection goes on as plaintext instead of being closed
        listener.continue_on_listener_filters_timeout = True
        listener.listener_filters_timeout.CopyFrom(duration_pb2.Duration(seconds=1))
        tls_manager: Message = _inbound_tcp(node, {"source_service": "-", "source_principal": "%DOWNSTREAM_PEER_URI_SAN%"})
        plain_manager: Message = _inbound_tcp(node, {"source_service": "-", "source_principal": "-"})
        local_manager: Message | None = None  # HDS checks a TCP app on its own port, not through here
    else:
        tls_manager = _inbound_manager(node, extra_filters, strip=False, peer=True)
        plain_manager = _inbound_manager(node, extra_filters, strip=True)
        local_manager = _inbound_manager(node, extra_filters, strip=True, route=INBOUND_LOCAL_ROUTE)
    listener.filter_chains.append(_tls_chain(_chain(tls_manager, "mtls")))
    if mode == STRICT:
        if local_manager is None:
            return listener
        local = _chain(local_manager, "local")
        local.filter_chain_match.source_type = listener_components_pb2.FilterChainMatch.SAME_IP_OR_LOOPBACK
        listener.filter_chains.append(local)
    else:
        listener.default_filter_chain.CopyFrom(_chain(plain_manager, "plaintext"))
    return listener


def _network_rbac(authz: InboundAuthz | None) -> list[listener_components_pb2.Filter]:
    """A TCP listener's authorization: network RBAC filters, deny then allow, with the rules of the
    policies in force (stats ``inbound_tcp.authz_deny.rbac.denied``, ...). Checked when the
    connection is set up, before the proxy connects to the app, so a server-first app says
    nothing to a refused caller."""
    if authz is None:
        return []
    return [
        listener_components_pb2.Filter(name=name, typed_config=pack(network_rbac_pb2.RBAC(
            rules=rules, stat_prefix=f"inbound_tcp.{_STAT[name]}.")))
        for name, rules in ((AUTHZ_DENY, authz.tcp_deny), (AUTHZ_ALLOW, authz.tcp_allow))
        if rules is not None
    ]


def _guard_tcp(listener: listener_pb2.Listener, authz: InboundAuthz | None) -> listener_pb2.Listener:
    """Every chain of a TCP inbound listener gets the RBAC filters before its TCP proxy."""
    guards = _network_rbac(authz)
    if guards:
        chains = [*listener.filter_chains, *([listener.default_filter_chain] if listener.HasField("default_filter_chain") else [])]
        for chain in chains:
            filters = [*guards, *chain.filters]
            del chain.filters[:]
            chain.filters.extend(filters)
    return listener


def build_inbound_listener(
    node: NodeInfo,
    extra_filters: Sequence[hcm.HttpFilter] = (),
    trusted_peers: Sequence[str] | None = None,
    protocol: str = "http",
    mtls: str = DISABLE,
    authz: InboundAuthz | None = None,
) -> listener_pb2.Listener:
    """The listener in front of the app. ``trusted_peers``: addresses of registered sidecars, whose
    ``x-mesh-caller`` is kept; every other peer's is stripped. None keeps it from everyone.
    A ``tcp`` app gets a plain TCP proxy (no HTTP filters, no caller header). ``mtls``: the
    service's mode, for a node with an identity (the caller decides; DISABLE is the rule above).
    ``authz``: for a ``tcp`` app, the rules of the AuthorizationPolicies in force, as network RBAC
    filters on every chain (an HTTP app takes its rules from its routes; ``authz`` is ignored)."""
    if mtls not in MODES:
        raise ValueError(f"mtls mode must be one of {', '.join(MODES)}, got {mtls!r}")
    listener = listener_pb2.Listener(name=INBOUND, address=_address(node.bind_address, node.inbound_port))
    listener.traffic_direction = base_pb2.INBOUND  # drained first on graceful offline
    if mtls != DISABLE:
        built = _mtls_listener(listener, node, extra_filters, protocol, mtls)
        return _guard_tcp(built, authz) if protocol == "tcp" else built
    if protocol == "tcp":
        listener.filter_chains.append(_chain(_inbound_tcp(node, {"source_service": "-"}), "tcp"))
        return _guard_tcp(listener, authz)
    if trusted_peers is None:
        listener.filter_chains.append(_chain(_inbound_manager(node, extra_filters, strip=False)))
        return listener
    peers = sorted({str(ipaddress.ip_address(p)) for p in trusted_peers})
    if peers:
        chain = _chain(_inbound_manager(node, extra_filters, strip=False), "sidecars")
        for p in peers:
            ip = ipaddress.ip_address(p)
            chain.filter_chain_match.source_prefix_ranges.add(address_prefix=p, prefix_len={"value": ip.max_prefixlen})
        listener.filter_chains.append(chain)
    listener.default_filter_chain.CopyFrom(_chain(_inbound_manager(node, extra_filters, strip=True), "others"))
    return listener
