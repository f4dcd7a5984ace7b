"""RateLimitPolicy through real Envoy 1.40 sidecars and the control plane: a policy added or
removed through the API reaches a keep-alive connection within 1 s (the node's routes switch the filter
on and off again, and the connection survives); under wrk load through a
2-worker sidecar for 10 s the accepted requests are rate × 10 + burst within ±5 %; a cluster-wide
``total_rate`` is divided between two sidecars of one service (and re-divided as they come and go)
and holds the total within ±5 % under even load; the sidecars' own HTTP health checks of their app,
which pass through the same inbound listener, are never limited, so a service loaded far beyond its
limit keeps its instances passing (and its full share of the rate)."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshpilot.wasm import testbed
from meshpilot.translate.listeners import HEALTH_HEADER
from tests.support import control_plane, envoy, free_port, sidecar_bootstrap, through, tmpdir, wait_until

pytestmark = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (Debian package wrk)")

POLICY = "/v1/policies/RateLimitPolicy/default/"
SECONDS = 10


def get(port: int, conn: http.client.HTTPConnection | None = None) -> tuple[int, dict[str, str]]:
    own = conn is None
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", "/items", headers={"Host": "api"})
        r = c.getresponse()
        r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}
    finally:
        if own:
            c.close()


def parse_wrk(out: str) -> tuple[int, float, int]:
    """(requests, seconds, non-2xx/3xx responses) from wrk's summary."""
    m = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    assert m, f"expected wrk's summary line, got:\n{out}"
    secs = float(m.group(2)) / (1000 if m.group(3) == "ms" else 1)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+)", out)
    assert not errors or errors.group(1) == "0", f"expected no connect errors, got:\n{out}"
    return int(m.group(1)), secs, int(bad.group(1)) if bad else 0


