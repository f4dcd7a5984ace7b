"""The Consul agent that meshpilot stands in for: registrations, checks and the Consul views (KV and
sessions: ``kv.py``).

meshpilot is one agent serving many hosts. Each calling address is its own synthetic node (named
after the address), and a service id is unique per node: service ``web`` registered from 10.0.0.7
is registry instance ``consul:10.0.0.7:web``. Checks are registry checks owned by ``consul``;
their definitions (TTL, HTTP, TCP, intervals) and what the registry does not hold of a registration
(the name as registered, ``Meta`` and ``TaggedAddresses`` exactly as given) are kept here and in the
store's ``meta`` table, written before the request is answered, so the checker (``checker.py``)
keeps them current after a restart. Consul names need not be DNS labels (``my_service``,
``api.v2``, ``MixedCase``): the registry holds ``mesh_name(name)`` and labels the service
``consul-name: <name>``; Consul clients see the name as registered. Every instance in the
registry, whatever its source, is visible through the Consul views; only Consul-registered ones
can be changed through them.

Blocking queries: every answer has an index that changes only when that answer does. The agent
keeps, per query (path and parameters), the digest of the last answer and the index it got; a
different answer gets the current global index (bumped by every registry change). A waiting query
sleeps on a topic (one service, the catalog, or KV) and recomputes when that topic changes. A
check whose status is unchanged keeps a new output here and reaches the registry at most every
5 minutes (Consul's ``check_update_interval``), so heartbeats with a new note wake no watcher.

Replicas: on a shared store (etcd) the global index is the store's revision as this replica's view
has it, so indexes are one sequence across every replica and a client that moves to another replica
never sees its index go back: a query whose index is ahead of this replica's view waits until the
view catches up (or the wait ends). Other replicas' changes wake waiting queries here as local ones
do, and KV entries, sessions, registration records and check definitions follow them, so any replica
answers for any Consul instance. Each instance's checks (probes, TTL expiry, deregistration after
critical) and each session's TTL are run by one replica (registry/runners.py): the replica the
client last talked to (it registered, updated a TTL or renewed there); when that replica goes away
the live replica with the smallest id adopts them, with a full TTL from then. So a replica's death
neither fails a healthy instance whose client moved to another replica nor keeps a dead one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from meshpilot.consul.deadlines import Deadlines
from meshpilot.consul.definitions import CheckDef, ConsulError, ServiceDef, fold, mesh_name, parse_check
from meshpilot.consul.kv import KeyValue
from meshpilot.sdkmeta import exported_meta, instance_fields, join_service, primary_port, release_service, tags_of
from meshpilot.model import Check, CheckStatus, Instance, Service, ValidationError, field_errors
from meshpilot.registry import Change, RegistryError, Registry
from meshpilot.registry.runners import Runners

__all__ = ["Answer", "CONSUL_NAME", "ConsulAgent", "OWNER", "VERSION"]

log = logging.getLogger("meshpilot.consul")

OWNER: Final = "consul"
VERSION = "1.17.0"  # the Consul version meshpilot's API subset corresponds to
_PREFIX = "consul:"
_META = "meta"
_MAX_WATCH_KEYS = 20_000
_SESSION = "session/"
_OUTPUT_SYNC_S = 300.0  # Consul's check_update_interval
CONSUL_NAME = "consul-name"  # service label: the Consul name when it is not the registry's name


@dataclass(frozen=True, slots=True)
class Answer:
    body: bytes
    index: int
    hash: str = ""  # the content hash (X-Consul-ContentHash) of ``body``


def _node_id(node: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{node}.node.meshpilot"))


def consul_name(svc: Service) -> str:
    """The name Consul clients use: the name registered through Consul, else ``<name>`` in namespace
    default and ``<name>.<namespace>`` in others."""
    registered = svc.labels.get(CONSUL_NAME)
    if registered:
        return registered
    return svc.name if svc.namespace == "default" else f"{svc.name}.{svc.namespace}"


def _tagged(address: str, port: int, registered: dict[str, Any]) -> dict[str, Any]:
    """A service's TaggedAddresses as Consul shows them: the registered ones, plus lan/wan for the
    address's family where not given."""
    family = "ipv6" if ":" in address else "ipv4"
    out = {f"lan_{family}": {"Address": address, "Port": port}, f"wan_{family}": {"Address": address, "Port": port}}
    out.update(registered)
    return out


