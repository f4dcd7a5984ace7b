"""``meshpilot perf xds-envoys --peer go-control-plane``: meshpilot and a stock go-control-plane
snapshot-cache server side by side, serving the same resources to the same real Envoys with the
same change sequence, in one invocation, timed from each Envoy's own view.

The run seeds a served meshpilot (perf/served.py) and reads, over delta ADS, what it serves: the
clusters and endpoints once, and each Envoy node's listeners and routes (a sidecar's outbound
listener is its own). Then, per peer, it starts the same N Envoys (same node ids, ports and
bootstrap, ADS over gRPC to that peer) and runs the same changes: single endpoint additions
``--gap`` apart, then a burst of ``--burst`` (at most one per service, so every intermediate state
is one meshpilot published). meshpilot gets them as registrations through its API; the peer
(``gcp_peer/main.go``, built on first use into ``~/.cache/meshpilot/gcp-peer/``) as the
ClusterLoadAssignment bytes meshpilot published for each (recorded by a delta stream kept open
during meshpilot's turn: meshpilot serves that stream beside the Envoys), through its HTTP control
channel, and sets a new snapshot for every node as a stock server does. The peer skips the registry
and translation; its time starts when it is handed the finished resource.

Propagation is read from Envoy: each runs with the ``upstream`` logger at debug and microsecond
stamps (``--concurrency 1``). When an endpoint change arrives its main thread logs ``EDS hosts or
locality weights changed for cluster: <name> ...`` (only when something changed) and then each
thread that applies it, main and worker, ``batch membership update for TLS cluster <name> ...``. A
change has reached an Envoy at the stamp of the last of its threads to apply it; the harness tails
the log files, so watching costs Envoy nothing beyond the lines (an admin ``/stats`` read costs
50-100 ms at 1,000 clusters). Each peer's process CPU is read from /proc (psutil) over each phase,
less its idle rate measured just before; its Envoys' CPU is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
import uvloop
from aiohttp import ClientSession
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import json_format

from meshpilot.perf.gobuild import go_binary
from meshpilot.perf.served import control_plane, seed, stop
from meshpilot.translate.bootstrap import BootstrapOptions, build_bootstrap
from meshpilot.perf.xds_push import _WARMING, _envoy_stats, _marker_address, _percentiles, _rounded
from meshpilot.xds.resource import TYPE

__all__ = ["LOG_FORMAT", "Membership", "applied_at", "gcp_peer_binary", "main", "parse_membership", "published_state", "resources_file"]

_GO_SOURCES = Path(__file__).parent / "gcp_peer"
_DELTA = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
LOG_FORMAT = "[%Y-%m-%d %T.%f][%t][%l][%n] %v"
_STAMP = r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6})\]\[(\d+)\]\[debug\]\[upstream\] "
_EDS_LINE = re.compile(_STAMP + r"EDS hosts or locality weights changed for cluster: (\S+) current hosts (\d+) priority \d+$")
_TLS_LINE = re.compile(_STAMP + r"batch membership update for TLS cluster (\S+) across \d+ priorities$")
_ANSWER_DELAY_S = 0.05
_THREADS = 2  # Envoy runs with --concurrency 1: the main thread and one worker each apply every update


# ---- what Envoy says (pure) ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Membership:
    """One line of Envoy's upstream log about a cluster's hosts: the main thread's EDS update
    (``hosts``: the count Envoy logs with it, the hosts before the update) or a thread applying it
    (``hosts`` None)."""

    at: float  # wall-clock seconds
    thread: int
    cluster: str
    hosts: int | None


def parse_membership(line: str) -> Membership | None:
    """The EDS update or the thread's membership update in one Envoy log line written with
    ``LOG_FORMAT``, else None."""
    line = line.rstrip("\r\n")
    m = _EDS_LINE.match(line) or _TLS_LINE.match(line)
    if m is None:
        return None
    at = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()  # Envoy stamps local time
    hosts = int(m.group(4)) if m.re is _EDS_LINE else None
    return Membership(at, int(m.group(2)), m.group(3), hosts)


def applied_at(events: Iterable[Membership], cluster: str, since: float, threads: int = _THREADS) -> float | None:
    """When Envoy had applied the first change of ``cluster``'s endpoints from ``since`` on (Envoy
    logs an EDS update only when the hosts or their weights changed): the stamp of the last of
    ``threads`` threads to apply it after that update; None if not all have yet."""
    mine = sorted((e for e in events if e.cluster == cluster and e.at >= since), key=lambda e: e.at)
    eds = next((e for e in mine if e.hosts is not None), None)
    if eds is None:
        return None
    applied: dict[int, float] = {}
    for e in mine:
        if e.hosts is None and e.at >= eds.at:
            applied.setdefault(e.thread, e.at)
            if len(applied) == threads:
                return e.at
    return None


def resources_file(shared: dict[str, dict[str, bytes]], nodes: dict[str, dict[str, dict[str, bytes]]]) -> dict[str, Any]:
    """The peer's ``-resources`` JSON: each resource's serialized bytes in base64, by type URL."""

    def encode(by_type: dict[str, dict[str, bytes]]) -> dict[str, list[str]]:
        return {t: [base64.b64encode(b).decode() for _, b in sorted(items.items())] for t, items in by_type.items() if items}

    return {"shared": encode(shared), "nodes": {n: encode(t) for n, t in nodes.items()}}


def published_state(history: dict[str, list[bytes]], cluster: str, address: str) -> bytes | None:
    """The first version of ``cluster``'s ClusterLoadAssignment that holds an endpoint at ``address``
    (matched with its length prefix, so 10.250.0.1 is not found in 10.250.0.10)."""
    key = bytes([len(address)]) + address.encode()
    return next((b for b in history.get(cluster, []) if key in b), None)


def _seeded(endpoints: dict[str, bytes], services: int, per_service: int) -> bool:
    """Whether ``endpoints`` (ClusterLoadAssignments by name) hold every seeded service in full."""
    full = sum(1 for raw in endpoints.values()
               if sum(len(lo.lb_endpoints) for lo in endpoint_pb2.ClusterLoadAssignment.FromString(raw).endpoints) >= per_service)
    return full >= services


def _listener_names(listener_bytes: bytes) -> dict[str, set[str]]:
    """The route configurations (RDS) and filter configurations (ECDS) a listener's HTTP connection
    managers name."""
    listener = listener_pb2.Listener.FromString(listener_bytes)
    names: dict[str, set[str]] = {TYPE.ROUTE: set(), TYPE.EXTENSION_CONFIG: set()}
    chains = list(listener.filter_chains) + ([listener.default_filter_chain] if listener.HasField("default_filter_chain") else [])
    for chain in chains:
        for f in chain.filters:
            if f.typed_config.type_url == _HCM:
                hcm = http_connection_manager_pb2.HttpConnectionManager.FromString(f.typed_config.value)
                if hcm.HasField("rds"):
                    names[TYPE.ROUTE].add(hcm.rds.route_config_name)
                for hf in hcm.http_filters:
                    if hf.HasField("config_discovery"):
                        names[TYPE.EXTENSION_CONFIG].add(hf.name)
    return names


def _eds_names(cluster_bytes: bytes) -> set[str]:
    c = cluster_pb2.Cluster.FromString(cluster_bytes)
    if c.HasField("type") and c.type == cluster_pb2.Cluster.EDS:
        return {c.eds_cluster_config.service_name or c.name}
    return set()


# ---- reading what meshpilot serves ---------------------------------------------------------------


@dataclass
class _Capture:
    """One delta ADS stream as ``node``: the latest bytes of every resource of the given wildcard
    types (clusters, listeners) and of the endpoints and routes they name."""

    node: base_pb2.Node
    wildcard: tuple[str, ...]
    follow: bool = True  # subscribe to the endpoints of the clusters and the routes of the listeners
    latest: dict[str, dict[str, bytes]] = field(default_factory=dict)
    endpoint_history: dict[str, list[bytes]] = field(default_factory=dict)  # every version of each ClusterLoadAssignment
    wanted: dict[str, set[str]] = field(default_factory=dict)
    answered: set[str] = field(default_factory=set)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    received: list[tuple[float, str, str, int]] = field(default_factory=list)  # (time, type, nonce, resources)
    ended: str = ""  # why the stream ended, once it has

    def complete(self) -> bool:
        return all(t in self.answered for t in self.wildcard) and all(
            names <= set(self.latest.get(t, {})) for t, names in self.wanted.items()
        )

    async def run(self, channel: grpc.aio.Channel) -> None:
        try:
            await self._run(channel)
            self.ended = "the control plane ended the stream"
        except asyncio.CancelledError:
            self.ended = "cancelled"
            raise
        except Exception as exc:
            self.ended = repr(exc)
            raise
        finally:
            self.changed.set()

    async def _run(self, channel: grpc.aio.Channel) -> None:
        req = discovery_pb2.DeltaDiscoveryRequest
        call = channel.stream_stream(_DELTA, request_serializer=req.SerializeToString,
                                     response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString)()
        for t in self.wildcard:
            await call.write(req(node=self.node, type_url=t))
        while True:
            resp = await call.read()
            if not isinstance(resp, discovery_pb2.DeltaDiscoveryResponse):
                return
            t = resp.type_url
            self.received.append((time.time(), t.rsplit(".", 1)[-1], resp.nonce, len(resp.resources)))
            held = self.latest.setdefault(t, {})
            for r in resp.resources:
                held[r.name] = r.resource.value
                if t == TYPE.ENDPOINT:
                    self.endpoint_history.setdefault(r.name, []).append(r.resource.value)
            for name in resp.removed_resources:
                held.pop(name, None)
            # meshpilot records a response as owed only once its write returns, so an answer that
            # arrives first is not counted and the stream is aborted 30 s later: answer a little later
            await asyncio.sleep(_ANSWER_DELAY_S)
            await call.write(req(type_url=t, response_nonce=resp.nonce))
            if self.follow and t in (TYPE.CLUSTER, TYPE.LISTENER):
                named: dict[str, set[str]] = {}
                for r in resp.resources:
                    found = {TYPE.ENDPOINT: _eds_names(r.resource.value)} if t == TYPE.CLUSTER else _listener_names(r.resource.value)
                    for sub_type, names in found.items():
                        named.setdefault(sub_type, set()).update(names)
                for sub_type, names in named.items():
                    new = names - self.wanted.get(sub_type, set())
                    if new:
                        self.wanted.setdefault(sub_type, set()).update(new)
                        await call.write(req(type_url=sub_type, resource_names_subscribe=sorted(new)))
            self.answered.add(t)
            self.changed.set()

    async def wait(self, done: Callable[[], bool], timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not done():
                    if self.ended:
                        raise RuntimeError(f"node {self.node.id}: the stream ended ({self.ended}); last responses {self.received[-5:]}")
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise TimeoutError(f"node {self.node.id}: not there after {timeout} s; last responses {self.received[-5:]}") from None


# ---- Envoys that say when they apply an update ----------------------------------------------------


@dataclass
class _Envoy:
    bootstrap: dict[str, Any]
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    admin: str = ""
    events: list[Membership] = field(default_factory=list)
    _offset: int = 0
    _partial: bytes = b""

    @property
    def log_path(self) -> Path:
        return self.workdir / "envoy.log"

    def start(self, timeout: float) -> None:
        from meshpilot.wasm.testbed import envoy_binary

        self.workdir.mkdir(parents=True, exist_ok=True)
        config, admin_file = self.workdir / "envoy.json", self.workdir / "admin.txt"
        config.write_text(json.dumps(self.bootstrap))
        admin_file.unlink(missing_ok=True)
        cmd = [envoy_binary(), "-c", str(config), "--use-dynamic-base-id", "--admin-address-path", str(admin_file),
               "--concurrency", "1", "-l", "warning", "--component-log-level", "upstream:debug",
               "--log-format", LOG_FORMAT, "--disable-hot-restart"]
        with open(self.log_path, "wb") as log:  # stderr: Envoy's file sink flushes only every few seconds
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not (admin_file.exists() and admin_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Envoy did not start; log: {self.log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        self.admin = admin_file.read_text().strip()

    def read_log(self) -> None:
        """Parse what Envoy logged since the last call."""
        with open(self.log_path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if b"membership update" in line or b"EDS hosts" in line:
                e = parse_membership(line.decode(errors="replace"))
                if e is not None:
                    self.events.append(e)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop(self.proc)


# ---- the go-control-plane peer --------------------------------------------------------------------


def gcp_peer_binary(cache: Path) -> Path:
    """The peer, built from ``gcp_peer/`` with the Go toolchain unless a build newer than its sources is cached."""
    return go_binary(_GO_SOURCES, cache, "gcppeer", "--peer go-control-plane (the go-control-plane peer)")


def _start_peer(binary: Path, resources: Path, workdir: Path) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    ready, log_path = workdir / "gcp-ready.json", workdir / "gcp-peer.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(binary), "-resources", str(resources), "-ready-file", str(ready)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the go-control-plane peer did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        return proc, json.loads(ready.read_text())
    except BaseException:
        stop(proc)
        raise


# ---- one peer's turn -----------------------------------------------------------------------------


_Write = Callable[[ClientSession, str, int, str], Awaitable[None]]  # (session, phase, n, service)


def _say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def _cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


async def _until_applied(args: argparse.Namespace, envoys: list[_Envoy], cluster: str, since: float,
                         timeout: float) -> list[float | None]:
    """Each Envoy's stamp of applying a change of ``cluster`` from ``since`` on (None: not within ``timeout``)."""
    got: list[float | None] = [None] * len(envoys)
    deadline = time.monotonic() + timeout
    while True:
        for i, e in enumerate(envoys):
            if got[i] is None:
                e.read_log()
                got[i] = applied_at(e.events, cluster, since)
        if all(g is not None for g in got) or time.monotonic() > deadline:
            return got
        await asyncio.sleep(args.poll)


