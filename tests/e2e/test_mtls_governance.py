"""Governance with identity on, through enrolled sidecars on real Envoys talking mutual TLS: a
``RateLimitPolicy`` with ``per: caller`` keeps one bucket per caller certificate (the SPIFFE id the
callee's inbound listener writes into ``x-mesh-caller``, overwriting whatever the request carried),
and an ``AuthorizationPolicy`` denial is written to the callee's access log with both principals
and counted in its Envoy's RBAC stats.

Limits are observed by counting 429s against a bucket that does not refill during the test (a burst
of 5 at one token an hour), never by timing, so two busy cores cannot make them flaky.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from http import client as httpc
from pathlib import Path
from typing import Any

import pytest

from meshpilot.pki import spiffe_id
from tests.e2e.test_mtls_mesh import ADMIN, _call, _mesh, _policy
from tests.support import http, wait_until

A_ID = spiffe_id("mesh.local", "default", "a")
B_ID = spiffe_id("mesh.local", "default", "b")
C_ID = spiffe_id("mesh.local", "default", "c")
BURST = 5
RULE_STAT = "wasmcustom.meshpilot.ratelimit.b-callers_default"


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[dict[str, Any]]:
    with _mesh(tmp_path, ("a", "b", "c")) as nodes:
        yield nodes


def _admin(node: Any, path: str) -> str:
    port = json.loads(node.ready.read_text())["admin_port"]
    return str(http("GET", f"http://127.0.0.1:{port}{path}", timeout=5)[1])


def _plaintext(node: Any, headers: dict[str, str]) -> int:
    """A plaintext call straight into ``node``'s inbound listener (no certificate, so no caller)."""
    try:
        return int(http("GET", f"http://127.0.0.1:{node.inbound}/probe", headers=headers, timeout=5)[0])
    except OSError:
        return 0


def _as_peer(caller: Any, callee: Any, headers: dict[str, str]) -> int:
    """A call straight into ``callee``'s inbound listener over mutual TLS with ``caller``'s own key
    and certificate (as the agent keeps them), past ``caller``'s sidecar and its caller header."""
    ids = caller.dir / "identity"
    ctx = ssl.create_default_context(cafile=str(ids / "bundle.pem"))
    ctx.check_hostname = False  # workload certificates name a SPIFFE id (URI SAN), not a host
    ctx.load_cert_chain(str(ids / "cert.pem"), str(ids / "key.pem"))
    conn = httpc.HTTPSConnection("127.0.0.1", callee.inbound, context=ctx, timeout=5)
    try:
        conn.request("GET", "/forged", headers={"Host": "b", **headers})
        r = conn.getresponse()
        r.read()
        return int(r.status)
    finally:
        conn.close()


def _statuses(node: Any, n: int, headers: dict[str, str] | None = None) -> list[int]:
    return [_call(node, "b", headers=headers)[0] for _ in range(n)]


def _counter(stats: str, name: str) -> int | None:
    for line in stats.splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return None


