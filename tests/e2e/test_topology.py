"""The mesh seen by a stock Prometheus: the control plane writes a file_sd file naming every sidecar's read-only
stats listener and its own /metrics; Debian's Prometheus, configured with nothing but that file, scrapes them
all; /v1/topology counts the requests of each caller → callee edge from what Prometheus scraped."""

from __future__ import annotations

import contextlib
import http.client as httpclient
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import VENV_BIN, _stop, control_plane, envoy, free_port, http, http_backend, through, wait_until

TOKEN = "topology-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
SENT = {"client": 200, "shop": 120}  # requests each caller's sidecar sends to web
DIRECT = {"127.0.0.2": 60, "127.0.0.1": 25}  # requests apps without a sidecar send straight to web's inbound listener, by source address
DOWN = 10  # requests client sends to a service without an instance
LEGACY = "127.0.0.2"  # where the SDK app "legacy" is registered (through the API, as a Consul client would)


@contextlib.contextmanager
def prometheus(workdir: Path, sd_file: Path | None = None, job: dict[str, Any] | None = None) -> Iterator[str]:
    """Debian's Prometheus scraping only what the file names (or what ``job`` says), every second; its own
    data directory."""
    port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [job or {"job_name": "mesh", "file_sd_configs": [{"files": [str(sd_file)], "refresh_interval": "1s"}]}],
    }))
    log = workdir / "prometheus.log"
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'prometheus-data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=open(log, "ab"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                return http("GET", url + "/-/ready")[0] == 200
            except OSError:
                return False

        wait_until(ready, 30, 0.2, what="prometheus ready")
        yield url
    finally:
        _stop(proc)


def sidecar(node: str, xds_port: int, service: str, *, inbound_port: int = 0, app_port: int = 0, hds: bool = False) -> tuple[dict[str, Any], int, int]:
    """A sidecar bootstrap with the stats listener on; (bootstrap, outbound port, stats port)."""
    from meshpilot.translate.bootstrap import BootstrapOptions, build_bootstrap

    outbound, stats = free_port(), free_port()
    boot = build_bootstrap(BootstrapOptions(
        node_id=node, service=service, control_plane_port=xds_port, admin_port=free_port(), outbound_port=outbound,
        inbound_port=inbound_port, app_port=app_port, hds=hds, stats_port=stats,
    ))
    if hds:
        boot["node"]["metadata"]["HEALTH_CHECK"] = {"kind": "http", "path": "/healthz", "interval_s": 1, "timeout_s": 1,
                                                    "healthy_threshold": 1, "unhealthy_threshold": 2}
    return boot, outbound, stats


def targets_up(prom: str) -> list[dict[str, Any]]:
    status, body, _ = http("GET", prom + "/api/v1/targets?state=active")
    assert status == 200, f"expected Prometheus' targets, got {status}: {body}"
    return list(body["data"]["activeTargets"])


def topology(cp: Any, window: str) -> dict[str, Any]:
    status, body = cp.call("GET", f"/v1/topology?window={window}", headers=AUTH)
    assert status == 200, f"expected the topology, got {status}: {body}"
    return dict(body)


def edge(topo: dict[str, Any], source: str, destination: str) -> dict[str, Any]:
    found = [e for e in topo["edges"] if e["source"] == source and e["destination"] == destination]
    assert found, f"expected an edge {source} -> {destination}, got edges {topo['edges']}"
    return dict(found[0])


