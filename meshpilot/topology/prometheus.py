"""The queries /v1/topology asks the mesh's Prometheus (``prometheus_url``, its HTTP API ``/api/v1/query``),
run together; their results go to graph.py, which holds no I/O. Counters are read raw over the window and at
its start, so graph.py can count exactly; latency comes as each histogram's bucket counts over the window
(Envoy's ``upstream_rq_time`` and the direct callers' ``direct_request_time``, milliseconds), from which
graph.py takes the quantiles of an edge and of all the requests into a service."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from meshpilot.topology.graph import Series, parse_series
from meshpilot.translate.listeners import DIRECT_REQUEST_TIME, DIRECT_REQUESTS

__all__ = ["PrometheusError", "queries", "query_all"]

_CLUSTERS = r'envoy_cluster_name=~"outbound\\|.+"'
# every request the caller's sidecar answered for the cluster: upstream_rq_total leaves out the ones that
# never reached an upstream (no healthy endpoint, connection refused), whose 503s upstream_rq_xx does count
_REQUESTS = f"envoy_cluster_upstream_rq_completed{{{_CLUSTERS}}}"
_ERRORS = f'envoy_cluster_upstream_rq_xx{{envoy_response_code_class="5",{_CLUSTERS}}}'
_DIRECT = DIRECT_REQUESTS  # requests a callee's sidecar took without a caller's sidecar (by peer address)


# latency buckets summed per caller and cluster (per callee and peer for direct callers): read at the window's
# end and start, as increase() would miss the requests of a series that first appeared with them in it
_BUCKETS = f"sum by (le, source_service, envoy_cluster_name) (envoy_cluster_upstream_rq_time_bucket{{{_CLUSTERS}}})"
_DIRECT_BUCKETS = f"sum by (le, destination_service, peer) ({DIRECT_REQUEST_TIME}_bucket)"


def queries(window_s: float) -> dict[str, tuple[str, float]]:
    """Each query by the Queried field it fills: (PromQL, how long before now it is evaluated)."""
    w = f"{int(window_s * 1000)}ms"
    return {
        "requests": (f"{_REQUESTS}[{w}]", 0.0),
        "requests_before": (_REQUESTS, window_s),
        "errors": (f"{_ERRORS}[{w}]", 0.0),
        "errors_before": (_ERRORS, window_s),
        "buckets": (_BUCKETS, 0.0),
        "buckets_before": (_BUCKETS, window_s),
        "direct": (f"{_DIRECT}[{w}]", 0.0),
        "direct_before": (_DIRECT, window_s),
        "direct_buckets": (_DIRECT_BUCKETS, 0.0),
        "direct_buckets_before": (_DIRECT_BUCKETS, window_s),
    }


class PrometheusError(Exception):
    """Prometheus could not be asked, or did not answer a query; the message says which and why."""


async def _query(http: aiohttp.ClientSession, url: str, promql: str, at: float) -> list[Series]:
    try:
        async with http.get(f"{url.rstrip('/')}/api/v1/query", params={"query": promql, "time": f"{at:.3f}"}) as r:
            body: Any = await r.json(content_type=None)
            status = r.status
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
        raise PrometheusError(f"prometheus_url: {url} could not be asked ({type(exc).__name__}: {exc})") from None
    if status != 200 or not isinstance(body, dict) or body.get("status") != "success":
        why = body.get("error") if isinstance(body, dict) else None
        raise PrometheusError(f"prometheus_url: {url} answered {status} to {promql!r}: {why or 'not a query result'}")
    data = body.get("data")
    try:
        return parse_series(data.get("result") if isinstance(data, dict) else None)
    except ValueError as exc:
        raise PrometheusError(f"prometheus_url: {url} gave a result that is not Prometheus' ({exc})") from None


async def query_all(url: str, window_s: float, now: float, timeout_s: float = 10.0) -> dict[str, list[Series]]:
    """Every query of :func:`queries` at ``now``; PrometheusError when any fails."""
    asked = queries(window_s)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:
        got = await asyncio.gather(*(_query(http, url, promql, now - back) for promql, back in asked.values()))
    return dict(zip(asked, got, strict=True))
