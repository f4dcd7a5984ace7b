"""EtcdStore against a real etcd cluster: what one replica writes is durable in etcd and reaches the
others in order; concurrent writers converge on etcd's final value; writes share Txns; ephemeral
documents follow their writer's lease; current() follows etcd's availability; a member lost or
restarted or frozen, or history compacted under a broken watch, costs no change."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meshpilot.registry.etcd import EtcdStore
from meshpilot.registry.open import open_store
from meshpilot.registry.store import TABLES, RemoteChange, StoreError
from tests.etcd_cluster import EtcdCluster, etcd_cluster, etcd_compact, etcd_range
from tests.support import ROOT, free_port, tmpdir

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def shared() -> Iterator[EtcdCluster]:
    """One 3-member cluster for the tests that lose no member; each test has its own key prefix."""
    d = tmpdir("meshpilot-etcd-")
    with etcd_cluster(d, members=3) as cluster:
        yield cluster


@pytest.fixture
def cluster3(workdir: Path) -> Iterator[EtcdCluster]:
    with etcd_cluster(workdir, members=3) as cluster:
        yield cluster


def url_of(cluster: EtcdCluster, request: pytest.FixtureRequest) -> str:
    return f"{cluster.url}/{request.node.name.replace('_', '-')}/"


class Replica:
    """A store as the registry uses it: its own writes and the changes delivered by ``watch`` make
    its model, which must end equal to what etcd holds."""

    def __init__(self, url: str, **kw: Any) -> None:
        self.store = EtcdStore.from_url(url, **kw)
        self.model: dict[tuple[str, str], Any] = {(t, k): v for t in TABLES for k, v in self.store.items(t)}
        self.deliveries: list[tuple[list[RemoteChange], int]] = []
        self._changed = asyncio.Event()
        self.store.watch(asyncio.get_running_loop(), self._deliver)

    def write(self, puts: dict[tuple[str, str], Any], deletes: tuple[tuple[str, str], ...] = ()) -> None:
        self.store.write(puts, deletes)
        self.model.update(puts)
        for tk in deletes:
            self.model.pop(tk, None)

    def _deliver(self, changes: list[RemoteChange], revision: int) -> None:
        assert revision <= self.store.revision, f"delivered revision {revision} ahead of the view's {self.store.revision}"
        self.deliveries.append((changes, revision))
        for t, k, v in changes:
            if v is None:
                self.model.pop((t, k), None)
            else:
                self.model[(t, k)] = v
        self._changed.set()

    async def until(self, pred: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.1))
            except TimeoutError:
                pass

    def close(self) -> None:
        self.store.close()


@pytest.fixture
async def replicas() -> AsyncIterator[Callable[..., Replica]]:
    opened: list[Replica] = []

    def open_replica(url: str, **kw: Any) -> Replica:
        r = Replica(url, **kw)
        opened.append(r)
        return r

    try:
        yield open_replica
    finally:
        for r in opened:
            r.close()


def etcd_state(url: str) -> dict[tuple[str, str], Any]:
    """The documents etcd holds under the URL's prefix, keyed as the stores key them."""
    prefix = "/" + url.split("/", 3)[3]
    out: dict[tuple[str, str], Any] = {}
    for key, raw in etcd_range(url, prefix).items():
        table, _, k = key[len(prefix):].partition("/")
        out[(table, k)] = json.loads(raw)
    return out


async def test_a_synced_write_is_in_etcd_and_survives_a_reopen(shared: EtcdCluster, request: pytest.FixtureRequest) -> None:
    url = url_of(shared, request)
    a = EtcdStore.from_url(url)
    try:
        a.write({("services", "web"): {"name": "web", "ports": [80]}, ("meta", "gone"): 1})
        a.write({("instances", "w1"): {"id": "w1", "address": "127.0.0.1"}}, deletes=(("meta", "gone"),))
        await a.sync()
        synced = a.revision
    finally:
        a.close()
    prefix = "/" + url.split("/", 3)[3]
    raw = etcd_range(url, prefix)
    assert raw == {f"{prefix}instances/w1": b'{"address":"127.0.0.1","id":"w1"}',
                   f"{prefix}services/web": b'{"name":"web","ports":[80]}'}, (
        f"expected the two documents as compact sorted JSON under {prefix}<table>/<key>; etcd holds {raw}")
    b = open_store(url)
    try:
        assert b.shared and b.revision >= synced, f"expected a shared store at revision >= {synced}; got {b.revision}"
        assert b.get("services", "web") == {"name": "web", "ports": [80]}, f"reopened store has {b.get('services', 'web')}"
        assert dict(b.items("instances")) == {"w1": {"id": "w1", "address": "127.0.0.1"}}
        assert b.get("meta", "gone") is None, "a deleted document came back after a reopen"
    finally:
        b.close()
    with pytest.raises(StoreError, match="closed"):
        a.write({("meta", "late"): 1})


