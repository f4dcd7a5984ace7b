"""Eureka on replicas of a shared store: a client registers on one replica and renews on another,
only the replica it renews with expires its lease, and when that replica goes away the smallest
live one adopts the lease with its full duration."""

from __future__ import annotations

from meshpilot.eureka.codec import parse_instance
from meshpilot.eureka.front import EurekaFront
from meshpilot.registry import Registry
from meshpilot.registry.store import MemoryStore
from tests.unit.shared_store import SharedStore, hand
from tests.unit.test_eureka import _doc

IID = "eureka:orders:h1:orders:8080"


def _pair() -> tuple[EurekaFront, SharedStore, EurekaFront, SharedStore]:
    clock = [100]
    sa, sb = SharedStore(clock), SharedStore(clock)
    for s in (sa, sb):  # both replicas announced, as their control planes do at start
        MemoryStore.write(s, {("replicas", "replica-a"): {}, ("replicas", "replica-b"): {}})
    return EurekaFront(Registry(sa), replica="replica-a"), sa, EurekaFront(Registry(sb), replica="replica-b"), sb


def _expire_later(front: EurekaFront, seconds: float) -> list[str]:
    for lease in front.leases.values():
        lease.renewed_at -= seconds  # as if that much time had passed since each renewal
    return front.expire()


def test_a_lease_registered_on_one_replica_is_renewed_on_another_and_expired_only_by_its_runner() -> None:
    a, sa, b, sb = _pair()
    a.register(parse_instance(_doc(), "ORDERS"))  # durationInSecs 2
    hand(sa, sb, b.reg)
    assert b.reg.instance(IID) is not None
    assert b.renew("ORDERS", "h1:orders:8080")["status"] == "UP", "expected B to take a renewal of A's registration"
    hand(sb, sa, a.reg)
    assert a.runners.runs(IID) is False and b.runners.runs(IID) is True, "expected the lease to follow the renewals to B"
    assert _expire_later(a, 10) == [] and a.reg.instance(IID) is not None, "expected A not to expire a lease B runs"
    assert _expire_later(b, 10) == [IID], "expected B, which runs the lease, to expire it when not renewed"


def test_a_lease_whose_runner_went_away_is_adopted_with_its_full_duration() -> None:
    a, sa, b, sb = _pair()
    b.register(parse_instance(_doc(), "ORDERS"))
    hand(sb, sa, a.reg)
    assert not a.runners.runs(IID)
    MemoryStore.write(sa, {}, (("runners", f"eureka/{IID}"), ("replicas", "replica-b")))  # B's lease ran out
    for lease in a.leases.values():
        lease.renewed_at -= 10  # renewals B had and A never saw
    assert a.adopt_orphans() == 1 and a.runners.runs(IID)
    assert a.expire() == [], "expected a full lease from the adoption"
    assert _expire_later(a, 3) == [IID], "expected the adopted lease to run out without renewals"


def test_a_single_control_plane_runs_every_lease() -> None:
    front = EurekaFront(Registry(MemoryStore()))
    front.register(parse_instance(_doc(), "ORDERS"))
    assert front.runners.runs(IID) and front.adopt_orphans() == 0
    assert _expire_later(front, 10) == [IID]
