"""A sidecar's liveness survives the death of the control-plane replica holding its health stream.

A real 1-member etcd, two ``meshpilot serve --store etcd://...`` replicas, a real Envoy sidecar (``web-1``,
HDS on) and a real caller Envoy, both bootstrapped with ``--control-plane A,B``. The replica holding
web-1's HDS stream is read from etcd itself (its liveness document). Then:

1. the other replica restarts: it must not take web-1, held by the first, for lost (passing throughout);
2. the holder is SIGKILLed: web-1's Envoy moves its stream to the survivor, and web-1 stays passing on the
   survivor and in the caller's EDS through the old holder's lease expiry and every HDS clock;
3. web-1's Envoy is SIGKILLed: the survivor marks web-1 critical (it leaves the caller's EDS) and removes
   it, on its configured clocks;
4. the killed replica comes back, web-1's Envoy too, and then the replica holding its stream and the Envoy
   die together: once the dead replica's lease expires nobody holds web-1, and the survivor marks it critical
   and removes it on its clocks.
"""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.etcd_cluster import etcd_cluster
from tests.support import VENV_BIN, ControlPlaneProc, EnvoyProc, free_port, http, http_backend, tmpdir, wait_until

pytestmark = pytest.mark.e2e

CRITICAL_AFTER, DEAD_AFTER, REMOVE_AFTER = 4.0, 2.0, 8.0
LEASE_TTL = 10.0  # EtcdStore's default lease: a killed replica's documents go this long after its death
WEB = "outbound|80||web.default.svc.mesh"


def _replica(workdir: Path, url: str, cfg: Path, xds_port: int = 0, api_port: int = 0) -> ControlPlaneProc:
    workdir.mkdir(exist_ok=True)
    return ControlPlaneProc(workdir, store=url, extra=["--config", str(cfg)], xds_port=xds_port, api_port=api_port).start()


def _kill(cp: ControlPlaneProc) -> None:
    assert cp.proc is not None
    cp.proc.send_signal(signal.SIGKILL)
    cp.proc.wait(10)
    cp.proc = None


def _holder_pid(etcd_url: str) -> int | None:
    """The pid in the replica id of web-1's liveness document, read from etcd's own API."""
    key = base64.b64encode(b"/meshpilot/liveness/web-1").decode()
    status, body, _ = http("POST", f"http://{etcd_url.removeprefix('etcd://').split(',')[0]}/v3/kv/range", {"key": key})
    assert status == 200, f"etcd range: expected 200, got {status} {body}"
    kvs = body.get("kvs") or []
    if not kvs:
        return None
    replica = json.loads(base64.b64decode(kvs[0]["value"]))["replica"]
    return int(replica.rsplit("-", 2)[1])


def _health(cp: ControlPlaneProc) -> str:
    status, body = cp.call("GET", "/v1/instances/web-1")
    if status == 404:
        return "missing"
    assert status == 200, f"GET /v1/instances/web-1 on :{cp.ports['api']}: expected 200 or 404, got {status} {body}"
    return str(body["health"])


