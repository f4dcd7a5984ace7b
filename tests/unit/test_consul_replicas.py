"""The Consul views on replicas of a shared store: one index sequence (the store's revision), a
blocking query on one replica woken by a write on another, KV entries and sessions followed. The
store's watch is played by handing A's written rows to B (``apply_remote``) and setting revisions."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from meshpilot.consul.agent import ConsulAgent
from meshpilot.consul.definitions import parse_service
from meshpilot.registry import Registry
from meshpilot.registry.store import MemoryStore, RemoteChange
from tests.unit.shared_store import SharedStore, hand
from tests.unit.shared_store import hand as _hand

T = TypeVar("T")


def _done(step: Coroutine[Any, Any, T]) -> T:
    """Run one KV write to its end (outside a loop; the control plane awaits it in its handler)."""
    return asyncio.run(step)


def _pair() -> tuple[ConsulAgent, SharedStore, ConsulAgent, SharedStore]:
    clock = [100]
    sa, sb = SharedStore(clock), SharedStore(clock)
    a, b = ConsulAgent(Registry(sa)), ConsulAgent(Registry(sb))
    return a, sa, b, sb


def test_the_index_is_the_stores_revision_and_a_query_on_b_wakes_for_a_write_on_a() -> None:
    async def main() -> None:
        a, sa, b, sb = _pair()
        a.register(parse_service({"Name": "web", "ID": "web-1", "Port": 8080}, "10.0.0.1"), "10.0.0.1")
        _hand(sa, sb, b.reg)
        first = b.answer("h/web", lambda: b.health_service("web", False, []))
        assert first.index == sb.revision, f"expected the index at B's view revision {sb.revision}, got {first.index}"
        waiter = asyncio.create_task(b.blocking("h/web", "svc:web.default", lambda: b.health_service("web", False, []), first.index, 5))
        await asyncio.sleep(0.02)
        assert not waiter.done(), "expected the query on B to block while nothing changed"
        a.register(parse_service({"Name": "web", "ID": "web-2", "Port": 8081}, "10.0.0.2"), "10.0.0.2")
        _hand(sa, sb, b.reg)
        ans = await asyncio.wait_for(waiter, 1)
        assert ans.index > first.index, f"expected a larger index after A's write, got {ans.index} <= {first.index}"
        assert len(__import__("json").loads(ans.body)) == 2, "expected both instances in B's answer"

    asyncio.run(main())


def test_an_index_ahead_of_this_replicas_view_is_waited_out_never_answered_with_an_older_one() -> None:
    async def main() -> None:
        a, sa, b, sb = _pair()
        a.register(parse_service({"Name": "web", "ID": "web-1", "Port": 8080}, "10.0.0.1"), "10.0.0.1")
        _hand(sa, sb, b.reg)
        seen_on_a = a.answer("h/web", lambda: a.health_service("web", False, [])).index
        # A moves on (a write B has not seen yet); the client saw A's index and now asks B
        a.register(parse_service({"Name": "db", "ID": "db-1", "Port": 5432}, "10.0.0.3"), "10.0.0.3")
        ahead = a.index
        assert ahead > sb.revision >= seen_on_a
        # B's view catches up in the wait: the answer (unchanged content) carries the caught-up index
        waiter = asyncio.create_task(b.blocking("h/web", "svc:web.default", lambda: b.health_service("web", False, []), ahead, 0.3))
        await asyncio.sleep(0.05)
        assert not waiter.done(), f"expected B to wait while its view ({sb.revision}) is behind the client's index {ahead}"
        _hand(sa, sb, b.reg)
        ans = await asyncio.wait_for(waiter, 2)
        assert ans.index >= ahead, f"expected an index no older than the client's {ahead}, got {ans.index}"

    asyncio.run(main())


def test_kv_entries_and_sessions_written_on_a_are_seen_on_b() -> None:
    a, sa, b, sb = _pair()
    sid = a.kv.create_session({"Name": "leader", "TTL": "30s"}, "10.0.0.1", lambda n, c: "passing")
    assert _done(a.kv.acquire("service/leader", b"a", 0, sid))
    _done(a.kv.put("config/x", b"1", 0, None))
    _hand(sa, sb, b.reg)
    assert b.kv.value("config/x") == b"1", f"expected A's KV entry on B, got {b.kv.value('config/x')!r}"
    held = b.kv.entries_json("service/leader", False)
    assert held and held[0]["Session"] == sid, f"expected the lock held by A's session on B, got {held}"
    assert [s["ID"] for s in b.kv.sessions_json()] == [sid]
    assert b.index >= max(e["ModifyIndex"] for e in b.kv.entries_json("", True)), "expected B's index to cover every entry"
    _done(a.kv.delete("config/x", False, None))
    a.kv.destroy(sid)
    _hand(sa, sb, b.reg)
    assert b.kv.value("config/x") is None and b.kv.sessions_json() == [], "expected the delete and the destroyed session on B"
    assert not b.kv.entries_json("service/leader", False)[0].get("Session"), "expected the lock released on B"


def _instance_health(agent: ConsulAgent, iid: str) -> str:
    inst = agent.reg.instance(iid)
    return "missing" if inst is None else inst.health.value


def test_a_ttl_check_is_run_by_the_replica_its_client_talks_to_and_adopted_when_that_one_goes() -> None:
    import time

    from meshpilot.consul.checker import _expire_ttls

    clock = [100]
    sa, sb = SharedStore(clock), SharedStore(clock)
    a = ConsulAgent(Registry(sa), replica="replica-a")
    b = ConsulAgent(Registry(sb), replica="replica-b")
    for s in (sa, sb):  # both replicas announced (their control planes do this at start)
        MemoryStore.write(s, {("replicas", "replica-a"): {}, ("replicas", "replica-b"): {}})
    a.register(parse_service({"Name": "web", "ID": "web-1", "Port": 8080, "Check": {"TTL": "5s"}}, "10.0.0.1"), "10.0.0.1")
    a.update_check("10.0.0.1", "service:web-1", "passing", "")
    iid = a.instance_id("10.0.0.1", "web-1")
    _hand(sa, sb, b.reg)
    assert a.runs(iid) and not b.runs(iid), "expected the registering replica to run the checks"
    assert "service:web-1" in b.checks.get(iid, {}), "expected B to know the check definitions"
    later = time.monotonic() + 60
    _expire_ttls(b, later)
    assert _instance_health(b, iid) == "passing", "expected B to leave a check it does not run alone"

    # the client moves to B (A is gone for it): B runs the check from its first TTL update
    b.update_check("10.0.0.1", "service:web-1", "passing", "")
    _hand(sb, sa, a.reg)
    assert b.runs(iid) and not a.runs(iid), "expected the check to follow its client to B"
    _expire_ttls(a, later)
    assert _instance_health(a, iid) == "passing", "expected A to stop expiring a TTL B runs"

    # B goes away: its runner entries vanish with its lease; A, the smallest live id, adopts them
    MemoryStore.write(sa, {}, (("runners", f"consul/{iid}"), ("replicas", "replica-b")))
    now = time.monotonic()
    assert a.adopt_orphans(now) == 1 and a.runs(iid)
    _expire_ttls(a, now + 1)
    assert _instance_health(a, iid) == "passing", "expected a full TTL from the adoption"
    _expire_ttls(a, now + 6)
    assert _instance_health(a, iid) == "critical", "expected the TTL to expire on the adopter when no client renews"


def test_a_session_ttl_follows_its_renewals_and_only_its_runner_destroys_it() -> None:
    import time

    a, sa, b, sb = _pair()
    a.replica, b.replica = "replica-a", "replica-b"
    sid = a.kv.create_session({"Name": "leader", "TTL": "10s"}, "10.0.0.1", lambda n, c: "passing")
    _hand(sa, sb, b.reg)
    assert b.kv.renew(sid) is not None
    _hand(sb, sa, a.reg)
    later = time.monotonic() + 25  # past A's own deadline (twice the TTL from the create)
    a.kv.expire(later, lambda n, c: "passing")
    assert [s["ID"] for s in a.kv.sessions_json()] == [sid], "expected A to leave a session renewed on B"
    b.kv.expire(later, lambda n, c: "passing")
    assert b.kv.sessions_json() == [], "expected B, which keeps its TTL, to end it once not renewed"


class _Etcd:
    """The truth two replicas share: each live key's document and the revision it was last written at,
    and the log of every change (what the watch replays)."""

    def __init__(self) -> None:
        self.rev = 1
        self.docs: dict[tuple[str, str], tuple[int, Any]] = {}
        self.log: list[tuple[int, tuple[str, str], Any]] = []  # (revision, key, document or None)


class _Replica(MemoryStore):
    """A replica's view of ``_Etcd``: reads and plain writes are local until ``catch_up``; ``commit_if``
    checks the guards against the truth as etcd's Txn compares would."""

    shared = True

    def __init__(self, etcd: _Etcd) -> None:
        super().__init__()
        self.etcd = etcd
        self.revision = etcd.rev
        self.registry: Registry | None = None
        self.meanwhile: list[Any] = []  # what other replicas do while this one's Txn is in flight

    def write(self, puts: Any, deletes: tuple[tuple[str, str], ...] = ()) -> None:
        super().write(puts, deletes)
        self.etcd.rev += 1
        for tk, v in puts.items():
            self.etcd.docs[tk] = (self.etcd.rev, v)
            self.etcd.log.append((self.etcd.rev, tk, v))
        for tk in deletes:
            if self.etcd.docs.pop(tk, None) is not None:
                self.etcd.log.append((self.etcd.rev, tk, None))

    async def commit_if(self, since: int, guards: Any, puts: Any, deletes: tuple[tuple[str, str], ...] = ()) -> bool:
        await asyncio.sleep(0)  # what a real store's round trip allows: the view may move meanwhile
        while self.meanwhile:
            self.meanwhile.pop(0)()
        for g in guards:  # as etcd compares: MOD of the live keys (a missing key's is 0), VERSION > 0 for exists
            hits = [(tk, rv) for tk, rv in self.etcd.docs.items()
                    if tk[0] == g.table and (tk[1].startswith(g.key) if g.prefix else tk[1] == g.key)]
            if any(rev > since for (_tk, (rev, _v)) in hits) or (g.exists and not hits):
                self.catch_up()
                return False
        if puts or deletes:
            self.write(puts, deletes)
            self.catch_up()
        return True

    def catch_up(self) -> None:
        """What the watch does: the view takes every newer document and the registry hears of it."""
        rows: list[RemoteChange] = []
        for rev, (t, k), v in self.etcd.log:
            if rev > self.revision:
                if v is None:
                    MemoryStore.write(self, {}, ((t, k),))
                else:
                    MemoryStore.write(self, {(t, k): v})
                rows.append((t, k, v))
        self.revision = self.etcd.rev
        if self.registry is not None and rows:
            self.registry.apply_remote(rows, self.revision)


