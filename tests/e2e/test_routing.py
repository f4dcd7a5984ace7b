"""An Envoy sidecar follows RoutingPolicy objects: weighted subsets, a change of weights within
1 s on a keep-alive connection, matched routes with fault injection, and no proxyless ApiListener
ever in its wildcard LDS."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2

from tests.support import control_plane, envoy, free_port, sidecar_bootstrap, through, tmpdir, wait_until


CALLS = 2000
TOLERANCE = 5.0
FOLLOW_S = 1.0
SPLIT = "/v1/policies/RoutingPolicy/default/web-split"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out at once, no delayed-ACK stall per request

    def do_GET(self) -> None:  # noqa: N802
        body = json.dumps({"server": self.server.name, "path": self.path}).encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def backend(name: str) -> Iterator[Any]:
    """An HTTP server on 127.0.0.1 answering JSON {server, path}."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.name = name  # type: ignore[attr-defined]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        srv.port = srv.server_address[1]  # type: ignore[attr-defined]
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


def _policy(v1: int, v2: int, routes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "service": "web",
        "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}],
        "routes": [*(routes or []), {"destinations": [{"subset": "v1", "weight": v1}, {"subset": "v2", "weight": v2}]}],
    }


class Sidecar:
    def __init__(self, cp: Any, proxy: Any, port: int) -> None:
        self.cp, self.proxy, self.port = cp, proxy, port

    def api(self, method: str, path: str, body: Any = None) -> Any:
        status, data = self.cp.call(method, path, body)
        assert status < 300, f"expected {method} {path} to succeed, got {status}: {data}"
        return data


@pytest.fixture
def sidecar() -> Iterator[Sidecar]:
    workdir = tmpdir("meshpilot-routing-")
    with control_plane(workdir) as cp, backend("v1") as b1, backend("v2") as b2:
        def api(method: str, path: str, body: Any = None) -> None:
            status, data = cp.call(method, path, body)
            assert status < 300, f"expected {method} {path} to succeed, got {status}: {data}"

        api("POST", "/v1/services", {"name": "web", "ports": [{"name": "http", "port": 80}]})
        api("POST", "/v1/services", {"name": "rpc", "ports": [{"name": "grpc", "port": 9000, "protocol": "grpc"}]})
        for name, b in (("v1", b1), ("v2", b2)):
            api("POST", "/v1/services/default/web/instances", {"id": f"web-{name}", "address": "127.0.0.1", "ports": {"http": b.port}, "labels": {"version": name}})
        port = free_port()
        with envoy(workdir, sidecar_bootstrap("caller-1", cp.xds_port, outbound_port=port)) as proxy:
            wait_until(lambda: through(port, "web")[0] == 200, 20, what="a first 200 through the sidecar")
            yield Sidecar(cp, proxy, port)


@contextlib.contextmanager
def traffic(port: int, host: str) -> Iterator[list[tuple[float, str]]]:
    """Requests in a loop on one keep-alive connection; yields the growing (time, server) list."""
    calls: list[tuple[float, str]] = []
    stop = threading.Event()

    def run() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        while not stop.is_set():
            try:
                conn.request("GET", "/", headers={"Host": host})
                resp = conn.getresponse()
                body = resp.read()
                outcome = json.loads(body)["server"] if resp.status == 200 else f"status:{resp.status}"
            except (OSError, http.client.HTTPException, ValueError) as exc:
                outcome = f"error:{type(exc).__name__}"
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            calls.append((time.time(), outcome))
        conn.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield calls
    finally:
        stop.set()
        t.join(10)


def _share(outcomes: list[str]) -> dict[str, float]:
    c = Counter(outcomes)
    return {k: round(100.0 * v / len(outcomes), 1) for k, v in sorted(c.items())}


def _window(calls: list[tuple[float, str]], start: float, n: int) -> list[str]:
    wait_until(lambda: sum(1 for ts, _ in list(calls) if ts >= start) >= n, 60, what=f"{n} requests")
    return [o for ts, o in list(calls) if ts >= start][:n]


def _weights(sidecar: Sidecar) -> dict[str, int]:
    """The subset weights of Envoy's route to web, as it has them now."""
    dump = json.loads(sidecar.proxy.admin("/config_dump?resource=dynamic_route_configs"))
    found: dict[str, int] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for c in node.get("weighted_clusters", {}).get("clusters", []):
                name = c.get("name", "")
                if name.endswith("|web.default.svc.mesh") and name.split("|")[2]:
                    found[name.split("|")[2]] = int(c.get("weight", 0))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(dump)
    return found