async def _turn(args: argparse.Namespace, envoys: list[_Envoy], pid: int, clusters: dict[str, str], write: _Write) -> dict[str, Any]:
    """The change sequence against running, synced Envoys; ``pid`` is the control plane's process."""
    services = args.services
    async with ClientSession() as s:
        last_envoy: list[float] = []
        every: list[float] = []
        late = 0
        await asyncio.sleep(1.0)
        c0, w0 = _cpu(pid), time.monotonic()
        await asyncio.sleep(2.0)
        idle_cpu_per_s = (_cpu(pid) - c0) / (time.monotonic() - w0)
        c0, w0 = _cpu(pid), time.monotonic()
        members = {f"svc{i}": args.endpoints for i in range(services)}
        for r in range(args.rounds):
            svc = f"svc{(7 * r) % services}"
            members[svc] += 1
            t0 = time.time()
            await write(s, "single", r, svc)
            got = await _until_applied(args, envoys, clusters[svc], t0, args.round_timeout)
            done = [g - t0 for g in got if g is not None]
            late += len(got) - len(done)
            every.extend(done)
            last_envoy.append(max(done) if len(done) == len(got) else args.round_timeout)
            _say(f"  change {r} ({svc}): last Envoy {last_envoy[-1]:.4f} s")
            await asyncio.sleep(args.gap)
        single_cpu = _cpu(pid) - c0 - idle_cpu_per_s * (time.monotonic() - w0)

        c0, w0 = _cpu(pid), time.monotonic()
        t_first = time.time()
        t_last = t_first
        for n in range(args.burst):
            members[f"svc{n % services}"] += 1
            t_last = time.time()  # the last write's start: the peer's answer may come after Envoy applied it
            await write(s, "burst", n, f"svc{n % services}")
        t_written = time.time()
        last_svc = f"svc{(args.burst - 1) % services}"
        got = await _until_applied(args, envoys, clusters[last_svc], t_first, args.round_timeout * 3)
        burst_done = [g - t_last for g in got if g is not None]
        await asyncio.sleep(1.5)  # room for late work to be counted
        burst_cpu = _cpu(pid) - c0 - idle_cpu_per_s * (time.monotonic() - w0)
        check = await asyncio.gather(*(_envoy_stats(s, e.admin, last_svc) for e in envoys))
        holds = sum(1 for st in check if st.get("members") == members[last_svc])
    return {
        "single_change": {
            "rounds": args.rounds,
            "write_to_last_envoy_applied": _percentiles(last_envoy),
            "write_to_each_envoy_applied": _percentiles(every),
            "envoy_rounds_timed_out": late,
            "cpu_seconds_per_change": round(single_cpu / max(1, args.rounds), 4),
            "samples": {"write_to_last_envoy_applied_s": _rounded(last_envoy), "write_to_each_envoy_applied_s": _rounded(every)},
        },
        "burst": {
            "changes": args.burst,
            "write_seconds": round(t_written - t_first, 3),
            "last_write_to_last_envoy_applied": round(max(burst_done), 4) if len(burst_done) == len(envoys) else None,
            "cpu_seconds": round(burst_cpu, 3),
            "cpu_seconds_per_change": round(burst_cpu / max(1, args.burst), 5),
            "envoys_holding_last_change": holds,
        },
        "idle_cpu_per_second": round(idle_cpu_per_s, 4),
    }