def test_bad_urls_and_unreachable_etcd_are_refused() -> None:
    for bad in ("etcd://", "etcd://host", "etcd://h:0", "etcd://h:p", "etcd://a:1,,b:2", "http://h:1"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            EtcdStore.from_url(bad)
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(StoreError, match=f"127.0.0.1:{port}"):
        EtcdStore.from_url(f"etcd://127.0.0.1:{port}", timeout_s=1.0)
    assert time.monotonic() - t0 < 5, "an unreachable etcd took longer than its timeout to be reported"


async def test_a_write_on_one_replica_reaches_the_other_in_order(shared: EtcdCluster, request: pytest.FixtureRequest,
                                                                 replicas: Callable[..., Replica]) -> None:
    url = url_of(shared, request)
    a, b = replicas(url), replicas(url)
    start = b.store.revision
    for i in range(50):
        a.write({("meta", "counter"): i, ("instances", f"i{i}"): {"n": i}})
    a.write({}, deletes=(("instances", "i0"),))
    await a.store.sync()
    await b.until(lambda: b.store.revision >= a.store.revision, f"B's revision to reach A's {a.store.revision}")
    await b.until(lambda: b.model == a.model, "B's model to equal A's")
    seen = [v for changes, _rev in b.deliveries for t, k, v in changes if (t, k) == ("meta", "counter")]
    assert seen == sorted(seen) and seen[-1] == 49, f"expected B to see the counter rise to 49 in order; saw {seen}"
    revs = [rev for _changes, rev in b.deliveries]
    assert revs == sorted(revs) and revs[0] > start, f"expected B's delivered revisions to rise from {start}; got {revs}"
    assert b.store.get("instances", "i0") is None and b.store.get("instances", "i7") == {"n": 7}
    assert not a.deliveries, f"expected A not to be handed its own writes; got {a.deliveries[:3]}"
    assert a.model == etcd_state(url)


async def test_concurrent_writes_to_one_key_converge_on_etcds_value(shared: EtcdCluster, request: pytest.FixtureRequest,
                                                                     replicas: Callable[..., Replica]) -> None:
    url = url_of(shared, request)
    a, b = replicas(url), replicas(url)
    for i in range(30):
        a.write({("services", "web"): {"by": "a", "n": i}, ("meta", f"a{i}"): i})
        b.write({("services", "web"): {"by": "b", "n": i}}, deletes=(("meta", f"a{i - 1}"),))
        await asyncio.gather(a.store.sync(), b.store.sync())
    final = etcd_state(url)
    for r, name in ((a, "A"), (b, "B")):
        await r.until(lambda r=r: r.model == final and dict(r.store.items("services")) == {"web": final[("services", "web")]},  # type: ignore[misc]
                      f"{name} to converge on etcd's {final[('services', 'web')]}")
        assert r.store.get("services", "web") == final[("services", "web")]


class _HeldWatch:
    """A member's Watch stub whose new streams wait until ``release`` is set."""

    def __init__(self, stub: Any, release: threading.Event) -> None:
        self.stub, self.release = stub, release

    def Watch(self, *args: Any, **kw: Any) -> Any:  # noqa: N802 - the stub's own name
        self.release.wait(20)
        return self.stub.Watch(*args, **kw)


async def test_a_later_write_by_another_replica_wins_over_a_local_write_seen_in_one_watch_response(
        shared: EtcdCluster, request: pytest.FixtureRequest, replicas: Callable[..., Replica]) -> None:
    url = url_of(shared, request)
    a, b = replicas(url), replicas(url)
    release = threading.Event()
    for member in a.store._members:
        member.watch = _HeldWatch(member.watch, release)
    try:
        with a.store._cond:
            call = a.store._watch_call
            assert call is not None
            call[0].cancel()  # A's watch resumes only after both writes below: one catch-up response
        c0 = a.store.commits
        a.write({("services", "web"): {"by": "a"}})
        await a.until(lambda: a.store.commits > c0, "A's write to be committed")
        b.write({("services", "web"): {"by": "b"}})
        await b.store.sync()
        assert a.store.get("services", "web") == {"by": "a"}, "A's own write in flight must stay what A reads"
    finally:
        release.set()
    await a.store.sync()
    await a.until(lambda: a.model.get(("services", "web")) == {"by": "b"},
                  "A to be handed B's later value once its own write came back through the watch")
    assert a.store.get("services", "web") == {"by": "b"} == etcd_state(url)[("services", "web")]


async def test_a_change_on_its_way_to_the_loop_does_not_undo_a_later_local_write(
        shared: EtcdCluster, request: pytest.FixtureRequest, replicas: Callable[..., Replica]) -> None:
    url = url_of(shared, request)
    a, b = replicas(url), replicas(url)
    a.write({("services", "x"): {"by": "a"}})
    deadline = time.monotonic() + 10
    while b.store.get("services", "x") is None:  # the loop is held: B's delivery of A's put waits in its queue
        assert time.monotonic() < deadline, "B's view never got A's write"
        time.sleep(0.001)
    b.write({}, deletes=(("services", "x"),))
    await b.store.sync()
    assert ("services", "x") not in b.model, "A's put, delivered after B deleted the document, brought it back in B's model"
    assert b.model == etcd_state(url)


async def test_three_replicas_writing_the_same_keys_at_random_converge(shared: EtcdCluster, request: pytest.FixtureRequest,
                                                                        replicas: Callable[..., Replica]) -> None:
    url = url_of(shared, request)
    rs = [replicas(url) for _ in range(3)]
    rng = random.Random(7)
    keys = [("services", f"s{n}") for n in range(6)] + [("liveness", f"l{n}") for n in range(3)]

    async def churn(r: Replica, name: str) -> None:
        for n in range(150):
            picked = rng.sample(keys, rng.randint(1, 3))
            puts = {tk: {"by": name, "n": n} for tk in picked if rng.random() < 0.7}
            r.write(puts, tuple(tk for tk in picked if tk not in puts))
            if rng.random() < 0.2:
                await r.store.sync()
            elif rng.random() < 0.5:
                await asyncio.sleep(0)

    await asyncio.gather(*(churn(r, name) for r, name in zip(rs, "abc")))
    await asyncio.gather(*(r.store.sync() for r in rs))
    final = etcd_state(url)
    for r, name in zip(rs, "abc"):
        await r.until(lambda r=r: r.model == final, f"replica {name}'s model to converge on etcd's state")  # type: ignore[misc]
        view = {(t, k): v for t in ("services", "liveness") for k, v in r.store.items(t)}
        assert view == final, f"replica {name}'s view {view} is not etcd's {final}"


async def test_concurrent_writers_share_txns(shared: EtcdCluster, request: pytest.FixtureRequest,
                                             replicas: Callable[..., Replica]) -> None:
    url = url_of(shared, request)
    a = replicas(url)
    writers, each = 16, 40

    async def writer(w: int) -> None:
        for i in range(each):
            a.store.write({("instances", f"w{w}-{i}"): {"writer": w, "i": i}})
            await a.store.sync()

    c0, t0 = a.store.commits, time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    elapsed, commits, n = time.perf_counter() - t0, a.store.commits - c0, writers * each
    print(f"\n{n} writes from {writers} concurrent writers, each synced: {n / elapsed:.0f} writes/s, "
          f"{commits} Txns ({n / commits:.1f} writes per Txn)")
    assert commits < n / 2, f"expected {n} synced writes from {writers} writers to share Txns; got {commits} Txns"
    assert len(etcd_state(url)) == n


async def test_a_write_larger_than_a_txn_is_split_in_order(shared: EtcdCluster, request: pytest.FixtureRequest,
                                                           replicas: Callable[..., Replica],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    url = url_of(shared, request)
    a, b = replicas(url), replicas(url)
    caplog.set_level(logging.WARNING, "meshpilot.registry.etcd")
    puts = {("instances", f"i{n:03}"): {"n": n} for n in range(300)}
    c0 = a.store.commits
    a.write(puts)
    assert len(list(a.store.items("instances"))) == 300, "a write is not visible at once on its own replica"
    await a.store.sync()
    assert a.store.commits - c0 == 3, f"expected 300 operations in 3 Txns of at most 128; got {a.store.commits - c0}"
    assert any("event=store_write_split" in r.message for r in caplog.records), "the split was not logged"
    # B's view takes the watched events first and hands them to the loop after, so wait for both.
    await b.until(lambda: len(list(b.store.items("instances"))) == 300 and len(b.model) == 300,
                  "B to see the 300 instances and be handed them")
    order = [k for changes, _rev in b.deliveries for _t, k, _v in changes]
    assert order == sorted(order), "B was handed the parts of the split write out of order"
    assert b.model == a.model == etcd_state(url)


async def test_ephemeral_documents_vanish_when_their_writer_closes(shared: EtcdCluster, request: pytest.FixtureRequest,
                                                                  replicas: Callable[..., Replica]) -> None:
    url = url_of(shared, request)
    a, b = replicas(url, lease_ttl_s=30), replicas(url)
    a.write({("liveness", "a"): {"replica": "a"}, ("services", "web"): {"name": "web"}})
    await a.store.sync()
    await b.until(lambda: b.model.get(("liveness", "a")) == {"replica": "a"}, "B to see A's liveness document")
    t0 = time.monotonic()
    a.close()
    await b.until(lambda: ("liveness", "a") not in b.model, "A's liveness document to vanish when A closes", timeout=5)
    assert time.monotonic() - t0 < 5, "the document vanished only when the lease expired (30 s), not when A revoked it"
    assert b.store.get("liveness", "a") is None and b.store.get("services", "web") == {"name": "web"}


CHILD = """
import asyncio, logging, os, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from meshpilot.registry.etcd import EtcdStore

async def main() -> None:
    store = EtcdStore.from_url(sys.argv[1], lease_ttl_s=float(sys.argv[2]))
    store.write({("liveness", "child"): {"pid": os.getpid()}})
    await store.sync()
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_a_frozen_replicas_ephemeral_documents_expire_and_return_when_it_thaws(
        shared: EtcdCluster, request: pytest.FixtureRequest, replicas: Callable[..., Replica], workdir: Path) -> None:
    url = url_of(shared, request)
    ttl = 2.0
    b = replicas(url)
    errlog = workdir / "child.log"
    with open(errlog, "wb") as err:
        child = subprocess.Popen([sys.executable, "-c", CHILD, url, str(ttl)], cwd=ROOT, stdout=subprocess.PIPE, stderr=err)
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 20)
        assert line == b"ready\n", f"the child store did not start: {line!r}; {errlog.read_text()[-2000:]}"
        await b.until(lambda: ("liveness", "child") in b.model, "B to see the child's liveness document")
        os.kill(child.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        await b.until(lambda: ("liveness", "child") not in b.model, "the frozen child's document to expire", timeout=ttl + 8)
        gone = time.monotonic() - t0
        assert gone > ttl / 2, f"the document vanished {gone:.1f}s after the freeze, before its {ttl}s lease could expire"
        os.kill(child.pid, signal.SIGCONT)
        await b.until(lambda: b.model.get(("liveness", "child")) == {"pid": child.pid},
                      "the thawed child to put its liveness document again on a new lease", timeout=10)
        log = errlog.read_text()
        assert "event=store_lease_lost" in log and "event=store_lease_granted" in log, (
            f"expected the child to log the lost lease and the new one; its log:\n{log[-2000:]}")
    finally:
        os.kill(child.pid, signal.SIGCONT)
        child.kill()
        child.wait()


async def test_current_follows_etcd_going_away_and_coming_back(cluster3: EtcdCluster, replicas: Callable[..., Replica],
                                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "meshpilot.registry.etcd")
    a = replicas(cluster3.url, lease_ttl_s=2, timeout_s=3)
    assert a.store.current()
    for i in range(3):
        cluster3.kill(i)
    a.write({("services", "during"): {"outage": True}})
    assert a.store.get("services", "during") == {"outage": True}, "a write during the outage is not visible locally"
    with pytest.raises(StoreError, match="within 3s"):
        await a.store.sync()
    await a.until(lambda: not a.store.current(), "current() to turn False with every member down", timeout=5)
    for i in range(3):
        cluster3.start(i, wait=False)
    cluster3.wait_healthy()
    await a.until(a.store.current, "current() to turn True once etcd is back", timeout=10)
    await a.store.sync()  # the write queued during the outage is committed now
    assert etcd_state(cluster3.url + "/meshpilot/").get(("services", "during")) == {"outage": True}
    log = "\n".join(r.message for r in caplog.records)
    assert "event=store_current current=false" in log and "event=store_current current=true" in log, (
        f"expected both transitions logged; got:\n{log[-2000:]}")


async def test_a_member_killed_restarted_or_frozen_costs_no_change(cluster3: EtcdCluster, replicas: Callable[..., Replica],
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "meshpilot.registry.etcd")
    a, b = replicas(cluster3.url, lease_ttl_s=3), replicas(cluster3.url, lease_ttl_s=3)
    for i in range(3):  # whichever member B's watch is on goes down once
        cluster3.kill(i)
        for n in range(20):
            a.write({("instances", f"m{i}-{n}"): {"n": n}})
        await a.store.sync()
        await b.until(lambda i=i: b.model.get(("instances", f"m{i}-19")) == {"n": 19},  # type: ignore[misc]
                      f"B to get the writes made while member {i} is down")
        cluster3.start(i)
        a.write({("meta", "restarted"): i})
        await a.store.sync()
        await b.until(lambda i=i: b.model.get(("meta", "restarted")) == i, f"B to see the write after member {i} restarted")  # type: ignore[misc]
    for i in range(3):  # a member that stops answering but keeps its connections open
        cluster3.freeze(i)
        t0 = time.monotonic()
        for n in range(5):
            a.write({("meta", "frozen"): [i, n]})
            await a.store.sync()
        await b.until(lambda i=i: b.model.get(("meta", "frozen")) == [i, 4], f"B to see the writes while member {i} is frozen")  # type: ignore[misc]
        took = time.monotonic() - t0
        cluster3.thaw(i)
        assert took < 6, f"expected A and B to leave frozen member {i} within a Txn attempt or two; took {took:.1f}s"
    cluster3.wait_healthy()  # a Txn attempt that a frozen member held is applied now, or never
    a.write({("meta", "last"): True})
    await a.store.sync()
    final = etcd_state(cluster3.url + "/meshpilot/")
    assert final[("meta", "frozen")] == [2, 4], f"an old attempt was applied late: etcd holds {final[('meta', 'frozen')]}"
    await b.until(lambda: b.model == final, "B to converge on etcd's state")
    assert b.model == a.model == final
    assert a.store.current() and b.store.current()
    resumed = [r.message for r in caplog.records if "event=store_watch_resumed" in r.message]
    assert resumed, "expected at least one watch to break and resume on another member"


async def test_a_store_follows_an_etcd_that_went_back(workdir: Path, replicas: Callable[..., Replica]) -> None:
    with etcd_cluster(workdir, members=1) as cluster:
        a = replicas(cluster.url, lease_ttl_s=2)
        for n in range(10):
            a.write({("services", f"s{n}"): n})
            await a.store.sync()
        a.write({("liveness", "a"): {"replica": "a"}})
        await a.store.sync()
        before = a.store.revision
        cluster.wipe(0)
        cluster.start(0)
        await a.until(lambda: not any(t == "services" for t, _k in a.model), "A to reload the emptied etcd and deliver the deletes")
        assert a.store.revision < before, f"expected A's revision to start again below {before}; it is {a.store.revision}"
        await a.until(lambda: etcd_state(cluster.url + "/meshpilot/") == {("liveness", "a"): {"replica": "a"}},
                      "A to put its liveness document again on a new lease")
        a.write({("services", "after"): 1})
        await a.store.sync()
        assert a.model == etcd_state(cluster.url + "/meshpilot/")


async def test_a_watch_resumed_after_compaction_reloads_and_delivers_the_difference(
        shared: EtcdCluster, request: pytest.FixtureRequest, replicas: Callable[..., Replica]) -> None:
    url = url_of(shared, request)
    a, b = replicas(url), replicas(url)
    a.write({("services", "keep"): 1, ("services", "drop"): 1, ("services", "change"): 1})
    await a.store.sync()
    await b.until(lambda: len(b.model) == 3, "B to see the first three documents")
    # B's watch breaks and cannot resume until etcd has compacted past B's revision
    with b.store._cond:
        call = b.store._watch_call
        assert call is not None
        call[0].cancel()
        a.write({("services", "change"): 2, ("services", "new"): 1}, deletes=(("services", "drop"),))
        await a.store.sync()
        for n in range(5):
            a.write({("meta", "churn"): n})
        await a.store.sync()
        compacted = etcd_compact(url)
    await b.until(lambda: b.model == etcd_state(url) and b.store.revision >= compacted,
                  f"B to reload past the compaction at {compacted} and deliver the difference")
    assert b.model == {("services", "keep"): 1, ("services", "change"): 2, ("services", "new"): 1, ("meta", "churn"): 4}
