"""The registry: durable writes, stable virtual IPs, check ownership, events."""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from meshpilot.model import Check, Instance, Service
from meshpilot.registry import Change, Conflict, NotFound, Registry, RegistryError
from meshpilot.registry.store import SqliteStore, StoreError


def _svc(name: str = "web", **kw: object) -> Service:
    return Service(name=name, ports=[{"name": "http", "port": 80}], **kw)


def _inst(i: str = "w1", **kw: object) -> Instance:
    return Instance(**{"id": i, "service": "web", "address": "127.0.0.1", "ports": {"http": 8080}, **kw})


def test_survives_restart_with_same_vips(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    r = Registry(SqliteStore(db))
    vips = {r.put_service(_svc(f"s{n}")).vip for n in range(50)}
    assert len(vips) == 50, "virtual IPs must be unique"
    r.put_service(_svc())
    r.register(_inst(checks=[Check(id="c", owner="x", status="passing")]))
    before = ([s.model_dump() for s in r.services()], [i.model_dump() for i in r.instances()])
    r.store.close()
    r2 = Registry(SqliteStore(db))
    after = ([s.model_dump() for s in r2.services()], [i.model_dump() for i in r2.instances()])
    assert after == before
    # an update keeps the VIP; a fresh registry allocates the same VIP for the same name
    assert r2.put_service(_svc(labels={"a": "b"})).vip == r2.service("web.default").vip
    assert Registry(SqliteStore(tmp_path / "other.db")).put_service(_svc()).vip == r2.service("web.default").vip


def test_checks_are_owned_and_health_is_the_worst(tmp_path: Path) -> None:
    r = Registry(SqliteStore(tmp_path / "r.db"))
    r.put_service(_svc())
    inst = r.register(_inst(checks=[Check(id="hds", owner="hds", status="critical")]))
    assert inst.health.value == "critical" and not inst.routable
    inst = r.set_check("w1", Check(id="hds", owner="hds", status="passing"))
    assert inst.routable and inst.ever_passed
    with pytest.raises(Conflict):
        r.set_check("w1", Check(id="hds", owner="consul", status="critical"))
    inst = r.set_check("w1", Check(id="ttl", owner="consul", status="warning"))
    assert inst.health.value == "warning" and inst.routable
    inst = r.set_check("w1", Check(id="ttl", owner="consul", status="critical"))
    assert not inst.routable and inst.ever_passed
    with pytest.raises(Conflict):
        r.deregister("w1", source="consul")
    r.deregister("w1", source="api")
    assert r.instances() == []


def test_bad_writes_change_nothing(tmp_path: Path) -> None:
    r = Registry(SqliteStore(tmp_path / "r.db"))
    events: list[Change] = []
    r.subscribe(events.append)
    with pytest.raises(NotFound):
        r.register(_inst())
    r.put_service(_svc())
    with pytest.raises(RegistryError) as exc:
        r.register(_inst(ports={"grpc": 1}))
    assert exc.value.field == "ports.grpc"
    r.register(_inst())
    with pytest.raises(Conflict):
        r.register(_inst(address="10.0.0.1"))
    assert r.instance("w1").address == "127.0.0.1"
    assert [(e.kind, e.op) for e in events] == [("service", "put"), ("instance", "put")]


def test_delete_service_removes_its_instances(tmp_path: Path) -> None:
    r = Registry(SqliteStore(tmp_path / "r.db"))
    r.put_service(_svc())
    r.register(_inst("a"))
    r.register(_inst("b"))
    r.delete_service("web.default")
    assert r.instances() == [] and r.services() == []
    assert list(SqliteStore(tmp_path / "r.db").items("instances")) == []


def test_writes_in_flight_together_share_a_commit_and_each_is_answered_once_committed(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    store = SqliteStore(db)
    r = Registry(store)
    r.put_service(_svc())
    n = 200
    unseen: list[str] = []

    async def register(i: int) -> None:  # what a front door does: write, then answer once durable
        r.register(_inst(f"w{i}"))
        await store.sync()
        with closing(sqlite3.connect(db)) as other:  # sees committed transactions only
            if other.execute("SELECT 1 FROM instances WHERE k = ?", (f"w{i}",)).fetchone() is None:
                unseen.append(f"w{i}")

    async def main() -> None:
        await asyncio.gather(*(register(i) for i in range(n)))

    before = store.commits
    asyncio.run(main())
    commits = store.commits - before
    assert not unseen, f"expected each write to be committed when sync() returned; not committed: {unseen[:5]}"
    assert 0 < commits < n, f"expected {n} concurrent writes to share commits, got {commits} commits"
    store.close()
    assert len(list(SqliteStore(db).items("instances"))) == n


def test_reads_see_writes_before_they_are_committed(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "r.db")
    store.write({("kv", "a"): {"n": 1}, ("kv", "b"): 2})
    store.write({("kv", "c"): 3}, (("kv", "b"),))
    assert store.get("kv", "a") == {"n": 1} and store.get("kv", "b") is None
    assert list(store.items("kv")) == [("a", {"n": 1}), ("c", 3)]
    store.flush()
    assert list(store.items("kv")) == [("a", {"n": 1}), ("c", 3)]
    store.close()


def test_a_write_that_cannot_be_committed_is_never_acknowledged(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    store = SqliteStore(db)
    store.write({("kv", "a"): 1})
    asyncio.run(store.sync())
    with closing(sqlite3.connect(db)) as other:
        other.execute("DROP TABLE kv")  # the next commit fails inside SQLite
    store.write({("kv", "b"): 2})
    with pytest.raises(StoreError) as exc:
        asyncio.run(store.sync())
    assert "no such table" in str(exc.value), f"expected the commit's own error, got {exc.value}"
    with pytest.raises(StoreError):
        store.write({("kv", "c"): 3})
    store.close()


@pytest.mark.parametrize("url", ["postgres://db/meshpilot", "zookeeper://127.0.0.1:2181"])
def test_a_store_url_of_another_scheme_is_refused(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from meshpilot.registry.open import open_store

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"sqlite:PATH, etcd://HOST:PORT") as exc:
        open_store(url)
    assert url.split("://")[0] in str(exc.value), f"expected the refused scheme named, got {exc.value}"
    assert not list(tmp_path.iterdir()), f"expected nothing created for {url}, found {list(tmp_path.iterdir())}"


def test_the_store_files_are_the_owners_alone(tmp_path: Path) -> None:
    """The store holds the mesh CA's private keys: no other user may read the file or its WAL."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        loose = tmp_path / "old.db"
        loose.write_text("")
        loose.chmod(0o644)  # a store made before, with a wider mode
        for path in (tmp_path / "new.db", loose):
            store = SqliteStore(path)
            store.write({("services", "x"): {"v": 1}})
            store.flush()
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir() if p.name.startswith(path.name)}
            store.close()
            assert modes and all(m == 0o600 for m in modes.values()), f"expected the store's files 0600, got {modes}"
    finally:
        os.umask(old)


def test_a_commit_of_many_writes_to_one_key_keeps_the_last(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    store.write({("kv", "a"): 1, ("kv", "b"): 1})
    store.write({}, (("kv", "a"),))
    store.write({("kv", "b"): 2, ("kv", "c"): 3})
    store.write({("kv", "a"): 4}, (("kv", "c"),))
    store.flush()
    store.close()
    again = SqliteStore(tmp_path / "s.db")
    try:
        assert dict(again.items("kv")) == {"a": 4, "b": 2}, f"expected each key's last write on disk, got {dict(again.items('kv'))}"
    finally:
        again.close()