def test_sidecar_follows_weight_split_and_change(sidecar: Sidecar) -> None:
    sidecar.api("PUT", SPLIT, _policy(90, 10))
    # new subsets warm up before the routes that use them: wait for the routes that weigh them
    wait_until(lambda: _weights(sidecar) == {"v1": 90, "v2": 10}, 10, what="the 90/10 split in Envoy's routes")
    with traffic(sidecar.port, "web") as calls:
        start = time.time()
        before = _window(calls, start, CALLS)
        share = _share(before)
        assert abs(share.get("v1", 0) - 90) <= TOLERANCE and abs(share.get("v2", 0) - 10) <= TOLERANCE, (
            f"expected v1 90% / v2 10% (±{TOLERANCE}) over {CALLS} requests, got {share}"
        )
        changed_at = time.time()
        sidecar.api("PUT", SPLIT, _policy(10, 90))
        after = _window(calls, changed_at + FOLLOW_S, CALLS)
        share = _share(after)
        assert abs(share.get("v1", 0) - 10) <= TOLERANCE and abs(share.get("v2", 0) - 90) <= TOLERANCE, (
            f"expected v1 10% / v2 90% (±{TOLERANCE}) over {CALLS} requests from {FOLLOW_S}s after the change, got {share}"
        )


def test_matched_route_with_fault_and_policy_delete(sidecar: Sidecar) -> None:
    routes = [
        {"name": "beta", "match": {"headers": [{"name": "x-user", "exact": "beta"}]}, "destinations": [{"subset": "v2"}]},
        {"name": "broken", "match": {"path_prefix": "/broken"}, "destinations": [{"subset": "v1"}], "fault": {"abort": {"percent": 100, "http_status": 418}}},
    ]
    sidecar.api("PUT", SPLIT, _policy(100, 0, routes))
    wait_until(lambda: through(sidecar.port, "web", "/broken")[0] == 418, 5, what="the fault route to answer 418")
    got = [through(sidecar.port, "web", headers={"x-user": "beta"})[1]["server"] for _ in range(20)]
    assert set(got) == {"v2"}, f"expected every x-user: beta request on v2, got {Counter(got)}"
    got = [through(sidecar.port, "web")[1]["server"] for _ in range(20)]
    assert set(got) == {"v1"}, f"expected every other request on v1 (weight 100/0), got {Counter(got)}"

    status, body = sidecar.cp.call("DELETE", SPLIT)
    assert status == 200, f"expected the delete to answer 200, got {status}: {body}"
    wait_until(lambda: through(sidecar.port, "web", "/broken")[0] == 200, 5, what="/broken to answer 200 once the policy is gone")
    wait_until(lambda: "outbound|80|v2|web.default.svc.mesh" not in sidecar.proxy.admin("/clusters"), 5, what="the subset clusters to leave Envoy")


def _ask_lds(xds_port: int, name: str) -> list[str]:
    """Names in the first LDS response to a proxyless-style subscription for ``name``."""
    with grpc.insecure_channel(f"127.0.0.1:{xds_port}") as ch:
        call = ch.stream_stream(
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )
        md = struct_pb2.Struct()
        md.update({"PROXYLESS": True})
        req = discovery_pb2.DiscoveryRequest(type_url="type.googleapis.com/envoy.config.listener.v3.Listener", resource_names=[name])
        req.node.id = "probe"
        req.node.metadata.CopyFrom(md)
        responses = call(iter([req]), timeout=5)
        first = next(responses)
        responses.cancel()
    from envoy.config.listener.v3 import listener_pb2

    out = []
    for any_msg in first.resources:
        listener = listener_pb2.Listener()
        any_msg.Unpack(listener)
        out.append(listener.name)
    return out


def test_sidecar_never_gets_proxyless_listeners(sidecar: Sidecar) -> None:
    assert _ask_lds(sidecar.cp.xds_port, "rpc:9000") == ["rpc:9000"], "expected the control plane to serve the rpc:9000 ApiListener to a client that names it"
    dump = sidecar.proxy.config_dump("dynamic_listeners")
    names = sorted(c.get("name", "") for c in dump.get("configs", []))
    assert names == ["outbound"], f"expected only the sidecar's own listener in its LDS, got {names}"


