"""Consul's KV store with sessions: locks (``acquire``/``release``), transactions and session lifetimes.

Entries live in the registry's ``kv`` table (one document per key: base64 value, flags, create and
modify index, and the holding session and lock index while locked); sessions live in the store's
``meta`` table as ``consul/sessions/<id>``. Every change, one key or a transaction of many, is
computed on a copy of the entries and written with one atomic ``write_documents`` before it is
visible, so a failed transaction changes nothing and an answered one survives a crash.

Sessions behave as Consul's: a TTL session is invalidated when it has not been renewed for twice its
TTL, a session with checks when one of them turns critical or goes away; invalidation releases (or,
with ``Behavior: delete``, deletes) the keys it holds, and those keys cannot be acquired again for
the session's lock delay. Session TTL timers restart when the control plane does (as they do on a
Consul leader change).
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshpilot.consul.definitions import ConsulError, fold, parse_duration
from meshpilot.registry import Registry
from meshpilot.registry.store import Guard

__all__ = ["KeyValue", "MAX_TXN_OPS"]

MAX_TXN_OPS = 128
_ATTEMPTS = 16  # decisions retried when another replica wrote the same keys first
_META = "meta"
_SESSIONS = "consul/sessions/"
_VERBS = ("set", "cas", "lock", "unlock", "get", "get-tree", "check-index", "check-session", "check-not-exists",
          "delete", "delete-tree", "delete-cas")

CheckLookup = Callable[[str, str], "str | None"]  # (node, check id) -> status, None when unknown


@dataclass(frozen=True, slots=True)
class _Op:
    verb: str
    key: str
    value: str | None = None  # base64, as stored
    flags: int = 0
    index: int = 0
    session: str = ""


def _b64(value: bytes) -> str | None:
    return base64.b64encode(value).decode() if value else None


class KeyValue:
    def __init__(self, registry: Registry, index: Callable[[], int], runs: Callable[[str], bool] = lambda sid: True,
                 claim: Callable[[str], None] = lambda sid: None, release: Callable[[str], None] = lambda sid: None) -> None:
        self.reg = registry
        self._index = index
        # on replicas: whether this one keeps a session's TTL, and taking it over (the client renews here)
        self._runs = runs
        self._claim = claim
        self._release = release
        self.entries: dict[str, dict[str, Any]] = {}
        self.sessions: dict[str, dict[str, Any]] = {}
        self._deadline: dict[str, float] = {}  # session id -> when its TTL runs out
        self._lock_delay: dict[str, float] = {}  # key -> until when it cannot be acquired
        self.max_index = 0
        for key, value in registry.documents("kv"):
            if isinstance(value, dict) and "mi" in value:
                self.entries[key] = value
                self.max_index = max(self.max_index, int(value["mi"]))
        now = time.monotonic()
        for key, value in registry.store.items(_META):
            if key.startswith(_SESSIONS):
                self.sessions[value["ID"]] = value
                self.max_index = max(self.max_index, int(value["ModifyIndex"]))
                if value["TTL"]:
                    self._deadline[value["ID"]] = now + 2 * parse_duration(value["TTL"])
        orphans = {k: _unlocked(e, e["mi"]) for k, e in self.entries.items() if e.get("s") and e["s"] not in self.sessions}
        if orphans:
            self._commit({**self.entries, **orphans})

    # ---- reading ------------------------------------------------------------------------

    def value(self, key: str) -> bytes | None:
        e = self.entries.get(key)
        return None if e is None else base64.b64decode(e["v"]) if e["v"] else b""

    def entries_json(self, key: str, recurse: bool) -> list[dict[str, Any]]:
        keys = sorted(k for k in self.entries if k.startswith(key)) if recurse else [key] if key in self.entries else []
        return [_entry_json(k, self.entries[k]) for k in keys]

    def keys(self, prefix: str, separator: str) -> list[str]:
        out: set[str] = set()
        for k in self.entries:
            if not k.startswith(prefix):
                continue
            if separator:
                cut = k.find(separator, len(prefix))
                if cut >= 0:
                    k = k[: cut + len(separator)]
            out.add(k)
        return sorted(out)

    # ---- single-key writes ------------------------------------------------------------------

    async def put(self, key: str, value: bytes, flags: int, cas: int | None) -> bool:
        op = _Op("set", key, _b64(value), flags) if cas is None else _Op("cas", key, _b64(value), flags, cas)
        return (await self.run([op]))[1] is None

    async def delete(self, key: str, recurse: bool, cas: int | None) -> bool:
        if recurse:
            op = _Op("delete-tree", key)
        elif cas is not None:
            op = _Op("delete-cas", key, index=cas)
        else:
            op = _Op("delete", key)
        return (await self.run([op]))[1] is None

    async def acquire(self, key: str, value: bytes, flags: int, session: str) -> bool:
        self._require(session)
        return (await self.run([_Op("lock", key, _b64(value), flags, session=session)]))[1] is None

    async def release(self, key: str, value: bytes, flags: int, session: str) -> bool:
        self._require(session)
        return (await self.run([_Op("unlock", key, _b64(value), flags, session=session)]))[1] is None

    def _require(self, session: str) -> None:
        if session not in self.sessions:
            raise ConsulError(500, f'invalid session "{session}"')

    # ---- transactions -------------------------------------------------------------------

    async def txn(self, raw: Any) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]] | None]:
        """``PUT /v1/txn``: (results, None) when applied, (None, errors) when rolled back."""
        ops = _parse_txn(raw)
        results, error = await self.run(ops)
        if error is not None:
            return None, [{"OpIndex": error[0], "What": error[1]}]
        return results, None

    def _next_index(self) -> int:
        """The index a write decided now gets: after the global index, and on a shared store (whose
        global index moves only when a write is back from etcd) after the ones given to writes made
        here; taken by ``_wrote`` only once something was written, so a refusal or a retry moves nothing."""
        if not self.reg.store.shared:
            return self._index() + 1
        return max(self._index(), self.max_index) + 1

    def _wrote(self, idx: int) -> None:
        self.max_index = max(self.max_index, idx)

    async def run(self, ops: list[_Op]) -> tuple[list[dict[str, Any]], tuple[int, str] | None]:
        """Apply ``ops`` all or none: (results, None), or ([], (index of the failed op, why)).

        On a shared store the outcome is decided from this replica's view and committed only if
        nothing it read changed in etcd meanwhile (``commit_if``); when another replica got there
        first the view has caught up and the ops are decided again, so a check-and-set or a lock is
        won by one replica only. A refusal is confirmed the same way before it is given."""
        if not self.reg.store.shared:
            return self._run(ops)
        for _attempt in range(_ATTEMPTS):
            # the revision first, then what the decision reads, from the store's view: that is at this
            # revision or newer, and a newer one makes the guards fail and the decision run again
            since = self.reg.store.revision
            holders = self._refresh(ops)
            guards = _guards(ops, self.entries, self.sessions) + [
                Guard(_META, _SESSIONS + s, exists=s in self.sessions) for s in sorted(holders)]
            work, results, error = self._decide(ops)
            if error is not None:
                if await self.reg.store.commit_if(since, guards, {}):
                    return [], error
                continue
            puts, gone = self._changes(work)
            if not puts and not gone:
                return results, None
            if await self.reg.commit_documents_if(since, "kv", guards, puts, gone):
                # this transaction's changes only: another replica's write that landed during the
                # commit is in ``entries`` already and stays
                entries = dict(self.entries)
                entries.update(puts)
                for k in gone:
                    entries.pop(k, None)
                self.entries = entries
                if puts:
                    self._wrote(max(int(v["mi"]) for v in puts.values()))
                return results, None
        raise ConsulError(500, f"the keys changed under this transaction {_ATTEMPTS} times in a row; try again")

    def _refresh(self, ops: list[_Op]) -> set[str]:
        """Take the entries and sessions ``ops`` read from the store's view (the watch delivers other
        replicas' changes a moment after the view has them); return the sessions holding those entries."""
        store = self.reg.store
        entries = dict(self.entries)
        for op in ops:
            if op.verb in ("get-tree", "delete-tree"):
                stored = {k: v for k, v in store.items("kv") if k.startswith(op.key) and isinstance(v, dict) and "mi" in v}
                for k in [k for k in entries if k.startswith(op.key) and k not in stored]:
                    del entries[k]
                entries.update((k, v) for k, v in stored.items() if entries.get(k) != v)  # an equal one stays as it is
            else:
                doc = store.get("kv", op.key)
                if isinstance(doc, dict) and "mi" in doc:
                    if entries.get(op.key) != doc:
                        entries[op.key] = doc
                else:
                    entries.pop(op.key, None)
            if op.session:
                self.follow_session(op.session, store.get(_META, _SESSIONS + op.session))
        self.entries = entries
        holders: set[str] = set()
        for op in ops:
            read = ([e for k, e in entries.items() if k.startswith(op.key)] if op.verb in ("get-tree", "delete-tree")
                    else [entries[op.key]] if op.key in entries else [])
            holders.update(str(e["s"]) for e in read if e.get("s"))
        for sid in holders:
            self.follow_session(sid, store.get(_META, _SESSIONS + sid))
        return holders

    def _decide(self, ops: list[_Op]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], tuple[int, str] | None]:
        work = dict(self.entries)
        idx = self._next_index()
        now = time.monotonic()
        results: list[dict[str, Any]] = []
        for n, op in enumerate(ops):
            error = self._apply(work, op, idx, now, results)
            if error is not None:
                return work, [], (n, error)
        return work, results, None

    def _run(self, ops: list[_Op]) -> tuple[list[dict[str, Any]], tuple[int, str] | None]:
        work, results, error = self._decide(ops)
        if error is not None:
            return [], error
        self._commit(work)
        return results, None

    def _changes(self, work: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], list[str]]:
        return {k: v for k, v in work.items() if self.entries.get(k) is not v}, [k for k in self.entries if k not in work]

    def _apply(self, work: dict[str, dict[str, Any]], op: _Op, idx: int, now: float, results: list[dict[str, Any]]) -> str | None:
        key, old = op.key, work.get(op.key)
        if op.verb in ("get", "check-index", "check-session"):
            if old is None:
                return f'key "{key}" doesn\'t exist'
            if op.verb == "check-index" and old["mi"] != op.index:
                return f'current modify index {old["mi"]} != {op.index}'
            if op.verb == "check-session" and old.get("s") != op.session:
                return f'key "{key}" is not currently locked by session "{op.session}"'
            results.append({"KV": _entry_json(key, old, value=op.verb == "get")})
        elif op.verb == "get-tree":
            results.extend({"KV": _entry_json(k, work[k])} for k in sorted(work) if k.startswith(key))
        elif op.verb == "check-not-exists":
            if old is not None:
                return f'key "{key}" exists'
        elif op.verb in ("set", "cas"):
            if op.verb == "cas" and (old is not None if op.index == 0 else old is None or old["mi"] != op.index):
                return f'failed to set key "{key}", index is stale'
            work[key] = _written(old, op, idx)
            results.append({"KV": _entry_json(key, work[key], value=False)})
        elif op.verb == "lock":
            if op.session not in self.sessions:
                return f'invalid session "{op.session}"'
            if old is not None and old.get("s") and old["s"] != op.session and old["s"] in self.sessions:
                # (a lock whose session is gone is free: another replica destroyed the session while
                # this one's acquire for it went through)
                return f'failed to lock key "{key}", lock is already held'
            if self._lock_delay.get(key, 0.0) > now:
                return f'failed to lock key "{key}", lock delay is in effect'
            entry = _written(old, op, idx)
            if old is None or old.get("s") != op.session:
                entry["li"] = (old or {}).get("li", 0) + 1
            entry["s"] = op.session
            work[key] = entry
            results.append({"KV": _entry_json(key, entry, value=False)})
        elif op.verb == "unlock":
            if old is None or old.get("s") != op.session:
                return f'failed to unlock key "{key}", lock isn\'t held, or is held by another session'
            work[key] = _unlocked(_written(old, op, idx), idx)
            results.append({"KV": _entry_json(key, work[key], value=False)})
        elif op.verb == "delete":
            work.pop(key, None)
        elif op.verb == "delete-tree":
            for k in [k for k in work if k.startswith(key)]:
                del work[k]
        elif op.verb == "delete-cas":
            if old is None or old["mi"] != op.index:
                return f'failed to delete key "{key}", index is stale'
            del work[key]
        return None

    def _commit(self, work: dict[str, dict[str, Any]]) -> None:
        puts, gone = self._changes(work)
        if not puts and not gone:
            return
        self.reg.write_documents("kv", puts, gone)
        self.entries = work

    # ---- sessions -------------------------------------------------------------------------

    def create_session(self, raw: Any, node: str, check_status: CheckLookup) -> str:
        d = fold(raw) if raw is not None else {}
        if not isinstance(d, dict):
            raise ConsulError(400, "Request decode failed: expected a JSON object")
        delay = d.get("lockdelay")
        if delay is None or delay == "":
            delay_s = 15.0
        elif isinstance(delay, (int, float)) and not isinstance(delay, bool) and delay < 1000:
            delay_s = float(delay)  # Consul reads small numbers as seconds
        else:
            delay_s = parse_duration(delay, "LockDelay")
        if not 0 <= delay_s <= 60:
            raise ConsulError(400, f"Invalid LockDelay {delay!r}: must be between 0 and 60s")
        ttl = str(d.get("ttl") or "")
        if ttl:
            ttl_s = parse_duration(ttl, "TTL")
            if not 10 <= ttl_s <= 86400:
                raise ConsulError(400, f"Invalid Session TTL '{ttl}', must be between [10s=24h0m0s]")
        behavior = str(d.get("behavior") or "release")
        if behavior not in ("release", "delete"):
            raise ConsulError(400, f"Invalid Behavior setting '{behavior}'")
        node = str(d.get("node") or node)
        given = [k for k in ("checks", "nodechecks", "servicechecks") if d.get(k) is not None]
        node_checks = [*(d.get("checks") or []), *(d.get("nodechecks") or [])] if given else ["serfHealth"]
        service_checks = d.get("servicechecks") or []
        if not isinstance(service_checks, list) or not all(isinstance(c, dict) for c in service_checks):
            raise ConsulError(400, "Request decode failed: ServiceChecks: expected a list of {ID}")
        for cid in [*node_checks, *(str(c.get("id", "")) for c in service_checks)]:
            status = check_status(node, str(cid))
            if status is None:
                raise ConsulError(500, f"Missing check '{cid}' registration")
            if status == "critical":
                raise ConsulError(500, f"Check '{cid}' is in critical state")
        sid = str(uuid.uuid4())
        idx = self._next_index()
        session = {
            "ID": sid, "Name": str(d.get("name") or ""), "Node": node, "LockDelay": int(delay_s * 1e9), "Behavior": behavior,
            "TTL": ttl, "NodeChecks": [str(c) for c in node_checks],
            "ServiceChecks": [{"ID": str(c.get("id", "")), "Namespace": ""} for c in service_checks] or None,
            "CreateIndex": idx, "ModifyIndex": idx,
        }
        self.reg.store.write({(_META, _SESSIONS + sid): session})
        self._wrote(idx)
        self.sessions[sid] = session
        self._claim(sid)
        if ttl:
            self._deadline[sid] = time.monotonic() + 2 * parse_duration(ttl)
        return sid

    def renew(self, sid: str) -> dict[str, Any] | None:
        session = self.sessions.get(sid)
        if session is None:
            return None
        self._claim(sid)
        if session["TTL"]:
            self._deadline[sid] = time.monotonic() + 2 * parse_duration(session["TTL"])
        return session

    def destroy(self, sid: str) -> None:
        session = self.sessions.pop(sid, None)
        self._deadline.pop(sid, None)
        if session is None:
            return
        self._release(sid)
        now = time.monotonic()
        idx = self._next_index()
        if self.reg.store.shared:  # the held entries as the store has them now, not as this replica last heard
            held = [k for k, e in self.entries.items() if e.get("s") == sid]
            self._refresh([_Op("get", k) for k in held])
        work = dict(self.entries)
        for k, e in self.entries.items():
            if e.get("s") != sid:
                continue
            if session["Behavior"] == "delete":
                del work[k]
            else:
                work[k] = _unlocked(e, idx)
            if session["LockDelay"]:
                self._lock_delay[k] = now + session["LockDelay"] / 1e9
        self._commit(work)
        self.reg.store.write({}, ((_META, _SESSIONS + sid),))

    # ---- other replicas' changes (shared store) --------------------------------------------

    def follow_entry(self, key: str, doc: Any) -> None:
        """Another replica wrote (or deleted, ``None``) this entry."""
        if isinstance(doc, dict) and "mi" in doc:
            self.entries = {**self.entries, key: doc}
            self.max_index = max(self.max_index, int(doc["mi"]))
        elif key in self.entries:
            self.entries = {k: v for k, v in self.entries.items() if k != key}

    def follow_session(self, sid: str, doc: Any) -> None:
        """Another replica created (or destroyed, ``None``) this session. Its TTL is kept by the replica
        the client renews it on."""
        if isinstance(doc, dict) and doc.get("ID") == sid:
            self.sessions[sid] = doc
            self.max_index = max(self.max_index, int(doc.get("ModifyIndex", 0)))
        else:
            self.sessions.pop(sid, None)
            self._deadline.pop(sid, None)
            self._release(sid)

    def sessions_json(self, node: str | None = None) -> list[dict[str, Any]]:
        return [s for _sid, s in sorted(self.sessions.items()) if node is None or s["Node"] == node]

    def adopt(self, sid: str, now: float) -> None:
        """This replica keeps the session's TTL from now on (its runner went away): a full TTL from now."""
        session = self.sessions.get(sid)
        if session is not None and session["TTL"]:
            self._deadline[sid] = now + 2 * parse_duration(session["TTL"])

    def expire(self, now: float, check_status: CheckLookup) -> None:
        """Invalidate sessions whose TTL ran out or whose checks failed (called by the checker); on
        replicas, only those this replica runs."""
        for sid, deadline in list(self._deadline.items()):
            if deadline <= now and self._runs(sid):
                self.destroy(sid)
        for sid, s in list(self.sessions.items()):
            if not self._runs(sid):
                continue
            ids = [*s["NodeChecks"], *(c["ID"] for c in s["ServiceChecks"] or ())]
            if any(cid != "serfHealth" and check_status(s["Node"], cid) in (None, "critical") for cid in ids):
                self.destroy(sid)
        for k in [k for k, until in self._lock_delay.items() if until <= now]:
            del self._lock_delay[k]


