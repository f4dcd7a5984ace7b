"""Log records, the control plane's log store and its routes, and the node's collector (followers across
rotation and truncation, long lines, the spool) without any process."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshpilot.api.app import build_api
from meshpilot.controlplane import ControlPlane
from meshpilot.logs.plugin import log_routes
from meshpilot.logs.store import LogStore
from meshpilot.settings import Settings
from meshpilot.sidecar.logs import Collector, Follower, LogSource, access_record
from meshpilot.sidecar.traces import Spool
from meshpilot.telemetry.logs import (
    MAX_LINE, LogInvalid, LogMatch, find_trace_id, from_line, guess_level, line, normalise, parse_records,
)

T = "4bf92f3577b34da6a3ce929d0e0e4736"


def rec(text: str = "hello", *, t: float = 1000.0, service: str = "web.default", source: str = "app", level: str = "",
        trace_id: str = "", instance: str = "web-1") -> dict[str, Any]:
    return {"id": secrets.token_hex(8), "time": t, "node": "web-1", "service": service, "instance": instance,
            "source": source, "level": level, "trace_id": trace_id, "line": text}


# ---- records --------------------------------------------------------------------------------------

def test_a_record_is_normalised_and_round_trips_through_its_line() -> None:
    r = normalise({**rec("x" * (MAX_LINE + 50), service="Web.Default", trace_id="A3CE929D0E0E4736"), "level": "error"})
    assert r["service"] == "web.default", f"expected the service lower-cased, got {r['service']}"
    assert r["trace_id"] == "0" * 16 + "a3ce929d0e0e4736", f"expected a 64-bit trace id padded to 128 bits, got {r['trace_id']}"
    assert len(r["line"]) == MAX_LINE, f"expected the line cut at {MAX_LINE}, got {len(r['line'])}"
    assert from_line(line(r)) == r, "expected a record to read back from its line as itself"


@pytest.mark.parametrize("change,field", [
    ({"time": "now"}, "time"), ({"time": -1}, "time"), ({"id": "xyz"}, "id"), ({"source": "kernel"}, "source"),
    ({"level": "loud"}, "level"), ({"trace_id": "not-hex"}, "trace_id"), ({"line": 5}, "line"),
    ({"service": ""}, "service"), ({"node": "a\nb"}, "node"),
    ({"trace_id": None}, "trace_id"), ({"trace_id": 0}, "trace_id"), ({"level": None}, "level"), ({"level": False}, "level"),
])
def test_a_bad_record_is_refused_naming_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(LogInvalid) as err:
        normalise({**rec(), **change})
    assert err.value.field == field, f"expected {field} named, got {err.value}"
    with pytest.raises(LogInvalid) as err:
        parse_records([rec(), {**rec(), **change}])
    assert err.value.field == f"1.{field}", f"expected the record's index named, got {err.value.field}"


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=6), max_leaves=20))
@settings(max_examples=300)
def test_junk_records_are_kept_or_refused_naming_a_field(doc: Any) -> None:
    for candidate in (doc, [doc], {**rec(), "line": doc} if isinstance(doc, str) else {**rec(), "time": doc}):
        try:
            out = parse_records(candidate) if isinstance(candidate, list) else [normalise(candidate)]
        except LogInvalid as exc:
            assert exc.field, f"expected a field named for {candidate!r}"
        else:
            assert all(from_line(line(r)) == r for r in out)


@pytest.mark.parametrize("text,level", [
    ("2026-12-02 10:00:01 ERROR payment failed", "error"), ('{"level":"warn","msg":"slow"}', "warn"),
    ("level=info msg=ok", "info"), ("[warning] disk", "warn"), ("FATAL: out of memory", "error"),
    ("DEBUG cache hit", "debug"), ("nothing to see", ""), ("terror in errands", ""),
])
def test_the_level_a_line_names(text: str, level: str) -> None:
    assert guess_level(text) == level, f"expected {level!r} for {text!r}, got {guess_level(text)!r}"


@pytest.mark.parametrize("text,trace", [
    (f"trace_id={T} done", T), (f'{{"traceId": "{T.upper()}"}}', T), (f"traceparent 00-{T}-00f067aa0ba902b7-01", T),
    ("trace_id=a3ce929d0e0e4736 ok", "0" * 16 + "a3ce929d0e0e4736"), ("no trace here 1234", ""), ("trace_id=" + "0" * 32, ""),
])
def test_the_trace_id_a_line_names(text: str, trace: str) -> None:
    assert find_trace_id(text) == trace, f"expected {trace!r} in {text!r}, got {find_trace_id(text)!r}"


# ---- the store ------------------------------------------------------------------------------------

def test_the_store_keeps_the_newest_records_once_each() -> None:
    store = LogStore(max_records=3)
    records = [normalise(rec(f"line {i}", t=1000 + i)) for i in range(5)]
    assert store.add(records[:2]) == 2 and store.add(records[:2]) == 0, "expected a record sent twice kept once"
    store.add(records[2:])
    kept = [r["line"] for r in store.search(LogMatch())]
    assert kept == ["line 4", "line 3", "line 2"], f"expected the 3 newest, newest first, got {kept}"
    assert store.dropped == 2
    assert store.add([records[0]]) == 1, "expected a record that left for the bound to be new again"


def test_the_store_is_bounded_by_bytes_as_well_as_by_count() -> None:
    store = LogStore(max_records=100_000, max_bytes=2 * 1024 * 1024)
    big = [normalise(rec(f"{i:06d} " + "x" * 8000, t=1000 + i)) for i in range(1000)]
    for i in range(0, 1000, 100):
        store.add(big[i:i + 100])
    assert store.bytes <= store.max_bytes, f"expected at most {store.max_bytes} bytes kept, got {store.bytes}"
    assert 200 <= len(store) < 260, f"expected about 2 MiB / 8 KiB records kept, got {len(store)}"
    kept = store.search(LogMatch(), limit=1000)
    assert kept[0]["line"].startswith("000999") and store.dropped == 1000 - len(store), \
        f"expected the newest kept and the earliest dropped, got {kept[0]['line'][:6]} and dropped {store.dropped}"
    store.add([normalise(rec("small", t=5000))])
    assert store.search(LogMatch(), limit=1)[0]["line"] == "small"
    assert store.bytes == sum(store.size_of(r) for r in store.search(LogMatch(), limit=1000)), "expected the byte count to follow adds and drops"


def test_search_filters_by_every_field_and_time() -> None:
    store = LogStore()
    store.add([normalise(r) for r in [
        rec("GET /a 200", t=100, source="access", level="info", trace_id=T),
        rec("GET /b 503", t=200, source="access", level="error"),
        rec("Payment FAILED", t=300, level="error", service="pay.shop", instance="pay-2"),
        rec("slow query", t=400, level="warn", service="pay.shop"),
    ]])

    def lines(**kw: Any) -> list[str]:
        since, until = kw.pop("since", 0.0), kw.pop("until", float("inf"))
        return [r["line"] for r in store.search(LogMatch(**kw), since, until)]

    assert lines(service="pay") == ["slow query", "Payment FAILED"], "a service by name, any namespace"
    assert lines(service="pay.shop") == ["slow query", "Payment FAILED"] and lines(service="pay.other") == []
    assert lines(instance="pay-2") == ["Payment FAILED"]
    assert lines(source="access") == ["GET /b 503", "GET /a 200"]
    assert lines(level="warn") == ["slow query", "Payment FAILED", "GET /b 503"], "warn and above"
    assert lines(trace_id=T) == ["GET /a 200"]
    assert lines(text="failed") == ["Payment FAILED"], "text is a case-insensitive substring"
    assert lines(since=200, until=400) == ["Payment FAILED", "GET /b 503"], "since inclusive, until exclusive"
    assert store.count(LogMatch(level="error"), 0, 1e12) == 2


# ---- the routes -----------------------------------------------------------------------------------

async def _client(token: str | None, clock: Any = None) -> tuple[ControlPlane, TestClient, LogStore]:
    cp = ControlPlane(Settings(store="memory:", token=token))
    store = LogStore()
    routes = log_routes(store, clock) if clock else log_routes(store)
    client = TestClient(TestServer(build_api(cp.settings, cp.registry, cp.xds, routes=routes)))
    await client.start_server()
    return cp, client, store


async def test_a_stranger_gets_401_a_reader_403_and_nothing_is_kept() -> None:
    cp, client, store = await _client("boot")
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = await client.post("/v1/logs", json=[rec()], headers=headers)
            assert r.status == 401, f"expected 401, got {r.status} {await r.text()}"
            assert (await client.get("/v1/logs", headers=headers)).status == 401, "expected reads to need a token"
        issued = await (await client.post("/v1/access/tokens", json={"scope": "read", "description": "reader"},
                                          headers={"Authorization": "Bearer boot"})).json()
        reader = {"Authorization": f"Bearer {issued['secret']}"}
        r = await client.post("/v1/logs", json=[rec()], headers=reader)
        assert r.status == 403 and len(store) == 0, f"expected a read token refused with 403 and nothing kept, got {r.status} {len(store)}"
        assert (await client.get("/v1/logs", headers=reader)).status == 200, "expected a read token to search"
        r = await client.post("/v1/logs", json=[rec()], headers={"Authorization": "Bearer boot"})
        assert r.status == 201 and len(store) == 1, f"expected the write token's records kept, got {r.status} {await r.text()}"
    finally:
        await client.close()
        cp.registry.store.close()


@pytest.mark.parametrize("method,path,body,field", [
    ("POST", "/v1/logs", b"{not json", "(body)"),
    ("POST", "/v1/logs", b'{"line": "a"}', "(body)"),
    ("POST", "/v1/logs", json.dumps([rec(), {**rec(), "source": "disk"}]).encode(), "1.source"),
    ("GET", "/v1/logs?limit=0", None, "limit"),
    ("GET", "/v1/logs?since=yesterday", None, "since"),
    ("GET", "/v1/logs?until=1e12", None, "until"),
    ("GET", "/v1/logs?level=loud", None, "level"),
    ("GET", "/v1/logs?source=disk", None, "source"),
    ("GET", "/v1/logs?trace_id=xyz", None, "trace_id"),
])
async def test_bad_requests_name_the_field_and_keep_nothing(method: str, path: str, body: bytes | None, field: str) -> None:
    cp, client, store = await _client(None)
    try:
        r = await client.request(method, path, data=body, headers={"Content-Type": "application/json"})
        data = await r.json()
        assert r.status == 400, f"expected 400, got {r.status} {data}"
        assert field in [f["field"] for f in data["fields"]], f"expected {field!r} named, got {data}"
        assert len(store) == 0, "expected nothing of a refused body kept"
    finally:
        await client.close()
        cp.registry.store.close()


async def test_records_are_searched_and_link_their_trace() -> None:
    cp, client, _ = await _client(None, clock=lambda: 1000.0)
    try:
        body = [rec("old", t=100.0), rec("traced", t=950.0, trace_id=T[16:]), rec("other", t=960.0, service="api.default")]
        r = await client.post("/v1/logs", json=body)
        assert r.status == 201 and (await r.json())["new"] == 3, f"got {r.status} {await r.text()}"
        r = await client.post("/v1/logs", json=body)
        assert (await r.json())["new"] == 0, "expected a batch sent again kept once"
        found = (await (await client.get(f"/v1/logs?trace_id={T[16:].upper()}")).json())["records"]
        assert [x["line"] for x in found] == ["traced"], f"expected the traced line by its (64-bit, upper-case) id, got {found}"
        assert found[0]["trace"] == f"/v1/traces/{'0' * 16}{T[16:]}", f"expected a link to the trace, got {found[0]}"
        found = (await (await client.get("/v1/logs?service=web&since=5m")).json())["records"]
        assert [x["line"] for x in found] == ["traced"], f"expected web's lines of the last 5 minutes, got {found}"
        found = (await (await client.get("/v1/logs?limit=2")).json())["records"]
        assert [x["line"] for x in found] == ["other", "traced"], f"expected the two newest, got {found}"
    finally:
        await client.close()
        cp.registry.store.close()


# ---- the node: followers and the collector ----------------------------------------------------------

def test_a_follower_reads_complete_lines_and_follows_rotation_and_truncation(tmp_path: Path) -> None:
    p = tmp_path / "app.log"
    p.write_bytes(b"one\ntwo\npart")
    f = Follower(p)
    assert f.read() == ["one", "two"], "expected the complete lines; a partial one waits"
    with p.open("ab") as out:
        out.write(b"ial\n")
    assert f.read() == ["partial"]
    with p.open("ab") as out:
        out.write(b"last of old\n")
    os.rename(p, tmp_path / "app.log.1")  # rotated: renamed away, a new file at the path
    p.write_bytes(b"first of new\n")
    assert f.read() == ["last of old", "first of new"], "expected the old file read to its end, then the new from its start"
    p.write_bytes(b"short\n")  # truncated in place (copytruncate), shorter than what was read
    assert f.read() == ["short"], "expected a truncated file read again from its start"
    p.write_bytes(b"")
    assert f.read() == []
    p.write_bytes(b"after truncate to nothing\n")
    assert f.read() == ["after truncate to nothing"], "expected a file emptied and written again read from its start"
    kept = (f.inode, f.offset)
    f.close()
    with p.open("ab") as out:
        out.write(b"while down\n")
    g = Follower(p, *kept)
    assert g.read() == ["while down"], "expected a new follower to go on from the kept inode and offset"
    g.close()


def test_a_line_longer_than_the_bound_is_cut_and_the_rest_skipped(tmp_path: Path) -> None:
    p = tmp_path / "app.log"
    p.write_bytes(b"a" * 100 + b"\nshort\n" + b"b" * 5000)
    f = Follower(p, max_line=64)
    assert f.read() == ["a" * 64, "short", "b" * 64], "expected long lines cut at the bound"
    with p.open("ab") as out:
        out.write(b"b" * 3000 + b"\nnext\n")
    assert f.read() == ["next"], "expected the rest of the cut line skipped"
    assert f.cut == 2
    f.close()


@given(st.lists(st.binary(max_size=300), max_size=20))
@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
def test_junk_bytes_become_lines_without_a_crash(tmp_path: Path, chunks: list[bytes]) -> None:
    p = tmp_path / f"junk-{secrets.token_hex(4)}.log"
    p.write_bytes(b"")
    f = Follower(p, max_line=128)
    got: list[str] = []
    for c in chunks:
        with p.open("ab") as out:
            out.write(c)
        got += f.read()
    *complete, tail = b"".join(chunks).split(b"\n")
    expected = [seg[:128].decode("utf-8", "replace") if len(seg) > 128 else seg.decode("utf-8", "replace").rstrip("\r")
                for seg in complete]
    if len(tail) > 128:  # a partial line past the bound is cut at once
        expected.append(tail[:128].decode("utf-8", "replace"))
    assert got == expected, f"expected each line (cut at 128 bytes) once, got {got!r} for {chunks!r}"
    f.close()
    p.unlink()


def test_the_collector_keeps_access_and_app_records_and_its_offsets(tmp_path: Path) -> None:
    envoy = tmp_path / "envoy.log"
    app = tmp_path / "app.log"
    access = {"time": "2026-12-02T10:00:00.500Z", "direction": "inbound", "status": 503, "trace_id": T, "path": "/x"}
    sources = [LogSource(envoy, "access", "web.default", "web-1"), LogSource(app, "app", "pay.default", "pay-1")]
    spool = Spool(tmp_path / "logs", prefix="logs-")
    c = Collector(spool, sources, "web-1", tmp_path / "logs" / "follow.json", clock=lambda: 2000.0)
    envoy.write_text("[2026-12-02 10:00:00.000][1][info][main] starting\n" + json.dumps(access) + "\n")  # files that appear later
    app.write_text(f"ERROR payment failed trace_id={T}\n\nall good\n")  # are read from their start
    assert c.poll() == 3, "expected Envoy's own line and the blank line left out"
    lines, _ = spool.read()
    records = [from_line(x) for x in lines]
    a, e, ok = records
    assert (a["source"], a["level"], a["trace_id"], a["time"], a["service"]) == ("access", "error", T, 1796205600.5, "web.default"), a
    assert (e["source"], e["level"], e["trace_id"], e["service"], e["instance"]) == ("app", "error", T, "pay.default", "pay-1"), e
    assert (ok["level"], ok["trace_id"], ok["time"]) == ("", "", 2000.0), ok
    for f in c.followers:
        f.close()
    with app.open("a") as out:
        out.write("after restart\n")
    again = Collector(spool, sources, "web-1", tmp_path / "logs" / "follow.json")
    assert again.poll() == 1, "expected a new collector to go on from the kept offsets (no line twice)"
    for f in again.followers:
        f.close()


def test_an_access_record_only_from_access_log_lines() -> None:
    assert access_record("[info] not json", "n", "s.d", "i", 1.0) is None
    assert access_record('{"no": "direction"}', "n", "s.d", "i", 1.0) is None
    assert access_record("{broken", "n", "s.d", "i", 1.0) is None
    r = access_record('{"direction": "outbound", "status": "404", "trace_id": null, "time": "junk"}', "n", "s.d", "i", 7.0)
    assert r is not None and (r["level"], r["trace_id"], r["time"]) == ("warn", "", 7.0), r


def test_the_access_log_cuts_the_path_in_envoy() -> None:
    from google.protobuf import json_format

    from meshpilot.translate.listeners import access_log

    doc = json_format.MessageToDict(access_log("inbound", {}).typed_config)
    fmt = doc["logFormat"]["jsonFormat"]
    assert fmt["path"] == "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH):1024%", \
        f"expected Envoy to cut the logged path at 1,024 characters, got {fmt['path']!r}"


async def test_a_search_runs_off_the_event_loop_over_a_snapshot() -> None:
    import threading

    seen: list[int] = []

    class Watched(LogStore):
        def search(self, *args: Any, **kw: Any) -> list[dict[str, Any]]:
            seen.append(threading.get_ident())
            return super().search(*args, **kw)

    cp = ControlPlane(Settings(store="memory:"))
    store = Watched()
    client = TestClient(TestServer(build_api(cp.settings, cp.registry, cp.xds, routes=log_routes(store))))
    await client.start_server()
    try:
        store.add([normalise(rec("Straße ÄRGER timeout")), normalise(rec("other"))])
        found = (await (await client.get("/v1/logs?q=ärger")).json())["records"]
        assert [r["line"] for r in found] == ["Straße ÄRGER timeout"], f"expected a case-insensitive match, got {found}"
        assert seen and seen[0] != threading.get_ident(), "expected the search to run in a thread, not on the event loop"
    finally:
        await client.close()
        cp.registry.store.close()


def test_a_file_never_followed_is_read_from_its_end_at_first_sight(tmp_path: Path) -> None:
    old = tmp_path / "old.log"
    old.write_text("ERROR last week\n" * 100)
    sources = [LogSource(old, "app", "pay.default", "pay-1")]
    spool = Spool(tmp_path / "logs", prefix="logs-")
    state = tmp_path / "logs" / "follow.json"
    c = Collector(spool, sources, "web-1", state, clock=lambda: 2000.0)
    with old.open("a") as out:
        out.write("ERROR today\n")
    assert c.poll() == 1, "expected only the line written after the agent first saw the file, not its history"
    assert [from_line(x)["line"] for x in spool.read()[0]] == ["ERROR today"]
    for f in c.followers:
        f.close()
    with old.open("a") as out:
        out.write("while down\n")
    again = Collector(spool, sources, "web-1", state)
    assert again.poll() == 1, "expected a file followed before to go on from its kept offset"
    for f in again.followers:
        f.close()


def test_envoy_log_is_kept_bounded_by_truncating_it_once_read_to_its_end(tmp_path: Path) -> None:
    envoy = tmp_path / "envoy.log"
    out = os.open(envoy, os.O_WRONLY | os.O_CREAT | os.O_APPEND)  # as Envoy's stdout: O_APPEND
    sources = [LogSource(envoy, "access", "web.default", "web-1", max_bytes=4096)]
    spool = Spool(tmp_path / "logs", prefix="logs-")
    c = Collector(spool, sources, "web-1", tmp_path / "logs" / "follow.json", clock=lambda: 2000.0)
    access = json.dumps({"time": "2026-12-02T10:00:00Z", "direction": "inbound", "status": 200, "path": "/" + "p" * 100})
    try:
        os.write(out, ((access + "\n") * 40).encode() + b"[info] partial envoy li")
        assert c.poll() == 40
        assert envoy.stat().st_size > 4096, "expected a file with a partial last line left alone (not read to its end)"
        os.write(out, b"ne\n")
        assert c.poll() == 0
        assert envoy.stat().st_size == 0, f"expected envoy.log truncated once past 4096 bytes and read to its end, got {envoy.stat().st_size}"
        os.write(out, ((access + "\n") * 3).encode())
        assert c.poll() == 3, "expected the lines Envoy writes after the truncation read once each"
        assert envoy.stat().st_size < 4096, "expected a file under the bound left alone"
        assert len(spool.read(10_000, 10**7)[0]) == 43, "expected no line lost or repeated across the truncation"
    finally:
        os.close(out)
        for f in c.followers:
            f.close()


def test_a_line_read_again_after_a_crash_keeps_its_id_and_is_kept_once(tmp_path: Path) -> None:
    app = tmp_path / "app.log"
    sources = [LogSource(app, "app", "pay.default", "pay-1")]
    spool = Spool(tmp_path / "logs", prefix="logs-")
    state = tmp_path / "logs" / "follow.json"
    c = Collector(spool, sources, "web-1", state)
    app.write_text("one\ntwo\n")
    before_crash = state.read_text()
    assert c.poll() == 2
    for f in c.followers:
        f.close()
    state.write_text(before_crash)  # the agent died after the spool append, before follow.json was written
    again = Collector(spool, sources, "web-1", state)
    assert again.poll() == 2, "expected the lines read again"
    records = [from_line(x) for x in spool.read(10_000, 10**7)[0]]
    store = LogStore()
    assert store.add(records) == 2, f"expected a line read twice kept once (same id), got {[(r['id'], r['line']) for r in records]}"
    app.write_text("three\n")  # truncated in place: a new line where "one" was
    assert again.poll() == 1
    last = from_line(spool.read(10_000, 10**7)[0][-1])
    assert last["line"] == "three" and store.add([last]) == 1, "expected a new line at a reused offset to get a new id"
    for f in again.followers:
        f.close()
