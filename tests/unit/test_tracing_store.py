"""The span record (normalised where it enters, hypothesis on junk), the control plane's trace store
(bound, duplicates, trees for a waterfall) and its routes (a stranger gets 401 and nothing is kept; a bad
span or query is a 400 naming the field, and nothing of the body is kept)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpilot.api.app import build_api
from meshpilot.controlplane import ControlPlane
from meshpilot.settings import Settings
from meshpilot.telemetry.spans import SpanInvalid, from_line, line, normalise, parse_spans
from meshpilot.tracing.plugin import trace_routes
from meshpilot.tracing.store import TraceStore

T = "0af7651916cd43dd8448eb211c80319c"
T0 = 1_700_000_000_000_000


def span(sid: str, parent: str | None = None, *, kind: str = "CLIENT", service: str = "web", ts: int = 0,
         trace: str = T, dur: int = 100, **extra: Any) -> dict[str, Any]:
    s: dict[str, Any] = {"traceId": trace, "id": sid, "kind": kind, "name": f"{service}-{sid}", "timestamp": T0 + ts,
                         "duration": dur, "localEndpoint": {"serviceName": service}, **extra}
    if parent:
        s["parentId"] = parent
    return normalise(s)


# ---- records ---------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(obj=st.one_of(json_values, st.dictionaries(st.sampled_from(
    ["traceId", "id", "parentId", "kind", "timestamp", "duration", "tags", "annotations", "localEndpoint", "name"]), json_values)))
def test_normalise_takes_junk_without_surprise(obj: Any) -> None:
    try:
        s = normalise(obj)
    except SpanInvalid as exc:
        assert exc.field, "expected the refused field named"
        return
    assert normalise(s) == s, "expected a normalised span to stay as it is"
    assert from_line(line(s)) == s, "expected a span to come back from its line"


def test_ids_are_normalised_and_a_64_bit_trace_id_is_padded() -> None:
    s = normalise({"traceId": "ABC", "id": "1", "timestamp": "5", "kind": "server"})
    assert (s["traceId"], s["id"], s["timestamp"], s["kind"]) == ("0" * 29 + "abc", "0" * 15 + "1", 5, "SERVER")
    for bad, field in [({"traceId": "0" * 32, "id": "1", "timestamp": 1}, "traceId"), ({"traceId": "a", "id": "x", "timestamp": 1}, "id"),
                       ({"traceId": "a", "id": "1"}, "timestamp"), ({"traceId": "a", "id": "1", "timestamp": 1, "kind": "PEER"}, "kind")]:
        with pytest.raises(SpanInvalid) as err:
            normalise(bad)
        assert err.value.field == field, f"expected {field} named for {bad}, got {err.value}"
    kept, refused = parse_spans([{"traceId": "a", "id": "1", "timestamp": 1}, {"id": 2}])
    assert len(kept) == 1 and refused == [{"field": "1.traceId", "reason": "expected a hex string, got NoneType"}], f"got {refused}"


# ---- the store -------------------------------------------------------------------------------------

def test_a_trace_is_a_tree_by_parent_ids_with_offsets_and_depths() -> None:
    store = TraceStore()
    store.add([span("000000000000000b", "000000000000000a", kind="SERVER", service="api", ts=10, dur=50),
               span("000000000000000a", "00000000000000ff", ts=0, dur=80),
               span("000000000000000c", "000000000000000b", kind="CLIENT", service="api", ts=20, dur=10)])
    tree = store.tree(T)
    assert tree is not None
    assert [r["id"] for r in tree["roots"]] == ["000000000000000a"], f"expected the caller's span as the root, got {tree['roots']}"
    root = tree["roots"][0]
    server = root["children"][0]
    assert (server["id"], server["offset_us"], server["depth"]) == ("000000000000000b", 10, 1), f"got {server}"
    assert server["children"][0]["id"] == "000000000000000c" and server["children"][0]["depth"] == 2
    assert (tree["span_count"], tree["duration_us"], tree["services"]) == (3, 80, ["api", "web"]), f"got {tree}"


def test_a_shared_span_id_puts_the_server_under_the_client() -> None:
    store = TraceStore()
    store.add([span("000000000000000a", kind="CLIENT", service="web"),
               span("000000000000000a", kind="SERVER", service="api", ts=5, shared=True),
               span("000000000000000d", "000000000000000a", kind="CLIENT", service="api", ts=6)])
    tree = store.tree(T)
    assert tree is not None and len(tree["roots"]) == 1, f"expected one root, got {tree}"
    server = tree["roots"][0]["children"][0]
    assert (server["kind"], server["children"][0]["id"]) == ("SERVER", "000000000000000d"), f"got {tree['roots']}"


def test_parent_cycles_are_broken_and_every_span_is_shown() -> None:
    store = TraceStore()
    store.add([span("000000000000000a", "000000000000000b"), span("000000000000000b", "000000000000000a", ts=1),
               span("000000000000000c", "000000000000000a", ts=2)])
    tree = store.tree(T)
    assert tree is not None
    seen, stack = [], list(tree["roots"])
    while stack:
        node = stack.pop()
        seen.append(node["id"])
        stack.extend(node["children"])
    assert sorted(seen) == ["000000000000000a", "000000000000000b", "000000000000000c"], f"expected every span once, got {seen}"


def test_duplicates_are_kept_once_and_the_oldest_traces_go_at_the_bound() -> None:
    store = TraceStore(max_spans=5, max_trace_spans=3)
    first = [span(f"{i + 1:016x}", trace="1" * 32, ts=i) for i in range(3)]
    assert store.add(first) == 3 and store.add(first) == 0, "expected a batch sent twice kept once"
    store.add([span(f"{i + 1:016x}", trace="2" * 32, ts=100 + i) for i in range(3)])
    assert store.tree("1" * 32) is None and store.tree("2" * 32) is not None, "expected the oldest trace evicted"
    assert store.span_count == 3 and store.evicted_traces == 1, f"got {store.span_count} spans, {store.evicted_traces} evicted"


def test_traces_are_listed_newest_first_by_service_and_time() -> None:
    store = TraceStore()
    for n in range(5):
        store.add([span("0000000000000001", trace=f"{n + 1:032x}", ts=n * 1000, service="web" if n % 2 else "api")])
    assert [t["trace_id"] for t in store.traces("web")] == [f"{4:032x}", f"{2:032x}"]
    assert [t["trace_id"] for t in store.traces(since_us=T0 + 2500, limit=1)] == [f"{5:032x}"]
    assert store.traces("nobody") == []


# ---- the routes ------------------------------------------------------------------------------------

async def _client(token: str | None) -> tuple[ControlPlane, TestClient, TraceStore]:
    cp = ControlPlane(Settings(store="memory:", token=token))
    store = TraceStore()
    client = TestClient(TestServer(build_api(cp.settings, cp.registry, cp.xds, routes=trace_routes(store))))
    await client.start_server()
    return cp, client, store


async def test_a_stranger_gets_401_and_nothing_is_kept() -> None:
    cp, client, store = await _client("boot")
    body = [span("0000000000000001")]
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = await client.post("/v1/spans", json=body, headers=headers)
            assert r.status == 401, f"expected 401, got {r.status} {await r.text()}"
        assert len(store) == 0, "expected nothing kept"
        r = await client.get(f"/v1/traces/{T}")
        assert r.status == 401, f"expected reads to need a token too, got {r.status}"
        issued = await (await client.post("/v1/access/tokens", json={"scope": "read", "description": "reader"},
                                          headers={"Authorization": "Bearer boot"})).json()
        reader = {"Authorization": f"Bearer {issued['secret']}"}
        r = await client.post("/v1/spans", json=body, headers=reader)
        assert r.status == 403 and len(store) == 0, f"expected a read token refused with 403, got {r.status} {await r.text()}"
        assert (await client.get("/v1/traces", headers=reader)).status == 200, "expected a read token to read traces"
        r = await client.post("/v1/spans", json=body, headers={"Authorization": "Bearer boot"})
        assert r.status == 201 and len(store) == 1, f"expected the token's spans kept, got {r.status} {await r.text()}"
    finally:
        await client.close()
        cp.registry.store.close()


@pytest.mark.parametrize("method,path,body,field", [
    ("POST", "/v1/spans", b"{not json", "(body)"),
    ("POST", "/v1/spans", b'{"traceId": "a"}', "(body)"),
    ("POST", "/v1/spans", b'[{"traceId": "zz", "id": "1", "timestamp": 1}]', "0.traceId"),
    ("GET", "/v1/traces?limit=0", None, "limit"),
    ("GET", "/v1/traces?since=yesterday", None, "since"),
    ("POST", "/v1/spans", b'[{"traceId": "1", "id": "1", "timestamp": 1}, {"traceId": "1", "id": "2", "timestamp": "1"}]', "1.timestamp"),
    ("POST", "/v1/spans", b'[{"traceId": "000", "id": "1", "timestamp": 1}]', "0.traceId"),
])
async def test_bad_requests_name_the_field_and_keep_nothing(method: str, path: str, body: bytes | None, field: str) -> None:
    cp, client, store = await _client(None)
    try:
        r = await client.request(method, path, data=body, headers={"Content-Type": "application/json"})
        data = await r.json()
        assert r.status == 400, f"expected 400, got {r.status} {data}"
        assert field in [f["field"] for f in data["fields"]], f"expected {field!r} named, got {data}"
        assert len(store) == 0
    finally:
        await client.close()
        cp.registry.store.close()


async def test_kept_spans_are_listed_and_shown_as_a_tree() -> None:
    cp, client, _ = await _client(None)
    try:
        spans = [span("000000000000000a", service="web"), span("000000000000000b", "000000000000000a", kind="SERVER", service="api", ts=3)]
        r = await client.post("/v1/spans", data=json.dumps(spans + [{"bad": 1}]), headers={"Content-Type": "application/json"})
        answer = await r.json()
        assert r.status == 400 and "2.traceId" in [f["field"] for f in answer["fields"]], f"expected the bad span named, got {answer}"
        assert (await client.get(f"/v1/traces/{T}")).status == 404, "expected nothing of a refused body kept"
        r = await client.post("/v1/spans", data=json.dumps(spans), headers={"Content-Type": "application/json"})
        answer = await r.json()
        assert r.status == 201 and answer["accepted"] == 2, f"got {answer}"
        listed = await (await client.get("/v1/traces?service=api&since=0")).json()
        assert [t["trace_id"] for t in listed["traces"]] == [T], f"got {listed}"
        assert 0 < listed["stored_bytes"] <= listed["max_bytes"] and listed["max_trace_spans"] == listed["max_spans"] // 10, \
            f"expected the store's bounds in the answer, got {listed}"
        r = await client.get(f"/v1/traces/{T.upper()}")
        tree = await r.json()
        assert r.status == 200 and tree["roots"][0]["children"][0]["service"] == "api", f"got {tree}"
        assert (await client.get(f"/v1/traces/{'9' * 32}")).status == 404
        assert (await client.get("/v1/traces/not-hex")).status == 404, "expected an id no trace can have to be not found"
    finally:
        await client.close()
        cp.registry.store.close()


def test_one_trace_cannot_grow_past_its_share_nor_push_out_every_other_trace() -> None:
    """A caller's sampled flag is kept from any peer, so anyone may write every request into one trace
    id: that trace stops at a tenth of the store, the rest of its spans are dropped and counted, and
    the other traces stay."""
    store = TraceStore(max_spans=1000)
    others = [f"{n + 1:032x}" for n in range(5)]
    for n, tid in enumerate(others):
        store.add([span(f"{i + 1:016x}", trace=tid, ts=n * 100 + i) for i in range(10)])
    hot = "f" * 32
    for body in range(20):
        store.add([span(f"{body * 1000 + i + 1:016x}", trace=hot, ts=10_000 + body * 1000 + i) for i in range(1000)])
    kept = [tid for tid in others if store.tree(tid) is not None]
    assert kept == others, f"expected the other traces kept, got {kept} of {others}"
    tree = store.tree(hot)
    assert tree is not None
    assert tree["span_count"] == 100 and store.span_count == 150, \
        f"expected the hot trace cut at 100 spans (a tenth of 1000) and 150 spans stored, got {tree['span_count']} and {store.span_count}"
    assert (tree["truncated"], tree["dropped_spans"], store.dropped_spans) == (True, 19_900, 19_900), \
        f"expected the trace marked truncated with 19,900 spans dropped, got {tree['truncated']}, {tree['dropped_spans']}, {store.dropped_spans}"
    listed = {t["trace_id"]: t for t in store.traces(limit=10)}
    assert listed[hot]["truncated"] and not listed[others[0]]["truncated"], f"expected only the hot trace truncated, got {listed}"
    again = store.add([span("0000000000000001", trace=hot, ts=10_000)])
    assert again == 0 and store.tree(hot)["span_count"] == 100, "expected a span already kept taken again at the cap"


def _big(sid: str, trace: str, ts: int) -> dict[str, Any]:
    """A span at the record's bounds, decoded from JSON as a posted body is (its strings each their own
    object): 64 tags of 4 KiB and 64 annotations, about 290 KB kept."""
    raw = json.dumps({"traceId": trace, "id": sid, "kind": "SERVER", "name": "GET /x", "timestamp": T0 + ts, "duration": 10,
                      "localEndpoint": {"serviceName": "api"},
                      "tags": {f"tag-{j:02d}": f"{trace}{sid}{j}".ljust(4096, "v") for j in range(64)},
                      "annotations": [{"timestamp": T0 + ts, "value": f"{sid}{j}".ljust(256, "a")} for j in range(64)]})
    return normalise(json.loads(raw))


def test_the_store_is_bounded_by_bytes_and_the_traces_least_recently_written_go() -> None:
    import gc
    import tracemalloc

    budget = 16 * 1024 * 1024
    gc.collect()
    tracemalloc.start()
    try:
        store = TraceStore(max_spans=100_000, max_bytes=budget)
        for n in range(40):  # 40 traces of 4 big spans, about 46 MB unbounded
            store.add([_big(f"{i + 1:016x}", f"{n + 1:032x}", n * 10 + i) for i in range(4)])
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert store.bytes <= budget, f"expected at most {budget} bytes counted, got {store.bytes}"
    assert held <= budget * 1.1, f"expected the store to hold about its budget of {budget} bytes, tracemalloc says {held}"
    newest = store.tree(f"{40:032x}")
    assert newest is not None and newest["span_count"] == 4 and not newest["truncated"], \
        f"expected the newest trace whole, got {newest and newest['span_count']}"
    assert store.tree(f"{1:032x}") is None and store.evicted_traces > 0, "expected the oldest traces evicted for the byte budget"
    # one trace holds at most a tenth of the budget: the rest of its spans are dropped and counted
    store.add([_big(f"{i + 1:016x}", "e" * 32, 10_000 + i) for i in range(20)])
    hot = store.tree("e" * 32)
    assert hot is not None and hot["truncated"] and hot["span_count"] == 5 and hot["dropped_spans"] == 15, \
        f"expected the trace cut at a tenth of the budget (5 big spans), got {hot and (hot['span_count'], hot['dropped_spans'])}"
    assert store.tree(f"{40:032x}") is not None, "expected the newest other trace kept"
    with pytest.raises(ValueError, match="max_bytes"):
        TraceStore(max_bytes=0)


def _nesting(node: Any) -> int:
    """How deep JSON values nest in ``node`` (walked without recursion)."""
    deepest, stack = 0, [(node, 1)]
    while stack:
        value, d = stack.pop()
        deepest = max(deepest, d)
        if isinstance(value, dict):
            stack.extend((v, d + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, d + 1) for v in value)
    return deepest


async def test_a_deep_parent_chain_is_answered_in_tree_order_with_bounded_nesting() -> None:
    """An app that parents each call on the previous one (or junk ids) makes a chain of thousands of
    spans: the trace is answered, each span once in tree order with its real depth and parent, and
    the answer's nesting stays bounded (a nested tree that deep cannot be encoded)."""
    cp, client, store = await _client(None)
    try:
        n = 5_000
        chain = [span(f"{i + 1:016x}", f"{i:016x}" if i else None, ts=i, service="api" if i % 2 else "web") for i in range(n)]
        chain.append(span(f"{n + 1:016x}", f"{1:016x}", ts=n))  # a second child of the root, drawn after the chain
        store.add(chain)
        r = await client.get(f"/v1/traces/{T}")
        assert r.status == 200, f"expected the deep trace answered, got {r.status} {(await r.text())[:300]}"
        tree = await r.json()
        flat, stack = [], list(reversed(tree["roots"]))  # as the console's traces.js and tryit.js walk it
        while stack:
            node = stack.pop()
            flat.append(node)
            stack.extend(reversed(node.get("children") or []))
        ids = [s["id"] for s in flat]
        assert ids == [f"{i + 1:016x}" for i in range(n + 1)], f"expected every span once in tree order, got {ids[:3]}... ({len(ids)} spans)"
        depths = [s["depth"] for s in flat]
        assert depths == [*range(n), 1], f"expected each span's real depth, got {depths[:3]}...{depths[-3:]}"
        assert all(s.get("parentId") == f"{i:016x}" for i, s in enumerate(flat[1:n], 1)), "expected each span's parent id kept"
        assert _nesting(tree) < 300, f"expected the answer's nesting bounded, got {_nesting(tree)} levels"
    finally:
        await client.close()
        cp.registry.store.close()
