"""spec.yaml parsing and bootstrap rendering: good specs render a valid Envoy bootstrap, bad ones
are rejected with the offending field named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpilot.sidecar.render import SidecarOptions, default_node_id, render_bootstrap
from meshpilot.sidecar.spec import SpecError, load_spec, parse_duration
from meshpilot.sidecar.supervise import MAX_DELAY_S, next_delay

GOOD = """
apiVersion: v1
kind: Service
metadata:
  name: reviews
  namespace: shop
  labels: {version: v2, team: books}
spec:
  ports:
  - {name: http, port: 80, targetPort: 9080, protocol: TCP}
  - {name: grpc-api, port: 9090}
  - {name: db, port: 5432}
mesh:
  zone: z1
  weight: 20
  healthCheck: {http: {path: /healthz}, interval: 500ms, timeout: 250ms, healthyThreshold: 2, unhealthyThreshold: 3}
  drainTime: 2s
  preStop: {command: [sh, -c, "echo bye"], timeout: 1m}
  app: {command: [python3, -m, http.server, "9080"], env: {A: b}}
  sidecar: {adminPort: 0, inboundPort: 15106, outboundPort: 15101}
  apis: [{method: GET, path: "/reviews/{id}"}]
"""


def test_good_spec() -> None:
    s = load_spec(GOOD)
    svc = s.service()
    got = (svc.key, [(p.name, p.port, p.protocol) for p in svc.ports], s.app_port, s.mesh.healthCheck.interval,
           s.mesh.drainTime, s.mesh.preStop.timeout if s.mesh.preStop else None)
    want = ("reviews.shop", [("http", 80, "http"), ("grpc-api", 9090, "grpc"), ("db", 5432, "tcp")], 9080, 0.5, 2.0, 60.0)
    assert got == want, f"expected {want}, got {got}"
    assert "version" not in svc.labels, "version is an instance label, not a service label"


def test_rendered_bootstrap_carries_what_hds_reads() -> None:
    s = load_spec(GOOD)
    b = render_bootstrap(s, SidecarOptions(control_plane_port=15999, node_id="reviews-1"))
    md = b["node"]["metadata"]
    got = (b["node"]["id"], md["SERVICE"], md["NAMESPACE"], md["INBOUND_PORT"], md["APP_PORT"], md["PORT_NAME"],
           md["HEALTH_CHECK"]["path"], md["LABELS"]["version"], b["node"]["locality"]["zone"], "hds_config" in b)
    want = ("reviews-1", "reviews", "shop", 15106, 9080, "http", "/healthz", "v2", "z1", True)
    assert got == want, f"expected {want}, got {got}"


@pytest.mark.parametrize(
    "patch,field",
    [
        ({"metadata": {"name": "Bad_Name"}}, "metadata.name"),
        ({"metadata": {"name": "ok", "namespace": "-x"}}, "metadata.namespace"),
        ({"spec": {"ports": []}}, "spec.ports"),
        ({"spec": {"ports": [{"name": "http", "port": 0}]}}, "spec.ports.0.port"),
        ({"spec": {"ports": [{"name": "http", "port": 80, "targetPort": "web"}]}}, "spec.ports.0.targetPort"),
        ({"spec": {"ports": [{"name": "http", "port": 80, "protocol": "UDP"}]}}, "spec.ports.0.protocol"),
        ({"spec": {"ports": [{"name": "a", "port": 80}, {"name": "a", "port": 81}]}}, "spec.ports"),
        ({"mesh": {"healthCheck": {"interval": "often"}}}, "mesh.healthCheck.interval"),
        ({"mesh": {"healthCheck": {"http": {"path": "/"}, "tcp": {}}}}, "mesh.healthCheck"),
        ({"mesh": {"healthCheck": {"unhealthyThreshold": 0}}}, "mesh.healthCheck.unhealthyThreshold"),
        ({"mesh": {"app": {"command": []}}}, "mesh.app.command"),
        ({"mesh": {"sidecar": {"port": "nope"}}}, "mesh.sidecar.port"),
        ({"mesh": {"drainTime": -1}}, "mesh.drainTime"),
        ({"mesh": {"colour": "blue"}}, "mesh.colour"),
        ({"kind": "Deployment"}, "kind"),
        ({"mesh": {"dns": {"listen": "localhost:53"}}}, "mesh.dns.listen"),
        ({"mesh": {"dns": {"listen": "127.0.0.1:70000"}}}, "mesh.dns.listen"),
        ({"mesh": {"dns": {"listen": "127.0.0.1:15006"}}}, "mesh.dns.listen"),
        ({"mesh": {"dns": {"upstreams": ["10.0.0.2", "dns.example"]}}}, "mesh.dns.upstreams.1"),
        ({"mesh": {"dns": {"upstreams": ["127.0.0.1:15053"]}}}, "mesh.dns.upstreams.0"),
        ({"mesh": {"dns": {"search": ["ok.example", "bad..name"]}}}, "mesh.dns.search.1"),
        ({"mesh": {"dns": {"domain": "-mesh"}}}, "mesh.dns.domain"),
        ({"mesh": {"dns": {"ttl": -1}}}, "mesh.dns.ttl"),
        ({"mesh": {"dns": {"upstreamTimeout": "forever"}}}, "mesh.dns.upstreamTimeout"),
        ({"mesh": {"dns": {"upstreamMark": "red"}}}, "mesh.dns.upstreamMark"),
        ({"mesh": {"dns": {"upstreamMark": 0}}}, "mesh.dns.upstreamMark"),
        ({"mesh": {"dns": {"enabled": "sometimes"}}}, "mesh.dns.enabled"),
        ({"mesh": {"dns": {"port": 53}}}, "mesh.dns.port"),
        ({"mesh": {"controlPlanes": ["10.0.0.1:15010", "10.0.0.2:port"]}}, "mesh.controlPlanes.1"),
        ({"mesh": {"controlPlanes": ["10.0.0.1:15010", "10.0.0.2:0"]}}, "mesh.controlPlanes.1"),
        ({"mesh": {"controlPlanes": ["cp one:15010"]}}, "mesh.controlPlanes.0"),
        ({"mesh": {"controlPlanes": ["a:15010,b:15010"]}}, "mesh.controlPlanes.0"),
        ({"mesh": {"controlPlanes": ["a:15010", ""]}}, "mesh.controlPlanes.1"),
        ({"mesh": {"controlPlanes": "a:15010,,b:15010"}}, "mesh.controlPlanes.1"),
        ({"mesh": {"controlPlanes": ["a", "a:15010"]}}, "mesh.controlPlanes"),
        ({"mesh": {"controlPlanes": []}}, "mesh.controlPlanes"),
        ({"mesh": {"controlPlanes": 15010}}, "mesh.controlPlanes"),
    ],
)
def test_bad_spec_names_the_field(patch: dict[str, Any], field: str) -> None:
    doc = {"metadata": {"name": "ok"}, "spec": {"ports": [{"name": "http", "port": 80}]}}
    doc.update(patch)
    with pytest.raises(SpecError) as err:
        load_spec(yaml.safe_dump(doc))
    fields = [f["field"] for f in err.value.fields]
    assert field in fields, f"expected an error naming {field}, got {err.value.fields}"


@pytest.mark.parametrize("text", ["", "[1, 2]", "a: [", "just a string", "\x00"])
def test_not_a_mapping(text: str) -> None:
    with pytest.raises(SpecError) as err:
        load_spec(text)
    assert err.value.fields[0]["field"] == "(document)", err.value.fields


@settings(max_examples=300, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(
        ["metadata", "spec", "mesh", "name", "ports", "port", "targetPort", "healthCheck", "interval", "app",
         "command", "sidecar", "labels", "kind", "protocol", "controlPlanes"]), c, max_size=4),
    max_leaves=15))
def test_junk_specs_give_a_spec_or_named_errors(doc: object) -> None:
    try:
        s = load_spec(yaml.safe_dump(doc))
    except SpecError as exc:
        assert exc.fields and all(f["field"] and f["reason"] for f in exc.fields), exc.fields
        return
    render_bootstrap(s, SidecarOptions())


@given(st.floats(0, 86_400, allow_nan=False))
def test_durations(seconds: float) -> None:
    assert parse_duration(seconds) == seconds
    assert abs(parse_duration(f"{seconds * 1000:.3f}ms") - seconds) < 1e-3
    assert parse_duration("2s") == 2.0 and parse_duration("1m") == 60.0


def test_node_id_is_a_valid_instance_id() -> None:
    s = load_spec(GOOD)
    nid = default_node_id(s, 15106, host="my host!.example")
    assert nid == "reviews.shop-my-host-.example-15106", nid


def test_backoff_doubles_then_resets() -> None:
    d = [next_delay(0, 0)]
    for _ in range(10):
        d.append(next_delay(d[-1], 0.1))
    assert d[1] == 2 * d[0] and d[-1] == MAX_DELAY_S, d
    assert next_delay(MAX_DELAY_S, 60) == d[0], "a child that ran long enough restarts at once"


def test_meshdns_settings_from_the_spec() -> None:
    from meshpilot.sidecar.agent import dns_config

    opts = SidecarOptions(control_plane_host="10.1.2.3", control_plane_port=15010)
    d = dns_config(load_spec(GOOD), opts, "reviews-1", Path("/var/lib/sc"))
    got = (d.host, d.port, d.control_plane, d.node_id, d.state_file, d.upstreams, d.search, d.namespace, d.domain,
           d.upstream_mark)
    want = ("127.0.0.1", 15053, "10.1.2.3:15010", "reviews-1~meshdns", "/var/lib/sc/meshdns.json", (),
            ("shop.svc.mesh", "svc.mesh"), "shop", "mesh", 0x539)
    assert got == want, f"expected the defaults {want}, got {got}"

    doc = yaml.safe_load(GOOD)
    doc["mesh"]["dns"] = {"listen": "[::1]:5300", "upstreams": ["10.0.0.2", "[fd00::53]:5353"], "search": [],
                          "domain": "corp.mesh", "ttl": 5, "upstreamTimeout": "800ms", "upstreamMark": "0x10"}
    d = dns_config(load_spec(yaml.safe_dump(doc)), SidecarOptions(control_plane_host="::1"), "n", Path("w"))
    custom = (d.host, d.port, d.control_plane, d.upstreams, d.search, d.domain, d.ttl, d.upstream_timeout,
            d.upstream_mark)
    want_custom = ("::1", 5300, "[::1]:15010", (("10.0.0.2", 53), ("fd00::53", 5353)), ("",), "corp.mesh", 5, 0.8, 0x10)
    assert custom == want_custom, f"expected {want_custom}, got {custom}"
    off = load_spec("metadata: {name: a}\nspec: {ports: [{name: http, port: 80}]}\nmesh: {dns: {enabled: false, "
                    "listen: 127.0.0.1:15006, upstreamMark: null}}\n").mesh.dns
    assert (off.enabled, off.upstreamMark) == (False, None), f"expected DNS off and no mark, got {off}"


def test_control_planes_from_the_spec() -> None:
    doc = yaml.safe_load(GOOD)
    doc["mesh"]["controlPlanes"] = ["10.0.0.1:15010", "cp-b.example:15020", "[fd00::3]:15010", "10.0.0.4"]
    got = load_spec(yaml.safe_dump(doc)).mesh.control_plane_addresses
    want = (("10.0.0.1", 15010), ("cp-b.example", 15020), ("fd00::3", 15010), ("10.0.0.4", 15010))
    assert got == want, f"expected every replica in order {want}, got {got}"

    for single in ("cp.example:15010", ["cp.example:15010"]):
        doc["mesh"]["controlPlanes"] = single
        got = load_spec(yaml.safe_dump(doc)).mesh.control_plane_addresses
        assert got == (("cp.example", 15010),), f"expected the one replica from {single!r}, got {got}"
    doc["mesh"]["controlPlanes"] = "10.0.0.1:15010, 10.0.0.2:15010"  # the --control-plane text works too
    got = load_spec(yaml.safe_dump(doc)).mesh.control_plane_addresses
    assert got == (("10.0.0.1", 15010), ("10.0.0.2", 15010)), f"expected two replicas, got {got}"
    assert load_spec(GOOD).mesh.control_plane_addresses == (), "a spec without controlPlanes names none"


def test_the_flag_overrides_the_spec_and_every_replica_reaches_the_bootstrap() -> None:
    from meshpilot.sidecar.command import _sidecar_control_planes

    doc = yaml.safe_load(GOOD)
    doc["mesh"]["controlPlanes"] = ["10.0.0.1:15010", "10.0.0.2:15010"]
    spec = load_spec(yaml.safe_dump(doc))
    replicas = spec.mesh.control_plane_addresses
    cases = [
        ((None, replicas), replicas),
        (("10.9.9.9:15010", replicas), (("10.9.9.9", 15010),)),
        ((None, ()), (("127.0.0.1", 15010),)),
    ]
    for (flag, from_spec), want in cases:
        got = _sidecar_control_planes(flag, from_spec)
        assert got == want, f"flag {flag!r}, spec {from_spec}: expected {want}, got {got}"

    b = render_bootstrap(spec, SidecarOptions(control_planes=replicas, node_id="reviews-1"))
    xds = next(c for c in b["static_resources"]["clusters"] if c["name"] == "meshpilot-xds")
    got_eps = [e["endpoint"]["address"]["socket_address"] for e in xds["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    endpoints = [(a["address"], a["port_value"]) for a in got_eps]
    assert endpoints == [("10.0.0.1", 15010), ("10.0.0.2", 15010)], \
        f"expected both replicas in meshpilot-xds, got {endpoints}"