def _bootstrap(workdir: Path, name: str, cps: list[ControlPlaneProc], *args: str) -> dict[str, Any]:
    out = workdir / f"{name}-bootstrap.json"
    made = subprocess.run(
        [str(VENV_BIN / "meshpilot"), "bootstrap", "--node", name, "--control-plane",
         ",".join(f"127.0.0.1:{cp.xds_port}" for cp in cps), "--admin-port", "0", *args, "-o", str(out)],
        capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, f"meshpilot bootstrap: expected exit 0, got {made.returncode}: {made.stderr}"
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


def _watch(seconds: float, cp: ControlPlaneProc, caller: EnvoyProc, web_host: str) -> tuple[set[str], set[bool]]:
    """web-1's health on ``cp`` and whether it is in the caller's EDS, sampled for ``seconds``."""
    health, in_eds = set(), set()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        health.add(_health(cp))
        in_eds.add(web_host in caller.cluster_hosts(WEB))
        time.sleep(0.1)
    return health, in_eds


def test_a_sidecar_stays_through_its_replicas_death_and_goes_on_the_survivors_clocks() -> None:
    workdir = tmpdir("meshpilot-hds-replicas-")
    cfg = workdir / "cp.yaml"
    cfg.write_text(yaml.safe_dump({"hds_interval_s": 0.3, "hds_critical_after_s": CRITICAL_AFTER, "hds_dead_after_s": DEAD_AFTER,
                                   "hds_remove_after_s": REMOVE_AFTER, "debounce_ms": 20}))
    (workdir / "etcd").mkdir()
    with etcd_cluster(workdir / "etcd", members=1) as cluster, http_backend("web") as app:
        cps: list[ControlPlaneProc] = []
        try:
            for name in ("a", "b"):
                cps.append(_replica(workdir / name, cluster.url, cfg))
            status, body = cps[0].call("POST", "/v1/services", {"name": "web", "ports": [{"name": "http", "port": 80, "protocol": "http"}]})
            assert status in (200, 201), f"POST /v1/services: expected 200/201, got {status} {body}"
            inbound = free_port()
            web_boot = _bootstrap(workdir, "web-1", cps, "--service", "web", "--hds", "--outbound-port", str(free_port()),
                                  "--inbound-port", str(inbound), "--app-port", str(app.port))
            web_boot["node"]["metadata"]["HEALTH_CHECK"] = {"kind": "tcp", "interval_s": 0.3, "timeout_s": 0.3}
            caller_boot = _bootstrap(workdir, "caller-1", cps, "--service", "caller", "--outbound-port", str(free_port()),
                                     "--inbound-port", str(free_port()), "--app-port", str(free_port()))
            web, caller = EnvoyProc(workdir, web_boot, name="web-1"), EnvoyProc(workdir, caller_boot, name="caller-1")
            with contextlib.ExitStack() as stack:
                stack.callback(caller.stop)
                stack.callback(web.stop)
                web.start()
                caller.start()
                web_host = f"127.0.0.1:{inbound}"
                wait_until(lambda: all(_health(cp) == "passing" for cp in cps), 30, what="web-1 passing on both replicas")
                wait_until(lambda: web_host in caller.cluster_hosts(WEB), 15, what="web-1 in the caller's EDS")
                pid = wait_until(lambda: _holder_pid(cluster.url), 10, what="web-1's liveness document in etcd")
                by_pid = {cp.proc.pid: i for i, cp in enumerate(cps) if cp.proc is not None}
                assert pid in by_pid, f"expected the liveness document to name one of the replicas {sorted(by_pid)}, got pid {pid}"
                h = by_pid[pid]
                o = 1 - h

                # 1. the other replica restarts while the holder holds web-1
                ports = cps[o].ports
                _kill(cps[o])
                cps[o] = _replica(workdir / "ab"[o], cluster.url, cfg, ports["xds"], ports["api"])
                health, _ = _watch(CRITICAL_AFTER + 2, cps[o], caller, web_host)
                assert health == {"passing"}, f"expected web-1 (held by the other replica) passing on a restarted replica, got {health}"

                # 2. the holder dies
                ports_h = cps[h].ports
                t_kill = time.monotonic()
                _kill(cps[h])
                survivor = cps[o]
                moved = wait_until(lambda: _holder_pid(cluster.url) == survivor.proc.pid if survivor.proc else False, 15,
                                   what="web-1's HDS stream on the survivor (its liveness document)")
                moved_s = time.monotonic() - t_kill
                health, in_eds = _watch(LEASE_TTL + CRITICAL_AFTER + 2, survivor, caller, web_host)
                assert moved and health == {"passing"}, f"expected web-1 passing on the survivor through the holder's death, got {health}"
                assert in_eds == {True}, "expected web-1 in the caller's EDS throughout, but it left it"
                print(f"holder killed: stream on the survivor after {moved_s:.2f}s; web-1 passing and in EDS for "
                      f"{LEASE_TTL + CRITICAL_AFTER + 2:.0f}s after")

                # 3. web-1's Envoy dies: the survivor's clocks run
                assert web.proc is not None
                web.proc.send_signal(signal.SIGKILL)
                web.proc.wait(10)
                web.proc = None
                t0 = time.monotonic()
                wait_until(lambda: _health(survivor) == "critical", CRITICAL_AFTER + 2, interval=0.05, what="web-1 critical on the survivor")
                t_critical = time.monotonic() - t0
                wait_until(lambda: web_host not in caller.cluster_hosts(WEB), 5, what="web-1 out of the caller's EDS")
                wait_until(lambda: _health(survivor) == "missing", REMOVE_AFTER + 2, interval=0.05, what="web-1 removed on the survivor")
                t_removed = time.monotonic() - t0
                print(f"sidecar killed: critical after {t_critical:.2f}s (dead-after {DEAD_AFTER}s, critical-after {CRITICAL_AFTER}s), "
                      f"removed after {t_removed:.2f}s (remove-after {REMOVE_AFTER}s)")
                assert DEAD_AFTER - 0.2 <= t_critical <= CRITICAL_AFTER + 1.0, \
                    f"expected critical between {DEAD_AFTER}s and {CRITICAL_AFTER + 1}s after the kill, got {t_critical:.2f}s"
                assert REMOVE_AFTER - 0.2 <= t_removed <= REMOVE_AFTER + 1.5, \
                    f"expected removed ~{REMOVE_AFTER}s after the kill, got {t_removed:.2f}s"

                # 4. a replica and the sidecar it holds die together: nobody holds the node, the survivor's clocks run
                cps[h] = _replica(workdir / "ab"[h], cluster.url, cfg, ports_h["xds"], ports_h["api"])
                web = EnvoyProc(workdir, web_boot, name="web-1b")
                stack.callback(web.stop)
                web.start()
                wait_until(lambda: all(_health(cp) == "passing" for cp in cps), 30, what="web-1 back, passing on both replicas")
                pid = wait_until(lambda: _holder_pid(cluster.url), 10, what="web-1's liveness document in etcd")
                by_pid = {cp.proc.pid: i for i, cp in enumerate(cps) if cp.proc is not None}
                h2 = by_pid[pid]
                survivor = cps[1 - h2]
                assert web.proc is not None
                web.proc.send_signal(signal.SIGKILL)
                _kill(cps[h2])
                t0 = time.monotonic()
                web.proc.wait(10)
                web.proc = None
                wait_until(lambda: _health(survivor) == "critical", LEASE_TTL + CRITICAL_AFTER + 3, interval=0.05,
                           what="web-1 critical on the survivor once its holder's lease expired")
                t_critical = time.monotonic() - t0
                wait_until(lambda: _health(survivor) == "missing", REMOVE_AFTER + 3, interval=0.05, what="web-1 removed on the survivor")
                t_removed = time.monotonic() - t0
                print(f"holder and sidecar killed together: critical after {t_critical:.2f}s, removed after {t_removed:.2f}s "
                      f"(lease {LEASE_TTL}s + critical-after {CRITICAL_AFTER}s / remove-after {REMOVE_AFTER}s)")
                assert CRITICAL_AFTER <= t_critical <= LEASE_TTL + CRITICAL_AFTER + 2, \
                    f"expected critical within the lease's life plus {CRITICAL_AFTER}s after the kills, got {t_critical:.2f}s"
                assert REMOVE_AFTER - CRITICAL_AFTER - 0.5 <= t_removed - t_critical <= REMOVE_AFTER - CRITICAL_AFTER + 1.5, \
                    f"expected removal {REMOVE_AFTER - CRITICAL_AFTER}s after critical, got {t_removed - t_critical:.2f}s"
        finally:
            for cp in cps:
                cp.stop()
