"""The console's part of the management API: its files are served open with a strict
Content-Security-Policy, hold no inline script and never build HTML from strings; the policy-text
conversion needs a token and refuses bad text naming ``text``; the data stays behind the API's tokens."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpilot.api.app import ApiError
from meshpilot.console import plugin as console
from meshpilot.controlplane import ControlPlane
from meshpilot.settings import Settings

TOKEN = "console-unit-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STATIC = resources.files("meshpilot.console").joinpath("static")


async def _client(tmp: Path) -> tuple[ControlPlane, TestClient]:
    cp = ControlPlane(Settings(store=f"sqlite:{tmp / 'db.sqlite'}", token=TOKEN))
    cp.include(console.install(cp))
    client = TestClient(TestServer(cp.api_app()))
    await client.start_server()
    return cp, client


@pytest.fixture
async def client(tmp_path: Path):  # type: ignore[no-untyped-def]
    cp, c = await _client(tmp_path)
    try:
        yield c
    finally:
        await c.close()
        cp.registry.store.close()


def _asset_names() -> list[str]:
    return sorted(p.name for p in STATIC.iterdir() if p.name.endswith((".html", ".js", ".css")))


def test_the_console_ships_its_page_scripts_and_style() -> None:
    names = _asset_names()
    for want in ("index.html", "app.js", "api.js", "console.css", "services.js", "proxies.js", "policies.js"):
        assert want in names, f"expected {want} among the console's files, got {names}"


async def test_every_file_is_served_without_a_token_with_a_strict_csp(client: TestClient) -> None:
    for name in ["", *_asset_names()]:
        resp = await client.get(f"/ui/{name}")
        body = await resp.read()
        assert resp.status == 200, f"expected /ui/{name} to be served without a token, got {resp.status}: {body[:200]!r}"
        csp = resp.headers.get("Content-Security-Policy", "")
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp, \
            f"expected a strict CSP on /ui/{name}, got {csp!r}"
        assert resp.headers.get("X-Content-Type-Options") == "nosniff", f"expected nosniff on /ui/{name}, got {dict(resp.headers)}"
        want = {"": "text/html", ".js": "text/javascript", ".css": "text/css", ".html": "text/html"}[Path(name).suffix]
        assert resp.content_type == want, f"expected /ui/{name} as {want}, got {resp.content_type}"


async def test_ui_without_the_slash_is_the_same_page(client: TestClient) -> None:
    resp = await client.get("/ui", allow_redirects=False)
    body = await resp.text()
    assert resp.status == 200 and "/ui/app.js" in body, f"expected the console's page at /ui, got {resp.status}: {body[:200]}"
    assert "default-src 'self'" in resp.headers.get("Content-Security-Policy", ""), f"expected the CSP at /ui, got {dict(resp.headers)}"


async def test_unknown_files_are_404_and_nothing_outside_static_is_served(client: TestClient) -> None:
    for path in ("/ui/nope.js", "/ui/plugin.py", "/ui/..%2Fplugin.py", "/ui/%2E%2E%2F__init__.py", "/ui/static"):
        resp = await client.get(path)
        text = await resp.text()
        assert resp.status == 404, f"expected 404 for {path}, got {resp.status}: {text[:200]}"
        assert "import" not in text, f"expected no source code from {path}, got {text[:200]}"


async def test_data_stays_behind_the_token(client: TestClient) -> None:
    for method, path in (("GET", "/v1/services"), ("GET", "/v1/proxies"), ("GET", "/v1/policies"), ("GET", "/ui/api/kinds"),
                         ("POST", "/ui/api/convert")):
        resp = await client.request(method, path, json={"text": "a: 1"} if method == "POST" else None)
        data = await resp.json()
        assert resp.status == 401, f"expected {method} {path} without a token to be 401, got {resp.status}: {data}"
        assert resp.headers.get("WWW-Authenticate", "").startswith("Bearer"), f"expected a Bearer challenge, got {dict(resp.headers)}"


async def test_convert_reads_yaml_and_json_and_renders_either(client: TestClient) -> None:
    text = "kind: RoutingPolicy\nname: split\nroutes:\n  - destinations:\n      - {subset: v1, weight: 90}\n"
    resp = await client.post("/ui/api/convert", json={"text": text, "format": "yaml", "to": "json"}, headers=AUTH)
    data = await resp.json()
    assert resp.status == 201 and data["error"] is None, f"expected 201 (as /openapi.json documents a POST), got {resp.status}: {data}"
    want = {"kind": "RoutingPolicy", "name": "split", "routes": [{"destinations": [{"subset": "v1", "weight": 90}]}]}
    assert data["document"] == want, f"expected {want}, got {data['document']}"
    assert '"weight": 90' in data["text"], f"expected JSON text, got {data['text']!r}"
    resp = await client.post("/ui/api/convert", json={"text": data["text"], "format": "json", "to": "yaml", "sort_keys": True}, headers=AUTH)
    back = await resp.json()
    assert resp.status == 201 and back["document"] == want, f"expected the same document back, got {resp.status}: {back}"
    assert back["text"].startswith("kind: RoutingPolicy\nname: split\n"), f"expected sorted YAML, got {back['text']!r}"


@pytest.mark.parametrize("body,reason", [
    ({"text": "a: [1, 2\n", "format": "yaml"}, "line 2"),
    ({"text": "{not json", "format": "json"}, "not valid JSON"),
    ({"text": "a: &x [1]\nb: *x\n"}, "YAML alias"),
    ({"text": "a: " + "[" * 80 + "]" * 80 + "\n"}, "too deep"),
    ({"text": "   \n"}, "empty"),
    ({"text": "rate: .nan\n"}, "NaN or infinity"),
    ({"text": "a: !!python/object:os.system {}\n"}, "not valid YAML"),
])
async def test_text_that_cannot_be_read_is_answered_naming_text(client: TestClient, body: dict[str, object], reason: str) -> None:
    resp = await client.post("/ui/api/convert", json=body, headers=AUTH)
    data = await resp.json()
    assert resp.status == 201, f"expected the verdict on {body} as the answer (201), got {resp.status}: {data}"
    fields = {f["field"]: f["reason"] for f in data["fields"]}
    assert data["document"] is None and "text" in fields and reason in fields["text"] and data["error"].startswith("text: "), \
        f"expected text named with {reason!r} and no document, got {data}"


@pytest.mark.parametrize("body,field", [
    ({"text": "a: 1", "format": "toml"}, "format"),
    ({"text": "a: 1", "colour": "red"}, "colour"),
    ({"text": 5}, "text"),
    ({"format": "yaml"}, "text"),
    ({"text": "a" * (console.MAX_TEXT + 1)}, "text"),
])
async def test_a_request_of_the_wrong_shape_is_refused_naming_the_field(client: TestClient, body: dict[str, object], field: str) -> None:
    resp = await client.post("/ui/api/convert", json=body, headers=AUTH)
    data = await resp.json()
    assert resp.status == 400, f"expected 400 for {str(body)[:80]}, got {resp.status}: {str(data)[:300]}"
    assert field in [f["field"] for f in data["fields"]], f"expected field {field!r} named, got {str(data)[:300]}"


async def test_openapi_lists_the_console_routes_with_their_scopes(client: TestClient) -> None:
    doc = await (await client.get("/openapi.json", headers=AUTH)).json()
    paths = ("/ui", "/ui/", "/ui/{asset}", "/ui/api/kinds", "/ui/api/convert")
    got = {p: {m: op["x-meshpilot-scope"] for m, op in doc["paths"].get(p, {}).items()} for p in paths}
    assert got == {"/ui": {"get": "open"}, "/ui/": {"get": "open"}, "/ui/{asset}": {"get": "open"}, "/ui/api/kinds": {"get": "read"}, "/ui/api/convert": {"post": "read"}}, \
        f"expected the console's routes documented with their scopes, got {got}"


async def test_kinds_lists_every_policy_kind_with_a_template(client: TestClient) -> None:
    resp = await client.get("/ui/api/kinds", headers=AUTH)
    data = await resp.json()
    assert resp.status == 200, f"expected 200, got {resp.status}: {data}"
    by_name = {k["name"]: k for k in data}
    assert {"RoutingPolicy", "RateLimitPolicy", "MtlsPolicy"} <= set(by_name), f"expected the policy kinds, got {sorted(by_name)}"
    limit = by_name["RateLimitPolicy"]["template"]
    assert limit == {"kind": "RateLimitPolicy", "name": "", "namespace": "default", "service": "", "burst": 0}, \
        f"expected the identity and required fields with empty values, got {limit}"
    assert by_name["RoutingPolicy"]["exclusive"] is True and "routing" in by_name["RoutingPolicy"]["aliases"], f"got {by_name['RoutingPolicy']}"


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.handlers: list[str] = []
        self.styles: int = 0
        self._in_script = False
        self.inline: str = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "script":
            self.scripts.append(a)
            self._in_script = True
        if tag == "style":
            self.styles += 1
        self.handlers += [f"{tag} {k}" for k in a if k.startswith("on") or k == "style"]

    def handle_endtag(self, tag: str) -> None:
        self._in_script = self._in_script and tag != "script"

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.inline += data.strip()


def test_the_page_has_no_inline_script_or_style() -> None:
    tags = _Tags()
    tags.feed(STATIC.joinpath("index.html").read_text())
    assert tags.scripts and all(s.get("src", "").startswith("/ui/") for s in tags.scripts), f"expected only scripts from /ui/, got {tags.scripts}"
    assert tags.inline == "" and tags.styles == 0 and tags.handlers == [], \
        f"expected no inline script, style or handler, got {tags.inline!r}, {tags.styles} styles, {tags.handlers}"


def test_no_script_builds_html_from_strings_or_loads_from_elsewhere() -> None:
    sinks = re.compile(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function|setAttribute\(\s*['\"]on")
    remote = re.compile(r"https?://|//cdn|import\(\s*['\"]http")
    for name in _asset_names():
        text = STATIC.joinpath(name).read_text()
        assert not sinks.search(text), f"expected {name} to set text only, found {sinks.search(text).group(0)!r}"  # type: ignore[union-attr]
        assert not remote.search(text), f"expected {name} to load nothing from elsewhere, found {remote.search(text).group(0)!r}"  # type: ignore[union-attr]


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**53), max_value=2**53) | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False, width=32),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200), fmt=st.sampled_from(["yaml", "json"]))
def test_any_text_is_read_or_refused_naming_text(text: str, fmt: str) -> None:
    try:
        doc = console.parse_text(text, fmt)
    except ApiError as exc:
        assert exc.status == 400 and [f["field"] for f in exc.fields] == ["text"], f"expected a 400 naming text, got {exc.status} {exc.fields}"
        return
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc, f"expected a JSON document from {text!r}, got {doc!r}"


@settings(max_examples=300, deadline=None)
@given(doc=_json_values, fmt=st.sampled_from(["yaml", "json"]), sort_keys=st.booleans())
def test_a_rendered_document_reads_back_as_itself(doc: object, fmt: str, sort_keys: bool) -> None:
    text = console.render_text(doc, fmt, sort_keys)
    if doc is None and fmt == "yaml":
        return  # YAML writes null as an empty document, which is refused as empty text
    back = console.parse_text(text, fmt)
    assert back == doc, f"expected {doc!r} back from its {fmt} text {text!r}, got {back!r}"