@pytest.mark.skipif(not Path(PROMETHEUS).exists(), reason="Debian's prometheus is not installed (run.sh installs it)")
def test_prometheus_scrapes_the_mesh_from_the_generated_targets_and_the_topology_counts_each_edge(workdir: Path) -> None:
    sd_file = workdir / "sd" / "mesh.json"
    with contextlib.ExitStack() as stack:
        prom = stack.enter_context(prometheus(workdir, sd_file))
        settings = workdir / "settings.yaml"
        settings.write_text(json.dumps({"token": TOKEN, "prometheus_sd_file": str(sd_file), "prometheus_url": prom}))
        cp = stack.enter_context(control_plane(workdir, extra=["--config", str(settings)]))
        web = stack.enter_context(http_backend("web-1"))
        for svc in ("web", "legacy", "down"):  # down: no instance, so every call to it is a 503 from the caller's sidecar
            status, body = cp.call("POST", "/v1/services", {"name": svc, "ports": [{"name": "http", "port": 80}]}, headers=AUTH)
            assert status in (200, 201), f"expected {svc} created, got {status}: {body}"
        status, body = cp.call("POST", "/v1/services/default/legacy/instances",
                               {"id": "legacy-1", "address": LEGACY, "ports": {"http": 9}}, headers=AUTH)
        assert status in (200, 201), f"expected the SDK app's instance registered, got {status}: {body}"
        inbound = free_port()
        boots = {
            "web-1": sidecar("web-1", cp.xds_port, "web", inbound_port=inbound, app_port=web.port, hds=True),
            "client-1": sidecar("client-1", cp.xds_port, "client"),
            "shop-1": sidecar("shop-1", cp.xds_port, "shop"),
        }
        for name, (boot, _, _) in boots.items():
            stack.enter_context(envoy(workdir, boot, name=name))
        stats_ports = {name: stats for name, (_, _, stats) in boots.items()}

        # the file names every sidecar's stats listener and the control plane, labelled
        def listed() -> list[dict[str, Any]] | None:
            try:
                groups = json.loads(sd_file.read_text())
            except (OSError, ValueError):
                return None
            return groups if len(groups) == 4 else None

        groups = wait_until(listed, 20, 0.1, what="four targets in the file_sd file")
        by_node = {g["labels"]["node"]: g for g in groups if g["labels"]["kind"] == "sidecar"}
        assert {n: g["targets"] for n, g in by_node.items()} == {n: [f"127.0.0.1:{p}"] for n, p in stats_ports.items()}, \
            f"expected one target per sidecar's stats listener, got {groups}"
        assert by_node["web-1"]["labels"] | {} == {"kind": "sidecar", "node": "web-1", "service": "web", "namespace": "default",
                                                   "instance": f"127.0.0.1:{stats_ports['web-1']}", "__metrics_path__": "/stats/prometheus"}, \
            f"expected web-1's labels, got {by_node['web-1']}"
        cps = [g for g in groups if g["labels"]["kind"] == "controlplane"]
        assert [g["targets"] for g in cps] == [[f"127.0.0.1:{cp.ports['api']}"]] and cps[0]["labels"]["__metrics_path__"] == "/metrics", \
            f"expected the control plane's /metrics as a target, got {cps}"
        # the same document over HTTP (http_sd), for read tokens only
        status, body = cp.call("GET", "/v1/prometheus/targets", headers=AUTH)
        assert (status, body) == (200, groups), f"expected /v1/prometheus/targets to serve the file's targets, got {status}: {body}"
        for path in ("/v1/prometheus/targets", "/v1/topology"):
            status, body = cp.call("GET", path)
            assert status == 401, f"expected 401 for {path} without a token, got {status}: {body}"

        # every target up in Prometheus, which was given nothing but the file
        def all_up() -> list[dict[str, Any]] | None:
            got = targets_up(prom)
            return got if len(got) == 4 and all(t["health"] == "up" for t in got) else None

        up = wait_until(all_up, 30, 0.2, what="every target up in Prometheus")
        assert sorted(t["labels"]["node"] for t in up if t["labels"].get("kind") == "sidecar") == sorted(boots), \
            f"expected Prometheus to scrape every sidecar, got {[(t['scrapeUrl'], t['labels']) for t in up]}"

        # the stats listener is read-only: the admin's other pages and its writes are not reachable through it
        stats_url = f"http://127.0.0.1:{stats_ports['web-1']}"
        for method, path in (("GET", "/config_dump"), ("GET", "/clusters"), ("POST", "/quitquitquit"), ("POST", "/stats/prometheus"),
                             ("POST", "/logging?level=trace"), ("GET", "/stats/prometheus/../config_dump")):
            status, body, _ = http(method, stats_url + path)
            assert status == 404, f"expected 404 for {method} {path} on the stats listener, got {status}: {str(body)[:200]}"
        status, body, _ = http("GET", stats_url + "/stats/prometheus?usedonly")
        assert status == 200 and "envoy_cluster_upstream_rq_total" in str(body), f"expected Envoy's stats, got {status}: {str(body)[:200]}"

        # traffic: two sidecar callers and an app without a sidecar
        wait_until(lambda: cp.call("GET", "/v1/instances/web-1", headers=AUTH)[1].get("health") == "passing", 20,
                   what="web-1 registered and passing over HDS")
        for name in ("client-1", "shop-1"):
            out = boots[name][1]
            wait_until(lambda: through(out, "web")[0] == 200, 20, what=f"the route from {name} to web")
        wait_until(lambda: through(boots["client-1"][1], "down")[0] == 503, 20, what="the route from client-1 to down (no endpoint)")
        # the window starts after a scrape that saw the warm-up requests above, and before the counted ones
        warmed = time.time()
        wait_until(lambda: all(_scrape_time(t) > warmed + 0.05 for t in targets_up(prom)), 30, 0.2,
                   what="a scrape of every target after the warm-up requests")
        start = time.time()
        time.sleep(0.5)  # the control plane's "now" is a little later than the test's: keep the window's start clear of traffic
        for svc, n in SENT.items():
            out = boots[f"{svc}-1"][1]
            for i in range(n):
                status, body = through(out, "web", f"/topology/{i}")
                assert status == 200, f"expected 200 from web through {svc}'s sidecar, got {status}: {body}"
        for i in range(DOWN):
            status, body = through(boots["client-1"][1], "down", f"/down/{i}")
            assert status == 503, f"expected 503 from down (no endpoint) through client's sidecar, got {status}: {body}"
        for source, n in DIRECT.items():
            for i in range(n):
                status = direct(inbound, source, f"/direct/{i}")
                assert status == 200, f"expected 200 from web's inbound listener for a caller at {source}, got {status}"
        done = time.time()

        # wait for a scrape of every sidecar after the last request and after Envoy's next flush of its
        # histograms (every 5 s; the counters are current at once): not for the counts themselves
        wait_until(lambda: all(_scrape_time(t) > done + 5.5 for t in targets_up(prom)), 30, 0.2,
                   what="a scrape of every target after the last request and the next histogram flush")
        topo = topology(cp, f"{int((time.time() - start) * 1000)}ms")
        for svc, n in SENT.items():
            e = edge(topo, f"{svc}.default", "web.default")
            assert abs(e["requests"] - n) <= 0.02 * n, f"expected {svc} -> web to count {n} requests (±2 %), got {e}"
            assert e["errors"] == 0 and e["error_rate"] == 0, f"expected no errors on {svc} -> web, got {e}"
            assert e["p50_ms"] is not None and e["p99_ms"] is not None and e["p50_ms"] <= e["p99_ms"], \
                f"expected latency quantiles on {svc} -> web, got {e}"
        down = edge(topo, "client.default", "down.default")
        assert (down["requests"], down["errors"], down["error_rate"]) == (DOWN, DOWN, 1.0), \
            f"expected {DOWN} requests to down, every one a 5xx, got {down}"
        # callers without a sidecar: named by the SDK registration at their address, else unknown
        for source, caller in ((LEGACY, "legacy.default"), ("127.0.0.1", "unknown")):
            e = edge(topo, caller, "web.default")
            n = DIRECT[source]
            assert abs(e["requests"] - n) <= 0.02 * n and e["reporter"] == "destination", \
                f"expected {n} requests from {caller} (at {source}, no sidecar) reported by web's sidecar, got {e}"
            assert e["p50_ms"] is not None, f"expected latency on {caller} -> web, got {e}"
        nodes = {n["id"]: n for n in topo["nodes"]}
        web_node = nodes.get("web.default", {})
        assert web_node.get("registered") is True and "mesh" in web_node["sources"], f"expected web as a registered node (over HDS), got {topo['nodes']}"
        total = sum(SENT.values()) + sum(DIRECT.values())
        assert abs(web_node["requests_in"] - total) <= 0.02 * total and web_node["errors_in"] == 0, \
            f"expected {total} requests into web from all its callers, got {web_node}"
        assert web_node["p50_ms_in"] is not None and web_node["p50_ms_in"] <= web_node["p99_ms_in"], \
            f"expected web's latency over all its callers, got {web_node}"
        assert {"client.default", "shop.default", "unknown"} <= nodes.keys(), f"expected the callers as nodes, got {topo['nodes']}"
        assert nodes.get("legacy.default", {}).get("sources") == ["api"], f"expected legacy as a node registered through the API, got {topo['nodes']}"


