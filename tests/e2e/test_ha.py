"""Several control planes, one mesh: three replicas on a three-member etcd, real Envoys (sotw and
delta) whose bootstraps list every replica, two sidecars that register their apps over HDS, a steady
request load through the mesh and a stream of registrations, then the failures an operator meets:

1. a replica killed (SIGKILL): Envoys and sidecars reconnect to the others, no request fails, every
   acknowledged registration is on every replica and in every Envoy's endpoints, and the HDS
   instances stay passing;
2. an etcd member killed: nothing changes for anyone;
3. a replica frozen (SIGSTOP) for longer than its lease: its streams move, nothing is lost, and it
   serves again (current, with what was written meanwhile) once it runs;
4. every replica stopped and started again: the state is intact and the Envoys are fed again;
5. Consul: a blocking query held on one replica wakes within 1 s of a write on another, and its
   index does not go back when the client moves to another replica.

One test, because each phase starts from the state the previous one left, as in an operator's day.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshpilot.translate.bootstrap import BootstrapOptions, build_bootstrap
from tests.etcd_cluster import etcd_cluster
from tests.support import ControlPlaneProc, EnvoyProc, free_port, http, http_backend, through, wait_until

pytestmark = pytest.mark.e2e

ENVOYS = 10
WEB = "outbound|80||web.default.svc.mesh"
REG = "outbound|80||reg.default.svc.mesh"


class Replicas:
    """Three `meshpilot serve` on one etcd, each with fixed ports so they can be started again."""

    def __init__(self, workdir: Path, store: str, n: int = 3) -> None:
        self.procs: list[ControlPlaneProc] = []
        for i in range(n):
            d = workdir / f"replica{i}"
            d.mkdir()
            self.procs.append(ControlPlaneProc(d, store=store, xds_port=free_port(), api_port=free_port(),
                                               extra=["--consul-port", str(free_port())]))

    def start(self, i: int | None = None) -> None:
        for p in self.procs if i is None else [self.procs[i]]:
            p.start()

    def alive(self) -> list[ControlPlaneProc]:
        return [p for p in self.procs if p.proc is not None and p.proc.poll() is None]

    def signal(self, i: int, sig: int) -> None:
        proc = self.procs[i].proc
        assert proc is not None
        os.kill(proc.pid, sig)
        if sig == signal.SIGKILL:
            proc.wait()
            self.procs[i].proc = None

    def stop(self) -> None:
        for p in self.procs:
            if p.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.proc.pid, signal.SIGCONT)
            p.stop()

    def streams(self, i: int) -> set[str]:
        """Node ids with an xDS stream open on replica i."""
        status, body = self.procs[i].call("GET", "/v1/proxies")
        return {p["node_id"] for p in body} if status == 200 else set()


def _bootstrap(node: str, xds_ports: list[int], **kw: Any) -> dict[str, Any]:
    return build_bootstrap(BootstrapOptions(node_id=node, control_planes=tuple(("127.0.0.1", p) for p in xds_ports),
                                            admin_port=0, **kw))


@contextlib.contextmanager
def _envoys(workdir: Path, boots: dict[str, dict[str, Any]]) -> Iterator[dict[str, EnvoyProc]]:
    started: dict[str, EnvoyProc] = {}
    try:
        for name, boot in boots.items():
            started[name] = EnvoyProc(workdir, boot, name=name).start()
        yield started
    finally:
        for e in started.values():
            e.stop()


class Load:
    """Requests through every outbound Envoy, one thread each, until stopped; counts what failed."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.sent = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(p,), daemon=True) for p in ports]

    def _run(self, port: int) -> None:
        while not self._stop.is_set():
            try:
                status, _ = through(port, "web", timeout=5)
            except OSError as exc:
                status = 0
                self.failed.append(f"{port}: {exc}")
            if status != 200:
                self.failed.append(f"{port}: status {status}")
            self.sent += 1
            time.sleep(0.02)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)


class Registrations:
    """A stream of instance registrations of service ``reg``, each sent to the next live replica;
    ``acked`` holds those answered 201 (durable by contract)."""

    def __init__(self, replicas: Replicas) -> None:
        self.replicas = replicas
        self.acked: set[str] = set()
        self.refused: list[str] = []
        self._n = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            alive = self.replicas.alive()
            if not alive:
                time.sleep(0.05)
                continue
            cp = alive[self._n % len(alive)]
            iid = f"reg-{self._n}"
            self._n += 1
            try:
                status, body = cp.call("POST", "/v1/services/default/reg/instances",
                                       {"id": iid, "address": "127.0.0.9", "ports": {"http": 10000 + self._n % 50000}})
            except OSError as exc:
                status, body = 0, str(exc)
            if status == 201:
                self.acked.add(iid)
            else:
                self.refused.append(f"{iid}: {status} {body}")  # not acknowledged: may or may not be stored
            time.sleep(0.03)

    def __enter__(self) -> Registrations:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