def wrk(port: int, threads: int, connections: int) -> subprocess.Popen[str]:
    return subprocess.Popen(["wrk", f"-t{threads}", f"-c{connections}", f"-d{SECONDS}s", "-H", "Host: api", f"http://127.0.0.1:{port}/items"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str]) -> tuple[int, float, int]:
    try:
        out, err = proc.communicate(timeout=SECONDS + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    assert proc.returncode == 0, f"wrk failed ({proc.returncode}): {err}"
    return parse_wrk(out)


@dataclass
class Cluster:
    cp: Any
    workdir: Path
    app_port: int

    def api(self, method: str, path: str, body: Any = None) -> Any:
        status, data = self.cp.call(method, path, body)
        assert status < 300, f"expected {method} {path} to succeed, got {status}: {data}"
        return data

    @contextlib.contextmanager
    def sidecar(self, node: str) -> Iterator[tuple[Any, int]]:
        """A sidecar of service ``api`` (2 workers) in front of the shared backend; (proxy, inbound port)."""
        port = free_port()
        boot = sidecar_bootstrap(node, self.cp.xds_port, service="api", inbound_port=port, app_port=self.app_port)
        with envoy(self.workdir, boot, name=node, concurrency=2) as proxy:
            wait_until(lambda: get(port)[0] == 200, 20, what=f"a first 200 through {node}'s inbound listener")
            yield proxy, port

    @contextlib.contextmanager
    def checked_sidecar(self, node: str) -> Iterator[tuple[Any, int]]:
        """A sidecar that registers over HDS and health-checks the app over HTTP through its own
        inbound listener every 0.1 s (as ``meshpilot sidecar`` does with ``healthCheck.http``)."""
        port = free_port()
        boot = sidecar_bootstrap(node, self.cp.xds_port, service="api", inbound_port=port, app_port=self.app_port, hds=True)
        boot["node"]["metadata"]["HEALTH_CHECK"] = {"kind": "http", "path": "/healthz", "interval_s": 0.1, "timeout_s": 0.5,
                                                    "healthy_threshold": 1, "unhealthy_threshold": 2}
        try:
            with envoy(self.workdir, boot, name=node, concurrency=2) as proxy:
                wait_until(lambda: health(self.cp, node) == "passing", 20, what=f"{node} passing its health checks")
                yield proxy, port
        finally:
            self.cp.call("DELETE", f"/v1/instances/{node}")


def health(cp: Any, iid: str) -> str:
    status, body = cp.call("GET", f"/v1/instances/{iid}")
    return str(body["health"]) if status == 200 else "missing"


def limit_text(proxy: Any) -> str:
    """The inbound filter's configuration text as Envoy holds it."""
    for c in proxy.config_dump("ecds_filters").get("configs", []):
        f = c.get("ecds_filter", {})
        if f.get("name") == "meshpilot.governance.inbound":
            return str(f.get("typed_config", {}).get("config", {}).get("configuration", {}).get("value", ""))
    return ""


def inbound_filter_off(proxy: Any) -> bool | None:
    """Whether the node's inbound routes, as Envoy holds them, switch the governance filter off."""
    return proxy.filter_switched_off("inbound", "inbound", "meshpilot.governance.inbound")


def rate_of(proxy: Any, rule: str) -> str | None:
    m = re.search(rf"\[ratelimit {re.escape(rule)}\][^\[]*?\nrate = (\S+)", limit_text(proxy))
    return m.group(1) if m else None


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    workdir = tmpdir("meshpilot-governance-rl-")
    app_port = testbed.free_port()
    with control_plane(workdir) as cp, testbed.Envoy(testbed.direct_response_bootstrap(app_port), app_port):
        status, data = cp.call("POST", "/v1/services", {"name": "api", "ports": [{"name": "http", "port": 80}]})
        assert status == 201, f"expected the service to be created, got {status}: {data}"
        yield Cluster(cp, workdir, app_port)


def test_policy_added_and_removed_reaches_a_keepalive_connection_within_a_second(cluster: Cluster) -> None:
    with cluster.sidecar("api-live") as (proxy, port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            assert get(port, conn)[0] == 200, "expected 200 before any policy"
            assert inbound_filter_off(proxy) is True, "expected the inbound routes to skip the filter while no limit applies"
            sock = conn.sock
            added = time.monotonic()
            cluster.api("PUT", POLICY + "live", {"service": "api", "rate": "1/m", "burst": 1})
            while True:
                status, headers = get(port, conn)
                elapsed = time.monotonic() - added
                if status == 429 or elapsed > 1.0:
                    break
            assert status == 429, f"expected 429 on the keep-alive connection within 1 s of the policy, got {status} after {elapsed:.2f}s"
            assert int(headers.get("retry-after", "0")) >= 1, f"expected a retry-after header on the 429, got {headers}"
            assert inbound_filter_off(proxy) is False, "expected the inbound routes to run the filter while the limit applies"
            removed = time.monotonic()
            cluster.api("DELETE", POLICY + "live")
            while True:
                status, _ = get(port, conn)
                elapsed = time.monotonic() - removed
                if status == 200 or elapsed > 1.0:
                    break
            assert status == 200, f"expected 200 again within 1 s of deleting the policy, got {status} after {elapsed:.2f}s"
            assert conn.sock is sock, "expected one keep-alive connection throughout (no listener drain)"
            wait_until(lambda: inbound_filter_off(proxy) is True, 5, what="the inbound routes to skip the filter again")
        finally:
            conn.close()
            cluster.cp.call("DELETE", POLICY + "live")


def test_accepted_is_rate_times_ten_seconds_plus_burst_under_wrk(cluster: Cluster) -> None:
    rate, burst = 500, 100
    with cluster.sidecar("api-load") as (proxy, port):
        try:
            cluster.api("PUT", POLICY + "accuracy", {"service": "api", "rate": rate, "burst": burst})
            wait_until(lambda: rate_of(proxy, "accuracy.default") == f"{rate}/s", 5, what="the limit in the sidecar's filter config")
            total, secs, rejected = finish(wrk(port, 2, 16))
            accepted = total - rejected
            want = rate * secs + burst
            print(f"rate limit accuracy: accepted {accepted} of {total} in {secs:.2f}s, expected {want:.0f} ({(accepted - want) / want:+.2%})")
            assert rejected > 0, f"expected wrk to exceed the limit, got {total} requests and no rejections"
            assert abs(accepted - want) <= 0.05 * want, (
                f"expected {want:.0f} ± 5% accepted ({rate}/s × {secs:.2f}s + {burst}), got {accepted} of {total} ({(accepted - want) / want:+.1%})")
            stats = proxy.admin("/stats?filter=wasmcustom.meshpilot.ratelimit.accuracy")
            assert "accuracy_default" in stats, f"expected the filter's rate-limit stats in Envoy, got {stats!r}"
        finally:
            cluster.cp.call("DELETE", POLICY + "accuracy")


def test_cluster_wide_limit_is_divided_between_two_sidecars_and_holds_the_total(cluster: Cluster) -> None:
    total_rate, burst = 400, 80
    rule = "total.default"
    try:
        cluster.api("PUT", POLICY + "total", {"service": "api", "total_rate": total_rate, "burst": burst})
        with cluster.sidecar("api-1") as (one, port1):
            wait_until(lambda: rate_of(one, rule) == "400/s", 5, what="api-1 alone to hold the whole rate (400/s)")
            with cluster.sidecar("api-2") as (two, port2):
                wait_until(lambda: rate_of(one, rule) == "200/s" and rate_of(two, rule) == "200/s", 2,
                           what="the total re-divided into 200/s per sidecar")
                assert "burst = 40" in limit_text(one), f"expected each sidecar to get half the burst (40), got:\n{limit_text(one)}"
                runs = [wrk(port1, 1, 8), wrk(port2, 1, 8)]
                results = [finish(p) for p in runs]
            accepted = sum(t - r for t, _, r in results)
            secs = max(s for _, s, _ in results)
            want = total_rate * secs + burst
            print(f"cluster-wide accuracy: accepted {accepted} ({[t - r for t, _, r in results]}) in {secs:.2f}s, expected {want:.0f} ({(accepted - want) / want:+.2%})")
            assert all(r > 0 for _, _, r in results), f"expected both sidecars to be over their share, got {results}"
            assert abs(accepted - want) <= 0.05 * want, (
                f"expected {want:.0f} ± 5% accepted over both sidecars ({total_rate}/s × {secs:.2f}s + {burst}), got {accepted} ({(accepted - want) / want:+.1%})")
            wait_until(lambda: rate_of(one, rule) == "400/s", 5, what="api-1 to get the whole rate back once api-2 is gone")
    finally:
        cluster.cp.call("DELETE", POLICY + "total")


def test_proxies_show_the_ecds_subscription_without_nacks(cluster: Cluster) -> None:
    with cluster.sidecar("api-observed"):
        status, proxies = cluster.cp.call("GET", "/v1/proxies")
        mine = [p for p in proxies if p["node_id"] == "api-observed"]
        assert status == 200 and mine, f"expected the sidecar in /v1/proxies, got {status}: {json.dumps(proxies)[:500]}"
        subs = mine[0]["subscribed"].get("type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig")
        assert subs == ["meshpilot.governance.inbound"], f"expected an ECDS subscription to the inbound filter, got {subs}"
        assert mine[0]["last_nack"] is None, f"expected no NACK, got {mine[0]['last_nack']}"


def test_health_checks_are_never_limited_under_three_times_the_rate(cluster: Cluster) -> None:
    total_rate, burst = 400, 80
    rule = "busy.default"
    nodes = ["api-hc-1", "api-hc-2"]
    try:
        cluster.api("PUT", POLICY + "busy", {"service": "api", "per": "service", "total_rate": total_rate, "burst": burst})
        with cluster.checked_sidecar(nodes[0]) as (one, port1), cluster.checked_sidecar(nodes[1]) as (two, port2):
            wait_until(lambda: rate_of(one, rule) == "200/s" and rate_of(two, rule) == "200/s", 5,
                       what="the total divided into 200/s per sidecar")
            seen: dict[str, list[str]] = {n: [] for n in nodes}
            runs = [wrk(port1, 1, 8), wrk(port2, 1, 8)]
            forged: list[int] = []
            while any(p.poll() is None for p in runs):
                for n in nodes:
                    seen[n].append(health(cluster.cp, n))
                if len(forged) < 20:
                    forged.append(through(port1, "api", "/healthz", {HEALTH_HEADER: "0" * 32})[0])
                time.sleep(0.05)
            results = [finish(p) for p in runs]
        accepted = sum(t - r for t, _, r in results)
        secs = max(s for _, s, _ in results)
        want = total_rate * secs + burst
        flips = {n: sum(1 for a, b in zip(h, h[1:]) if a != b) for n, h in seen.items()}
        print(f"under load: health flips {flips}; accepted {accepted} ({[t - r for t, _, r in results]}) in {secs:.2f}s,"
              f" expected {want:.0f} ({(accepted - want) / want:+.2%})")
        assert all(r > 0 for _, _, r in results), f"expected wrk to exceed each sidecar's share, got {results}"
        assert 429 in forged, f"expected a request with a made-up health token to be limited like any other, got {forged}"
        for n, h in seen.items():
            assert len(h) > 20 and set(h) == {"passing"}, (
                f"expected {n} to stay passing while its service is over its limit, got {sorted(set(h))} ({flips[n]} flips in {len(h)} samples)")
        assert abs(accepted - want) <= 0.05 * want, (
            f"expected {want:.0f} ± 5% accepted over both sidecars ({total_rate}/s × {secs:.2f}s + {burst}), got {accepted} ({(accepted - want) / want:+.1%})")
    finally:
        cluster.cp.call("DELETE", POLICY + "busy")