async def _start_envoys(args: argparse.Namespace, options: list[BootstrapOptions], workdir: Path, xds_port: int,
                        envoys: list[_Envoy], last_cluster: str) -> float:
    """Start one Envoy per bootstrap, ADS to ``xds_port`` (appended to ``envoys`` as each starts), and
    wait until each holds every cluster with its endpoints; the seconds that took."""
    t = time.monotonic()
    for i, o in enumerate(options):
        e = _Envoy(build_bootstrap(dataclasses.replace(o, control_plane_port=xds_port)), workdir / f"envoy-{i}")
        envoys.append(e)
        await asyncio.to_thread(e.start, 30.0)
    async with ClientSession() as s:
        svc = last_cluster

        async def synced(e: _Envoy) -> None:
            while True:
                st = await _envoy_stats(s, e.admin, svc)
                if st.get("members") == args.endpoints and st.get(_WARMING, 1) == 0:
                    return
                await asyncio.sleep(0.2)

        async with asyncio.timeout(600):
            await asyncio.gather(*(synced(e) for e in envoys))
    return time.monotonic() - t


async def run(args: argparse.Namespace, delta: bool) -> dict[str, Any]:
    from meshpilot.wasm.testbed import free_port

    if args.burst > args.services:
        raise SystemExit("--peer: --burst must be at most --services (each burst change is a state meshpilot published)")
    if args.rounds > 1000 or args.burst > 60000:
        raise SystemExit("--peer: at most 1,000 --rounds and 60,000 --burst (each change's address is unique)")
    binary = await asyncio.to_thread(gcp_peer_binary, Path.home() / ".cache" / "meshpilot" / "gcp-peer")
    with control_plane("meshpilot-perf-peer-") as cp:
        api, workdir = cp.api, cp.workdir
        t = time.monotonic()
        await seed(api, args.services, args.endpoints)
        seed_s = time.monotonic() - t
        options = [
            BootstrapOptions(node_id=f"peer-{i}", service="peer", control_plane_port=cp.ports["xds"],
                             api_type="DELTA_GRPC" if delta else "GRPC", admin_port=0, outbound_port=free_port(), inbound_port=0)
            for i in range(args.envoys)
        ]
        bootstraps = [build_bootstrap(o) for o in options]
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{cp.ports['xds']}", options=[("grpc.max_receive_message_length", 1 << 30)])
        tasks: list[asyncio.Task[None]] = []
        envoys: list[_Envoy] = []
        peer: subprocess.Popen[bytes] | None = None
        try:
            # what meshpilot serves, once it has published the seed: the shared clusters and endpoints,
            # then each node's listeners and routes
            record_node = json_format.ParseDict({**bootstraps[0]["node"], "id": "peer-recorder"}, base_pb2.Node())
            recorder = _Capture(record_node, (TYPE.CLUSTER,))
            tasks.append(asyncio.create_task(recorder.run(channel)))
            await recorder.wait(lambda: recorder.complete() and _seeded(recorder.latest.get(TYPE.ENDPOINT, {}), args.services, args.endpoints), 300)
            shared = {t: dict(v) for t, v in recorder.latest.items()}
            nodes: dict[str, dict[str, dict[str, bytes]]] = {}
            for boot in bootstraps:
                node = json_format.ParseDict(boot["node"], base_pb2.Node())
                cap = _Capture(node, (TYPE.LISTENER,))
                task = asyncio.create_task(cap.run(channel))
                try:
                    await cap.wait(cap.complete, 60)
                finally:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                nodes[node.id] = {t: dict(v) for t, v in cap.latest.items()}
            clusters = {_service_of(n): n for n in shared[TYPE.ENDPOINT]}
            res_path = workdir / "gcp-resources.json"
            res_path.write_text(json.dumps(resources_file(shared, nodes)))
            last_cluster = f"svc{args.services - 1}"

            # meshpilot's turn; the recorder keeps every ClusterLoadAssignment it publishes
            async def write_meshpilot(s: ClientSession, phase: str, n: int, svc: str) -> None:
                body = {"id": f"{phase}-{n}", "address": _marker(phase, n), "ports": {"http": 8080}}
                async with s.post(f"{api}/v1/services/default/{svc}/instances", json=body) as resp:
                    if resp.status != 201:
                        raise RuntimeError(f"registering {body['id']}: expected 201, got {resp.status} {await resp.text()}")

            _say(f"meshpilot: {args.envoys} Envoys")
            sync_mp = await _start_envoys(args, options, workdir / "meshpilot", cp.ports["xds"], envoys, last_cluster)
            _say(f"meshpilot: synced in {sync_mp:.1f} s; changes")
            mp = await _turn(args, envoys, cp.proc.pid, clusters, write_meshpilot)
            for e in envoys:
                e.stop()
            envoys.clear()
            changes = [("single", r, f"svc{(7 * r) % args.services}") for r in range(args.rounds)]
            changes += [("burst", n, f"svc{n % args.services}") for n in range(args.burst)]
            await recorder.wait(lambda: all(published_state(recorder.endpoint_history, clusters[svc], _marker(phase, n)) is not None
                                            for phase, n, svc in changes), 60)
            published = {(phase, n): published_state(recorder.endpoint_history, clusters[svc], _marker(phase, n)) or b""
                         for phase, n, svc in changes}

            # the peer's turn: the same Envoys, the same changes, the bytes meshpilot published
            started, peer_ports = await asyncio.to_thread(_start_peer, binary, res_path, workdir)
            peer = started
            control = f"http://127.0.0.1:{peer_ports['control']}/update"

            async def write_peer(s: ClientSession, phase: str, n: int, svc: str) -> None:
                body = {"shared": {TYPE.ENDPOINT: [base64.b64encode(published[(phase, n)]).decode()]}}
                async with s.post(control, json=body) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"peer update {phase}-{n}: expected 200, got {resp.status} {await resp.text()}")

            _say(f"go-control-plane: {args.envoys} Envoys")
            sync_gcp = await _start_envoys(args, options, workdir / "gcp", peer_ports["xds"], envoys, last_cluster)
            _say(f"go-control-plane: synced in {sync_gcp:.1f} s; changes")
            gcp = await _turn(args, envoys, started.pid, clusters, write_peer)
        finally:
            for e in envoys:
                e.stop()
            if peer is not None:
                stop(peer)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await channel.close()
    return {
        "variant": "delta" if delta else "sotw",
        "envoys": args.envoys,
        "services": args.services,
        "endpoints_per_service": args.endpoints,
        "seed_seconds": round(seed_s, 2),
        "workdir": str(workdir),  # each Envoy's log, the peer's resources file and log
        "peers": {
            "meshpilot": {"initial_sync_seconds": round(sync_mp, 2), **mp},
            "go-control-plane": {"initial_sync_seconds": round(sync_gcp, 2), **gcp},
        },
    }


