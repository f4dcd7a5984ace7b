"""HashiCorp's Go client (``github.com/hashicorp/consul/api`` from the Go module proxy) against the
Consul-compatible API: hash-based blocking, Meta and TaggedAddresses as registered, the names and
ports Consul accepts, heartbeats that leave health watchers parked, locks over sessions, transactions
and catalog registrations. ``consul_go/main.go`` drives the client, one scenario per run, and prints
what it saw; each test here judges one scenario.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT, ControlPlaneProc, control_plane, tmpdir

pytestmark = pytest.mark.timeout(300)

SOURCES = ROOT / "tests" / "interop" / "consul_go"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "meshpilot" / "consul-go"


def _go() -> str | None:
    return shutil.which("go") or next((p for p in ("/usr/local/go/bin/go",) if Path(p).exists()), None)


@pytest.fixture(scope="module")
def client() -> str:
    go = _go()
    if go is None:
        pytest.skip("Go is needed to build the consul/api client")
    CACHE.mkdir(parents=True, exist_ok=True)
    binary = CACHE / "consulgo"
    env = {**os.environ, "GOFLAGS": "-buildvcs=false -mod=readonly", "GOTOOLCHAIN": "local"}
    proc = subprocess.run([go, "build", "-o", str(binary), "."], cwd=SOURCES, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"expected the consul/api client to build, go build said:\n{proc.stderr[-3000:]}"
    return str(binary)


@pytest.fixture(scope="module")
def cp() -> Iterator[ControlPlaneProc]:
    with control_plane(tmpdir("meshpilot-consul-go-"), extra=["--consul-port", "0", "--debounce-ms", "20"]) as proc:
        yield proc


def _run(client: str, cp: ControlPlaneProc, scenario: str) -> dict[str, Any]:
    proc = subprocess.run([client, f"127.0.0.1:{cp.ports['consul']}", scenario], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"expected the Go client's {scenario!r} scenario to succeed, it failed: {proc.stderr.strip()[-2000:]}"
    return json.loads(proc.stdout)


def test_wait_hash_blocks_until_the_service_changes(client: str, cp: ControlPlaneProc) -> None:
    out = _run(client, cp, "waithash")
    assert out["first_hash"], f"expected an X-Consul-ContentHash on agent/service, got {out}"
    # 3 s of watching with one change half-way: the first blocked call wakes on the change, the second
    # blocks to the end; anything beyond a handful of requests is a loop that never blocks
    assert out["requests"] <= 4, f"expected the WaitHash loop to block (at most 4 requests in 3 s), it made {out['requests']}"
    assert out["changes"] == ["[changed]"], f"expected exactly one wake-up, showing the new tag, got {out['changes']}"


def test_meta_and_tagged_addresses_come_back_as_registered(client: str, cp: ControlPlaneProc) -> None:
    out = _run(client, cp, "fields")
    meta = {"version": "1.2", "team": "payments"}
    for view in ("agent", "health", "catalog"):
        assert out[f"{view}_meta"] == meta, f"expected {view} Meta exactly as registered {meta}, got {out[f'{view}_meta']}"
        tagged = out[f"{view}_tagged"] or {}
        assert tagged.get("wan") == {"Address": "198.51.100.7", "Port": 8443}, f"expected the registered wan address in {view}, got {tagged}"
        assert tagged.get("lan_ipv4") == {"Address": "127.0.0.1", "Port": 7002}, f"expected Consul's default lan_ipv4 in {view}, got {tagged}"
    _s, service = cp.call("GET", "/v1/services/default/fields")
    assert service["ports"][0]["protocol"] == "grpc", f"expected the protocol kept on the service port, got {service['ports']}"


def test_names_and_ports_consul_accepts(client: str, cp: ControlPlaneProc) -> None:
    out = _run(client, cp, "names")
    expected = {
        "under_score": {"service": "under_score", "id": "under_score-1", "port": 7003},
        "api.v2": {"service": "api.v2", "id": "dotted-1", "port": 7004},
        "MixedCase": {"service": "MixedCase", "id": "Mixed-1", "port": 7005},
        "portless": {"service": "portless", "id": "portless-1", "port": 0},
    }
    for name, entry in expected.items():
        assert out[name] == {"entries": [entry]}, f"expected {name!r} registered and read back as {entry}, got {out[name]}"
    for name in expected:
        assert name in out["catalog"], f"expected {name!r} in the catalog as registered, got {out['catalog']}"
    assert "Mixed-1=MixedCase" in out["agent"], f"expected the agent to list MixedCase as registered, got {out['agent']}"
    # the mesh holds DNS-safe names and remembers the registered form
    _s, services = cp.call("GET", "/v1/services")
    by_name = {s["name"]: s for s in services}
    for mesh, registered in (("under-score", "under_score"), ("api-v2", "api.v2"), ("mixedcase", "MixedCase")):
        assert mesh in by_name, f"expected mesh service {mesh!r} for Consul name {registered!r}, got {sorted(by_name)}"
        assert by_name[mesh]["labels"].get("consul-name") == registered, by_name[mesh]
    _s, inst = cp.call("GET", "/v1/instances/consul:127.0.0.1:portless-1")
    assert inst.get("routable") is False, f"expected a Port 0 instance never to be routed to, got {inst}"


def test_ttl_heartbeat_with_a_new_note_leaves_passing_watchers_parked(client: str, cp: ControlPlaneProc) -> None:
    out = _run(client, cp, "ttlnote")
    assert out["wakes"] == 0, f"expected no wake-up of a passing-only watch while membership is unchanged, got {out['wakes']}"
    assert out["status"] == "passing" and out["agent_output"] == "alive 20", f"expected the agent to show the latest note, got {out}"


def test_lock_key_sessions_and_kv_acquire_release(client: str, cp: ControlPlaneProc) -> None:
    out = _run(client, cp, "lock")
    expected = {
        "first_locked": True, "holder_session_set": True, "session_info": True, "second_locked_while_held": False,
        "second_locked_after_release": True, "acquired": True, "rival_acquired": False, "renewed": True, "released": True,
        "after_release": {"session": "", "lock_index": 1, "value": "done"}, "reacquired": True,
        "deleted_with_session": True, "renew_after_destroy": False,
    }
    assert out == expected, f"expected locks and sessions to behave as on Consul:\n expected {expected}\n got      {out}"


def test_txn_is_atomic(client: str, cp: ControlPlaneProc) -> None:
    out = _run(client, cp, "txn")
    expected = {"ok": True, "got": "1", "failing_ok": False, "failing_op": 1, "c_written": False, "b_flags": 9}
    assert out == expected, f"expected an atomic transaction and a rolled-back one, expected {expected}, got {out}"


def test_catalog_register_and_deregister(client: str, cp: ControlPlaneProc) -> None:
    out = _run(client, cp, "catalog")
    assert out["passing"] == [{"node": "ext-node", "address": "127.0.0.9", "port": 7443, "meta": {"kind": "saas"}}], out["passing"]
    assert out["after_deregister"] == 0, f"expected the catalog deregistration to remove the service, got {out}"
