"""The Consul KV on replicas of one etcd, through the HTTP API as Consul clients use it: a lock taken
by sessions on two replicas at once has one holder, and check-and-set writes racing with one index on
two replicas let exactly one through (each decision is an etcd Txn with the keys it read as compares)."""

from __future__ import annotations

import base64
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.etcd_cluster import etcd_cluster
from tests.support import ControlPlaneProc, free_port, http, wait_until

pytestmark = pytest.mark.e2e


@contextlib.contextmanager
def _replicas(tmp_path: Path, n: int = 2) -> Iterator[list[str]]:
    (tmp_path / "etcd").mkdir()
    with etcd_cluster(tmp_path / "etcd", members=1) as etcd:
        procs = []
        try:
            for i in range(n):
                d = tmp_path / f"replica{i}"
                d.mkdir()
                procs.append(ControlPlaneProc(d, store=etcd.url, extra=["--consul-port", str(free_port())]).start())
            yield [f"http://127.0.0.1:{p.ports['consul']}" for p in procs]
        finally:
            for p in procs:
                p.stop()


def _race(calls: list[tuple[str, str]]) -> list[object]:
    """PUT every (base URL, path) at once, from one thread each; their bodies in order."""
    out: list[object] = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def one(i: int, base: str, path: str) -> None:
        start.wait()
        status, body, _ = http("PUT", base + path, b"v", timeout=10)
        out[i] = body if status == 200 else f"status {status}: {body}"

    threads = [threading.Thread(target=one, args=(i, b, p)) for i, (b, p) in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    return out


def test_one_lock_holder_and_one_check_and_set_winner_across_replicas(tmp_path: Path) -> None:
    with _replicas(tmp_path) as (a, b):
        sessions = []
        for i in range(8):
            base = a if i % 2 == 0 else b
            status, body, _ = http("PUT", base + "/v1/session/create", {"Name": f"s{i}", "TTL": "30s"})
            assert status == 200, f"expected a session, got {status} {body}"
            sessions.append((base, body["ID"]))
        for rnd in range(5):
            key = f"service/leader-{rnd}"
            won = _race([(base, f"/v1/kv/{key}?acquire={sid}") for base, sid in sessions])
            assert all(isinstance(w, bool) for w in won), f"expected true/false answers, got {won}"
            assert won.count(True) == 1, f"round {rnd}: expected one lock holder among 8 sessions on 2 replicas, got {won}"
            holder = sessions[won.index(True)][1]
            for base in (a, b):  # the other replica's view follows within the watch's delay
                wait_until(lambda base=base: http("GET", f"{base}/v1/kv/{key}")[1][0].get("Session") == holder, 5,
                           what=f"{holder} holding {key} on {base}")

        status, _, _ = http("PUT", f"{a}/v1/kv/config/x", b"0")
        assert status == 200
        for rnd in range(5):
            _, entry, _ = http("GET", f"{b}/v1/kv/config/x")
            index = entry[0]["ModifyIndex"]
            won = _race([(base, f"/v1/kv/config/x?cas={index}") for base in (a, b, a, b, a, b)])
            assert won.count(True) == 1 and won.count(False) == 5, f"round {rnd}: expected one check-and-set winner, got {won}"
            def same_newer_index() -> bool:
                _, after_a, _ = http("GET", f"{a}/v1/kv/config/x")
                _, after_b, _ = http("GET", f"{b}/v1/kv/config/x")
                return bool(after_a[0]["ModifyIndex"] == after_b[0]["ModifyIndex"] > index
                            and base64.b64decode(after_a[0]["Value"]) == b"v")

            wait_until(same_newer_index, 5, what=f"both replicas at one index newer than {index}")
