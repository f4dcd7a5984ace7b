"""The API catalog's try-it without a process: the request it builds (a path parameter never changes
the path's segments, whatever it holds; required parameters named when absent; mesh, trace and
hop-by-hop headers refused; the request body bounded; a fresh sampled traceparent), and the route in
process against an in-process HTTP server standing in for the control plane's sidecar (the answer's
status, headers and body, the body cut at its bound, 404 naming try_it_proxy when it is off, 400
naming the field for an unknown operation, 504 naming timeout_s for an answer that does not come
in time, 502 when nothing listens)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpilot.catalog import tryit
from meshpilot.catalog.openapi import parse
from meshpilot.catalog.plugin import install as install_catalog
from meshpilot.catalog.tryit import TryError, TryIn, expand_path, prepare
from meshpilot.controlplane import ControlPlane
from meshpilot.model import Service
from meshpilot.settings import Settings

DOC = {
    "openapi": "3.0.3", "info": {"title": "orders", "version": "1"},
    "servers": [{"url": "/api"}],
    "paths": {
        "/orders/{id}": {"get": {"operationId": "getOrder", "parameters": [
            {"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}},
            {"name": "verbose", "in": "query", "schema": {"type": "boolean"}},
            {"name": "X-Tenant", "in": "header", "required": True, "schema": {"type": "string"}},
        ], "responses": {"200": {"description": "ok"}}}},
        "/orders/{id}/lines/{line}": {"get": {"operationId": "getLine", "responses": {"200": {"description": "ok"}}}},
        "/orders": {
            "get": {"operationId": "listOrders", "parameters": [{"name": "page", "in": "query", "required": True}],
                    "responses": {"200": {"description": "ok"}}},
            "post": {"operationId": "createOrder", "requestBody": {"required": True, "content": {"application/json": {}}},
                     "responses": {"201": {"description": "made"}}},
        },
        "/session": {"get": {"operationId": "session", "parameters": [{"name": "sid", "in": "cookie", "required": True}],
                             "responses": {"200": {"description": "ok"}}}},
        "/blob": {"get": {"operationId": "blob", "responses": {"200": {"description": "ok"}}}},
        "/slow": {"get": {"operationId": "slow", "responses": {"200": {"description": "ok"}}}},
    },
}
OPS = parse(json.dumps(DOC).encode()).operations
SVC = Service(name="orders", namespace="shop", ports=[{"name": "admin", "port": 9000, "protocol": "tcp"}, {"name": "http", "port": 8080}])


def _try(**kw: Any) -> TryIn:
    return TryIn.model_validate(kw)


def _refused(field: str, **kw: Any) -> TryError:
    with pytest.raises(TryError) as info:
        prepare(SVC, OPS, _try(**kw))
    assert info.value.field == field, f"expected the refusal to name {field}, got {info.value.field}: {info.value.reason}"
    return info.value


def test_a_try_is_the_operation_through_the_service_mesh_name_with_a_sampled_traceparent() -> None:
    p = prepare(SVC, OPS, _try(operation="getOrder", path={"id": 42}, query={"verbose": True}, headers={"X-Tenant": "acme"}))
    assert (p.method, p.target, p.host) == ("GET", "/api/orders/42?verbose=true", "orders.shop:8080"), \
        f"expected GET /api/orders/42?verbose=true to orders.shop:8080, got {p.method} {p.target} to {p.host}"
    headers = dict(p.headers)
    assert headers.get("X-Tenant") == "acme", f"expected the caller's header kept, got {headers}"
    m = re.fullmatch(r"00-([0-9a-f]{32})-([0-9a-f]{16})-01", headers.get("traceparent", ""))
    assert m and m.group(1) == p.trace_id, f"expected a sampled W3C traceparent for trace {p.trace_id}, got {headers}"
    q = prepare(SVC, OPS, _try(operation="getOrder", path={"id": 42}, headers={"X-Tenant": "acme"}))
    assert q.trace_id != p.trace_id, "expected each try to start a trace of its own"


def test_an_operation_is_named_by_its_operation_id_or_method_and_template_and_an_unknown_one_is_refused() -> None:
    p = prepare(SVC, OPS, _try(operation="GET /api/blob"))
    assert p.target == "/api/blob", f"expected the operation found by method and template, got {p.target}"
    err = _refused("operation", operation="getOrders")
    assert "did you mean 'getOrder'" in err.reason and err.status == 400, f"expected a 400 with a near miss, got {err.status} {err.reason}"


def test_required_parameters_are_named_when_absent() -> None:
    _refused("path.id", operation="getOrder", headers={"X-Tenant": "a"})
    _refused("headers.x-tenant", operation="getOrder", path={"id": 1})
    _refused("query.page", operation="listOrders")
    _refused("cookies.sid", operation="session")
    _refused("path.nope", operation="getOrder", path={"id": 1, "nope": 2}, headers={"X-Tenant": "a"})
    _refused("body", operation="createOrder")
    _refused("body", operation="blob", body="x")
    p = prepare(SVC, OPS, _try(operation="session", cookies={"sid": "abc"}))
    assert ("Cookie", "sid=abc") in p.headers, f"expected the cookie parameter sent as a Cookie header, got {p.headers}"


@pytest.mark.parametrize("value", ["", ".", "..", "a/b", "../admin", "a\\b"])
def test_a_path_value_that_would_be_a_segment_of_its_own_is_refused(value: str) -> None:
    _refused("path.id", operation="getOrder", path={"id": value}, headers={"X-Tenant": "a"})


_value = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40) | st.sampled_from(["", ".", "..", "/", "a/b", "..%2F", "?x", "#", "\\"])


@settings(max_examples=1000, deadline=None)
@given(a=_value, b=_value)
def test_a_path_parameter_never_changes_the_paths_segments(a: str, b: str) -> None:
    template = "/api/orders/{id}/lines/{line}"
    try:
        path = expand_path(template, {"id": a, "line": b})
    except TryError as exc:
        assert exc.field in ("path.id", "path.line") and exc.status == 400, f"expected a 400 naming the parameter, got {exc.field} {exc.status}"
        bad = a if exc.field == "path.id" else b
        assert bad in ("", ".", "..") or "/" in bad or "\\" in bad or any(c in bad for c in "\r\n\0"), \
            f"expected only an empty, dot, slash or control-character value refused, got {bad!r}"
        return
    assert "?" not in path and "#" not in path, f"expected no query or fragment from {a!r}, {b!r}, got {path!r}"
    segments = path.split("/")
    assert len(segments) == len(template.split("/")), f"expected {template}'s segments, got {path!r} from {a!r}, {b!r}"
    assert segments[:3] == ["", "api", "orders"] and segments[4] == "lines", f"expected the template's own segments kept, got {path!r}"
    assert [unquote(segments[3]), unquote(segments[5])] == [a, b], f"expected each value to decode back to itself, got {path!r}"
    assert all(re.fullmatch(r"[A-Za-z0-9._~%-]+", s) for s in (segments[3], segments[5])), f"expected only unreserved or %XX, got {path!r}"


@pytest.mark.parametrize("name", ["x-mesh-caller", "X-Mesh-Caller", "Host", "connection", "Transfer-Encoding", "traceparent", "x-b3-traceid",
                                  "x-envoy-upstream-rq-timeout-ms", "x-forwarded-client-cert", "content-length", "upgrade", "x-request-id"])
def test_mesh_trace_and_hop_by_hop_headers_are_refused(name: str) -> None:
    err = _refused(f"headers.{name}", operation="blob", headers={name: "web"})
    assert err.status == 400 and "refused" in err.reason, f"expected a 400 refusing {name}, got {err.status} {err.reason}"


@pytest.mark.parametrize("headers", [{"bad name": "x"}, {"x-ok": "a\r\nx-mesh-caller: web"}, {"": "x"}])
def test_malformed_headers_are_refused(headers: dict[str, str]) -> None:
    with pytest.raises(TryError) as info:
        prepare(SVC, OPS, _try(operation="blob", headers=headers))
    assert info.value.field.startswith("headers."), f"expected a header named, got {info.value.field}"


def test_the_request_body_is_bounded_and_typed() -> None:
    p = prepare(SVC, OPS, _try(operation="createOrder", body={"item": "tea", "n": 2}))
    assert p.body == b'{"item":"tea","n":2}' and ("Content-Type", "application/json") in p.headers, f"expected JSON, got {p.body!r} {p.headers}"
    p = prepare(SVC, OPS, _try(operation="createOrder", body="<x/>", headers={"Content-Type": "application/xml"}))
    assert p.body == b"<x/>" and [v for n, v in p.headers if n.lower() == "content-type"] == ["application/xml"], \
        f"expected the caller's content type alone, got {p.headers}"
    err = _refused("body", operation="createOrder", body="x" * (tryit.MAX_REQUEST_BODY_BYTES + 1))
    assert err.status == 413, f"expected 413 for a body past the bound, got {err.status}"


def test_a_port_is_named_or_the_first_http_one() -> None:
    assert prepare(SVC, OPS, _try(operation="blob", port="admin")).host == "orders.shop:9000"
    _refused("port", operation="blob", port="grpc")


# ---- the route, in process -------------------------------------------------------------------------


class _Sidecar:
    """An in-process HTTP server standing in for the sidecar's outbound listener: it records what came."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.big = False

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append({"method": request.method, "raw_path": request.raw_path, "headers": dict(request.headers), "body": body})
        if request.path.endswith("/slow"):
            await asyncio.sleep(5)
        if request.path.endswith("/blob"):
            return web.Response(body=b"y" * (tryit.MAX_RESPONSE_BYTES + 5000), content_type="application/octet-stream")
        return web.json_response({"you": "reached " + request.headers.get("Host", "")}, status=201, headers={"X-Served-By": "orders-1"})


