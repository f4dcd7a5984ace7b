"""The API catalog's pure core: reading OpenAPI 3.0/3.1 documents (JSON and YAML) into normalised
operations, refusing bad ones with the field named, the operations' sha256, and the diff between two
versions. Hypothesis throws junk and mutated documents at the parser."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpilot.catalog.openapi import MAX_DOCUMENT_BYTES, MAX_OPERATIONS, DocumentError, Operation, diff, normalise, operations_sha256, parse


def document(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "openapi": "3.0.1",
        "info": {"title": "orders", "version": "v1"},
        "servers": [{"url": "http://localhost:8080", "description": "Generated server url"}],
        "paths": {
            "/orders/{id}": {
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer", "format": "int64"}}],
                "get": {"tags": ["orders"], "summary": "one order", "operationId": "getOrder",
                        "responses": {"200": {"description": "OK", "content": {"*/*": {"schema": {"$ref": "#/components/schemas/Order"}}}}}},
                "delete": {"tags": ["orders"], "operationId": "deleteOrder", "responses": {"204": {"description": "gone"}}},
            },
            "/orders": {
                "get": {"tags": ["orders"], "operationId": "listOrders",
                        "parameters": [{"$ref": "#/components/parameters/Page"}], "responses": {"200": {"description": "OK"}}},
                "post": {"tags": ["orders"], "operationId": "createOrder",
                         "requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Order"}}}, "required": True},
                         "responses": {"201": {"description": "created"}}},
            },
        },
        "components": {
            "schemas": {"Order": {"type": "object", "properties": {"id": {"type": "integer"}}}},
            "parameters": {"Page": {"name": "page", "in": "query", "schema": {"type": "integer"}}},
        },
    }
    doc.update(over)
    return doc


def raw(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def refused(data: bytes) -> DocumentError:
    with pytest.raises(DocumentError) as info:
        spec = parse(data)
        raise AssertionError(f"expected the document to be refused, got {len(spec.operations)} operations")
    return info.value


def test_a_springdoc_document_becomes_its_operations() -> None:
    spec = parse(raw(document()))
    got = {(o.method, o.path): o for o in spec.operations}
    assert sorted(got) == [("DELETE", "/orders/{id}"), ("GET", "/orders"), ("GET", "/orders/{id}"), ("POST", "/orders")], f"expected four operations, got {sorted(got)}"
    get_order = got[("GET", "/orders/{id}")].as_json()
    assert get_order["operation_id"] == "getOrder" and get_order["summary"] == "one order" and get_order["tags"] == ["orders"], f"got {get_order}"
    assert get_order["parameters"] == [{"in": "path", "name": "id", "required": True, "type": "integer"}], f"expected the path item's parameter, got {get_order['parameters']}"
    listed = got[("GET", "/orders")].as_json()
    assert listed["parameters"] == [{"in": "query", "name": "page", "required": False, "type": "integer"}], f"expected the $ref parameter resolved, got {listed}"
    created = got[("POST", "/orders")].as_json()
    assert created["request_body"] == {"required": True, "content": ["application/json"]}, f"got {created['request_body']}"
    assert spec.openapi == "3.0.1" and spec.title == "orders" and spec.api_version == "v1" and spec.base_path == "", f"got {spec}"


def test_yaml_and_json_of_one_document_are_one_version_and_3_1_is_read() -> None:
    doc = document()
    as_yaml = yaml.safe_dump(doc).encode()
    assert parse(as_yaml).sha256 == parse(raw(doc)).sha256, "expected YAML and JSON of one document to have one sha256"
    doc31 = document(openapi="3.1.0")
    doc31["paths"]["/orders"]["get"]["parameters"] = [{"name": "page", "in": "query", "schema": {"type": ["integer", "null"]}}]
    types = [p["type"] for o in parse(raw(doc31)).operations for p in o.as_json()["parameters"] if p["name"] == "page"]
    assert types == ["integer|null"], f"expected a 3.1 type list read, got {types}"


def test_sha256_ignores_what_the_catalog_does_not_keep_and_follows_what_it_does() -> None:
    base = parse(raw(document())).sha256
    noisy = document()
    noisy["components"]["schemas"]["Order"]["properties"]["extra"] = {"type": "string"}
    noisy["info"]["description"] = "now with words"
    assert parse(raw(noisy)).sha256 == base, "expected schemas and descriptions not to change the sha256"
    changed = document()
    changed["paths"]["/orders/{id}"]["get"]["summary"] = "another summary"
    assert parse(raw(changed)).sha256 != base, "expected a new summary to change the sha256"


def test_server_path_prefixes_every_operation() -> None:
    spec = parse(raw(document(servers=[{"url": "https://{host}/api/{v}", "variables": {"host": {"default": "x"}, "v": {"default": "v2"}}}])))
    assert sorted(o.path for o in spec.operations) == ["/api/v2/orders", "/api/v2/orders", "/api/v2/orders/{id}", "/api/v2/orders/{id}"], (
        f"expected the server's path before each template, got {[o.path for o in spec.operations]}")


@pytest.mark.parametrize(
    ("data", "field", "reason"),
    [
        (b"", "(body)", "empty"),
        (b"{not json", "(body)", "malformed JSON"),
        (b"openapi: [\n", "(body)", "malformed YAML"),
        (b"- a\n- b\n", "(body)", "a mapping"),
        (raw({"swagger": "2.0", "info": {}, "paths": {}}), "swagger", "only OpenAPI 3.0 and 3.1"),
        (raw(document(openapi="2.0")), "openapi", "3.0.x or 3.1.x"),
        (raw(document(openapi="4.0.0")), "openapi", "3.0.x or 3.1.x"),
        (b"openapi: 3.0\ninfo: {title: t, version: v}\npaths: {}\n", "openapi", "a string"),
        (raw(document(info=None)), "info", "missing"),
        (raw(document(paths=[])), "paths", "a mapping"),
        (raw(document(paths={"orders": {}})), "paths.orders", "start with '/'"),
        (raw(document(paths={"/a": {"get": {"operationId": "x"}}, "/b": {"post": {"operationId": "x"}}})), "paths./b.post.operationId", "duplicate operationId 'x'"),
        (raw(document(paths={"/a/{x}": {"get": {}}, "/a/{y}": {"get": {}}})), "paths./a/{y}.get", "the same operation"),
        (raw(document(paths={"/a": {"get": {"parameters": [{"$ref": "other.yaml#/p"}]}}})), "paths./a.get.parameters.0.$ref", "only local references"),
        (raw(document(paths={"/a": {"get": {"parameters": [{"$ref": "#/components/parameters/Nope"}]}}})), "paths./a.get.parameters.0.$ref", "points at nothing"),
        (raw(document(paths={"/a": {"get": {"parameters": [{"name": "q", "in": "body"}]}}})), "paths./a.get.parameters.0.in", "expected one of"),
        (raw(document(paths={"/a": {"get": {"parameters": [{"name": "id", "in": "path"}]}}})), "paths./a.get.parameters", "not in the path template"),
        (raw(document(paths={"/a {b}": {"get": {}}})), "paths./a {b}", "no whitespace"),
        (raw(document(paths={"/a/{b": {"get": {}}})), "paths./a/{b", "unbalanced"),
        (raw(document(paths={"/a": {"get": {"operationId": "x" * 129}}})), "paths./a.get.operationId", "longer than 128"),
        (b"a: &a [*a, *a]\n", "(body)", "nested deeper"),  # an alias inside itself
        (b"a: &a [x, x, x, x, x, x, x, x, x, x]\n" + b"".join(b"%c: &%c [%s]\n" % (98 + i, 98 + i, b", ".join([b"*%c" % (97 + i)] * 10)) for i in range(8)),
         "(body)", "aliases are expanded"),  # a billion laughs
        (b"[" * 200 + b"]" * 200, "(body)", "nested deeper"),
        (b"\xff\xfe junk", "(body)", "not UTF-8"),
    ],
)
def test_bad_documents_are_refused_naming_the_field(data: bytes, field: str, reason: str) -> None:
    err = refused(data)
    assert err.field == field and reason in err.reason, f"expected {field}: ...{reason}..., got {err.field}: {err.reason}"


def test_oversized_and_overfull_documents_are_refused() -> None:
    big = raw(document(info={"title": "t", "version": "v", "description": "x" * MAX_DOCUMENT_BYTES}))
    err = refused(big)
    assert err.field == "(body)" and "at most" in err.reason, f"expected the size named, got {err}"
    many = document(paths={f"/p{i}": {"get": {"operationId": f"op{i}"}} for i in range(MAX_OPERATIONS + 1)})
    err = refused(raw(many))
    assert err.field == "paths" and f"more than {MAX_OPERATIONS}" in err.reason, f"expected the operation count named, got {err}"


def test_diff_names_added_removed_and_changed_operations_with_what_changed() -> None:
    old = parse(raw(document())).operations
    new_doc = document()
    paths = new_doc["paths"]
    paths["/orders/{orderId}"] = paths.pop("/orders/{id}")
    paths["/orders/{orderId}"]["parameters"][0]["name"] = "orderId"
    paths["/orders/{orderId}"]["get"]["summary"] = "fetch one order"
    del paths["/orders/{orderId}"]["delete"]
    paths["/orders"]["post"]["parameters"] = [{"name": "dry-run", "in": "header", "schema": {"type": "boolean"}}]
    paths["/orders/{orderId}/cancel"] = {"post": {"operationId": "cancelOrder", "responses": {"202": {"description": "ok"}}}}
    d = diff(old, parse(raw(new_doc)).operations)
    assert [a["operation_id"] for a in d["added"]] == ["cancelOrder"], f"expected cancelOrder added, got {d['added']}"
    assert [r["operation_id"] for r in d["removed"]] == ["deleteOrder"], f"expected deleteOrder removed, got {d['removed']}"
    changed = {c["operation_id"]: c["changes"] for c in d["changed"]}
    assert set(changed) == {"getOrder", "createOrder"}, f"expected getOrder and createOrder changed, got {d['changed']}"
    assert changed["getOrder"]["summary"] == {"from": "one order", "to": "fetch one order"}, f"got {changed['getOrder']}"
    assert changed["getOrder"]["path"] == {"from": "/orders/{id}", "to": "/orders/{orderId}"}, f"expected a renamed parameter to be a change, got {changed['getOrder']}"
    added_params = changed["createOrder"]["parameters"]["added"]
    assert added_params == [{"in": "header", "name": "dry-run", "required": False, "type": "boolean"}], f"got {changed['createOrder']}"
    assert diff(old, old) == {"added": [], "removed": [], "changed": []}, "expected no difference between a version and itself"


# ---- hypothesis ---------------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_junk_bytes_are_read_or_refused_with_a_field(data: bytes) -> None:
    try:
        spec = parse(data)
    except DocumentError as exc:
        assert exc.field and exc.reason, f"expected a field and a reason, got {exc!r}"
    else:
        assert spec.openapi.startswith("3."), f"expected only 3.x documents accepted, got {spec.openapi}"


_KEYS = ["openapi", "info", "paths", "servers", "parameters", "get", "post", "operationId", "tags", "name", "in", "required",
         "requestBody", "responses", "$ref", "/orders/{id}", "/orders", "content", "schema", "type", "url", "variables"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.lists(st.sampled_from(_KEYS), min_size=1, max_size=5), _json), min_size=1, max_size=4))
def test_mutated_documents_are_read_or_refused_with_a_field(edits: list[tuple[list[str], Any]]) -> None:
    doc = document()
    for path, value in edits:
        target: Any = doc
        for key in path[:-1]:
            if not isinstance(target, dict):
                break
            target = target.setdefault(key, {})
        if isinstance(target, dict):
            target[path[-1]] = copy.deepcopy(value)
    try:
        spec = normalise(doc)
    except DocumentError as exc:
        assert exc.field and exc.reason, f"expected a field and a reason, got {exc!r}"
    else:
        ids = [o.operation_id for o in spec.operations if o.operation_id]
        assert len(ids) == len(set(ids)), f"expected unique operationIds in an accepted document, got {ids}"
        assert all(o.path.startswith("/") for o in spec.operations), f"expected path templates, got {[o.path for o in spec.operations]}"
        again = normalise(json.loads(json.dumps(doc)))
        assert again.sha256 == spec.sha256, "expected the sha256 to be a function of the document"


_op = st.builds(
    lambda m, p, i, s: Operation(method=m, path=p, operation_id=i, summary=s),
    st.sampled_from(["GET", "POST", "DELETE"]),
    st.sampled_from(["/a", "/a/{id}", "/a/{x}", "/b", "/b/{id}/c"]),
    st.none() | st.sampled_from(["one", "two", "three"]),
    st.sampled_from(["", "s1", "s2"]),
)


def _unique(ops: list[Operation]) -> list[Operation]:
    return list({o.key: o for o in ops}.values())


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, max_size=8).map(_unique), st.lists(_op, max_size=8).map(_unique))
def test_diff_accounts_for_every_operation_once_and_mirrors_when_reversed(a: list[Operation], b: list[Operation]) -> None:
    forward, backward = diff(a, b), diff(b, a)
    keys = lambda items: sorted(f"{o['method']} {o['path']}" for o in items)  # noqa: E731
    assert keys(forward["added"]) == keys(backward["removed"]) and keys(forward["removed"]) == keys(backward["added"]), (
        f"expected reversing a diff to swap added and removed, got {forward} / {backward}")
    assert len(forward["added"]) + len({o.key for o in a}) - len(forward["removed"]) == len({o.key for o in b}), (
        f"expected old + added - removed to be the new count, got {forward}")
    same = {o.key for o in a if o in b}
    assert not any(c["key"] in same for c in forward["changed"]), f"expected identical operations not to be changed, got {forward['changed']}"
    assert diff(a, a) == {"added": [], "removed": [], "changed": []}, "expected no difference from a list to itself"
    assert (operations_sha256(a) == operations_sha256(b)) == (sorted(a, key=lambda o: o.key) == sorted(b, key=lambda o: o.key)), (
        "expected equal sha256 exactly for equal operations")


def test_yaml_in_flow_style_is_read_though_it_starts_like_json() -> None:
    spec = parse(b"{openapi: 3.0.3, info: {title: t, version: v}, paths: {/a: {get: {operationId: a}}}}")
    assert [(o.method, o.path, o.operation_id) for o in spec.operations] == [("GET", "/a", "a")], f"expected one operation, got {spec.operations}"
    err = refused(b'{"openapi": "3.0.3", "info": [1,}')
    assert err.reason.startswith("malformed JSON"), f"expected broken JSON to be reported as JSON, got {err}"
