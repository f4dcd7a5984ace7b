"""Per-sidecar telemetry configured over xDS: a JSON access log line and request metrics per
request, labelled with the source and destination services."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.support import control_plane, envoy, free_port, http_backend, sidecar_bootstrap, through, wait_until


def _access_lines(log: Path) -> list[dict]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("{") and "destination_service" in line:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def test_access_log_and_metrics_name_source_and_destination(workdir: Path) -> None:
    with control_plane(workdir) as cp, http_backend("web-1") as web:
        cp.call("POST", "/v1/services", {"name": "web", "ports": [{"name": "http", "port": 80}]})
        cp.call("POST", "/v1/services/default/web/instances", {"id": "w1", "address": "127.0.0.1", "ports": {"http": web.port}})
        out = free_port()
        with envoy(workdir, sidecar_bootstrap("client-1", cp.xds_port, service="client", outbound_port=out)) as e:
            wait_until(lambda: through(out, "web")[0] == 200, 15, what="the route to web")
            for host in ("web", "web.default.svc.mesh:80", "WEB.default"):
                assert through(out, host, "/telemetry-check")[0] == 200
            lines = wait_until(lambda: [x for x in _access_lines(e.log) if x.get("path") == "/telemetry-check"] if len(
                [x for x in _access_lines(e.log) if x.get("path") == "/telemetry-check"]) >= 3 else None, 10, what="three access log lines")
            for entry in lines:
                assert entry["source_service"] == "client.default", f"source: expected client.default, got {entry}"
                assert entry["destination_service"] == "web.default", f"destination: expected web.default whatever name the caller used, got {entry}"
                assert str(entry["status"]) == "200", entry
            prom = e.admin("/stats/prometheus")
            # the destination is the cluster label: the service's cluster name with dots as underscores
            pattern = re.compile(r'envoy_cluster_upstream_rq_total\{[^}]*envoy_cluster_name="outbound\|80\|\|web_default_svc_mesh"[^}]*\} (\d+)')
            tagged = [ln for ln in prom.splitlines() if ln.startswith("envoy_cluster_upstream_rq_total{") and 'source_service="client.default"' in ln and "web_default_svc_mesh" in ln]
            assert tagged, "expected the upstream request counter for web tagged with source_service=client.default"
            m = pattern.search(tagged[0])
            assert m and int(m.group(1)) >= 4, f"expected at least 4 requests counted, got {tagged[0]}"
            assert any(ln.startswith("envoy_cluster_upstream_rq_time_bucket{") and "web_default_svc_mesh" in ln for ln in prom.splitlines()), "latency histogram missing"
            assert any(ln.startswith("envoy_cluster_upstream_rq_xx{") and "web_default_svc_mesh" in ln and 'envoy_response_code_class="2"' in ln for ln in prom.splitlines()), "status class counter missing"
