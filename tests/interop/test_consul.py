"""py-consul (a Consul client from PyPI, unchanged) against meshpilot's Consul-compatible API.

It registers, heartbeats, watches with blocking queries, discovers services and uses KV; the
registrations reach Envoy through EDS and leave it when a TTL lapses; a mesh instance that turns
unhealthy leaves ``health/service?passing``; bad registrations get Consul-shaped errors and leave
the registry as it was.
"""

from __future__ import annotations

from http.client import HTTPConnection
import json
import threading
import time
from collections.abc import Iterator


import consul
import pytest

from tests.support import ControlPlaneProc, control_plane, envoy, free_port, http, http_backend, sidecar_bootstrap, through, tmpdir, wait_until

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def cp() -> Iterator[ControlPlaneProc]:
    work = tmpdir("meshpilot-consul-")
    with control_plane(work, extra=["--consul-port", "0", "--eureka-port", "0", "--debounce-ms", "20"]) as proc:
        yield proc


@pytest.fixture()
def c(cp: ControlPlaneProc) -> consul.Consul:
    return consul.Consul(host="127.0.0.1", port=cp.ports["consul"])


def _registry(cp: ControlPlaneProc) -> tuple[object, object]:
    _s, services = cp.call("GET", "/v1/services")
    _i, instances = cp.call("GET", "/v1/instances")
    return services, instances


def test_register_heartbeat_discover_deregister(c: consul.Consul, cp: ControlPlaneProc) -> None:
    assert c.agent.service.register("orders", service_id="orders-1", address="127.0.0.1", port=9001, tags=["v1", "grpc"],
                                    meta={"version": "1.4.2", "zone": "z1"}, check=consul.Check.ttl("10s"))
    _idx, nodes = c.health.service("orders")
    assert len(nodes) == 1, f"expected one orders instance, got {nodes}"
    statuses = {ch["CheckID"]: ch["Status"] for ch in nodes[0]["Checks"]}
    assert statuses.get("service:orders-1") == "critical", f"expected a new check to start critical, got {statuses}"
    assert c.health.service("orders", passing=True)[1] == [], "expected no passing instance before the first heartbeat"
    c.agent.check.ttl_pass("service:orders-1", "all good")
    _idx, nodes = c.health.service("orders", passing=True)
    assert [n["Service"]["ID"] for n in nodes] == ["orders-1"], f"expected orders-1 passing, got {nodes}"
    svc = nodes[0]["Service"]
    assert svc["Meta"] == {"version": "1.4.2", "zone": "z1"}, f"expected Meta exactly as registered, got {svc['Meta']}"
    assert svc["Tags"] == ["v1", "grpc"], f"expected tags back as registered, got {svc['Tags']}"
    # one metadata model: the registry holds it as labels, zone and port protocol
    status, inst = cp.call("GET", "/v1/instances/consul:127.0.0.1:orders-1")
    assert status == 200, inst
    assert inst["labels"] == {"version": "1.4.2"} and inst["zone"] == "z1" and inst["source"] == "consul", inst
    _s, service = cp.call("GET", "/v1/services/default/orders")
    assert service["ports"][0]["protocol"] == "grpc", f"expected the grpc tag to make a grpc port, got {service['ports']}"
    assert c.catalog.services()[1].get("orders") == ["grpc", "v1"]
    assert [s["ServiceID"] for s in c.catalog.service("orders", tag="v1")[1]] == ["orders-1"]
    assert c.catalog.service("orders", tag="v2")[1] == []
    assert c.agent.service.deregister("orders-1")
    assert c.health.service("orders")[1] == [], "expected no orders instance after deregistration"
    status, _ = cp.call("GET", "/v1/services/default/orders")
    assert status == 404, f"expected the service created by the Consul API to go with its last instance, got {status}"


