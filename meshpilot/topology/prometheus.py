"""The queries /v1/topology asks the mesh's Prometheus (``prometheus_url``, its HTTP API ``/api/v1/query``),
run together; their results go to graph.py, which holds no I/O. Counters are read raw over the window and at
its start, so graph.py can count exactly; latency comes as each histogram's bucket counts over the window
(Envoy's ``upstream_rq_time`` and the direct callers' ``direct_request_time``, milliseconds), from which
graph.py takes the quantiles of an edge and of all the requests into a service.

The raw samples are bounded before they are asked for: Prometheus first counts the samples the three range
queries hold (``count_over_time``, one number per query), and a window holding more than ``MAX_SAMPLES``
is refused naming the longest window that fits (WindowTooLarge), so ``?window=24h`` over a large mesh never
pulls hundreds of MB. Each answer is read up to ``MAX_BODY`` bytes and decoded in a worker thread, off the
event loop that serves xDS."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import aiohttp

from meshpilot.topology.graph import Series, parse_series
from meshpilot.translate.listeners import DIRECT_REQUEST_TIME, DIRECT_REQUESTS

__all__ = ["MAX_BODY", "MAX_SAMPLES", "PrometheusError", "WindowTooLarge", "queries", "query_all", "sample_counts"]

MAX_SAMPLES = 500_000  # raw samples over the three range queries (~20 MB of JSON, ~50 MB once read)
MAX_BODY = 64 * 1024 * 1024  # bytes of one Prometheus answer

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


def sample_counts(window_s: float) -> list[str]:
    """The queries counting the raw samples each range query of :func:`queries` would return."""
    return [f"sum(count_over_time({promql}))" for promql, _ in queries(window_s).values() if promql.endswith("]")]


class PrometheusError(Exception):
    """Prometheus could not be asked, or did not answer a query; the message says which and why."""


class WindowTooLarge(Exception):
    """The window holds more raw samples than MAX_SAMPLES; ``fits_s``: the longest window that would fit at
    the same density."""

    def __init__(self, window_s: float, samples: int, fits_s: float) -> None:
        super().__init__(f"window: {window_s:g}s holds {samples} samples in Prometheus, more than the {MAX_SAMPLES} "
                         f"the topology reads; ask for at most {fits_s:g}s")
        self.samples = samples
        self.fits_s = fits_s


def _decode(raw: bytes) -> tuple[Any, list[Series] | ValueError]:
    """The answer's JSON and its series (or the ValueError naming what is wrong with its result)."""
    body: Any = json.loads(raw)
    data = body.get("data") if isinstance(body, dict) else None
    try:
        return body, parse_series(data.get("result") if isinstance(data, dict) else None)
    except ValueError as exc:
        return body, exc


async def _read(r: aiohttp.ClientResponse) -> bytes:
    """The body, refused past MAX_BODY bytes without reading more than that."""
    if r.content_length is not None and r.content_length > MAX_BODY:
        raise ValueError(f"the answer is {r.content_length} bytes, more than {MAX_BODY} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in r.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > MAX_BODY:
            raise ValueError(f"the answer is more than {MAX_BODY} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _query(http: aiohttp.ClientSession, url: str, promql: str, at: float) -> list[Series]:
    try:
        async with http.get(f"{url.rstrip('/')}/api/v1/query", params={"query": promql, "time": f"{at:.3f}"}) as r:
            raw = await _read(r)
            status = r.status
        # off the loop: a range query's answer can be tens of MB of JSON
        body, result = await asyncio.to_thread(_decode, raw)
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
        raise PrometheusError(f"prometheus_url: {url} could not be asked ({type(exc).__name__}: {exc})") from None
    if status != 200 or not isinstance(body, dict) or body.get("status") != "success":
        why = body.get("error") if isinstance(body, dict) else None
        raise PrometheusError(f"prometheus_url: {url} answered {status} to {promql!r}: {why or 'not a query result'}")
    if isinstance(result, ValueError):
        raise PrometheusError(f"prometheus_url: {url} gave a result that is not Prometheus' ({result})")
    return result


async def query_all(url: str, window_s: float, now: float, timeout_s: float = 10.0) -> dict[str, list[Series]]:
    """Every query of :func:`queries` at ``now``; PrometheusError when any fails, WindowTooLarge (before
    any raw sample is asked for) when the range queries would return more than MAX_SAMPLES samples."""
    asked = queries(window_s)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:
        counts = await asyncio.gather(*(_query(http, url, promql, now) for promql in sample_counts(window_s)))
        samples = int(sum(s.samples[-1][1] for got in counts for s in got if s.samples))
        if samples > MAX_SAMPLES:
            raise WindowTooLarge(window_s, samples, max(1.0, math.floor(window_s * MAX_SAMPLES / samples)))
        got = await asyncio.gather(*(_query(http, url, promql, now - back) for promql, back in asked.values()))
    return dict(zip(asked, got, strict=True))
