"""Proxyless gRPC clients (grpcio and @grpc/grpc-js-xds) resolve mesh services over meshpilot's xDS.

Each test starts the control plane, two real grpcio echo servers (versions v1 and v2) registered as
instances of one mesh service, and a client process with an ``xds:///echo:<port>`` target. The
weight-change tests check that a RoutingPolicy split holds within ±5 percentage points over 2,000
calls, and that a change (90/10 → 10/90) is followed within 1 s.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support import ROOT, control_plane, tmpdir, wait_until


HERE = Path(__file__).resolve().parent / "proxyless"
NODE_DIR = ROOT / "var" / "node-xds"
SERVICE_PORT = 50051  # the port callers put in the target; instances listen on OS-chosen ports
CALLS = 2000
TOLERANCE = 5.0  # percentage points
FOLLOW_S = 1.0


# ---- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def echo_gen() -> Path:
    """echo.proto compiled with grpcio-tools into a scratch directory."""
    from grpc_tools import protoc

    out = tmpdir("meshpilot-echo-gen-")
    code = protoc.main(["protoc", f"-I{HERE}", f"--python_out={out}", f"--grpc_python_out={out}", str(HERE / "echo.proto")])
    assert code == 0, f"expected protoc to compile echo.proto (exit 0), got exit {code}"
    return out


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """@grpc/grpc-js-xds installed with npm into var/node-xds (git-ignored), once."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed on this machine, so @grpc/grpc-js-xds cannot be installed")
    modules = NODE_DIR / "node_modules"
    wanted = ["@grpc/grpc-js", "@grpc/grpc-js-xds", "@grpc/proto-loader"]
    if not all((modules / w / "package.json").exists() for w in wanted):
        NODE_DIR.mkdir(parents=True, exist_ok=True)
        pkg = NODE_DIR / "package.json"
        if not pkg.exists():
            pkg.write_text(json.dumps({"name": "meshpilot-xds-interop", "private": True}))
        proc = subprocess.run([npm, "install", "--no-audit", "--no-fund", *wanted], cwd=NODE_DIR, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            pytest.skip(f"npm could not install {', '.join(wanted)} (exit {proc.returncode}): {proc.stderr[-500:]}")
    return modules


@contextlib.contextmanager
def echo_server(gen: Path, name: str) -> Iterator[int]:
    """A real grpcio server on 127.0.0.1 whose replies carry ``name``; yields its port."""
    if str(gen) not in sys.path:
        sys.path.insert(0, str(gen))
    import echo_pb2
    import echo_pb2_grpc

    class Servicer(echo_pb2_grpc.EchoServicer):
        def Call(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
            return echo_pb2.EchoReply(server=name, message=request.message)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    echo_pb2_grpc.add_EchoServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


class Mesh:
    """Control plane + two echo versions registered as service ``echo``."""

    def __init__(self, cp: Any, workdir: Path) -> None:
        self.cp = cp
        self.workdir = workdir
        self.split_at = 0.0  # when the last split was made (time.time())

    def call(self, method: str, path: str, body: Any = None) -> Any:
        status, data = self.cp.call(method, path, body)
        assert status < 300, f"expected {method} {path} to succeed, got {status}: {data}"
        return data

    def split(self, v1: int, v2: int) -> None:
        policy = {
            "service": "echo",
            "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}],
            "routes": [{"destinations": [{"subset": "v1", "weight": v1}, {"subset": "v2", "weight": v2}]}],
        }
        self.split_at = time.time()
        self.call("PUT", "/v1/policies/RoutingPolicy/default/echo-split", policy)

    def bootstrap(self, node: str) -> Path:
        path = self.workdir / f"{node}-bootstrap.json"
        path.write_text(
            json.dumps(
                {
                    "xds_servers": [
                        {"server_uri": f"127.0.0.1:{self.cp.xds_port}", "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}
                    ],
                    "node": {"id": node, "cluster": "proxyless", "metadata": {"PROXYLESS": True}, "locality": {"zone": ""}},
                }
            )
        )
        return path


@pytest.fixture
def mesh(echo_gen: Path) -> Iterator[Mesh]:
    workdir = tmpdir("meshpilot-proxyless-")
    with control_plane(workdir) as cp, echo_server(echo_gen, "v1") as p1, echo_server(echo_gen, "v2") as p2:
        m = Mesh(cp, workdir)
        m.call("POST", "/v1/services", {"name": "echo", "ports": [{"name": "grpc", "port": SERVICE_PORT, "protocol": "grpc"}]})
        for name, port in (("v1", p1), ("v2", p2)):
            m.call(
                "POST",
                "/v1/services/default/echo/instances",
                {"id": f"echo-{name}", "address": "127.0.0.1", "ports": {"grpc": port}, "labels": {"version": name}},
            )
        yield m


class CallLog:
    """A client process's output lines, ``<unix time> <outcome>``, collected by a reader thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.calls: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            ts, _, outcome = line.strip().partition(" ")
            try:
                with self._lock:
                    self.calls.append((float(ts), outcome))
            except ValueError:
                continue

    def since(self, t: float) -> list[str]:
        with self._lock:
            return [o for ts, o in self.calls if ts >= t]

    def count_since(self, t: float) -> int:
        return len(self.since(t))


@contextlib.contextmanager
def client(cmd: list[str], bootstrap: Path, workdir: Path, name: str, env_extra: dict[str, str] | None = None) -> Iterator[CallLog]:
    import os

    env = {**os.environ, "GRPC_XDS_BOOTSTRAP": str(bootstrap), **(env_extra or {})}
    stderr = open(workdir / f"{name}.stderr", "w")
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    log = CallLog(proc)
    try:
        yield log
    finally:
        try:
            if proc.stdin:
                proc.stdin.close()
            proc.wait(5)
        except (subprocess.TimeoutExpired, OSError):
            proc.kill()
            proc.wait()
        stderr.close()


def _share(outcomes: list[str]) -> dict[str, float]:
    c = Counter(outcomes)
    return {k: 100.0 * v / len(outcomes) for k, v in sorted(c.items())}


def _follow_weight_change(mesh: Mesh, log: CallLog, name: str) -> None:
    def stderr_tail() -> str:
        p = mesh.workdir / f"{name}.stderr"
        text = p.read_text()[-2000:] if p.exists() else ""
        return f"(client exit code {log.proc.poll()}) {text}"

    # the first successful call marks the client as resolved; a client that connects while the split is being
    # published may see the routes before it for a moment (new subsets go out before the routes that use
    # them), so the split is measured from FOLLOW_S after it was made, as the change below is
    resolved = wait_until(lambda: next((ts for ts, o in list(log.calls) if not o.startswith("error")), None), 30, what=f"{name}: a first successful call")
    first = max(resolved, mesh.split_at + FOLLOW_S)
    wait_until(lambda: log.count_since(first) >= CALLS or log.proc.poll() is not None, 60, what=f"{name}: {CALLS} calls")
    before = log.since(first)[:CALLS]
    assert len(before) == CALLS, f"{name}: expected {CALLS} calls, got {len(before)}; client stderr: {stderr_tail()}"
    share = _share(before)
    assert abs(share.get("v1", 0) - 90) <= TOLERANCE and abs(share.get("v2", 0) - 10) <= TOLERANCE, (
        f"{name}: expected v1 90% / v2 10% (±{TOLERANCE}) over {CALLS} calls, got {share}"
    )

    changed_at = time.time()
    mesh.split(10, 90)
    settled = changed_at + FOLLOW_S
    wait_until(lambda: log.count_since(settled) >= CALLS or log.proc.poll() is not None, 60, what=f"{name}: {CALLS} calls after the change")
    after = log.since(settled)[:CALLS]
    assert len(after) == CALLS, f"{name}: expected {CALLS} calls after the change, got {len(after)}; client stderr: {stderr_tail()}"
    share = _share(after)
    assert abs(share.get("v1", 0) - 10) <= TOLERANCE and abs(share.get("v2", 0) - 90) <= TOLERANCE, (
        f"{name}: expected v1 10% / v2 90% (±{TOLERANCE}) over {CALLS} calls starting {FOLLOW_S}s after the change, got {share}"
    )
    # in the first second the split moves: 100 calls ending at the 1 s mark are already mostly v2
    window = [o for ts, o in log.calls if changed_at <= ts < settled][-100:]
    assert window and _share(window).get("v2", 0) >= 70, f"{name}: expected the calls just before the 1 s mark to be mostly v2, got {_share(window) if window else 'no calls'}"


# ---- tests ----------------------------------------------------------------------------------------


def test_grpcio_follows_weight_change(mesh: Mesh, echo_gen: Path) -> None:
    mesh.split(90, 10)
    cmd = [sys.executable, str(HERE / "client.py"), str(echo_gen), f"echo:{SERVICE_PORT}", "120"]
    with client(cmd, mesh.bootstrap("grpcio-client"), mesh.workdir, "grpcio") as log:
        _follow_weight_change(mesh, log, "grpcio")


def test_grpc_js_xds_follows_weight_change(mesh: Mesh, node_modules: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed on this machine")
    mesh.split(90, 10)
    cmd = [node, str(HERE / "client.js"), str(HERE / "echo.proto"), f"echo:{SERVICE_PORT}", "120"]
    with client(cmd, mesh.bootstrap("grpc-js-client"), mesh.workdir, "grpc-js-xds", {"NODE_XDS_MODULES": str(node_modules)}) as log:
        _follow_weight_change(mesh, log, "grpc-js-xds")


def test_grpcio_fault_injection_and_route_timeout(mesh: Mesh, echo_gen: Path) -> None:
    base = {"service": "echo", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}
    abort = {**base, "routes": [{"destinations": [{"subset": "v1"}], "fault": {"abort": {"percent": 50, "grpc_status": 8}}}]}
    made_at = time.time()
    mesh.call("PUT", "/v1/policies/RoutingPolicy/default/echo-faults", abort)
    cmd = [sys.executable, str(HERE / "client.py"), str(echo_gen), f"echo:{SERVICE_PORT}", "120"]
    with client(cmd, mesh.bootstrap("grpcio-faults"), mesh.workdir, "grpcio-faults") as log:
        # measured from FOLLOW_S after the policy was made: a client that connects while it is published may
        # see the routes before it for a moment (its new subset goes out before the routes that use it)
        answered = wait_until(lambda: next((ts for ts, o in list(log.calls) if o == "v1"), None), 30, what="a first call answered by v1")
        first = max(answered, made_at + FOLLOW_S)
        wait_until(lambda: log.count_since(first) >= 400 or log.proc.poll() is not None, 60, what="400 calls")
        share = _share(log.since(first)[:400])
        assert abs(share.get("error:RESOURCE_EXHAUSTED", 0) - 50) <= 10 and abs(share.get("v1", 0) - 50) <= 10, (
            f"expected about half the calls aborted with RESOURCE_EXHAUSTED and half on v1 (±10), got {share}"
        )
        slow = {**base, "routes": [{"destinations": [{"subset": "v1"}], "timeout_ms": 200, "fault": {"delay": {"percent": 100, "fixed_delay_ms": 1000}}}]}
        changed_at = time.time()
        mesh.call("PUT", "/v1/policies/RoutingPolicy/default/echo-faults", slow)
        wait_until(lambda: log.count_since(changed_at + FOLLOW_S) >= 5 or log.proc.poll() is not None, 30, what="5 calls after the change")
        outcomes = log.since(changed_at + FOLLOW_S)[:5]
        assert outcomes == ["error:DEADLINE_EXCEEDED"] * 5, f"expected a 1 s injected delay to hit the 200 ms route timeout on every call, got {outcomes}"


# ---- make before break: policy create / update / delete under load --------------------------------

GO_CLIENT_DIR = HERE / "goclient"
POLICY_CYCLES = 5
PHASE_S = 1.0


@pytest.fixture(scope="session")
def go_client() -> Path:
    """The grpc-go client (tests/interop/proxyless/goclient) built into var/go-xds, once per session;
    modules come from the Go module proxy."""
    go = shutil.which("go") or next((p for p in ("/usr/local/go/bin/go",) if Path(p).exists()), None)
    if go is None:
        pytest.skip("Go is not installed on this machine (no `go` on PATH or at /usr/local/go/bin/go)")
    out = ROOT / "var" / "go-xds" / "goclient"
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([go, "build", "-o", str(out), "."], cwd=GO_CLIENT_DIR, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"expected the grpc-go client to build (exit 0), got exit {proc.returncode}: {proc.stderr[-2000:]}"
    return out


def _cycle_policies(mesh: Mesh, log: CallLog, name: str) -> None:
    """Create a split, move it, delete it, POLICY_CYCLES times, while the client calls steadily;
    every call must succeed, and the split must be followed."""
    first = wait_until(lambda: next((ts for ts, o in list(log.calls) if not o.startswith("error")), None), 30, what=f"{name}: a first successful call")
    phases: list[tuple[float, str]] = []
    for _ in range(POLICY_CYCLES):
        for phase, action in (
            ("create", lambda: mesh.split(100, 0)),
            ("update", lambda: mesh.split(0, 100)),
            ("delete", lambda: mesh.call("DELETE", "/v1/policies/RoutingPolicy/default/echo-split")),
        ):
            started = time.time()
            phases.append((started, phase))
            action()
            wait_until(lambda: log.count_since(started + PHASE_S) > 0 or log.proc.poll() is not None, 30, what=f"{name}: calls after {phase}")
            if phase == "update":  # the split is followed: calls near the end of the phase go to v2
                tail = [o for ts, o in list(log.calls) if started <= ts < started + PHASE_S][-20:]
                assert tail and set(tail) == {"v2"}, f"{name}: expected calls 1 s after the 0/100 update to reach v2 only, got {Counter(tail)}"
    end = time.time() + 5.0  # a call stuck behind a broken channel fails at its 5 s deadline
    wait_until(lambda: log.count_since(end) > 0 or log.proc.poll() is not None, 30, what=f"{name}: calls after the last phase")
    failed: Counter[str] = Counter()
    for ts, outcome in list(log.calls):
        if first <= ts < end and outcome.startswith("error"):
            failed[f"{max((p for p in phases if p[0] <= ts), default=(0.0, 'before'))[1]}: {outcome}"] += 1
    calls = len([1 for ts, _ in list(log.calls) if first <= ts < end])
    errors = (mesh.workdir / f"{name}.stderr").read_text()[-1500:]
    assert not failed, f"{name}: expected 0 failed calls across {POLICY_CYCLES} policy create/update/delete cycles ({calls} calls), got {dict(failed)}; client stderr: {errors}"


def test_grpc_go_policy_create_update_delete_without_failed_calls(mesh: Mesh, go_client: Path) -> None:
    with client([str(go_client), f"echo:{SERVICE_PORT}", "120"], mesh.bootstrap("grpc-go-client"), mesh.workdir, "grpc-go") as log:
        _cycle_policies(mesh, log, "grpc-go")


def test_grpcio_policy_create_update_delete_without_failed_calls(mesh: Mesh, echo_gen: Path) -> None:
    cmd = [sys.executable, str(HERE / "client.py"), str(echo_gen), f"echo:{SERVICE_PORT}", "120"]
    with client(cmd, mesh.bootstrap("grpcio-cycles"), mesh.workdir, "grpcio-cycles") as log:
        _cycle_policies(mesh, log, "grpcio-cycles")


def test_grpc_js_xds_policy_create_update_delete_without_failed_calls(mesh: Mesh, node_modules: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed on this machine")
    cmd = [node, str(HERE / "client.js"), str(HERE / "echo.proto"), f"echo:{SERVICE_PORT}", "120"]
    with client(cmd, mesh.bootstrap("grpc-js-cycles"), mesh.workdir, "grpc-js-cycles", {"NODE_XDS_MODULES": str(node_modules)}) as log:
        _cycle_policies(mesh, log, "grpc-js-cycles")