def test_the_sidecar_agent_serves_its_stats_port_and_the_control_plane_lists_it(workdir: Path) -> None:
    """``meshpilot sidecar`` with ``mesh.sidecar.statsPort``: the port reaches Envoy and, through the node
    metadata, the control plane's targets."""
    import yaml

    with contextlib.ExitStack() as stack:
        settings = workdir / "settings.yaml"
        settings.write_text(json.dumps({"prometheus_sd_file": str(workdir / "targets.json")}))
        cp = stack.enter_context(control_plane(workdir, extra=["--config", str(settings)]))
        app = stack.enter_context(http_backend("reviews-app"))
        admin, stats = free_port(), free_port()
        spec = workdir / "spec.yaml"
        spec.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "reviews"},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": app.port}]},
            "mesh": {"healthCheck": {"http": {"path": "/healthz"}, "interval": "1s"}, "dns": {"enabled": False},
                     "sidecar": {"adminPort": admin, "statsPort": stats, "inboundPort": free_port(), "outboundPort": free_port()}},
        }))
        log = workdir / "agent.log"
        agent = subprocess.Popen(
            [str(VENV_BIN / "meshpilot"), "sidecar", "--spec", str(spec), "--control-plane", f"127.0.0.1:{cp.xds_port}",
             "--api", cp.api, "--node-id", "reviews-1", "--workdir", str(workdir / "agent")],
            stdout=open(log, "ab"), stderr=subprocess.STDOUT,
        )
        stack.callback(_stop, agent, 20.0)

        def listed() -> list[dict[str, Any]] | None:
            if agent.poll() is not None:
                raise AssertionError(f"the sidecar agent exited with {agent.returncode}:\n{log.read_text()[-3000:]}")
            groups = cp.call("GET", "/v1/prometheus/targets")[1]
            found = [g for g in groups if g["labels"].get("node") == "reviews-1"]
            return found or None

        [group] = wait_until(listed, 30, 0.2, what="the agent's sidecar among the targets")
        assert group["targets"] == [f"127.0.0.1:{stats}"] and group["labels"]["service"] == "reviews", \
            f"expected the spec's statsPort as the target, got {group}"


        def scraped() -> tuple[int, Any] | None:
            try:
                return http("GET", f"http://127.0.0.1:{stats}/stats/prometheus")[:2]
            except OSError:
                return None  # Envoy opens its listeners once its first configuration is in

        status, body = wait_until(scraped, 20, 0.2, what="the agent's stats listener answering")
        assert status == 200 and 'source_service="reviews.default"' in str(body), f"expected the sidecar's stats, got {status}: {str(body)[:200]}"


