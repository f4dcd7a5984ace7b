"""Another replica's writes, handed over by a shared store, rebuild this replica's working set and
emit the changes a local write would."""

from __future__ import annotations

from typing import Any

from meshpilot.model import Instance, Service
from meshpilot.registry import Change, Registry
from meshpilot.registry.store import MemoryStore, RemoteChange


class _Recorder(MemoryStore):
    """A store that keeps the rows written to it, as the shared store's watch would hand them on."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[RemoteChange] = []

    def write(self, puts: Any, deletes: tuple[tuple[str, str], ...] = ()) -> None:
        super().write(puts, deletes)
        self.rows += [(t, k, v) for (t, k), v in puts.items()] + [(t, k, None) for t, k in deletes]

    def taken(self) -> list[RemoteChange]:
        rows, self.rows = self.rows, []
        return rows


def _svc(name: str = "web") -> Service:
    return Service(name=name, ports=[{"name": "http", "port": 80}])


def _inst(i: str, service: str = "web") -> Instance:
    return Instance(id=i, service=service, address="127.0.0.1", ports={"http": 8080})


def _pair() -> tuple[Registry, _Recorder, Registry, list[Change]]:
    a_store = _Recorder()
    a = Registry(a_store)
    b = Registry(MemoryStore())
    seen: list[Change] = []
    b.subscribe(seen.append)
    return a, a_store, b, seen


def test_a_replica_rebuilds_services_and_instances_from_another_replicas_writes() -> None:
    a, rows, b, seen = _pair()
    svc = a.put_service(_svc())
    a.register(_inst("w1"))
    a.register(_inst("w2"))
    b.apply_remote(rows.taken(), 3)
    assert b.service("web.default") == svc, f"expected the service with A's virtual IP {svc.vip}, got {b.service('web.default')}"
    assert [i.id for i in b.instances("web.default")] == ["w1", "w2"]
    assert [(c.kind, c.key, c.op, c.remote) for c in seen] == [
        ("service", "web.default", "put", True), ("instance", "w1", "put", True), ("instance", "w2", "put", True)]
    # B's own next allocation does not take A's address
    other = b.put_service(_svc("api"))
    assert other.vip != svc.vip


def test_what_the_working_set_already_holds_emits_nothing() -> None:
    a, rows, b, seen = _pair()
    a.put_service(_svc())
    a.register(_inst("w1"))
    changes = rows.taken()
    b.apply_remote(changes)
    n = len(seen)
    b.apply_remote(changes)  # the same rows again (a replica's own writes coming back, a resumed watch)
    assert len(seen) == n, f"expected no change events for rows already applied, got {seen[n:]}"


def test_a_deleted_service_takes_its_instances_along_in_either_order() -> None:
    a, rows, b, seen = _pair()
    a.put_service(_svc())
    a.register(_inst("w1"))
    b.apply_remote(rows.taken())
    seen.clear()
    a.delete_service("web.default")
    b.apply_remote(rows.taken())
    assert b.service("web.default") is None and b.instance("w1") is None and b.instances("web.default") == []
    assert sorted((c.kind, c.key, c.op) for c in seen) == [("instance", "w1", "delete"), ("service", "web.default", "delete")]


def test_deregistration_and_documents_of_other_tables_reach_their_listeners() -> None:
    a, rows, b, seen = _pair()
    a.put_service(_svc())
    a.register(_inst("w1"))
    b.apply_remote(rows.taken())
    seen.clear()
    a.deregister("w1")
    a.put_document("policies", "route/web.default", {"x": 1})
    a.store.write({("liveness", "node-1"): {"replica": "r1"}})
    rows.rows.append(("liveness", "node-1", None))
    b.apply_remote(rows.taken())
    assert b.instance("w1") is None
    assert [(c.kind, c.key, c.op, c.table) for c in seen] == [
        ("instance", "w1", "delete", ""), ("policy", "route/web.default", "put", ""),
        ("document", "node-1", "put", "liveness"), ("document", "node-1", "delete", "liveness")]


def test_a_stored_document_that_does_not_validate_is_skipped_and_the_rest_applies() -> None:
    a, rows, b, seen = _pair()
    a.put_service(_svc())
    good = rows.taken()
    b.apply_remote([("services", "bad.default", {"name": 5}), *good, ("instances", "x", {"id": "x"})])
    assert b.service("bad.default") is None and b.instance("x") is None
    assert b.service("web.default") is not None, "expected the valid service applied after the invalid one"


def test_two_services_given_one_address_on_two_replicas_end_with_two_addresses() -> None:
    a, rows_a, b, _seen = _pair()
    # the same address for different services: what two replicas allocating at once could give
    mine = b.put_service(_svc("zeta"))
    theirs = _svc("alpha").model_copy(update={"vip": mine.vip}).model_dump(mode="json")
    b.apply_remote([("services", "alpha.default", theirs)])
    alpha, zeta = b.service("alpha.default"), b.service("zeta.default")
    assert alpha is not None and zeta is not None
    assert alpha.vip == mine.vip and zeta.vip != mine.vip, f"expected the greater key (zeta) moved, got alpha={alpha.vip} zeta={zeta.vip}"
    assert b.store.get("services", "zeta.default")["vip"] == zeta.vip, "expected the move written to the store"


def test_an_instance_registered_on_one_replica_while_another_deleted_its_service_stays_where_the_store_has_it() -> None:
    a, rows_a, b, seen = _pair()
    svc = a.put_service(_svc())
    a.register(_inst("w1"))
    b.apply_remote(rows_a.taken())
    # B registers w2 while A deletes the service (and the instances it knows: w1)
    b.register(_inst("w2"))
    a.delete_service("web.default")
    seen.clear()
    b.apply_remote(rows_a.taken())
    assert b.instance("w1") is None, "expected the instance deleted with the service gone"
    assert b.instance("w2") is not None and b.store.get("instances", "w2") is not None, \
        "expected B's own registration, still in its store, kept in memory too"
    assert [(c.kind, c.key) for c in seen] == [("instance", "w1"), ("service", "web.default")], f"got {seen}"
    assert svc.vip not in b._vips, "expected the deleted service's address free"