def _guards(ops: list[_Op], entries: dict[str, dict[str, Any]], sessions: dict[str, Any]) -> list[Guard]:
    """What deciding ``ops`` read: each key (each tree), present where the view had it (so a delete
    since is seen too: etcd gives a deleted key no modification revision), and the sessions named."""
    out: list[Guard] = []
    for op in ops:
        tree = op.verb in ("get-tree", "delete-tree")
        out.append(Guard("kv", op.key, prefix=tree, exists=not tree and op.key in entries))
        if op.verb in ("lock", "unlock", "check-session") and op.session:
            out.append(Guard(_META, _SESSIONS + op.session, exists=op.session in sessions))
    return out


def _written(old: dict[str, Any] | None, op: _Op, idx: int) -> dict[str, Any]:
    """The entry after writing ``op``'s value and flags; a lock held on it stays held."""
    entry = {"v": op.value, "f": op.flags, "ci": old["ci"] if old else idx, "mi": idx}
    if old is not None and old.get("s"):
        entry["s"] = old["s"]
    if old is not None and old.get("li"):
        entry["li"] = old["li"]
    return entry


def _unlocked(entry: dict[str, Any], idx: int) -> dict[str, Any]:
    out = {k: v for k, v in entry.items() if k != "s"}
    out["mi"] = idx
    return out


