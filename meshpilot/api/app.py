"""The management API (HTTP, JSON) on port 15014: services, instances, proxies, OpenAPI, metrics.

Every body is validated before anything is stored; a rejected request answers 4xx with
``{"error": ..., "fields": [{"field", "reason"}]}`` naming each offending field, and leaves the
registry as it was. When a token is configured (``settings.token``, the operator's bootstrap
token), every request needs ``Authorization: Bearer <token>`` with a token whose scope suffices:
read for GET and HEAD, write for the rest, admin for token and identity administration
(``required_scope``); /healthz, /metrics and the WASM module Envoy fetches stay open. The tokens
themselves (``/v1/access/tokens``) are kept in the store by ``meshpilot.access``.

A front door like the Consul and Eureka ones: it is given the registry, the xDS server it reports
on and the routes other parts of the product contribute (routes.py), and keeps no state of its own.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import Message
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from meshpilot import boundedjson, metrics
from meshpilot.access import BOOTSTRAP_ID, AccessTokens, Scope
from meshpilot.access.tokens import MAX_DESCRIPTION, MAX_TTL_S
from meshpilot.model import Check, CheckStatus, Instance, Service, field_errors
from meshpilot.api.routes import Handler, Route, RouteScope
from meshpilot.frontdoor import bearer_token
from meshpilot.registry import Conflict, NotFound, Registry, RegistryError
from meshpilot.settings import Settings
from meshpilot.xds.server import XdsServer

__all__ = ["LABEL", "OPEN_PATHS", "ApiError", "InstanceIn", "build_api", "json_body", "openapi_document", "required_scope"]

log = logging.getLogger("meshpilot.api")


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
    ports: dict[str, Annotated[int, Field(ge=1, le=65535)]] = Field(min_length=1)
    node: str = Field(default="", max_length=253)
    zone: str = Field(default="", max_length=128)
    weight: int = Field(default=100, ge=1, le=10_000)
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


class TokenIn(BaseModel):
    """A new access token: its scope, what it is for, how long it lives (absent: until revoked)."""

    model_config = ConfigDict(extra="forbid")
    scope: Literal["read", "write", "admin"]
    description: str = Field(default="", max_length=MAX_DESCRIPTION)
    ttl_s: int | None = Field(default=None, ge=1, le=MAX_TTL_S)


# Open with authorisation on (GET and HEAD): probes ask /healthz; /metrics holds counters and
# histograms labelled only by xDS type, stream type, method and status, nothing that names a service,
# node or token, and Prometheus scrapes it; /v1/wasm/{name} is the filter module Envoy fetches over a
# plain HTTP data source that carries no token (policy/governance.py), a build artefact that is the
# same in every installation.
OPEN_PATHS = frozenset({"/healthz", "/metrics", "/v1/wasm/{name}"})
_READS = ("GET", "HEAD", "OPTIONS")


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def required_scope(method: str, path: str, declared: RouteScope | None = None, raw_path: str = "") -> Scope | None:
    """The scope a request needs when authorisation is on, None for none. ``path``: the route's path
    template (``/v1/services/{namespace}/{name}``; the request path when no route matches);
    ``declared``: what the route declares; ``raw_path``: the request's own path. Token and identity
    administration needs admin whatever is declared; otherwise a declaration wins, then the open
    paths, then read for GET and HEAD and write for the rest."""
    read = method.upper() in _READS
    for p in (path, raw_path):
        if _under(p, "/v1/access") or _under(p, "/v1/identity/tokens") or (not read and _under(p, "/v1/identity/roots")):
            return Scope.admin
    if declared == "open":
        return None
    if declared is not None:
        return Scope.named(declared)
    if read and path in OPEN_PATHS:
        return None
    return Scope.read if read else Scope.write


Inject = Callable[[str, str, Message | None, str], None]  # (type URL, name, resource or None: take back, scope)


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
    """``data`` as ``model``, typed as JSON is: ``"80"`` or ``true`` is not an integer."""
    try:
        return model.model_validate_json(json.dumps(data), strict=True)
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


def build_api(
    settings: Settings,
    registry: Registry,
    xds: XdsServer,
    routes: Sequence[Route] = (),
    ports: Mapping[str, int] | None = None,
    put_by_hand: Inject | None = None,
) -> web.Application:
    """The API over ``registry`` with its own routes and ``routes``; ``ports``: the control plane's
    bound ports, as /healthz reports them (filled in as its listeners start); ``put_by_hand``: how the
    debug routes put a resource into the cache by hand (the publisher's; without it, no debug routes)."""
    s = settings
    reg = registry
    tokens = AccessTokens(reg.store, s.token)
    declared: dict[tuple[str, str], RouteScope] = {}
    for route in routes:
        if route.scope is not None:
            for method in ("GET", "HEAD") if route.method.upper() == "GET" else (route.method.upper(),):
                declared[(method, route.path)] = route.scope
    if s.debug_api:  # puts any resource into the cache, past every validation
        declared.update({("POST", "/v1/debug/resources"): "admin", ("DELETE", "/v1/debug/resources"): "admin"})

    def authorise(request: web.Request) -> None:
        """Raise 401 when the request needs a token and has no valid one, 403 when its scope is too low."""
        if not tokens.enabled:
            return
        resource = request.match_info.route.resource
        path = resource.canonical if resource is not None else request.path
        need = required_scope(request.method, path, declared.get((request.method, path)), request.path)
        if need is None:
            return
        what = f"{request.method} {path}"
        secret = bearer_token(request)
        if secret is None:
            enough = need.name if need is Scope.admin else f"{need.name} or higher"
            raise ApiError(401, f"authorization: {what} needs a token with scope {enough} (Authorization: Bearer <token>)",
                           [{"field": "Authorization", "reason": f"missing; scope {need.name} needed"}])
        got = tokens.check(secret)
        if got is None:
            raise ApiError(401, f"authorization: the token is not valid (unknown, revoked or expired); {what} needs scope {need.name}",
                           [{"field": "Authorization", "reason": "not a valid token"}])
        if got < need:
            raise ApiError(403, f"authorization: this token has scope {got.name}; {what} needs scope {need.name}",
                           [{"field": "Authorization", "reason": f"scope {got.name} is below {need.name}"}])

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            authorise(request)
            resp = await handler(request)
        except ApiError as exc:
            challenge = {"WWW-Authenticate": 'Bearer realm="meshpilot"'} if exc.status == 401 else None
            resp = web.json_response({"error": exc.error, "fields": exc.fields}, status=exc.status, headers=challenge)
        except RegistryError as exc:
            e = _registry_error(exc)
            resp = web.json_response({"error": e.error, "fields": e.fields}, status=e.status)
        except ValidationError as exc:  # a write whose result the model refuses (a 65th check)
            fields = field_errors(exc)
            resp = web.json_response({"error": "; ".join(f"{f['field']}: {f['reason']}" for f in fields), "fields": fields}, status=409)
        except web.HTTPException as exc:
            if exc.status >= 400:
                allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None  # a 405 names the methods
                resp = web.json_response({"error": exc.reason, "fields": []}, status=exc.status, headers=allow)
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
        unknown = sorted(set(inst.ports) - {p.name for p in svc.ports})
        if unknown:  # valid on its own, at odds with the service as stored
            known = ", ".join(p.name for p in svc.ports)
            raise ApiError(409, f"ports.{unknown[0]}: service {svc.key} has no port named {unknown[0]!r} (has: {known})",
                           [{"field": f"ports.{u}", "reason": f"the service has no such port (has: {known})"} for u in unknown])
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
        return web.json_response(xds.proxies())

    async def openapi(request: web.Request) -> web.Response:
        return web.json_response(openapi_document(token=bool(s.token), routes=routes))

    async def metrics_text(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8")

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "ports": dict(ports or {})})

    async def create_token(request: web.Request) -> web.Response:
        body = _validate(TokenIn, await json_body(request))
        issued = tokens.create(Scope.named(body.scope), body.description, body.ttl_s)
        log.info("event=access_token_created id=%s scope=%s", issued.token.id, body.scope)
        return web.json_response({**issued.token.public(tokens.now()), "secret": issued.secret}, status=201)

    async def list_tokens(request: web.Request) -> web.Response:
        now = tokens.now()
        return web.json_response([t.public(now) for t in tokens.list()])

    async def revoke_token(request: web.Request) -> web.Response:
        token_id = request.match_info["id"]
        if token_id == BOOTSTRAP_ID:
            raise ApiError(400, "id: the bootstrap token lives in the settings (token, token_file); change it there",
                           [{"field": "id", "reason": "the bootstrap token cannot be revoked here"}])
        token = tokens.revoke(token_id)
        if token is None:
            raise ApiError(404, f"id: no access token {token_id!r}", [{"field": "id", "reason": "not found"}])
        log.info("event=access_token_revoked id=%s scope=%s", token.id, token.scope.name)
        return web.json_response(token.public(tokens.now()))

    async def inject(request: web.Request) -> web.Response:
        body = _validate(InjectIn, await json_body(request))
        msg = _message_for(body.type_url)
        try:
            json_format.ParseDict(body.resource, msg)
        except json_format.ParseError as exc:
            raise ApiError(400, f"resource: {exc}", [{"field": "resource", "reason": str(exc)}]) from None
        assert put_by_hand is not None
        put_by_hand(body.type_url, body.name, msg, body.scope)
        return web.json_response({"injected": body.name}, status=201)

    async def uninject(request: web.Request) -> web.Response:
        assert put_by_hand is not None
        put_by_hand(request.query.get("type_url", ""), request.query.get("name", ""), None, request.query.get("scope", ""))
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
    r.add_post("/v1/access/tokens", create_token)
    r.add_get("/v1/access/tokens", list_tokens)
    r.add_delete("/v1/access/tokens/{id}", revoke_token)
    if s.debug_api and put_by_hand is not None:
        r.add_post("/v1/debug/resources", inject)
        r.add_delete("/v1/debug/resources", uninject)
    for route in routes:
        r.add_route(route.method, route.path, route.handler)
    return app


