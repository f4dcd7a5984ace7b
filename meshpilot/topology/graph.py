"""The mesh as a graph, computed from what Prometheus scraped off the sidecars: nodes are services (every
registered one, whichever front door registered it, and every caller seen in the stats), edges are
caller → callee with the requests, request rate, 5xx share and latency quantiles of a window.

Every sidecar's Envoy tags all its stats with ``source_service`` (its own ``<svc>.<ns>``, bootstrap.py);
the destination is the cluster in ``envoy_cluster_name``, ``outbound|<port>||<svc>.<ns>.svc.<domain>``
(Envoy writes the dots as underscores). An edge between two sidecars is counted where the request leaves,
from the caller's outbound cluster (Istio's ``reporter="source"``). A request that reached a callee's
inbound listener without a caller's sidecar (an SDK app, a client outside the mesh) is counted there, by
peer address (``envoy_meshpilot_direct_requests``, translate/listeners.py); the caller is the service
registered through an SDK front door (Consul, Eureka, the API) at that address, when exactly one is, and
``unknown`` otherwise (``reporter="destination"``).

Counts are exact for the window, not extrapolated: a counter's increase is summed sample by sample from
its value at the window's start (a drop is a restart: counting starts again from 0), so the count
matches what was sent once the last request has been scraped. Pure: Prometheus API results in, a
JSON-serialisable document out; meshpilot/topology/prometheus.py runs the queries.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshpilot.model import Instance, Service

__all__ = ["UNKNOWN", "Queried", "Series", "histogram_quantile", "parse_series", "series_increase", "topology", "window_increase"]

UNKNOWN = "unknown"  # the caller of requests no sidecar reported sending
_OUTBOUND = re.compile(r"^outbound\|(\d+)\|[^|]*\|(.+)$")


@dataclass(frozen=True, slots=True)
class Series:
    """One time series: its labels (``__name__`` among them when the query kept it) and its samples
    (time, value), oldest first."""

    labels: Mapping[str, str]
    samples: tuple[tuple[float, float], ...]

    @property
    def key(self) -> tuple[tuple[str, str], ...]:
        return tuple(sorted(self.labels.items()))


@dataclass(frozen=True, slots=True)
class Queried:
    """The Prometheus results a topology is computed from (``data.result`` of each query, parsed).
    ``requests``/``errors``: the callers' outbound counters over the window (range vectors), ``*_before``:
    the same counters at the window's start (instant vectors); ``buckets`` (and ``_before``): the cumulative
    latency buckets (ms, ``le``) by source and cluster at the window's end and start (instant vectors);
    ``direct`` (and ``_before``): the callees' counters of requests without a caller's sidecar, by
    ``destination_service``, ``peer`` and ``response_code``; ``direct_buckets`` (and ``_before``): their
    latency buckets by ``destination_service`` and ``peer``."""

    requests: Sequence[Series] = ()
    requests_before: Sequence[Series] = ()
    errors: Sequence[Series] = ()
    errors_before: Sequence[Series] = ()
    buckets: Sequence[Series] = ()
    buckets_before: Sequence[Series] = ()
    direct: Sequence[Series] = ()
    direct_before: Sequence[Series] = ()
    direct_buckets: Sequence[Series] = ()
    direct_buckets_before: Sequence[Series] = ()
    services: Sequence[Service] = ()
    instances: Sequence[Instance] = ()
    domain: str = "mesh"
    window_s: float = 300.0
    time: float = 0.0


def _number(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def parse_series(result: Any) -> list[Series]:
    """Prometheus' ``data.result`` (a vector or a matrix) as Series; ValueError naming what is wrong."""
    if not isinstance(result, list):
        raise ValueError(f"result: expected a list of series, got {type(result).__name__}")
    out = []
    for i, item in enumerate(result):
        if not isinstance(item, dict) or not isinstance(item.get("metric"), dict):
            raise ValueError(f"result.{i}: expected an object with 'metric'")
        labels = {str(k): str(v) for k, v in item["metric"].items()}
        raw = item.get("values") if "values" in item else [item.get("value")]
        if not isinstance(raw, list):
            raise ValueError(f"result.{i}.values: expected a list of [time, value]")
        samples = []
        for pair in raw:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise ValueError(f"result.{i}: expected samples as [time, value], got {pair!r}")
            t, v = _number(pair[0]), _number(pair[1])
            if t is not None and v is not None:
                samples.append((t, v))
        out.append(Series(labels, tuple(samples)))
    return out


def window_increase(samples: Sequence[tuple[float, float]], before: float | None) -> float:
    """How much a counter grew over the window: from ``before`` (its value at the window's start; None: the
    series began inside the window, so from 0) through each sample; a drop is a restart, after which it
    counts again from 0."""
    prev = before if before is not None else 0.0
    total = 0.0
    for _, v in samples:
        total += v - prev if v >= prev else v
        prev = v
    return total


