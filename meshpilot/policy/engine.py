"""The policy engine: the validated policies in force and what they translate into.

It reads policies from the registry's ``policies`` documents (the one durable copy, written by the
management API), keeps the valid ones in memory by key, and re-runs a kind's translate hook when a
policy of that kind changes. It gives the registry's translation its routing overlays
(``affected``/``routing``: applied when clusters, endpoints and routes are built) and is a
producer for the publisher of the other resources kinds produce (shared scope, one key per kind).
A stored document that no longer validates is logged and ignored, never half-applied.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from meshpilot.policy.kinds import PolicyBase, PolicyInvalid, TranslateContext, Translation, get_kind, kinds, parse_key
from meshpilot.publish.publisher import Bundle, Changes, Output, Producer
from meshpilot.registry import Registry
from meshpilot.translate.routes import ServiceRouting

__all__ = ["PolicyEngine"]

log = logging.getLogger("meshpilot.policy")


class PolicyEngine(Producer):
    def __init__(self, registry: Registry, domain: str) -> None:
        self.registry = registry
        self.ctx = TranslateContext(registry, domain)
        self.policies: dict[str, PolicyBase] = {}
        self._outputs: dict[str, Translation] = {}  # kind name -> its translation
        self._routing: dict[str, ServiceRouting] = {}
        self._unpublished: set[str] = set()  # kinds translated since they were last produced
        for key, doc in registry.documents("policies"):
            self._load(key, doc)
        self._translate({k.name for k in kinds()})

    # ---- reading ------------------------------------------------------------------------------

    def routing(self, service_key: str) -> ServiceRouting | None:
        return self._routing.get(service_key)

    def of_kind(self, kind: str) -> list[PolicyBase]:
        return [p for k, p in sorted(self.policies.items()) if k.startswith(kind + "/")]

    # ---- changes ------------------------------------------------------------------------------

    def _load(self, key: str, doc: object) -> bool:
        """Bring one key up to date from its stored document; True when it changed."""
        parsed = parse_key(key)
        if parsed is None:
            return False
        kind, _ns, _name = parsed
        old = self.policies.get(key)
        new: PolicyBase | None = None
        if doc is not None:
            try:
                new = kind.validate(doc)
            except PolicyInvalid as exc:
                log.error("event=bad_stored_policy key=%s reason=%r", key, str(exc))
            else:
                if new.key != key:
                    log.error("event=bad_stored_policy key=%s reason='stored under the wrong key (%s)'", key, new.key)
                    new = None
        if new is None:
            self.policies.pop(key, None)
        else:
            self.policies[key] = new
        return old != new

    def affected(self, changed: set[str]) -> set[str]:
        """Reload the changed policy keys; return the services whose routing overlay changed."""
        kinds_changed = set()
        for key in changed:
            parsed = parse_key(key)
            if parsed is not None:
                self._load(key, self.registry.store.get("policies", key))
                # one written again unchanged is translated again too: its translation may read
                # services (a route on a catalog operation resolves against the service's apis)
                kinds_changed.add(parsed[0].name)
        if not kinds_changed:
            return set()
        old = self._routing
        self._translate(kinds_changed)
        return {k for k in old.keys() | self._routing.keys() if old.get(k) != self._routing.get(k)}

    def _translate(self, kind_names: Iterable[str]) -> None:
        for name in kind_names:
            kind = get_kind(name)
            if kind is None:
                continue
            try:
                self._outputs[name] = kind.translate(self.of_kind(name), self.ctx)
            except Exception:  # a broken kind must not take the others down; keep its last output
                log.exception("event=policy_translate_failed kind=%s", name)
            self._unpublished.add(name)
        routing: dict[str, ServiceRouting] = {}
        for name in sorted(self._outputs):
            for svc, r in self._outputs[name].routing.items():
                routing.setdefault(svc, r)
        self._routing = routing

    def produce(self, changes: Changes, now: float) -> Output:
        """Every kind's shared resources, under the kind's name (when its translation ran).

        Service changes re-run every kind (a kind may depend on services, e.g. on their instances);
        policy changes were already translated by ``affected``.
        """
        if changes.services or changes.rerouted:
            self._translate([k.name for k in kinds()])
        if changes.everything:
            self._unpublished |= set(self._outputs)
        done, self._unpublished = self._unpublished, set()
        return {("", name): Bundle(self._outputs[name].resources) if name in self._outputs else None for name in sorted(done)}
