"""translate/ output for generated registries is accepted by real Envoy (`envoy --mode validate`)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshpilot.model import Check, Instance, Outlier, Service, ServicePort, Traffic
from meshpilot.translate.bootstrap import BootstrapOptions, build_bootstrap
from meshpilot.translate.clusters import build_clusters, build_inbound_cluster
from meshpilot.translate.endpoints import build_endpoints
from meshpilot.translate.listeners import build_inbound_listener, build_outbound_listener
from meshpilot.translate.routes import build_outbound_routes
from meshpilot.xds.resource import NodeInfo
from tests.support import ENVOY

label = st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True)
traffic = st.builds(
    Traffic,
    timeout_ms=st.integers(0, 60_000),
    connect_timeout_ms=st.integers(1, 10_000),
    retries=st.integers(0, 5),
    retry_on=st.sampled_from(["connect-failure,refused-stream,reset", "5xx", "gateway-error,reset"]),
    per_try_timeout_ms=st.integers(0, 5000),
    lb_policy=st.sampled_from(["round_robin", "least_request", "random"]),
    zone_aware=st.booleans(),
    outlier=st.builds(Outlier, consecutive_5xx=st.integers(1, 50), max_ejection_percent=st.integers(0, 100)),
)


@st.composite
def registries(draw: st.DrawFn) -> tuple[list[Service], list[Instance]]:
    names = draw(st.lists(st.tuples(label, st.sampled_from(["default", "prod", "a-b"])), min_size=1, max_size=5, unique=True))
    services, instances = [], []
    for n, (name, ns) in enumerate(names):
        nports = draw(st.integers(1, 3))
        ports = [
            ServicePort(name=f"p{i}", port=draw(st.sampled_from([80, 8080, 9000, 443])) + i, protocol=draw(st.sampled_from(["http", "http2", "grpc", "tcp"])))
            for i in range(nports)
        ]
        svc = Service(name=name, namespace=ns, ports=ports, traffic=draw(traffic), vip=f"240.240.0.{n + 1}")
        services.append(svc)
        for k in range(draw(st.integers(0, 4))):
            instances.append(
                Instance(
                    id=f"{name}-{ns}-{k}",
                    service=name,
                    namespace=ns,
                    address=draw(st.sampled_from(["127.0.0.1", "10.1.2.3", "::1", "fd00::5"])),
                    ports={p.name: 10000 + k for p in ports},
                    zone=draw(st.sampled_from(["", "z1", "z2"])),
                    weight=draw(st.integers(1, 1000)),
                    checks=[Check(id="c", owner="t", status=draw(st.sampled_from(["passing", "warning", "critical"])))],
                    ever_passed=draw(st.booleans()),
                    labels={"version": draw(st.sampled_from(["v1", "v2"]))},
                )
            )
    return services, instances


def _js(msg: object) -> dict:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)  # type: ignore[arg-type]


def _config(services: list[Service], instances: list[Instance]) -> dict:
    domain = "mesh"
    boot = build_bootstrap(BootstrapOptions(node_id="n1", service=services[0].name, admin_port=0, app_port=9999, zone="z1", local_cluster="x"))
    clusters = [_js(c) for c in build_clusters(services, domain)]
    node = NodeInfo(id="n1", service=services[0].name, outbound_port=15001, inbound_port=15006, app_port=9999)
    clusters.append(_js(build_inbound_cluster(node, "http2")))
    for n, s in enumerate(services):
        for p in s.ports:
            cla = _js(build_endpoints(s, p, [i for i in instances if i.service_key == s.key], domain))
            cla["cluster_name"] = f"eds-{n}-{p.name}"
            clusters.append({"name": f"eds-{n}-{p.name}", "type": "STATIC", "connect_timeout": "1s", "load_assignment": cla})
    outbound = _js(build_outbound_listener(node))
    hcm = outbound["filter_chains"][0]["filters"][0]["typed_config"]
    del hcm["rds"]
    hcm["route_config"] = _js(build_outbound_routes(services, domain))
    listeners = [outbound, _js(build_inbound_listener(node))]
    boot["static_resources"]["clusters"].extend(clusters)
    boot["static_resources"]["listeners"] = listeners
    boot.pop("cluster_manager", None)
    return boot


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(registries())
def test_generated_registries_validate_in_envoy(tmp_path: Path, reg: tuple[list[Service], list[Instance]]) -> None:
    cfg = tmp_path / "envoy.json"
    cfg.write_text(json.dumps(_config(*reg)))
    proc = subprocess.run([ENVOY, "--mode", "validate", "-c", str(cfg), "-l", "error", "--use-dynamic-base-id"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"Envoy rejected the generated config:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