def test_blocking_query_wakes_only_when_the_result_changes(c: consul.Consul) -> None:
    c.agent.service.register("watched", service_id="watched-1", address="127.0.0.1", port=9100, check=consul.Check.ttl("30s"))
    index, _ = c.health.service("watched")
    assert int(index) > 0, f"expected X-Consul-Index > 0, got {index}"
    # an unrelated change must not wake the watcher nor change its index
    c.agent.service.register("other", service_id="other-1", address="127.0.0.1", port=9101)
    t0 = time.monotonic()
    same, _ = c.health.service("watched", index=index, wait="1s")
    waited = time.monotonic() - t0
    assert same == index, f"expected the index to stay {index} while the result is unchanged, got {same}"
    assert waited >= 0.9, f"expected the query to block for ~1s, it returned after {waited:.2f}s"
    got: dict[str, object] = {}

    def watch() -> None:
        t = time.monotonic()
        got["index"], got["nodes"] = c.health.service("watched", index=index, wait="20s")
        got["after"] = time.monotonic() - t

    th = threading.Thread(target=watch)
    th.start()
    time.sleep(0.3)
    c.agent.check.ttl_pass("service:watched-1")
    th.join(20)
    assert got.get("index") not in (None, index), f"expected a new index after the change, got {got}"
    assert float(got["after"]) < 5, f"expected the watcher to wake promptly, took {got['after']}"  # type: ignore[arg-type]
    assert got["nodes"][0]["Checks"][1]["Status"] == "passing", got["nodes"]  # type: ignore[index]
    c.agent.service.deregister("watched-1")
    c.agent.service.deregister("other-1")


def test_kv_get_put_delete_recurse(c: consul.Consul) -> None:
    assert c.kv.put("app/config/a", "1")
    assert c.kv.put("app/config/b", b"two", flags=7)
    assert c.kv.get("app/config/a")[1]["Value"] == b"1"
    entries = c.kv.get("app/", recurse=True)[1]
    assert [(e["Key"], e["Value"], e["Flags"]) for e in entries] == [("app/config/a", b"1", 0), ("app/config/b", b"two", 7)], entries
    assert c.kv.get("app/", keys=True, separator="/")[1] == ["app/config/"]
    modify = entries[0]["ModifyIndex"]
    assert not c.kv.put("app/config/a", "x", cas=modify - 1), "expected a CAS put with a stale index to fail"
    assert c.kv.put("app/config/a", "x", cas=modify), "expected a CAS put with the current index to succeed"
    assert c.kv.delete("app/", recurse=True)
    assert c.kv.get("app/config/a")[1] is None, "expected the key to be gone"


def test_http_check_is_run_by_the_control_plane(c: consul.Consul) -> None:
    with http_backend("checked") as backend:
        url = f"http://127.0.0.1:{backend.port}/health"
        c.agent.service.register("checked", service_id="checked-1", address="127.0.0.1", port=backend.port,
                                 check=consul.Check.http(url, "200ms", timeout="1s"))
        wait_until(lambda: c.health.service("checked", passing=True)[1], 10, what="the HTTP check to pass")
        assert backend.hits >= 1, "expected meshpilot to have called the check URL"
        backend.status = 500
        wait_until(lambda: not c.health.service("checked", passing=True)[1], 10, what="the HTTP check to turn critical on 500")
        c.agent.service.deregister("checked-1")


def test_ttl_lapse_removes_the_instance_from_eds(c: consul.Consul, cp: ControlPlaneProc) -> None:
    work = cp.workdir
    outbound = free_port()
    with http_backend("ttl-app") as backend, envoy(work, sidecar_bootstrap("ttl-caller", cp.xds_port, outbound_port=outbound), name="envoy-ttl") as e:
        c.agent.service.register("ttl-app", service_id="ttl-1", address="127.0.0.1", port=backend.port, check=consul.Check.ttl("1s"))
        c.agent.check.ttl_pass("service:ttl-1")
        ok = wait_until(lambda: through(outbound, "ttl-app", "/x", timeout=2)[0] == 200, 15, what="the Consul instance to serve through Envoy")
        assert ok
        cluster = f"outbound|{backend.port}||ttl-app.default.svc.mesh"
        assert f"127.0.0.1:{backend.port}" in e.cluster_hosts(cluster)
        # no more heartbeats: the TTL lapses, the check turns critical and the endpoint leaves EDS
        wait_until(lambda: not e.cluster_hosts(cluster), 10, what="the lapsed instance to leave Envoy's EDS")
        status = c.health.service("ttl-app")[1][0]["Checks"][1]
        assert status["Status"] == "critical" and "TTL expired" in status["Output"], status
        c.agent.service.deregister("ttl-1")


