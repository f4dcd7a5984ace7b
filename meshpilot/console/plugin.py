"""The console as a part of the control plane: its pages and scripts under ``/ui/`` on the management
port, and the one conversion the browser cannot do well by itself (policy text as YAML or JSON).

The assets are files of this package (``static/``), read once when the part is installed and served
from memory. They hold no data, so they are open like ``/healthz``; every piece of data a page shows
comes from the management API with the user's own bearer token, so a stranger sees the empty shell
and a sign-in form, nothing else. Each UI response carries a strict Content-Security-Policy
(``default-src 'self'``, no inline script or style), which together with pages that only ever set
``textContent`` keeps a value such as ``<img src=x onerror=...>`` from the API as text.

``GET /ui/api/kinds`` (scope read) lists the policy kinds with a template for a new policy of each.
``POST /ui/api/convert`` (scope read) turns policy text from YAML or JSON into a document and
renders a document as YAML or JSON, with pyyaml as the CLI reads policy files; it stores nothing.
Text it cannot read is its answer (``error`` and ``fields`` naming ``text`` with the line and
column, ``document`` null), not a refused request; a request of the wrong shape is a 400. YAML is read
with libyaml's reader when pyyaml has it (about 0.2 s for the largest text, ``MAX_TEXT``, against
1.5 s for the pure-Python one), and reading and rendering run in a worker thread, so a read token's
large text never stalls xDS or the API on the event loop.
"""

from __future__ import annotations

import asyncio
import json
from importlib import resources
from typing import Any, Literal

import yaml
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from meshpilot import boundedjson
from meshpilot.api.app import ApiError, json_body
from meshpilot.api.routes import Route
from meshpilot.model import field_errors
from meshpilot.parts import Core, Part
from meshpilot.policy.kinds import kinds

