"""Which control-plane replica runs a timer: a Consul check's probes and TTL, a Consul session's TTL,
a Eureka lease.

On a local store there is one control plane and it runs everything. On a shared store every replica
knows every registration, but each timer must have one runner, or a replica that never hears the
client's heartbeats would expire what another keeps alive. The runner is named in the store's
ephemeral ``runners`` table (bound to the runner's lease): the replica the client last talked to
claims it. When the runner goes away (killed, frozen, cut off) its entries expire with its lease,
and the live replica with the smallest id (the ``replicas`` table) adopts what nobody runs; the
caller then restarts the timer in full, since the heartbeats it missed went to the dead replica.
Several replicas adopting at once is harmless: the store keeps the last claim and the others see
they do not run it.
"""

from __future__ import annotations

from collections.abc import Iterable

from meshpilot.registry.store import Store

__all__ = ["Runners"]

RUNNERS = "runners"  # store table (ephemeral): "<kind>/<id>" -> {"replica": id}
REPLICAS = "replicas"  # store table (ephemeral): the live control-plane replicas


class Runners:
    """The runners of one kind of timer (``kind`` prefixes the keys: "consul", "eureka", ...)."""

    def __init__(self, store: Store, replica: str, kind: str) -> None:
        self.store = store
        self.replica = replica
        self.kind = kind

    def _key(self, key: str) -> str:
        return f"{self.kind}/{key}"

    def runs(self, key: str) -> bool:
        """Whether this replica runs ``key``'s timer (always, on a local store)."""
        if not self.store.shared:
            return True
        doc = self.store.get(RUNNERS, self._key(key))
        return isinstance(doc, dict) and doc.get("replica") == self.replica

    def claim(self, key: str) -> None:
        """Run ``key`` here from now on: its client talks to this replica."""
        if self.store.shared and not self.runs(key):
            self.store.write({(RUNNERS, self._key(key)): {"replica": self.replica}})

    def release(self, key: str) -> None:
        """``key`` is gone (deregistered, destroyed): nobody runs it."""
        if self.store.shared and self.runs(key):
            self.store.write({}, ((RUNNERS, self._key(key)),))

    def adopt(self, keys: Iterable[str]) -> list[str]:
        """Of ``keys``, those nobody runs, claimed here if this is the live replica with the smallest
        id (else none): the caller restarts their timers in full."""
        if not self.store.shared:
            return []
        live = sorted(k for k, _doc in self.store.items(REPLICAS))
        if not live or live[0] != self.replica:
            return []
        taken = [k for k in keys if self.store.get(RUNNERS, self._key(k)) is None]
        for k in taken:
            self.claim(k)
        return taken