@pytest.fixture
async def sidecar_server() -> AsyncIterator[tuple[_Sidecar, TestServer]]:
    side = _Sidecar()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", side.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield side, server
    finally:
        await server.close()


async def _api(proxy: str | None) -> TestClient:
    cp = ControlPlane(Settings(store="memory:", try_it_proxy=proxy))
    cp.include(install_catalog(cp))
    client = TestClient(TestServer(cp.api_app()))
    await client.start_server()
    r = await client.post("/v1/services", json={"name": "orders", "namespace": "shop", "ports": [{"name": "http", "port": 8080}]})
    assert r.status == 201, f"expected the service created, got {r.status}: {await r.text()}"
    r = await client.put("/v1/catalog/shop/orders", data=json.dumps(DOC))
    assert r.status == 201, f"expected the catalog stored, got {r.status}: {await r.text()}"
    return client


async def test_the_route_sends_through_the_proxy_and_answers_with_the_response(sidecar_server: tuple[_Sidecar, TestServer]) -> None:
    side, server = sidecar_server
    api = await _api(f"127.0.0.1:{server.port}")
    try:
        r = await api.post("/v1/catalog/shop/orders/try", json={"operation": "getOrder", "path": {"id": "a b?c#d%"},
                                                                 "headers": {"X-Tenant": "acme"}})
        out = await r.json()
        assert r.status == 200, f"expected 200, got {r.status}: {out}"
        came = side.seen[-1]
        assert came["raw_path"] == "/api/orders/a%20b%3Fc%23d%25", f"expected the value as one encoded segment, got {came['raw_path']}"
        assert came["headers"].get("Host") == "orders.shop:8080", f"expected Host the service's mesh name, got {came['headers']}"
        assert came["headers"].get("traceparent", "").startswith(f"00-{out['trace_id']}-"), f"expected the trace id sent, got {came['headers']}"
        assert out["status"] == 201 and json.loads(out["body"]) == {"you": "reached orders.shop:8080"} and not out["body_truncated"], \
            f"expected the sidecar's 201 and body, got {out}"
        assert {"name": "X-Served-By", "value": "orders-1"} in out["headers"], f"expected the response's headers, got {out['headers']}"
        assert out["trace"] == f"/v1/traces/{out['trace_id']}" and out["duration_ms"] >= 0, f"expected the trace's link, got {out}"

        r = await api.post("/v1/catalog/shop/orders/try", json={"operation": "blob"})
        out = await r.json()
        assert r.status == 200 and out["body_truncated"] and out["body_bytes"] == tryit.MAX_RESPONSE_BYTES, \
            f"expected the body cut at {tryit.MAX_RESPONSE_BYTES} bytes and flagged, got {r.status} {out.get('body_bytes')} {out.get('body_truncated')}"

        r = await api.post("/v1/catalog/shop/orders/try", json={"operation": "slow", "timeout_s": 0.3})
        out = await r.json()
        assert r.status == 504 and out["fields"][0]["field"] == "timeout_s", f"expected 504 naming timeout_s, got {r.status} {out}"

        r = await api.post("/v1/catalog/shop/orders/try", json={"operation": "nope"})
        out = await r.json()
        assert r.status == 400 and out["fields"][0]["field"] == "operation", f"expected 400 naming operation, got {r.status} {out}"
        r = await api.post("/v1/catalog/shop/orders/try", json={"operation": "blob", "url": "http://elsewhere/"})
        out = await r.json()
        assert r.status == 400 and out["fields"][0]["field"] == "url", f"expected 400 naming the unknown field url, got {r.status} {out}"
        r = await api.post("/v1/catalog/shop/nothing/try", json={"operation": "blob"})
        assert r.status == 404, f"expected 404 for a service that does not exist, got {r.status}"
        sent = len(side.seen)
        r = await api.post("/v1/catalog/shop/orders/try", json={"operation": "blob", "headers": {"x-mesh-caller": "admin"}})
        out = await r.json()
        assert r.status == 400 and out["fields"][0]["field"] == "headers.x-mesh-caller", f"expected 400 naming the header, got {r.status} {out}"
        assert len(side.seen) == sent, "expected nothing sent for a refused try"
    finally:
        await api.close()