def test_mesh_instance_going_unhealthy_leaves_passing(c: consul.Consul, cp: ControlPlaneProc) -> None:
    """A sidecar app registered over HDS is visible to Consul clients and follows its health."""
    work = cp.workdir
    with http_backend("mesh-app") as backend:
        status, body = cp.call("POST", "/v1/services", {"name": "mesh-app", "ports": [{"name": "http", "port": 80}]})
        assert status == 201, body
        boot = sidecar_bootstrap("mesh-app-1", cp.xds_port, service="mesh-app", outbound_port=free_port(), inbound_port=free_port(),
                                 app_port=backend.port, hds=True)
        boot["node"]["metadata"]["HEALTH_CHECK"] = {"kind": "tcp", "interval_s": 0.2, "timeout_s": 0.5, "unhealthy_threshold": 1}
        with envoy(work, boot, name="envoy-mesh-app"):
            nodes = wait_until(lambda: c.health.service("mesh-app", passing=True)[1], 20, what="the mesh instance to pass in Consul")
            status, inst = cp.call("GET", "/v1/instances/mesh-app-1")
            assert inst.get("source") == "mesh", f"expected an HDS-registered (mesh) instance, got {inst}"
            # SDK callers reach a mesh app through its sidecar's inbound port, the port it registered
            assert nodes[0]["Service"]["Port"] == inst["ports"]["http"], f"expected port {inst['ports']}, got {nodes[0]['Service']}"
            backend.shutdown()
            backend.server_close()
            wait_until(lambda: not c.health.service("mesh-app", passing=True)[1], 20, what="the unhealthy mesh instance to leave ?passing")
            assert c.health.service("mesh-app")[1], "expected the instance still listed without ?passing"


@pytest.mark.parametrize(
    ("body", "expected_status", "expected_text"),
    [
        ({"Port": 80}, 400, "Missing service name"),
        ({"Name": "bad", "Port": 80, "Address": "not an address!"}, 400, "Invalid service address"),
        ({"Name": "bad", "Port": 80, "Check": {"HTTP": "http://127.0.0.1:1/"}}, 400, "Interval must be > 0"),
        ({"Name": "bad", "Port": 80, "Check": {"TTL": "ten seconds"}}, 400, "invalid duration"),
        ({"Name": "bad", "Port": 80, "Check": {"Args": ["/bin/true"], "Interval": "1s"}}, 400, "not supported"),
        ({"Name": "bad/name", "Port": 80}, 400, "Invalid service name"),
        ({"Name": "bad", "Port": 70000}, 400, "Invalid service port"),
        ("not an object", 400, "Request decode failed"),
    ],
)
def test_bad_registrations_get_consul_errors_and_change_nothing(cp: ControlPlaneProc, body: object, expected_status: int, expected_text: str) -> None:
    before = _registry(cp)
    status, text, hdrs = http("PUT", f"http://127.0.0.1:{cp.ports['consul']}/v1/agent/service/register", body)
    assert status == expected_status, f"expected {expected_status}, got {status}: {text}"
    assert expected_text in str(text), f"expected the error to say {expected_text!r}, got {text!r}"
    assert hdrs.get("Content-Type", "").startswith("text/plain"), f"expected a plain-text error like Consul's, got {hdrs}"
    assert _registry(cp) == before, "expected the registry unchanged by a rejected registration"


