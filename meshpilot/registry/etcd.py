"""The shared store: several control-plane replicas keep one registry in etcd.

``EtcdStore`` meets the ``Store`` contract of store.py for replicas that share state. Each replica
keeps a local view of the whole key prefix, loaded with one Range when the store opens and kept
current by one etcd watch; ``items`` and ``get`` read that view, overlaid with the replica's own
writes that are not committed yet, so a read never waits for the network. ``watch`` hands the
registry the changes the other replicas make, in etcd's order, so its caches rebuild from them.

Key layout: ``<prefix><table>/<key>`` (prefix ``/meshpilot/`` unless the URL names another, as in
``etcd://h:p,h:p/mesh-a/``); each value is the document as compact JSON with sorted keys, the bytes
SqliteStore keeps.

Writing: ``write`` only queues. One committer thread sends each batch as one etcd Txn; the writes
that arrive while a Txn is in flight (sent, and until it is back through the watch, or 50 ms) go
together into the next one (group commit), up to ``max_txn_ops`` operations (128, etcd's default
``--max-txn-ops``; one of them is the writer key's, below) and ``max_txn_bytes`` (1 MiB, under
etcd's 1.5 MiB request limit). A write is atomic: it is never spread over two Txns, except a single
write larger than one Txn, which is split into ordered Txns and is then atomic per Txn only (logged
as ``event=store_write_split``). Each Txn is applied once, in order: it also moves this store's
writer key (``<prefix-without-slash>.writers/<id>``, outside the watched prefix, on the lease) on
condition that the key is where the store's last Txn left it, so an attempt that timed out and
is applied late (by a member frozen with it in its socket) changes nothing, and a retry learns
from the key that an earlier attempt went through. ``await sync()`` returns when every earlier write is
committed and the watch has brought the local view to that commit's revision (read-your-writes);
while etcd is out of reach the committer keeps retrying and ``sync`` raises ``StoreError`` after
``timeout_s``, so a write whose ``sync`` failed may still land later, once etcd is back.

Ordering: the view applies the watch's events in etcd's order and ``revision`` is the revision of
the last event applied. A key with a local write in flight keeps the local value: the events of
other replicas for it are applied to the view but not delivered, and when the local Txn is back
through the watch, a key whose etcd value is no longer the one written (another replica wrote it
later) is delivered then, so every replica converges on etcd's final state. A change that reaches
the watcher's loop after the replica wrote its key again is dropped there too. A broken watch
resumes from ``revision + 1``; when etcd has compacted that revision, or went back (a new cluster
id or a lower revision: restored from a snapshot, rebuilt), the view is reloaded with one Range and the difference is delivered as changes. A
replica does not get its own writes back.

Leases: the documents of the ephemeral tables (``EPHEMERAL`` in store.py) are put with this
replica's lease (``lease_ttl_s``, kept alive every third of it). When the replica stops renewing
(killed, frozen, cut off) etcd deletes them and every other replica's watch sees the deletes. A
replica that finds its lease gone when it comes back grants a new one and puts its ephemeral
documents again. ``close`` commits what is queued, then revokes the lease, so its ephemeral
documents vanish at once.

Failure modes: etcd unreachable when the store opens: ``StoreError`` after ``timeout_s``, naming
the endpoints. A member down, frozen or without a leader: the store talks to one member at a time
(a random one first, so replicas spread) and moves on to the next when a call to it fails or times
out (a Txn attempt gets 1.5 s, then twice as long each time) or the watch on it goes quiet (it is
asked for progress every second). Every member down, or no quorum: writes stay queued and visible
locally, ``sync`` raises after ``timeout_s``, and once the watch or the lease has been failing for
longer than the grace (``lease_ttl_s``) ``current()`` is False (logged as ``event=store_current``)
until the watch has reconnected and caught up. etcd 3.4 answers a watch progress request with its
current revision even while events before it are still on their way, so progress answers only tell
that the watch is alive and settle the ``sync`` of a Txn that changed nothing (deletes of absent
keys: no event carries its revision); ``revision`` moves with events alone.

Client: etcd's own v3 gRPC stubs as packaged by ``aetcd`` (``aetcd.rpc``), over one sync ``grpc``
channel per member, from this store's threads. aetcd's own client talks to one endpoint and runs
on one asyncio loop; the stubs give this store the choice of member (so it can leave one that
stops answering but keeps its connections open, which gRPC's own balancing does not notice), a
watch stream and lease keep-alives it controls, and Txns that never block the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import queue
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grpc
from aetcd.rpc import kv_pb2, rpc_pb2, rpc_pb2_grpc  # type: ignore[import-untyped]

from meshpilot.registry.store import EPHEMERAL, FORFEIT, TABLES, Deliver, Guard, RemoteChange, StoreError, check_table, decoded, encoded, settle

__all__ = ["DEFAULT_PREFIX", "EtcdStore"]

log = logging.getLogger("meshpilot.registry.etcd")

DEFAULT_PREFIX = "/meshpilot/"
MAX_TXN_OPS = 128  # etcd's default --max-txn-ops
MAX_TXN_BYTES = 1 << 20  # etcd refuses requests over --max-request-bytes (1.5 MiB by default)
_ATTEMPT_S = 1.5  # how long a Txn's first attempt may take before it is sent again (each next one: twice that)
_ECHO_WAIT_S = 0.05  # how long the committer waits for its last Txn to come back through the watch
_OP_OVERHEAD = 16  # bytes a put or delete adds to a Txn beyond its key and value
# the codes with which etcd or the channel say "not now": the committer tries again
_TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN,
                        grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL,
                        grpc.StatusCode.CANCELLED})
_LEADER_REQUIRED = (("hasleader", "true"),)  # a member that loses its leader ends the watch instead of going quiet

_Row = tuple[str, str, str | None]  # (table, key, JSON or None for a delete)
_Waiter = tuple[int, "asyncio.Future[None]"]


class _Abandoned(Exception):
    """The store closed while etcd was out of reach: the queued writes will not be committed."""


class EtcdStore:
    """A store shared by control-plane replicas through etcd; see the module docstring.
    ``commits`` counts Txns committed."""

    shared = True

    def __init__(self, endpoints: Sequence[tuple[str, int]], *, prefix: str = DEFAULT_PREFIX, lease_ttl_s: float = 10.0,
                 timeout_s: float = 10.0, max_txn_ops: int = MAX_TXN_OPS, max_txn_bytes: int = MAX_TXN_BYTES) -> None:
        if not endpoints:
            raise ValueError("store: etcd needs at least one HOST:PORT endpoint")
        if max_txn_ops < 2:
            raise ValueError(f"store: max_txn_ops must leave room for a document and the writer key, not {max_txn_ops}")
        if not prefix.startswith("/") or not prefix.endswith("/"):
            raise ValueError(f"store: the etcd key prefix must start and end with '/', not {prefix!r}")
        self.endpoints = tuple(endpoints)
        self.prefix = prefix
        self.lease_ttl_s = lease_ttl_s
        self.timeout_s = timeout_s
        self.max_txn_ops = max_txn_ops
        self.max_txn_bytes = max_txn_bytes
        self.revision = 0
        self.commits = 0
        self._where = ",".join(f"{h}:{p}" for h, p in self.endpoints)
        self._pfx = prefix.encode()
        self._pfx_end = self._pfx[:-1] + bytes([self._pfx[-1] + 1])  # '/' + 1: every key under the prefix
        self._members = [_Member(h, p) for h, p in self.endpoints]
        self._at = random.randrange(len(self._members))  # the member in use; replicas spread over the members

        self._cond = threading.Condition()
        self._view: dict[str, dict[str, str]] = {t: {} for t in TABLES}
        # writes not yet applied through the watch, newest per key, for reads: table -> key -> (seq, JSON | None)
        self._pending: dict[str, dict[str, tuple[int, str | None]]] = {t: {} for t in TABLES}
        self._batch: deque[tuple[int, list[_Row]]] = deque()  # queued for the committer, in write order
        self._written: deque[tuple[int, list[_Row]]] = deque()  # every write until the watch has applied it
        self._committed: deque[tuple[int, int, bool]] = deque()  # (last write seq in it, revision, changed etcd)
        self._issued = 0  # seq of the last write
        self._applied = 0  # seq of the last write committed and applied through the watch
        self._progress_rev = 0  # the newest revision a watch progress answer named
        self._cluster = 0  # etcd's cluster id: a new one (restored, rebuilt) starts its revisions again
        self._loaded_cluster = 0
        self._waiters: list[_Waiter] = []
        self._mine: dict[tuple[str, str], str] = {}  # this replica's ephemeral documents
        self._deliver: tuple[asyncio.AbstractEventLoop, Deliver] | None = None
        # emitted before ``watch`` was called: (changes, revision, seq of the last write then); kept
        # until it is, as the keys written meanwhile (a process that never watches holds them all)
        self._backlog: list[tuple[list[_Row], int, int]] = []
        # while changes are on their way to the watcher's loop: the keys written since, with the seq of
        # the last write (a change emitted before a local write must not undo it when it lands)
        self._in_flight = 0
        self._touched: dict[tuple[str, str], int] = {}
        self._closed = False  # no more writes
        self._abandon_at = 0.0  # once closed: when the committer stops retrying
        self._failed = ""
        self._stopping = threading.Event()
        # health, for current()
        self._watch_call: tuple[Any, queue.SimpleQueue[Any], int] | None = None  # (call, its requests, member)
        self._watch_down_since: float | None = None
        self._watch_heard = time.monotonic()
        self._progress_asked: float | None = None
        self._lease_lock = threading.Lock()
        self._lease = 0
        self._lease_ttl = lease_ttl_s
        self._lease_ok_at = time.monotonic()
        self._lease_valid = True
        self._reput_seq = 0
        self._was_current = True
        # the committer's: this store's writer key and the revision of its last Txn (see _commit)
        self._writer = b""
        self._writer_next = b""
        self._writer_rev = 0
        self._txn_n = 0

        try:
            deadline = time.monotonic() + timeout_s
            view, self.revision = self._load(deadline)
            self._cluster = self._loaded_cluster
            self._view = view
            self._progress_rev = self.revision
            self._grant(deadline)
            claim = self._claim_request()
            self._claim(self._call(lambda m, t: m.kv.Txn(claim, timeout=t), deadline))
        except grpc.RpcError as exc:
            for m in self._members:
                m.channel.close()
            raise StoreError(f"store: etcd at {self._where} unreachable: {exc.code().name} {exc.details()}") from None
        log.info("event=store_opened backend=etcd endpoints=%s prefix=%s revision=%d documents=%d lease=%x",
                 self._where, prefix, self.revision, sum(len(v) for v in self._view.values()), self._lease)
        self._txns = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="store-etcd-txn")  # commit_if
        self._threads = [
            threading.Thread(target=self._commit_loop, name=f"etcd-commit {self._where}", daemon=True),
            threading.Thread(target=self._watch_loop, name=f"etcd-watch {self._where}", daemon=True),
            threading.Thread(target=self._lease_loop, name=f"etcd-lease {self._where}", daemon=True),
            threading.Thread(target=self._probe_loop, name=f"etcd-probe {self._where}", daemon=True),
        ]
        for t in self._threads:
            t.start()

    @classmethod
    def from_url(cls, url: str, *, lease_ttl_s: float = 10.0, timeout_s: float = 10.0) -> EtcdStore:
        """``etcd://HOST:PORT[,HOST:PORT...][/PREFIX/]``."""
        if not url.startswith("etcd://"):
            raise ValueError(f"store: {url!r} is not an etcd://HOST:PORT[,HOST:PORT...] URL")
        hosts, slash, path = url[len("etcd://"):].partition("/")
        endpoints: list[tuple[str, int]] = []
        for part in hosts.split(","):
            host, colon, port = part.strip().rpartition(":")
            host = host.removeprefix("[").removesuffix("]")
            if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"store: {url!r}: {part!r} is not HOST:PORT (etcd://HOST:PORT[,HOST:PORT...])")
            endpoints.append((host, int(port)))
        prefix = DEFAULT_PREFIX
        if slash and path:
            prefix = "/" + path.strip("/") + "/"
        return cls(endpoints, prefix=prefix, lease_ttl_s=lease_ttl_s, timeout_s=timeout_s)

    # ---- reading --------------------------------------------------------------------------

    def items(self, table: str) -> Iterator[tuple[str, Any]]:
        check_table(table)
        with self._cond:
            rows: dict[str, str | None] = dict(self._view[table])
            rows.update((k, v) for k, (_seq, v) in self._pending[table].items())
        yield from decoded(rows)

    def get(self, table: str, key: str) -> Any | None:
        check_table(table)
        with self._cond:
            hit = self._pending[table].get(key)
            v = hit[1] if hit is not None else self._view[table].get(key)
        return None if v is None else json.loads(v)

    # ---- writing --------------------------------------------------------------------------

    def write(self, puts: Mapping[tuple[str, str], Any], deletes: tuple[tuple[str, str], ...] = ()) -> None:
        ops: dict[tuple[str, str], str | None] = {}
        for (t, k), v in puts.items():
            check_table(t)
            ops[(t, k)] = encoded(v)
        for t, k in deletes:
            check_table(t)
            ops[(t, k)] = None  # as in SqliteStore: the deletes come after the puts
        if not ops:
            return
        rows: list[_Row] = [(t, k, v) for (t, k), v in ops.items()]
        for t, k, v in rows:
            if self._op_size(t, k, v) > self.max_txn_bytes:
                raise StoreError(f"store: {t}/{k} is {len(v or '')} bytes, over the {self.max_txn_bytes} an etcd Txn takes")
        with self._cond:
            if self._closed or self._failed:
                raise StoreError(self._failed or f"store: etcd at {self._where}: closed")
            if self._in_flight:
                for t, k, _v in rows:
                    self._touched[(t, k)] = self._issued + 1
            for t, k, v in rows:
                if t in EPHEMERAL:
                    if v is None:
                        self._mine.pop((t, k), None)
                    else:
                        self._mine[(t, k)] = v
            self._enqueue(rows)

    def _enqueue(self, rows: list[_Row]) -> int:
        """Queue one write (under the lock); return its seq."""
        self._issued += 1
        seq = self._issued
        self._batch.append((seq, rows))
        self._written.append((seq, rows))
        for t, k, v in rows:
            self._pending[t][k] = (seq, v)
        size = sum(self._op_size(t, k, v) for t, k, v in rows)
        if len(rows) >= self.max_txn_ops or size > self.max_txn_bytes:
            log.warning("event=store_write_split ops=%d bytes=%d max_txn_ops=%d max_txn_bytes=%d "
                        "note=atomic_per_txn_only", len(rows), size, self.max_txn_ops, self.max_txn_bytes)
        self._cond.notify_all()
        return seq

    async def sync(self) -> None:
        with self._cond:
            seq = self._issued
            if self._applied >= seq:
                return
            if self._failed:
                raise StoreError(self._failed)
            if self._stopping.is_set():
                raise StoreError(f"store: etcd at {self._where}: closed before the writes were committed")
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiter: _Waiter = (seq, fut)
            self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.timeout_s):
                await fut
        except TimeoutError:
            raise StoreError(f"store: etcd at {self._where}: writes not committed and watched back within "
                             f"{self.timeout_s:g}s") from None
        finally:
            if not fut.done() or fut.cancelled():
                with self._cond:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)

    def watch(self, loop: asyncio.AbstractEventLoop, deliver: Deliver) -> None:
        with self._cond:
            self._deliver = (loop, deliver)
            backlog, self._backlog = self._backlog, []
            for changes, rev, issued in backlog:
                self._send(loop, deliver, changes, rev, issued)

    def current(self) -> bool:
        return self._observe(time.monotonic())

    def _observe(self, now: float) -> bool:
        """Whether the view is current; log when that changed since it was last looked at."""
        with self._cond:
            current, why = self._current(now)
            changed, self._was_current = current != self._was_current, current
        if changed:
            log.log(logging.INFO if current else logging.WARNING, "event=store_current current=%s reason=%s endpoints=%s "
                    "revision=%d", str(current).lower(), why, self._where, self.revision)
        return current

    def _current(self, now: float) -> tuple[bool, str]:
        grace = self.lease_ttl_s
        if self._watch_down_since is not None and now - self._watch_down_since > grace:
            return False, "watch_down"
        if now - self._lease_ok_at > max(grace, self._lease_ttl):
            return False, "lease_not_renewed"
        if not self._lease_valid or self._applied < self._reput_seq:
            return False, "lease_lost"
        return True, "caught_up"

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._abandon_at = time.monotonic() + self.timeout_s
            self._cond.notify_all()
        self._threads[0].join(self.timeout_s + 5)  # the committer: what is queued first
        with self._cond:  # and back through the watch, for the ``sync`` calls waiting on it
            self._cond.wait_for(lambda: not self._committed, timeout=min(self.timeout_s, 2.0))
        with self._lease_lock:
            lease, self._lease = self._lease, 0
        if lease:
            try:
                self._call(lambda m, t: m.lease.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=lease), timeout=t),
                           time.monotonic() + min(self.timeout_s, 3.0))
            except grpc.RpcError as exc:
                log.warning("event=store_lease_revoke_failed lease=%x code=%s note=expires_after_ttl", lease, exc.code().name)
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
            call = self._watch_call
        if call is not None:
            call[1].put(None)
            call[0].cancel()
        for t in self._threads[1:]:
            t.join(5)
        self._txns.shutdown(wait=False, cancel_futures=True)
        for m in self._members:
            m.channel.close()
        with self._cond:
            waiters, self._waiters = self._waiters, []
        settle(waiters, f"store: etcd at {self._where}: closed before the writes were committed")
        log.info("event=store_closed backend=etcd endpoints=%s revision=%d commits=%d", self._where, self.revision, self.commits)

    # ---- the committer thread -------------------------------------------------------------

    def _commit_loop(self) -> None:
        while True:
            with self._cond:
                while not self._batch and not self._closed:
                    self._cond.wait()
                if not self._batch:
                    return
                ops, upto = self._take()
            try:
                rev, changed = self._commit(ops)
            except (_Abandoned, grpc.RpcError) as exc:
                why = (f"store: etcd at {self._where}: closed while etcd was out of reach; writes not committed"
                       if isinstance(exc, _Abandoned) else
                       f"store: etcd at {self._where}: commit refused: {exc.code().name} {exc.details()}")
                log.error("event=store_commit_failed endpoints=%s reason=%s", self._where, why)
                with self._cond:
                    self._failed = why
                    waiters, self._waiters = self._waiters, []
                    self._cond.notify_all()
                settle(waiters, why)
                return
            with self._cond:
                self.commits += 1
                self._committed.append((upto, rev, changed))
                self._emit(self._advance())
            if not changed:
                self._ask_progress(again=True)  # no event will carry this revision: a progress answer will
            with self._cond:  # the next Txn leaves when this one is back through the watch: the writers its
                # ``sync`` wakes write again and join it (16 writers: 12-15 writes per Txn, not 8-10)
                self._cond.wait_for(lambda: not self._committed or self._closed, timeout=_ECHO_WAIT_S)

    def _take(self) -> tuple[dict[tuple[str, str], str | None], int]:
        """The next Txn's operations and the seq of the last write it completes (under the lock)."""
        ops: dict[tuple[str, str], str | None] = {}
        size = 0
        room = self.max_txn_ops - 1  # one operation is the writer key's (see _commit)
        upto = self._batch[0][0] - 1
        while self._batch:
            seq, rows = self._batch[0]
            fresh = sum(1 for t, k, _v in rows if (t, k) not in ops)  # etcd refuses a key twice in one Txn
            rsize = sum(self._op_size(t, k, v) for t, k, v in rows)
            if ops and (len(ops) + fresh > room or size + rsize > self.max_txn_bytes):
                break
            if not ops and (len(rows) > room or rsize > self.max_txn_bytes):
                n = 0  # a write too big for one Txn: its first part now, the rest next
                while n < len(rows) and n < room:
                    osize = self._op_size(*rows[n])
                    if n and size + osize > self.max_txn_bytes:
                        break
                    size += osize
                    n += 1
                for t, k, v in rows[:n]:
                    ops[(t, k)] = v
                self._batch[0] = (seq, rows[n:])
                if n == len(rows):
                    self._batch.popleft()
                    upto = seq
                return ops, upto
            self._batch.popleft()
            for t, k, v in rows:
                ops[(t, k)] = v
            size += rsize
            upto = seq
        return ops, upto

    def _commit(self, ops: dict[tuple[str, str], str | None]) -> tuple[int, bool]:
        """Commit one Txn, retrying while etcd is out of reach; return its revision and whether it
        changed anything under the prefix.

        An attempt that timed out may still be applied later (a member frozen with it in its socket
        applies it when it runs again), after the writes that followed it. So each Txn also puts this
        store's writer key (``<prefix>.writers/<id>``, on the lease: outside the watched prefix) with
        the Txn's number, if that key is still at the revision of the store's last Txn: a late
        attempt finds it moved on and changes nothing, and an attempt that finds its own number there
        knows an earlier one went through."""
        backoff = 0.05
        attempt = _ATTEMPT_S
        warned = False
        self._txn_n += 1
        number = str(self._txn_n).encode()
        while True:
            lease = self._lease
            req = rpc_pb2.TxnRequest(
                compare=[rpc_pb2.Compare(key=self._writer, target=rpc_pb2.Compare.MOD, result=rpc_pb2.Compare.EQUAL,
                                         mod_revision=self._writer_rev)],
                success=[*(
                    rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=self._key(t, k))) if v is None
                    else rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(
                        key=self._key(t, k), value=v.encode(), lease=lease if t in EPHEMERAL else 0))
                    for (t, k), v in ops.items()),
                    rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=self._writer, value=number, lease=lease))],
                failure=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=self._writer))])
            at, member = self._member()
            try:
                if not self._writer:
                    self._claim(member.kv.Txn(self._claim_request(), timeout=min(self.timeout_s, attempt)))
                    continue
                # short attempts: a Txn sent to a member that stopped answering is sent again to the next one
                resp = member.kv.Txn(req, timeout=min(self.timeout_s, attempt))
            except grpc.RpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.NOT_FOUND and "lease" in (exc.details() or ""):
                    try:
                        self._lease_gone(lease)
                        continue
                    except grpc.RpcError as grant:
                        code = grant.code()  # etcd went away in between: try again as for any outage
                if code not in _TRANSIENT:
                    raise
                self._unreachable(at, code)
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    attempt *= 2  # unless etcd is only slow: then the next attempt gives it the time it needs
                with self._cond:
                    if self._closed and time.monotonic() > self._abandon_at:
                        raise _Abandoned() from None
                if not warned:
                    log.warning("event=store_commit_retry endpoints=%s code=%s details=%r", self._where, code.name, exc.details())
                    warned = True
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            if resp.succeeded:
                rev = int(resp.header.revision)
                changed = any(r.HasField("response_put") or r.response_delete_range.deleted for r in resp.responses[:-1])
            else:
                kvs = resp.responses[0].response_range.kvs
                if not kvs:  # the writer key went with an expired lease: a new one, then this Txn again
                    self._writer = b""
                    continue
                if kvs[0].value != number:
                    log.error("event=store_writer_key_moved key=%s value=%r expected_revision=%d revision=%d",
                              self._writer.decode(), kvs[0].value, self._writer_rev, kvs[0].mod_revision)
                    self._writer_rev = int(kvs[0].mod_revision)
                    continue
                # an earlier attempt of this Txn went through; its puts made events at its revision
                rev = int(kvs[0].mod_revision)
                changed = any(v is not None for v in ops.values())
            self._writer_rev = rev
            if warned:
                log.info("event=store_commit_resumed endpoints=%s revision=%d", self._where, rev)
            return rev, changed

    def _claim_request(self) -> Any:
        """A Txn creating a new writer key for this store (see ``_commit``), unless it exists already."""
        self._writer_next = f"{self.prefix[:-1]}.writers/{uuid.uuid4().hex}".encode()
        key = self._writer_next
        return rpc_pb2.TxnRequest(
            compare=[rpc_pb2.Compare(key=key, target=rpc_pb2.Compare.CREATE, result=rpc_pb2.Compare.EQUAL, create_revision=0)],
            success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=b"0", lease=self._lease))],
            failure=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=key))])

    def _claim(self, resp: Any) -> None:
        self._writer = self._writer_next
        if resp.succeeded:
            self._writer_rev = int(resp.header.revision)
        else:  # an earlier attempt created it
            self._writer_rev = int(resp.responses[0].response_range.kvs[0].mod_revision)

    # ---- the watch thread -----------------------------------------------------------------

    def _watch_loop(self) -> None:
        backoff = 0.05
        while not self._stopping.is_set():
            with self._cond:
                start = self.revision + 1
            requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
            requests.put(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
                key=self._pfx, range_end=self._pfx_end, start_revision=start)))
            at, member = self._member()
            call = member.watch.Watch(_drain(requests), metadata=_LEADER_REQUIRED)
            with self._cond:
                self._watch_call = (call, requests, at)
                self._watch_heard = time.monotonic()
                self._progress_asked = None
            reload = ""  # why the view must be loaded again before the watch resumes
            lost = True  # the member failed this watch: the next one goes to another
            try:
                for resp in call:
                    with self._cond:
                        self._watch_heard = time.monotonic()
                    if resp.compact_revision:
                        log.warning("event=store_watch_compacted from_revision=%d compact_revision=%d", start,
                                    resp.compact_revision)
                        reload, lost = "compacted", False
                        break
                    if resp.canceled:
                        log.warning("event=store_watch_canceled reason=%r", resp.cancel_reason)
                        break
                    if resp.created:
                        if resp.header.revision < start - 1 or resp.header.cluster_id != self._cluster:
                            reload, lost = "revision_went_back", False
                            break
                        self._ask_progress()  # its answer says the watch is caught up
                    elif resp.events:
                        self._apply(resp.events)
                        backoff = 0.05
                    else:
                        self._progressed(int(resp.header.revision))
            except grpc.RpcError as exc:
                if not self._stopping.is_set():
                    log.warning("event=store_watch_broken endpoints=%s code=%s details=%r", self._where, exc.code().name,
                                exc.details())
            finally:
                requests.put(None)
                call.cancel()
                with self._cond:
                    self._watch_call = None
                    if self._watch_down_since is None:
                        self._watch_down_since = time.monotonic()
                if lost and not self._stopping.is_set():
                    self._unreachable(at, None)
            if reload:
                try:
                    self._reload(time.monotonic() + self.timeout_s, reload)
                    continue
                except grpc.RpcError as exc:
                    log.warning("event=store_reload_failed code=%s details=%r", exc.code().name, exc.details())
            self._stopping.wait(backoff)
            backoff = min(backoff * 2, 1.0)

    def _apply(self, events: Any) -> None:
        with self._cond:
            changes: list[_Row] = []
            top = self.revision
            for ev in events:
                kv = ev.kv
                top = max(top, int(kv.mod_revision))
                tk = self._parse(kv.key)
                if tk is None:
                    continue
                t, k = tk
                v: str | None
                if ev.type == kv_pb2.Event.DELETE:
                    v = None
                    self._view[t].pop(k, None)
                else:
                    v = kv.value.decode()
                    self._view[t][k] = v
                if k in self._pending[t]:
                    continue  # this replica's own write, or older than the one it has in flight
                if (t, k) in self._mine and v is not None and kv.lease != self._lease:
                    del self._mine[(t, k)]  # another replica owns that document now
                changes.append((t, k, v))
            self.revision = top
            changes += self._advance()
            self._emit(changes)

    def _progressed(self, rev: int) -> None:
        with self._cond:
            self._progress_asked = None
            self._progress_rev = max(self._progress_rev, rev)
            if self._watch_down_since is not None:
                log.info("event=store_watch_resumed endpoints=%s revision=%d", self._where, self.revision)
                self._watch_down_since = None
            self._emit(self._advance())

    def _advance(self) -> list[_Row]:
        """Settle the writes whose Txn the view has reached (under the lock): drop their overlay,
        wake their ``sync``, and return the keys whose etcd value is no longer the one written."""
        while self._committed:
            upto, rev, changed = self._committed[0]
            if rev > (self.revision if changed else max(self.revision, self._progress_rev)):
                break
            self._committed.popleft()
            self._applied = max(self._applied, upto)
            self._cond.notify_all()
        newer: list[_Row] = []
        while self._written and self._written[0][0] <= self._applied:
            _seq, rows = self._written.popleft()
            for t, k, _v in rows:
                hit = self._pending[t].get(k)
                if hit is not None and hit[0] <= self._applied:
                    del self._pending[t][k]
                    now = self._view[t].get(k)
                    if now != hit[1]:
                        newer.append((t, k, now))
        if self._waiters:
            done = [w for w in self._waiters if w[0] <= self._applied]
            if done:
                self._waiters = [w for w in self._waiters if w[0] > self._applied]
                settle(done, None)
        return newer

    def _emit(self, rows: list[_Row]) -> None:
        """Hand changes to the watcher's loop, in order (under the lock)."""
        if not rows:
            return
        self._in_flight += 1
        if self._deliver is None:
            self._backlog.append((rows, self.revision, self._issued))
            return
        loop, deliver = self._deliver
        self._send(loop, deliver, rows, self.revision, self._issued)

    def _send(self, loop: asyncio.AbstractEventLoop, deliver: Deliver, rows: list[_Row], rev: int, issued: int) -> None:
        """Deliver on ``loop`` what is still news when it gets there: a change to a key this replica
        wrote after it was emitted (``issued``: the seq of the last write then) is older than that write."""
        def land() -> None:
            with self._cond:
                self._in_flight -= 1
                fresh = [r for r in rows if self._touched.get((r[0], r[1]), 0) <= issued]
                if not self._in_flight:
                    self._touched.clear()
            if fresh:  # decoded here, on the loop, and not under the lock the readers take
                changes: list[RemoteChange] = [(t, k, None if v is None else json.loads(v)) for t, k, v in fresh]
                deliver(changes, rev)

        try:
            loop.call_soon_threadsafe(land)
        except RuntimeError:  # that loop is closed: nobody listens any more
            self._in_flight -= 1

    def _reload(self, deadline: float, why: str) -> None:
        view, rev = self._load(deadline)
        with self._cond:
            if rev < self.revision or self._loaded_cluster != self._cluster:
                # etcd went back (restored from a snapshot, or a new cluster): its revisions start again
                # from there, and the writes committed after it are gone unless written again
                log.warning("event=store_revision_went_back from=%d to=%d cluster=%x", self.revision, rev,
                            self._loaded_cluster)
                self._cluster = self._loaded_cluster
                self.revision = self._progress_rev = rev
                while self._committed:
                    self._applied = max(self._applied, self._committed.popleft()[0])
            changes: list[_Row] = []
            for t in TABLES:
                old, new = self._view[t], view[t]
                for k in sorted(old.keys() | new.keys()):
                    if old.get(k) != new.get(k) and k not in self._pending[t]:
                        changes.append((t, k, new.get(k)))
            self._view = view
            self.revision = max(self.revision, rev)
            self._progress_rev = max(self._progress_rev, rev)
            changes += self._advance()
            self._emit(changes)
        log.info("event=store_reloaded endpoints=%s reason=%s revision=%d changes=%d", self._where, why, rev, len(changes))

    def _load(self, deadline: float) -> tuple[dict[str, dict[str, str]], int]:
        req = rpc_pb2.RangeRequest(key=self._pfx, range_end=self._pfx_end)
        resp = self._call(lambda m, t: m.kv.Range(req, timeout=t), deadline)
        view: dict[str, dict[str, str]] = {t: {} for t in TABLES}
        for kv in resp.kvs:
            tk = self._parse(kv.key)
            if tk is not None:
                view[tk[0]][tk[1]] = kv.value.decode()
        self._loaded_cluster = int(resp.header.cluster_id)
        return view, int(resp.header.revision)

    # ---- the lease thread -----------------------------------------------------------------

    def _grant(self, deadline: float) -> None:
        req = rpc_pb2.LeaseGrantRequest(TTL=max(1, round(self.lease_ttl_s)))
        resp = self._call(lambda m, t: m.lease.LeaseGrant(req, timeout=t), deadline)
        with self._cond:
            self._lease = int(resp.ID)
            self._lease_ttl = float(resp.TTL)
            self._lease_ok_at = time.monotonic()

    def _lease_loop(self) -> None:
        pause = self._lease_ttl / 3
        while not self._stopping.wait(pause):
            pause = 0.2  # until a renewal succeeds: a failed one is tried again at once, on the next member
            with self._lease_lock:
                lease = self._lease
            if not lease:
                return
            at, member = self._member()
            try:
                ttl = -1
                for resp in member.lease.LeaseKeepAlive(iter([rpc_pb2.LeaseKeepAliveRequest(ID=lease)]),
                                                        timeout=max(0.5, self._lease_ttl / 6)):
                    ttl = int(resp.TTL)
                    break
            except grpc.RpcError as exc:
                if not self._stopping.is_set():
                    log.debug("event=store_keepalive_failed lease=%x code=%s", lease, exc.code().name)
                    if exc.code() in _TRANSIENT:
                        self._unreachable(at, exc.code())
                continue
            if ttl > 0:
                pause = self._lease_ttl / 3
                with self._cond:
                    self._lease_ok_at = time.monotonic()
            elif ttl == 0:
                try:
                    self._lease_gone(lease)
                except grpc.RpcError as exc:
                    log.warning("event=store_lease_grant_failed code=%s", exc.code().name)

    def _lease_gone(self, lease: int) -> None:
        """``lease`` has expired in etcd: grant a new one and put this replica's ephemeral documents again,
        except those of the ``FORFEIT`` tables (claims another replica may have taken over meanwhile):
        they are gone, here too."""
        with self._lease_lock:
            if self._lease != lease or self._stopping.is_set():
                return  # already replaced (or revoked by close)
            with self._cond:
                if self._lease_valid:
                    log.warning("event=store_lease_lost lease=%x documents=%d", lease, len(self._mine))
                self._lease_valid = False
            self._grant(time.monotonic() + self.timeout_s)
            with self._cond:
                self._lease_valid = True
                forfeit: list[_Row] = [(t, k, None) for (t, k) in sorted(self._mine) if t in FORFEIT]
                for t, k, _v in forfeit:
                    del self._mine[(t, k)]
                    self._view[t].pop(k, None)
                rows: list[_Row] = [(t, k, v) for (t, k), v in sorted(self._mine.items())]
                if rows and not self._closed:
                    self._reput_seq = self._enqueue(rows)
                    # the others deleted them when the lease expired, and so may have this replica's watch
                    self._emit(list(rows))
                self._emit(forfeit)
                new = self._lease
        log.info("event=store_lease_granted lease=%x ttl=%g documents=%d", new, self._lease_ttl, len(rows))

    # ---- the probe thread: the watch answers, current() transitions ----------------------

    def _probe_loop(self) -> None:
        period = min(1.0, self.lease_ttl_s / 3)
        silence = max(1.0, min(3.0, self.lease_ttl_s / 2))
        while not self._stopping.wait(period):
            now = time.monotonic()
            with self._cond:
                call = self._watch_call
                asked = self._progress_asked
                stuck = (call is not None and asked is not None and now - asked > silence
                         and self._watch_heard < asked)
            if stuck and call is not None:
                log.warning("event=store_watch_silent seconds=%.1f note=reconnecting", now - (asked or now))
                call[0].cancel()
            elif asked is None:
                self._ask_progress()
            self._observe(now)

    def _ask_progress(self, again: bool = False) -> None:
        with self._cond:
            call = self._watch_call
            if call is None or (self._progress_asked is not None and not again):
                return
            if self._progress_asked is None:
                self._progress_asked = time.monotonic()
        call[1].put(rpc_pb2.WatchRequest(progress_request=rpc_pb2.WatchProgressRequest()))

    # ---- members --------------------------------------------------------------------------

    def _member(self) -> tuple[int, _Member]:
        with self._cond:
            return self._at, self._members[self._at]

    def _unreachable(self, at: int, code: grpc.StatusCode | None) -> None:
        """Member ``at`` failed a call: use the next one (unless another call moved on already)."""
        with self._cond:
            if self._at != at or len(self._members) == 1:
                return
            self._at = (at + 1) % len(self._members)
            now = self._members[self._at].name
            watch = self._watch_call
        if watch is not None and watch[2] == at and code is not None:
            watch[0].cancel()  # the watch is on that member too: it moves now rather than once it has gone quiet
        log.info("event=store_member_switch from=%s to=%s code=%s", self._members[at].name, now,
                 code.name if code is not None else "watch_lost")

    def _call(self, rpc: Callable[[_Member, float], Any], deadline: float) -> Any:
        """A unary call on the member in use, moving on to the next while they fail, until ``deadline``."""
        attempt, backoff = _ATTEMPT_S, 0.05
        while True:
            at, member = self._member()
            left = deadline - time.monotonic()
            try:
                return rpc(member, max(0.05, min(attempt, left)))
            except grpc.RpcError as exc:
                code = exc.code()
                if code not in _TRANSIENT or time.monotonic() + 0.05 >= deadline:
                    raise
                self._unreachable(at, code)
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    attempt *= 2
                else:  # refused at once: every member may be down; do not spin
                    time.sleep(min(backoff, max(0.0, deadline - time.monotonic() - 0.05)))
                    backoff = min(backoff * 2, 0.5)

    # ---- conditional writes ------------------------------------------------------------------

    async def commit_if(self, since: int, guards: Sequence[Guard], puts: Mapping[tuple[str, str], Any],
                        deletes: tuple[tuple[str, str], ...] = ()) -> bool:
        """One Txn of its own (its compares decide it alone, so it is never grouped): every guarded key
        (or key range) not modified after ``since`` (the view's revision the decision was read at),
        and present where ``exists`` says so;
        then the writes. It comes after this store's earlier writes (``sync`` first). It returns once
        the view holds the outcome: the written documents, or, when another replica wrote first, the
        newer documents of the guarded keys, so the caller decides again from what decided it."""
        await self.sync()
        seen = since
        rows: list[tuple[str, str, str | None]] = [(t, k, encoded(v))
                                                   for (t, k), v in puts.items()]
        rows += [(t, k, None) for t, k in deletes]
        for t, _k, _v in rows:
            check_table(t)
        compare: list[Any] = []
        ranges: list[Any] = []
        for g in guards:
            check_table(g.table)
            key = self._key(g.table, g.key)
            end = key[:-1] + bytes([key[-1] + 1]) if g.prefix else b""
            compare.append(rpc_pb2.Compare(key=key, range_end=end, target=rpc_pb2.Compare.MOD,
                                           result=rpc_pb2.Compare.LESS, mod_revision=seen + 1))
            if g.exists:
                compare.append(rpc_pb2.Compare(key=key, target=rpc_pb2.Compare.VERSION,
                                               result=rpc_pb2.Compare.GREATER, version=0))
            ranges.append(rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=key, range_end=end, keys_only=True)))
        lease = self._lease
        success = [
            rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=self._key(t, k))) if v is None
            else rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=self._key(t, k), value=v.encode(),
                                                                  lease=lease if t in EPHEMERAL else 0))
            for t, k, v in rows]
        req = rpc_pb2.TxnRequest(compare=compare, success=success, failure=ranges)
        deadline = time.monotonic() + self.timeout_s
        try:
            # on the store's own threads: a Txn retried up to timeout_s must not hold the loop's default
            # executor, which other work (name resolution for outgoing HTTP) waits on
            resp = await asyncio.get_running_loop().run_in_executor(
                self._txns, self._call, lambda m, t: m.kv.Txn(req, timeout=t), deadline)
        except grpc.RpcError as exc:
            raise StoreError(f"store: etcd at {self._where}: conditional write failed: {exc.code().name}") from None
        if resp.succeeded:
            if rows:  # the Txn's events carry its revision back through the watch
                await self._view_at(int(resp.header.revision), deadline)
            return True
        newer = [int(kv.mod_revision) for r in resp.responses for kv in r.response_range.kvs]
        await self._view_at(max(newer, default=0), deadline)
        if not any(n > seen for n in newer):
            await asyncio.sleep(0.01)  # a guarded key was deleted: its delete is on its way through the watch
        return False

    async def _view_at(self, rev: int, deadline: float) -> None:
        """Wait until the view has applied the watch's events through ``rev``."""
        while self.revision < rev:
            if time.monotonic() > deadline:
                raise StoreError(f"store: etcd at {self._where}: revision {rev} not watched back within {self.timeout_s:g}s")
            await asyncio.sleep(0.002)

    # ---- keys -----------------------------------------------------------------------------

    def _key(self, table: str, key: str) -> bytes:
        return f"{self.prefix}{table}/{key}".encode()

    def _op_size(self, table: str, key: str, value: str | None) -> int:
        return len(self.prefix) + len(table) + 1 + len(key.encode()) + len((value or "").encode()) + _OP_OVERHEAD

    def _parse(self, raw: bytes) -> tuple[str, str] | None:
        table, slash, key = raw[len(self._pfx):].decode(errors="replace").partition("/")
        if not slash or table not in self._view:
            return None  # not a document of this store (another tool's key under the prefix)
        return table, key


def _drain(requests: queue.SimpleQueue[Any]) -> Iterator[Any]:
    """A request stream fed from a queue; ``None`` ends it."""
    while (req := requests.get()) is not None:
        yield req


class _Member:
    """One etcd member: its own channel, so that this store chooses which member it talks to and can
    leave one that stops answering without closing its connections (frozen, cut off)."""

    def __init__(self, host: str, port: int) -> None:
        self.name = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.channel = grpc.insecure_channel(self.name, options=[
            ("grpc.max_receive_message_length", -1),  # the whole prefix comes in one Range
            ("grpc.max_send_message_length", -1),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            # a connection that stops answering is closed after keepalive time + timeout; etcd refuses
            # pings more often than every 5 s
            ("grpc.keepalive_time_ms", 6000),
            ("grpc.keepalive_timeout_ms", 2000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ])
        self.kv = rpc_pb2_grpc.KVStub(self.channel)
        self.watch = rpc_pb2_grpc.WatchStub(self.channel)
        self.lease = rpc_pb2_grpc.LeaseStub(self.channel)
