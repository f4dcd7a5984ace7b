"""Durable key-value storage behind the registry.

The registry keeps its working set in memory and writes through to a ``Store``. A store holds
JSON documents in named tables. ``write`` applies a change at once for every reader of the store;
``await sync()`` returns when every write made before it is on disk, and a front door awaits it
before it answers, so nothing is acknowledged that a crash could lose. ``SqliteStore`` is the
embedded default (one file, WAL journal, ``synchronous=FULL``): one writer thread commits, and the
writes that arrive while a commit is on its way to disk go together into the next one (group
commit), so the event loop never waits for the disk and many writers share each sync.
``MemoryStore`` keeps nothing across restarts (tests, benchmarks). Both are local: one control-plane
process owns the state. ``EtcdStore`` (etcd.py) is shared: several control-plane replicas write the
same state, each keeps a local view that etcd's watch keeps current, and ``watch`` hands a replica
the changes the others made, in etcd's order, so its registry and caches rebuild from them.

Ephemeral documents (the ``liveness``, ``replicas`` and ``runners`` tables) live as long as the process that wrote them: on etcd
they are bound to the replica's lease and vanish when the replica stops renewing it (killed, frozen,
cut off); on a local store they are never on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

__all__ = ["EPHEMERAL", "FORFEIT", "Deliver", "Guard", "MemoryStore", "RemoteChange", "SqliteStore", "Store", "StoreError", "check_table", "decoded", "encoded", "settle"]

log = logging.getLogger("meshpilot.registry.store")

TABLES = ("services", "instances", "policies", "meta", "kv", "access_tokens", "ca_roots", "join_tokens", "enrolments",
          "liveness", "replicas", "runners")
# tables whose documents live only as long as their writer: the nodes a replica holds, the replicas,
# which replica runs a Consul instance's checks or a session's TTL
EPHEMERAL = frozenset({"liveness", "replicas", "runners"})
# ephemeral tables whose documents are not put back when the writer's lease was lost: another replica
# may have taken over what they claimed meanwhile, and a claim put back would take it back with stale
# timers (the claimer claims again when its client talks to it)
FORFEIT = frozenset({"runners"})

@dataclass(frozen=True, slots=True)
class Guard:
    """A condition of ``commit_if``: the document (or, with ``prefix``, every document whose key starts
    with ``key``) unchanged in the store since the local view's revision; with ``exists``, present too."""

    table: str
    key: str
    prefix: bool = False
    exists: bool = False


# A change another writer made to a shared store: (table, key, document, or None for a delete)
RemoteChange = tuple[str, str, Any]
Deliver = Callable[[list[RemoteChange], int], None]  # (changes in store order, the store revision they bring)


class StoreError(Exception):
    """The store cannot make writes durable (closed, or a commit failed)."""


class Store(Protocol):
    # True when other control-plane replicas write the same state (etcd)
    shared: bool
    # shared: the store-wide revision the local view has reached (monotonic across replicas); local: 0
    revision: int
    # durable commits made so far (SQLite transactions, etcd Txns): many writes share one under load
    commits: int

    def items(self, table: str) -> Iterator[tuple[str, Any]]: ...
    def get(self, table: str, key: str) -> Any | None: ...
    def write(self, puts: Mapping[tuple[str, str], Any], deletes: tuple[tuple[str, str], ...] = ()) -> None:
        """Apply all puts and deletes atomically; readers see them at once, the disk after ``sync``."""
    async def sync(self) -> None:
        """Return when every write made before the call is on disk (raise ``StoreError`` if it cannot be)."""
    def close(self) -> None:
        """Commit what is pending and close."""
    async def commit_if(self, since: int, guards: Sequence[Guard], puts: Mapping[tuple[str, str], Any],
                        deletes: tuple[tuple[str, str], ...] = ()) -> bool:
        """Write ``puts`` and ``deletes`` atomically if every guard still holds in the store: nothing it
        names changed after revision ``since``, the view's ``revision`` when the decision was read from
        it (read it before deciding, and await nothing in between). Say whether it was written.
        A local store is its own truth: it writes and says True. On a shared store False means
        another replica wrote first; the local view has then caught up with that write, so the
        caller decides again from it."""
    def watch(self, loop: asyncio.AbstractEventLoop, deliver: Deliver) -> None:
        """Call ``deliver`` on ``loop`` with the changes other writers make, in store order, and the
        revision they bring the local view to (a shared store; a local one never calls it)."""
    def current(self) -> bool:
        """Whether the local view follows the store (False once a shared store has been out of reach
        for longer than its grace: the view may be stale). A local store is always current."""


_Row = tuple[str, str, str | None]  # (table, key, JSON or None for a delete)


