"""The mesh CA on replicas of a shared store: a root rotated on one replica is trusted and signs on
the others once the store hands them the change, and two replicas that each generated a root at
their first start converge on the same signing root."""

from __future__ import annotations

import asyncio
from typing import Any

from cryptography import x509

from meshpilot.identity.ca import ROOTS, MeshCa
from meshpilot.registry.store import MemoryStore
from meshpilot.settings import Settings


def _settings() -> Settings:
    return Settings(identity=True, store="memory:")


def _serials(ca: MeshCa) -> list[str]:
    return sorted(r["serial"] for r in ca.roots())


def _copy_roots(src: MemoryStore, dst: MemoryStore) -> None:
    """What the shared store's watch does for the other replica's view."""
    have = dict(dst.items(ROOTS))
    rows = dict(src.items(ROOTS))
    dst.write({(ROOTS, k): v for k, v in rows.items()}, tuple((ROOTS, k) for k in have if k not in rows))


def test_a_rotation_on_one_replica_is_followed_by_the_other() -> None:
    async def main() -> None:
        sa, sb = MemoryStore(), MemoryStore()
        a = MeshCa(sa, _settings())
        _copy_roots(sa, sb)
        b = MeshCa(sb, _settings())
        assert b.signing_serial == a.signing_serial, "expected B to sign with the root A generated"
        heard: list[bytes] = []
        b.watch(heard.append)
        new = (await a.add_root())["serial"]
        await a.activate_root(new)
        _copy_roots(sa, sb)
        b.follow_store()
        assert b.signing_serial == new, f"expected B to sign with the activated root {new}, got {b.signing_serial}"
        assert _serials(b) == _serials(a) and len(x509.load_pem_x509_certificates(b.bundle_pem())) == 2
        assert heard == [b.bundle_pem()], f"expected B's bundle watchers told once, got {len(heard)} calls"
        b.follow_store()
        assert len(heard) == 1, "expected no call when nothing changed"

    asyncio.run(main())


def test_two_replicas_that_each_generated_a_root_converge() -> None:
    sa, sb = MemoryStore(), MemoryStore()
    a, b = MeshCa(sa, _settings()), MeshCa(sb, _settings())
    assert a.signing_serial != b.signing_serial
    merged: dict[tuple[str, str], Any] = {(ROOTS, k): v for s in (sa, sb) for k, v in s.items(ROOTS)}
    sa.write(merged)
    sb.write(merged)
    a.follow_store()
    b.follow_store()
    assert a.signing_serial == b.signing_serial, f"expected one signing root, got {a.signing_serial} and {b.signing_serial}"
    assert _serials(a) == _serials(b) and len(_serials(a)) == 2, "expected both generated roots trusted on both"


def test_an_enrolment_removed_on_another_replica_cuts_the_node_off_here() -> None:
    from types import SimpleNamespace

    from meshpilot.identity.plugin import ENROLMENT_REMOVED, install
    from meshpilot.registry import Registry

    cut: list[tuple[str, str]] = []
    registry = Registry(MemoryStore())
    core: Any = SimpleNamespace(settings=_settings(), registry=registry, disconnect=lambda n, why: cut.append((n, why)))
    install(core)
    registry.apply_remote([("enrolments", "node-7", {"spiffe": "spiffe://mesh.local/ns/default/sa/web"})])
    assert cut == [], f"expected nothing cut off by an enrolment being written, got {cut}"
    registry.apply_remote([("enrolments", "node-7", None)])
    assert cut == [("node-7", ENROLMENT_REMOVED)], f"expected node-7's streams ended here too, got {cut}"