def test_policy_cli_apply_list_get_delete() -> None:
    import subprocess

    from tests.support import VENV_BIN

    workdir = tmpdir("meshpilot-policy-cli-")
    spec = workdir / "policies.yaml"
    spec.write_text(
        "kind: RoutingPolicy\nname: a\nservice: web\nsubsets: [{name: v1, labels: {version: v1}}]\n"
        "routes: [{destinations: [{subset: v1}]}]\n---\n"
        "kind: routing\nname: b\nnamespace: shop\nservice: cart\nroutes: [{destinations: [{}], timeout_ms: 500}]\n"
    )
    with control_plane(workdir) as cp:
        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([str(VENV_BIN / "meshpilot"), "policy", *args, "--api", cp.api], capture_output=True, text=True, timeout=30)

        done = cli("apply", "-f", str(spec))
        assert done.returncode == 0, f"expected apply to succeed, got {done.returncode}: {done.stderr}"
        listed = json.loads(cli("list", "RoutingPolicy").stdout)
        assert sorted((p["namespace"], p["name"]) for p in listed) == [("default", "a"), ("shop", "b")], f"expected both policies listed, got {listed}"
        got = json.loads(cli("get", "RoutingPolicy", "b", "-n", "shop").stdout)
        assert got["routes"][0]["timeout_ms"] == 500, f"expected policy b with its timeout, got {got}"
        bad = workdir / "bad.yaml"
        bad.write_text("kind: RoutingPolicy\nname: c\nservice: web\nroutes: [{destinations: [{subset: v9}]}]\n")
        done = cli("apply", "-f", str(bad))
        assert done.returncode != 0 and "routes.0.destinations.0.subset" in done.stderr, f"expected a field error for the bad subset, got {done.returncode}: {done.stderr}"
        assert cli("delete", "RoutingPolicy", "a").returncode == 0, "expected delete to succeed"
        left = json.loads(cli("list").stdout)
        assert [p["name"] for p in left] == ["b"], f"expected only b left, got {left}"


@pytest.mark.parametrize("variant", ["sotw", "delta"])
def test_policy_create_update_delete_under_load_fails_no_request(variant: str) -> None:
    """Make before break for Envoy: a new subset cluster is active before a route sends traffic to
    it, and a deleted one leaves only after the routes that named it."""
    workdir = tmpdir("meshpilot-routing-mbb-")
    with control_plane(workdir) as cp, backend("v1") as b1, backend("v2") as b2:
        assert cp.call("POST", "/v1/services", {"name": "web", "ports": [{"name": "http", "port": 80}]})[0] == 201
        for name, b in (("v1", b1), ("v2", b2)):
            body = {"id": f"web-{name}", "address": "127.0.0.1", "ports": {"http": b.port}, "labels": {"version": name}}
            assert cp.call("POST", "/v1/services/default/web/instances", body)[0] == 201
        port = free_port()
        with envoy(workdir, sidecar_bootstrap("caller-1", cp.xds_port, sotw=variant == "sotw", outbound_port=port)):
            wait_until(lambda: through(port, "web")[0] == 200, 20, what="a first 200 through the sidecar")
            phases: list[tuple[float, str]] = []
            with traffic(port, "web") as calls:
                for _ in range(5):
                    for phase, method, body in (("create", "PUT", _policy(100, 0)), ("update", "PUT", _policy(0, 100)), ("delete", "DELETE", None)):
                        phases.append((time.time(), phase))
                        status, data = cp.call(method, SPLIT, body)
                        assert status < 300, f"{phase}: expected success, got {status} {data}"
                        start = time.time()
                        wait_until(lambda: sum(1 for ts, _ in list(calls) if ts >= start + 1.0) > 0, 10, what=f"requests 1 s after {phase}")
                        if phase == "update":
                            tail = [o for ts, o in list(calls) if start < ts < start + 1.0][-20:]
                            assert tail and set(tail) == {"v2"}, f"expected requests 1 s after the 0/100 update to reach v2 only, got {Counter(tail)}"
            bad = Counter(
                f"{max(p for p in phases if p[0] <= ts)[1]}: {o}" for ts, o in calls if o not in ("v1", "v2") and ts >= phases[0][0]
            )
            assert not bad, f"expected no failed request across 5 policy create/update/delete cycles ({len(calls)} requests), got {dict(bad)}"