class SqliteStore:
    """SQLite in WAL mode with group commit. ``commits`` counts transactions written to disk."""

    shared = False
    revision = 0

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path == ":memory:":
            raise ValueError("store: an in-memory SQLite database cannot be shared by reader and writer; use MemoryStore")
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        _private_file(self.path)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a WAL commit returns only after the log is synced (NORMAL leaves it to checkpoints)
        self._db.execute("PRAGMA synchronous=FULL")
        for t in TABLES:
            if t not in EPHEMERAL:
                self._db.execute(f"CREATE TABLE IF NOT EXISTS {t} (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
        self._ephemeral = _Ephemeral()
        # readers get their own connection: WAL lets them read while the writer syncs
        self._reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._read_lock = threading.Lock()
        self._cond = threading.Condition()
        self._batch: list[_Row] = []
        # writes not yet committed, newest per key, so reads see them: table -> key -> (seq, JSON | None)
        self._pending: dict[str, dict[str, tuple[int, str | None]]] = {t: {} for t in TABLES}
        self._issued = 0  # seq of the last write
        self._durable = 0  # seq of the last write on disk
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._failed = ""  # why commits stopped, once they have
        self._closed = False
        self.commits = 0
        self._writer = threading.Thread(target=self._run, name=f"store-writer {self.path}", daemon=True)
        self._writer.start()

    # ---- reading --------------------------------------------------------------------------

    def items(self, table: str) -> Iterator[tuple[str, Any]]:
        check_table(table)
        if table in EPHEMERAL:
            yield from self._ephemeral.items(table)
            return
        # the pending view first: a write committed after it was taken is in the SELECT below
        with self._cond:
            pending = {k: v for k, (_seq, v) in self._pending[table].items()}
        with self._read_lock:
            rows: dict[str, str | None] = dict(self._reader.execute(f"SELECT k, v FROM {table}").fetchall())
        rows.update(pending)
        yield from decoded(rows)

    def get(self, table: str, key: str) -> Any | None:
        check_table(table)
        if table in EPHEMERAL:
            return self._ephemeral.get(table, key)
        with self._cond:
            hit = self._pending[table].get(key)
        if hit is not None:
            return None if hit[1] is None else json.loads(hit[1])
        with self._read_lock:
            row = self._reader.execute(f"SELECT v FROM {table} WHERE k = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    # ---- writing --------------------------------------------------------------------------

    def write(self, puts: Mapping[tuple[str, str], Any], deletes: tuple[tuple[str, str], ...] = ()) -> None:
        rows: list[_Row] = [(t, k, encoded(v)) for (t, k), v in puts.items()]
        rows += [(t, k, None) for t, k in deletes]
        for t, _k, _v in rows:
            check_table(t)
        rows = self._ephemeral.take(rows)
        if not rows:
            return
        with self._cond:
            if self._closed or self._failed:
                raise StoreError(self._failed or f"store {self.path}: closed")
            self._issued += 1
            wake = not self._batch  # the writer waits only while there is no batch
            self._batch.extend(rows)
            for t, k, v in rows:
                self._pending[t][k] = (self._issued, v)
            if wake:
                self._cond.notify_all()

    async def sync(self) -> None:
        with self._cond:
            seq = self._issued
            if self._durable >= seq:
                return
            if self._failed:
                raise StoreError(self._failed)
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append((seq, fut))
        await fut

    async def commit_if(self, since: int, guards: Sequence[Guard], puts: Mapping[tuple[str, str], Any],
                        deletes: tuple[tuple[str, str], ...] = ()) -> bool:
        self.write(puts, deletes)  # one process writes this file: what it read is what is stored
        return True

    def watch(self, loop: asyncio.AbstractEventLoop, deliver: Deliver) -> None:
        pass  # nobody else writes this file

    def current(self) -> bool:
        return True

    def flush(self) -> None:
        """``sync`` for callers outside an event loop: block until every write so far is on disk."""
        with self._cond:
            seq = self._issued
            while self._durable < seq and not self._failed:
                self._cond.wait()
            if self._durable < seq:
                raise StoreError(self._failed)

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._writer.join()
        self._db.close()
        with self._read_lock:
            self._reader.close()

    # ---- the writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._batch and not self._closed:
                    self._cond.wait()
                if not self._batch:
                    return
                batch, self._batch, upto = self._batch, [], self._issued
            try:
                self._commit(batch)
            except Exception as exc:  # the disk or the file failed: acknowledge nothing from now on
                log.exception("event=store_commit_failed path=%s", self.path)
                with self._cond:
                    self._failed = f"store {self.path}: commit failed: {exc}"
                    waiters, self._waiters = self._waiters, []
                    self._cond.notify_all()
                settle(waiters, self._failed)
                return
            with self._cond:
                self._durable = upto
                self.commits += 1
                for t, k, _v in batch:
                    hit = self._pending[t].get(k)
                    if hit is not None and hit[0] <= upto:
                        del self._pending[t][k]
                done = [w for w in self._waiters if w[0] <= upto]
                self._waiters = [w for w in self._waiters if w[0] > upto]
                self._cond.notify_all()
            settle(done, None)

    def _commit(self, batch: list[_Row]) -> None:
        latest: dict[tuple[str, str], str | None] = {}  # one transaction: the newest value of each key is its end state
        for t, k, v in batch:
            latest[(t, k)] = v
        puts: dict[str, list[tuple[str, str]]] = {}
        deletes: dict[str, list[tuple[str]]] = {}
        for (t, k), v in latest.items():
            if v is None:
                deletes.setdefault(t, []).append((k,))
            else:
                puts.setdefault(t, []).append((k, v))
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for t, keys in deletes.items():
                db.executemany(f"DELETE FROM {t} WHERE k = ?", keys)
            for t, rows in puts.items():
                db.executemany(f"INSERT OR REPLACE INTO {t} (k, v) VALUES (?, ?)", rows)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise


def _private_file(path: str) -> None:
    """The store holds the mesh CA's keys and token digests: owner-only from the first byte. SQLite
    gives its WAL and shared-memory files the database file's mode."""
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    for p in (path, f"{path}-wal", f"{path}-shm"):
        with contextlib.suppress(FileNotFoundError):
            if os.stat(p).st_mode & 0o077:
                os.chmod(p, 0o600)


def encoded(doc: Any) -> str:
    """A document as the stores keep it: compact JSON with sorted keys, so equal documents are equal
    text (orjson: a tenth of the standard encoder's cost on the write path of every registration)."""
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS).decode()


def decoded(rows: Mapping[str, str | None]) -> Iterator[tuple[str, Any]]:
    """A table's rows (JSON, or None for a key deleted in an overlay) as documents, in key order."""
    for k in sorted(rows):
        v = rows[k]
        if v is not None:
            yield k, json.loads(v)


def settle(waiters: list[tuple[int, asyncio.Future[None]]], exc: str | None) -> None:
    """Wake each ``sync`` waiter (seq, future) on its own loop, one call per loop; with ``exc``, fail them."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    for _seq, fut in waiters:
        by_loop.setdefault(fut.get_loop(), []).append(fut)

    def wake(futs: list[asyncio.Future[None]]) -> None:
        for fut in futs:
            if fut.done():
                continue
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(StoreError(exc))

    for loop, futs in by_loop.items():
        try:
            loop.call_soon_threadsafe(wake, futs)
        except RuntimeError:  # that loop is closed: nobody waits any more
            pass


class MemoryStore:
    """A non-durable store for tests and benchmarks."""

    shared = False
    revision = 0

    def __init__(self) -> None:
        self._tables: dict[str, dict[str, str]] = {t: {} for t in TABLES}
        self.commits = 0

    def items(self, table: str) -> Iterator[tuple[str, Any]]:
        check_table(table)
        rows = self._tables[table]
        for k in sorted(rows):
            yield k, json.loads(rows[k])

    def get(self, table: str, key: str) -> Any | None:
        check_table(table)
        v = self._tables[table].get(key)
        return None if v is None else json.loads(v)

    def write(self, puts: Mapping[tuple[str, str], Any], deletes: tuple[tuple[str, str], ...] = ()) -> None:
        rows = [(t, k, encoded(v)) for (t, k), v in puts.items()]
        for t, _k in [*((t, k) for t, k, _v in rows), *deletes]:
            check_table(t)
        for t, k, v in rows:
            self._tables[t][k] = v
        for t, k in deletes:
            self._tables[t].pop(k, None)
        self.commits += 1

    async def sync(self) -> None:
        return None

    def close(self) -> None:
        pass

    async def commit_if(self, since: int, guards: Sequence[Guard], puts: Mapping[tuple[str, str], Any],
                        deletes: tuple[tuple[str, str], ...] = ()) -> bool:
        self.write(puts, deletes)
        return True

    def watch(self, loop: asyncio.AbstractEventLoop, deliver: Deliver) -> None:
        pass

    def current(self) -> bool:
        return True


class _Ephemeral:
    """A local store's ephemeral tables: in memory, gone with the process, as a lease-bound key on etcd
    is gone with its replica."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tables: dict[str, dict[str, str]] = {t: {} for t in EPHEMERAL}

    def items(self, table: str) -> Iterator[tuple[str, Any]]:
        with self._lock:
            rows = sorted(self._tables[table].items())
        for k, v in rows:
            yield k, json.loads(v)

    def get(self, table: str, key: str) -> Any | None:
        with self._lock:
            v = self._tables[table].get(key)
        return None if v is None else json.loads(v)

    def take(self, rows: list[_Row]) -> list[_Row]:
        """Apply the rows of ephemeral tables; return the others."""
        rest: list[_Row] = []
        with self._lock:
            for t, k, v in rows:
                if t not in EPHEMERAL:
                    rest.append((t, k, v))
                elif v is None:
                    self._tables[t].pop(k, None)
                else:
                    self._tables[t][k] = v
        return rest


def check_table(table: str) -> None:
    """Refuse a table the store does not have."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}")
