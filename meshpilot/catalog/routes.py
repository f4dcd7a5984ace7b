"""The API catalog's routes on the management API (``/v1/catalog``).

Upload (PUT a document: write scope), import from an instance's springdoc endpoint (write
scope), and reads (read scope): the services with a catalog, a service's current operations, its
versions, one version, and the diff between two; and "try it" (write scope: it sends a request
through the mesh on the operator's behalf, tryit.py). Every bad request is a 4xx naming the field, and
leaves the stored catalog as it was. docs/catalog.md is the user's page.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Collection
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from meshpilot.api.app import ApiError, json_body
from meshpilot.api.routes import Route
from meshpilot.catalog.fetch import DEFAULT_PATH, FETCH_TIMEOUT_S, FetchError, choose, document_url, fetch
from meshpilot.catalog.openapi import MAX_DOCUMENT_BYTES, DocumentError, diff, parse
from meshpilot.catalog.tryit import TryError, TryIn, TryIt, prepare
from meshpilot.catalog.versions import Catalog
from meshpilot.model import Service, field_errors, service_key
from meshpilot.registry import Registry

__all__ = ["DocumentIn", "ImportIn", "TryIn", "catalog_routes"]


class ImportIn(BaseModel):
    """Where to fetch a service's document: one of its registered instances, never a URL."""

    model_config = ConfigDict(extra="forbid")
    instance: str | None = Field(default=None, max_length=253, description="a registered instance of the service; omitted: the first routable one")
    port: str | None = Field(default=None, max_length=15, description="the instance's port name; omitted: the service's first HTTP port")
    path: str = Field(default=DEFAULT_PATH, max_length=1024, description="the document's path on the instance (springdoc: /v3/api-docs)")
    timeout_s: float = Field(default=FETCH_TIMEOUT_S, gt=0, le=30, description="give up after this many seconds")


class _Handlers:
    def __init__(self, registry: Registry, try_it: TryIt | None = None, own: Callable[[], Collection[tuple[str, int]]] = lambda: ()) -> None:
        self.registry = registry
        self.own = own
        self.catalog = Catalog(registry)
        self.try_it = try_it

    def _service(self, request: web.Request) -> Service:
        key = service_key(request.match_info["name"], request.match_info["namespace"])
        svc = self.registry.service(key)
        if svc is None:
            raise ApiError(404, f"service: no service {key!r} (register it before its API)", [{"field": "service", "reason": "not found"}])
        return svc

    def _key(self, request: web.Request) -> str:
        return service_key(request.match_info["name"], request.match_info["namespace"])

    async def _record(self, svc: Service, raw: bytes, source: dict[str, Any]) -> web.Response:
        try:
            # off the loop: a 1 MB YAML document takes ~0.6 s to read, and the loop serves xDS meanwhile
            spec = await asyncio.to_thread(parse, raw)
        except DocumentError as exc:
            status = 413 if "bytes; at most" in exc.reason else 400
            raise ApiError(status, str(exc), [{"field": exc.field, "reason": exc.reason}]) from None
        rec = await self.catalog.record(svc, spec, source)
        return web.json_response({"service": svc.key, "created": rec.created, "version": rec.version}, status=201 if rec.created else 200)

    async def upload(self, request: web.Request) -> web.Response:
        svc = self._service(request)
        raw = await _bounded_body(request)
        return await self._record(svc, raw, {"kind": "upload", "content_type": request.content_type})

    async def import_(self, request: web.Request) -> web.Response:
        svc = self._service(request)
        raw = await request.read()
        data = await json_body(request) if raw.strip() else {}
        try:
            body = ImportIn.model_validate_json(json.dumps(data), strict=True)  # typed as JSON is: "5" is not a number
        except ValidationError as exc:
            fields = field_errors(exc)
            raise ApiError(400, "; ".join(f"{f['field']}: {f['reason']}" for f in fields), fields) from None
        try:
            inst, port = choose(svc, self.registry.instances(svc.key), body.instance, body.port)
            url = document_url(inst, port, body.path, self.own())
            doc = await fetch(url, body.timeout_s)
        except FetchError as exc:
            raise ApiError(exc.status, str(exc), [{"field": exc.field, "reason": exc.reason}]) from None
        return await self._record(svc, doc, {"kind": "import", "instance": inst.id, "url": str(url)})

    async def list_services(self, request: web.Request) -> web.Response:
        return web.json_response(self.catalog.services())

    async def current(self, request: web.Request) -> web.Response:
        key = self._key(request)
        version = self.catalog.version(key)
        if version is None:
            raise ApiError(404, f"service: {key} has no API catalog (PUT its OpenAPI document, or import it)", [{"field": "service", "reason": "no catalog"}])
        return web.json_response(version)

    async def versions(self, request: web.Request) -> web.Response:
        key = self._key(request)
        versions = self.catalog.versions(key)
        if not versions:
            raise ApiError(404, f"service: {key} has no API catalog", [{"field": "service", "reason": "no catalog"}])
        return web.json_response(versions)

    async def version(self, request: web.Request) -> web.Response:
        key = self._key(request)
        text = request.match_info["number"]
        version = self.catalog.version(key, int(text)) if text.isdigit() and len(text) <= 9 else None
        if version is None:
            raise ApiError(404, f"number: {key} has no catalog version {text!r} (versions are numbered 1, 2, ...)", [{"field": "number", "reason": "not found"}])
        return web.json_response(version)

    async def diff(self, request: web.Request) -> web.Response:
        key = self._key(request)
        versions = self.catalog.versions(key)
        if not versions:
            raise ApiError(404, f"service: {key} has no API catalog", [{"field": "service", "reason": "no catalog"}])
        to = _number(request.query["to"], "to") if "to" in request.query else int(versions[-1]["number"])
        if "from" in request.query:
            frm = _number(request.query["from"], "from")
        else:
            earlier = [int(v["number"]) for v in versions if int(v["number"]) < to]
            if not earlier:
                raise ApiError(404, f"from: version {to} has no earlier version to compare with; give from", [{"field": "from", "reason": "no earlier version"}])
            frm = earlier[-1]
        a, b = self.catalog.version(key, frm), self.catalog.version(key, to)
        for name, n, v in (("from", frm, a), ("to", to, b)):
            if v is None:
                raise ApiError(404, f"{name}: {key} has no catalog version {n}", [{"field": name, "reason": "not found"}])
        assert a is not None and b is not None
        out = diff(self.catalog.operations(a), self.catalog.operations(b))
        return web.json_response({"service": key, "from": frm, "to": to, **out})

    async def try_(self, request: web.Request) -> web.Response:
        if self.try_it is None:
            raise ApiError(404, "try_it_proxy: try-it is off; set try_it_proxy to the outbound listener (HOST:PORT) of a sidecar "
                                "on the control plane's host (docs/catalog.md: Try it)", [{"field": "try_it_proxy", "reason": "not set"}])
        svc = self._service(request)
        try:
            body = TryIn.model_validate_json(json.dumps(await json_body(request)), strict=True)
        except ValidationError as exc:
            fields = field_errors(exc)
            raise ApiError(400, "; ".join(f"{f['field']}: {f['reason']}" for f in fields), fields) from None
        version = self.catalog.version(svc.key)
        if version is None:
            raise ApiError(404, f"service: {svc.key} has no API catalog (PUT its OpenAPI document, or import it)",
                           [{"field": "service", "reason": "no catalog"}])
        try:
            prepared = prepare(svc, self.catalog.operations(version), body)
            out = await self.try_it.send(prepared, body.timeout_s)
        except TryError as exc:
            raise ApiError(exc.status, str(exc), [{"field": exc.field, "reason": exc.reason}]) from None
        return web.json_response({"service": svc.key, "version": version["number"], **out})