def test_two_replicas_racing_for_one_lock_or_one_cas_index_let_only_one_win() -> None:
    async def main() -> None:
        etcd = _Etcd()
        sa, sb = _Replica(etcd), _Replica(etcd)
        a, b = ConsulAgent(Registry(sa), replica="replica-a"), ConsulAgent(Registry(sb), replica="replica-b")
        sa.registry, sb.registry = a.reg, b.reg
        sid_a = a.kv.create_session({"Name": "a"}, "10.0.0.1", lambda n, c: "passing")
        sid_b = b.kv.create_session({"Name": "b"}, "10.0.0.2", lambda n, c: "passing")
        sa.catch_up()
        sb.catch_up()
        # both views say the lock is free; A commits first, B's decision is checked against etcd
        won_a = await a.kv.acquire("service/leader", b"a", 0, sid_a)
        won_b = await b.kv.acquire("service/leader", b"b", 0, sid_b)
        assert (won_a, won_b) == (True, False), f"expected only the first acquire to win, got A={won_a} B={won_b}"
        held = b.kv.entries_json("service/leader", False)
        assert held and held[0]["Session"] == sid_a, f"expected B's view to show A's lock after losing, got {held}"

        # check-and-set: both read index i, both try to write with it; one wins
        assert await a.kv.put("config/x", b"0", 0, None)
        sb.catch_up()
        index = b.kv.entries_json("config/x", False)[0]["ModifyIndex"]
        first = await a.kv.put("config/x", b"from-a", 0, index)
        second = await b.kv.put("config/x", b"from-b", 0, index)
        assert (first, second) == (True, False), f"expected one check-and-set to win, got A={first} B={second}"
        assert b.kv.value("config/x") == b"from-a", f"expected B to see A's value, got {b.kv.value('config/x')!r}"

        # a refusal from a stale view is checked too: B's view is behind a release made on A
        assert await a.kv.release("service/leader", b"", 0, sid_a)
        assert await b.kv.acquire("service/leader", b"b", 0, sid_b), "expected B to take the lock A released"

    asyncio.run(main())


