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

Timers ask ``runs`` on every tick, so the table is held in memory: taken whole from the store's view
at start and at each adoption round (that catches what no event tells, such as this replica's
entries put back by the store under a new lease), and kept current in between by the registry's
change events and this replica's own claims.
"""

from __future__ import annotations

from collections.abc import Iterable

from meshpilot.registry import Change, Registry

__all__ = ["Runners"]

RUNNERS = "runners"  # store table (ephemeral): "<kind>/<id>" -> {"replica": id}
REPLICAS = "replicas"  # store table (ephemeral): the live control-plane replicas


class Runners:
    """The runners of one kind of timer (``kind`` prefixes the keys: "consul", "eureka", ...)."""

    def __init__(self, registry: Registry, replica: str, kind: str) -> None:
        self.store = registry.store
        self.replica = replica
        self.kind = kind
        self._prefix = f"{kind}/"
        self._runner: dict[str, str] = {}  # key -> the replica that runs it
        self.refresh()
        registry.subscribe(self._follow)

    def refresh(self) -> None:
        """Take the table (this kind's part) whole from the store's view."""
        if not self.store.shared:
            return
        n = len(self._prefix)
        self._runner = {k[n:]: str(doc.get("replica", "")) for k, doc in self.store.items(RUNNERS)
                        if k.startswith(self._prefix) and isinstance(doc, dict)}

    def _follow(self, change: Change) -> None:
        if change.kind != "document" or change.table != RUNNERS or not change.key.startswith(self._prefix):
            return
        doc = self.store.get(RUNNERS, change.key)
        key = change.key[len(self._prefix):]
        if isinstance(doc, dict):
            self._runner[key] = str(doc.get("replica", ""))
        else:
            self._runner.pop(key, None)

    def runs(self, key: str) -> bool:
        """Whether this replica runs ``key``'s timer (always, on a local store)."""
        return not self.store.shared or self._runner.get(key) == self.replica

    def claim(self, key: str) -> None:
        """Run ``key`` here from now on: its client talks to this replica."""
        if self.store.shared and not self.runs(key):
            self._runner[key] = self.replica
            self.store.write({(RUNNERS, self._prefix + key): {"replica": self.replica}})

    def release(self, key: str) -> None:
        """``key`` is gone (deregistered, destroyed): nobody runs it."""
        if self.store.shared and self.runs(key):
            del self._runner[key]
            self.store.write({}, ((RUNNERS, self._prefix + key),))

    def adopt(self, keys: Iterable[str]) -> list[str]:
        """Of ``keys``, those nobody runs, claimed here if this is the live replica with the smallest
        id (else none): the caller restarts their timers in full. Call it every second or so: it
        takes the table whole from the store first."""
        if not self.store.shared:
            return []
        self.refresh()
        live = sorted(k for k, _doc in self.store.items(REPLICAS))
        if not live or live[0] != self.replica:
            return []
        taken = [k for k in keys if k not in self._runner]
        for k in taken:
            self.claim(k)
        return taken