def _marker(phase: str, n: int) -> str:
    return _marker_address(n if phase == "single" else 1000 + n)


def _service_of(cluster: str) -> str:
    """``svc3`` from ``outbound|80||svc3.default.svc.mesh``."""
    return cluster.split("||", 1)[-1].split(".", 1)[0]


async def _cancelled_by_sigterm(work: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """``work``, cancelled (so every process it started is stopped) on SIGTERM."""
    task = asyncio.ensure_future(work)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await task


def main(args: argparse.Namespace) -> int:
    results = []
    for v in [x.strip() for x in args.variants.split(",") if x.strip()]:
        if v not in ("delta", "sotw"):
            print(f"meshpilot perf xds-envoys: unknown variant {v!r} (delta, sotw)", file=sys.stderr)
            return 2
        results.append(uvloop.run(_cancelled_by_sigterm(run(args, v == "delta"))))
    print(json.dumps({"benchmark": "xds_peer_real_envoys", "machine_cpus": os.cpu_count(), "results": results}, indent=2))
    for r in results:
        for name, p in r["peers"].items():
            sc, b = p["single_change"], p["burst"]
            w = sc["write_to_last_envoy_applied"]
            print(f"[{r['variant']}] {name}: {r['envoys']} Envoys {r['services']}x{r['endpoints_per_service']}: single change write->last Envoy "
                  f"applied p50 {w['p50']} p99 {w['p99']} max {w['max']} s, CPU {sc['cpu_seconds_per_change']} s/change "
                  f"({sc['envoy_rounds_timed_out']} Envoy-rounds late); burst of {b['changes']}: last write->last Envoy "
                  f"{b['last_write_to_last_envoy_applied']} s, CPU {b['cpu_seconds']} s", file=sys.stderr)
        mp, gcp = (r["peers"][n]["single_change"]["write_to_last_envoy_applied"] for n in ("meshpilot", "go-control-plane"))
        print(f"[{r['variant']}] go-control-plane / meshpilot single change p99: {gcp['p99'] / mp['p99']:.1f}x", file=sys.stderr)
    return 0