def _message_for(type_url: str) -> Any:
    from google.protobuf import symbol_database

    name = type_url.rsplit("/", 1)[-1]
    try:
        return symbol_database.Default().GetSymbol(name)()
    except KeyError:
        raise ApiError(400, f"type_url: unknown message type {name!r}", [{"field": "type_url", "reason": "unknown"}]) from None


_PATH_PARAM = re.compile(r"\{(\w+)\}")

# What the model's validators check, stated in JSON Schema for the document: names in any case,
# surrounded by any white space the model strips (Unicode White_Space, which is not the regular
# expressions' \s); tests/unit/test_openapi.py holds these to the validators.
WS = r"\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
LABEL = rf"^[{WS}]*[A-Za-z0-9]([-A-Za-z0-9]{{0,61}}[A-Za-z0-9])?[{WS}]*$"
PORT_NAME = rf"^[{WS}]*[A-Za-z0-9]([-A-Za-z0-9]{{0,13}}[A-Za-z0-9])?[{WS}]*$"
INSTANCE_ID = rf"^[{WS}]*[A-Za-z0-9][A-Za-z0-9_.:@/-]{{0,252}}[{WS}]*$"
API_PATH = rf"^[{WS}]*/[^{WS}]*[{WS}]*$"
STRING_MAP: dict[str, Any] = {
    "type": "object", "maxProperties": 64, "propertyNames": {"pattern": f"[^{WS}]", "maxLength": 128},
    "additionalProperties": {"type": "string", "maxLength": 512},
}
UNIQUE_PORTS = "port names and port numbers are unique"