async def test_try_is_off_without_the_setting_and_502_when_nothing_listens() -> None:
    api = await _api(None)
    try:
        r = await api.post("/v1/catalog/shop/orders/try", json={"operation": "blob"})
        out = await r.json()
        assert r.status == 404 and out["fields"] == [{"field": "try_it_proxy", "reason": "not set"}], f"expected 404 naming try_it_proxy, got {r.status} {out}"
    finally:
        await api.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: the connection is refused
        api = await _api(f"127.0.0.1:{port}")
        try:
            r = await api.post("/v1/catalog/shop/orders/try", json={"operation": "blob"})
            out = await r.json()
            assert r.status == 502 and out["fields"][0]["field"] == "try_it_proxy", f"expected 502 naming try_it_proxy, got {r.status} {out}"
        finally:
            await api.close()



async def test_a_try_that_finds_no_free_slot_within_its_timeout_is_a_429_naming_timeout_s(
        sidecar_server: tuple[_Sidecar, TestServer], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every slot taken by a try that hangs: another try waits at most its own timeout_s for one, then is
    refused naming timeout_s and why, without being sent."""
    side, server = sidecar_server
    monkeypatch.setattr(tryit, "CONCURRENT", 1)
    api = await _api(f"127.0.0.1:{server.port}")
    hung = asyncio.create_task(api.post("/v1/catalog/shop/orders/try", json={"operation": "slow", "timeout_s": 4}))
    try:
        async with asyncio.timeout(5):
            while not side.seen:
                await asyncio.sleep(0.01)
        r = await api.post("/v1/catalog/shop/orders/try", json={"operation": "blob", "timeout_s": 0.3})
        out = await r.json()
        assert r.status == 429 and out["fields"][0]["field"] == "timeout_s" and "slot" in out["error"], \
            f"expected 429 naming timeout_s (no free slot), got {r.status} {str(out)[:300]}"
        assert [s["raw_path"] for s in side.seen] == ["/api/slow"], f"expected the refused try never sent, got {[s['raw_path'] for s in side.seen]}"
    finally:
        hung.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await hung
        await api.close()
