"""The API catalog's try-it end to end: a real control plane with ``try_it_proxy`` set, its own sidecar
(a real ``meshpilot sidecar`` agent and Envoy for the service ``meshpilot-console``, whose app is the
control plane's API), and a callee service ``inventory`` with its sidecar and a real HTTP app, whose
OpenAPI document is in the catalog. The mesh's TracingPolicy samples 0 % of new traces, so the trace
exists only because the try's ``traceparent`` asks for it.

``POST /v1/catalog/default/inventory/try`` for an operation answers the app's own status and body
(a 201 with the echoed request body, a 418 the app chose), the app saw the request come from the
control plane's sidecar (``x-mesh-caller: meshpilot-console``) with the path parameter as one encoded
segment, and ``/v1/traces/{trace_id}`` then holds the client span of the control plane's sidecar and
the server span of the callee's, one the parent of the other. A read token gets 403 and sends
nothing; an unknown operation is a 400 naming ``operation``; a mesh identity header a 400 naming it.
"""

from __future__ import annotations

import contextlib
import http.server as httpserver
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.test_sidecar import AUTH, TOKEN, sidecar, spec_doc
from tests.e2e.test_tracing import _flat
from tests.support import control_plane, free_port, http, through, wait_until

pytestmark = pytest.mark.e2e

SERVICE = "inventory"
TRY = f"/v1/catalog/default/{SERVICE}/try"
DOCUMENT = {
    "openapi": "3.0.3", "info": {"title": "Inventory", "version": "1.0"},
    "paths": {
        "/items/{id}": {"get": {"operationId": "getItem", "summary": "One item", "parameters": [
            {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}},
            {"name": "fields", "in": "query", "schema": {"type": "string"}}], "responses": {"200": {"description": "ok"}}}},
        "/items": {"post": {"operationId": "createItem", "summary": "Add an item",
                            "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
                            "responses": {"201": {"description": "made"}}}},
        "/status/{code}": {"get": {"operationId": "answerWith", "parameters": [{"name": "code", "in": "path", "required": True}],
                                   "responses": {"default": {"description": "any"}}}},
    },
}


class _Inventory(httpserver.BaseHTTPRequestHandler):
    """The callee app: /items/... answers what it got; /status/N answers N; POST /items 201 with the body back."""

    protocol_version = "HTTP/1.1"

    def _send(self, status: int, doc: Any) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Inventory", "inventory-1")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        got = {"path": self.path, "caller": self.headers.get("x-mesh-caller"), "traceparent": self.headers.get("traceparent")}
        if self.path.startswith("/status/"):
            code = int(self.path.split("/")[2])
            self._send(code, {"chosen": code, **got})
        else:
            self._send(200, {"item": self.path, **got})

    def do_POST(self) -> None:  # noqa: N802
        data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._send(201, {"created": json.loads(data), "caller": self.headers.get("x-mesh-caller")})

    def log_message(self, *a: Any) -> None:
        pass


@contextlib.contextmanager
def inventory_app() -> Iterator[int]:
    srv = httpserver.ThreadingHTTPServer(("127.0.0.1", 0), _Inventory)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


@dataclass
class TryMesh:
    cp: Any
    console_side: Any  # the control plane's own sidecar (service meshpilot-console)
    callee_side: Any


def _sampling(side: Any) -> list[float]:
    """The random_sampling percentages of the HTTP connection managers in the sidecar's Envoy (0 is
    left out of the dump's JSON, as protobuf leaves out every default)."""
    out: list[float] = []
    stack = [json.loads(side.admin("/config_dump?resource=dynamic_listeners"))]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("random_sampling"), dict):
                out.append(float(node["random_sampling"].get("value", 0)))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return out


def _both_sidecars(cp: Any, trace_id: str) -> dict[str, Any] | None:
    status, tree = cp.call("GET", f"/v1/traces/{trace_id}", headers=AUTH)
    if status != 200:
        return None
    kinds = {(s["service"], s.get("kind")) for s in _flat(tree)}
    return tree if {("meshpilot-console", "CLIENT"), (SERVICE, "SERVER")} <= kinds else None


@contextlib.contextmanager
def try_mesh(workdir: Path) -> Iterator[TryMesh]:
    """A control plane whose try-it goes through its own sidecar, and the inventory service behind
    its sidecar with its catalog; tracing samples 0 % of new traces."""
    console_out = free_port()
    cfg = workdir / "cp.yaml"
    cfg.write_text(yaml.safe_dump({"hds_interval_s": 0.3, "debounce_ms": 20, "token": TOKEN, "try_it_proxy": f"127.0.0.1:{console_out}"}))
    with contextlib.ExitStack() as stack:
        cp = stack.enter_context(control_plane(workdir, extra=["--config", str(cfg)]))
        status, body = cp.call("PUT", "/v1/policies/TracingPolicy/default/none",
                               {"kind": "TracingPolicy", "name": "none", "namespace": "default", "sampling": 0}, AUTH)
        assert status in (200, 201), f"expected the TracingPolicy stored, got {status} {body}"
        app_port = stack.enter_context(inventory_app())
        callee = stack.enter_context(sidecar(workdir, SERVICE, spec_doc(SERVICE, app_port, free_port(), free_port()), cp, "inventory-1"))
        api_port = int(cp.api.rsplit(":", 1)[1])
        console = stack.enter_context(sidecar(workdir, "meshpilot-console", spec_doc("meshpilot-console", api_port, free_port(), console_out),
                                              cp, "control-plane-1"))
        assert console.outbound == console_out
        status, body = cp.call("PUT", f"/v1/catalog/default/{SERVICE}", DOCUMENT, AUTH)
        assert status in (200, 201), f"expected the inventory catalog stored, got {status} {body}"
        for side in (callee, console):
            wait_until(lambda side=side: (s := _sampling(side)) and set(s) == {0.0}, 20,
                       what=f"{side.node_id}'s listeners tracing at 0 % of new traces")
        wait_until(lambda: through(console_out, f"{SERVICE}.default:80", "/items/ready")[0] == 200, 20,
                   what="the control plane's sidecar routing to inventory")
        yield TryMesh(cp, console, callee)


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[TryMesh]:
    with try_mesh(tmp_path) as m:
        yield m


