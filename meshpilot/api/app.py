"""The management API (HTTP, JSON) on port 15014: services, instances, proxies, OpenAPI, metrics.

Every body is validated before anything is stored; a rejected request answers 4xx with
``{"error": ..., "fields": [{"field", "reason"}]}`` naming each offending field, and leaves the
registry as it was. When a token is configured, every write needs ``Authorization: Bearer <token>``.
Other parts of the product add routes through ``ControlPlane.api_routes``.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from google.protobuf import json_format
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from meshpilot import boundedjson, metrics
from meshpilot.model import Check, CheckStatus, Instance, Service, field_errors
from meshpilot.registry import Conflict, NotFound, RegistryError

if TYPE_CHECKING:
    from meshpilot.controlplane import ControlPlane

__all__ = ["ApiError", "InstanceIn", "build_api", "json_body", "api_routes"]

log = logging.getLogger("meshpilot.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# (method, path, handler, summary, request model, response model) added by other modules
api_routes: list[tuple[str, str, Handler, str, type[BaseModel] | None]] = []


class ApiError(Exception):
    def __init__(self, status: int, error: str, fields: list[dict[str, str]] | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.fields = fields or []


class InstanceIn(BaseModel):
    """An instance as registered through the management API."""

    model_config = ConfigDict(extra="forbid")
    id: str
    address: str
    ports: dict[str, int]
    node: str = ""
    zone: str = ""
    weight: int = 100
    labels: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, str] = Field(default_factory=dict)
    health: CheckStatus = CheckStatus.passing


class HealthIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: CheckStatus
    # Check's own bounds, so that a bad value is named by its field here rather than failing later
    check_id: str = Field(default="api", min_length=1, max_length=256)
    output: str = Field(default="", max_length=4096)


class MaintenanceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool


class InjectIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type_url: str
    name: str
    resource: dict[str, Any]
    scope: str = ""


async def json_body(request: web.Request) -> Any:
    raw = await request.read()
    if not raw:
        raise ApiError(400, "body: a JSON body is required", [{"field": "(body)", "reason": "empty"}])
    try:
        return boundedjson.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"body: malformed JSON: {exc}", [{"field": "(body)", "reason": f"malformed JSON: {exc}"}]) from None


def _validate(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        fields = field_errors(exc)
        raise ApiError(400, "; ".join(f"{f['field']}: {f['reason']}" for f in fields), fields) from None


def _registry_error(exc: RegistryError) -> ApiError:
    status = 404 if isinstance(exc, NotFound) else 409 if isinstance(exc, Conflict) else 400
    return ApiError(status, str(exc), [{"field": exc.field, "reason": exc.reason}])


def _out(model: BaseModel, **extra: Any) -> dict[str, Any]:
    return {**model.model_dump(mode="json"), **extra}


def _instance_out(i: Instance) -> dict[str, Any]:
    return _out(i, health=i.health.value, routable=i.routable)


def build_api(cp: ControlPlane) -> web.Application:
    s = cp.settings
    reg = cp.registry

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            if request.method not in ("GET", "HEAD", "OPTIONS") and s.token:
                scheme, _, got = request.headers.get("Authorization", "").partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(got.strip().encode(), s.token.encode()):  # RFC 7235: any case
                    raise ApiError(401, "authorization: a valid bearer token is required for writes")
            resp = await handler(request)
        except ApiError as exc:
            resp = web.json_response({"error": exc.error, "fields": exc.fields}, status=exc.status)
        except RegistryError as exc:
            e = _registry_error(exc)
            resp = web.json_response({"error": e.error, "fields": e.fields}, status=e.status)
        except ValidationError as exc:  # a write whose result the model refuses (a 65th check)
            fields = field_errors(exc)
            resp = web.json_response({"error": "; ".join(f"{f['field']}: {f['reason']}" for f in fields), "fields": fields}, status=409)
        except web.HTTPException as exc:
            if exc.status >= 400:
                resp = web.json_response({"error": exc.reason, "fields": []}, status=exc.status)
            else:
                raise
        metrics.API_REQUESTS.labels(request.method, str(resp.status)).inc()
        return resp

    def _svc_key(request: web.Request) -> str:
        return f"{request.match_info['name']}.{request.match_info['namespace']}".lower()

    def _service(request: web.Request) -> Service:
        svc = reg.service(_svc_key(request))
        if svc is None:
            raise ApiError(404, f"service: no service {_svc_key(request)!r}", [{"field": "service", "reason": "not found"}])
        return svc

    async def list_services(request: web.Request) -> web.Response:
        ns = request.query.get("namespace")
        return web.json_response([_out(x) for x in reg.services() if ns is None or x.namespace == ns])

    async def create_service(request: web.Request) -> web.Response:
        data = await json_body(request)
        if isinstance(data, dict) and "vip" in data:
            raise ApiError(400, "vip: allocated by the control plane, not settable", [{"field": "vip", "reason": "read-only"}])
        svc = _validate(Service, data)
        if reg.service(svc.key) is not None:
            raise ApiError(409, f"name: service {svc.key!r} already exists", [{"field": "name", "reason": "already exists"}])
        return web.json_response(_out(reg.put_service(svc)), status=201)

    async def get_service(request: web.Request) -> web.Response:
        svc = _service(request)
        return web.json_response(_out(svc, instances=[_instance_out(i) for i in reg.instances(svc.key)]))

    async def put_service(request: web.Request) -> web.Response:
        data = await json_body(request)
        if not isinstance(data, dict):
            raise ApiError(400, "body: must be a JSON object", [{"field": "(body)", "reason": "not an object"}])
        if "vip" in data:
            raise ApiError(400, "vip: allocated by the control plane, not settable", [{"field": "vip", "reason": "read-only"}])
        data = {**data, "name": request.match_info["name"], "namespace": request.match_info["namespace"]}
        svc = _validate(Service, data)
        existed = reg.service(svc.key) is not None
        # instances must keep naming ports the service still has
        names = {p.name for p in svc.ports}
        for inst in reg.instances(svc.key):
            missing = set(inst.ports) - names
            if missing:
                raise ApiError(
                    409,
                    f"ports: instance {inst.id!r} uses port {sorted(missing)[0]!r}, which the update removes",
                    [{"field": "ports", "reason": "in use by registered instances"}],
                )
        return web.json_response(_out(reg.put_service(svc)), status=200 if existed else 201)

    async def delete_service(request: web.Request) -> web.Response:
        svc = reg.delete_service(_svc_key(request))
        return web.json_response(_out(svc))

    async def list_instances(request: web.Request) -> web.Response:
        if "name" in request.match_info:
            svc = _service(request)
            items = reg.instances(svc.key)
        else:
            items = reg.instances()
        return web.json_response([_instance_out(i) for i in items])

    async def register_instance(request: web.Request) -> web.Response:
        svc = _service(request)
        body = _validate(InstanceIn, await json_body(request))
        data = body.model_dump(exclude={"health"})
        data.update(
            service=svc.name,
            namespace=svc.namespace,
            source="api",
            checks=[{"id": "api", "owner": "api", "status": body.health.value}],
        )
        inst = _validate(Instance, data)
        return web.json_response(_instance_out(reg.register(inst)), status=201)

    def _instance(request: web.Request) -> Instance:
        inst = reg.instance(request.match_info["id"])
        if inst is None:
            raise ApiError(404, f"id: no instance {request.match_info['id']!r}", [{"field": "id", "reason": "not found"}])
        return inst

    async def get_instance(request: web.Request) -> web.Response:
        return web.json_response(_instance_out(_instance(request)))

    async def deregister_instance(request: web.Request) -> web.Response:
        inst = _instance(request)
        source = request.query.get("source")
        return web.json_response(_instance_out(reg.deregister(inst.id, source)))

    async def set_health(request: web.Request) -> web.Response:
        inst = _instance(request)
        body = _validate(HealthIn, await json_body(request))
        check = Check(id=body.check_id, owner="api", status=body.status, output=body.output)
        return web.json_response(_instance_out(reg.set_check(inst.id, check)))

    async def set_maintenance(request: web.Request) -> web.Response:
        inst = _instance(request)
        body = _validate(MaintenanceIn, await json_body(request))
        return web.json_response(_instance_out(reg.set_maintenance(inst.id, body.enabled)))

    async def proxies(request: web.Request) -> web.Response:
        return web.json_response(cp.xds.proxies())

    async def openapi(request: web.Request) -> web.Response:
        return web.json_response(openapi_document())

    async def metrics_text(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8")

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "ports": cp.ports})

    async def inject(request: web.Request) -> web.Response:
        body = _validate(InjectIn, await json_body(request))
        msg = _message_for(body.type_url)
        try:
            json_format.ParseDict(body.resource, msg)
        except json_format.ParseError as exc:
            raise ApiError(400, f"resource: {exc}", [{"field": "resource", "reason": str(exc)}]) from None
        cp.cache.put(body.type_url, {body.name: msg}, scope=body.scope)
        return web.json_response({"injected": body.name}, status=201)

    async def uninject(request: web.Request) -> web.Response:
        cp.cache.remove(request.query.get("type_url", ""), [request.query.get("name", "")], request.query.get("scope", ""))
        return web.json_response({"removed": request.query.get("name", "")})

    app = web.Application(middlewares=[errors], client_max_size=4 * 1024 * 1024)
    r = app.router
    r.add_get("/healthz", healthz)
    r.add_get("/openapi.json", openapi)
    r.add_get("/metrics", metrics_text)
    r.add_get("/v1/services", list_services)
    r.add_post("/v1/services", create_service)
    r.add_get("/v1/services/{namespace}/{name}", get_service)
    r.add_put("/v1/services/{namespace}/{name}", put_service)
    r.add_delete("/v1/services/{namespace}/{name}", delete_service)
    r.add_get("/v1/services/{namespace}/{name}/instances", list_instances)
    r.add_post("/v1/services/{namespace}/{name}/instances", register_instance)
    r.add_get("/v1/instances", list_instances)
    r.add_get("/v1/instances/{id}", get_instance)
    r.add_delete("/v1/instances/{id}", deregister_instance)
    r.add_put("/v1/instances/{id}/health", set_health)
    r.add_put("/v1/instances/{id}/maintenance", set_maintenance)
    r.add_get("/v1/proxies", proxies)
    if s.debug_api:
        r.add_post("/v1/debug/resources", inject)
        r.add_delete("/v1/debug/resources", uninject)
    for method, path, handler, _summary, _model in api_routes:
        r.add_route(method, path, handler)
    return app


def _message_for(type_url: str) -> Any:
    from google.protobuf import symbol_database

    name = type_url.rsplit("/", 1)[-1]
    try:
        return symbol_database.Default().GetSymbol(name)()
    except KeyError:
        raise ApiError(400, f"type_url: unknown message type {name!r}", [{"field": "type_url", "reason": "unknown"}]) from None


def openapi_document() -> dict[str, Any]:
    schemas: dict[str, Any] = {}

    def ref(model: type[BaseModel]) -> dict[str, str]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in schema.pop("$defs", {}).items():
            schemas[name] = sub
        schemas[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    err = {"description": "invalid request", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    schemas["Error"] = {
        "type": "object",
        "properties": {
            "error": {"type": "string"},
            "fields": {"type": "array", "items": {"type": "object", "properties": {"field": {"type": "string"}, "reason": {"type": "string"}}}},
        },
    }

    def op(summary: str, body: type[BaseModel] | None = None, out: dict[str, Any] | None = None, write: bool = False) -> dict[str, Any]:
        o: dict[str, Any] = {"summary": summary, "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": out or {}}}}}}
        if body is not None:
            o["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(body)}}}
        if write:
            o["responses"].update({"400": err, "401": err, "404": err, "409": err})
            o["security"] = [{"bearer": []}]
        return o

    svc = ref(Service)
    inst = ref(Instance)
    ns_name = [
        {"name": "namespace", "in": "path", "required": True, "schema": {"type": "string"}},
        {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
    ]
    iid = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
    paths: dict[str, Any] = {
        "/v1/services": {
            "get": op("List services", out={"type": "array", "items": svc}),
            "post": op("Create a service (its virtual IP is allocated)", Service, svc, True),
        },
        "/v1/services/{namespace}/{name}": {
            "parameters": ns_name,
            "get": op("Get a service and its instances", out=svc),
            "put": op("Create or replace a service", Service, svc, True),
            "delete": op("Delete a service and its instances", out=svc, write=True),
        },
        "/v1/services/{namespace}/{name}/instances": {
            "parameters": ns_name,
            "get": op("List a service's instances", out={"type": "array", "items": inst}),
            "post": op("Register an instance", InstanceIn, inst, True),
        },
        "/v1/instances": {"get": op("List all instances", out={"type": "array", "items": inst})},
        "/v1/instances/{id}": {
            "parameters": iid,
            "get": op("Get an instance", out=inst),
            "delete": op("Deregister an instance", out=inst, write=True),
        },
        "/v1/instances/{id}/health": {"parameters": iid, "put": op("Set a health check owned by the API", HealthIn, inst, True)},
        "/v1/instances/{id}/maintenance": {"parameters": iid, "put": op("Enter or leave maintenance", MaintenanceIn, inst, True)},
        "/v1/proxies": {"get": op("Connected Envoys: streams, subscriptions, ACKed versions, last NACK", out={"type": "array", "items": {"type": "object"}})},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text exposition format"}}}},
    }
    for method, path, _handler, summary, model in api_routes:
        paths.setdefault(path, {})[method.lower()] = op(summary, model, write=method != "GET")
    return {
        "openapi": "3.0.3",
        "info": {"title": "meshpilot management API", "version": "1"},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


