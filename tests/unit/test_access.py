"""Access tokens: scopes, hashed storage, expiry and revocation, and how the management API and the
Consul-compatible API honour them."""

from __future__ import annotations

import hmac
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from meshpilot.access import AccessTokens, Scope
from meshpilot.access import tokens as tokens_module
from meshpilot.registry.store import MemoryStore, SqliteStore


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_scopes_are_ordered_read_write_admin() -> None:
    assert Scope.read < Scope.write < Scope.admin, "expected read < write < admin"
    assert [Scope.named(n) for n in ("read", "write", "admin")] == [Scope.read, Scope.write, Scope.admin]
    with pytest.raises(ValueError, match="scope"):
        Scope.named("root")


def test_round_trip_through_sqlite_stores_only_the_digest(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    store = SqliteStore(path)
    tokens = AccessTokens(store, "boot")
    issued = tokens.create(Scope.write, "deploy bot", ttl_s=3600)
    assert issued.secret.startswith(f"mpa.{issued.token.id}."), f"expected mpa.<id>.<random>, got {issued.secret!r}"
    store.flush()
    store.close()
    raw = sqlite3.connect(path).execute("SELECT k, v FROM access_tokens").fetchall()
    assert [k for k, _v in raw] == [issued.token.id], f"expected one row keyed by the id, got {raw}"
    random_part = issued.secret.rsplit(".", 1)[1]
    assert random_part not in raw[0][1] and issued.secret not in raw[0][1], f"the secret is stored: {raw[0][1]}"
    assert json.loads(raw[0][1])["digest"] == tokens_module.digest(issued.secret)
    # a new process over the same file knows the token
    again = AccessTokens(SqliteStore(path), "boot")
    assert again.check(issued.secret) == Scope.write
    listed = again.list()
    assert [(t.id, t.scope, t.description) for t in listed] == [(issued.token.id, Scope.write, "deploy bot")]
    assert "secret" not in listed[0].public(0.0) and "digest" not in listed[0].public(0.0)


def test_bootstrap_token_is_admin_and_unknown_secrets_are_refused() -> None:
    tokens = AccessTokens(MemoryStore(), "boot")
    assert tokens.enabled and tokens.check("boot") == Scope.admin
    for bad in ("", "boot ", "Boot", "mpa.nope.x", "mpa..x", "x" * 10_000, "\udcff"):
        assert tokens.check(bad) is None, f"expected {bad[:20]!r} refused"
    issued = tokens.create(Scope.read)
    forged = issued.secret[:-1] + ("A" if issued.secret[-1] != "A" else "B")
    assert tokens.check(forged) is None, "a secret with the right id and a wrong random part must be refused"
    assert not AccessTokens(MemoryStore(), None).enabled, "without a bootstrap token authorisation is off"


def test_expiry() -> None:
    clock = Clock()
    tokens = AccessTokens(MemoryStore(), "boot", clock)
    issued = tokens.create(Scope.read, ttl_s=60)
    assert tokens.check(issued.secret) == Scope.read
    clock.now += 59.9
    assert tokens.check(issued.secret) == Scope.read
    clock.now += 0.1
    assert tokens.check(issued.secret) is None, "expected the token refused once its ttl has passed"
    assert tokens.list()[0].public(clock.now)["expired"] is True
    for ttl in (0, -1, 10**10):
        with pytest.raises(ValueError, match="ttl_s"):
            tokens.create(Scope.read, ttl_s=ttl)
    with pytest.raises(ValueError, match="description"):
        tokens.create(Scope.read, "d" * 257)


def test_revoke_takes_effect_at_once() -> None:
    store = MemoryStore()
    tokens = AccessTokens(store, "boot")
    other_door = AccessTokens(store, "boot")  # the Consul port builds its own over the same store
    a, b = tokens.create(Scope.admin), tokens.create(Scope.read)
    assert other_door.check(a.secret) == Scope.admin
    assert tokens.revoke(a.token.id) is not None
    assert tokens.check(a.secret) is None and other_door.check(a.secret) is None, "a revoked token must be refused at once"
    assert tokens.check(b.secret) == Scope.read
    assert tokens.revoke(a.token.id) is None, "revoking twice: nothing to revoke"
    assert [t.id for t in tokens.list()] == [b.token.id]


def test_check_compares_digests_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every comparison goes through hmac.compare_digest, on digests, never on the secrets."""
    tokens = AccessTokens(MemoryStore(), "boot")
    issued = tokens.create(Scope.write)
    seen: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(tokens_module.hmac, "compare_digest", spy)
    assert tokens.check(issued.secret) == Scope.write
    assert tokens.check("boot") == Scope.admin
    stored = tokens_module.digest(issued.secret)
    assert (tokens_module.digest(issued.secret), stored) in seen, f"expected the stored digest compared, got {seen}"
    for a, b in seen:
        assert len(a) == len(b) == 64 and issued.secret not in (a, b) and "boot" not in (a, b), f"compared more than digests: {a!r} {b!r}"