def test_a_write_of_another_replica_landing_during_a_commit_is_kept_and_refusals_move_no_index() -> None:
    async def main() -> None:
        etcd = _Etcd()
        sa, sb = _Replica(etcd), _Replica(etcd)
        a, b = ConsulAgent(Registry(sa), replica="replica-a"), ConsulAgent(Registry(sb), replica="replica-b")
        sa.registry, sb.registry = a.reg, b.reg

        async def b_writes_other() -> None:
            assert await b.kv.put("other", b"from-b", 0, None)

        # B writes another key; A's watch delivers it while A's own Txn is in flight
        await b_writes_other()
        sa.meanwhile.append(sa.catch_up)
        assert await a.kv.put("mine", b"from-a", 0, None)
        assert a.kv.value("other") == b"from-b", f"expected B's write kept on A, got {a.kv.value('other')!r}"
        assert a.kv.value("mine") == b"from-a"

        before = a.index
        index = a.kv.entries_json("mine", False)[0]["ModifyIndex"]
        for _ in range(20):  # refused check-and-sets write nothing
            assert not await a.kv.put("mine", b"x", 0, index + 1000)
        assert a.index == before, f"expected refusals to leave the index at {before}, got {a.index}"

    asyncio.run(main())


def test_a_lock_whose_session_is_gone_is_free() -> None:
    async def main() -> None:
        etcd = _Etcd()
        sa, sb = _Replica(etcd), _Replica(etcd)
        a, b = ConsulAgent(Registry(sa), replica="replica-a"), ConsulAgent(Registry(sb), replica="replica-b")
        sa.registry, sb.registry = a.reg, b.reg
        gone = a.kv.create_session({"Name": "gone"}, "10.0.0.1", lambda n, c: "passing")
        sa.catch_up()
        sb.catch_up()
        # B destroyed the session (its view had no lock) while A's acquire for it went through
        assert await a.kv.acquire("service/leader", b"a", 0, gone)
        b.kv.destroy(gone)
        sa.catch_up()
        live = a.kv.create_session({"Name": "live"}, "10.0.0.1", lambda n, c: "passing")
        assert await a.kv.acquire("service/leader", b"a2", 0, live), "expected a lock held by a destroyed session to be free"

    asyncio.run(main())