def _key_for(name: str) -> str:
    name = name.lower()
    base, _, ns = name.partition(".")
    return f"{base}.{ns or 'default'}"


class ConsulAgent:
    def __init__(self, registry: Registry, *, datacenter: str = "dc1", node_name: str = "meshpilot", replica: str = "") -> None:
        self.reg = registry
        self.replica = replica or f"agent-{uuid.uuid4().hex[:8]}"  # this replica's id (the control plane's)
        self.runners = Runners(registry, self.replica, "consul")
        self.datacenter = datacenter
        self.node_name = node_name
        self._shared = registry.store.shared
        self._seq = max(1, registry.revision)  # bumped by every registry change: the index of a local store
        self.started = time.time()
        self._indexes: dict[str, tuple[int, int]] = {}  # instance id -> (create index, modify index)
        self.checks: dict[str, dict[str, CheckDef]] = {}  # instance id -> check id -> definition
        self.changed: set[str] = set()  # instances whose ``checks`` changed since the checker last looked
        self._by_check: dict[tuple[str, str], str] = {}  # (node, check id) -> instance id
        self._node_of_checks: dict[str, str] = {}  # instance id -> node its checks are indexed under
        self._unsaved: set[str] = set()  # deleted instances whose stored definitions are still to delete
        self.records: dict[str, dict[str, Any]] = {}  # instance id -> {name, meta, tagged} as registered
        self._output: dict[tuple[str, str], str] = {}  # newest output of a check, not yet in the registry
        self._synced: dict[tuple[str, str], float] = {}  # when a check's output last went to the registry
        self.ttl_deadline = Deadlines()  # when each TTL check this replica runs expires
        self.critical_since: dict[tuple[str, str], float] = {}
        self.deregister_after: set[tuple[str, str]] = set()  # the checks with DeregisterCriticalServiceAfter
        self._maintenance_reason: dict[str, str] = {}
        self._topics: dict[str, asyncio.Event] = {}
        self._answers: OrderedDict[str, tuple[bytes, int]] = OrderedDict()  # query -> (digest, index)
        self._memo: dict[str, tuple[int, Answer]] = {}
        self.kv = KeyValue(registry, lambda: self.index, lambda sid: self.runs(_SESSION + sid),
                           lambda sid: self.claim(_SESSION + sid), lambda sid: self._release(_SESSION + sid))
        self._seq = max(self._seq, self.kv.max_index)
        self._load()
        registry.subscribe(self._on_change)

    @property
    def index(self) -> int:
        """The global index: a local store's change count, or a shared store's revision (with the
        indexes this replica gave KV entries and sessions not yet back from the store)."""
        if self._shared:
            return max(1, self.reg.store.revision, self.kv.max_index)
        return self._seq

    # ---- loading and events -------------------------------------------------------------------

    def _load(self) -> None:
        now = time.monotonic()
        for key, value in self.reg.store.items(_META):
            kind, _, iid = key.removeprefix("consul/").partition("/")
            if not key.startswith("consul/") or kind not in ("checks", "service"):
                continue
            inst = self.reg.instance(iid)
            if inst is None or inst.source != OWNER:
                self.reg.store.write({}, ((_META, key),))
            elif kind == "service":
                self.records[iid] = value
            else:
                self._set_defs(inst, {d["id"]: CheckDef.from_json(d) for d in value}, now)
        for inst in self.reg.instances():
            self._indexes.setdefault(inst.id, (self.index, self.index))

    def _on_change(self, change: Change) -> None:
        self._seq += 1
        if change.remote and change.kind in ("kv", "document"):
            self._remote_document(change)
        elif change.remote and change.kind == "instance" and change.op == "put" and change.key not in self.checks:
            self._follow_defs(change.key)
        if change.kind == "instance":
            if change.op == "delete":
                self._release(change.key)
                self._indexes.pop(change.key, None)
                if change.key in self.checks or change.key in self.records:
                    self._unsaved.add(change.key)
                self._forget(change.key)
            else:
                create = self._indexes.get(change.key, (self.index, 0))[0]
                self._indexes[change.key] = (create, self.index)
            self._wake(f"svc:{change.service}")
            self._wake("catalog")
        elif change.kind == "service":
            self._wake(f"svc:{change.service}")
            self._wake("catalog")
        elif change.kind == "kv":
            self._wake("kv")

    def _remote_document(self, change: Change) -> None:
        """Another replica changed a KV entry, a session, a registration record or an instance's check
        definitions: follow it."""
        if change.kind == "kv":
            self.kv.follow_entry(change.key, self.reg.store.get("kv", change.key))
        elif change.table == _META and change.key.startswith("consul/"):
            doc = self.reg.store.get(_META, change.key)
            kind, _, rest = change.key.removeprefix("consul/").partition("/")
            if kind == "sessions":
                self.kv.follow_session(rest, doc)
            elif kind == "service":
                if doc is None:
                    self.records.pop(rest, None)
                else:
                    self.records[rest] = doc
            elif kind == "checks":
                self._follow_defs(rest)

    def _follow_defs(self, iid: str) -> None:
        """Take an instance's check definitions from the store (another replica registered it)."""
        inst = self.reg.instance(iid)
        raw = self.reg.store.get(_META, f"consul/checks/{iid}")
        if inst is None or inst.source != OWNER:
            return  # the instance follows (definitions are written first); its put calls this again
        try:
            defs = {d["id"]: CheckDef.from_json(d) for d in raw or []}
        except (KeyError, TypeError, ValueError):
            log.exception("event=bad_stored_checks instance=%s", iid)
            return
        if defs != self.checks.get(iid, {}):
            self._set_defs(inst, defs, time.monotonic())

    # ---- which replica runs what (shared store) ----------------------------------------------

    def runs(self, key: str) -> bool:
        """Whether this replica runs the checks of instance ``key`` (or the TTL of ``session/<id>``)."""
        return self.runners.runs(key)

    def claim(self, key: str) -> None:
        """Run ``key`` here from now on: its client talks to this replica."""
        self.runners.claim(key)

    def _release(self, key: str) -> None:
        self.runners.release(key)

    def adopt_orphans(self, now: float) -> int:
        """Instances and sessions nobody runs (their replica went away) are taken over by the live
        replica with the smallest id, each with a full TTL from now; how many this replica took."""
        instances = [iid for iid in self.checks if self.reg.instance(iid) is not None]
        taken = self.runners.adopt([*instances, *(_SESSION + sid for sid in self.kv.sessions)])
        for key in taken:
            if key.startswith(_SESSION):
                self.kv.adopt(key[len(_SESSION):], now)
                continue
            for cid, d in self.checks.get(key, {}).items():
                if d.kind == "ttl":
                    self.ttl_deadline[(key, cid)] = now + d.ttl_s
                if (key, cid) in self.critical_since:
                    self.critical_since[(key, cid)] = now
            log.info("event=consul_runner_adopted instance=%s", key)
        return len(taken)

    def _wake(self, topic: str) -> None:
        ev = self._topics.pop(topic, None)
        if ev is not None:
            ev.set()

    def topic(self, name: str) -> asyncio.Event:
        ev = self._topics.get(name)
        if ev is None:
            ev = self._topics[name] = asyncio.Event()
        return ev

    # ---- blocking queries -----------------------------------------------------------------------

    def answer(self, key: str, compute: Callable[[], Any]) -> Answer:
        """The current answer to a query and its index (stable while the answer is unchanged)."""
        memo = self._memo.get(key)
        if memo is not None and memo[0] == self._seq:
            return memo[1]
        body = json.dumps(compute(), separators=(",", ":")).encode()
        digest = hashlib.blake2b(body, digest_size=8).digest()
        prev = self._answers.get(key)
        if prev is not None and prev[0] == digest:
            idx = prev[1]
            self._answers.move_to_end(key)
        else:
            idx = self.index
            if self._shared and prev is not None and idx <= prev[1]:
                # the store's revision moves on the watch's thread a moment before its change reaches
                # this loop: an answer computed in between got the revision without the change; the
                # changed answer must still get a larger index, or a client holding that one sleeps on
                idx = prev[1] + 1
            self._answers[key] = (digest, idx)
            if len(self._answers) > _MAX_WATCH_KEYS:
                old, _ = self._answers.popitem(last=False)
                self._memo.pop(old, None)
        ans = Answer(body, idx, digest.hex())
        self._memo[key] = (self._seq, ans)
        if len(self._memo) > _MAX_WATCH_KEYS:
            self._memo.clear()
        return ans

    async def blocking(self, key: str, topic: str, compute: Callable[[], Any], index: int, wait_s: float, content_hash: str = "") -> Answer:
        """Answer now if neither ``index`` nor ``content_hash`` is given or the answer differs from the
        one they name; else wait for a change."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            ev = self.topic(topic)
            if self._shared:
                # this replica's writes made so far get their revision first: an answer that shows
                # them carries an index at least theirs
                await self.reg.store.sync()
            ans = self.answer(key, compute)
            if content_hash:
                if ans.hash != content_hash:
                    return ans
            elif index <= 0 or (ans.index > index if self._shared else ans.index != index):
                # on a shared store an index ahead of this replica's view (the client came from a
                # replica further on) is waited out, not answered with an older one
                return ans
            remaining = deadline - loop.time()
            if remaining <= 0:
                return ans
            try:
                async with asyncio.timeout(remaining):
                    await ev.wait()
            except TimeoutError:
                ans = self.answer(key, compute)
                if self._shared and ans.index < index:
                    # nothing changed in the wait: never an index older than the client's (its
                    # replica was a moment ahead of this one's view)
                    ans = Answer(ans.body, max(self.index, index), ans.hash)
                return ans

    # ---- registration -------------------------------------------------------------------------

    def instance_id(self, node: str, service_id: str) -> str:
        return f"{_PREFIX}{node}:{service_id}"

    def service_id(self, inst: Instance) -> str:
        if inst.source == OWNER and inst.id.startswith(f"{_PREFIX}{inst.node}:"):
            return inst.id[len(_PREFIX) + len(inst.node) + 1 :]
        return inst.id

    def register(self, sdef: ServiceDef, node: str, *, replace_checks: bool = False) -> Instance:
        """Register (or update) a service on ``node``. Validates everything, then writes the check
        definitions and the registration before the instance, so a crash after the answer loses neither."""
        iid = self.instance_id(node, sdef.id)
        mesh = mesh_name(sdef.name)
        existing = self.reg.lookup(mesh)
        if existing is not None and consul_name(existing).lower() != sdef.name.lower():
            raise ConsulError(400, f"Invalid service name {sdef.name!r}: its mesh name {mesh!r} is taken by service {consul_name(existing)!r}")
        labels, zone, metadata = instance_fields(sdef.meta, sdef.tags)
        old = self.reg.instance(iid)
        if old is not None and old.source != OWNER:
            raise ConsulError(409, f"Service ID {sdef.id!r} on node {node!r} is owned by the {old.source} front door")
        defs = dict(self.checks.get(iid, {})) if old is not None and not replace_checks else {}
        for d in sdef.checks:
            defs[d.id] = d
        for cid in defs:
            other = self._by_check.get((node, cid))
            if other is not None and other != iid:
                raise ConsulError(400, f"Invalid check: CheckID {cid!r} is already used by another service on node {node!r}")
        old_status = {c.id: c for c in old.checks if c.owner == OWNER} if old is not None else {}
        checks = []
        for d in defs.values():
            prev = old_status.get(d.id)
            if d.kind == "none":  # the registrant sets the status
                checks.append(Check(id=d.id, owner=OWNER, status=CheckStatus(d.status), output=d.output[:4096]))
                continue
            status = prev.status if prev is not None else CheckStatus(d.status)
            checks.append(Check(id=d.id, owner=OWNER, status=status, output=prev.output if prev else ""))
        try:
            inst = Instance(
                id=iid, service=mesh, node=node, address=sdef.address, ports={"http": sdef.port}, zone=zone,
                weight=sdef.weight, labels=labels, metadata=metadata, source=OWNER, checks=checks,
            )
        except ValidationError as exc:
            raise ConsulError(400, "Invalid service: " + "; ".join(f"{f['field']}: {f['reason']}" for f in field_errors(exc))) from None
        if old is not None and old.service_key != inst.service_key:
            # Consul lets a service id move to another service name: replace the old instance
            self.deregister(node, sdef.id)
            old = None
        svc, port_name = join_service(self.reg, mesh, sdef.port, sdef.protocol, OWNER,
                                      labels={CONSUL_NAME: sdef.name} if sdef.name != mesh else None)
        inst = inst.model_copy(update={"ports": {port_name: sdef.port}})
        record = {"name": sdef.name, "meta": dict(sdef.meta), "tagged": dict(sdef.tagged)}
        self._save(iid, defs, record)
        try:
            inst = self.reg.register(inst, replace=True)
        except RegistryError as exc:
            self._save(iid, self.checks.get(iid), self.records.get(iid))
            release_service(self.reg, svc.key, OWNER)
            raise ConsulError(400, f"Invalid service: {exc}") from None
        self.records[iid] = record
        self._set_defs(inst, defs, time.monotonic())
        self.claim(iid)
        return inst

    def deregister(self, node: str, service_id: str) -> Instance:
        iid = self.instance_id(node, service_id)
        inst = self.reg.instance(iid)
        if inst is None or inst.source != OWNER:
            raise ConsulError(404, f'Unknown service ID "{service_id}". Ensure that the service ID is passed, not the service name.')
        self._release(iid)
        self.reg.deregister(iid, OWNER)
        self._forget(iid)
        self._save(iid, None, None)
        release_service(self.reg, inst.service_key, OWNER)
        return inst

    def _forget(self, iid: str) -> None:
        self.changed.add(iid)
        self.records.pop(iid, None)
        cids = list(self.checks.pop(iid, {}))
        for cid in cids:
            self.ttl_deadline.pop((iid, cid), None)
            self.deregister_after.discard((iid, cid))
            for table in (self.critical_since, self._output, self._synced):
                table.pop((iid, cid), None)
        node = self._node_of_checks.pop(iid, None)
        if node is not None:  # its own check ids only: no scan of every check of every instance
            for cid in cids:
                if self._by_check.get((node, cid)) == iid:
                    del self._by_check[(node, cid)]
        self._maintenance_reason.pop(iid, None)

    def _set_defs(self, inst: Instance, defs: dict[str, CheckDef], now: float) -> None:
        self.changed.add(inst.id)
        old = self.checks.get(inst.id, {})
        for cid in old:
            if self._by_check.get((inst.node, cid)) == inst.id:
                del self._by_check[(inst.node, cid)]
        self._node_of_checks[inst.id] = inst.node
        for cid in set(old) - set(defs):
            self.ttl_deadline.pop((inst.id, cid), None)
            self.critical_since.pop((inst.id, cid), None)
            self.deregister_after.discard((inst.id, cid))
        self.checks[inst.id] = defs
        status = {c.id: c.status for c in inst.checks}
        for cid, d in defs.items():
            self._by_check[(inst.node, cid)] = inst.id
            if d.kind == "ttl" and (inst.id, cid) not in self.ttl_deadline:
                self.ttl_deadline[(inst.id, cid)] = now + d.ttl_s
            if d.deregister_after_s:
                self.deregister_after.add((inst.id, cid))
            else:
                self.deregister_after.discard((inst.id, cid))
            if status.get(cid) is CheckStatus.critical:
                self.critical_since.setdefault((inst.id, cid), now)
            else:
                self.critical_since.pop((inst.id, cid), None)

    def _save(self, iid: str, defs: dict[str, CheckDef] | None, record: dict[str, Any] | None) -> None:
        """Write an instance's check definitions and registration record (None: delete them)."""
        puts: dict[tuple[str, str], Any] = {}
        deletes: list[tuple[str, str]] = []
        for key, value in ((f"consul/checks/{iid}", [d.to_json() for d in defs.values()] if defs else None),
                           (f"consul/service/{iid}", record)):
            if value is None:
                deletes.append((_META, key))
            else:
                puts[(_META, key)] = value
        self.reg.store.write(puts, tuple(deletes))
        self._unsaved.discard(iid)

    def flush(self) -> None:
        """Delete the stored definitions of instances removed by others (called by the checker every tick)."""
        for iid in list(self._unsaved):
            if self.reg.instance(iid) is None:
                self._forget(iid)
                self._save(iid, None, None)
            self._unsaved.discard(iid)

    def register_check(self, raw: Any, node: str) -> None:
        d = parse_check(raw)
        if not d.service_id:
            raise ConsulError(400, "Invalid check: ServiceID is required; meshpilot attaches every check to a service")
        iid = self.instance_id(node, d.service_id)
        inst = self.reg.instance(iid)
        if inst is None or inst.source != OWNER:
            raise ConsulError(400, f'ServiceID "{d.service_id}" does not exist')
        owner = self._by_check.get((node, d.id))
        if owner is not None and owner != iid:
            raise ConsulError(400, f"Invalid check: CheckID {d.id!r} is already used by another service on node {node!r}")
        defs = dict(self.checks.get(iid, {}))
        prev = next((c for c in inst.checks if c.id == d.id and c.owner == OWNER), None)
        defs[d.id] = d
        self._save(iid, defs, self.records.get(iid))
        try:
            inst = self.reg.set_check(iid, Check(id=d.id, owner=OWNER, status=prev.status if prev else CheckStatus(d.status)))
        except RegistryError as exc:
            self._save(iid, self.checks.get(iid), self.records.get(iid))
            raise ConsulError(400, f"Invalid check: {exc}") from None
        self._set_defs(inst, defs, time.monotonic())

    def _check_target(self, node: str, check_id: str) -> tuple[str, CheckDef]:
        iid = self._by_check.get((node, check_id))
        defs = self.checks.get(iid or "", {})
        if iid is None or check_id not in defs:
            raise ConsulError(404, f'Unknown check ID "{check_id}". Ensure that the check ID is passed, not the check name.')
        return iid, defs[check_id]

    def deregister_check(self, node: str, check_id: str) -> None:
        iid, _ = self._check_target(node, check_id)
        defs = dict(self.checks[iid])
        del defs[check_id]
        inst = self.reg.remove_check(iid, check_id, OWNER)
        self._set_defs(inst, defs, time.monotonic())
        self._save(iid, defs, self.records.get(iid))

    def update_check(self, node: str, check_id: str, status: str, output: str) -> None:
        """TTL check update (pass/warn/fail/update); other kinds are run by meshpilot."""
        iid, d = self._check_target(node, check_id)
        if d.kind != "ttl":
            raise ConsulError(500, f'CheckID "{check_id}" does not have associated TTL')
        self.claim(iid)
        self.ttl_deadline[(iid, check_id)] = time.monotonic() + d.ttl_s
        self.set_status(iid, check_id, status, output)

    def set_status(self, iid: str, check_id: str, status: str, output: str) -> None:
        """Set a check's status and output. A new output under an unchanged status stays here (see
        ``output``) and goes to the registry at most every ``_OUTPUT_SYNC_S``, as Consul does."""
        key = (iid, check_id)
        now = time.monotonic()
        output = output[:4096]
        inst = self.reg.instance(iid)
        current = next((c for c in inst.checks if c.id == check_id and c.owner == OWNER), None) if inst else None
        if current is not None and current.status.value == status and now - self._synced.get(key, -_OUTPUT_SYNC_S) < _OUTPUT_SYNC_S:
            if output != current.output:
                self._output[key] = output
            else:
                self._output.pop(key, None)
            return
        try:
            check = Check(id=check_id, owner=OWNER, status=CheckStatus(status), output=output)
            inst = self.reg.set_check(iid, check)
        except (ValueError, RegistryError) as exc:
            raise ConsulError(400, f"Invalid check update: {exc}") from None
        self._synced[key] = now
        self._output.pop(key, None)
        if inst.id and status == "critical":
            self.critical_since.setdefault(key, time.monotonic())
        else:
            self.critical_since.pop(key, None)

    def check_status(self, node: str, check_id: str) -> str | None:
        """The status of a check on ``node`` (``serfHealth`` always passes), None when there is none."""
        if check_id == "serfHealth":
            return "passing"
        iid = self._by_check.get((node, check_id))
        inst = self.reg.instance(iid) if iid else None
        check = next((c for c in inst.checks if c.id == check_id and c.owner == OWNER), None) if inst else None
        return None if check is None else check.status.value

    def output(self, iid: str, check: Check) -> str:
        """A check's newest output (the registry's may be up to ``_OUTPUT_SYNC_S`` old)."""
        return self._output.get((iid, check.id), check.output) if check.owner == OWNER else check.output

    def catalog_register(self, node: str, sdef: ServiceDef) -> None:
        """``/v1/catalog/register``: a service on any node, with checks whose status the caller sets."""
        self.register(sdef, node, replace_checks=True)

    def catalog_deregister(self, raw: Any) -> None:
        """``/v1/catalog/deregister``: one service, one check, or every Consul service of a node."""
        if not isinstance(raw, dict):
            raise ConsulError(400, "Request decode failed: expected a JSON object")
        d = fold(raw)
        node = str(d.get("node") or "")
        if not node:
            raise ConsulError(400, "Must provide node")
        try:
            if d.get("serviceid"):
                self.deregister(node, str(d["serviceid"]))
            elif d.get("checkid"):
                self.deregister_check(node, str(d["checkid"]))
            else:
                for inst in self.node_instances(node):
                    if inst.source == OWNER:
                        self.deregister(node, self.service_id(inst))
        except ConsulError as exc:
            if exc.status != 404:  # Consul answers true for what is already gone
                raise

    def maintenance(self, node: str, service_id: str, enable: bool, reason: str) -> None:
        iid = self.instance_id(node, service_id)
        inst = self.reg.instance(iid)
        if inst is None or inst.source != OWNER:
            raise ConsulError(404, f'Unknown service ID "{service_id}". Ensure that the service ID is passed, not the service name.')
        if enable:
            self._maintenance_reason[iid] = reason or "Maintenance mode is enabled for this service, but no reason was provided. This is a default message."
        else:
            self._maintenance_reason.pop(iid, None)
        self.reg.set_maintenance(iid, enable)

    # ---- views --------------------------------------------------------------------------------

    def node_of(self, inst: Instance) -> str:
        return inst.node or inst.address

    def node_json(self, node: str, address: str) -> dict[str, Any]:
        return {
            "ID": _node_id(node), "Node": node, "Address": address, "Datacenter": self.datacenter,
            "TaggedAddresses": {"lan": address, "lan_ipv4": address, "wan": address, "wan_ipv4": address},
            "Meta": {"consul-network-segment": ""}, "CreateIndex": 1, "ModifyIndex": 1,
        }

    def _name(self, inst: Instance, svc: Service | None) -> str:
        rec = self.records.get(inst.id)
        if rec is not None:
            return str(rec["name"])
        return consul_name(svc) if svc else inst.service

    def service_json(self, inst: Instance, svc: Service | None) -> dict[str, Any]:
        """A service instance as Consul shows it; a Consul registration shows Meta and TaggedAddresses
        exactly as given (the registry's protocol, labels and zone are not added to them)."""
        _name, port, _protocol = primary_port(svc, inst)
        create, modify = self._indexes.get(inst.id, (1, 1))
        rec = self.records.get(inst.id)
        return {
            "ID": self.service_id(inst), "Service": self._name(inst, svc), "Tags": tags_of(inst),
            "Address": inst.address, "Meta": dict(rec["meta"]) if rec is not None else exported_meta(svc, inst), "Port": port,
            "Weights": {"Passing": inst.weight, "Warning": 1}, "EnableTagOverride": False,
            "TaggedAddresses": _tagged(inst.address, port, rec["tagged"] if rec is not None else {}),
            "Datacenter": self.datacenter, "CreateIndex": create, "ModifyIndex": modify,
        }

    def checks_json(self, inst: Instance, svc: Service | None, with_node: bool = True, newest: bool = False) -> list[dict[str, Any]]:
        """An instance's checks; ``newest``: with outputs not yet synced to the registry (the agent's view)."""
        node = self.node_of(inst)
        sid = self.service_id(inst)
        sname = self._name(inst, svc)
        tags = tags_of(inst)
        create, modify = self._indexes.get(inst.id, (1, 1))
        out: list[dict[str, Any]] = []
        if with_node:
            out.append({
                "Node": node, "CheckID": "serfHealth", "Name": "Serf Health Status", "Status": "passing", "Notes": "",
                "Output": "Agent alive and reachable", "ServiceID": "", "ServiceName": "", "ServiceTags": [], "Type": "",
                "Definition": {}, "CreateIndex": 1, "ModifyIndex": 1,
            })
        defs = self.checks.get(inst.id, {}) if inst.source == OWNER else {}
        for c in inst.checks:
            d = defs.get(c.id) if c.owner == OWNER else None
            out.append({
                "Node": node, "CheckID": c.id if c.owner == OWNER else f"{c.owner}:{c.id}",
                "Name": d.name if d else f"meshpilot {c.owner} check", "Status": c.status.value,
                "Notes": d.notes if d else "", "Output": self.output(inst.id, c) if newest else c.output, "ServiceID": sid, "ServiceName": sname,
                "ServiceTags": tags, "Type": (d.kind if d.kind != "none" else "") if d else c.owner, "Definition": d.definition() if d else {},
                "CreateIndex": create, "ModifyIndex": modify,
            })
        if inst.maintenance:
            out.append({
                "Node": node, "CheckID": f"_service_maintenance:{sid}", "Name": "Service Maintenance Mode",
                "Status": "critical", "Notes": self._maintenance_reason.get(inst.id, "Maintenance mode is enabled"),
                "Output": "", "ServiceID": sid, "ServiceName": sname, "ServiceTags": tags, "Type": "maintenance",
                "Definition": {}, "CreateIndex": create, "ModifyIndex": modify,
            })
        return out

    def lookup(self, name: str) -> Service | None:
        """The service a Consul name means: one registered under that name (any case), else
        ``<name>`` or ``<name>.<namespace>`` in the registry."""
        svc = self.reg.lookup(mesh_name(name))
        if svc is not None and consul_name(svc).lower() == name.lower():
            return svc
        return self.reg.service(_key_for(name))

    def _instances(self, name: str, tags: list[str]) -> tuple[Service | None, list[Instance]]:
        svc = self.lookup(name)
        if svc is None:
            return None, []
        out = []
        for inst in self.reg.instances(svc.key):
            have = set(tags_of(inst))
            if all(t in have for t in tags):
                out.append(inst)
        return svc, out

    def health_service(self, name: str, passing: bool, tags: list[str]) -> list[dict[str, Any]]:
        svc, insts = self._instances(name, tags)
        out = []
        for inst in insts:
            checks = self.checks_json(inst, svc)
            if passing and any(c["Status"] != "passing" for c in checks):
                continue
            out.append({"Node": self.node_json(self.node_of(inst), inst.address), "Service": self.service_json(inst, svc), "Checks": checks})
        return out

    def catalog_service(self, name: str, tags: list[str]) -> list[dict[str, Any]]:
        svc, insts = self._instances(name, tags)
        out = []
        for inst in insts:
            s = self.service_json(inst, svc)
            n = self.node_json(self.node_of(inst), inst.address)
            out.append({
                "ID": n["ID"], "Node": n["Node"], "Address": n["Address"], "Datacenter": self.datacenter,
                "TaggedAddresses": n["TaggedAddresses"], "NodeMeta": n["Meta"], "ServiceKind": "", "ServiceID": s["ID"],
                "ServiceName": s["Service"], "ServiceTags": s["Tags"], "ServiceAddress": s["Address"],
                "ServiceWeights": s["Weights"], "ServiceMeta": s["Meta"], "ServicePort": s["Port"],
                "ServiceTaggedAddresses": s["TaggedAddresses"], "ServiceEnableTagOverride": False,
                "CreateIndex": s["CreateIndex"], "ModifyIndex": s["ModifyIndex"],
            })
        return out

    def catalog_services(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for svc in self.reg.services():
            insts = self.reg.instances(svc.key)
            if not insts:
                continue
            tags: dict[str, None] = {}
            for inst in insts:
                tags.update(dict.fromkeys(tags_of(inst)))
            out[consul_name(svc)] = sorted(tags)
        return out

    def nodes(self) -> dict[str, str]:
        out = {self.node_name: "127.0.0.1"}
        for inst in self.reg.instances():
            out.setdefault(self.node_of(inst), inst.address)
        return out

    def catalog_nodes(self) -> list[dict[str, Any]]:
        return [self.node_json(n, a) for n, a in sorted(self.nodes().items())]

    def node_instances(self, node: str) -> list[Instance]:
        return [i for i in self.reg.instances() if self.node_of(i) == node]

    def agent_services(self, node: str) -> dict[str, Any]:
        out = {}
        for inst in self.node_instances(node):
            s = self.service_json(inst, self.reg.service(inst.service_key))
            s.pop("CreateIndex")
            s.pop("ModifyIndex")
            out[s["ID"]] = s
        return out

    def agent_checks(self, node: str) -> dict[str, Any]:
        out = {}
        for inst in self.node_instances(node):
            for c in self.checks_json(inst, self.reg.service(inst.service_key), with_node=False, newest=True):
                out[c["CheckID"]] = c
        return out

    def health_checks(self, name: str) -> list[dict[str, Any]]:
        svc, insts = self._instances(name, [])
        return [c for inst in insts for c in self.checks_json(inst, svc, with_node=False)]

    def health_state(self, state: str) -> list[dict[str, Any]]:
        out = []
        for inst in self.reg.instances():
            for c in self.checks_json(inst, self.reg.service(inst.service_key)):
                if state == "any" or c["Status"] == state:
                    out.append(c)
        return out

    def health_node(self, node: str) -> list[dict[str, Any]]:
        out = []
        for n, inst in enumerate(self.node_instances(node)):
            out.extend(self.checks_json(inst, self.reg.service(inst.service_key), with_node=n == 0))
        return out

    def catalog_node(self, node: str) -> dict[str, Any] | None:
        nodes = self.nodes()
        if node not in nodes:
            return None
        services = {}
        for inst in self.node_instances(node):
            s = self.service_json(inst, self.reg.service(inst.service_key))
            services[s["ID"]] = s
        return {"Node": self.node_json(node, nodes[node]), "Services": services}
