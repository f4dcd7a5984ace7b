"""The Consul agent that meshpilot stands in for: registrations, checks, KV and the Consul views.

meshpilot is one agent serving many hosts. Each calling address is its own synthetic node (named
after the address), and a service id is unique per node: service ``web`` registered from 10.0.0.7
is registry instance ``consul:10.0.0.7:web``. Checks are registry checks owned by ``consul``;
their definitions (TTL, HTTP, TCP, intervals) are kept here and in the store's ``meta`` table so
the checker (``checker.py``) can keep them current after a restart. Every instance in the
registry, whatever its source, is visible through the Consul views; only Consul-registered ones
can be changed through them.

Blocking queries: every answer has an index that changes only when that answer does. The agent
keeps, per query (path and parameters), the digest of the last answer and the index it got; a
different answer gets the current global index (bumped by every registry change). A waiting query
sleeps on a topic (one service, the catalog, or KV) and recomputes when that topic changes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshpilot.consul.definitions import CheckDef, ConsulError, ServiceDef, parse_check
from meshpilot.consul.metadata import exported_meta, instance_fields, join_service, primary_port, release_service, tags_of
from meshpilot.model import Check, CheckStatus, Instance, Service, ValidationError, field_errors
from meshpilot.registry import Change, RegistryError, Registry

__all__ = ["Answer", "ConsulAgent", "OWNER", "VERSION"]

log = logging.getLogger("meshpilot.consul")

OWNER = "consul"
VERSION = "1.17.0"  # the Consul version meshpilot's API subset corresponds to
_PREFIX = "consul:"
_META = "meta"
_MAX_WATCH_KEYS = 20_000


@dataclass(frozen=True, slots=True)
class Answer:
    body: bytes
    index: int


def _node_id(node: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{node}.node.meshpilot"))


def consul_name(svc: Service) -> str:
    """The name Consul clients use: ``<name>`` in namespace default, else ``<name>.<namespace>``."""
    return svc.name if svc.namespace == "default" else f"{svc.name}.{svc.namespace}"


def _key_for(name: str) -> str:
    name = name.lower()
    base, _, ns = name.partition(".")
    return f"{base}.{ns or 'default'}"


class ConsulAgent:
    def __init__(self, registry: Registry, *, datacenter: str = "dc1", node_name: str = "meshpilot") -> None:
        self.reg = registry
        self.datacenter = datacenter
        self.node_name = node_name
        self.index = max(1, registry.revision)
        self.started = time.time()
        self._indexes: dict[str, tuple[int, int]] = {}  # instance id -> (create index, modify index)
        self.checks: dict[str, dict[str, CheckDef]] = {}  # instance id -> check id -> definition
        self._by_check: dict[tuple[str, str], str] = {}  # (node, check id) -> instance id
        self._node_of_checks: dict[str, str] = {}  # instance id -> node its checks are indexed under
        self._unsaved: set[str] = set()  # instances whose check definitions are not yet stored
        self.ttl_deadline: dict[tuple[str, str], float] = {}
        self.critical_since: dict[tuple[str, str], float] = {}
        self._maintenance_reason: dict[str, str] = {}
        self._topics: dict[str, asyncio.Event] = {}
        self._answers: OrderedDict[str, tuple[bytes, int]] = OrderedDict()  # query -> (digest, index)
        self._memo: dict[str, tuple[int, Answer]] = {}
        self.kv: dict[str, dict[str, Any]] = {}
        self._load()
        registry.subscribe(self._on_change)

    # ---- loading and events -------------------------------------------------------------------

    def _load(self) -> None:
        for key, value in self.reg.documents("kv"):
            if isinstance(value, dict) and "mi" in value:
                self.kv[key] = value
                self.index = max(self.index, int(value["mi"]))
        now = time.monotonic()
        for key, value in self.reg.store.items(_META):
            if not key.startswith("consul/checks/"):
                continue
            iid = key[len("consul/checks/") :]
            inst = self.reg.instance(iid)
            if inst is None or inst.source != OWNER:
                self.reg.store.write({}, ((_META, key),))
                continue
            defs = {d["id"]: CheckDef.from_json(d) for d in value}
            self._set_defs(inst, defs, now)
        for inst in self.reg.instances():
            self._indexes.setdefault(inst.id, (self.index, self.index))

    def _on_change(self, change: Change) -> None:
        self.index += 1
        if change.kind == "instance":
            if change.op == "delete":
                self._indexes.pop(change.key, None)
                if change.key in self.checks:
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
        if memo is not None and memo[0] == self.index:
            return memo[1]
        body = json.dumps(compute(), separators=(",", ":")).encode()
        digest = hashlib.blake2b(body, digest_size=16).digest()
        prev = self._answers.get(key)
        if prev is not None and prev[0] == digest:
            idx = prev[1]
            self._answers.move_to_end(key)
        else:
            idx = self.index
            self._answers[key] = (digest, idx)
            if len(self._answers) > _MAX_WATCH_KEYS:
                old, _ = self._answers.popitem(last=False)
                self._memo.pop(old, None)
        ans = Answer(body, idx)
        self._memo[key] = (self.index, ans)
        if len(self._memo) > _MAX_WATCH_KEYS:
            self._memo.clear()
        return ans

    async def blocking(self, key: str, topic: str, compute: Callable[[], Any], index: int, wait_s: float) -> Answer:
        """Answer now if ``index`` is 0 or differs from the answer's index; else wait for a change."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            ev = self.topic(topic)
            ans = self.answer(key, compute)
            if index <= 0 or ans.index != index:
                return ans
            remaining = deadline - loop.time()
            if remaining <= 0:
                return ans
            try:
                async with asyncio.timeout(remaining):
                    await ev.wait()
            except TimeoutError:
                return self.answer(key, compute)

    # ---- registration -------------------------------------------------------------------------

    def instance_id(self, node: str, service_id: str) -> str:
        return f"{_PREFIX}{node}:{service_id}"

    def service_id(self, inst: Instance) -> str:
        if inst.source == OWNER and inst.id.startswith(f"{_PREFIX}{inst.node}:"):
            return inst.id[len(_PREFIX) + len(inst.node) + 1 :]
        return inst.id

    def register(self, sdef: ServiceDef, node: str, *, replace_checks: bool = False) -> Instance:
        """Register (or update) a service on ``node``. Validates everything before writing."""
        iid = self.instance_id(node, sdef.id)
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
            status = prev.status if prev is not None else CheckStatus(d.status)
            checks.append(Check(id=d.id, owner=OWNER, status=status, output=prev.output if prev else ""))
        try:
            inst = Instance(
                id=iid, service=sdef.name, node=node, address=sdef.address, ports={"http": sdef.port}, zone=zone,
                weight=sdef.weight, labels=labels, metadata=metadata, source=OWNER, checks=checks,
            )
        except ValidationError as exc:
            raise ConsulError(400, "Invalid service: " + "; ".join(f"{f['field']}: {f['reason']}" for f in field_errors(exc))) from None
        if old is not None and old.service_key != inst.service_key:
            # Consul lets a service id move to another service name: replace the old instance
            self.deregister(node, sdef.id)
            old = None
        svc, port_name = join_service(self.reg, sdef.name, sdef.port, sdef.protocol, OWNER)
        inst = inst.model_copy(update={"ports": {port_name: sdef.port}})
        try:
            inst = self.reg.register(inst, replace=True)
        except RegistryError as exc:
            release_service(self.reg, svc.key, OWNER)
            raise ConsulError(400, f"Invalid service: {exc}") from None
        self._set_defs(inst, defs, time.monotonic())
        self._persist_defs(iid)
        return inst

    def deregister(self, node: str, service_id: str) -> Instance:
        iid = self.instance_id(node, service_id)
        inst = self.reg.instance(iid)
        if inst is None or inst.source != OWNER:
            raise ConsulError(404, f'Unknown service ID "{service_id}". Ensure that the service ID is passed, not the service name.')
        self.reg.deregister(iid, OWNER)
        self._forget(iid)
        self._unsaved.add(iid)
        release_service(self.reg, inst.service_key, OWNER)
        return inst

    def _forget(self, iid: str) -> None:
        for cid in self.checks.pop(iid, {}):
            self.ttl_deadline.pop((iid, cid), None)
            self.critical_since.pop((iid, cid), None)
        node = self._node_of_checks.pop(iid, None)
        if node is not None:
            for k in [k for k in self._by_check if k[0] == node and self._by_check[k] == iid]:
                del self._by_check[k]
        self._maintenance_reason.pop(iid, None)

    def _set_defs(self, inst: Instance, defs: dict[str, CheckDef], now: float) -> None:
        old = self.checks.get(inst.id, {})
        for cid in old:
            if self._by_check.get((inst.node, cid)) == inst.id:
                del self._by_check[(inst.node, cid)]
        self._node_of_checks[inst.id] = inst.node
        for cid in set(old) - set(defs):
            self.ttl_deadline.pop((inst.id, cid), None)
            self.critical_since.pop((inst.id, cid), None)
        self.checks[inst.id] = defs
        status = {c.id: c.status for c in inst.checks}
        for cid, d in defs.items():
            self._by_check[(inst.node, cid)] = inst.id
            if d.kind == "ttl" and (inst.id, cid) not in self.ttl_deadline:
                self.ttl_deadline[(inst.id, cid)] = now + d.ttl_s
            if status.get(cid) is CheckStatus.critical:
                self.critical_since.setdefault((inst.id, cid), now)
            else:
                self.critical_since.pop((inst.id, cid), None)

    def _persist_defs(self, iid: str) -> None:
        """Check definitions are written behind (``flush``), batched into one transaction."""
        self._unsaved.add(iid)

    def flush(self) -> None:
        """Write pending check definitions to the store (called by the checker every tick)."""
        if not self._unsaved:
            return
        puts: dict[tuple[str, str], Any] = {}
        deletes: list[tuple[str, str]] = []
        for iid in self._unsaved:
            defs = self.checks.get(iid)
            if defs and self.reg.instance(iid) is not None:
                puts[(_META, f"consul/checks/{iid}")] = [d.to_json() for d in defs.values()]
            else:
                deletes.append((_META, f"consul/checks/{iid}"))
        self._unsaved.clear()
        self.reg.store.write(puts, tuple(deletes))

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
        inst = self.reg.set_check(iid, Check(id=d.id, owner=OWNER, status=prev.status if prev else CheckStatus(d.status)))
        self._set_defs(inst, defs, time.monotonic())
        self._persist_defs(iid)

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
        self._persist_defs(iid)

    def update_check(self, node: str, check_id: str, status: str, output: str) -> None:
        """TTL check update (pass/warn/fail/update); other kinds are run by meshpilot."""
        iid, d = self._check_target(node, check_id)
        if d.kind != "ttl":
            raise ConsulError(500, f'CheckID "{check_id}" does not have associated TTL')
        self.ttl_deadline[(iid, check_id)] = time.monotonic() + d.ttl_s
        self.set_status(iid, check_id, status, output)

    def set_status(self, iid: str, check_id: str, status: str, output: str) -> None:
        try:
            check = Check(id=check_id, owner=OWNER, status=CheckStatus(status), output=output[:4096])
            inst = self.reg.set_check(iid, check)
        except (ValueError, RegistryError) as exc:
            raise ConsulError(400, f"Invalid check update: {exc}") from None
        key = (iid, check_id)
        if inst.id and status == "critical":
            self.critical_since.setdefault(key, time.monotonic())
        else:
            self.critical_since.pop(key, None)

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

    # ---- KV -----------------------------------------------------------------------------------

    def kv_put(self, key: str, value: bytes, flags: int, cas: int | None) -> bool:
        old = self.kv.get(key)
        if cas is not None:
            if cas == 0 and old is not None:
                return False
            if cas > 0 and (old is None or old["mi"] != cas):
                return False
        idx = self.index + 1
        entry = {
            "v": base64.b64encode(value).decode() if value else None,
            "f": flags,
            "ci": old["ci"] if old else idx,
            "mi": idx,
        }
        self.kv[key] = entry
        self.reg.put_document("kv", key, entry)
        return True

    def kv_delete(self, key: str, recurse: bool, cas: int | None) -> bool:
        if recurse:
            keys = [k for k in self.kv if k.startswith(key)]
        else:
            old = self.kv.get(key)
            if cas is not None and (old is None or old["mi"] != cas):
                return False
            keys = [key] if old is not None else []
        for k in keys:
            del self.kv[k]
            self.reg.delete_document("kv", k)
        return True

    def kv_entries(self, key: str, recurse: bool) -> list[dict[str, Any]]:
        if recurse:
            keys = sorted(k for k in self.kv if k.startswith(key))
        else:
            keys = [key] if key in self.kv else []
        return [
            {"LockIndex": 0, "Key": k, "Flags": self.kv[k]["f"], "Value": self.kv[k]["v"],
             "CreateIndex": self.kv[k]["ci"], "ModifyIndex": self.kv[k]["mi"]}
            for k in keys
        ]

    def kv_keys(self, prefix: str, separator: str) -> list[str]:
        out: set[str] = set()
        for k in self.kv:
            if not k.startswith(prefix):
                continue
            if separator:
                cut = k.find(separator, len(prefix))
                if cut >= 0:
                    k = k[: cut + len(separator)]
            out.add(k)
        return sorted(out)

    # ---- views --------------------------------------------------------------------------------

    def node_of(self, inst: Instance) -> str:
        return inst.node or inst.address

    def node_json(self, node: str, address: str) -> dict[str, Any]:
        return {
            "ID": _node_id(node), "Node": node, "Address": address, "Datacenter": self.datacenter,
            "TaggedAddresses": {"lan": address, "lan_ipv4": address, "wan": address, "wan_ipv4": address},
            "Meta": {"consul-network-segment": ""}, "CreateIndex": 1, "ModifyIndex": 1,
        }

    def service_json(self, inst: Instance, svc: Service | None) -> dict[str, Any]:
        _name, port, _protocol = primary_port(svc, inst)
        create, modify = self._indexes.get(inst.id, (1, 1))
        return {
            "ID": self.service_id(inst), "Service": consul_name(svc) if svc else inst.service, "Tags": tags_of(inst),
            "Address": inst.address, "Meta": exported_meta(svc, inst), "Port": port,
            "Weights": {"Passing": inst.weight, "Warning": 1}, "EnableTagOverride": False,
            "TaggedAddresses": {"lan_ipv4": {"Address": inst.address, "Port": port}},
            "Datacenter": self.datacenter, "CreateIndex": create, "ModifyIndex": modify,
        }

    def checks_json(self, inst: Instance, svc: Service | None, with_node: bool = True) -> list[dict[str, Any]]:
        node = self.node_of(inst)
        sid = self.service_id(inst)
        sname = consul_name(svc) if svc else inst.service
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
                "Notes": d.notes if d else "", "Output": c.output, "ServiceID": sid, "ServiceName": sname,
                "ServiceTags": tags, "Type": d.kind if d else c.owner, "Definition": d.definition() if d else {},
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
            for c in self.checks_json(inst, self.reg.service(inst.service_key), with_node=False):
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