class Heartbeat:
    """A Consul SDK app behind a load balancer: registers with a 3 s TTL check, then passes it every
    0.5 s through the first replica that answers."""

    SERVICE_ID = "sdk-1"

    def __init__(self, replicas: Replicas) -> None:
        self.replicas = replicas
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _put(self, path: str, body: object = None) -> bool:
        for cp in self.replicas.alive():
            try:
                status, _, _ = http("PUT", f"http://127.0.0.1:{cp.ports['consul']}{path}", body, timeout=2)
            except OSError:
                continue
            if status == 200:
                return True
        return False

    def register(self) -> str:
        assert self._put("/v1/agent/service/register", {"Name": "sdk", "ID": self.SERVICE_ID, "Port": 9000,
                                                        "Check": {"TTL": "3s"}}), "expected the Consul registration to succeed"
        assert self._put(f"/v1/agent/check/pass/service:{self.SERVICE_ID}")
        return f"consul:127.0.0.1:{self.SERVICE_ID}"

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            if not self._put(f"/v1/agent/check/pass/service:{self.SERVICE_ID}"):
                self.failed += 1

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


class Watch:
    """Samples each HDS instance's health on the live replicas, and the web endpoints every client
    Envoy holds, while the phases run."""

    def __init__(self, replicas: Replicas, ids: list[str], envoys: list[EnvoyProc] | None = None, web_hosts: int = 0) -> None:
        self.replicas, self.ids = replicas, ids
        self.envoys, self.web_hosts = envoys or [], web_hosts
        self.bad: list[str] = []
        self.eds_bad: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for cp in self.replicas.alive():
                for iid in self.ids:
                    try:
                        status, body = cp.call("GET", f"/v1/instances/{iid}")
                    except OSError:
                        continue  # a replica going down under the request
                    if status == 503:
                        continue  # a replica that says it is not current is not asked
                    health = body.get("health") if isinstance(body, dict) else None
                    if status != 200 or health != "passing":
                        self.bad.append(f"{cp.workdir.name}: {iid} {status} {health}")
            for e in self.envoys:  # no healthy instance leaves any Envoy's endpoints
                hosts = e.cluster_hosts(WEB)
                if len(hosts) != self.web_hosts or any(flags != "healthy" for flags in hosts.values()):
                    self.eds_bad.append(f"{e.name}: {hosts}")
            time.sleep(0.25)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def _config_updates(envoy: EnvoyProc) -> tuple[int | None, int | None]:
    """How many cluster and listener updates the Envoy has applied."""
    return envoy.stat("cluster_manager.cds.update_success"), envoy.stat("listener_manager.lds.update_success")


def _hosts(envoy: EnvoyProc, cluster: str) -> set[str]:
    return set(envoy.cluster_hosts(cluster))


def _everyone_fed(replicas: Replicas, nodes: set[str]) -> bool:
    """Every node has an xDS stream on a live replica."""
    held: set[str] = set()
    for i, p in enumerate(replicas.procs):
        if p in replicas.alive():
            held |= replicas.streams(i)
    return nodes <= held


def _converged(replicas: Replicas, envoys: list[EnvoyProc], acked: set[str]) -> str:
    """What is still missing: acknowledged registrations not on a live replica, or not in an Envoy's endpoints."""
    for cp in replicas.alive():
        status, body = cp.call("GET", "/v1/services/default/reg/instances")
        have = {i["id"] for i in body} if status == 200 else set()
        if not acked <= have:
            return f"{cp.workdir.name} lacks {sorted(acked - have)[:5]} (status {status})"
    want = len(acked)
    for e in envoys:
        n = len(_hosts(e, REG))
        if n < want:
            return f"{e.name} has {n} of {want} reg endpoints"
    return ""


