"""The catalog's versions of each service's API, kept in the registry's store, and the service's
``apis`` they set.

A service's catalog is an index document (``meta`` table, key ``catalog/<service key>``: every
version's number, sha256, time, source and counts) and one document per version
(``catalog/<service key>/v/<number>``: the normalised operations). A new version is written only
when the operations' sha256 differs from the current one, with its index in one store write that is
conditional on the index being unchanged (``Store.commit_if``), so two control-plane replicas on etcd
never hand out one number twice; on a lost race the writer reads the winner's version and decides
again. The current version's operations are the service's ``apis`` (DESIGN.md: the model's API list,
which the policy selectors resolve): recording a version sets them, and ``reconcile`` puts them back
when a service write replaced them (a ``PUT /v1/services/...`` without ``apis``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, get_args

from meshpilot.catalog.openapi import Operation, Spec
from meshpilot.model import ApiOperation, Service
from meshpilot.registry import Registry
from meshpilot.registry.store import Guard

__all__ = ["MAX_VERSIONS", "Catalog", "Recorded", "service_apis"]

log = logging.getLogger("meshpilot.catalog")

_TABLE = "meta"
MAX_VERSIONS = 100  # versions kept per service; older ones are deleted as new ones come
_RETRIES = 8
_API_METHODS = frozenset(get_args(ApiOperation.model_fields["method"].annotation))


def _index_key(service_key: str) -> str:
    return f"catalog/{service_key}"


def _version_key(service_key: str, number: int) -> str:
    return f"catalog/{service_key}/v/{number:08d}"


@dataclass(frozen=True, slots=True)
class Recorded:
    version: dict[str, Any]  # the version's summary (index entry)
    created: bool  # False: the operations were those of the current version


def service_apis(operations: list[Operation] | tuple[Operation, ...]) -> list[ApiOperation]:
    """The service's ``apis`` for catalog operations: method, path template and operationId as name
    (TRACE, which the model's API list does not take, is left out)."""
    return [ApiOperation(method=o.method, path=o.path, name=o.operation_id) for o in operations if o.method in _API_METHODS]  # type: ignore[arg-type]


class Catalog:
    def __init__(self, registry: Registry, clock: Any = time.time) -> None:
        self.registry = registry
        self.clock = clock

    # ---- reading ------------------------------------------------------------------------------

    def index(self, service_key: str) -> dict[str, Any] | None:
        doc = self.registry.store.get(_TABLE, _index_key(service_key))
        return doc if isinstance(doc, dict) else None

    def services(self) -> list[dict[str, Any]]:
        """Every service with a catalog and its current version's summary."""
        out = []
        for key, doc in self.registry.store.items(_TABLE):
            if key.startswith("catalog/") and key.count("/") == 1 and isinstance(doc, dict) and doc.get("versions"):
                out.append({"service": doc["service"], "current": doc["versions"][-1]})
        return out

    def versions(self, service_key: str) -> list[dict[str, Any]]:
        idx = self.index(service_key)
        return list(idx["versions"]) if idx else []

    def version(self, service_key: str, number: int | None = None) -> dict[str, Any] | None:
        """A version with its operations (None: the current one), or None."""
        if number is None:
            versions = self.versions(service_key)
            if not versions:
                return None
            number = int(versions[-1]["number"])
        doc = self.registry.store.get(_TABLE, _version_key(service_key, number))
        return doc if isinstance(doc, dict) else None

    @staticmethod
    def operations(version: dict[str, Any]) -> list[Operation]:
        return [Operation.from_json(o) for o in version["operations"]]

    # ---- writing ------------------------------------------------------------------------------

    async def record(self, service: Service, spec: Spec, source: dict[str, Any]) -> Recorded:
        """A new version for ``spec`` unless its operations are the current version's; the service's
        ``apis`` set to them either way. Durable when it returns."""
        store = self.registry.store
        key = service.key
        for _ in range(_RETRIES):
            since = store.revision  # read before deciding, nothing awaited until the commit
            idx = self.index(key)
            versions = list(idx["versions"]) if idx else []
            if versions and versions[-1]["sha256"] == spec.sha256:
                await self._set_apis(key, spec.operations)
                await store.sync()
                return Recorded(versions[-1], False)
            number = int(versions[-1]["number"]) + 1 if versions else 1
            summary = {
                "number": number, "sha256": spec.sha256, "created": _rfc3339(self.clock()), "source": source,
                "openapi": spec.openapi, "title": spec.title, "api_version": spec.api_version, "operations": len(spec.operations),
            }
            full = {**summary, "service": key, "base_path": spec.base_path, "operations": [o.as_json() for o in spec.operations]}
            kept = [*versions, summary]
            dropped = kept[:-MAX_VERSIONS] if len(kept) > MAX_VERSIONS else []
            kept = kept[-MAX_VERSIONS:]
            puts = {(_TABLE, _index_key(key)): {"service": key, "versions": kept}, (_TABLE, _version_key(key, number)): full}
            deletes = tuple((_TABLE, _version_key(key, int(v["number"]))) for v in dropped)
            guards = [Guard(_TABLE, _index_key(key), exists=idx is not None)]
            if await store.commit_if(since, guards, puts, deletes):
                log.info("event=catalog_version service=%s number=%d sha256=%s operations=%d source=%s",
                         key, number, spec.sha256[:12], len(spec.operations), source.get("kind"))
                await self._set_apis(key, spec.operations)
                await store.sync()
                return Recorded(summary, True)
        raise RuntimeError(f"catalog of {key}: the index kept changing under {_RETRIES} attempts to write a version")

    async def reconcile(self, service_key: str) -> bool:
        """Put the current version's operations back as the service's ``apis`` if a write replaced
        them; whether it wrote."""
        version = self.version(service_key)
        if version is None:
            return False
        return await self._set_apis(service_key, self.operations(version))

    async def _set_apis(self, service_key: str, operations: list[Operation] | tuple[Operation, ...]) -> bool:
        """Set the service's ``apis``. On a shared store the write is conditional on the service being
        as this replica read it: another replica's newer change (ports, labels, from the API or a
        Consul/Eureka front door) is never overwritten with this replica's older copy; on a lost race
        the view has caught up and the apis are set again on what it holds now."""
        store = self.registry.store
        apis = service_apis(operations)
        for _ in range(_RETRIES):
            since = store.revision  # read before deciding, nothing awaited until the commit
            svc = self.registry.service(service_key)
            if svc is None:
                return False  # deleted meanwhile: its catalog stays and comes back with it
            if svc.apis == apis:
                return False
            new = svc.model_copy(update={"apis": apis})
            if not store.shared:
                self.registry.put_service(new)  # one writer: what it read is what is stored
            else:
                guards = [Guard("services", service_key, exists=True)]
                if not await store.commit_if(since, guards, {("services", service_key): new.model_dump(mode="json")}):
                    continue
                # the registry takes the service as the store's view holds it now (this write, or one
                # that came after it), as it takes any replica's write
                self.registry.apply_remote([("services", service_key, store.get("services", service_key))], store.revision)
            log.info("event=catalog_apis_set service=%s operations=%d", service_key, len(apis))
            await self._retranslate(new)
            return True
        log.warning("event=catalog_apis_not_set service=%s reason='the service kept changing'", service_key)
        return False

    async def _retranslate(self, svc: Service) -> None:
        """Write again, unchanged, the policies of the service that name operations: a routing
        overlay is translated when its policy changes, so its operations resolve against the new
        apis in the same push (the filter rules of limits and breakers follow service changes anyway).
        The write is conditional on each policy being as read: an operator's newer write, from
        another replica, is never overwritten with what this one read before it (and itself
        translates the policy again)."""
        store = self.registry.store
        for _ in range(_RETRIES):
            since = store.revision
            puts = {key: doc for key, doc in self.registry.documents("policies")
                    if isinstance(doc, dict) and doc.get("namespace") == svc.namespace and doc.get("service") == svc.name and _names_operation(doc)}
            if not puts:
                return
            guards = [Guard("policies", key, exists=True) for key in sorted(puts)]
            if await self.registry.commit_documents_if(since, "policies", guards, puts):
                return
        log.warning("event=catalog_policies_not_rewritten service=%s reason='they kept changing'", svc.key)


def _names_operation(value: Any) -> bool:
    if isinstance(value, dict):
        return isinstance(value.get("operation"), str) or any(_names_operation(v) for v in value.values())
    if isinstance(value, list):
        return any(_names_operation(v) for v in value)
    return False


def _rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
