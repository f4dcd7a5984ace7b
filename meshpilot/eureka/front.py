"""The Eureka server that meshpilot stands in for: registrations with leases, status overrides,
and the full and delta views of the whole registry.

A Eureka registration becomes registry instance ``eureka:<app>:<instanceId>`` in service ``<app>``
(lower-cased), with one check owned by ``eureka``: passing while the effective status (the override
if one is set, else the reported status) is UP. Instances from every other source appear too, as
UP while routable, OUT_OF_SERVICE in maintenance, DOWN otherwise. Leases expire after the
registration's ``durationInSecs`` without a renewal; the instance is then cancelled (there is no
self-preservation mode). Deltas are kept for three minutes, as Eureka does.

Replicas (a shared store): every replica follows the registration records the others write, so a
client may register on one and renew on another (no peer replication, one registry). Each lease is
run by one replica (registry/runners.py): the one the client last registered or renewed with; only
it expires the lease, and when it goes away the smallest live replica adopts the lease with its full
duration from then.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Final

from meshpilot.sdkmeta import exported_meta, instance_fields, join_service, primary_port, release_service, tags_of
from meshpilot.eureka.codec import EurekaError, InstanceInfo, hashcode
from meshpilot.model import Check, CheckStatus, Instance, Service, ValidationError, field_errors
from meshpilot.registry import Change, Registry, RegistryError
from meshpilot.registry.runners import Runners

__all__ = ["EurekaFront", "OWNER"]

log = logging.getLogger("meshpilot.eureka")

OWNER: Final = "eureka"
DELTA_RETENTION_S = 180.0
_PREFIX = "eureka:"
_META = "meta"
_RECORDS = "eureka/instances/"  # meta table: a registration's record, by registry instance id
_DCI = {"@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo", "name": "MyOwn"}


@dataclass
class Lease:
    duration_s: float
    renewal_s: int
    registered_ms: int
    renewed_ms: int
    renewed_at: float  # monotonic
    up_ms: int


def _ms() -> int:
    return int(time.time() * 1000)


class EurekaFront:
    def __init__(self, registry: Registry, replica: str = "") -> None:
        self.reg = registry
        self.runners = Runners(registry, replica or "eureka", "eureka")
        self.leases: dict[str, Lease] = {}
        self.regs: dict[str, dict[str, Any]] = {}  # instance id -> {info fields, status, override, dirty}
        self.views: dict[str, dict[str, Any]] = {}  # instance id -> instance view (without lease)
        self.delta: deque[tuple[float, str, str, dict[str, Any]]] = deque()  # (time, action, id, view)
        self.version = 1
        self._load()
        registry.subscribe(self._on_change)

    def _load(self) -> None:
        now_ms, now = _ms(), time.monotonic()
        for key, doc in self.reg.store.items(_META):
            if not key.startswith("eureka/instances/"):
                continue
            iid = key[len("eureka/instances/") :]
            inst = self.reg.instance(iid)
            if inst is None or inst.source != OWNER:
                self.reg.store.write({}, ((_META, key),))
                continue
            self.regs[iid] = doc
            self.leases[iid] = Lease(doc.get("duration_s", 90), doc.get("renewal_s", 30), doc.get("registered_ms", now_ms), now_ms, now, now_ms)
        for inst in self.reg.instances():
            self.views[inst.id] = self._view(inst, self.reg.service(inst.service_key))

    # ---- events --------------------------------------------------------------------------------

    def _on_change(self, change: Change) -> None:
        if change.remote and change.kind == "document" and change.table == _META and change.key.startswith(_RECORDS):
            self._follow(change.key[len(_RECORDS):])
        elif change.remote and change.kind == "instance" and change.op == "put" and change.key not in self.regs:
            self._follow(change.key)
        if change.kind == "instance":
            if change.op == "delete":
                self.runners.release(change.key)
            self._refresh(change.key)
        elif change.kind == "service":
            for inst in self.reg.instances(change.service):
                self._refresh(inst.id)

    def _follow(self, iid: str) -> None:
        """Another replica wrote (or removed) this registration's record: renewals may come here now."""
        doc = self.reg.store.get(_META, _RECORDS + iid)
        inst = self.reg.instance(iid)
        if not isinstance(doc, dict) or inst is None or inst.source != OWNER:
            if doc is None:
                self.regs.pop(iid, None)
                self.leases.pop(iid, None)
            return  # a record before its instance: the instance's put calls this again
        self.regs[iid] = doc
        if iid not in self.leases:
            now_ms = _ms()
            self.leases[iid] = Lease(doc.get("duration_s", 90), doc.get("renewal_s", 30), doc.get("registered_ms", now_ms),
                                     now_ms, time.monotonic(), now_ms)
        self._refresh(iid)

    def adopt_orphans(self) -> int:
        """Leases nobody runs (their replica went away), taken over by the smallest live replica with
        their full duration from now; how many this replica took."""
        taken = self.runners.adopt([iid for iid in self.leases if self.reg.instance(iid) is not None])
        now, now_ms = time.monotonic(), _ms()
        for iid in taken:
            self.leases[iid].renewed_at, self.leases[iid].renewed_ms = now, now_ms
            log.info("event=eureka_lease_adopted instance=%s", iid)
        return len(taken)

    def _refresh(self, iid: str) -> None:
        inst = self.reg.instance(iid)
        old = self.views.get(iid)
        if inst is None:
            if old is not None:
                del self.views[iid]
                self._record("DELETED", iid, old)
            self.regs.pop(iid, None)
            self.leases.pop(iid, None)
            return
        view = self._view(inst, self.reg.service(inst.service_key))
        if view == old:
            return
        self.views[iid] = view
        self._record("ADDED" if old is None else "MODIFIED", iid, view)

    def _record(self, action: str, iid: str, view: dict[str, Any]) -> None:
        now = time.monotonic()
        self.version += 1
        self.delta.append((now, action, iid, view))
        while self.delta and now - self.delta[0][0] > DELTA_RETENTION_S:
            self.delta.popleft()

    # ---- views ---------------------------------------------------------------------------------

    def _view(self, inst: Instance, svc: Service | None) -> dict[str, Any]:
        _pname, port, _proto = primary_port(svc, inst)
        if svc is None:
            name = inst.service
        else:
            name = svc.name if svc.namespace == "default" else f"{svc.name}.{svc.namespace}"
        metadata = exported_meta(svc, inst)
        tags = tags_of(inst)
        if tags:
            metadata["tags"] = ",".join(tags)
        r = self.regs.get(inst.id)
        if r is not None:
            # as in Eureka, an override replaces the status clients see (and filter on)
            status, override = r.get("override") or r["status"], r.get("override") or "UNKNOWN"
            instance_id, host = r["instance_id"], r["host_name"]
            extra = r.get("urls", {})
            dirty = str(r.get("dirty_ms", 0))
            vip = r.get("vip") or name
            dci = r.get("dci") or _DCI
        else:
            status = "UP" if inst.routable else "OUT_OF_SERVICE" if inst.maintenance else "DOWN"
            override, instance_id, host = "UNKNOWN", inst.id, inst.address
            base = f"http://{inst.address}:{port}/"
            extra = {"homePageUrl": base, "statusPageUrl": base, "healthCheckUrl": base}
            dirty, vip, dci = "0", name, _DCI
        return {
            "instanceId": instance_id, "hostName": host, "app": name.upper(), "ipAddr": inst.address, "status": status,
            "overriddenStatus": override, "port": {"$": port, "@enabled": "true"}, "securePort": {"$": 443, "@enabled": "false"},
            "countryId": 1, "dataCenterInfo": dci, "metadata": metadata, **extra,
            "vipAddress": vip, "secureVipAddress": vip, "isCoordinatingDiscoveryServer": "false",
            "lastUpdatedTimestamp": dirty, "lastDirtyTimestamp": dirty,
        }

    def _with_lease(self, iid: str, view: dict[str, Any], action: str = "ADDED") -> dict[str, Any]:
        lease = self.leases.get(iid)
        if lease is None:
            info = {"renewalIntervalInSecs": 30, "durationInSecs": 90, "registrationTimestamp": 0, "lastRenewalTimestamp": 0,
                    "evictionTimestamp": 0, "serviceUpTimestamp": 0}
        else:
            info = {"renewalIntervalInSecs": lease.renewal_s, "durationInSecs": int(lease.duration_s),
                    "registrationTimestamp": lease.registered_ms, "lastRenewalTimestamp": lease.renewed_ms,
                    "evictionTimestamp": 0, "serviceUpTimestamp": lease.up_ms}
        return {**view, "leaseInfo": info, "actionType": action}

    def hashcode(self) -> str:
        return hashcode(v["status"] for v in self.views.values())

    def applications(self, *, app: str | None = None, vip: str | None = None) -> dict[str, Any]:
        groups: dict[str, list[dict[str, Any]]] = {}
        for iid in sorted(self.views):
            v = self.views[iid]
            if app is not None and v["app"] != app.upper():
                continue
            if vip is not None and v["vipAddress"].lower() != vip.lower():
                continue
            groups.setdefault(v["app"], []).append(self._with_lease(iid, v))
        return {
            "versions__delta": str(self.version), "apps__hashcode": self.hashcode(),
            "application": [{"name": a, "instance": groups[a]} for a in sorted(groups)],
        }

    def deltas(self) -> dict[str, Any]:
        now = time.monotonic()
        latest: dict[str, tuple[str, dict[str, Any]]] = {}
        for t, action, iid, view in self.delta:
            if now - t <= DELTA_RETENTION_S:
                latest[iid] = (action, view)
        groups: dict[str, list[dict[str, Any]]] = {}
        for iid, (action, view) in sorted(latest.items()):
            groups.setdefault(view["app"], []).append(self._with_lease(iid, view, action))
        return {
            "versions__delta": str(self.version), "apps__hashcode": self.hashcode(),
            "application": [{"name": a, "instance": groups[a]} for a in sorted(groups)],
        }

    def application(self, app: str) -> dict[str, Any]:
        apps: list[dict[str, Any]] = self.applications(app=app)["application"]
        if not apps:
            raise EurekaError(404, f"application {app.upper()} is not registered")
        return apps[0]

    def find(self, app: str | None, instance_id: str) -> str:
        """The registry id of an instance by its Eureka instance id (and app)."""
        if app is not None:
            iid = self.instance_key(app, instance_id)
            if iid in self.views:
                return iid
        for iid, v in self.views.items():
            if v["instanceId"] == instance_id and (app is None or v["app"] == app.upper()):
                return iid
        raise EurekaError(404, f"instance {instance_id} is not registered")

    def instance(self, app: str | None, instance_id: str) -> dict[str, Any]:
        iid = self.find(app, instance_id)
        return self._with_lease(iid, self.views[iid])

    # ---- writes ---------------------------------------------------------------------------------

    def instance_key(self, app: str, instance_id: str) -> str:
        return f"{_PREFIX}{app.lower()}:{instance_id}"

    def register(self, info: InstanceInfo) -> Instance:
        iid = self.instance_key(info.app, info.instance_id)
        old = self.reg.instance(iid)
        if old is not None and old.source != OWNER:
            raise EurekaError(409, f"instance {info.instance_id} is owned by the {old.source} front door")
        prev = self.regs.get(iid, {})
        override = prev.get("override") or ""
        labels, zone, metadata = instance_fields(info.metadata, [])
        effective = override or info.status
        check = Check(id="eureka", owner=OWNER, status=CheckStatus.passing if effective == "UP" else CheckStatus.critical, output=effective)
        try:
            inst = Instance(id=iid, service=info.app.lower(), node=info.host_name[:253], address=info.ip, ports={"http": info.port},
                            zone=zone, labels=labels, metadata=metadata, source=OWNER, checks=[check])
        except ValidationError as exc:
            raise EurekaError(400, "; ".join(f"{f['field']}: {f['reason']}" for f in field_errors(exc))) from None
        protocol = info.metadata.get("protocol", "http").lower()
        now_ms = _ms()
        dirty = _text_ms(info.raw.get("lastDirtyTimestamp")) or now_ms
        urls = {k: str(info.raw[k] if not isinstance(info.raw[k], dict) else info.raw[k].get("$", ""))
                for k in ("homePageUrl", "statusPageUrl", "healthCheckUrl") if k in info.raw and info.raw[k]}
        record = {
            "instance_id": info.instance_id, "host_name": info.host_name, "status": info.status, "override": override,
            "urls": urls, "dirty_ms": dirty, "vip": info.vip, "duration_s": info.duration_s, "renewal_s": info.renewal_s,
            "registered_ms": prev.get("registered_ms", now_ms), "dci": _dci(info.raw.get("dataCenterInfo")),
        }
        svc, port_name = join_service(self.reg, info.app.lower(), info.port, protocol, OWNER)
        inst = inst.model_copy(update={"ports": {port_name: info.port}})
        self.regs[iid] = record
        try:
            inst = self.reg.register(inst, replace=True)
        except RegistryError as exc:
            if old is None:
                self.regs.pop(iid, None)
            release_service(self.reg, svc.key, OWNER)
            raise EurekaError(400, str(exc)) from None
        self.leases[iid] = Lease(info.duration_s, info.renewal_s, record["registered_ms"], now_ms, time.monotonic(),
                                 now_ms if info.status == "UP" else 0)
        self.reg.store.write({(_META, f"eureka/instances/{iid}"): record})
        self.runners.claim(iid)
        self._refresh(iid)
        return inst

    def renew(self, app: str, instance_id: str) -> dict[str, Any]:
        iid = self.instance_key(app, instance_id)
        lease = self.leases.get(iid)
        if lease is None or iid not in self.regs:
            raise EurekaError(404, f"instance {instance_id} of {app.upper()} is not registered")
        lease.renewed_at = time.monotonic()
        lease.renewed_ms = _ms()
        self.runners.claim(iid)
        return self._with_lease(iid, self.views[iid])

    def cancel(self, app: str, instance_id: str) -> None:
        iid = self.instance_key(app, instance_id)
        inst = self.reg.instance(iid)
        if inst is None or inst.source != OWNER:
            raise EurekaError(404, f"instance {instance_id} of {app.upper()} is not registered")
        self.runners.release(iid)
        self.reg.deregister(iid, OWNER)
        self.regs.pop(iid, None)
        self.leases.pop(iid, None)
        self.reg.store.write({}, ((_META, f"eureka/instances/{iid}"),))
        release_service(self.reg, inst.service_key, OWNER)

    def set_status(self, app: str, instance_id: str, override: str | None, reported: str | None = None) -> None:
        """Set (or with None clear) the status override of an instance."""
        iid = self.instance_key(app, instance_id)
        record = self.regs.get(iid)
        if record is None or self.reg.instance(iid) is None:
            raise EurekaError(404, f"instance {instance_id} of {app.upper()} is not registered")
        record["override"] = override or ""
        if reported:
            record["status"] = reported
        record["dirty_ms"] = _ms()
        effective = record["override"] or record["status"]
        self.reg.store.write({(_META, f"eureka/instances/{iid}"): record})
        self.reg.set_check(iid, Check(id="eureka", owner=OWNER, status=CheckStatus.passing if effective == "UP" else CheckStatus.critical, output=effective))
        self._refresh(iid)

    def set_metadata(self, app: str, instance_id: str, values: dict[str, str]) -> None:
        iid = self.instance_key(app, instance_id)
        inst = self.reg.instance(iid)
        if inst is None or inst.source != OWNER:
            raise EurekaError(404, f"instance {instance_id} of {app.upper()} is not registered")
        labels, zone, metadata = dict(inst.labels), inst.zone, dict(inst.metadata)
        for k, v in values.items():
            lab, z, md = instance_fields({k: v})
            labels.update(lab)
            zone = z or zone
            metadata.update(md)
        try:
            new = Instance.model_validate({**inst.model_dump(), "labels": labels, "zone": zone, "metadata": metadata})
        except ValidationError as exc:
            raise EurekaError(400, "; ".join(f"{f['field']}: {f['reason']}" for f in field_errors(exc))) from None
        self.reg.register(new, replace=True)

    def expire(self) -> list[str]:
        """Cancel every instance whose lease ran out (of those this replica runs); returns their registry ids."""
        now = time.monotonic()
        gone = [iid for iid, lease in self.leases.items() if now - lease.renewed_at > lease.duration_s and self.runners.runs(iid)]
        for iid in gone:
            inst = self.reg.instance(iid)
            record = self.regs.get(iid)
            if inst is None or record is None:
                self.leases.pop(iid, None)
                continue
            log.info("event=lease_expired instance=%s", iid)
            try:
                self.cancel(inst.service, record["instance_id"])
            except EurekaError:
                self.leases.pop(iid, None)
        return gone


def _text_ms(value: Any) -> int:
    if isinstance(value, dict):
        value = value.get("$")
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return 0


def _dci(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        name = value.get("name")
        if isinstance(name, dict):
            name = name.get("$")
        return {"@class": str(value.get("@class", _DCI["@class"])), "name": str(name or "MyOwn")}
    return dict(_DCI)