def series_increase(window: Sequence[Series], before: Sequence[Series]) -> list[tuple[Mapping[str, str], float]]:
    """Each series' increase over the window, its value at the start taken from ``before``."""
    start = {s.key: s.samples[-1][1] for s in before if s.samples}
    return [(s.labels, window_increase(s.samples, start.get(s.key))) for s in window]


def _cluster_services(services: Iterable[Service], domain: str) -> dict[str, str]:
    """Envoy's spelling of each service's host name in a cluster name (dots as underscores, and as
    written) → the service key."""
    out: dict[str, str] = {}
    for svc in services:
        host = f"{svc.name}.{svc.namespace}.svc.{domain}"
        out[host] = svc.key
        out[host.replace(".", "_")] = svc.key
    return out


def _destination(cluster: str, known: Mapping[str, str], domain: str) -> str | None:
    """The service key an outbound cluster name stands for, None for any other cluster."""
    m = _OUTBOUND.match(cluster)
    if m is None:
        return None
    host = m.group(2)
    if host in known:
        return known[host]
    # a service deleted since: <name>_<ns>_svc_<domain> (names and namespaces are DNS labels, no _ or .)
    for sep in (".", "_"):
        suffix = f"{sep}svc{sep}{domain.replace('.', sep)}"
        if host.endswith(suffix):
            parts = host[: -len(suffix)].split(sep)
            if len(parts) == 2 and all(parts):
                return f"{parts[0]}.{parts[1]}"
    return None


@dataclass(slots=True)
class _Edge:
    requests: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)  # upper bound (ms) -> requests at or below it
    reporter: str = "source"


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """Prometheus' ``histogram_quantile`` over cumulative buckets (upper bound -> count at or below it): the
    bucket the q-th request falls in, interpolated linearly inside it (from 0 for the first); in the +Inf
    bucket, the highest finite bound. None without requests."""
    bounds = sorted(buckets)
    if not bounds or not math.isinf(bounds[-1]):
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = max(buckets[bound], below)  # cumulative counts never fall (scrapes may disagree slightly)
        if count >= rank:
            if math.isinf(bound):
                return lower if len(bounds) > 1 else None
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return None


def _growth(now: Sequence[Series], before: Sequence[Series]) -> list[tuple[Mapping[str, str], float]]:
    """Each series' growth between two instant readings: from 0 for a series that was not there at the
    start, and its whole value after a drop (a restart)."""
    start = {s.key: s.samples[-1][1] for s in before if s.samples}
    out = []
    for s in now:
        if s.samples:
            end, was = s.samples[-1][1], start.get(s.key, 0.0)
            out.append((s.labels, end - was if end >= was else end))
    return out


def _add_buckets(into: dict[float, float], labels: Mapping[str, str], value: float) -> None:
    try:
        bound = float(labels.get("le", ""))
    except ValueError:
        return
    into[bound] = into.get(bound, 0.0) + value


def _address(text: str) -> str:
    """An address as the registry writes it (an IPv4-mapped IPv6 peer as IPv4); junk as given."""
    try:
        ip = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return text
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


def _sdk_callers(instances: Iterable[Instance]) -> dict[str, set[str]]:
    """Address → the services registered there through an SDK front door (not by a sidecar over HDS: a
    sidecar's address is its own, and its app's requests go out through it)."""
    out: dict[str, set[str]] = defaultdict(set)
    for inst in instances:
        if inst.source != "mesh":
            out[_address(inst.address)].add(inst.service_key)
    return out


def _caller(peer: str, callers: Mapping[str, set[str]]) -> str:
    """The service at the peer's address when exactly one is registered there, else ``unknown``."""
    found = callers.get(_address(peer), set())
    return next(iter(found)) if len(found) == 1 else UNKNOWN