def test_unknown_check_id_is_a_consul_404(c: consul.Consul, cp: ControlPlaneProc) -> None:
    before = _registry(cp)
    status, text, _ = http("PUT", f"http://127.0.0.1:{cp.ports['consul']}/v1/agent/check/pass/no-such-check")
    assert status == 404 and 'Unknown check ID "no-such-check"' in text, f"expected Consul's 404, got {status} {text!r}"
    status, text, _ = http("PUT", f"http://127.0.0.1:{cp.ports['consul']}/v1/agent/service/deregister/no-such-service")
    assert status == 404 and 'Unknown service ID "no-such-service"' in text, f"expected Consul's 404, got {status} {text!r}"
    assert not c.agent.service.deregister("no-such-service"), "expected py-consul to see the deregistration fail"
    assert _registry(cp) == before


def test_each_calling_address_is_its_own_node(cp: ControlPlaneProc, c: consul.Consul) -> None:
    port = cp.ports["consul"]
    for source in ("127.0.0.1", "127.0.0.2"):
        conn = HTTPConnection("127.0.0.1", port, timeout=5, source_address=(source, 0))
        conn.request("PUT", "/v1/agent/service/register", json.dumps({"Name": "web", "ID": "web", "Port": 8080}))
        resp = conn.getresponse()
        assert resp.status == 200, f"expected registration from {source} to succeed, got {resp.status} {resp.read()!r}"
        conn.close()
    nodes = sorted((n["Node"]["Node"], n["Service"]["ID"], n["Service"]["Address"]) for n in c.health.service("web")[1])
    assert nodes == [("127.0.0.1", "web", "127.0.0.1"), ("127.0.0.2", "web", "127.0.0.2")], (
        f"expected one 'web' per calling address with the caller's address, got {nodes}"
    )
    conn = HTTPConnection("127.0.0.1", port, timeout=5, source_address=("127.0.0.2", 0))
    conn.request("PUT", "/v1/agent/service/deregister/web")
    assert conn.getresponse().status == 200
    conn.close()
    c.agent.service.deregister("web")


def test_token_is_required_when_configured() -> None:
    work = tmpdir("meshpilot-consul-token-")
    with control_plane(work, extra=["--consul-port", "0", "--token", "s3cret"]) as proc:
        port = proc.ports["consul"]
        anonymous = consul.Consul(host="127.0.0.1", port=port)
        with pytest.raises(consul.ACLPermissionDenied):
            anonymous.agent.service.register("tok", port=80)
        wrong = consul.Consul(host="127.0.0.1", port=port, token="nope")
        with pytest.raises(consul.ACLPermissionDenied):
            wrong.catalog.services()
        ok = consul.Consul(host="127.0.0.1", port=port, token="s3cret")
        assert ok.agent.service.register("tok", port=80)
        assert "tok" in ok.catalog.services()[1]
        assert http("GET", f"http://127.0.0.1:{port}/v1/status/leader")[0] == 200, "expected status endpoints open"



def test_check_definitions_survive_a_kill_right_after_the_answer() -> None:
    """A registration is durable when its 200 arrives: a SIGKILL just after it keeps the TTL checks."""
    with control_plane(tmpdir("meshpilot-consul-kill-"), extra=["--consul-port", "0"]) as proc:
        ids: list[str] = []
        for round_ in range(3):
            c = consul.Consul(host="127.0.0.1", port=proc.ports["consul"])
            for n in range(5):
                ids.append(f"killed-{round_}-{n}")
                assert c.agent.service.register("killed", service_id=ids[-1], address="127.0.0.1", port=9200, check=consul.Check.ttl("30s"))
            assert proc.proc is not None
            proc.proc.kill()
            proc.proc.wait()
            proc.start()
            port = proc.ports["consul"]
            checks = consul.Consul(host="127.0.0.1", port=port).agent.checks()
            for sid in ids:
                got = checks.get(f"service:{sid}", {})
                assert got.get("Type") == "ttl" and got.get("Definition", {}).get("TTL") == "30s", (
                    f"expected the TTL check of {sid} to survive the kill in round {round_}, got {got or 'nothing'}"
                )
                status, text, _ = http("PUT", f"http://127.0.0.1:{port}/v1/agent/check/pass/service:{sid}")
                assert status == 200, f"expected a heartbeat for {sid} to be accepted after the restart, got {status} {text!r}"
