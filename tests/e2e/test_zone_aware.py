"""Zone-aware routing: a sidecar prefers instances in its own zone when its service is spread like
the upstream one, and spills over to other zones when its zone has no instance left."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.support import control_plane, envoy, free_port, http_backend, sidecar_bootstrap, through, wait_until


WEB = "outbound|80||web.default.svc.mesh"


@pytest.mark.parametrize("variant", ["sotw", "delta"])
def test_traffic_stays_in_the_callers_zone(workdir: Path, variant: str) -> None:
    with control_plane(workdir) as cp, http_backend("near") as near, http_backend("far") as far:
        for name in ("web", "client"):
            assert cp.call("POST", "/v1/services", {"name": name, "ports": [{"name": "http", "port": 80}]})[0] == 201
        # the caller's own service has one member per zone, like the upstream
        for i, zone in (("client-1", "z1"), ("client-2", "z2")):
            cp.call("POST", "/v1/services/default/client/instances", {"id": i, "address": "127.0.0.1", "ports": {"http": free_port()}, "zone": zone})
        for i, zone, srv in (("web-near", "z1", near), ("web-far", "z2", far)):
            status, body = cp.call("POST", "/v1/services/default/web/instances", {"id": i, "address": "127.0.0.1", "ports": {"http": srv.port}, "zone": zone})
            assert status == 201, body
        out = free_port()
        boot = sidecar_bootstrap("client-1", cp.xds_port, service="client", zone="z1", service_port=80, outbound_port=out, sotw=variant == "sotw")
        assert boot["cluster_manager"]["local_cluster_name"] == "meshpilot-local"
        with envoy(workdir, boot) as e:
            wait_until(lambda: len(e.cluster_hosts(WEB)) == 2 and through(out, "web")[0] == 200, 15, what="both web instances in Envoy")
            seen = Counter(through(out, "web")[1]["server"] for _ in range(60))
            assert seen == Counter({"near": 60}), f"expected every request in zone z1, got {dict(seen)}"
            cp.call("DELETE", "/v1/instances/web-near")
            wait_until(lambda: len(e.cluster_hosts(WEB)) == 1, 5, what="web-near to leave EDS")
            seen = Counter(through(out, "web")[1]["server"] for _ in range(20))
            assert seen == Counter({"far": 20}), f"expected spill-over to z2, got {dict(seen)}"