def test_per_caller_limit_keys_buckets_by_certificate_identity(mesh: dict[str, Any]) -> None:
    cp, a, b, c = mesh["cp"], mesh["a"], mesh["b"], mesh["c"]
    _policy(cp, "RateLimitPolicy", {"name": "b-callers", "service": "b", "per": "caller", "rate": "1/h", "burst": BURST})
    # The limit is live once a plaintext caller is limited. It has no certificate, so its claim to be
    # a is stripped and it spends the shared ~none bucket, none of a's or c's tokens.
    wait_until(lambda: _plaintext(b, {"x-mesh-caller": A_ID}) == 429, 10,
               what="b's inbound limit in force (plaintext callers' ~none bucket exhausted)")

    first = _statuses(a, BURST + 5)
    assert first == [200] * BURST + [429] * 5, \
        f"expected a's own bucket to admit its burst of {BURST} and then limit it, got {first}"
    spent = _statuses(c, BURST - 1)
    assert spent == [200] * (BURST - 1), \
        f"expected c's calls to be admitted from c's own bucket while a is limited, got {spent}"
    forged = _statuses(a, 3, {"x-mesh-caller": C_ID})
    assert forged == [429] * 3, \
        f"expected a's app's calls claiming to be c ({C_ID}) to stay in a's exhausted bucket, got {forged}"
    # past a's sidecar (which stamps its own caller header): a's certificate with c's id in the header
    direct = [_as_peer(a, b, {"x-mesh-caller": C_ID}) for _ in range(2)]
    assert direct == [429] * 2, \
        f"expected b to key calls on a's certificate, not on the x-mesh-caller ({C_ID}) they carry, got {direct}"
    last = _statuses(c, 2)
    assert last == [200, 429], \
        f"expected c's bucket untouched by a's forged calls (one token left, then limited), got {last}"

    stats = _admin(b, f"/stats?filter={RULE_STAT}")
    seg = {who: "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in sid) for who, sid in (("a", A_ID), ("c", C_ID))}
    want = {f"{RULE_STAT}.{seg['a']}.allowed": BURST, f"{RULE_STAT}.{seg['a']}.rejected": 10,
            f"{RULE_STAT}.{seg['c']}.allowed": BURST, f"{RULE_STAT}.{seg['c']}.rejected": 1}

    def counted() -> bool:
        nonlocal stats
        stats = _admin(b, f"/stats?filter={RULE_STAT}")
        return all(_counter(stats, k) == v for k, v in want.items())

    try:
        wait_until(counted, 10, what=f"b's per-caller counters keyed by the SPIFFE ids {want}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\ngot:\n{stats}") from None
    assert (_counter(stats, f"{RULE_STAT}._none.rejected") or 0) >= 1, f"expected the plaintext probe limited under ~none, got:\n{stats}"


def _denials(node: Any) -> list[dict[str, Any]]:
    lines = []
    for raw in (node.dir / "envoy.log").read_text(errors="replace").splitlines():
        raw = raw.strip()
        if not raw.startswith("{"):
            continue
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if entry.get("direction") == "inbound" and entry.get("status") == 403 and entry.get("path") == "/denied":
            lines.append(entry)
    return lines


def test_authorization_denial_is_logged_with_both_principals_and_counted(mesh: dict[str, Any]) -> None:
    cp, a, b, c = mesh["cp"], mesh["a"], mesh["b"], mesh["c"]
    _policy(cp, "AuthorizationPolicy", {"name": "b-only-a", "service": "b", "action": "ALLOW",
                                        "rules": [{"from": [{"principals": [A_ID]}]}]})
    wait_until(lambda: _call(c, "b")[0] == 403, 10, what="c denied by b's ALLOW policy")
    assert _call(a, "b")[0] == 200, "a is allowed by the policy"
    status, body = _call(c, "b", path="/denied")
    assert status == 403, f"expected c's call to be denied, got {status} {body}"

    found: list[dict[str, Any]] = []

    def logged() -> bool:
        found[:] = _denials(b)
        return bool(found)

    wait_until(logged, 10, what="b's access log line for the denied request in envoy.log")
    line = found[-1]
    instances = cp.call("GET", "/v1/services/default/b/instances", headers=ADMIN)[1]
    assert [i["metadata"].get("spiffe") for i in instances] == [B_ID], f"expected b registered under {B_ID}, got {instances}"
    assert line.get("source_principal") == C_ID, f"expected the caller's SPIFFE id as source_principal, got {line}"
    assert line.get("destination_principal") == B_ID, f"expected b's SPIFFE id as destination_principal, got {line}"
    assert line.get("source_service") == C_ID, f"expected the caller header the callee set from the certificate, got {line}"
    assert line.get("details") == "rbac_access_denied_matched_policy[none]", \
        f"expected details to name the RBAC denial (no ALLOW rule matched), got {line}"

    # c's two denials (the first 403 waited for, then /denied) and a's one admission, on the allow filter
    stats = _admin(b, "/stats?filter=http.inbound.rbac")
    counts = {k: _counter(stats, f"http.inbound.rbac.authz_allow.{k}") for k in ("denied", "allowed")}
    assert counts == {"denied": 2, "allowed": 1}, f"expected b's Envoy to count 2 denials and 1 admission, got:\n{stats}"