def openapi_document(token: bool = False, routes: Sequence[Route] = ()) -> dict[str, Any]:
    """The management API as OpenAPI 3.1: every route with its path and query parameters, its
    bodies, every status it answers and the token scope it needs (``x-meshpilot-scope``; ``token``:
    authorisation is on, so every operation but the open ones needs a bearer token); ``routes``: the
    routes it was given besides its own."""
    schemas: dict[str, Any] = {}

    def ref(model: type[BaseModel], mode: str = "validation", name: str | None = None) -> dict[str, str]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)  # type: ignore[arg-type]
        for sub_name, sub in schema.pop("$defs", {}).items():
            schemas.setdefault(sub_name, sub)
        name = name or model.__name__
        schemas[name] = schema
        return {"$ref": f"#/components/schemas/{name}"}

    def json_content(schema: dict[str, Any]) -> dict[str, Any]:
        return {"application/json": {"schema": schema}}

    schemas["Error"] = {
        "type": "object",
        "required": ["error", "fields"],
        "properties": {
            "error": {"type": "string"},
            "fields": {
                "type": "array",
                "items": {"type": "object", "required": ["field", "reason"], "properties": {"field": {"type": "string"}, "reason": {"type": "string"}}},
            },
        },
    }
    err = {"$ref": "#/components/schemas/Error"}
    reasons = {"400": "invalid request (the fields name what)", "401": "no valid bearer token (missing, unknown, revoked or expired)",
               "403": "the token's scope is below what the operation needs",
               "404": "no such resource", "409": "conflicts with what is stored", "413": "body too large",
               "429": "too many at once: try again (the error says what waited)",
               "502": "another system the answer needs gave none", "503": "not available now or not configured (the error says which)",
               "504": "another system the answer needs did not answer in time"}
    labelled = ("/v1/services/", "/v1/policies/")  # services and policies are named by DNS labels

    def body_schema(body: type[BaseModel] | dict[str, Any]) -> dict[str, Any]:
        if not isinstance(body, dict):
            return ref(body)
        body = dict(body)  # a JSON schema whose $defs are referred to as components
        for sub_name, sub in body.pop("$defs", {}).items():
            schemas.setdefault(sub_name, sub)
        return body

    def op(method: str, path: str, summary: str, body: type[BaseModel] | dict[str, Any] | None = None,
           out: dict[str, Any] | None = None, query: tuple[str, ...] = (), codes: tuple[str, ...] | None = None,
           declared: RouteScope | None = None, more: tuple[str, ...] = ()) -> dict[str, Any]:
        write = method not in ("get", "head")
        need = required_scope(method, path, declared)
        ok: dict[str, Any] = {"description": "OK"}
        if out is not None:
            ok["content"] = json_content(out)
        if codes is None:  # creates answer 201, create-or-replace 200 or 201
            codes = {"post": ("201",), "put": ("200", "201")}.get(method, ("200",))
        errors = ["400"] if write or query else []
        if token and need is not None:
            errors.append("401")
            if need > Scope.read:
                errors.append("403")
        if _PATH_PARAM.search(path):
            errors.append("404")
        if write:
            errors.append("409")
        if body is not None:
            errors.append("413")
        errors += [c for c in more if c not in errors]
        o: dict[str, Any] = {
            "summary": summary,
            "x-meshpilot-scope": "open" if need is None else need.name,
            "responses": {**{c: ok for c in codes}, **{c: {"description": reasons[c], "content": json_content(err)} for c in errors}},
        }
        params = [{"name": n, "in": "path", "required": True,
                   "schema": {"type": "string", "pattern": LABEL} if n in ("namespace", "name") and path.startswith(labelled) else {"type": "string"}}
                  for n in _PATH_PARAM.findall(path)]
        params += [{"name": n, "in": "query", "required": False, "schema": {"type": "string"}} for n in query]
        if params:
            o["parameters"] = params
        if body is not None:
            o["requestBody"] = {"required": True, "content": json_content(body_schema(body))}
        if token and need is not None:
            o["security"] = [{"bearer": []}]
        return o

    # bodies: the models' schemas with what their validators check
    service_in = ref(Service, name="ServiceIn")
    schemas["ServiceIn"]["properties"].pop("vip")  # allocated by the control plane
    schemas["ServiceIn"]["properties"].update(name={"type": "string", "pattern": LABEL}, namespace={"type": "string", "pattern": LABEL, "default": "default"},
                                              labels=STRING_MAP)
    schemas["ServiceIn"]["properties"]["ports"]["description"] = UNIQUE_PORTS
    schemas["ServicePort"]["properties"]["name"] = {"type": "string", "pattern": PORT_NAME}
    schemas["ApiOperation"]["properties"]["path"]["pattern"] = API_PATH
    service_put = {**schemas["ServiceIn"], "properties": {**schemas["ServiceIn"]["properties"], "name": {"description": "ignored: the URL names the service"},
                                                          "namespace": {"description": "ignored: the URL names the namespace"}}, "required": ["ports"]}
    schemas["ServicePut"] = service_put
    instance_in = ref(InstanceIn)
    schemas["InstanceIn"]["properties"].update(
        id={"type": "string", "pattern": INSTANCE_ID},
        address={"type": "string", "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]},
        ports={"type": "object", "minProperties": 1, "propertyNames": {"pattern": PORT_NAME},
               "additionalProperties": {"type": "integer", "minimum": 1, "maximum": 65535},
               "description": "a port for each named port of the service (another name is a 409)"},
        labels=STRING_MAP, metadata=STRING_MAP,
    )
    # answers
    svc = ref(Service, "serialization", "ServiceOut")
    inst_schema = Instance.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
    for sub_name, sub in inst_schema.pop("$defs", {}).items():
        schemas.setdefault(sub_name, sub)
    inst_schema["properties"].update(health={"$ref": "#/components/schemas/CheckStatus"}, routable={"type": "boolean"})
    inst_schema["required"] = sorted({*inst_schema.get("required", []), "health", "routable"})
    schemas["InstanceOut"] = inst_schema
    inst = {"$ref": "#/components/schemas/InstanceOut"}
    schemas["ServiceOut"]["properties"]["instances"] = {"type": "array", "items": inst}  # only when one service is read
    one = ("200",)
    schemas["AccessToken"] = {
        "type": "object", "required": ["id", "scope", "description", "created", "expires", "expired"],
        "properties": {"id": {"type": "string"}, "scope": {"enum": ["read", "write", "admin"]}, "description": {"type": "string"},
                       "created": {"type": "number", "description": "unix time"},
                       "expires": {"type": ["number", "null"], "description": "unix time; null: until revoked"}, "expired": {"type": "boolean"}},
    }
    schemas["AccessTokenCreated"] = {
        "allOf": [{"$ref": "#/components/schemas/AccessToken"},
                  {"type": "object", "required": ["secret"], "properties": {"secret": {"type": "string", "description": "shown this once"}}}],
    }
    access_token = {"$ref": "#/components/schemas/AccessToken"}
    own: list[tuple[str, str, str, type[BaseModel] | dict[str, Any] | None, dict[str, Any], tuple[str, ...], tuple[str, ...] | None]] = [
        ("get", "/v1/services", "List services", None, {"type": "array", "items": svc}, ("namespace",), None),
        ("post", "/v1/services", "Create a service (its virtual IP is allocated)", service_in, svc, (), None),
        ("get", "/v1/services/{namespace}/{name}", "Get a service and its instances", None, svc, (), None),
        ("put", "/v1/services/{namespace}/{name}", "Create or replace a service", {"$ref": "#/components/schemas/ServicePut"}, svc, (), None),
        ("delete", "/v1/services/{namespace}/{name}", "Delete a service and its instances", None, svc, (), None),
        ("get", "/v1/services/{namespace}/{name}/instances", "List a service's instances", None, {"type": "array", "items": inst}, (), None),
        ("post", "/v1/services/{namespace}/{name}/instances", "Register an instance", instance_in, inst, (), None),
        ("get", "/v1/instances", "List all instances", None, {"type": "array", "items": inst}, (), None),
        ("get", "/v1/instances/{id}", "Get an instance", None, inst, (), None),
        ("delete", "/v1/instances/{id}", "Deregister an instance (source: only if registered by it)", None, inst, ("source",), None),
        ("put", "/v1/instances/{id}/health", "Set a health check owned by the API", HealthIn, inst, (), one),
        ("put", "/v1/instances/{id}/maintenance", "Enter or leave maintenance", MaintenanceIn, inst, (), one),
        ("get", "/v1/proxies", "Connected Envoys: streams, subscriptions, ACKed versions, last NACK", None,
         {"type": "array", "items": {"type": "object"}}, (), None),
        ("post", "/v1/access/tokens", "Create an access token (its secret is shown this once)", TokenIn,
         {"$ref": "#/components/schemas/AccessTokenCreated"}, (), None),
        ("get", "/v1/access/tokens", "List access tokens (never their secrets)", None, {"type": "array", "items": access_token}, (), None),
        ("delete", "/v1/access/tokens/{id}", "Revoke an access token: refused from the next request on", None, access_token, (), None),
    ]
    paths: dict[str, Any] = {}
    for method, path, summary, body, out, query, codes in own:
        paths.setdefault(path, {})[method] = op(method, path, summary, body, out, query, codes)
    paths["/metrics"] = {"get": {"summary": "Prometheus metrics", "x-meshpilot-scope": "open",
                                 "responses": {"200": {"description": "text exposition format"}}}}
    # a path with a body per value of its first parameter is documented once per value, all its methods
    per_value = {route.path: list(route.body) for route in routes if isinstance(route.body, dict)}
    for route in routes:
        m = route.method.lower()
        if route.path not in per_value:
            paths.setdefault(route.path, {})[m] = op(m, route.path, route.summary, route.body, declared=route.scope, more=route.errors)
            continue
        for value in per_value[route.path]:
            concrete = _PATH_PARAM.sub(value, route.path, count=1)
            per = route.body.get(value) if isinstance(route.body, dict) else route.body
            paths.setdefault(concrete, {})[m] = op(m, concrete, f"{route.summary} ({value})", per, declared=route.scope, more=route.errors)
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "meshpilot management API", "version": "1"},
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if token:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc
