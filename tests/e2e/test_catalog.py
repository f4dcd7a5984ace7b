"""The API catalog end to end: a real control plane imports a service's API from a real HTTP app
that serves a springdoc-like ``/v3/api-docs`` and is registered as the service's instance; a changed
document uploaded as YAML becomes version 2, and the diff names what changed; the versions survive
a restart of the control plane; a RateLimitPolicy that names one catalog operation reaches a real
Envoy 1.40 sidecar in front of the app and limits that operation (its method and path template)
only, while the service's other operations pass untouched. Two control planes on one etcd share
the catalog: what one records the other serves, and uploads to both at once get distinct numbers.
A RoutingPolicy route on one operation sends that operation (its method and path template, any
query) to its subset through a real caller's sidecar, and follows the operation to a new path when a
new version moves it."""

from __future__ import annotations

import contextlib
import copy
import http.client
import http.server
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.etcd_cluster import etcd_cluster
from tests.support import control_plane, envoy, free_port, sidecar_bootstrap, tmpdir, wait_until

CATALOG = "/v1/catalog/default/orders"


def springdoc(version: str = "v1") -> dict[str, Any]:
    """What springdoc-openapi serves for a small Spring orders controller."""
    return {
        "openapi": "3.0.1",
        "info": {"title": "OpenAPI definition", "version": version},
        "servers": [{"url": "http://127.0.0.1:8080", "description": "Generated server url"}],
        "paths": {
            "/orders/{id}": {
                "get": {"tags": ["order-controller"], "operationId": "getOrder",
                        "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer", "format": "int64"}}],
                        "responses": {"200": {"description": "OK", "content": {"*/*": {"schema": {"$ref": "#/components/schemas/Order"}}}}}},
            },
            "/orders": {
                "get": {"tags": ["order-controller"], "operationId": "listOrders", "responses": {"200": {"description": "OK"}}},
                "post": {"tags": ["order-controller"], "operationId": "createOrder",
                         "requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Order"}}}, "required": True},
                         "responses": {"200": {"description": "OK"}}},
            },
        },
        "components": {"schemas": {"Order": {"type": "object", "properties": {"id": {"type": "integer", "format": "int64"}}}}},
    }