def test_on_a_local_store_sessions_move_no_index_above_the_answers() -> None:
    agent = ConsulAgent(Registry(MemoryStore()))
    for i in range(3):
        agent.kv.create_session({"Name": f"s{i}"}, "10.0.0.1", lambda n, c: "passing")
    _done(agent.kv.put("k", b"v", 0, None))
    entry = agent.kv.entries_json("k", False)[0]
    assert entry["ModifyIndex"] <= agent.index, f"expected ModifyIndex {entry['ModifyIndex']} <= X-Consul-Index {agent.index}"


def test_a_changed_answer_gets_a_larger_index_even_when_the_revision_came_before_the_change() -> None:
    a, sa, b, sb = _pair()
    a.register(parse_service({"Name": "web", "ID": "web-1", "Port": 8080}, "10.0.0.1"), "10.0.0.1")
    hand(sa, sb, b.reg)
    # the watch thread has moved the revision, the change itself has not reached the loop yet
    a.register(parse_service({"Name": "web", "ID": "web-2", "Port": 8081}, "10.0.0.2"), "10.0.0.2")
    rows = sa.taken()
    sb.revision = sb.clock[0]
    early = b.answer("h/web", lambda: b.health_service("web", False, []))
    MemoryStore.write(sb, {(t, k): v for t, k, v in rows if v is not None})
    b.reg.apply_remote(rows, sb.revision)
    late = b.answer("h/web", lambda: b.health_service("web", False, []))
    assert late.body != early.body and late.index > early.index, \
        f"expected the changed answer after index {early.index}, got {late.index}"