@pytest.mark.skipif(not Path(PROMETHEUS).exists(), reason="Debian's prometheus is not installed (run.sh installs it)")
def test_a_prometheus_elsewhere_finds_the_targets_over_http_sd_with_a_read_token(workdir: Path) -> None:
    with contextlib.ExitStack() as stack:
        settings = workdir / "settings.yaml"
        settings.write_text(json.dumps({"token": TOKEN}))
        cp = stack.enter_context(control_plane(workdir, extra=["--config", str(settings)]))
        status, made = cp.call("POST", "/v1/access/tokens", {"scope": "read", "description": "prometheus"}, headers=AUTH)
        assert status == 201, f"expected a read token, got {status}: {made}"
        secret = workdir / "read-token"
        secret.write_text(made["secret"])
        boot, _, stats = sidecar("api-1", cp.xds_port, "api")
        stack.enter_context(envoy(workdir, boot, name="api-1"))
        prom = stack.enter_context(prometheus(workdir, job={
            "job_name": "mesh",
            "http_sd_configs": [{"url": cp.api + "/v1/prometheus/targets", "refresh_interval": "1s",
                                 # Prometheus' http_sd does not default the type to Bearer (prometheus/prometheus#12762)
                                 "authorization": {"type": "Bearer", "credentials_file": str(secret)}}],
        }))

        def all_up() -> list[dict[str, Any]] | None:
            got = targets_up(prom)
            return got if len(got) == 2 and all(t["health"] == "up" for t in got) else None

        up = wait_until(all_up, 30, 0.2, what="the sidecar and the control plane up in Prometheus, found over http_sd")
        assert sorted(t["scrapeUrl"] for t in up) == sorted([f"http://127.0.0.1:{stats}/stats/prometheus", f"{cp.api}/metrics"]), \
            f"expected the sidecar's stats listener and the control plane's /metrics, got {[t['scrapeUrl'] for t in up]}"


def direct(port: int, source: str, path: str) -> int:
    """A request from an app without a sidecar, sent from the given local address."""
    conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(source, 0))
    try:
        conn.request("GET", path, headers={"Host": "web"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def _scrape_time(target: dict[str, Any]) -> float:
    from datetime import datetime

    raw = str(target.get("lastScrape", ""))
    if not raw or raw.startswith("0001-"):
        return 0.0
    head, _, frac = raw.rstrip("Z").partition(".")
    zone = ""
    if "+" in frac or "-" in frac:
        cut = max(frac.find("+"), frac.find("-"))
        frac, zone = frac[:cut], frac[cut:]
    stamp = datetime.fromisoformat(f"{head}.{(frac or '0')[:6]:0<6}{zone or '+00:00'}")
    return stamp.timestamp()