def _try(cp: Any, body: dict[str, Any], headers: dict[str, str] = AUTH) -> tuple[int, Any]:
    status, data, _ = http("POST", cp.api + TRY, body, headers, timeout=20)
    return status, data


def test_try_it_sends_through_the_control_planes_sidecar_and_the_trace_has_both_sidecars(mesh: TryMesh) -> None:
    cp = mesh.cp
    status, out = _try(cp, {"operation": "getItem", "path": {"id": "tea cups?#%"}, "query": {"fields": "name,price"}})
    assert status == 200, f"expected the try answered, got {status}: {out}"
    assert out["status"] == 200, f"expected the app's 200, got {out}"
    app_saw = json.loads(out["body"])
    assert out["status"] == 200 and app_saw["item"] == "/items/tea%20cups%3F%23%25?fields=name%2Cprice", \
        f"expected the app's 200 for /items/<one encoded segment>, got {out['status']}: {out['body']}"
    assert app_saw["caller"] == "meshpilot-console", f"expected the request to come from the control plane's sidecar, got {app_saw}"
    assert (app_saw["traceparent"] or "").split("-")[1:2] == [out["trace_id"]], \
        f"expected the app to get the try's trace {out['trace_id']}, got {app_saw['traceparent']}"
    assert {"name": "x-inventory", "value": "inventory-1"} in out["headers"] and out["body_truncated"] is False, \
        f"expected the app's headers and the whole body, got {out}"

    tree = wait_until(lambda: _both_sidecars(cp, out["trace_id"]), 40, interval=0.5,
                      what=f"trace {out['trace_id']} with the control plane's sidecar's and inventory's spans")
    spans = _flat(tree)
    client = next(s for s in spans if s["service"] == "meshpilot-console" and s.get("kind") == "CLIENT")
    server = next(s for s in spans if s["service"] == SERVICE and s.get("kind") == "SERVER")
    assert server.get("parentId") == client["id"], f"expected inventory's span under the control plane sidecar's span, got {client} {server}"
    assert client["tags"].get("http.status_code") == "200", f"expected the client span to record the 200, got {client['tags']}"

    # the app's own status and body, whatever they are
    status, out = _try(cp, {"operation": "answerWith", "path": {"code": 418}})
    assert status == 200 and out["status"] == 418 and json.loads(out["body"])["chosen"] == 418, f"expected the app's 418, got {status}: {out}"
    status, out = _try(cp, {"operation": "createItem", "body": {"name": "kettle", "count": 2}})
    assert status == 200 and out["status"] == 201 and json.loads(out["body"])["created"] == {"name": "kettle", "count": 2}, \
        f"expected the app's 201 with the body it was sent, got {status}: {out}"


def test_try_it_refuses_a_read_token_an_unknown_operation_and_mesh_headers(mesh: TryMesh) -> None:
    cp = mesh.cp
    status, made = cp.call("POST", "/v1/access/tokens", {"scope": "read", "description": "try-it e2e"}, headers=AUTH)
    assert status == 201, f"expected a read token made, got {status}: {made}"
    status, out = _try(cp, {"operation": "getItem", "path": {"id": "x"}}, {"Authorization": f"Bearer {made['secret']}"})
    assert status == 403, f"expected 403 for a read token (try-it sends traffic), got {status}: {out}"
    status, out = _try(cp, {"operation": "getItem", "path": {"id": "x"}}, {})
    assert status == 401, f"expected 401 without a token, got {status}: {out}"
    status, out = _try(cp, {"operation": "getItems", "path": {"id": "x"}})
    assert status == 400 and out["fields"][0]["field"] == "operation" and "getItem" in out["error"], \
        f"expected 400 naming operation (and the near miss), got {status}: {out}"
    status, out = _try(cp, {"operation": "getItem", "path": {"id": "x"}, "headers": {"X-Mesh-Caller": "payments"}})
    assert status == 400 and out["fields"][0]["field"] == "headers.X-Mesh-Caller", f"expected 400 naming the header, got {status}: {out}"
    status, out = _try(cp, {"operation": "getItem"})
    assert status == 400 and out["fields"][0]["field"] == "path.id", f"expected 400 naming path.id, got {status}: {out}"