def _round(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def topology(q: Queried, namespace: str | None = None) -> dict[str, Any]:
    """The graph: ``nodes`` (services) and ``edges`` (caller → callee), each edge with ``requests`` (exact
    count in the window), ``rps``, ``errors`` (5xx), ``error_rate``, ``p50_ms``, ``p99_ms`` (None without
    traffic) and ``reporter`` (``source``: the caller's sidecar; ``destination``: the callee's, for
    callers without one, named by their registered address or ``unknown``). With ``namespace``: the edges
    that start or end there, the services of the namespace and the other ends of those edges."""
    known = _cluster_services(q.services, q.domain)
    edges: dict[tuple[str, str], _Edge] = defaultdict(_Edge)
    for labels, n in series_increase(q.requests, q.requests_before):
        src = labels.get("source_service", "")
        dest = _destination(labels.get("envoy_cluster_name", ""), known, q.domain)
        if src and dest is not None:
            edges[(src, dest)].requests += n
    for labels, n in series_increase(q.errors, q.errors_before):
        src = labels.get("source_service", "")
        dest = _destination(labels.get("envoy_cluster_name", ""), known, q.domain)
        if src and dest is not None:
            edges[(src, dest)].errors += n
    callers = _sdk_callers(q.instances)
    for labels, n in series_increase(q.direct, q.direct_before):
        dest = labels.get("destination_service", "")
        if not dest or dest == "-":
            continue
        e = edges[(_caller(labels.get("peer", ""), callers), dest)]
        e.reporter = "destination"
        e.requests += n
        if labels.get("response_code", "").startswith("5"):
            e.errors += n
    for labels, n in _growth(q.buckets, q.buckets_before):
        src = labels.get("source_service", "")
        dest = _destination(labels.get("envoy_cluster_name", ""), known, q.domain)
        if src and dest is not None and (src, dest) in edges:
            _add_buckets(edges[(src, dest)].buckets, labels, n)
    for labels, n in _growth(q.direct_buckets, q.direct_buckets_before):
        key = (_caller(labels.get("peer", ""), callers), labels.get("destination_service", ""))
        if key in edges:
            _add_buckets(edges[key].buckets, labels, n)
    edge_list: list[dict[str, Any]] = []
    for (src, dest), e in sorted(edges.items()):
        if e.requests <= 0 and e.errors <= 0:
            continue  # a cluster that exists but carried nothing in the window
        edge_list.append({
            "source": src, "destination": dest, "requests": int(round(e.requests)),
            "rps": _round(e.requests / q.window_s), "errors": int(round(e.errors)),
            "error_rate": _round(e.errors / e.requests if e.requests else 0.0, 4),
            "p50_ms": _round(histogram_quantile(0.5, e.buckets)), "p99_ms": _round(histogram_quantile(0.99, e.buckets)),
            "reporter": e.reporter,
        })
    into: dict[str, dict[float, float]] = defaultdict(dict)
    for (_, dest), e in edges.items():
        for bound, n in e.buckets.items():
            into[dest][bound] = into[dest].get(bound, 0.0) + n
    nodes = _nodes(q, edge_list, into)
    if namespace is not None:
        edge_list = [e for e in edge_list if _namespace(e["source"]) == namespace or _namespace(e["destination"]) == namespace]
        ends = {k for e in edge_list for k in (e["source"], e["destination"])}
        nodes = [n for n in nodes if n["namespace"] == namespace or n["id"] in ends]
    return {"time": q.time, "window_s": q.window_s, "nodes": nodes, "edges": edge_list}


def _namespace(key: str) -> str:
    return key.partition(".")[2]


def _nodes(q: Queried, edges: Sequence[Mapping[str, Any]], latency_in: Mapping[str, dict[float, float]]) -> list[dict[str, Any]]:
    sources: dict[str, set[str]] = defaultdict(set)
    count: dict[str, int] = defaultdict(int)
    for inst in q.instances:
        sources[inst.service_key].add(inst.source)
        count[inst.service_key] += 1
    nodes: dict[str, dict[str, Any]] = {}
    for svc in q.services:
        nodes[svc.key] = {"id": svc.key, "name": svc.name, "namespace": svc.namespace, "registered": True,
                          "sources": sorted(sources.get(svc.key, ())), "instances": count.get(svc.key, 0)}
    for e in edges:
        for key in (e["source"], e["destination"]):
            if key not in nodes:
                name, _, ns = key.partition(".")
                nodes[key] = {"id": key, "name": name, "namespace": ns, "registered": False,
                              "sources": sorted(sources.get(key, ())), "instances": count.get(key, 0)}
    requests_in: dict[str, int] = defaultdict(int)
    requests_out: dict[str, int] = defaultdict(int)
    errors_in: dict[str, int] = defaultdict(int)
    for e in edges:
        requests_in[e["destination"]] += e["requests"]
        requests_out[e["source"]] += e["requests"]
        errors_in[e["destination"]] += e["errors"]
    for node in nodes.values():
        node["requests_in"] = requests_in.get(node["id"], 0)
        node["requests_out"] = requests_out.get(node["id"], 0)
        node["rps_in"] = _round(node["requests_in"] / q.window_s)
        node["errors_in"] = errors_in.get(node["id"], 0)
        node["error_rate_in"] = _round(node["errors_in"] / node["requests_in"] if node["requests_in"] else 0.0, 4)
        node["p50_ms_in"] = _round(histogram_quantile(0.5, latency_in.get(node["id"], {})))
        node["p99_ms_in"] = _round(histogram_quantile(0.99, latency_in.get(node["id"], {})))
    return [nodes[k] for k in sorted(nodes)]
