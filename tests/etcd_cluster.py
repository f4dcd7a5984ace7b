"""A real etcd cluster for tests: N members of /usr/bin/etcd on 127.0.0.1, data in a temporary folder.

``with etcd_cluster(tmp, members=3) as cluster:`` starts every member with ports chosen by the OS,
waits until each one serves (``/health`` says true: it has a leader), and stops them all on exit,
even when the test failed. ``cluster.url`` is the store URL (``etcd://127.0.0.1:P1,...``);
``kill(i)`` (SIGKILL), ``stop(i)`` (SIGTERM), ``freeze(i)``/``thaw(i)`` (SIGSTOP/SIGCONT) and
``start(i)`` (again, with its data) act on one member. fsync stays on: durability is what the
store tests measure. Short heartbeats and elections keep failovers quick.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.support import free_port

ETCD = "/usr/bin/etcd"
HEARTBEAT_MS = 50
ELECTION_MS = 500


class PortTaken(Exception):
    """A port chosen for a member was taken before the member bound it (another process's outgoing
    connection, often one of the other members')."""


class Member:
    def __init__(self, name: str, data: Path, client_port: int, peer_port: int) -> None:
        self.name = name
        self.data = data
        self.client_port = client_port
        self.peer_port = peer_port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.client_url}/health", timeout=1) as r:
                return b'"health":"true"' in r.read()
        except OSError:
            return False


class EtcdCluster:
    def __init__(self, workdir: Path, members: int) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.members = [Member(f"m{i}", workdir / f"m{i}", free_port(), free_port()) for i in range(members)]
        self.token = f"meshpilot-test-{os.getpid()}-{time.monotonic_ns()}"

    @property
    def url(self) -> str:
        return "etcd://" + ",".join(f"127.0.0.1:{m.client_port}" for m in self.members)

    def start(self, i: int, wait: bool = True) -> None:
        m = self.members[i]
        if m.proc is not None and m.proc.poll() is None:
            return
        initial = ",".join(f"{o.name}={o.peer_url}" for o in self.members)
        log = open(self.workdir / f"{m.name}.log", "ab")
        try:
            m.proc = subprocess.Popen([
                ETCD, "--name", m.name, "--data-dir", str(m.data),
                "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
                "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
                "--initial-cluster", initial, "--initial-cluster-token", self.token,
                "--initial-cluster-state", "new",
                "--heartbeat-interval", str(HEARTBEAT_MS), "--election-timeout", str(ELECTION_MS),
                "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
            ], stdout=log, stderr=log)
        finally:
            log.close()
        if wait:
            self.wait_healthy([i])

    def wait_healthy(self, which: list[int] | None = None, timeout: float = 20.0) -> None:
        which = list(range(len(self.members))) if which is None else which
        deadline = time.monotonic() + timeout
        for i in which:
            m = self.members[i]
            while not m.healthy():
                if m.proc is not None and m.proc.poll() is not None:
                    if "address already in use" in self.log(i):
                        raise PortTaken(m.name)
                    raise AssertionError(f"etcd member {m.name} exited with {m.proc.returncode}; its log:\n"
                                         + self.log(i)[-3000:])
                if time.monotonic() > deadline:
                    raise AssertionError(f"etcd member {m.name} not healthy within {timeout}s; its log:\n"
                                         + self.log(i)[-3000:])
                time.sleep(0.05)

    def log(self, i: int) -> str:
        p = self.workdir / f"{self.members[i].name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def kill(self, i: int) -> None:
        self._signal(i, signal.SIGKILL)

    def stop(self, i: int) -> None:
        self._signal(i, signal.SIGTERM)

    def wipe(self, i: int) -> None:
        """Stop member ``i`` and remove its data: started again, it is a new, empty etcd (as one
        restored from an old snapshot, its revisions start again lower)."""
        self.stop(i)
        shutil.rmtree(self.members[i].data, ignore_errors=True)

    def freeze(self, i: int) -> None:
        p = self.members[i].proc
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGSTOP)

    def thaw(self, i: int) -> None:
        p = self.members[i].proc
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGCONT)

    def _signal(self, i: int, sig: int) -> None:
        p = self.members[i].proc
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGCONT)  # a frozen member would not act on SIGTERM
        p.send_signal(sig)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def close(self) -> None:
        for i in range(len(self.members)):
            self.kill(i)


@contextlib.contextmanager
def etcd_cluster(workdir: Path, members: int = 1) -> Iterator[EtcdCluster]:
    for attempt in range(4):  # the ports are free when chosen; one may be taken before etcd binds it
        cluster = EtcdCluster(workdir / f"cluster{attempt}", members)
        try:
            for i in range(members):
                cluster.start(i, wait=False)  # together: a member waits for the others to elect a leader
            cluster.wait_healthy()
        except PortTaken:
            cluster.close()
            continue
        except BaseException:
            cluster.close()
            raise
        try:
            yield cluster
        finally:
            cluster.close()
        return
    raise AssertionError(f"could not start a {members}-member etcd cluster: a chosen port was taken each time")


def etcd_range(url: str, prefix: str) -> dict[str, bytes]:
    """What etcd itself holds under ``prefix`` (key -> raw value), read past any store."""
    import grpc
    from aetcd.rpc import rpc_pb2, rpc_pb2_grpc  # type: ignore[import-untyped]

    target = "ipv4:" + url.removeprefix("etcd://").split("/", 1)[0]
    with grpc.insecure_channel(target) as channel:
        pfx = prefix.encode()
        resp = rpc_pb2_grpc.KVStub(channel).Range(
            rpc_pb2.RangeRequest(key=pfx, range_end=pfx[:-1] + bytes([pfx[-1] + 1])), timeout=10, wait_for_ready=True)
        return {kv.key.decode(): kv.value for kv in resp.kvs}


def etcd_compact(url: str) -> int:
    """Compact etcd's history up to its current revision; return that revision."""
    import grpc
    from aetcd.rpc import rpc_pb2, rpc_pb2_grpc

    target = "ipv4:" + url.removeprefix("etcd://").split("/", 1)[0]
    with grpc.insecure_channel(target) as channel:
        kv = rpc_pb2_grpc.KVStub(channel)
        rev = int(kv.Range(rpc_pb2.RangeRequest(key=b"\0", count_only=True), timeout=10, wait_for_ready=True).header.revision)
        kv.Compact(rpc_pb2.CompactionRequest(revision=rev, physical=True), timeout=10, wait_for_ready=True)
        return rev
