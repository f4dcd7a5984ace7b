"""Durable key-value storage behind the registry.

The registry keeps its working set in memory and writes through to a ``Store``. A store holds
JSON documents in named tables; every write is durable when the call returns. ``SqliteStore`` is
the embedded default (one file, WAL journal); an etcd store implements the same interface when
several control-plane replicas share state.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

__all__ = ["MemoryStore", "SqliteStore", "Store", "open_store"]

TABLES = ("services", "instances", "policies", "meta", "kv")


class Store(Protocol):
    def items(self, table: str) -> Iterator[tuple[str, Any]]: ...
    def get(self, table: str, key: str) -> Any | None: ...
    def write(self, puts: Mapping[tuple[str, str], Any], deletes: tuple[tuple[str, str], ...] = ()) -> None:
        """Apply all puts and deletes atomically."""
    def close(self) -> None: ...


class SqliteStore:
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        for t in TABLES:
            self._db.execute(f"CREATE TABLE IF NOT EXISTS {t} (k TEXT PRIMARY KEY, v TEXT NOT NULL)")

    def items(self, table: str) -> Iterator[tuple[str, Any]]:
        _check_table(table)
        with self._lock:
            rows = self._db.execute(f"SELECT k, v FROM {table} ORDER BY k").fetchall()
        for k, v in rows:
            yield k, json.loads(v)

    def get(self, table: str, key: str) -> Any | None:
        _check_table(table)
        with self._lock:
            row = self._db.execute(f"SELECT v FROM {table} WHERE k = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def write(self, puts: Mapping[tuple[str, str], Any], deletes: tuple[tuple[str, str], ...] = ()) -> None:
        encoded = [(t, k, json.dumps(v, separators=(",", ":"), sort_keys=True)) for (t, k), v in puts.items()]
        for t, _k, _v in encoded:
            _check_table(t)
        for t, _k in deletes:
            _check_table(t)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for t, k, v in encoded:
                    self._db.execute(f"INSERT OR REPLACE INTO {t} (k, v) VALUES (?, ?)", (k, v))
                for t, k in deletes:
                    self._db.execute(f"DELETE FROM {t} WHERE k = ?", (k,))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()


class MemoryStore(SqliteStore):
    """A non-durable store for tests and benchmarks."""

    def __init__(self) -> None:
        super().__init__(":memory:")


def open_store(url: str) -> Store:
    """``sqlite:PATH`` (default scheme), ``memory:``."""
    if url in ("memory:", ":memory:"):
        return MemoryStore()
    if url.startswith("sqlite:"):
        url = url[len("sqlite:") :]
    return SqliteStore(url)


def _check_table(table: str) -> None:
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}")
