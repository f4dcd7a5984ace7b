"""Consul KV with sessions against an in-memory registry: locks, lock delay, session lifetimes,
transactions that apply whole or not at all, and junk thrown at the transaction parser."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpilot.consul.definitions import ConsulError
from meshpilot.consul.kv import KeyValue
from meshpilot.registry import Registry
from meshpilot.registry.store import MemoryStore

LATER = 10_000.0  # far enough past every TTL and lock delay used here

T = TypeVar("T")


def _done(step: Coroutine[Any, Any, T]) -> T:
    """Run one KV write to its end (outside a loop; the control plane awaits it in its handler)."""
    return asyncio.run(step)


def _kv(registry: Registry | None = None) -> KeyValue:
    reg = registry or Registry(MemoryStore())
    return KeyValue(reg, lambda: reg.revision)


def _passing(node: str, check: str) -> str | None:
    return "passing" if check == "serfHealth" else None


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_acquire_release_and_lock_index() -> None:
    kv = _kv()
    a = kv.create_session({"Name": "a"}, "10.0.0.1", _passing)
    b = kv.create_session(None, "10.0.0.2", _passing)
    assert _done(kv.acquire("lock", b"a", 7, a)), "expected a free key to be acquired"
    assert not _done(kv.acquire("lock", b"b", 7, b)), "expected a key held by another session to be refused"
    assert _done(kv.acquire("lock", b"a2", 7, a)), "expected the holder to acquire again"
    [entry] = kv.entries_json("lock", False)
    assert (entry["Session"], entry["LockIndex"], base64.b64decode(entry["Value"])) == (a, 1, b"a2"), entry
    assert not _done(kv.release("lock", b"", 0, b)), "expected a release by another session to fail"
    assert _done(kv.release("lock", b"free", 0, a))
    [entry] = kv.entries_json("lock", False)
    assert "Session" not in entry and entry["LockIndex"] == 1 and base64.b64decode(entry["Value"]) == b"free", entry
    assert _done(kv.acquire("lock", b"b", 0, b)), "expected an explicitly released key to be free at once"
    assert kv.entries_json("lock", False)[0]["LockIndex"] == 2
    with pytest.raises(ConsulError) as err:
        _done(kv.acquire("lock", b"", 0, "no-such-session"))
    assert err.value.status == 500 and "invalid session" in err.value.message


def test_invalidation_releases_or_deletes_and_applies_the_lock_delay() -> None:
    kv = _kv()
    keep = kv.create_session({"LockDelay": "1s"}, "n", _passing)
    drop = kv.create_session({"Behavior": "delete", "LockDelay": 0}, "n", _passing)
    other = kv.create_session({}, "n", _passing)
    assert _done(kv.acquire("kept", b"v", 0, keep)) and _done(kv.acquire("dropped", b"v", 0, drop))
    kv.destroy(keep)
    kv.destroy(drop)
    assert [e.get("Session") for e in kv.entries_json("kept", False)] == [None], "expected the lock released with the session"
    assert kv.entries_json("dropped", False) == [], "expected Behavior delete to delete the key"
    assert not _done(kv.acquire("kept", b"", 0, other)), "expected the lock delay to keep the key from being acquired at once"
    assert _done(kv.acquire("dropped", b"", 0, other)), "expected no delay for a session created with LockDelay 0"
    kv.expire(time.monotonic() + LATER, _passing)
    assert _done(kv.acquire("kept", b"", 0, other)), "expected the key acquirable once the lock delay is over"


def test_sessions_expire_after_twice_their_ttl_and_with_their_checks() -> None:
    kv = _kv()
    status = {"beat": "passing"}

    def checks(node: str, check: str) -> str | None:
        return "passing" if check == "serfHealth" else status.get(check)

    ttl = kv.create_session({"TTL": "10s"}, "n", checks)
    tied = kv.create_session({"NodeChecks": ["serfHealth"], "ServiceChecks": [{"ID": "beat"}]}, "n", checks)
    kv.expire(time.monotonic() + 15, checks)
    assert kv.renew(ttl) is not None, "expected a 10s session alive after 15s (Consul allows twice the TTL)"
    status["beat"] = "critical"
    kv.expire(time.monotonic(), checks)
    assert tied not in kv.sessions, "expected a session to end when one of its checks turns critical"
    kv.expire(time.monotonic() + 21, checks)
    assert kv.renew(ttl) is None, "expected a 10s session gone 21s after its last renewal"
    with pytest.raises(ConsulError) as err:
        kv.create_session({"ServiceChecks": [{"ID": "beat"}]}, "n", checks)
    assert err.value.status == 500 and "critical" in err.value.message


@pytest.mark.parametrize(("body", "message"), [({"TTL": "5s"}, "Invalid Session TTL"), ({"Behavior": "keep"}, "Invalid Behavior"),
                                               ({"LockDelay": "2m"}, "LockDelay"), ({"NodeChecks": ["nope"]}, "Missing check")])
def test_bad_sessions(body: dict[str, Any], message: str) -> None:
    kv = _kv()
    with pytest.raises(ConsulError) as err:
        kv.create_session(body, "n", _passing)
    assert message in err.value.message, f"expected {message!r}, got {err.value.status} {err.value.message!r}"
    assert kv.sessions == {}


def test_a_transaction_applies_whole_or_not_at_all() -> None:
    reg = Registry(MemoryStore())
    kv = _kv(reg)
    results, errors = _done(kv.txn([{"KV": {"Verb": "set", "Key": "a", "Value": _b64("1")}}, {"KV": {"Verb": "set", "Key": "b", "Flags": 3}},
                              {"KV": {"Verb": "get", "Key": "a"}, "Node": None, "Service": None}]))
    assert errors is None and results is not None, errors
    assert base64.b64decode(results[2]["KV"]["Value"]) == b"1" and results[0]["KV"]["Value"] is None, results
    before = dict(reg.documents("kv"))
    results, errors = _done(kv.txn([{"KV": {"Verb": "delete", "Key": "a"}}, {"KV": {"Verb": "set", "Key": "c"}},
                              {"KV": {"Verb": "check-index", "Key": "b", "Index": 999}}]))
    assert results is None and errors is not None and errors[0]["OpIndex"] == 2, errors
    assert dict(reg.documents("kv")) == before, "expected a failed transaction to change nothing in the store"
    assert sorted(kv.entries) == ["a", "b"]
    results, errors = _done(kv.txn([{"KV": {"Verb": "cas", "Key": "a", "Index": kv.entries["a"]["mi"], "Value": _b64("2")}},
                              {"KV": {"Verb": "delete-tree", "Key": "b"}}]))
    assert errors is None and sorted(kv.entries) == ["a"] and kv.value("a") == b"2", (errors, kv.entries)


def test_transaction_reads_and_checks_answer_like_consul() -> None:
    kv = _kv()
    sid = kv.create_session(None, "n", _passing)
    assert _done(kv.acquire("held", b"v", 0, sid))
    _done(kv.txn([{"KV": {"Verb": "set", "Key": "a", "Value": _b64("1")}}]))
    mi = kv.entries["a"]["mi"]
    results, errors = _done(kv.txn([{"KV": {"Verb": "get", "Key": "a"}}, {"KV": {"Verb": "check-index", "Key": "a", "Index": mi}},
                              {"KV": {"Verb": "check-session", "Key": "held", "Session": sid}}]))
    assert errors is None and results is not None, errors
    got = [(r["KV"]["Key"], r["KV"]["Value"]) for r in results]
    assert got == [("a", _b64("1")), ("a", None), ("held", None)], f"expected get with its value and checks without, got {got}"
    assert results[2]["KV"]["Session"] == sid, results[2]
    failures = {
        "get": ({"Verb": "get", "Key": "missing"}, 'key "missing" doesn\'t exist'),
        "check-index": ({"Verb": "check-index", "Key": "a", "Index": mi + 1}, f"current modify index {mi} != {mi + 1}"),
        "check-session": ({"Verb": "check-session", "Key": "a", "Session": sid}, f'key "a" is not currently locked by session "{sid}"'),
        "check-session of a missing key": ({"Verb": "check-session", "Key": "gone", "Session": sid}, 'key "gone" doesn\'t exist'),
    }
    for what, (op, message) in failures.items():
        results, errors = _done(kv.txn([{"KV": op}]))
        assert results is None and errors == [{"OpIndex": 0, "What": message}], f"{what}: expected {message!r}, got {errors}"


def test_sessions_and_locks_survive_a_restart_and_orphaned_locks_are_freed() -> None:
    reg = Registry(MemoryStore())
    kv = _kv(reg)
    sid = kv.create_session({"TTL": "30s"}, "n", _passing)
    assert _done(kv.acquire("held", b"", 0, sid))
    reg.write_documents("kv", {"orphan": {"v": None, "f": 0, "ci": 1, "mi": 1, "s": "gone", "li": 1}})
    again = _kv(reg)
    assert sid in again.sessions and again.entries["held"].get("s") == sid, "expected the session and its lock after a restart"
    assert "s" not in again.entries["orphan"], "expected a lock whose session is unknown to be released on load"


@settings(max_examples=300)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["KV", "Verb", "Key", "Value", "Index", "Flags", "Session", "Node"]), inner, max_size=5),
                    max_leaves=16))
def test_junk_transactions_answer_or_change_nothing(body: object) -> None:
    reg = Registry(MemoryStore())
    kv = _kv(reg)
    _done(kv.put("x", b"1", 0, None))
    before = dict(reg.documents("kv"))
    try:
        results, errors = _done(kv.txn(body))
    except ConsulError as exc:
        assert exc.status in (400, 413) and exc.message
        assert dict(reg.documents("kv")) == before
    else:
        if errors is not None:
            assert results is None and dict(reg.documents("kv")) == before