__all__ = ["CSP", "MAX_TEXT", "install", "parse_text", "render_text"]

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; font-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
MAX_TEXT = 256 * 1024  # a policy's text; the largest real one is a few KB
# libyaml's reader (the C one) when pyyaml was built with it, as the catalog reads OpenAPI documents
_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}  # what pyproject ships as package data
_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class ConvertIn(BaseModel):
    """Policy text to read (``text`` in ``format``) and how to render what it holds (``to``)."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field(max_length=MAX_TEXT)
    format: Literal["yaml", "json"] = "yaml"
    to: Literal["yaml", "json"] = "yaml"
    sort_keys: bool = False


def parse_text(text: str, fmt: str) -> Any:
    """The document ``text`` holds, read as ``fmt`` (YAML or JSON). Raises ApiError(400) naming
    ``text`` with the line and column of the problem; YAML aliases (``*a``) and nesting deeper than
    JSON bodies may have are refused before anything is built from them."""
    if not text.strip():
        raise ApiError(400, "text: empty; write one policy", [{"field": "text", "reason": "empty"}])
    if fmt == "json":
        try:
            doc = boundedjson.loads(text.encode())
        except ValueError as exc:
            raise ApiError(400, f"text: not valid JSON: {exc}", [{"field": "text", "reason": f"not valid JSON: {exc}"}]) from None
    else:
        doc = _read_yaml(text)
    # YAML's dates and other non-JSON scalars become the strings JSON would carry; NaN and infinity
    # (YAML's .nan, JSON's 1e999) have no JSON form
    try:
        return json.loads(json.dumps(doc, default=str, allow_nan=False))
    except ValueError:
        raise ApiError(400, "text: holds a number JSON cannot carry (NaN or infinity, such as .nan or 1e999)",
                       [{"field": "text", "reason": "NaN or infinity"}]) from None


def _read_yaml(text: str) -> Any:
    try:
        depth = 0
        for event in yaml.parse(text, Loader=_YAML_LOADER):
            if isinstance(event, yaml.AliasEvent):
                raise ApiError(400, "text: YAML aliases (*name) are not accepted; write the value out",
                               [{"field": "text", "reason": "YAML alias"}])
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > boundedjson.MAX_DEPTH:
                    raise ApiError(400, f"text: nested deeper than {boundedjson.MAX_DEPTH} levels",
                                   [{"field": "text", "reason": "too deep"}])
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        doc = yaml.load(text, Loader=_YAML_LOADER)  # noqa: S506 - the safe loader (C or pure Python)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ApiError(400, f"text: not valid YAML: {where}{problem}", [{"field": "text", "reason": f"not valid YAML: {where}{problem}"}]) from None
    return doc


def render_text(doc: Any, fmt: str, sort_keys: bool = False) -> str:
    """``doc`` written as ``fmt``: block-style YAML, or JSON indented by two spaces."""
    if fmt == "json":
        return json.dumps(doc, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n"
    text = str(yaml.safe_dump(doc, sort_keys=sort_keys, default_flow_style=False, allow_unicode=True))
    # pyyaml writes YAML's own line breaks (U+0085, U+2028, U+2029) unescaped, and they read back as
    # other text; such a document is written with every non-ASCII character escaped instead
    if any(c in text for c in "\x85\u2028\u2029"):
        text = str(yaml.safe_dump(doc, sort_keys=sort_keys, default_flow_style=False, allow_unicode=False))
    return text


def _verdict(body: ConvertIn) -> dict[str, Any]:
    """The convert answer for ``body``: text that cannot be read is the answer, not a bad request; its
    verdict names the field like a refusal does."""
    try:
        doc = parse_text(body.text, body.format)
    except ApiError as exc:
        return {"document": None, "text": "", "error": exc.error, "fields": exc.fields}
    return {"document": doc, "text": render_text(doc, body.to, body.sort_keys), "error": None, "fields": []}


_PLACEHOLDER: dict[str, Any] = {"string": "", "integer": 0, "number": 0, "boolean": False, "array": [], "object": {}}


def _kind_out(name: str, summary: str, aliases: tuple[str, ...], exclusive: bool, schema: dict[str, Any]) -> dict[str, Any]:
    """A kind as the policies page lists it; ``template``: a new policy's starting text, its
    identity and each required field with an empty value of its type."""
    template: dict[str, Any] = {"kind": name, "name": "", "namespace": "default"}
    props = schema.get("properties", {})
    for field in schema.get("required", []):
        if field not in template:
            template[field] = _PLACEHOLDER.get(str(props.get(field, {}).get("type", "")))
    return {"name": name, "summary": summary, "aliases": sorted(aliases), "exclusive": exclusive, "template": template}


def _assets() -> dict[str, tuple[bytes, str]]:
    """Every file of ``static/`` by name, with its content type."""
    out: dict[str, tuple[bytes, str]] = {}
    for entry in resources.files("meshpilot.console").joinpath("static").iterdir():
        name = entry.name
        ext = name[name.rfind("."):] if "." in name else ""
        if entry.is_file() and ext in _TYPES:
            out[name] = (entry.read_bytes(), _TYPES[ext])
    return out


def install(core: Core) -> Part:
    assets = _assets()
    if "index.html" not in assets:
        raise RuntimeError("the console's assets are missing from the package (meshpilot/console/static/index.html)")

    def _asset(name: str) -> web.Response:
        found = assets.get(name)
        if found is None:
            raise ApiError(404, f"asset: the console has no file {name!r}", [{"field": "asset", "reason": "not found"}])
        body, ctype = found
        return web.Response(body=body, content_type=ctype, charset="utf-8", headers=_HEADERS)

    async def index(request: web.Request) -> web.Response:
        return _asset("index.html")

    async def asset(request: web.Request) -> web.Response:
        return _asset(request.match_info["asset"])

    async def convert(request: web.Request) -> web.Response:
        try:
            body = ConvertIn.model_validate_json(json.dumps(await json_body(request)), strict=True)
        except ValidationError as exc:
            fields = field_errors(exc)
            raise ApiError(400, "; ".join(f"{f['field']}: {f['reason']}" for f in fields), fields) from None
        # off the loop: the largest text takes a noticeable fraction of a second to read and render, and
        # the loop serves xDS meanwhile
        verdict = await asyncio.to_thread(_verdict, body)
        # 201 as /openapi.json documents every POST of a part's routes: a new rendering, made for this request and not stored
        return web.json_response(verdict, status=201, headers=_HEADERS)

    async def policy_kinds(request: web.Request) -> web.Response:
        return web.json_response([_kind_out(k.name, k.summary, k.aliases, k.exclusive, k.model.model_json_schema()) for k in kinds()],
                                 headers=_HEADERS)

    return Part(routes=[
        Route("GET", "/ui/api/kinds", policy_kinds, "The policy kinds the control plane knows, each with a template for a new policy"),
        Route("GET", "/ui", index, "The console (as /ui/)", scope="open"),
        Route("GET", "/ui/", index, "The console (its page; every data call it makes needs a token)", scope="open"),
        Route("GET", "/ui/{asset}", asset, "A file of the console (script, style sheet)", scope="open"),
        Route("POST", "/ui/api/convert", convert, "Read policy text as YAML or JSON and render it as YAML or JSON (stores nothing)",
              ConvertIn, scope="read"),
    ])
