"""The node's span spool, receiver and shipper (meshpilot/sidecar/traces.py): rotation within the size
and count bounds, the oldest file dropped and counted, the cursor kept across a restart and moved only
after a 2xx, torn lines cut, junk posted to the receiver refused without harm."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshpilot.sidecar.traces import Backend, Cursor, Receiver, Shipper, Spool


def span(n: int, trace: str = "ab" * 16, pad: int = 0) -> dict[str, Any]:
    s: dict[str, Any] = {"traceId": trace, "id": f"{n + 1:016x}", "name": "get", "kind": "CLIENT",
                         "timestamp": 1_700_000_000_000_000 + n, "duration": 10, "localEndpoint": {"serviceName": "web"}}
    if pad:
        s["tags"] = {"pad": "x" * pad}
    return s


def ids(lines: list[bytes]) -> list[str]:
    return [json.loads(raw)["id"] for raw in lines]


def test_read_does_not_consume_until_commit_and_commit_survives_a_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append([span(i) for i in range(10)])
    lines, cursor = spool.read(max_spans=4)
    assert ids(lines) == [f"{i + 1:016x}" for i in range(4)], f"expected the first four spans, got {ids(lines)}"
    again, _ = spool.read(max_spans=4)
    assert again == lines, "expected an uncommitted read to give the same spans again"
    spool.commit(cursor, shipped=4)
    reopened = Spool(tmp_path)  # the agent restarted
    assert reopened.cursor == cursor, f"expected the cursor {cursor} kept across a restart, got {reopened.cursor}"
    rest, _ = reopened.read(max_spans=100)
    assert ids(rest) == [f"{i + 1:016x}" for i in range(4, 10)], f"expected the six unshipped spans after a restart, got {ids(rest)}"
    assert reopened.pending() == 6, f"expected 6 pending, got {reopened.pending()}"


def test_files_rotate_at_the_size_bound_and_the_oldest_is_dropped_and_counted(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_file_bytes=2048, max_files=3)
    one = len(json.dumps(span(0, pad=400), separators=(",", ":"))) + 1
    per_file = 2048 // one
    spool.append([span(i, pad=400) for i in range(per_file * 5)])
    files = sorted((tmp_path).glob("spans-*.jsonl"))
    assert len(files) == 3, f"expected at most 3 files, got {[f.name for f in files]}"
    assert all(f.stat().st_size <= 2048 for f in files), f"expected every file within 2048 bytes, got {[f.stat().st_size for f in files]}"
    kept = sum(f.read_bytes().count(b"\n") for f in files)
    assert spool.stats.dropped == per_file * 5 - kept, f"expected {per_file * 5 - kept} dropped, got {spool.stats.dropped}"
    lines, _ = spool.read(max_spans=10_000, max_bytes=10**7)
    assert len(lines) == kept, f"expected the {kept} kept spans readable, got {len(lines)}"
    assert json.loads(lines[-1])["id"] == f"{per_file * 5:016x}", "expected the newest span kept"
    assert Spool(tmp_path, max_file_bytes=2048, max_files=3).stats.dropped == spool.stats.dropped, "expected the dropped count kept across a restart"


def test_shipped_files_are_deleted_and_only_unshipped_spans_count_as_dropped(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_file_bytes=1024, max_files=2)
    spool.append([span(i, pad=300) for i in range(6)])  # ~2 spans a file: three files, the first dropped
    first_drop = spool.stats.dropped
    lines, cursor = spool.read(max_spans=1000)
    spool.commit(cursor, shipped=len(lines))
    assert spool.pending() == 0, f"expected nothing pending after a full commit, got {spool.pending()}"
    assert len(spool.files) == 1, f"expected the files behind the cursor deleted, got {spool.files}"
    spool.append([span(i, pad=300) for i in range(6, 12)])
    assert spool.stats.dropped - first_drop < 6, "expected shipped spans never counted as dropped"


def test_a_torn_last_line_is_cut_when_the_spool_opens_again(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append([span(0), span(1)])
    newest = tmp_path / spool_name(spool.files[-1])
    with newest.open("ab") as f:
        f.write(b'{"traceId":"abab')  # the agent died mid-append
    reopened = Spool(tmp_path)
    lines, _ = reopened.read()
    assert ids(lines) == ["0000000000000001", "0000000000000002"], f"expected the two whole spans, got {lines}"
    reopened.append([span(2)])
    lines, _ = reopened.read()
    assert ids(lines)[-1] == "0000000000000003", f"expected a new span after the cut, got {lines}"


def spool_name(seq: int) -> str:
    return f"spans-{seq:012d}.jsonl"


def test_a_damaged_cursor_file_starts_from_the_oldest_span(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append([span(0)])
    (tmp_path / "cursor.json").write_text("{junk")
    lines, _ = Spool(tmp_path).read()
    assert ids(lines) == ["0000000000000001"], f"expected the span read again, got {lines}"


# ---- the receiver ---------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=30,
)
span_like = st.fixed_dictionaries({}, optional={
    "traceId": st.one_of(st.text(max_size=40), st.from_regex(r"[0-9a-f]{1,32}", fullmatch=True), json_values),
    "id": st.one_of(st.from_regex(r"[0-9a-fA-F]{1,17}", fullmatch=True), json_values),
    "parentId": json_values, "name": json_values, "kind": st.sampled_from(["CLIENT", "server", "x", 3]),
    "timestamp": st.one_of(st.integers(-5, 2**64), st.text(max_size=20)), "duration": json_values,
    "localEndpoint": json_values, "tags": json_values, "annotations": json_values,
})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(st.binary(max_size=200), st.lists(st.one_of(span_like, json_values), max_size=6).map(lambda v: json.dumps(v).encode())))
def test_the_receiver_refuses_junk_and_keeps_only_good_spans(tmp_path_factory: Any, body: bytes) -> None:
    spool = Spool(tmp_path_factory.mktemp("spool"))
    receiver = Receiver(spool)
    status, answer = receiver.take(body)
    assert status in (202, 400), f"expected 202 or 400, got {status} {answer}"
    lines, _ = spool.read(max_spans=100)
    if status == 400:
        assert not lines and answer["fields"], f"expected nothing kept and the field named, got {answer} {lines}"
        return
    assert len(lines) == answer["accepted"], f"expected {answer['accepted']} spans kept, got {len(lines)}"
    for raw in lines:
        doc = json.loads(raw)
        assert len(doc["traceId"]) == 32 and len(doc["id"]) == 16, f"expected normalised ids, got {doc}"


# ---- the shipper ----------------------------------------------------------------------------------


class FakeBackend:
    """An in-process HTTP endpoint answering the statuses it is given, one per request."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.bodies: list[Any] = []
        self.headers: list[dict[str, str]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(json.loads(await request.read()))
        self.headers.append(dict(request.headers))
        return web.json_response({}, status=self.statuses.pop(0) if self.statuses else 200)


async def test_the_cursor_moves_only_after_a_2xx_and_a_refused_batch_is_counted(tmp_path: Path) -> None:
    fake = FakeBackend([503, 500, 202, 400])
    app = web.Application()
    app.router.add_post("/v1/spans", fake.handle)
    async with TestServer(app) as server:
        spool = Spool(tmp_path)
        spool.append([span(i) for i in range(3)])
        url = str(server.make_url("/v1/spans"))
        shipper = Shipper(spool, Backend((url,), "meshpilot", {"Authorization": "Bearer t"}), batch_spans=10)
        async with aiohttp.ClientSession() as http:
            assert await shipper.ship_once(http) is None and spool.cursor == Cursor(spool.files[0], 0), \
                f"expected the cursor kept after a 503, got {spool.cursor}"
            assert await shipper.ship_once(http) is None and spool.pending() == 3, "expected the spans kept after a 500"
            assert await shipper.ship_once(http) == 3 and spool.pending() == 0, f"expected the batch shipped on a 202, pending {spool.pending()}"
            spool.append([span(9)])
            assert await shipper.ship_once(http) == 1 and spool.stats.refused == 1, \
                f"expected a batch refused with 400 dropped and counted, got refused={spool.stats.refused}"
            assert await shipper.ship_once(http) == 0, "expected nothing left to send"
    assert [len(b) for b in fake.bodies] == [3, 3, 3, 1], f"expected the same batch sent until taken, got {fake.bodies}"
    assert fake.headers[0].get("Authorization") == "Bearer t", f"expected the token sent, got {fake.headers[0]}"


async def test_a_dead_backend_keeps_every_span_and_otlp_bodies_name_the_service(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append([span(i) for i in range(5)])
    dead = Shipper(spool, Backend(("http://127.0.0.1:9/v1/spans",)))  # discard port: nothing listens
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        assert await dead.ship_once(http) is None, "expected a failed send"
    assert spool.pending() == 5 and dead.failures == 1, f"expected all 5 spans kept, got {spool.pending()}"
    lines, _ = spool.read()
    otlp = json.loads(Backend(("x",), "otlp").body(lines))
    resource = otlp["resourceSpans"][0]
    assert resource["resource"]["attributes"] == [{"key": "service.name", "value": {"stringValue": "web"}}], f"got {resource['resource']}"
    sent = resource["scopeSpans"][0]["spans"]
    assert len(sent) == 5 and sent[0]["traceId"] == "ab" * 16 and sent[0]["kind"] == 3, f"expected 5 client spans, got {sent[:1]}"
    assert int(sent[0]["endTimeUnixNano"]) - int(sent[0]["startTimeUnixNano"]) == 10_000, "expected the duration in nanoseconds"
