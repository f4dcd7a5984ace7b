"""The API catalog on the management API (in process, no process started): upload and versions,
import from a registered instance's springdoc endpoint only, refusals that name the field and store
nothing, the service's apis it sets, durability across a restart and a second replica, and the
policy selectors that name catalog operations (refused when the service has no such operation,
resolved to the operation's method and path template when rendered)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from meshpilot.catalog.openapi import parse
from meshpilot.catalog.plugin import install as install_catalog
from meshpilot.catalog.versions import Catalog
from meshpilot.controlplane import ControlPlane
from meshpilot.policy._filterspec import ApiSelector, resolve_apis
from meshpilot.policy.breaker import BREAKER, CircuitBreakerPolicy, breaker_rules
from meshpilot.policy.plugin import install as install_policy
from meshpilot.policy.ratelimit import LIMIT, RateLimitPolicy, limit_rules
from meshpilot.registry import Registry
from meshpilot.registry.store import SqliteStore
from meshpilot.settings import Settings
from tests.unit.shared_store import SharedStore, hand
from tests.unit.test_catalog import document

BASE = "/v1/catalog/default/orders"


async def _client(settings: Settings) -> tuple[ControlPlane, TestClient]:
    cp = ControlPlane(settings)
    cp.include(install_policy(cp))
    cp.include(install_catalog(cp))
    client = TestClient(TestServer(cp.api_app()))
    await client.start_server()
    return cp, client


@pytest.fixture
async def api() -> AsyncIterator[TestClient]:
    _cp, client = await _client(Settings(store="memory:"))
    r = await client.post("/v1/services", json={"name": "orders", "ports": [{"name": "http", "port": 80}]})
    assert r.status == 201, f"expected the service created, got {r.status}: {await r.text()}"
    try:
        yield client
    finally:
        await client.close()


async def put_doc(api: TestClient, doc: Any, content_type: str = "application/json") -> tuple[int, Any]:
    data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    r = await api.put(BASE, data=data, headers={"Content-Type": content_type})
    return r.status, await r.json()


async def test_upload_makes_a_version_only_when_the_operations_change(api: TestClient) -> None:
    status, body = await put_doc(api, document())
    assert status == 201 and body["created"] and body["version"]["number"] == 1, f"expected version 1 created, got {status}: {body}"
    assert body["version"]["sha256"] == parse(json.dumps(document()).encode()).sha256, f"expected the operations' sha256, got {body}"
    status, body = await put_doc(api, yaml.safe_dump(document()).encode(), "application/yaml")
    assert status == 200 and not body["created"] and body["version"]["number"] == 1, f"expected the same operations to keep version 1, got {status}: {body}"
    changed = document()
    changed["paths"]["/orders/{id}"]["get"]["summary"] = "fetch one order"
    changed["paths"]["/health"] = {"get": {"operationId": "health", "responses": {"200": {"description": "ok"}}}}
    r = await api.put(BASE, data=json.dumps(changed))
    body = await r.json()
    assert r.status == 201 and body["version"]["number"] == 2 and body["version"]["source"]["kind"] == "upload", f"expected version 2, got {r.status}: {body}"
    versions = await (await api.get(BASE + "/versions")).json()
    assert [v["number"] for v in versions] == [1, 2] and all(v["created"].endswith("Z") for v in versions), f"expected versions 1 and 2 with times, got {versions}"
    current = await (await api.get(BASE)).json()
    ids = sorted(o["operation_id"] for o in current["operations"])
    assert current["number"] == 2 and ids == ["createOrder", "deleteOrder", "getOrder", "health", "listOrders"], f"expected version 2's operations, got {current}"
    one = await (await api.get(BASE + "/versions/1")).json()
    assert len(one["operations"]) == 4, f"expected version 1 with its 4 operations, got {one}"
    d = await (await api.get(BASE + "/diff?from=1&to=2")).json()
    assert [a["operation_id"] for a in d["added"]] == ["health"] and d["removed"] == [], f"expected health added, got {d}"
    assert [c["operation_id"] for c in d["changed"]] == ["getOrder"] and "summary" in d["changed"][0]["changes"], f"expected getOrder's summary changed, got {d}"
    default = await (await api.get(BASE + "/diff")).json()
    assert (default["from"], default["to"]) == (1, 2), f"expected the default diff to be previous → current, got {default}"
    listed = await (await api.get("/v1/catalog")).json()
    assert [(s["service"], s["current"]["number"]) for s in listed] == [("orders.default", 2)], f"expected orders at version 2, got {listed}"
    svc = await (await api.get("/v1/services/default/orders")).json()
    apis = {(a["method"], a["path"], a["name"]) for a in svc["apis"]}
    assert ("GET", "/orders/{id}", "getOrder") in apis and len(apis) == 5, f"expected the service's apis set from the catalog, got {svc['apis']}"


async def test_bad_uploads_are_refused_naming_the_field_and_store_nothing(api: TestClient) -> None:
    status, body = await put_doc(api, document())
    assert status == 201
    dup = document()
    dup["paths"]["/orders"]["post"]["operationId"] = "getOrder"
    cases = [
        (b"{oops", "(body)", 400),
        (json.dumps({"swagger": "2.0"}).encode(), "swagger", 400),
        (json.dumps(document(openapi="3.2.0")).encode(), "openapi", 400),
        (json.dumps(dup).encode(), "paths./orders.post.operationId", 400),
        (b"openapi: 3.0.0\ninfo: {title: a, version: b}\npaths:\n  /x: {get: {tags: x}}\n", "paths./x.get.tags", 400),
        (b"{" + b" " * (2 * 1024 * 1024) + b"}", "(body)", 413),
    ]
    for data, field, want in cases:
        status, body = await put_doc(api, data)
        assert status == want and body["fields"][0]["field"] == field, f"expected {want} on {field} for {data[:40]!r}, got {status}: {body}"
    versions = await (await api.get(BASE + "/versions")).json()
    assert [v["number"] for v in versions] == [1], f"expected only version 1 after the refusals, got {versions}"
    r = await api.put("/v1/catalog/default/nosuch", data=json.dumps(document()))
    assert r.status == 404 and (await r.json())["fields"][0]["field"] == "service", f"expected 404 for an unregistered service, got {r.status}"
    for path, field in ((BASE + "/versions/x", "number"), (BASE + "/versions/0", "number"), (BASE + "/versions/9", "number"),
                        (BASE + "/diff?from=1&to=7", "to"), (BASE + "/diff", "from"), (BASE + "/diff?from=x", "from")):
        r = await api.get(path)
        body = await r.json()
        assert r.status in (400, 404) and body["fields"][0]["field"] == field, f"expected {field} named for {path}, got {r.status}: {body}"


async def _springdoc(doc: Any, status: int = 200, size: int = 0) -> TestServer:
    async def handler(request: web.Request) -> web.Response:
        if size:
            return web.Response(body=b"x" * size)
        return web.json_response(doc, status=status)

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("http://169.254.169.254/latest/meta-data")

    app = web.Application()
    app.router.add_get("/v3/api-docs", handler)
    app.router.add_get("/moved", moved)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


async def test_import_fetches_only_from_a_registered_instance(api: TestClient) -> None:
    server = await _springdoc(document())
    try:
        port = server.port
        assert port is not None
        r = await api.post(BASE + "/import", json={})
        assert r.status == 409 and (await r.json())["fields"][0]["field"] == "instance", f"expected 409 without instances, got {r.status}"
        r = await api.post("/v1/services/default/orders/instances", json={"id": "orders-1", "address": "127.0.0.1", "ports": {"http": port}})
        assert r.status == 201, f"expected the instance registered, got {r.status}: {await r.text()}"
        r = await api.post(BASE + "/import", json={"instance": "orders-1"})
        body = await r.json()
        assert r.status == 201 and body["version"]["source"] == {"kind": "import", "instance": "orders-1", "url": f"http://127.0.0.1:{port}/v3/api-docs"}, (
            f"expected version 1 imported from the instance, got {r.status}: {body}")
        for req, field in (({"url": "http://169.254.169.254/"}, "url"), ({"path": "//evil.example/x"}, "path"), ({"path": "http://evil/"}, "path"),
                           ({"instance": "other"}, "instance"), ({"port": "admin"}, "port"), ({"path": "/moved"}, "source"),
                           ({"path": "/nothing"}, "source"), ({"timeout_s": "5"}, "timeout_s")):
            r = await api.post(BASE + "/import", json=req)
            body = await r.json()
            assert r.status >= 400 and body["fields"][0]["field"] == field, f"expected {field} refused for {req}, got {r.status}: {body}"
        versions = await (await api.get(BASE + "/versions")).json()
        assert [v["number"] for v in versions] == [1], f"expected only the one import stored, got {versions}"
    finally:
        await server.close()
    big = await _springdoc(None, size=3 * 1024 * 1024)
    try:
        assert big.port is not None
        await api.post("/v1/services/default/orders/instances", json={"id": "orders-2", "address": "127.0.0.1", "ports": {"http": big.port}})
        r = await api.post(BASE + "/import", json={"instance": "orders-2"})
        body = await r.json()
        assert r.status == 413 and body["fields"][0]["field"] == "source", f"expected 413 for an oversized document, got {r.status}: {body}"
    finally:
        await big.close()


async def test_a_stranger_gets_401_and_a_reader_cannot_upload() -> None:
    cp, client = await _client(Settings(store="memory:", token="admin-secret"))
    try:
        for method, path in (("GET", "/v1/catalog"), ("GET", BASE), ("PUT", BASE), ("POST", BASE + "/import"), ("GET", BASE + "/diff")):
            r = await client.request(method, path, data=b"{}")
            assert r.status == 401, f"expected 401 for {method} {path} without a token, got {r.status}"
        admin = {"Authorization": "Bearer admin-secret"}
        r = await client.post("/v1/access/tokens", json={"scope": "read"}, headers=admin)
        reader = {"Authorization": f"Bearer {(await r.json())['secret']}"}
        r = await client.put(BASE, data=json.dumps(document()), headers=reader)
        assert r.status == 403, f"expected 403 for a read token uploading, got {r.status}"
        r = await client.get("/v1/catalog", headers=reader)
        assert r.status == 200, f"expected a read token to list, got {r.status}"
    finally:
        await client.close()


async def test_versions_survive_a_restart_and_reach_a_second_replica(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    store = SqliteStore(path)
    reg = Registry(store)
    from meshpilot.model import Service, ServicePort

    svc = reg.put_service(Service(name="orders", ports=[ServicePort(name="http", port=80)]))
    rec = await Catalog(reg).record(svc, parse(json.dumps(document()).encode()), {"kind": "upload"})
    assert rec.created, "expected a first version"
    store.close()
    again = Registry(SqliteStore(path))
    try:
        version = Catalog(again).version("orders.default")
        assert version is not None and version["number"] == 1 and len(version["operations"]) == 4, f"expected version 1 after a restart, got {version}"
        assert any(a.name == "getOrder" for a in again.services()[0].apis), "expected the service's apis after a restart"
    finally:
        again.store.close()

    clock = [0]
    sa, sb = SharedStore(clock), SharedStore(clock)
    ra, rb = Registry(sa), Registry(sb)
    svc = ra.put_service(Service(name="orders", ports=[ServicePort(name="http", port=80)]))
    hand(sa, sb, rb)
    await Catalog(ra).record(svc, parse(json.dumps(document()).encode()), {"kind": "upload"})
    hand(sa, sb, rb)
    seen = Catalog(rb).version("orders.default")
    assert seen is not None and seen["number"] == 1, f"expected replica B to read A's version, got {seen}"
    b_svc = rb.service("orders.default")
    assert b_svc is not None and {a.name for a in b_svc.apis} >= {"getOrder", "listOrders"}, f"expected B's service to have the apis, got {b_svc}"
    changed = document()
    changed["paths"]["/orders/{id}"]["get"]["summary"] = "v2"
    b_rec = await Catalog(rb).record(b_svc, parse(json.dumps(changed).encode()), {"kind": "upload"})
    assert b_rec.version["number"] == 2, f"expected B to take the next number after A's, got {b_rec.version}"


# ---- selectors ----------------------------------------------------------------------------------


async def test_policies_naming_operations_are_refused_unless_the_service_has_them(api: TestClient) -> None:
    limit = {"service": "orders", "api": {"operation": "getOrder"}, "rate": 1, "burst": 1}
    r = await api.put("/v1/policies/RateLimitPolicy/default/one", json=limit)
    body = await r.json()
    assert r.status == 400 and body["fields"][0]["field"] == "api.operation" and "no catalogued operations" in body["fields"][0]["reason"], (
        f"expected the operation refused before any catalog, got {r.status}: {body}")
    await put_doc(api, document())
    r = await api.put("/v1/policies/RateLimitPolicy/default/one", json={**limit, "api": {"operation": "getorder"}})
    body = await r.json()
    assert r.status == 400 and "did you mean 'getOrder'" in body["fields"][0]["reason"], f"expected an unknown operation refused with a hint, got {r.status}: {body}"
    r = await api.put("/v1/policies/RateLimitPolicy/default/one", json=limit)
    assert r.status == 201, f"expected a known operation accepted, got {r.status}: {await r.text()}"
    breaker = {"service": "orders", "per": "api", "apis": [{"operation": "getOrder"}, {"operation": "nope"}], "sliding_window_size": 10}
    r = await api.put("/v1/policies/CircuitBreakerPolicy/default/b", json=breaker)
    body = await r.json()
    assert r.status == 400 and [f["field"] for f in body["fields"]] == ["apis.1.operation"], f"expected apis.1.operation refused, got {r.status}: {body}"
    r = await api.put("/v1/policies/CircuitBreakerPolicy/default/b", json={**breaker, "apis": [{"operation": "getOrder", "name": "x"}]})
    assert r.status == 400, f"expected operation and name together refused, got {r.status}"
    r = await api.get("/v1/policies/CircuitBreakerPolicy")
    assert await r.json() == [], "expected no breaker stored after the refusals"


def test_operation_selectors_resolve_to_the_operations_method_and_template() -> None:
    from meshpilot.catalog.versions import service_apis
    from meshpilot.model import Service, ServicePort

    svc = Service(name="orders", ports=[ServicePort(name="http", port=80)], apis=service_apis(parse(json.dumps(document()).encode()).operations))
    resolved = resolve_apis([ApiSelector(operation="getOrder"), ApiSelector(operation="gone")], svc)
    assert [m for _, m in resolved] == [{"path": "/orders/{id}", "method": "GET"}], f"expected getOrder as GET /orders/{{id}} and 'gone' dropped, got {resolved}"
    limit = LIMIT.validate({"name": "l", "service": "orders", "api": {"operation": "createOrder"}, "rate": 5, "burst": 1})
    assert isinstance(limit, RateLimitPolicy)
    rules = limit_rules(limit, svc)
    assert [r["match"] for r in rules] == [{"path": "/orders", "method": "POST"}], f"expected the limit on POST /orders only, got {rules}"
    br = BREAKER.validate({"name": "b", "service": "orders", "per": "api", "apis": [{"operation": "getOrder"}, {"operation": "listOrders"}]})
    assert isinstance(br, CircuitBreakerPolicy)
    rules = breaker_rules(br, svc, ["outbound|80||orders.default.svc.mesh"])
    assert [(r["name"], r["match"]) for r in rules] == [
        ("b.default.getOrder", {"cluster": "outbound|80||orders.default.svc.mesh", "path": "/orders/{id}", "method": "GET"}),
        ("b.default.listOrders", {"cluster": "outbound|80||orders.default.svc.mesh", "path": "/orders", "method": "GET"}),
    ], f"expected a breaker per operation, got {rules}"


async def test_a_service_written_without_its_apis_gets_the_catalogs_back() -> None:
    import asyncio

    cp = ControlPlane(Settings(store="memory:"))
    part = install_catalog(cp)
    cp.include(install_policy(cp))
    cp.include(part)
    client = TestClient(TestServer(cp.api_app()))
    await client.start_server()
    task = asyncio.create_task(part.tasks[0].run())
    try:
        svc = {"name": "orders", "ports": [{"name": "http", "port": 80}]}
        assert (await client.post("/v1/services", json=svc)).status == 201
        assert (await client.put(BASE, data=json.dumps(document()))).status == 201
        r = await client.put("/v1/services/default/orders", json={"ports": [{"name": "http", "port": 80}, {"name": "admin", "port": 81}]})
        assert r.status == 200 and (await r.json())["apis"] == [], f"expected the write itself to carry no apis, got {await r.text()}"
        names: set[str | None] = set()
        for _ in range(200):
            await asyncio.sleep(0.01)
            got = cp.registry.service("orders.default")
            names = {a.name for a in got.apis} if got is not None else set()
            if names:
                break
        assert names == {"getOrder", "listOrders", "createOrder", "deleteOrder"}, f"expected the catalog's operations back as apis, got {names}"
        got = cp.registry.service("orders.default")
        assert got is not None and [p.name for p in got.ports] == ["http", "admin"], f"expected the write's other fields kept, got {got}"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()


async def test_openapi_json_documents_the_catalog_routes(api: TestClient) -> None:
    r = await api.get("/openapi.json")
    assert r.status == 200, f"expected /openapi.json to render with the catalog's routes, got {r.status}: {(await r.text())[:300]}"
    paths = (await r.json())["paths"]
    want = {"/v1/catalog", "/v1/catalog/{namespace}/{name}", "/v1/catalog/{namespace}/{name}/import", "/v1/catalog/{namespace}/{name}/diff",
            "/v1/catalog/{namespace}/{name}/versions", "/v1/catalog/{namespace}/{name}/versions/{number}"}
    assert want <= set(paths), f"expected the catalog's paths documented, missing {want - set(paths)}"
    assert {"put", "get"} <= set(paths["/v1/catalog/{namespace}/{name}"]), f"got {paths['/v1/catalog/{namespace}/{name}']}"


def test_a_route_matching_an_operation_becomes_its_method_and_an_anchored_path_regex() -> None:
    import re as _re

    from meshpilot.catalog.versions import service_apis
    from meshpilot.model import Service, ServicePort
    from meshpilot.policy.routing import ROUTING, RoutingPolicy, routing_of

    svc = Service(name="orders", ports=[ServicePort(name="http", port=80)], apis=service_apis(parse(json.dumps(document()).encode()).operations))
    policy = ROUTING.validate({"name": "r", "service": "orders", "subsets": [{"name": "v2", "labels": {"version": "v2"}}],
                               "routes": [{"match": {"operation": "getOrder"}, "destinations": [{"subset": "v2"}]},
                                          {"match": {"operation": "gone"}, "destinations": [{"subset": "v2"}]},
                                          {"destinations": [{}]}]})
    assert isinstance(policy, RoutingPolicy)
    rules = routing_of(policy, svc).rules
    assert [r.name for r in rules] == ["r.default/route-0", "r.default/route-2"], f"expected the unresolvable route left out, got {[r.name for r in rules]}"
    headers = {h.name: h for h in rules[0].headers}
    assert headers[":method"].exact == "GET" and not rules[0].matches_all, f"expected GET matched, got {rules[0]}"
    regex = headers[":path"].regex
    assert regex is not None
    for path, want in (("/orders/12", True), ("/orders/12?full=1", True), ("/orders/12/lines", False), ("/orders", False), ("/orders/", False)):
        assert bool(_re.fullmatch(regex, path)) is want, f"expected {regex!r} {'to' if want else 'not to'} match {path}"
    assert [r.name for r in routing_of(policy, None).rules] == ["r.default/route-2"], "expected no operation route without the service"


async def test_routing_policies_naming_operations_are_checked_and_written_again_with_a_new_version(api: TestClient) -> None:
    from meshpilot.registry import Change

    route = {"service": "orders", "subsets": [{"name": "v2", "labels": {"version": "v2"}}],
             "routes": [{"match": {"operation": "getOrder"}, "destinations": [{"subset": "v2"}]}, {"destinations": [{}]}]}
    r = await api.put("/v1/policies/RoutingPolicy/default/r", json=route)
    body = await r.json()
    assert r.status == 400 and body["fields"][0]["field"] == "routes.0.match.operation", f"expected the operation refused before a catalog, got {r.status}: {body}"
    await put_doc(api, document())
    bad = {**route, "routes": [{"match": {"operation": "getOrder", "path_prefix": "/x"}, "destinations": [{}]}]}
    r = await api.put("/v1/policies/RoutingPolicy/default/r", json=bad)
    assert r.status == 400, f"expected operation with path_prefix refused, got {r.status}"
    r = await api.put("/v1/policies/RoutingPolicy/default/r", json=route)
    assert r.status == 201, f"expected the route on getOrder accepted, got {r.status}: {await r.text()}"
    got = await (await api.get("/v1/policies/RoutingPolicy/default/r")).json()
    assert got["routes"][0]["match"]["operation"] == "getOrder", f"expected the policy stored as written, got {got}"


async def test_a_new_version_writes_the_policies_naming_operations_again() -> None:
    from meshpilot.model import Service, ServicePort
    from meshpilot.registry import Change
    from meshpilot.registry.store import MemoryStore

    reg = Registry(MemoryStore())
    svc = reg.put_service(Service(name="orders", ports=[ServicePort(name="http", port=80)]))
    catalog = Catalog(reg)
    await catalog.record(svc, parse(json.dumps(document()).encode()), {"kind": "upload"})
    naming = {"kind": "RoutingPolicy", "name": "r", "namespace": "default", "service": "orders",
              "routes": [{"match": {"operation": "getOrder"}, "destinations": [{}]}]}
    other = {"kind": "RoutingPolicy", "name": "o", "namespace": "default", "service": "orders", "routes": [{"destinations": [{}]}]}
    reg.put_document("policies", "RoutingPolicy/default/r", naming, service="orders.default")
    reg.put_document("policies", "RoutingPolicy/default/o", other, service="orders.default")
    seen: list[Change] = []
    reg.subscribe(seen.append)
    svc2 = reg.service("orders.default")
    assert svc2 is not None
    await catalog.record(svc2, parse(json.dumps(document(servers=[{"url": "/api"}])).encode()), {"kind": "upload"})
    kinds = [(c.kind, c.key) for c in seen]
    assert kinds == [("service", "orders.default"), ("policy", "RoutingPolicy/default/r")], (
        f"expected the service's apis, then the policy naming an operation, written again (not the other), got {kinds}")


async def test_import_refuses_addresses_no_service_lives_at_and_instances_not_routable(api: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """Link-local (cloud metadata), unspecified and multicast addresses are refused naming instance, as is an
    instance that is not routable (here: in maintenance), before anything is fetched."""
    from meshpilot.catalog import routes

    async def no_fetch(url: object, *args: object) -> bytes:
        raise AssertionError(f"expected nothing fetched, got a fetch of {url}")

    monkeypatch.setattr(routes, "fetch", no_fetch)  # a regression fails here, sending nothing anywhere
    for i, address in enumerate(("169.254.169.254", "0.0.0.0", "224.0.0.1", "::", "fe80::1", "ff02::1", "::ffff:169.254.169.254")):
        r = await api.post("/v1/services/default/orders/instances", json={"id": f"odd-{i}", "address": address, "ports": {"http": 80}})
        assert r.status == 201, f"expected the instance at {address} registered, got {r.status}: {await r.text()}"
        r = await api.post(BASE + "/import", json={"instance": f"odd-{i}", "path": "/latest/meta-data/"})
        body = await r.json()
        assert r.status == 400 and body["fields"][0]["field"] == "instance" and "not fetched from" in body["error"], \
            f"expected the import from {address} refused naming instance, got {r.status}: {body}"
    r = await api.post("/v1/services/default/orders/instances", json={"id": "self-1", "address": "127.0.0.1", "ports": {"http": 15014}})
    r = await api.post(BASE + "/import", json={"instance": "self-1"})
    body = await r.json()
    assert r.status == 400 and "control plane's own" in body["error"], \
        f"expected the management API's own port (api_port 15014) refused naming instance, got {r.status}: {body}"
    await api.delete("/v1/instances/self-1")
    r = await api.post("/v1/services/default/orders/instances", json={"id": "sick-1", "address": "127.0.0.1", "ports": {"http": 80}})
    assert r.status == 201, f"expected the instance registered, got {r.status}: {await r.text()}"
    r = await api.put("/v1/instances/sick-1/maintenance", json={"enabled": True})
    assert r.status == 200, f"expected the instance in maintenance, got {r.status}: {await r.text()}"
    r = await api.post(BASE + "/import", json={"instance": "sick-1"})
    body = await r.json()
    assert r.status == 409 and body["fields"][0]["field"] == "instance" and "not routable" in body["error"], \
        f"expected 409 naming instance for an instance that is not routable, got {r.status}: {body}"
    r = await api.post(BASE + "/import", json={})
    body = await r.json()
    assert r.status == 409 and body["fields"][0]["field"] == "instance", \
        f"expected 409 when no instance is routable (no fallback to the others), got {r.status}: {body}"


def test_the_control_planes_own_listeners_are_refused() -> None:
    from meshpilot.catalog.fetch import FetchError, check_target

    own = {("127.0.0.1", 15014), ("0.0.0.0", 15010)}
    for address, port in (("127.0.0.1", 15014), ("127.0.0.1", 15010), ("10.1.2.3", 15010), ("::ffff:127.0.0.1", 15014)):
        try:
            check_target(address, port, own)
        except FetchError as exc:
            assert exc.field == "instance" and "control plane's own" in exc.reason, f"expected instance named for {address}:{port}, got {exc}"
        else:
            raise AssertionError(f"expected {address}:{port} refused as the control plane's own listener, got it allowed")
    for address, port in (("127.0.0.1", 8080), ("10.1.2.3", 15014)):
        check_target(address, port, own)  # an app beside the control plane, another host's port


async def test_a_failed_fetch_says_only_could_not_connect_and_a_document_is_not_echoed(api: TestClient) -> None:
    import re
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        silent = s.getsockname()[1]
        s.listen(0)  # a port that takes the connection and never answers: the fetch times out
        for iid, port in (("closed-1", None), ("silent-1", silent)):
            if port is None:
                with socket.socket() as c:
                    c.bind(("127.0.0.1", 0))
                    port = c.getsockname()[1]
            await api.post("/v1/services/default/orders/instances", json={"id": iid, "address": "127.0.0.1", "ports": {"http": port}})
        errors = []
        for iid in ("closed-1", "silent-1"):
            r = await api.post(BASE + "/import", json={"instance": iid, "timeout_s": 1})
            body = await r.json()
            errors.append((r.status, re.sub(r":\d+/", ":PORT/", body["error"]), [f["field"] for f in body["fields"]]))
    assert errors[0] == errors[1] and errors[0][0] == 502 and "could not connect" in errors[0][1], \
        f"expected a refused port and a silent one answered alike (502, could not connect), got {errors}"
    server = await _springdoc({"swagger": "SECRET-a1", "openapi": "SECRET-b2"})
    try:
        await api.post("/v1/services/default/orders/instances", json={"id": "leaky-1", "address": "127.0.0.1", "ports": {"http": server.port}})
        r = await api.post(BASE + "/import", json={"instance": "leaky-1"})
        text = await r.text()
        assert r.status == 400 and "SECRET" not in text, f"expected a refusal that does not echo the fetched values, got {r.status}: {text}"
        server2 = await _springdoc({"openapi": "SECRET-c3", "info": {"title": "t", "version": "1"}, "paths": {}})
        try:
            await api.post("/v1/services/default/orders/instances", json={"id": "leaky-2", "address": "127.0.0.1", "ports": {"http": server2.port}})
            r = await api.post(BASE + "/import", json={"instance": "leaky-2"})
            text = await r.text()
            assert r.status == 400 and "SECRET" not in text, f"expected a refusal that does not echo the fetched version, got {r.status}: {text}"
        finally:
            await server2.close()
    finally:
        await server.close()


class _Guarded(SharedStore):
    """A replica's view whose ``commit_if`` checks the guards against every replica's writes, as etcd's
    Txn compares do; a lost race first brings the view up to date (``catch_up``), as the real store does,
    and so does a write (a view's revision never passes another replica's write it has not applied)."""

    def __init__(self, clock: list[int], truth: dict[tuple[str, str], int]) -> None:
        super().__init__(clock)
        self.truth = truth  # (table, key) -> the revision that last wrote it, shared by the replicas
        self.catch_up: Any = lambda: None

    def write(self, puts: Any, deletes: tuple[tuple[str, str], ...] = ()) -> None:
        super().write(puts, deletes)
        for tk in [*puts, *deletes]:
            self.truth[tk] = self.clock[0]
        self.catch_up()

    async def commit_if(self, since: int, guards: Any, puts: Any, deletes: tuple[tuple[str, str], ...] = ()) -> bool:
        for g in guards:
            rev = self.truth.get((g.table, g.key))
            if (rev is not None and rev > since) or (g.exists and rev is None):
                self.catch_up()
                return False
        self.write(puts, deletes)
        return True


async def test_setting_the_apis_does_not_undo_another_replicas_change_to_the_service() -> None:
    """Replica A's own write left the service without its apis (an API PUT that does not carry them), so A
    reconciles; meanwhile replica B relabelled the service, and B's write has not reached A. Setting the
    apis is conditional on the service: A loses the race, takes B's service and sets the apis on it, so
    both B's labels and the apis are kept."""
    from meshpilot.model import Service, ServicePort

    clock: list[int] = [0]
    truth: dict[tuple[str, str], int] = {}
    sa, sb = _Guarded(clock, truth), _Guarded(clock, truth)
    ra, rb = Registry(sa), Registry(sb)
    svc = ra.put_service(Service(name="orders", ports=[ServicePort(name="http", port=80)]))
    await Catalog(ra).record(svc, parse(json.dumps(document()).encode()), {"kind": "upload"})
    a_svc = ra.service("orders.default")
    assert a_svc is not None and a_svc.apis, f"expected A's service to have the apis, got {a_svc}"
    ra.put_service(a_svc.model_copy(update={"apis": [], "ports": [ServicePort(name="http", port=8080)]}))  # A's API PUT
    hand(sa, sb, rb)
    b_svc = rb.service("orders.default")
    assert b_svc is not None and b_svc.ports[0].port == 8080, f"expected B to see A's PUT, got {b_svc}"
    rb.put_service(b_svc.model_copy(update={"labels": {"team": "payments"}}))  # not handed to A yet
    sa.catch_up = lambda: hand(sb, sa, ra)  # from now on A's view follows B's writes when the store says so
    sb.catch_up = lambda: hand(sa, sb, rb)
    wrote = await Catalog(ra).reconcile("orders.default")
    assert wrote, "expected A to set the apis again"
    hand(sa, sb, rb)
    hand(sb, sa, ra)
    for name, reg in (("A", ra), ("B", rb)):
        got = reg.service("orders.default")
        assert got is not None and got.labels == {"team": "payments"} and {a.name for a in got.apis} >= {"getOrder", "listOrders"}, \
            f"expected replica {name} to keep B's labels and have the apis, got labels {got and got.labels}, apis {got and [a.name for a in got.apis]}"
    stored = sa.get("services", "orders.default")
    assert stored is not None and stored.get("labels") == {"team": "payments"} and stored.get("apis"), \
        f"expected the store to hold both B's labels and the apis, got {stored}"
