"""From an OpenAPI 3.0/3.1 document to a service's normalised operations, and what changed between two.

This is the pure core of the API catalog (DESIGN.md: a Service has an optional API list of OpenAPI
operations): bytes in (JSON or YAML, as a Spring app's springdoc ``/v3/api-docs`` serves them or an
operator uploads them), a ``Spec`` out, or a ``DocumentError`` naming the field and the reason. No
I/O: the routes read and fetch bodies, versions.py stores the results. An operation keeps what an
operator and the policy selectors need (operationId, method, the full path template, summary, tags,
parameters, deprecated, request media types, response codes), never schemas; its identity is the
method and the path template with parameter names blanked (``GET /orders/{}``), so renaming a path
parameter or an operationId is a change of that operation, not a removal and an addition.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml

from meshpilot import boundedjson

__all__ = [
    "MAX_DOCUMENT_BYTES", "MAX_OPERATIONS", "DocumentError", "Operation", "Spec", "diff", "load_document", "normalise",
    "operation_key", "operations_sha256", "parse",
]

MAX_DOCUMENT_BYTES = 2 * 1024 * 1024  # springdoc's document for a few hundred operations is well under 1 MiB
MAX_OPERATIONS = 1024  # a Service's apis hold at most this many
MAX_NODES = 2_000_000  # values walked in one document (YAML aliases can make a small text a huge tree)
MAX_DEPTH = 64
_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_VERSION = re.compile(r"^3\.[01]\.\d+(-[0-9A-Za-z.-]+)?$")
_PARAM_IN = ("path", "query", "header", "cookie")
_PARAM = re.compile(r"\{[^{}/]*\}")
_TEXT = 512  # summaries and descriptions longer than this are cut (display only)


class DocumentError(ValueError):
    """The document cannot become a catalog version: ``field`` (a dotted path in the document, or
    ``(body)``) and ``reason``."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Operation:
    """One operation, as the catalog lists it and the policy selectors resolve it."""

    method: str  # upper case
    path: str  # the full path template (the server URL's path prefixed)
    operation_id: str | None = None
    summary: str = ""
    tags: tuple[str, ...] = ()
    parameters: tuple[tuple[str, str, bool, str], ...] = ()  # (in, name, required, schema type), sorted
    deprecated: bool = False
    request_body: tuple[str, ...] = ()  # media types, sorted
    body_required: bool = False
    responses: tuple[str, ...] = ()  # status codes and "default", sorted

    @property
    def key(self) -> str:
        return operation_key(self.method, self.path)

    def as_json(self) -> dict[str, Any]:
        return {
            "operation_id": self.operation_id,
            "method": self.method,
            "path": self.path,
            "summary": self.summary,
            "tags": list(self.tags),
            "parameters": [{"in": i, "name": n, "required": r, "type": t} for i, n, r, t in self.parameters],
            "deprecated": self.deprecated,
            "request_body": {"required": self.body_required, "content": list(self.request_body)} if self.request_body else None,
            "responses": list(self.responses),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Operation:
        body = d.get("request_body") or {}
        return cls(
            method=d["method"], path=d["path"], operation_id=d.get("operation_id"), summary=d.get("summary", ""),
            tags=tuple(d.get("tags", ())),
            parameters=tuple((p["in"], p["name"], bool(p["required"]), p.get("type", "")) for p in d.get("parameters", ())),
            deprecated=bool(d.get("deprecated", False)), request_body=tuple(body.get("content", ())),
            body_required=bool(body.get("required", False)), responses=tuple(d.get("responses", ())),
        )


@dataclass(frozen=True, slots=True)
class Spec:
    """A document's operations (sorted by key) and what it says about itself."""

    operations: tuple[Operation, ...]
    openapi: str
    title: str = ""
    api_version: str = ""
    base_path: str = ""

    @property
    def sha256(self) -> str:
        return operations_sha256(self.operations)


def operation_key(method: str, path: str) -> str:
    """``GET /orders/{}``: the method and the path template with its parameter names blanked."""
    return method.upper() + " " + _PARAM.sub("{}", path)


def operations_sha256(operations: tuple[Operation, ...] | list[Operation]) -> str:
    """sha256 of the normalised operations (canonical JSON, in key order): equal for documents
    that differ only in what the catalog does not keep (schemas, descriptions, key order, format)."""
    ops = sorted(operations, key=lambda o: o.key)
    text = json.dumps([o.as_json() for o in ops], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


# ---- reading bytes ------------------------------------------------------------------------------


def load_document(raw: bytes) -> Any:
    """The document in ``raw``, JSON or YAML (YAML 1.1 safe subset; JSON is tried first)."""
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise DocumentError("(body)", f"the document is {len(raw)} bytes; at most {MAX_DOCUMENT_BYTES} are accepted")
    if not raw.strip():
        raise DocumentError("(body)", "empty: expected an OpenAPI 3 document (JSON or YAML)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DocumentError("(body)", f"not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    doc: Any = None
    json_error = ""
    if text.lstrip().startswith(("{", "[")):
        try:
            doc = boundedjson.loads(text.encode(), MAX_DEPTH)
        except RecursionError:
            raise DocumentError("(body)", f"nested deeper than {MAX_DEPTH} levels") from None
        except boundedjson.TooDeep as exc:
            raise DocumentError("(body)", str(exc)) from None
        except ValueError as exc:
            json_error = f"malformed JSON: {exc}"  # it may still be YAML in flow style ({openapi: 3.0.3, ...})
        else:
            _check_size(doc)
            return doc
    try:
        doc = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is the safe loader
    except RecursionError:
        raise DocumentError("(body)", f"nested deeper than {MAX_DEPTH} levels") from None
    except yaml.YAMLError as exc:
        raise DocumentError("(body)", json_error or f"malformed YAML: {_yaml_reason(exc)}") from None
    _check_size(doc)
    return doc


class _Loader(yaml.CSafeLoader if hasattr(yaml, "CSafeLoader") else yaml.SafeLoader):  # type: ignore[misc]
    pass


# timestamps stay strings (an info.version of 2024-01-01 is text, and JSON has no dates)
_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:timestamp"] for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _yaml_reason(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else str(problem)


def _check_size(doc: Any) -> None:
    """Refuse a document whose tree (aliases expanded, as walking it would) is too big or too deep."""
    seen = 0
    stack: list[tuple[Any, int]] = [(doc, 0)]
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_NODES:
            raise DocumentError("(body)", f"more than {MAX_NODES} values once YAML aliases are expanded")
        if depth > MAX_DEPTH:
            raise DocumentError("(body)", f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
            for k in node:
                if not isinstance(k, (str, int, float, bool)) and k is not None:
                    raise DocumentError("(body)", f"a mapping key must be a scalar, got {type(k).__name__}")
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


# ---- normalising --------------------------------------------------------------------------------


def parse(raw: bytes) -> Spec:
    """``normalise(load_document(raw))``."""
    return normalise(load_document(raw))


def normalise(doc: Any) -> Spec:
    """The operations of an OpenAPI 3.0 or 3.1 document; DocumentError naming the first problem."""
    if not isinstance(doc, dict):
        raise DocumentError("(body)", f"expected an OpenAPI document (a mapping), got {_kind(doc)}")
    if "swagger" in doc:
        # the document's own values are not echoed: an import's errors must not read back what an address served
        raise DocumentError("swagger", "a Swagger document: only OpenAPI 3.0 and 3.1 are read (springdoc serves 3.x at /v3/api-docs)")
    version = doc.get("openapi")
    if not isinstance(version, str):
        shown = " (got a number: quote it)" if isinstance(version, (int, float)) else ""
        raise DocumentError("openapi", f"missing or not a string: expected an OpenAPI version such as 3.0.1 or 3.1.0{shown}")
    if not _VERSION.match(version.strip()):
        raise DocumentError("openapi", "the version is not read: expected 3.0.x or 3.1.x")
    info = doc.get("info")
    if not isinstance(info, dict):
        raise DocumentError("info", "missing or not a mapping (OpenAPI requires info with title and version)")
    base = _base_path(doc)
    paths = doc.get("paths", {})
    if paths is None:
        paths = {}
    if not isinstance(paths, dict):
        raise DocumentError("paths", f"expected a mapping of path templates, got {_kind(paths)}")
    ops: list[Operation] = []
    ids: dict[str, str] = {}
    keys: dict[str, str] = {}
    for template, item in paths.items():
        where = f"paths.{template}"
        if not isinstance(template, str) or not template.startswith("/"):
            raise DocumentError(where, "a path template must start with '/'")
        if template.startswith("/x-"):
            continue
        item = _deref(doc, item, where)
        if not isinstance(item, dict):
            raise DocumentError(where, f"expected a path item (a mapping), got {_kind(item)}")
        full = _join(base, template)
        _check_template(full, where)
        shared = _parameters(doc, item.get("parameters"), f"{where}.parameters")
        for method in _METHODS:
            if method not in item:
                continue
            at = f"{where}.{method}"
            op = _deref(doc, item[method], at)
            if not isinstance(op, dict):
                raise DocumentError(at, f"expected an operation (a mapping), got {_kind(op)}")
            operation = _operation(doc, method, full, op, shared, at)
            if operation.operation_id is not None:
                if operation.operation_id in ids:
                    raise DocumentError(f"{at}.operationId", f"duplicate operationId {operation.operation_id!r} (also {ids[operation.operation_id]})")
                ids[operation.operation_id] = at
            if operation.key in keys:
                raise DocumentError(at, f"the same operation as {keys[operation.key]} ({operation.key}: templates that differ only in parameter names)")
            keys[operation.key] = at
            ops.append(operation)
            if len(ops) > MAX_OPERATIONS:
                raise DocumentError("paths", f"more than {MAX_OPERATIONS} operations")
    ops.sort(key=lambda o: o.key)
    return Spec(
        operations=tuple(ops), openapi=version.strip(), title=_text(info.get("title")), api_version=_text(info.get("version")),
        base_path=base,
    )


def _kind(v: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(type(v), f"a {type(v).__name__}")


def _text(v: Any) -> str:
    if v is None:
        return ""
    s = str(v).strip()
    return s if len(s) <= _TEXT else s[: _TEXT - 1] + "…"


def _base_path(doc: dict[str, Any]) -> str:
    """The path of the first server URL (``https://h/api/v1`` or ``/api/v1``: ``/api/v1``), its
    variables replaced by their defaults; requests go to it plus the operation's path."""
    servers = doc.get("servers")
    if servers is None or servers == []:
        return ""
    if not isinstance(servers, list) or not isinstance(servers[0], dict) or not isinstance(servers[0].get("url"), str):
        raise DocumentError("servers.0.url", "expected a list of servers, each with a url")
    url: str = servers[0]["url"]
    variables = servers[0].get("variables") or {}
    if not isinstance(variables, dict):
        raise DocumentError("servers.0.variables", "expected a mapping")

    def value(m: re.Match[str]) -> str:
        var = variables.get(m.group(1))
        if not isinstance(var, dict) or "default" not in var:
            raise DocumentError("servers.0.variables", f"server variable {m.group(1)!r} has no default")
        return str(var["default"])

    url = re.sub(r"\{([^{}]*)\}", value, url)
    m = re.match(r"^(?:[A-Za-z][A-Za-z0-9+.-]*:)?//[^/?#]*(.*)$", url)
    path = m.group(1) if m else url
    path = path.split("?", 1)[0].split("#", 1)[0]
    if path and not path.startswith("/"):
        path = "/" + path  # a relative server URL ("api/v1") is relative to where the document is served: take it from the root
    return path.rstrip("/")


def _join(base: str, template: str) -> str:
    return (base + template) if base else template


def _check_template(path: str, where: str) -> None:
    if len(path) > 1024:
        raise DocumentError(where, "the path is longer than 1024 characters")
    if any(c.isspace() for c in path) or "?" in path or "#" in path:
        raise DocumentError(where, "a path template has no whitespace, query or fragment")
    depth = 0
    for c in path:
        depth += c == "{"
        depth -= c == "}"
        if depth not in (0, 1):
            raise DocumentError(where, "unbalanced '{' '}' in the path template")
    if depth:
        raise DocumentError(where, "unbalanced '{' '}' in the path template")


def _deref(doc: dict[str, Any], node: Any, where: str, hops: int = 0) -> Any:
    """``node``, or what its local ``$ref`` (``#/components/...``) points to."""
    if not isinstance(node, dict) or "$ref" not in node:
        return node
    ref = node["$ref"]
    if not isinstance(ref, str) or not ref.startswith("#/"):
        raise DocumentError(f"{where}.$ref", f"only local references (#/...) are followed, got {ref!r}")
    if hops > 16:
        raise DocumentError(f"{where}.$ref", "more than 16 references in a row (a loop?)")
    target: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(target, dict) and part in target:
            target = target[part]
        elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
            target = target[int(part)]
        else:
            raise DocumentError(f"{where}.$ref", f"{ref!r} points at nothing in the document")
    return _deref(doc, target, where, hops + 1)


def _parameters(doc: dict[str, Any], params: Any, where: str) -> dict[tuple[str, str], tuple[str, str, bool, str]]:
    if params is None:
        return {}
    if not isinstance(params, list):
        raise DocumentError(where, f"expected a list of parameters, got {_kind(params)}")
    out: dict[tuple[str, str], tuple[str, str, bool, str]] = {}
    for i, raw in enumerate(params):
        at = f"{where}.{i}"
        p = _deref(doc, raw, at)
        if not isinstance(p, dict):
            raise DocumentError(at, f"expected a parameter (a mapping), got {_kind(p)}")
        name, loc = p.get("name"), p.get("in")
        if not isinstance(name, str) or not name:
            raise DocumentError(f"{at}.name", "missing or not a string")
        if loc not in _PARAM_IN:
            raise DocumentError(f"{at}.in", f"expected one of {', '.join(_PARAM_IN)}, got {loc!r}")
        if (loc, name) in out:
            raise DocumentError(at, f"duplicate parameter {name!r} in {loc}")
        required = p.get("required", loc == "path")
        if not isinstance(required, bool):
            raise DocumentError(f"{at}.required", f"expected true or false, got {required!r}")
        out[(loc, name)] = (loc, name[:128], required or loc == "path", _schema_type(doc, p, at))
    return out


def _schema_type(doc: dict[str, Any], p: dict[str, Any], where: str) -> str:
    schema = p.get("schema")
    ref = schema.get("$ref") if isinstance(schema, dict) else None
    if isinstance(ref, str):
        return ref.rsplit("/", 1)[-1][:64]
    if isinstance(schema, dict):
        t = schema.get("type")
        if isinstance(t, list):  # 3.1: ["string", "null"]
            return "|".join(str(x) for x in t)[:64]
        if isinstance(t, str):
            return t[:64]
    return ""


def _operation(doc: dict[str, Any], method: str, path: str, op: dict[str, Any], shared: dict[tuple[str, str], tuple[str, str, bool, str]],
               where: str) -> Operation:
    op_id = op.get("operationId")
    if op_id is not None:
        if not isinstance(op_id, str) or not op_id.strip():
            raise DocumentError(f"{where}.operationId", "must be a non-empty string")
        op_id = op_id.strip()
        if len(op_id) > 128:
            raise DocumentError(f"{where}.operationId", "longer than 128 characters")
    tags = op.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise DocumentError(f"{where}.tags", "expected a list of strings")
    params = dict(shared)
    params.update(_parameters(doc, op.get("parameters"), f"{where}.parameters"))  # an operation's own override the path item's
    names = set(re.findall(r"\{([^{}/]*)\}", path))
    for (loc, name) in params:
        if loc == "path" and name not in names:
            raise DocumentError(f"{where}.parameters", f"path parameter {name!r} is not in the path template {path}")
    deprecated = op.get("deprecated", False)
    if not isinstance(deprecated, bool):
        raise DocumentError(f"{where}.deprecated", f"expected true or false, got {deprecated!r}")
    body_types: tuple[str, ...] = ()
    body_required = False
    if op.get("requestBody") is not None:
        body = _deref(doc, op["requestBody"], f"{where}.requestBody")
        if not isinstance(body, dict):
            raise DocumentError(f"{where}.requestBody", f"expected a mapping, got {_kind(body)}")
        content = body.get("content") or {}
        if not isinstance(content, dict):
            raise DocumentError(f"{where}.requestBody.content", "expected a mapping of media types")
        body_types = tuple(sorted(str(k) for k in content))
        body_required = body.get("required") is True
    responses = op.get("responses") or {}
    if not isinstance(responses, dict):
        raise DocumentError(f"{where}.responses", "expected a mapping of status codes")
    return Operation(
        method=method.upper(), path=path, operation_id=op_id, summary=_text(op.get("summary")), tags=tuple(t[:128] for t in tags),
        parameters=tuple(sorted(params.values())), deprecated=deprecated, request_body=body_types, body_required=body_required,
        responses=tuple(sorted(str(k) for k in responses)),
    )


# ---- comparing ----------------------------------------------------------------------------------


def diff(old: tuple[Operation, ...] | list[Operation], new: tuple[Operation, ...] | list[Operation]) -> dict[str, Any]:
    """What changed from ``old`` to ``new``: operations added, removed (by method + path template)
    and changed, each change naming the fields and their values before and after."""
    a = {o.key: o for o in old}
    b = {o.key: o for o in new}
    changed = []
    for key in sorted(a.keys() & b.keys()):
        fields = dict(_changes(a[key], b[key]))
        if fields:
            changed.append({"key": key, "operation_id": b[key].operation_id, "method": b[key].method, "path": b[key].path, "changes": fields})
    return {
        "added": [b[k].as_json() for k in sorted(b.keys() - a.keys())],
        "removed": [a[k].as_json() for k in sorted(a.keys() - b.keys())],
        "changed": changed,
    }


def _changes(a: Operation, b: Operation) -> Iterator[tuple[str, dict[str, Any]]]:
    ja, jb = a.as_json(), b.as_json()
    for name in ("operation_id", "path", "summary", "tags", "deprecated", "request_body", "responses"):
        if ja[name] != jb[name]:
            yield name, {"from": ja[name], "to": jb[name]}
    pa = {(p["in"], p["name"]): p for p in ja["parameters"]}
    pb = {(p["in"], p["name"]): p for p in jb["parameters"]}
    if pa != pb:
        yield "parameters", {
            "added": [pb[k] for k in sorted(pb.keys() - pa.keys())],
            "removed": [pa[k] for k in sorted(pa.keys() - pb.keys())],
            "changed": [{"in": k[0], "name": k[1], "from": pa[k], "to": pb[k]} for k in sorted(pa.keys() & pb.keys()) if pa[k] != pb[k]],
        }