def test_replicas_on_etcd_survive_a_killed_replica_a_killed_member_a_frozen_replica_and_a_full_restart(tmp_path: Path) -> None:
    (tmp_path / "etcd").mkdir()
    with etcd_cluster(tmp_path / "etcd", members=3) as etcd, contextlib.ExitStack() as stack:
        replicas = Replicas(tmp_path, etcd.url)
        stack.callback(replicas.stop)
        replicas.start()
        xds_ports = [p.xds_port_wanted for p in replicas.procs]
        first = replicas.procs[0]
        for name in ("web", "reg"):
            status, body = first.call("POST", "/v1/services", {"name": name, "ports": [{"name": "http", "port": 80}]})
            assert status == 201, f"expected {name} created, got {status} {body}"

        # two apps behind sidecars that register them over HDS
        apps = [stack.enter_context(http_backend(f"web-{i}")) for i in range(2)]
        sidecars = {f"web-{i}": _bootstrap(f"web-{i}", xds_ports, service="web", inbound_port=free_port(),
                                           app_port=apps[i].port, hds=True)
                    for i in range(2)}
        outbound = [free_port() for _ in range(ENVOYS)]
        clients = {f"client-{i}": _bootstrap(f"client-{i}", xds_ports, service="client", outbound_port=outbound[i],
                                             api_type="GRPC" if i % 2 else "DELTA_GRPC")
                   for i in range(ENVOYS)}
        envoys = stack.enter_context(_envoys(tmp_path, {**sidecars, **clients}))
        for iid in sidecars:
            wait_until(lambda iid=iid: first.call("GET", f"/v1/instances/{iid}")[1].get("health") == "passing", 30,
                       what=f"{iid} registered over HDS and passing")
        for port in outbound:
            wait_until(lambda port=port: through(port, "web")[0] == 200, 30, what=f"the web route through :{port}")
        nodes = set(envoys)
        wait_until(lambda: _everyone_fed(replicas, nodes), 20, what="every Envoy with a stream")
        client_envoys = [envoys[n] for n in clients]

        heartbeat = Heartbeat(replicas)
        sdk = heartbeat.register()
        with Load(outbound) as load, Registrations(replicas) as regs, Watch(replicas, [*sidecars, sdk], client_envoys, len(sidecars)) as watch, heartbeat:
            # 1. kill -9 the replica that holds the most streams
            time.sleep(2)
            victim = max(range(3), key=lambda i: len(replicas.streams(i)))
            moved = replicas.streams(victim)
            assert moved, "expected some streams on the busiest replica"
            updates = {n: _config_updates(envoys[n]) for n in moved}
            replicas.signal(victim, signal.SIGKILL)
            wait_until(lambda: _everyone_fed(replicas, nodes), 30, what=f"the {len(moved)} nodes of the killed replica reconnected elsewhere")
            # the same content has the same versions on every replica: a moved Envoy is not sent its
            # clusters and listeners again
            again = {n: _config_updates(envoys[n]) for n in moved}
            assert again == updates, f"expected no cluster or listener update on moving to another replica, got {updates} -> {again}"
            time.sleep(2)

            # 2. kill one etcd member: no effect
            etcd.kill(0)
            acked_before = len(regs.acked)
            wait_until(lambda: len(regs.acked) > acked_before + 20, 20, what="registrations going on with one etcd member down")

            # 3. freeze a live replica for longer than its lease (10 s)
            frozen = max((i for i in range(3) if i != victim), key=lambda i: len(replicas.streams(i)))
            held = replicas.streams(frozen)
            assert held, "expected streams on the replica to freeze"
            replicas.signal(frozen, signal.SIGSTOP)
            frozen_at = time.monotonic()
            alive_others = [i for i in range(3) if i not in (victim, frozen)]

            def others_hold_everyone() -> bool:
                return nodes <= set().union(*(replicas.streams(i) for i in alive_others))

            # the Registrations thread picks live processes; a frozen one is alive but answers nothing
            regs.replicas = _Only(replicas, alive_others)
            watch.replicas = _Only(replicas, alive_others)
            heartbeat.replicas = _Only(replicas, alive_others)
            wait_until(others_hold_everyone, 40, what=f"the {len(held)} streams of the frozen replica moved to the others")
            time.sleep(max(0.0, 12 - (time.monotonic() - frozen_at)))
            replicas.signal(frozen, signal.SIGCONT)
            back = replicas.procs[frozen]
            wait_until(lambda: http("GET", back.api + "/healthz")[0] == 200, 30, what="the thawed replica current again")
            regs.replicas = replicas
            watch.replicas = replicas
            heartbeat.replicas = replicas
            time.sleep(2)

        print(f"\nha: {load.sent} requests, {len(load.failed)} failed; {len(regs.acked)} registrations acknowledged, "
              f"{len(regs.refused)} refused; {len(moved)} streams on the killed replica, {len(held)} on the frozen one")
        assert load.sent > 200, f"expected a steady load, sent {load.sent}"
        assert not load.failed, f"expected 0 failed requests of {load.sent}, got {len(load.failed)}: {load.failed[:10]}"
        assert not watch.bad, f"expected the HDS and Consul TTL instances passing on every replica throughout, got {watch.bad[:10]}"
        assert not watch.eds_bad, f"expected both web endpoints healthy in every Envoy throughout, got {watch.eds_bad[:5]}"
        assert heartbeat.failed == 0, f"expected every TTL pass answered by some replica, {heartbeat.failed} were not"
        # the SDK app dies: a replica runs its TTL and marks it critical (nothing keeps a dead instance)
        wait_until(lambda: all(p.call("GET", f"/v1/instances/{sdk}")[1].get("health") == "critical" for p in replicas.alive()),
                   10, what=f"{sdk} critical on every replica once its heartbeats stopped")
        assert len(regs.acked) > 50, f"expected a stream of acknowledged registrations, got {len(regs.acked)}"
        wait_until(lambda: not _converged(replicas, client_envoys, regs.acked), 30,
                   what=f"every replica and every Envoy with the {len(regs.acked)} acknowledged registrations "
                        f"({_converged(replicas, client_envoys, regs.acked)})")

        # 4. every replica stopped and started again: state intact, Envoys fed again
        status, before = replicas.alive()[0].call("GET", "/v1/services/default/reg/instances")
        assert status == 200, f"expected the reg instances listed, got {status} {before}"
        for p in replicas.procs:
            p.stop()
        etcd.start(0)
        replicas.start()
        for p in replicas.procs:
            status, after = p.call("GET", "/v1/services/default/reg/instances")
            assert status == 200 and {i["id"] for i in after} == {i["id"] for i in before}, \
                f"expected {len(before)} reg instances on {p.workdir.name} after the restart, got {status} {len(after) if isinstance(after, list) else after}"
        wait_until(lambda: _everyone_fed(replicas, nodes), 40, what="every Envoy fed again after the restart")
        for port in outbound:
            wait_until(lambda port=port: through(port, "web")[0] == 200, 20, what=f"the web route through :{port} after the restart")

        # 5. Consul: a blocking query on one replica wakes for a write on another; the index never goes back
        a, b = replicas.procs[0], replicas.procs[1]
        consul_a, consul_b = (f"http://127.0.0.1:{p.ports['consul']}" for p in (a, b))
        _, _, h = http("GET", consul_a + "/v1/health/service/reg-consul")
        index = int(h["X-Consul-Index"])
        woke: dict[str, Any] = {}

        def block() -> None:
            status, body, hdrs = http("GET", f"{consul_a}/v1/health/service/reg-consul?index={index}&wait=10s", timeout=15)
            woke.update(at=time.monotonic(), status=status, n=len(body) if isinstance(body, list) else -1,
                        index=int(hdrs.get("X-Consul-Index", 0)))

        t = threading.Thread(target=block)
        t.start()
        time.sleep(0.5)
        wrote = time.monotonic()
        status, body, _ = http("PUT", consul_b + "/v1/agent/service/register", {"Name": "reg-consul", "ID": "rc-1", "Port": 8080})
        assert status == 200, f"expected the Consul registration on B to succeed, got {status} {body}"
        t.join(15)
        assert woke.get("n") == 1, f"expected the query on A to return the instance written on B, got {woke}"
        print(f"ha: consul query on A woke {woke['at'] - wrote:.3f} s after the write on B (index {index} -> {woke['index']})")
        assert woke["at"] - wrote < 1.0, f"expected the query on A to wake within 1 s of the write on B, took {woke['at'] - wrote:.3f} s"
        assert woke["index"] > index, f"expected a larger index than {index}, got {woke['index']}"
        replicas.signal(0, signal.SIGKILL)  # the client moves to B with the index it has
        status, body, h = http("GET", f"{consul_b}/v1/health/service/reg-consul?index={woke['index']}&wait=1s", timeout=5)
        assert status == 200 and int(h["X-Consul-Index"]) >= woke["index"], \
            f"expected B's index no older than {woke['index']} after the failover, got {h.get('X-Consul-Index')}"


class _Only:
    """A view of the replicas that offers only some of them as alive (a frozen process is alive but mute)."""

    def __init__(self, replicas: Replicas, indexes: list[int]) -> None:
        self._r, self._i = replicas, indexes

    def alive(self) -> list[ControlPlaneProc]:
        return [p for n, p in enumerate(self._r.procs) if n in self._i and p in self._r.alive()]
