"""The policy surface of the management API: ``/v1/policies/{kind}[/{namespace}/{name}]``.

Create (POST), list (GET), get, create-or-replace (PUT) and delete, for every registered kind.
Bodies are validated by the kind (field-level 400s, the registry unchanged); a second policy of an
exclusive kind for the same service is a 409 naming the field. The registry's ``policies``
documents are the only copy: reads come from there, so a write is visible at once, and the
control plane translates it within one debounce.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from meshpilot.api import app as api_app
from meshpilot.api.app import ApiError, json_body
from meshpilot.api.routes import Route
from meshpilot.model import field_errors
from meshpilot.policy._operations import operation_problems
from meshpilot.policy.kinds import PolicyBase, PolicyInvalid, PolicyKind, get_kind, kinds, parse_key, policy_key
from meshpilot.registry import Registry

__all__ = ["policy_routes"]


def _kind(request: web.Request) -> PolicyKind:
    name = request.match_info["kind"]
    kind = get_kind(name)
    if kind is None:
        known = ", ".join(k.name for k in kinds())
        raise ApiError(404, f"kind: no policy kind {name!r} (kinds: {known})", [{"field": "kind", "reason": f"unknown; kinds: {known}"}])
    return kind


def _invalid(exc: PolicyInvalid) -> ApiError:
    return ApiError(400, str(exc), exc.fields)


class _Handlers:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def _stored(self, kind: PolicyKind) -> list[tuple[str, Any]]:
        return [(k, doc) for k, doc in self.registry.documents("policies") if k.startswith(kind.name + "/")]

    def _conflict(self, kind: PolicyKind, policy: PolicyBase) -> None:
        if not kind.exclusive:
            return
        mine = policy.target_services()
        for key, doc in self._stored(kind):
            if key == policy.key:
                continue
            try:
                other = kind.validate(doc)
            except PolicyInvalid:
                continue
            clash = mine & other.target_services()
            if clash:
                field = "service" if "service" in type(policy).model_fields else "(body)"
                raise ApiError(
                    409,
                    f"{field}: {kind.name} {other.namespace}/{other.name} already governs {sorted(clash)[0]}",
                    [{"field": field, "reason": f"already governed by {kind.name} {other.namespace}/{other.name}"}],
                )

    def _write(self, kind: PolicyKind, policy: PolicyBase) -> dict[str, Any]:
        problems = operation_problems(policy, self.registry)  # catalog operations the service must have now
        if problems:
            raise _invalid(PolicyInvalid(problems))
        self._conflict(kind, policy)
        doc = kind.document(policy)
        targets = sorted(policy.target_services())
        self.registry.put_document("policies", policy.key, doc, service=targets[0] if targets else "")
        return doc

    def _get(self, kind: PolicyKind, request: web.Request) -> tuple[str, Any]:
        ns, name = request.match_info["namespace"].lower(), request.match_info["name"].lower()
        key = policy_key(kind.name, ns, name)
        doc = self.registry.store.get("policies", key)
        if doc is None:
            raise ApiError(404, f"name: no {kind.name} {ns}/{name}", [{"field": "name", "reason": "not found"}])
        return key, doc

    async def list_all(self, request: web.Request) -> web.Response:
        ns = request.query.get("namespace")
        out = []
        for key, doc in self.registry.documents("policies"):
            parsed = parse_key(key)
            if parsed is not None and (ns is None or parsed[1] == ns):
                out.append(doc)
        return web.json_response(out)

    async def list(self, request: web.Request) -> web.Response:
        kind = _kind(request)
        ns = request.query.get("namespace")
        out = [doc for key, doc in self._stored(kind) if ns is None or key.split("/")[1] == ns]
        return web.json_response(out)

    async def create(self, request: web.Request) -> web.Response:
        kind = _kind(request)
        try:
            policy = _strict(kind, await json_body(request))
        except PolicyInvalid as exc:
            raise _invalid(exc) from None
        if self.registry.store.get("policies", policy.key) is not None:
            raise ApiError(409, f"name: {kind.name} {policy.namespace}/{policy.name} already exists", [{"field": "name", "reason": "already exists"}])
        return web.json_response(self._write(kind, policy), status=201)

    async def get(self, request: web.Request) -> web.Response:
        _key, doc = self._get(_kind(request), request)
        return web.json_response(doc)

    async def put(self, request: web.Request) -> web.Response:
        kind = _kind(request)
        data = await json_body(request)
        if not isinstance(data, dict):
            raise ApiError(400, "body: must be a JSON object", [{"field": "(body)", "reason": "not an object"}])
        ns, name = request.match_info["namespace"].lower(), request.match_info["name"].lower()
        for field, want in (("name", name), ("namespace", ns)):
            if field in data and str(data[field]).lower() != want:
                raise ApiError(400, f"{field}: {data[field]!r} does not match the URL ({want!r})", [{"field": field, "reason": "does not match the URL"}])
        try:
            policy = _strict(kind, {**data, "name": name, "namespace": ns})
        except PolicyInvalid as exc:
            raise _invalid(exc) from None
        existed = self.registry.store.get("policies", policy.key) is not None
        return web.json_response(self._write(kind, policy), status=200 if existed else 201)

    async def delete(self, request: web.Request) -> web.Response:
        kind = _kind(request)
        key, doc = self._get(kind, request)
        service = ""
        try:
            targets = sorted(kind.validate(doc).target_services())
            service = targets[0] if targets else ""
        except PolicyInvalid:
            pass
        self.registry.delete_document("policies", key, service=service)
        return web.json_response(doc)


def policy_routes(registry: Registry) -> list[Route]:
    """The policy routes of the management API."""
    h = _Handlers(registry)
    return [
        Route("GET", "/v1/policies", h.list_all, "List policies of every kind"),
        Route("GET", "/v1/policies/{kind}", h.list, "List policies of a kind (RoutingPolicy, ...)"),
        Route("POST", "/v1/policies/{kind}", h.create, "Create a policy", _body_schemas(put=False)),
        Route("GET", "/v1/policies/{kind}/{namespace}/{name}", h.get, "Get a policy"),
        Route("PUT", "/v1/policies/{kind}/{namespace}/{name}", h.put, "Create or replace a policy", _body_schemas(put=True)),
        Route("DELETE", "/v1/policies/{kind}/{namespace}/{name}", h.delete, "Delete a policy"),
    ]


def _body_schemas(put: bool) -> dict[str, Any]:
    """Each kind's body as /openapi.json shows it, under the kind's own path: the model, with the
    DNS labels its validators check, an optional ``kind``, and (PUT) without the name and
    namespace, which the URL gives."""
    out = {}
    for kind in kinds():
        schema = kind.model.model_json_schema(ref_template="#/components/schemas/{model}")
        props = schema["properties"]
        for field in ("name", "namespace", "service", "port"):
            if field in props:
                props[field] = _labelled(props[field])
        props["kind"] = {"enum": sorted({kind.name, kind.name.lower(), *kind.aliases}), "description": "optional: the URL names the kind"}
        if put:
            for field in ("name", "namespace"):
                props.pop(field)
            schema["required"] = [f for f in schema.get("required", []) if f not in ("name", "namespace")]
        out[kind.name] = schema
    return out


def _labelled(prop: dict[str, Any]) -> dict[str, Any]:
    if prop.get("type") == "string":
        return {**prop, "pattern": api_app.LABEL}
    if "anyOf" in prop:
        return {**prop, "anyOf": [_labelled(p) for p in prop["anyOf"]]}
    return prop


def _strict(kind: PolicyKind, data: Any) -> PolicyBase:
    """``kind.validate`` of a JSON body, typed as JSON is: ``"5"`` or ``true`` is not a number."""
    body = {k: v for k, v in data.items() if k != "kind"} if isinstance(data, dict) else data
    try:
        kind.model.model_validate_json(json.dumps(body), strict=True)
    except ValidationError as exc:
        raise PolicyInvalid(field_errors(exc)) from None
    return kind.validate(data)
