"""The control plane end to end: a real Envoy 1.40 sidecar served over ADS (sotw and delta)."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.support import (
    control_plane,
    envoy,
    free_port,
    http_backend,
    sidecar_bootstrap,
    through,
    wait_until,
)


CLUSTER = "outbound|80||web.default.svc.mesh"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
WEB = {"name": "web", "ports": [{"name": "http", "port": 80}]}


def _register(cp, inst_id: str, port: int) -> None:
    status, body = cp.call("POST", "/v1/services/default/web/instances", {"id": inst_id, "address": "127.0.0.1", "ports": {"http": port}})
    assert status == 201, f"registering {inst_id}: expected 201, got {status} {body}"


def _spread(port: int, host: str, n: int = 40) -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(n):
        status, body = through(port, host)
        assert status == 200, f"request via {host}: expected 200, got {status} {body}"
        seen[body["server"]] += 1
    return seen


@pytest.mark.parametrize("variant", ["sotw", "delta"])
def test_routes_follow_the_registry(workdir: Path, variant: str) -> None:
    with control_plane(workdir) as cp, http_backend("a") as a, http_backend("b") as b:
        assert cp.call("POST", "/v1/services", WEB)[0] == 201
        _register(cp, "web-a", a.port)
        _register(cp, "web-b", b.port)
        out = free_port()
        boot = sidecar_bootstrap("client-1", cp.xds_port, service="client", sotw=variant == "sotw", outbound_port=out)
        with envoy(workdir, boot) as e:
            wait_until(lambda: through(out, "web")[0] == 200, 15, what="the web route to work")
            # every name form reaches the service, and both instances get traffic
            for host in ("web", "WEB.default", "web.default.svc.mesh", "web:80", "web.default.svc.mesh:80"):
                seen = _spread(out, host, 20)
                assert set(seen) == {"a", "b"}, f"via {host}: expected both instances, got {dict(seen)}"
            status, body = through(out, "web", headers={"x-mesh-caller": "forged"})
            assert body["headers"].get("x-mesh-caller") == "client", f"caller header: expected 'client', got {body['headers'].get('x-mesh-caller')!r}"
            assert through(out, "nosuch.default")[0] == 404

            # a cluster setting changes: the new cluster must not sit warming
            svc = cp.call("GET", "/v1/services/default/web")[1]
            update = {"ports": svc["ports"], "traffic": {**svc["traffic"], "connect_timeout_ms": 2500}}
            assert cp.call("PUT", "/v1/services/default/web", update)[0] == 200

            def updated_and_warm() -> bool:
                dump = e.config_dump()
                clusters = [c for cfg in dump["configs"] if "dynamic_active_clusters" in cfg for c in cfg["dynamic_active_clusters"]]
                warming = [c for cfg in dump["configs"] for c in cfg.get("dynamic_warming_clusters", [])]
                mine = [c for c in clusters if c["cluster"]["name"] == CLUSTER]
                return not warming and bool(mine) and mine[0]["cluster"]["connect_timeout"] == "2.500s"

            wait_until(updated_and_warm, 5, what="the changed cluster to be active and not warming")
            assert set(_spread(out, "web", 20)) == {"a", "b"}

            # deregister one: within 1 s Envoy's cluster holds only the other
            t0 = time.monotonic()
            assert cp.call("DELETE", "/v1/instances/web-a")[0] == 200
            wait_until(lambda: list(e.cluster_hosts(CLUSTER)) == [f"127.0.0.1:{b.port}"], 5, interval=0.01, what="web-a to leave Envoy's cluster")
            elapsed = time.monotonic() - t0
            assert elapsed < 1.0, f"deregistration took {elapsed:.3f}s to reach Envoy, expected < 1 s"
            assert _spread(out, "web", 20) == Counter({"b": 20})

            # a critical instance leaves EDS too, and returns when it passes again
            _register(cp, "web-a2", a.port)
            wait_until(lambda: len(e.cluster_hosts(CLUSTER)) == 2, 5, what="web-a2 in EDS")
            assert cp.call("PUT", "/v1/instances/web-a2/health", {"status": "critical"})[0] == 200
            wait_until(lambda: list(e.cluster_hosts(CLUSTER)) == [f"127.0.0.1:{b.port}"], 5, what="critical web-a2 out of EDS")

            proxies = cp.call("GET", "/v1/proxies")[1]
            assert len(proxies) == 1 and proxies[0]["node_id"] == "client-1"
            assert proxies[0]["stream_type"] == ("GRPC" if variant == "sotw" else "DELTA_GRPC")
            assert proxies[0]["last_nack"] is None, f"unexpected NACK: {proxies[0]['last_nack']}"
            wanted = {f"type.googleapis.com/envoy.config.{t}" for t in ("cluster.v3.Cluster", "endpoint.v3.ClusterLoadAssignment", "listener.v3.Listener", "route.v3.RouteConfiguration")}
            assert wanted <= set(proxies[0]["acked"]), f"expected ACKs for CDS, EDS, LDS, RDS; got {proxies[0]['acked']}"


BAD_CLUSTER = {
    "name": "broken",
    "type": "STATIC",
    "connect_timeout": "1s",
    "load_assignment": {
        "cluster_name": "broken",
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "not-an-ip", "port_value": 1}}}}]}],
    },
}


@pytest.mark.parametrize("variant", ["sotw", "delta"])
def test_nack_is_recorded_and_last_good_config_kept(workdir: Path, variant: str) -> None:
    with control_plane(workdir, extra=["--debug-api"]) as cp, http_backend("a") as a, http_backend("c") as c:
        cp.call("POST", "/v1/services", WEB)
        _register(cp, "web-a", a.port)
        out = free_port()
        with envoy(workdir, sidecar_bootstrap("client-1", cp.xds_port, service="client", sotw=variant == "sotw", outbound_port=out)) as e:
            wait_until(lambda: through(out, "web")[0] == 200, 15, what="the web route to work")
            status, body = cp.call(
                "POST", "/v1/debug/resources",
                {"type_url": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "broken", "resource": BAD_CLUSTER},
            )
            assert status == 201, body

            def nack():
                p = cp.call("GET", "/v1/proxies")[1]
                return p and p[0]["last_nack"]

            rec = wait_until(nack, 5, what="the NACK to be recorded in /v1/proxies")
            assert rec["type_url"].endswith("Cluster")
            assert "not-an-ip" in rec["error"] or "malformed IP address" in rec["error"], f"expected Envoy's error text, got {rec['error']!r}"
            assert e.stat("cluster_manager.cds.update_rejected") == 1
            # Envoy keeps serving the previous config
            assert through(out, "web")[1]["server"] == "a"
            # the stream goes on: an endpoint change is accepted, and the bad push is not repeated
            cp.call("POST", "/v1/services", {"name": "other", "ports": [{"name": "http", "port": 80}]})
            cp.call("POST", "/v1/services/default/other/instances", {"id": "other-1", "address": "127.0.0.1", "ports": {"http": c.port}})
            wait_until(lambda: through(out, "other")[0] == 200, 5, what="a later change to be applied")
            assert e.stat("cluster_manager.cds.update_rejected") == (1 if variant == "delta" else 2), "unexpected number of rejected CDS updates"
            rejected = e.stat("cluster_manager.cds.update_rejected")
            _register(cp, "web-c", c.port)
            wait_until(lambda: len(e.cluster_hosts(CLUSTER)) == 2, 5, what="EDS change applied")
            assert e.stat("cluster_manager.cds.update_rejected") == rejected, "the rejected CDS push was sent again"
            assert cp.call("GET", "/v1/proxies")[1][0]["nacks"] == rejected


def test_envoy_keeps_routing_through_a_control_plane_restart(workdir: Path) -> None:
    with http_backend("a") as a, http_backend("b") as b:
        with control_plane(workdir) as cp:
            cp.call("POST", "/v1/services", WEB)
            _register(cp, "web-a", a.port)
            xds_port, api_port = cp.ports["xds"], cp.ports["api"]
        # the first control plane is gone before Envoy even starts: Envoy retries, then we start a new one
        out = free_port()
        with envoy(workdir, sidecar_bootstrap("client-1", xds_port, service="client", outbound_port=out)) as e:
            with control_plane(workdir, xds_port=xds_port, api_port=api_port) as cp:
                wait_until(lambda: through(out, "web")[0] == 200, 15, what="routing after the first start")
                before = cp.call("GET", "/v1/services/default/web")[1]
            # control plane down: Envoy keeps routing with what it has
            for _ in range(10):
                assert through(out, "web")[1]["server"] == "a"
            with control_plane(workdir, xds_port=xds_port, api_port=api_port) as cp:
                after = cp.call("GET", "/v1/services/default/web")[1]
                assert after == before, f"registry changed across restart:\nbefore {json.dumps(before)}\nafter {json.dumps(after)}"
                _register(cp, "web-b", b.port)
                wait_until(lambda: len(e.cluster_hosts(CLUSTER)) == 2, 10, what="Envoy to re-sync with the restarted control plane")
                assert set(_spread(out, "web", 20)) == {"a", "b"}


@pytest.mark.parametrize("variant", ["sotw", "delta"])
def test_cluster_change_beside_another_endpoint_change_leaves_nothing_warming(workdir: Path, variant: str) -> None:
    """One debounce window holds a service update (a's cluster changes) and a new instance of b:
    a's new cluster must get its endpoints at once, not after Envoy's 15 s initial fetch timeout."""
    with control_plane(workdir, extra=["--debounce-ms", "300"]) as cp, http_backend("a") as a, http_backend("b1") as b1, http_backend("b2") as b2:
        for name in ("a", "b"):
            assert cp.call("POST", "/v1/services", {"name": name, "ports": [{"name": "http", "port": 80}]})[0] == 201
        for inst, svc, port in (("a-1", "a", a.port), ("b-1", "b", b1.port)):
            status, body = cp.call("POST", f"/v1/services/default/{svc}/instances", {"id": inst, "address": "127.0.0.1", "ports": {"http": port}})
            assert status == 201, f"registering {inst}: expected 201, got {status} {body}"
        out = free_port()
        boot = sidecar_bootstrap("client-1", cp.xds_port, service="client", sotw=variant == "sotw", outbound_port=out)
        with envoy(workdir, boot) as e:
            wait_until(lambda: through(out, "a")[0] == 200 and through(out, "b")[0] == 200, 15, what="routes to a and b")
            svc = cp.call("GET", "/v1/services/default/a")[1]
            # a change of its own first: an idle control plane pushes it at once (the debounce's
            # leading edge), so the two changes below fall into one trailing window and one push
            assert cp.call("POST", "/v1/services", {"name": "z", "ports": [{"name": "http", "port": 80}]})[0] == 201
            assert cp.call("PUT", "/v1/services/default/a", {"ports": svc["ports"], "traffic": {**svc["traffic"], "connect_timeout_ms": 2500}})[0] == 200
            assert cp.call("POST", "/v1/services/default/b/instances", {"id": "b-2", "address": "127.0.0.1", "ports": {"http": b2.port}})[0] == 201
            a_cluster = "outbound|80||a.default.svc.mesh"
            b_cluster = "outbound|80||b.default.svc.mesh"

            def state() -> tuple[list[str], str, int]:
                dump = e.config_dump()
                warming = [c["cluster"]["name"] for cfg in dump["configs"] for c in cfg.get("dynamic_warming_clusters", [])]
                active = [c["cluster"] for cfg in dump["configs"] for c in cfg.get("dynamic_active_clusters", [])]
                timeout = next((c.get("connect_timeout", "") for c in active if c["name"] == a_cluster), "")
                return warming, timeout, len(e.cluster_hosts(b_cluster))

            try:
                wait_until(lambda: state() == ([], "2.500s", 2), 3, what="a's new cluster active (not warming) and b's new instance in Envoy")
            except AssertionError as exc:
                raise AssertionError(f"{exc}; (warming clusters, a's connect timeout, b's hosts) = {state()}") from None
            if variant == "sotw":  # delta versions are per resource; sotw shows the response version

                def cds() -> tuple[str, str]:
                    proxy = cp.call("GET", "/v1/proxies")[1][0]
                    return proxy["sent"].get(CDS, "none"), proxy["acked"].get(CDS, "none")

                wait_until(lambda: len(set(cds())) == 1, 3, what="CDS acked == sent in /v1/proxies")
            assert _spread(out, "a", 5) == Counter({"a": 5})
            assert set(_spread(out, "b", 20)) == {"b1", "b2"}
