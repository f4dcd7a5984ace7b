"""The management API rejects bad input with a 4xx naming the field, and stores nothing then."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from aiohttp import web

from meshpilot.api.app import build_api, openapi_document
from meshpilot.api.routes import Route
from meshpilot.controlplane import ControlPlane
from meshpilot.parts import Part
from meshpilot.settings import Settings

WEB = {"name": "web", "ports": [{"name": "http", "port": 80}]}


async def _client(tmp: Path, **settings: object) -> tuple[ControlPlane, TestClient]:
    cp = ControlPlane(Settings(store=f"sqlite:{tmp / 'db.sqlite'}", **settings))
    client = TestClient(TestServer(cp.api_app()))
    await client.start_server()
    return cp, client


def _snapshot(cp: ControlPlane) -> tuple[list[object], list[object]]:
    return [s.model_dump() for s in cp.registry.services()], [i.model_dump() for i in cp.registry.instances()]


BAD_SERVICES = [
    (b"{not json", "(body)"),
    (b'{"name": "web", "ports": [{"name": "http", "port": 80}], "colour": "red"}', "colour"),
    (b'{"name": "Bad_Name!", "ports": [{"name": "http", "port": 80}]}', "name"),
    (b'{"name": "web", "ports": [{"name": "http", "port": 70000}]}', "ports.0.port"),
    (b'{"name": "web", "ports": []}', "ports"),
    (b'{"name": "web", "ports": [{"name": "http", "port": 80, "protocol": "smtp"}]}', "ports.0.protocol"),
    (b'{"name": "web", "ports": [{"name": "http", "port": 80}], "vip": "1.2.3.4"}', "vip"),
    (b'[1, 2]', "(body)"),
]


@pytest.mark.parametrize("body,field", BAD_SERVICES)
async def test_bad_service_is_rejected_and_nothing_stored(tmp_path: Path, body: bytes, field: str) -> None:
    cp, client = await _client(tmp_path)
    try:
        assert (await client.post("/v1/services", json=WEB)).status == 201
        before = _snapshot(cp)
        resp = await client.post("/v1/services", data=body, headers={"Content-Type": "application/json"})
        data = await resp.json()
        assert resp.status == 400, f"expected 400, got {resp.status}: {data}"
        fields = [f["field"] for f in data["fields"]]
        assert field in fields or (field == "(body)" and fields in ([], ["(body)"])), f"expected field {field!r} named, got {data}"
        assert _snapshot(cp) == before
    finally:
        await client.close()
        cp.registry.store.close()


BAD_INSTANCES = [
    ({"id": "i1", "address": "not-an-ip", "ports": {"http": 8080}}, 400, "address"),
    ({"id": "i1", "address": "127.0.0.1", "ports": {"http": 0}}, 400, "ports.http"),
    ({"id": "i1", "address": "127.0.0.1", "ports": {"grpc": 8080}}, 409, "ports.grpc"),
    ({"id": "i1", "address": "127.0.0.1", "ports": {"http": 8080}, "extra": 1}, 400, "extra"),
    ({"id": "", "address": "127.0.0.1", "ports": {"http": 8080}}, 400, "id"),
    ({"id": "dup", "address": "127.0.0.1", "ports": {"http": 8080}}, 409, "id"),
    ({"id": "i1", "address": "127.0.0.1", "ports": {"http": 8080}, "weight": 0}, 400, "weight"),
]


@pytest.mark.parametrize("body,status,field", BAD_INSTANCES)
async def test_bad_instance_is_rejected_and_nothing_stored(tmp_path: Path, body: dict, status: int, field: str) -> None:
    cp, client = await _client(tmp_path)
    try:
        await client.post("/v1/services", json=WEB)
        r = await client.post("/v1/services/default/web/instances", json={"id": "dup", "address": "127.0.0.1", "ports": {"http": 1}})
        assert r.status == 201
        before = _snapshot(cp)
        resp = await client.post("/v1/services/default/web/instances", json=body)
        data = await resp.json()
        assert resp.status == status, f"expected {status}, got {resp.status}: {data}"
        assert field in [f["field"] for f in data["fields"]], f"expected field {field!r} named, got {data}"
        assert _snapshot(cp) == before
    finally:
        await client.close()
        cp.registry.store.close()


async def test_unknown_service_and_instance_are_404(tmp_path: Path) -> None:
    cp, client = await _client(tmp_path)
    try:
        r = await client.post("/v1/services/default/nope/instances", json={"id": "x", "address": "127.0.0.1", "ports": {"http": 1}})
        assert r.status == 404 and (await r.json())["fields"][0]["field"] == "service"
        assert (await client.get("/v1/services/default/nope")).status == 404
        assert (await client.delete("/v1/instances/nope")).status == 404
        assert (await client.put("/v1/instances/nope/health", json={"status": "passing"})).status == 404
        assert cp.registry.services() == []
    finally:
        await client.close()
        cp.registry.store.close()


async def test_token_protects_writes_and_reads(tmp_path: Path) -> None:
    cp, client = await _client(tmp_path, token="s3cret")
    try:
        r = await client.post("/v1/services", json=WEB)
        assert r.status == 401, await r.text()
        r = await client.post("/v1/services", json=WEB, headers={"Authorization": "Bearer wrong"})
        assert r.status == 401
        assert cp.registry.services() == []
        r = await client.post("/v1/services", json=WEB, headers={"Authorization": "Bearer s3cret"})
        assert r.status == 201
        r = await client.get("/v1/services")
        assert r.status == 401 and "web" not in await r.text(), f"a read without a token: expected 401 and no data, got {r.status}"
        assert (await client.get("/v1/services", headers={"Authorization": "Bearer s3cret"})).status == 200
    finally:
        await client.close()
        cp.registry.store.close()


@pytest.mark.parametrize("header", ["bearer s3cret", "BEARER s3cret", "Bearer  s3cret", "bEaReR s3cret"])
async def test_bearer_scheme_is_case_insensitive(tmp_path: Path, header: str) -> None:
    cp, client = await _client(tmp_path, token="s3cret")
    try:
        r = await client.post("/v1/services", json=WEB, headers={"Authorization": header})
        assert r.status == 201, f"Authorization: {header!r}: expected 201 (RFC 7235 schemes are case-insensitive), got {r.status}: {await r.text()}"
        r = await client.put("/v1/services/default/web", json=WEB, headers={"Authorization": header.replace("s3cret", "s3creT")})
        assert r.status == 401, f"a wrong token must stay refused, got {r.status}"
    finally:
        await client.close()
        cp.registry.store.close()


BAD_HEALTH = [
    ({"status": "passing", "output": "x" * 4097}, "output"),
    ({"status": "passing", "check_id": ""}, "check_id"),
    ({"status": "passing", "check_id": "c" * 257}, "check_id"),
]


@pytest.mark.parametrize("body,field", BAD_HEALTH, ids=["long-output", "empty-check-id", "long-check-id"])
async def test_bad_health_report_is_a_400_naming_the_field(tmp_path: Path, body: dict, field: str) -> None:
    cp, client = await _client(tmp_path)
    try:
        await client.post("/v1/services", json=WEB)
        assert (await client.post("/v1/services/default/web/instances", json={"id": "w1", "address": "10.0.0.1", "ports": {"http": 8080}})).status == 201
        before = _snapshot(cp)
        resp = await client.put("/v1/instances/w1/health", json=body)
        text = await resp.text()
        assert resp.status == 400, f"expected 400 naming {field!r}, got {resp.status}: {text[:300]}"
        assert field in [f["field"] for f in (await resp.json())["fields"]], f"expected field {field!r} named, got {text[:300]}"
        assert _snapshot(cp) == before
        ok = await client.put("/v1/instances/w1/health", json={"status": "warning", "check_id": "disk", "output": "x" * 4096})
        assert ok.status == 200, await ok.text()
    finally:
        await client.close()
        cp.registry.store.close()


async def test_more_checks_than_an_instance_holds_is_a_4xx(tmp_path: Path) -> None:
    cp, client = await _client(tmp_path)
    try:
        await client.post("/v1/services", json=WEB)
        await client.post("/v1/services/default/web/instances", json={"id": "w1", "address": "10.0.0.1", "ports": {"http": 8080}})
        for n in range(63):  # the instance holds the "api" check already; 64 in all
            r = await client.put("/v1/instances/w1/health", json={"status": "passing", "check_id": f"c{n}"})
            assert r.status == 200, await r.text()
        r = await client.put("/v1/instances/w1/health", json={"status": "passing", "check_id": "one-too-many"})
        assert r.status == 409 and "checks" in [f["field"] for f in (await r.json())["fields"]], f"expected 409 naming checks, got {r.status}: {await r.text()}"
    finally:
        await client.close()
        cp.registry.store.close()


async def test_lifecycle_health_and_metrics(tmp_path: Path) -> None:
    cp, client = await _client(tmp_path)
    try:
        svc = await (await client.post("/v1/services", json=WEB)).json()
        assert svc["vip"].startswith("240.240.")
        r = await client.post("/v1/services/default/web/instances", json={"id": "w1", "address": "10.0.0.1", "ports": {"http": 8080}, "health": "critical"})
        inst = await r.json()
        assert inst["health"] == "critical" and inst["routable"] is False
        inst = await (await client.put("/v1/instances/w1/health", json={"status": "passing"})).json()
        assert inst["routable"] is True
        inst = await (await client.put("/v1/instances/w1/maintenance", json={"enabled": True})).json()
        assert inst["health"] == "critical" and inst["routable"] is False
        listed = await (await client.get("/v1/services/default/web/instances")).json()
        assert [i["id"] for i in listed] == ["w1"]
        text = await (await client.get("/metrics")).text()
        assert "meshpilot_api_requests_total" in text and "meshpilot_xds_push_seconds" in text
        doc = await (await client.get("/openapi.json")).json()
        assert doc["openapi"].startswith("3.") and "/v1/services/{namespace}/{name}/instances" in doc["paths"]
        assert (await client.delete("/v1/services/default/web")).status == 200
        assert cp.registry.instances() == []
    finally:
        await client.close()
        cp.registry.store.close()


async def test_a_method_not_allowed_names_the_allowed_ones(tmp_path: Path) -> None:
    cp, client = await _client(tmp_path)
    try:
        r = await client.request("TRACE", "/v1/services")
        assert r.status == 405 and set(r.headers.get("Allow", "").split(",")) >= {"GET", "POST"}, \
            f"expected 405 with Allow: GET,POST (RFC 9110), got {r.status} Allow={r.headers.get('Allow')!r}"
    finally:
        await client.close()
        cp.registry.store.close()


def test_openapi_document_names_every_schema() -> None:
    doc = openapi_document()
    for name in ("ServiceIn", "ServiceOut", "InstanceIn", "InstanceOut", "Error"):
        assert name in doc["components"]["schemas"], f"schema {name} missing"


async def _hello(request: web.Request) -> web.Response:
    return web.json_response({"hello": request.match_info["who"]})


async def test_the_api_serves_and_documents_the_routes_it_is_given_and_no_others(tmp_path: Path) -> None:
    """The route table is given to the API: a control plane that includes a part serves its
    routes; another one, in the same process, does not."""
    route = Route("GET", "/v1/hello/{who}", _hello, "Say hello")
    cp = ControlPlane(Settings(store=f"sqlite:{tmp_path / 'a.sqlite'}"))
    cp.include(Part(routes=[route]))
    other = ControlPlane(Settings(store=f"sqlite:{tmp_path / 'b.sqlite'}"))
    with_route, without = TestClient(TestServer(cp.api_app())), TestClient(TestServer(other.api_app()))
    await with_route.start_server()
    await without.start_server()
    try:
        r = await with_route.get("/v1/hello/you")
        assert r.status == 200 and await r.json() == {"hello": "you"}, f"expected the given route served, got {r.status}"
        doc = await (await with_route.get("/openapi.json")).json()
        assert doc["paths"]["/v1/hello/{who}"]["get"]["summary"] == "Say hello", "expected the given route documented"
        r = await without.get("/v1/hello/you")
        assert r.status == 404, f"expected a control plane without the part not to serve its route, got {r.status}"
        doc = await (await without.get("/openapi.json")).json()
        assert "/v1/hello/{who}" not in doc["paths"], "expected another control plane's route not documented"
    finally:
        await with_route.close()
        await without.close()
        cp.registry.store.close()
        other.registry.store.close()


def test_build_api_needs_no_control_plane(tmp_path: Path) -> None:
    cp = ControlPlane(Settings(store="memory:"))
    app = build_api(cp.settings, cp.registry, cp.xds, routes=[Route("GET", "/x/{who}", _hello, "x")])
    got = sorted({r.resource.canonical for r in app.router.routes() if r.resource is not None} & {"/x/{who}", "/v1/services"})
    assert got == ["/v1/services", "/x/{who}"], f"expected its own routes and the given one, got {got}"
