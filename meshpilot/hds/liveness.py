"""Which sidecar nodes have an open HDS stream, here or on another control-plane replica, and what to
do about those that have none. Pure."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Liveness"]


@dataclass(slots=True)
class Liveness:
    """Which nodes have an open HDS stream, and since when the others have had none.

    A node whose HDS stream closed goes critical after ``critical_after_s``, or after
    ``dead_after_s`` when its Envoy's ADS stream (``ads``) has been closed as long too: both streams
    closing is what a dead sidecar looks like (kill -9, a crashed VM), while a reconnecting Envoy
    opens them again within its back-off. Instances that were merely absent when this process
    started (no close seen) get only the long grace: after a control-plane restart every sidecar
    reconnects at its own pace.

    With replicas (``shared``), a node is held while it has a stream here (``open``) or another
    replica holds it (``elsewhere``: that replica's liveness document names it); the clocks run only
    for nodes nobody holds, from the moment the last holder went away. A holder that went away
    elsewhere (its stream closed there, or the replica died) gives the long grace: this replica did
    not see the node's streams close. The short grace needs both closes seen here, since an ADS
    stream this replica never had may be open on another one."""

    critical_after_s: float
    remove_after_s: float
    dead_after_s: float = 0.0  # 0: no faster path
    shared: bool = False
    open: dict[str, int] = field(default_factory=dict)
    elsewhere: set[str] = field(default_factory=set)
    lost_at: dict[str, float] = field(default_factory=dict)
    marked: set[str] = field(default_factory=set)
    closed_here: set[str] = field(default_factory=set)
    ads: set[str] = field(default_factory=set)
    ads_lost_at: dict[str, float] = field(default_factory=dict)

    def opened(self, instance_id: str) -> None:
        self.open[instance_id] = self.open.get(instance_id, 0) + 1
        self.elsewhere.discard(instance_id)  # its liveness document names this replica from now on
        self.forget(instance_id)

    def closed(self, instance_id: str, now: float) -> None:
        n = self.open.get(instance_id, 0) - 1
        if n > 0:
            self.open[instance_id] = n
            return
        self.open.pop(instance_id, None)
        if instance_id in self.elsewhere:
            return  # the node's Envoy is already on another replica
        self.lost_at[instance_id] = now
        self.closed_here.add(instance_id)

    def held_elsewhere(self, instance_id: str) -> None:
        """Another replica holds the node's HDS stream now."""
        self.elsewhere.add(instance_id)
        self.forget(instance_id)

    def released_elsewhere(self, instance_id: str, now: float) -> None:
        """The other replica's hold on the node ended (its stream closed there, or the replica is gone)."""
        self.elsewhere.discard(instance_id)
        if instance_id not in self.open and instance_id not in self.lost_at:
            self.lost_at[instance_id] = now

    def restart_clocks(self, now: float) -> None:
        """This replica's view of the others was stale for a while (cut off from the store) and it
        refused the sidecars that came to it: the nodes nobody holds get the long grace from ``now``,
        as after a start."""
        for iid in self.lost_at:
            self.lost_at[iid] = now
        self.closed_here.clear()

    def held(self, instance_id: str) -> bool:
        return instance_id in self.open or instance_id in self.elsewhere

    def ads_changed(self, node_id: str, connected: bool, now: float) -> None:
        """The node's first ADS stream opened (True) or its last one closed (False)."""
        if connected:
            self.ads.add(node_id)
            self.ads_lost_at.pop(node_id, None)
        else:
            self.ads.discard(node_id)
            self.ads_lost_at[node_id] = now

    def forget(self, instance_id: str) -> None:
        self.lost_at.pop(instance_id, None)
        self.marked.discard(instance_id)
        self.closed_here.discard(instance_id)

    def _dead(self, iid: str, at: float, now: float) -> bool:
        if not self.dead_after_s or iid not in self.closed_here or iid in self.ads:
            return False
        if self.shared and iid not in self.ads_lost_at:
            return False
        return now - max(at, self.ads_lost_at.get(iid, at)) >= self.dead_after_s

    def due(self, now: float) -> tuple[list[str], list[str]]:
        """(instances to mark critical now, instances to remove now)."""
        critical, remove = [], []
        for iid, at in sorted(self.lost_at.items()):
            age = now - at
            if age >= self.remove_after_s:
                remove.append(iid)
            elif iid not in self.marked and (age >= self.critical_after_s or self._dead(iid, at, now)):
                critical.append(iid)
        for iid in remove:
            self.forget(iid)
        self.marked.update(critical)
        for nid, at in list(self.ads_lost_at.items()):
            if now - at >= self.remove_after_s and nid not in self.lost_at:
                del self.ads_lost_at[nid]  # nodes that never return: keep the map bounded
        return critical, remove
