"""Services → the outbound RouteConfiguration (RDS): one virtual host per HTTP service port.

Every name form of the shared model is a domain of its virtual host. The short form ``<svc>``
belongs to the service in namespace ``default`` when there is one, else to the only service of
that name; when several namespaces share a name and none is ``default``, callers must qualify it.
Unknown hosts get a 404 that says so. The route configuration is shared by every sidecar, so
per-node details (the ``x-mesh-caller`` stamp) live in each node's listener instead.
"""

from __future__ import annotations

from collections import Counter

from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from google.protobuf import any_pb2

from meshpilot.model import Service
from meshpilot.translate.clusters import duration_ms
from meshpilot.translate.names import OUTBOUND_ROUTE, cluster_name, host_forms

__all__ = ["build_outbound_routes", "build_route_action", "short_name_owners"]

_PREVIOUS_HOSTS = "envoy.retry_host_predicates.previous_hosts"


def short_name_owners(services: list[Service]) -> set[str]:
    """Service keys that own their bare ``<svc>`` name."""
    counts = Counter(s.name for s in services)
    owners = set()
    default_names = {s.name for s in services if s.namespace == "default"}
    for s in services:
        if s.namespace == "default" or (counts[s.name] == 1 and s.name not in default_names):
            owners.add(s.key)
    return owners


def build_route_action(service: Service, cluster: str) -> rc.RouteAction:
    t = service.traffic
    action = rc.RouteAction(cluster=cluster, timeout=duration_ms(t.timeout_ms))
    if t.retries:
        from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2

        predicate = any_pb2.Any()
        predicate.Pack(previous_hosts_pb2.PreviousHostsPredicate())
        action.retry_policy.CopyFrom(
            rc.RetryPolicy(
                retry_on=t.retry_on,
                host_selection_retry_max_attempts=5,
                retry_host_predicate=[rc.RetryPolicy.RetryHostPredicate(name=_PREVIOUS_HOSTS, typed_config=predicate)],
            )
        )
        action.retry_policy.num_retries.value = t.retries
        if t.per_try_timeout_ms:
            action.retry_policy.per_try_timeout.CopyFrom(duration_ms(t.per_try_timeout_ms))
    return action


def build_outbound_routes(services: list[Service], domain: str) -> route_pb2.RouteConfiguration:
    owners = short_name_owners(services)
    cfg = route_pb2.RouteConfiguration(name=OUTBOUND_ROUTE, validate_clusters={"value": False})
    for s in sorted(services, key=lambda x: x.key):
        for p in s.ports:
            if p.protocol == "tcp":
                continue
            cluster = cluster_name(s, p, domain)
            vh = cfg.virtual_hosts.add(name=f"{s.key}:{p.port}")
            vh.domains.extend(host_forms(s, p, domain, short=s.key in owners))
            route = vh.routes.add(name=cluster)
            route.match.prefix = "/"
            route.route.CopyFrom(build_route_action(s, cluster))
    fallback = cfg.virtual_hosts.add(name="unknown-host", domains=["*"])
    r = fallback.routes.add(name="unknown-host")
    r.match.prefix = "/"
    r.direct_response.status = 404
    r.direct_response.body.inline_string = "meshpilot: no mesh service answers to this host\n"
    return cfg