class _App(http.server.BaseHTTPRequestHandler):
    """The orders app: its API document and its operations, each answering 200 with what it served."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def _answer(self) -> None:
        srv: Any = self.server
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if self.path == "/v3/api-docs":
            with srv.lock:
                srv.doc_fetches += 1
                body = json.dumps(srv.doc).encode()
        else:
            with srv.lock:
                key = f"{self.command} {self.path}"
                srv.hits[key] = srv.hits.get(key, 0) + 1
            body = json.dumps({"served": f"{self.command} {self.path}", "server": srv.name}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def orders_app(name: str = "orders") -> Iterator[Any]:
    srv: Any = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _App)
    srv.daemon_threads = True
    srv.lock, srv.doc, srv.doc_fetches, srv.hits, srv.name = threading.Lock(), springdoc(), 0, {}, name
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        srv.port = srv.server_address[1]
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def call(cp: Any, method: str, path: str, body: Any = None, want: int | tuple[int, ...] = (200, 201)) -> Any:
    status, data = cp.call(method, path, body)
    wanted = (want,) if isinstance(want, int) else want
    assert status in wanted, f"expected {method} {path} to answer {wanted}, got {status}: {data}"
    return data


def request(port: int, method: str, path: str, conn: http.client.HTTPConnection | None = None) -> int:
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        body = b'{"id": 7}' if method == "POST" else None
        c.request(method, path, body=body, headers={"Host": "orders", **({"Content-Type": "application/json"} if body else {})})
        r = c.getresponse()
        r.read()
        return r.status
    finally:
        if conn is None:
            c.close()


def limit_text(proxy: Any) -> str:
    for c in proxy.config_dump("ecds_filters").get("configs", []):
        f = c.get("ecds_filter", {})
        if f.get("name") == "meshpilot.governance.inbound":
            return str(f.get("typed_config", {}).get("config", {}).get("configuration", {}).get("value", ""))
    return ""


def test_import_upload_diff_restart_and_a_limit_on_one_operation_in_a_real_sidecar() -> None:
    workdir: Path = tmpdir("meshpilot-catalog-")
    with orders_app() as app, control_plane(workdir) as cp:
        call(cp, "POST", "/v1/services", {"name": "orders", "ports": [{"name": "http", "port": 80}]})
        call(cp, "POST", "/v1/services/default/orders/instances", {"id": "orders-app", "address": "127.0.0.1", "ports": {"http": app.port}})

        # import from the registered instance's springdoc endpoint
        imported = call(cp, "POST", CATALOG + "/import", {"instance": "orders-app"}, want=201)
        assert imported["version"]["number"] == 1 and app.doc_fetches == 1, f"expected version 1 fetched once from the app, got {imported}, {app.doc_fetches} fetches"
        assert imported["version"]["source"]["url"] == f"http://127.0.0.1:{app.port}/v3/api-docs", f"expected the instance's own address, got {imported['version']['source']}"
        again = call(cp, "POST", CATALOG + "/import", {}, want=200)
        assert again["created"] is False and again["version"]["number"] == 1, f"expected an unchanged document to keep version 1, got {again}"
        status, refused = cp.call("POST", CATALOG + "/import", {"url": "http://127.0.0.1:1/"})
        assert status == 400 and refused["fields"][0]["field"] == "url", f"expected an arbitrary URL refused, got {status}: {refused}"

        # a changed document, uploaded as YAML, is version 2; the diff names what changed
        changed = copy.deepcopy(springdoc("v2"))
        changed["paths"]["/orders/{id}"]["get"]["summary"] = "Find an order by id"
        changed["paths"]["/orders/{id}"]["delete"] = {"tags": ["order-controller"], "operationId": "cancelOrder",
                                                      "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}],
                                                      "responses": {"204": {"description": "No Content"}}}
        del changed["paths"]["/orders"]["post"]
        status, body, _ = _put_yaml(cp, CATALOG, yaml.safe_dump(changed).encode())
        assert status == 201 and body["version"]["number"] == 2, f"expected version 2 from the YAML upload, got {status}: {body}"
        d = call(cp, "GET", CATALOG + "/diff?from=1&to=2")
        assert [o["operation_id"] for o in d["added"]] == ["cancelOrder"], f"expected cancelOrder added, got {d['added']}"
        assert [o["operation_id"] for o in d["removed"]] == ["createOrder"], f"expected createOrder removed, got {d['removed']}"
        assert [(c["operation_id"], sorted(c["changes"])) for c in d["changed"]] == [("getOrder", ["summary"])], f"expected getOrder's summary changed, got {d['changed']}"
        status, bad = cp.call("PUT", CATALOG, {"openapi": "3.0.1", "info": {"title": "t", "version": "1"},
                                               "paths": {"/a": {"get": {"operationId": "x"}}, "/b": {"get": {"operationId": "x"}}}})
        assert status == 400 and bad["fields"][0]["field"] == "paths./b.get.operationId", f"expected duplicate operationIds refused, got {status}: {bad}"

        # the catalog survives a restart of the control plane
        cp.stop()
        cp.start()
        versions = call(cp, "GET", CATALOG + "/versions")
        assert [v["number"] for v in versions] == [1, 2], f"expected versions 1 and 2 after a restart, got {versions}"
        current = call(cp, "GET", CATALOG)
        assert sorted(o["operation_id"] for o in current["operations"]) == ["cancelOrder", "getOrder", "listOrders"], f"got {current}"

        # a limit on one operation, through a real sidecar in front of the app
        status, refused = cp.call("PUT", "/v1/policies/RateLimitPolicy/default/orders-get",
                                  {"service": "orders", "api": {"operation": "createOrder"}, "rate": "1/m", "burst": 2})
        assert status == 400 and refused["fields"][0]["field"] == "api.operation", f"expected an operation no longer in the catalog refused, got {status}: {refused}"
        inbound = free_port()
        boot = sidecar_bootstrap("orders-sc", cp.xds_port, service="orders", inbound_port=inbound, app_port=app.port)
        with envoy(workdir, boot, name="orders-sc") as proxy:
            wait_until(lambda: request(inbound, "GET", "/orders") == 200, 20, what="a first 200 through the sidecar's inbound listener")
            call(cp, "PUT", "/v1/policies/RateLimitPolicy/default/orders-get",
                 {"service": "orders", "api": {"operation": "getOrder"}, "rate": "1/m", "burst": 2}, want=201)
            wait_until(lambda: re.search(r"match\.method = GET\s*\nmatch\.path = /orders/\{id\}", limit_text(proxy)), 10,
                       what="the limit on GET /orders/{id} in the sidecar's filter config")
            conn = http.client.HTTPConnection("127.0.0.1", inbound, timeout=5)
            try:
                got = [request(inbound, "GET", f"/orders/{i}", conn) for i in range(1, 6)]
                others = [request(inbound, m, p, conn) for m, p in [("GET", "/orders"), ("DELETE", "/orders/1"), ("GET", "/orders/1/lines"),
                                                                     ("POST", "/orders/1")] * 5]
            finally:
                conn.close()
            print(f"GET /orders/{{id}} five times: {got}; other operations and paths: {sorted(set(others))}")
            assert got == [200, 200, 429, 429, 429], f"expected the burst of 2 then 429 on GET /orders/{{id}}, got {got}"
            assert set(others) == {200}, f"expected every other operation and path to pass (200), got {others}"
            served = {k: v for k, v in app.hits.items() if k.startswith("GET /orders/") and k.count("/") == 2}
            assert sum(served.values()) == 2, f"expected the app to see only the 2 admitted GET /orders/{{id}}, got {served}"

            # a version that moves the operation (a server path in front) moves the limit with it
            moved = copy.deepcopy(changed)
            moved["servers"] = [{"url": "http://127.0.0.1:8080/api"}]
            status, body, _ = _put_yaml(cp, CATALOG, yaml.safe_dump(moved).encode())
            assert status == 201 and body["version"]["number"] == 3, f"expected version 3, got {status}: {body}"
            wait_until(lambda: "match.path = /api/orders/{id}" in limit_text(proxy), 10, what="the limit to follow getOrder to /api/orders/{id}")
            after = [request(inbound, "GET", "/orders/1"), request(inbound, "GET", "/api/orders/1")]
            assert after == [200, 429], f"expected /orders/1 free and /api/orders/1 limited (the same, spent bucket), got {after}"
    # everything started here is stopped by its context manager, even on failure


def _put_yaml(cp: Any, path: str, data: bytes) -> tuple[int, Any, dict[str, str]]:
    from tests.support import http as http_call

    return http_call("PUT", cp.api + path, data, headers={"Content-Type": "application/yaml"})


def test_two_replicas_on_etcd_share_the_catalog_and_never_reuse_a_number() -> None:
    workdir: Path = tmpdir("meshpilot-catalog-etcd-")
    with etcd_cluster(workdir / "etcd", members=1) as cluster:
        (workdir / "a").mkdir()
        (workdir / "b").mkdir()
        with control_plane(workdir / "a", store=cluster.url) as a, control_plane(workdir / "b", store=cluster.url) as b:
            call(a, "POST", "/v1/services", {"name": "orders", "ports": [{"name": "http", "port": 80}]})
            call(a, "PUT", CATALOG, springdoc(), want=201)
            wait_until(lambda: b.call("GET", CATALOG)[0] == 200, 10, what="replica B to serve A's catalog version")
            seen = call(b, "GET", CATALOG)
            assert seen["number"] == 1 and len(seen["operations"]) == 3, f"expected B to serve version 1 with 3 operations, got {seen}"
            wait_until(lambda: len(call(b, "GET", "/v1/services/default/orders")["apis"]) == 3, 10, what="B's service to carry the apis")

            docs = []
            for i in range(2):
                d = springdoc()
                d["paths"]["/orders"]["get"]["summary"] = f"edit {i}"
                docs.append(d)
            with ThreadPoolExecutor(2) as pool:
                results = list(pool.map(lambda pair: pair[0].call("PUT", CATALOG, pair[1]), [(a, docs[0]), (b, docs[1])]))
            assert [s for s, _ in results] == [201, 201], f"expected both uploads to make a version, got {results}"
            numbers = sorted(body["version"]["number"] for _, body in results)
            assert numbers == [2, 3], f"expected the two uploads to get versions 2 and 3, got {numbers}"
            wait_until(lambda: [v["number"] for v in call(a, "GET", CATALOG + "/versions")] == [1, 2, 3], 10, what="A to list versions 1-3")
            wait_until(lambda: [v["number"] for v in call(b, "GET", CATALOG + "/versions")] == [1, 2, 3], 10, what="B to list versions 1-3")


def served_by(port: int, method: str, path: str) -> str:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request(method, path, body=b"{}" if method == "POST" else None, headers={"Host": "orders"})
        r = c.getresponse()
        data = r.read()
        return str(json.loads(data)["server"]) if r.status == 200 else f"status:{r.status}"
    finally:
        c.close()


def test_a_route_on_one_operation_sends_only_that_operation_to_its_subset() -> None:
    workdir: Path = tmpdir("meshpilot-catalog-routing-")
    with orders_app("v1") as v1, orders_app("v2") as v2, control_plane(workdir) as cp:
        call(cp, "POST", "/v1/services", {"name": "orders", "ports": [{"name": "http", "port": 80}]})
        for app in (v1, v2):
            call(cp, "POST", "/v1/services/default/orders/instances",
                 {"id": f"orders-{app.name}", "address": "127.0.0.1", "ports": {"http": app.port}, "labels": {"version": app.name}})
        call(cp, "PUT", CATALOG, springdoc(), want=201)
        call(cp, "PUT", "/v1/policies/RoutingPolicy/default/orders-split", {
            "service": "orders",
            "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}],
            "routes": [{"match": {"operation": "getOrder"}, "destinations": [{"subset": "v2"}]}, {"destinations": [{"subset": "v1"}]}],
        }, want=201)
        port = free_port()
        with envoy(workdir, sidecar_bootstrap("caller-1", cp.xds_port, outbound_port=port), name="caller-1") as proxy:
            # until the policy's routes are in place the whole service answers (either version): wait for them
            wait_until(lambda: "orders-split.default/route-0" in json.dumps(proxy.config_dump("dynamic_route_configs")), 20,
                       what="the route on getOrder in the caller's sidecar")
            calls = [("GET", "/orders/5"), ("GET", "/orders/6?full=1"), ("GET", "/orders"), ("POST", "/orders/5"), ("GET", "/orders/5/lines"), ("POST", "/orders")]
            want = {"GET /orders/5": "v2", "GET /orders/6?full=1": "v2", "GET /orders": "v1", "POST /orders/5": "v1", "GET /orders/5/lines": "v1", "POST /orders": "v1"}

            def pattern() -> dict[str, str]:
                return {f"{m} {p}": served_by(port, m, p) for m, p in calls}

            wait_until(lambda: pattern() == want, 20, what="getOrder on v2 and the rest on v1 through the caller's sidecar")
            for _ in range(5):
                got = pattern()
                assert got == want, f"expected only getOrder (GET /orders/{{id}}, any query) on v2, every time, got {got}"

            moved = springdoc("v2")
            moved["servers"] = [{"url": "http://127.0.0.1:8080/api"}]
            call(cp, "PUT", CATALOG, moved, want=201)
            wait_until(lambda: served_by(port, "GET", "/api/orders/5") == "v2", 10, what="the route to follow getOrder to /api/orders/{id}")
            assert served_by(port, "GET", "/orders/5") == "v1", "expected the old path to leave the operation's route once the version moved it"
