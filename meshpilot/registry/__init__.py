"""The registry: services and instances of every kind of app, and the events their changes emit.

Front doors (management API, Consul- and Eureka-compatible APIs, HDS) write here; translate/ and
meshdns read from here through change events. The working set lives in memory and every write goes
to the ``Store`` before it is visible; a front door awaits ``store.sync()`` before it answers (the
control plane does this for every HTTP request), so a restart loads everything that was acknowledged.
Writes that fail validation or conflict raise before anything is stored.

On a shared store (etcd) other control-plane replicas write too: the store hands their changes to
``apply_remote`` in the store's order, which updates the working set and emits the same changes a
local write would (marked ``remote``), so every replica rebuilds its caches from the same events.
Changes to tables the registry does not hold in memory (identity, access, Consul sessions, liveness)
are passed on as ``document`` changes for the parts that keep views of them.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from meshpilot.model import Check, CheckStatus, Instance, Service, service_key
from meshpilot.registry.store import Guard, RemoteChange, Store

__all__ = ["Change", "Conflict", "NotFound", "Registry", "RegistryError"]

log = logging.getLogger("meshpilot.registry")


class RegistryError(Exception):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class NotFound(RegistryError):
    pass


class Conflict(RegistryError):
    pass


@dataclass(frozen=True, slots=True)
class Change:
    kind: Literal["service", "instance", "policy", "kv", "document"]
    key: str
    service: str  # the service key the change belongs to ("" for none)
    op: Literal["put", "delete"]
    table: str = ""  # for a "document": the store table it is in
    remote: bool = False  # made by another replica of a shared store


Listener = Callable[[Change], None]


class Registry:
    def __init__(self, store: Store, vip_cidr: str = "240.240.0.0/16", vip6_cidr: str | None = None) -> None:
        self.store = store
        self.vip_net = ipaddress.ip_network(vip_cidr)
        self.vip6_net = ipaddress.ip_network(vip6_cidr) if vip6_cidr else None
        self._services: dict[str, Service] = {}
        self._instances: dict[str, Instance] = {}
        self._by_service: dict[str, set[str]] = {}
        self._listeners: list[Listener] = []
        self._vips: dict[str, str] = {}  # vip -> service key
        self.revision = 0
        self._load()

    # ---- reading -------------------------------------------------------------------------

    def services(self) -> list[Service]:
        return sorted(self._services.values(), key=lambda s: s.key)

    def service(self, key: str) -> Service | None:
        return self._services.get(key.lower())

    def lookup(self, name: str, namespace: str = "default") -> Service | None:
        return self._services.get(service_key(name, namespace))

    def instances(self, service: str | None = None) -> list[Instance]:
        if service is None:
            return sorted(self._instances.values(), key=lambda i: i.id)
        ids = self._by_service.get(service.lower(), ())
        return sorted((self._instances[i] for i in ids), key=lambda i: i.id)

    def iter_instances(self) -> Iterable[Instance]:
        """Every instance, unsorted (cheaper than ``instances()`` for scans)."""
        return self._instances.values()

    def instance(self, instance_id: str) -> Instance | None:
        return self._instances.get(instance_id)

    def vip6(self, service: Service) -> str | None:
        """The service's IPv6 virtual address, derived from its IPv4 one when a v6 range is set."""
        if not self.vip6_net or not service.vip:
            return None
        offset = int(ipaddress.ip_address(service.vip)) - int(self.vip_net.network_address)
        return str(self.vip6_net.network_address + offset)

    # ---- events ---------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _emit(self, change: Change) -> None:
        self.revision += 1
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:  # a broken listener must not break writers
                log.exception("event=listener_failed change=%s", change)

    # ---- services -------------------------------------------------------------------------

    def put_service(self, service: Service) -> Service:
        """Create or replace a service. Its virtual IP is kept, or allocated on creation."""
        old = self._services.get(service.key)
        vip = old.vip if old and old.vip else self._allocate_vip(service.key)
        service = service.model_copy(update={"vip": vip})
        if old == service:
            return old
        self.store.write({("services", service.key): service.model_dump(mode="json")})
        self._services[service.key] = service
        self._vips[vip] = service.key
        self._by_service.setdefault(service.key, set())
        self._emit(Change("service", service.key, service.key, "put"))
        return service

    def delete_service(self, key: str) -> Service:
        key = key.lower()
        svc = self._services.get(key)
        if svc is None:
            raise NotFound("service", f"no service {key!r}")
        ids = sorted(self._by_service.get(key, ()))
        self.store.write({}, (("services", key), *(("instances", i) for i in ids)))
        for i in ids:
            del self._instances[i]
        self._by_service.pop(key, None)
        del self._services[key]
        if svc.vip:
            self._vips.pop(svc.vip, None)
        for i in ids:
            self._emit(Change("instance", i, key, "delete"))
        self._emit(Change("service", key, key, "delete"))
        return svc

    def _allocate_vip(self, key: str) -> str:
        """A stable address: the first free one probing from a hash of the service key."""
        net = self.vip_net
        usable = net.num_addresses - 2 if net.num_addresses > 2 else net.num_addresses
        if len(self._vips) >= usable:
            raise Conflict("vip", f"virtual IP range {net} is exhausted")
        start = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % usable
        for step in range(usable):
            offset = (start + step) % usable + (1 if net.num_addresses > 2 else 0)
            candidate = str(net.network_address + offset)
            if candidate not in self._vips:
                return candidate
        raise Conflict("vip", f"virtual IP range {net} is exhausted")

    # ---- instances ------------------------------------------------------------------------

    def register(self, inst: Instance, *, replace: bool = False) -> Instance:
        """Add an instance. Its ports must name ports of its service; ids are unique.

        With ``replace``, an existing instance with the same id and source is updated: the
        registering front door keeps ownership, checks owned by other writers are kept, and the
        instance stays routable if it already was.
        """
        svc = self._services.get(inst.service_key)
        if svc is None:
            raise NotFound("service", f"no service {inst.service_key!r}; create it first")
        for pname in inst.ports:
            if svc.port(pname) is None:
                known = ", ".join(p.name for p in svc.ports)
                raise RegistryError(f"ports.{pname}", f"service {svc.key} has no port named {pname!r} (has: {known})")
        old = self._instances.get(inst.id)
        if old is not None:
            if not replace:
                raise Conflict("id", f"instance {inst.id!r} already exists")
            if old.source != inst.source:
                raise Conflict("id", f"instance {inst.id!r} is owned by the {old.source} front door")
            if old.service_key != inst.service_key:
                raise Conflict("service", f"instance {inst.id!r} belongs to {old.service_key}")
            owners = {c.owner for c in inst.checks}
            kept = [c for c in old.checks if c.owner not in owners]
            inst = inst.model_copy(update={"checks": [*kept, *inst.checks], "ever_passed": old.ever_passed or inst.ever_passed})
        inst = _mark_passed(inst)
        if old == inst:
            return old
        self._write_instance(inst)
        return inst

    def deregister(self, instance_id: str, source: str | None = None) -> Instance:
        inst = self._instances.get(instance_id)
        if inst is None:
            raise NotFound("id", f"no instance {instance_id!r}")
        if source is not None and inst.source != source:
            raise Conflict("id", f"instance {instance_id!r} was registered by the {inst.source} front door")
        self.store.write({}, (("instances", instance_id),))
        del self._instances[instance_id]
        self._by_service.get(inst.service_key, set()).discard(instance_id)
        self._emit(Change("instance", instance_id, inst.service_key, "delete"))
        return inst

    def set_check(self, instance_id: str, check: Check) -> Instance:
        """Set one check; a writer may only change checks it owns (or create new ones)."""
        inst = self._instances.get(instance_id)
        if inst is None:
            raise NotFound("id", f"no instance {instance_id!r}")
        checks = list(inst.checks)
        for n, c in enumerate(checks):
            if c.id == check.id:
                if c.owner != check.owner:
                    raise Conflict("check.owner", f"check {check.id!r} is owned by {c.owner!r}")
                if c == check:
                    return inst
                checks[n] = check
                break
        else:
            checks.append(check)
        return self._update(inst, checks=checks)

    def remove_check(self, instance_id: str, check_id: str, owner: str) -> Instance:
        inst = self._instances.get(instance_id)
        if inst is None:
            raise NotFound("id", f"no instance {instance_id!r}")
        for c in inst.checks:
            if c.id == check_id:
                if c.owner != owner:
                    raise Conflict("check.owner", f"check {check_id!r} is owned by {c.owner!r}")
                return self._update(inst, checks=[x for x in inst.checks if x.id != check_id])
        raise NotFound("check", f"instance {instance_id!r} has no check {check_id!r}")

    def set_maintenance(self, instance_id: str, on: bool) -> Instance:
        inst = self._instances.get(instance_id)
        if inst is None:
            raise NotFound("id", f"no instance {instance_id!r}")
        return self._update(inst, maintenance=on)

    def _update(self, inst: Instance, **changes: Any) -> Instance:
        new = _mark_passed(Instance.model_validate({**inst.model_dump(), **changes}))
        if new == inst:
            return inst
        self._write_instance(new)
        return new

    def _write_instance(self, inst: Instance) -> None:
        self.store.write({("instances", inst.id): inst.model_dump(mode="json")})
        self._instances[inst.id] = inst
        self._by_service.setdefault(inst.service_key, set()).add(inst.id)
        self._emit(Change("instance", inst.id, inst.service_key, "put"))

    # ---- generic documents (policies, kv) ---------------------------------------------------

    def put_document(self, table: Literal["policies", "kv"], key: str, value: Any, service: str = "") -> None:
        self.store.write({(table, key): value})
        self._emit(Change("policy" if table == "policies" else "kv", key, service, "put"))

    def delete_document(self, table: Literal["policies", "kv"], key: str, service: str = "") -> None:
        self.store.write({}, ((table, key),))
        self._emit(Change("policy" if table == "policies" else "kv", key, service, "delete"))

    def write_documents(self, table: Literal["policies", "kv"], puts: dict[str, Any], deletes: Iterable[str] = ()) -> None:
        """Put and delete several documents of one table in one atomic write (a transaction)."""
        gone = tuple(deletes)
        self.store.write({(table, k): v for k, v in puts.items()}, tuple((table, k) for k in gone))
        kind: Literal["policy", "kv"] = "policy" if table == "policies" else "kv"
        for k in puts:
            self._emit(Change(kind, k, "", "put"))
        for k in gone:
            self._emit(Change(kind, k, "", "delete"))

    async def commit_documents_if(self, since: int, table: Literal["policies", "kv"], guards: Sequence[Guard],
                                  puts: dict[str, Any], deletes: Iterable[str] = ()) -> bool:
        """``write_documents`` if the guards hold in the store since revision ``since`` (``Store.commit_if``);
        whether it wrote."""
        gone = tuple(deletes)
        if not await self.store.commit_if(since, guards, {(table, k): v for k, v in puts.items()}, tuple((table, k) for k in gone)):
            return False
        kind: Literal["policy", "kv"] = "policy" if table == "policies" else "kv"
        for k in puts:
            self._emit(Change(kind, k, "", "put"))
        for k in gone:
            self._emit(Change(kind, k, "", "delete"))
        return True

    def documents(self, table: Literal["policies", "kv"]) -> Iterable[tuple[str, Any]]:
        return self.store.items(table)

    # ---- other replicas' writes ---------------------------------------------------------------

    def apply_remote(self, changes: list[RemoteChange], revision: int = 0) -> None:
        """Take in what another replica wrote (in store order); a change that leaves the working set
        as it is emits nothing. A stored document that does not validate is logged and skipped, as at load."""
        for table, key, doc in changes:
            try:
                if table == "services":
                    self._remote_service(key, doc)
                elif table == "instances":
                    self._remote_instance(key, doc)
                elif table in ("policies", "kv"):
                    self._emit(Change("policy" if table == "policies" else "kv", key, "", "delete" if doc is None else "put",
                                      remote=True))
                else:
                    self._emit(Change("document", key, "", "delete" if doc is None else "put", table=table, remote=True))
            except Exception:
                log.exception("event=bad_remote_change table=%s key=%s", table, key)

    def _remote_service(self, key: str, doc: Any) -> None:
        old = self._services.get(key)
        if doc is None:
            if old is None:
                return
            # the instances deleted with it (the same write); one another replica registered meanwhile
            # stays, as it stays in the store
            kept = {i for i in self._by_service.get(key, ()) if self.store.get("instances", i) is not None}
            ids = sorted(self._by_service.pop(key, set()) - kept)
            if kept:
                self._by_service[key] = kept
                log.warning("event=service_deleted_with_instances service=%s instances=%s", key, ",".join(sorted(kept)))
            for i in ids:
                self._instances.pop(i, None)
            del self._services[key]
            if old.vip and self._vips.get(old.vip) == key:
                del self._vips[old.vip]
            for i in ids:
                self._emit(Change("instance", i, key, "delete", remote=True))
            self._emit(Change("service", key, key, "delete", remote=True))
            return
        svc = Service.model_validate(doc)
        if svc == old:
            return
        if old is not None and old.vip and old.vip != svc.vip and self._vips.get(old.vip) == key:
            del self._vips[old.vip]
        holder = self._vips.get(svc.vip) if svc.vip else None
        self._services[svc.key] = svc
        if svc.vip:
            self._vips[svc.vip] = svc.key
        self._by_service.setdefault(svc.key, set())
        self._emit(Change("service", svc.key, svc.key, "put", remote=True))
        if svc.vip and holder is not None and holder != svc.key and holder in self._services:
            # two replicas created services at once and gave them one address: the greater key
            # moves (any replica may move it; the store keeps the last move and all follow it)
            loser = max(holder, svc.key)
            self._vips[svc.vip] = min(holder, svc.key)
            log.warning("event=vip_conflict vip=%s services=%s,%s moved=%s", svc.vip, holder, svc.key, loser)
            moved = self._services[loser].model_copy(update={"vip": self._allocate_vip(loser)})
            self.store.write({("services", loser): moved.model_dump(mode="json")})
            self._services[loser] = moved
            assert moved.vip is not None
            self._vips[moved.vip] = loser
            self._emit(Change("service", loser, loser, "put"))

    def _remote_instance(self, key: str, doc: Any) -> None:
        old = self._instances.get(key)
        if doc is None:
            if old is None:
                return
            del self._instances[key]
            self._by_service.get(old.service_key, set()).discard(key)
            self._emit(Change("instance", key, old.service_key, "delete", remote=True))
            return
        inst = Instance.model_validate(doc)
        if inst == old:
            return
        if old is not None and old.service_key != inst.service_key:
            self._by_service.get(old.service_key, set()).discard(key)
            self._emit(Change("instance", key, old.service_key, "delete", remote=True))
        self._instances[inst.id] = inst
        self._by_service.setdefault(inst.service_key, set()).add(inst.id)
        self._emit(Change("instance", inst.id, inst.service_key, "put", remote=True))

    # ---- loading --------------------------------------------------------------------------

    def _load(self) -> None:
        for key, doc in self.store.items("services"):
            try:
                svc = Service.model_validate(doc)
            except Exception:
                log.exception("event=bad_stored_service key=%s", key)
                continue
            self._services[svc.key] = svc
            self._by_service.setdefault(svc.key, set())
            if svc.vip:
                self._vips[svc.vip] = svc.key
        for key, doc in self.store.items("instances"):
            try:
                inst = Instance.model_validate(doc)
            except Exception:
                log.exception("event=bad_stored_instance key=%s", key)
                continue
            self._instances[inst.id] = inst
            self._by_service.setdefault(inst.service_key, set()).add(inst.id)


def _mark_passed(inst: Instance) -> Instance:
    if not inst.ever_passed and not inst.maintenance and inst.health is CheckStatus.passing:
        return inst.model_copy(update={"ever_passed": True})
    return inst