def _entry_json(key: str, e: dict[str, Any], value: bool = True) -> dict[str, Any]:
    out = {"LockIndex": e.get("li", 0), "Key": key, "Flags": e["f"], "Value": e["v"] if value else None,
           "CreateIndex": e["ci"], "ModifyIndex": e["mi"]}
    if e.get("s"):
        out["Session"] = e["s"]
    return out


def _parse_txn(raw: Any) -> list[_Op]:
    if not isinstance(raw, list):
        raise ConsulError(400, "Failed to parse body: expected a JSON list of operations")
    if len(raw) > MAX_TXN_OPS:
        raise ConsulError(413, f"Transaction contains too many operations ({len(raw)} > {MAX_TXN_OPS})")
    ops = []
    for n, item in enumerate(raw):
        d = {k: v for k, v in fold(item).items() if v is not None} if isinstance(item, dict) else None
        if not d or set(d) - {"kv"} or not isinstance(d.get("kv"), dict):
            raise ConsulError(400, f"Failed to parse body: operation {n}: meshpilot transactions hold KV operations only")
        kv = d["kv"]
        verb = str(kv.get("verb") or "")
        if verb not in _VERBS:
            raise ConsulError(400, f"Failed to parse body: operation {n}: unknown KV verb {verb!r}")
        key = kv.get("key")
        if not isinstance(key, str) or (not key and verb not in ("get-tree", "delete-tree")):
            raise ConsulError(400, f"Failed to parse body: operation {n}: Key is required")
        value = kv.get("value")
        if value is not None:
            if not isinstance(value, str):
                raise ConsulError(400, f"Failed to parse body: operation {n}: Value must be base64")
            try:
                base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise ConsulError(400, f"Failed to parse body: operation {n}: Value must be base64") from None
        flags, index = kv.get("flags") or 0, kv.get("index") or 0
        for name, number in (("Flags", flags), ("Index", index)):
            if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number < 2**64:
                raise ConsulError(400, f"Failed to parse body: operation {n}: {name} must be an unsigned integer")
        ops.append(_Op(verb, key, value or None, flags, index, str(kv.get("session") or "")))
    return ops