def _number(text: str, field: str) -> int:
    if not text.isdigit() or len(text) > 9 or int(text) < 1:
        raise ApiError(400, f"{field}: expected a version number (1, 2, ...), got {text!r}", [{"field": field, "reason": "not a version number"}])
    return int(text)


async def _bounded_body(request: web.Request) -> bytes:
    """The request body, refused with a 413 naming the limit past ``MAX_DOCUMENT_BYTES``."""
    if request.content_length is not None and request.content_length > MAX_DOCUMENT_BYTES:
        raise ApiError(413, f"(body): the document is {request.content_length} bytes; at most {MAX_DOCUMENT_BYTES} are accepted",
                       [{"field": "(body)", "reason": f"larger than {MAX_DOCUMENT_BYTES} bytes"}])
    body = await request.read()  # the API's own bound (client_max_size) stops a body far past ours
    if len(body) > MAX_DOCUMENT_BYTES:
        raise ApiError(413, f"(body): the document is larger than {MAX_DOCUMENT_BYTES} bytes", [{"field": "(body)", "reason": f"larger than {MAX_DOCUMENT_BYTES} bytes"}])
    return body


class DocumentIn(BaseModel):
    """An OpenAPI 3.0 or 3.1 document, as JSON (or the same as YAML); docs/catalog.md says what is read."""

    model_config = ConfigDict(extra="allow")
    openapi: str = Field(pattern=r"^3\.[01]\.\d+$", description="the OpenAPI version: 3.0.x or 3.1.x")
    info: dict[str, Any] = Field(description="title and version")
    paths: dict[str, Any] = Field(default_factory=dict, description="path templates and their operations")


def catalog_routes(registry: Registry, try_it: TryIt | None = None,
                   own: Callable[[], Collection[tuple[str, int]]] = lambda: ()) -> list[Route]:
    """``try_it``: where tries are sent (the ``try_it_proxy`` setting); None: the try route answers 404.
    ``own``: the control plane's listeners (address, port), which an import never fetches from."""
    h = _Handlers(registry, try_it, own)
    base = "/v1/catalog/{namespace}/{name}"
    return [
        Route("GET", "/v1/catalog", h.list_services, "List the services with an API catalog and their current versions"),
        Route("GET", base, h.current, "Get a service's current API operations"),
        Route("PUT", base, h.upload, "Upload a service's OpenAPI 3 document: a new catalog version when its operations changed", DocumentIn),
        Route("POST", base + "/import", h.import_, "Import a service's OpenAPI document from one of its registered instances (springdoc /v3/api-docs)", ImportIn),
        Route("GET", base + "/versions", h.versions, "List a service's catalog versions"),
        Route("GET", base + "/versions/{number}", h.version, "Get one catalog version with its operations"),
        Route("GET", base + "/diff", h.diff, "Operations added, removed and changed between two catalog versions (?from=&to=)"),
        Route("POST", base + "/try", h.try_, "Send one request to an operation through the mesh, from the control plane's own sidecar "
              "(try_it_proxy): its status, headers, body and trace id; 429 naming timeout_s when no try slot frees within it",
              TryIn, scope="write", errors=("429", "502", "504")),
    ]
