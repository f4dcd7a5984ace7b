"""Opening the store a URL names: the one place that knows every kind of store.

``sqlite:PATH`` (a bare PATH is SQLite too) and ``memory:`` are local stores (store.py); ``etcd://``
is the shared one (etcd.py), imported only when it is used.
"""

from __future__ import annotations

from meshpilot.registry.store import MemoryStore, SqliteStore, Store

__all__ = ["open_store"]


def open_store(url: str) -> Store:
    """``sqlite:PATH`` (a bare PATH is SQLite too), ``memory:`` or ``etcd://HOST:PORT[,HOST:PORT...]``;
    any other ``scheme://`` is refused."""
    if url in ("memory:", ":memory:"):
        return MemoryStore()
    if url.startswith("etcd://"):
        from meshpilot.registry.etcd import EtcdStore  # the etcd client loads only when it is used

        return EtcdStore.from_url(url)
    if url.startswith("sqlite:"):
        return SqliteStore(url[len("sqlite:") :])
    if "://" in url:
        raise ValueError(f"store: {url.split('://', 1)[0]}:// is not a store this build has; use sqlite:PATH, "
                         "etcd://HOST:PORT[,HOST:PORT...] or memory:")
    return SqliteStore(url)
