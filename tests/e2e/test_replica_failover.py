"""Clients of the control plane fail over between its replicas.

Two ``meshpilot serve`` replicas, each with its own memory store; the services and instances a test needs are
written to both through the management API (what a shared store would give them). One real Envoy, bootstrapped
by ``meshpilot bootstrap --control-plane A,B``, carries a steady load while the replica holding its ADS stream is
SIGKILLed: its ADS (and HDS) streams open on the other replica, a change made there reaches Envoy, and not one
request fails. Then the killed replica comes back, the survivor is killed, and everything moves back. The same
for meshdns' table stream (``meshpilot meshdns --control-plane A,B``): a mesh name still resolves after the
kill, and a service added on the survivor resolves; for a proxyless grpcio client (``meshpilot
proxyless-bootstrap``); for the sidecar agent (Envoy, meshdns, the management API); for a replica that ends its
streams with its port still open, and one that stops answering without closing anything (SIGSTOP). With
identity on, two replicas share one etcd (one mesh CA) and the agent moves over TLS.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest

from tests.support import ROOT, VENV_BIN, ControlPlaneProc, EnvoyProc, free_port, http_backend, through, tmpdir, wait_until

pytestmark = pytest.mark.e2e


def _ok(cp: ControlPlaneProc, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    status, data = cp.call(method, path, body, headers)
    assert status in (200, 201), f"{method} {path} on :{cp.ports.get('api')}: expected 200/201, got {status} {data}"
    return data


def _service(cps: list[ControlPlaneProc], name: str, backend_port: int | None = None) -> None:
    """The service (port 80, http) and, with a backend, one instance of it, written to every replica."""
    for cp in cps:
        _ok(cp, "POST", "/v1/services", {"name": name, "ports": [{"name": "http", "port": 80, "protocol": "http"}]})
        if backend_port is not None:
            _ok(cp, "POST", f"/v1/services/default/{name}/instances",
                {"id": f"{name}-1", "address": "127.0.0.1", "ports": {"http": backend_port}})


def _kill(cp: ControlPlaneProc) -> None:
    """SIGKILL: no goodbye to any stream."""
    assert cp.proc is not None
    cp.proc.send_signal(signal.SIGKILL)
    cp.proc.wait(10)
    cp.proc = None


def _restart(cp: ControlPlaneProc) -> ControlPlaneProc:
    """The same replica again on the same ports, with an empty memory store."""
    again = ControlPlaneProc(cp.workdir, store="memory:", xds_port=cp.ports["xds"], api_port=cp.ports["api"])
    return again.start()


def _ads_nodes(cp: ControlPlaneProc, headers: dict[str, str] | None = None) -> set[str]:
    return {p["node_id"] for p in _ok(cp, "GET", "/v1/proxies", headers=headers)}


def _published(cp: ControlPlaneProc, names: set[str]) -> bool:
    """Whether the replica's xDS cache holds ``names`` (``<svc>.<ns>``) yet: the first answer of a name-table
    stream (the mesh's services, published in the same rebuild as their routes)."""
    import grpc
    from envoy.service.discovery.v3 import ads_pb2_grpc

    from meshpilot.meshdns.ads import AdsState

    done = threading.Event()

    def requests() -> Iterator[Any]:
        yield AdsState("probe~meshdns").initial_request()
        done.wait(10)  # keep the stream open until the answer is read

    with grpc.insecure_channel(f"127.0.0.1:{cp.xds_port}") as channel:
        responses = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).DeltaAggregatedResources(requests(), timeout=5)
        try:
            first = next(responses)
        finally:
            done.set()
            responses.cancel()
    return names <= {r.name for r in first.resources}


def _mesh_instances(cp: ControlPlaneProc, service: str) -> list[str]:
    """Instances registered over HDS (source mesh) that passed their health check."""
    status, data = cp.call("GET", f"/v1/services/default/{service}/instances")
    if status != 200:
        return []
    return [i["id"] for i in data if i.get("source") == "mesh" and i.get("health") == "passing"]


class _Load:
    """Requests through Envoy's outbound listener, one after another, until stopped; every answer counted."""

    def __init__(self, port: int, host: str) -> None:
        self.port, self.host = port, host
        self.ok = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status, body = through(self.port, self.host, timeout=5)
            except Exception as exc:  # noqa: BLE001 - a failed request is what this counts
                self.failed.append(f"{time.time():.3f} {exc!r}")
                continue
            if status == 200:
                self.ok += 1
            else:
                self.failed.append(f"{time.time():.3f} {status} {str(body)[:200]}")

    def __enter__(self) -> _Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@contextlib.contextmanager
def _replicas(workdir: Path) -> Iterator[list[ControlPlaneProc]]:
    cps: list[ControlPlaneProc] = []
    try:
        for name in ("a", "b"):
            (workdir / name).mkdir()
            cps.append(ControlPlaneProc(workdir / name, store="memory:").start())
        yield cps
    finally:
        for cp in cps:
            cp.stop()


def _held_by(cps: list[ControlPlaneProc], node: str, headers: dict[str, str] | None = None) -> list[int]:
    """Indexes of the replicas that list ``node``'s ADS stream."""
    return [i for i, cp in enumerate(cps) if cp.proc is not None and node in _ads_nodes(cp, headers)]


def test_envoy_moves_its_ads_and_hds_streams_to_the_surviving_replica_without_a_failed_request() -> None:
    workdir = tmpdir("meshpilot-failover-")
    with _replicas(workdir) as cps, http_backend("web") as web, http_backend("api") as api, \
            http_backend("caller-app") as app:
        _service(cps, "web", web.port)
        _service(cps, "caller")
        outbound, inbound = free_port(), free_port()
        boot = workdir / "envoy-bootstrap.json"
        made = subprocess.run(
            [str(VENV_BIN / "meshpilot"), "bootstrap", "--node", "caller-1", "--service", "caller", "--hds",
             "--control-plane", ",".join(f"127.0.0.1:{cp.xds_port}" for cp in cps), "--admin-port", "0",
             "--outbound-port", str(outbound), "--inbound-port", str(inbound), "--app-port", str(app.port),
             "-o", str(boot)], capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, f"meshpilot bootstrap: expected exit 0, got {made.returncode}: {made.stderr}"
        proxy = EnvoyProc(workdir, json.loads(boot.read_text()), name="caller")
        try:
            proxy.start()
            wait_until(lambda: through(outbound, "web")[0] == 200, 20, what="a first 200 through Envoy")
            held = wait_until(lambda: _held_by(cps, "caller-1"), 10, what="a replica holding Envoy's ADS stream")
            assert len(held) == 1, f"expected Envoy's ADS stream on one replica, got it on {held}"
            # HDS registers the node's app on the replica its HDS stream is on
            wait_until(lambda: any(_mesh_instances(cp, "caller") for cp in cps), 20,
                       what="the node's app registered over HDS on a replica")
            for round_, (victim, survivor) in enumerate(((held[0], 1 - held[0]), (1 - held[0], held[0]))):
                if round_ == 1:
                    # the replica killed in round 0 comes back, given the state the survivor holds
                    cps[survivor] = back = _restart(cps[survivor])
                    _service([back], "web", web.port)
                    _service([back], "caller")
                    _service([back], "api", api.port)
                    # the registrations are in its xDS cache before Envoy can land there
                    wait_until(lambda: _published(back, {"web.default", "caller.default", "api.default"}), 10,
                               what="the restarted replica's published services")
                with _Load(outbound, "web") as load:
                    wait_until(lambda: load.ok >= 20, 10, what="20 requests through Envoy before the kill")
                    before = load.ok
                    t_kill = time.monotonic()
                    _kill(cps[victim])
                    wait_until(lambda: _held_by(cps, "caller-1") == [survivor], 15,
                               what=f"Envoy's ADS stream on the surviving replica :{cps[survivor].xds_port}")
                    moved_s = time.monotonic() - t_kill
                    hosts = proxy.admin("/clusters")
                    active = [line for line in hosts.splitlines()
                              if line.startswith("meshpilot-xds::") and "::cx_active::" in line and not line.endswith("::0")]
                    assert any(f":{cps[survivor].xds_port}::" in line for line in active), \
                        f"expected Envoy connected to :{cps[survivor].xds_port}, its meshpilot-xds hosts say {active}"
                    wait_until(lambda: _mesh_instances(cps[survivor], "caller"), 20,
                               what="the node's app registered over HDS on the surviving replica")
                    # a change made only on the survivor reaches Envoy
                    name = "api" if round_ == 0 else "extra"
                    backend = api if round_ == 0 else web
                    _service([cps[survivor]], name, backend.port)
                    wait_until(lambda: through(outbound, name)[0] == 200, 10,
                               what=f"{name!r}, made on the survivor only, routed by Envoy")
                    wait_until(lambda: load.ok >= before + 200, 30, what="200 more requests after the kill")
                assert not load.failed, (f"round {round_}: expected 0 failed requests during the failover, got "
                                         f"{len(load.failed)} of {load.ok + len(load.failed)}: {load.failed[:5]}")
                print(f"round {round_}: killed :{cps[victim].ports['xds']}, ADS on :{cps[survivor].xds_port} after "
                      f"{moved_s:.2f}s, {load.ok} requests, 0 failed")
        finally:
            proxy.stop()


def _query(port: int, name: str) -> str | None:
    try:
        r = dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=1)
    except dns.exception.Timeout:
        return None
    if r.rcode() == dns.rcode.NOERROR and r.answer:
        return str(r.answer[0][0].to_text())
    return None


def test_meshdns_follows_the_surviving_replica() -> None:
    workdir = tmpdir("meshpilot-failover-dns-")
    with _replicas(workdir) as cps:
        _service(cps, "web")
        log = open(workdir / "meshdns.log", "wb")
        dnsproc = subprocess.Popen(
            [sys.executable, "-m", "meshpilot.cli", "meshdns", "--listen", "127.0.0.1:0", "--control-plane",
             ",".join(f"127.0.0.1:{cp.xds_port}" for cp in cps), "--node-id", "node-a",
             "--state-file", str(workdir / "meshdns.json"), "--upstream", "127.0.0.1:9"],
            stdout=subprocess.PIPE, stderr=log, cwd=ROOT)
        try:
            assert dnsproc.stdout is not None
            line = dnsproc.stdout.readline().decode()
            assert line.startswith("meshdns listening"), f"expected meshdns to start, got {line!r}"
            port = int(line.rsplit(":", 1)[1])
            vip = wait_until(lambda: _query(port, "web.default.svc.mesh"), 10, what="web to resolve")
            held = wait_until(lambda: _held_by(cps, "node-a"), 10, what="a replica holding meshdns' table stream")
            assert len(held) == 1, f"expected meshdns' stream on one replica, got it on {held}"
            victim, survivor = held[0], 1 - held[0]
            _kill(cps[victim])
            wait_until(lambda: _held_by(cps, "node-a") == [survivor], 10,
                       what=f"meshdns' table stream on the surviving replica :{cps[survivor].xds_port}")
            assert _query(port, "web.default.svc.mesh") == vip, "web must still resolve after the kill"
            _service([cps[survivor]], "fresh")
            wait_until(lambda: _query(port, "fresh.default.svc.mesh"), 10,
                       what="'fresh', made on the survivor only, to resolve")
            text = Path(log.name).read_text()
            assert f"127.0.0.1:{cps[survivor].xds_port}" in text, f"expected meshdns to log the replica it uses:\n{text[-2000:]}"
        finally:
            if dnsproc.poll() is None:
                dnsproc.terminate()
                try:
                    dnsproc.wait(5)
                except subprocess.TimeoutExpired:
                    dnsproc.kill()
                    dnsproc.wait()


def test_envoy_accepts_the_bootstrap_of_several_replicas_with_identity() -> None:
    from meshpilot.translate.bootstrap import BootstrapOptions, build_bootstrap
    from tests.support import assert_envoy_accepts

    workdir = tmpdir("meshpilot-failover-validate-")
    boot = build_bootstrap(BootstrapOptions(
        node_id="web-1", service="web", hds=True, identity=True, sds_socket=str(workdir / "sds.sock"),
        control_planes=(("127.0.0.1", 15010), ("127.0.0.2", 15010), ("cp-2.example", 16010))))
    assert_envoy_accepts(boot, workdir, "a bootstrap with three replicas, TLS to each and HDS")


def _echo_code() -> Path:
    """echo.proto (the proxyless interop tests' service) compiled with grpcio-tools into a scratch directory."""
    from grpc_tools import protoc

    src = ROOT / "tests" / "interop" / "proxyless"
    out = tmpdir("meshpilot-echo-gen-")
    code = protoc.main(["protoc", f"-I{src}", f"--python_out={out}", f"--grpc_python_out={out}", str(src / "echo.proto")])
    assert code == 0, f"expected protoc to compile echo.proto (exit 0), got exit {code}"
    return out


@contextlib.contextmanager
def _echo_server(gen: Path, name: str) -> Iterator[int]:
    """A real grpcio server on 127.0.0.1 whose replies carry ``name``; yields its port."""
    from concurrent import futures

    import grpc

    if str(gen) not in sys.path:
        sys.path.insert(0, str(gen))
    import echo_pb2
    import echo_pb2_grpc

    class Servicer(echo_pb2_grpc.EchoServicer):  # type: ignore[misc]
        def Call(self, request: Any, context: Any) -> Any:  # noqa: N802
            return echo_pb2.EchoReply(server=name, message=request.message)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    echo_pb2_grpc.add_EchoServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


def test_a_proxyless_grpc_client_follows_the_surviving_replica() -> None:
    workdir = tmpdir("meshpilot-failover-grpc-")
    gen = _echo_code()
    with _replicas(workdir) as cps, _echo_server(gen, "v1") as v1, _echo_server(gen, "v2") as v2:
        for cp in cps:
            _ok(cp, "POST", "/v1/services", {"name": "echo", "ports": [{"name": "grpc", "port": 50051, "protocol": "grpc"}]})
            _ok(cp, "POST", "/v1/services/default/echo/instances", {"id": "echo-v1", "address": "127.0.0.1", "ports": {"grpc": v1}})
        boot = workdir / "grpc-bootstrap.json"
        made = subprocess.run(
            [str(VENV_BIN / "meshpilot"), "proxyless-bootstrap", "--node-id", "grpc-client-1", "--control-plane",
             ",".join(f"127.0.0.1:{cp.xds_port}" for cp in cps), "-o", str(boot)], capture_output=True, text=True,
            timeout=60)
        assert made.returncode == 0, f"meshpilot proxyless-bootstrap: expected exit 0, got {made.returncode}: {made.stderr}"
        uri = json.loads(boot.read_text())["xds_servers"][0]["server_uri"]
        assert uri == "ipv4:" + ",".join(f"127.0.0.1:{cp.xds_port}" for cp in cps), f"got server_uri {uri}"
        replies: list[str] = []
        client = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "interop" / "proxyless" / "client.py"), str(gen), "echo:50051", "120"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(workdir / "client.stderr", "wb"),
            env={**os.environ, "GRPC_XDS_BOOTSTRAP": str(boot)})

        def read() -> None:
            assert client.stdout is not None
            for line in client.stdout:
                replies.append(line.decode().split()[-1])

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            wait_until(lambda: replies.count("v1") >= 20, 30, what="20 replies from v1 through the xDS client")
            held = wait_until(lambda: _held_by(cps, "grpc-client-1"), 10, what="a replica holding the client's ADS")
            assert len(held) == 1, f"expected the client's stream on one replica, got it on {held}"
            victim, survivor = held[0], 1 - held[0]
            before = len(replies)
            _kill(cps[victim])
            wait_until(lambda: _held_by(cps, "grpc-client-1") == [survivor], 20,
                       what=f"the client's ADS stream on the surviving replica :{cps[survivor].xds_port}")
            # a change made on the survivor only: v2 replaces v1
            _ok(cps[survivor], "POST", "/v1/services/default/echo/instances",
                {"id": "echo-v2", "address": "127.0.0.1", "ports": {"grpc": v2}})
            _ok(cps[survivor], "DELETE", "/v1/instances/echo-v1")
            wait_until(lambda: replies[-5:] == ["v2"] * 5, 20, what="the client to call v2, made on the survivor only")
            after = replies[before:]
            failed = [r for r in after if r.startswith("error:")]
            assert not failed, f"expected 0 failed calls during the failover, got {len(failed)} of {len(after)}: {failed[:5]}"
        finally:
            if client.poll() is None:
                assert client.stdin is not None
                client.stdin.close()
                try:
                    client.wait(10)
                except subprocess.TimeoutExpired:
                    client.kill()
                    client.wait()
            reader.join(5)


def test_the_sidecar_agent_moves_every_client_to_the_surviving_replica() -> None:
    """``meshpilot sidecar --control-plane A,B --api URL_A,URL_B``: Envoy's ADS and HDS, meshdns' table stream and
    the management-API calls (the deregistration at the stop) all reach the survivor."""
    import yaml

    workdir = tmpdir("meshpilot-failover-agent-")
    with _replicas(workdir) as cps, http_backend("web-app") as app, http_backend("other") as other, \
            http_backend("fresh") as fresh:
        _service(cps, "web")
        _service(cps, "other", other.port)
        inbound, outbound = free_port(), free_port()
        doc = {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": app.port}]},
            "mesh": {"healthCheck": {"http": {"path": "/"}, "interval": "1s", "timeout": "1s", "healthyThreshold": 1},
                     "drainTime": "0s", "syncTimeout": "2s",
                     "sidecar": {"adminPort": 0, "inboundPort": inbound, "outboundPort": outbound},
                     "dns": {"listen": "127.0.0.1:0", "upstreams": ["127.0.0.1:9"]}},
        }
        spec = workdir / "spec.yaml"
        spec.write_text(yaml.safe_dump(doc))
        ready, log = workdir / "ready.json", workdir / "agent.log"
        agent = subprocess.Popen(
            [str(VENV_BIN / "meshpilot"), "sidecar", "--spec", str(spec),
             "--control-plane", ",".join(f"127.0.0.1:{cp.xds_port}" for cp in cps),
             "--api", ",".join(cp.api for cp in cps), "--node-id", "web-1", "--workdir", str(workdir / "agent"),
             "--ready-file", str(ready)], stdout=open(log, "ab"), stderr=subprocess.STDOUT)
        envoy_pid = 0
        try:
            wait_until(lambda: ready.exists() or agent.poll() is not None, 30, what="the agent's ready file")
            assert agent.poll() is None, f"the agent exited with {agent.returncode}:\n{log.read_text()[-3000:]}"
            info = json.loads(ready.read_text())
            envoy_pid, dns_port = info["envoy_pid"], info["dns_port"]
            wait_until(lambda: through(outbound, "other")[0] == 200, 20, what="a first 200 through the agent's Envoy")
            web_vip = wait_until(lambda: _query(dns_port, "web.default.svc.mesh"), 10, what="web from the agent's meshdns")
            held = wait_until(lambda: _held_by(cps, "web-1"), 10, what="a replica holding the Envoy's ADS stream")
            victim, survivor = held[0], 1 - held[0]
            with _Load(outbound, "other") as load:
                wait_until(lambda: load.ok >= 20, 10, what="20 requests before the kill")
                _kill(cps[victim])
                s = cps[survivor]
                wait_until(lambda: {"web-1", "web-1~meshdns"} <= _ads_nodes(s), 15,
                           what=f"the Envoy's ADS and meshdns' table stream on the survivor :{s.xds_port}")
                wait_until(lambda: "web-1" in _mesh_instances(s, "web"), 20,
                           what="the app registered over HDS on the survivor")
                assert _query(dns_port, "web.default.svc.mesh") == web_vip, "web must still resolve after the kill"
                _service([s], "fresh", fresh.port)
                wait_until(lambda: _query(dns_port, "fresh.default.svc.mesh"), 10,
                           what="'fresh', made on the survivor only, from the agent's meshdns")
                wait_until(lambda: through(outbound, "fresh")[0] == 200, 10,
                           what="'fresh', made on the survivor only, routed by the agent's Envoy")
                n = load.ok
                wait_until(lambda: load.ok >= n + 100, 20, what="100 more requests after the kill")
            assert not load.failed, (f"expected 0 failed requests, got {len(load.failed)} of "
                                     f"{load.ok + len(load.failed)}: {load.failed[:5]}")
            agent.send_signal(signal.SIGTERM)
            code = agent.wait(30)
            text = log.read_text()
            assert code == 0, f"expected a clean stop, got {code}:\n{text[-3000:]}"
            assert "event=deregistered instance=web-1 status=200" in text, \
                f"expected the deregistration answered by the survivor:\n{text[-3000:]}"
            assert "web-1" not in _mesh_instances(s, "web"), "the survivor must have deregistered the app"
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
            if envoy_pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(envoy_pid, signal.SIGKILL)


class _HandingOver:
    """A replica that takes ADS streams and, when told, ends every one with UNAVAILABLE (what a replica cut off
    from the shared store does) while its port stays open."""

    def __init__(self) -> None:
        from concurrent import futures

        import grpc

        self.streams = 0
        self.hand_over = threading.Event()

        def ads(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
            self.streams += 1
            next(requests, None)
            while not self.hand_over.wait(0.05):
                if not context.is_active():
                    return
            context.abort(grpc.StatusCode.UNAVAILABLE, "this replica hands its streams over")
            yield b""  # never reached: a generator, as gRPC's stream handlers are

        handler = grpc.method_handlers_generic_handler("envoy.service.discovery.v3.AggregatedDiscoveryService", {
            name: grpc.stream_stream_rpc_method_handler(ads, request_deserializer=bytes, response_serializer=bytes)
            for name in ("StreamAggregatedResources", "DeltaAggregatedResources")})
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=None)


def test_envoy_leaves_a_replica_that_ends_its_streams_for_another() -> None:
    workdir = tmpdir("meshpilot-failover-handover-")
    leaving = _HandingOver()
    real = ControlPlaneProc(workdir, store="memory:", xds_port=free_port())
    try:
        with http_backend("web") as web:
            outbound = free_port()
            boot = workdir / "envoy-bootstrap.json"
            made = subprocess.run(
                [str(VENV_BIN / "meshpilot"), "bootstrap", "--node", "caller-1", "--admin-port", "0",
                 "--control-plane", f"127.0.0.1:{leaving.port},127.0.0.1:{real.xds_port_wanted}",
                 "--outbound-port", str(outbound), "-o", str(boot)], capture_output=True, text=True, timeout=60)
            assert made.returncode == 0, made.stderr
            proxy = EnvoyProc(workdir, json.loads(boot.read_text()), name="caller")
            try:
                proxy.start()
                # the other replica is not up yet: Envoy's stream can only be on the one that will hand over
                wait_until(lambda: leaving.streams >= 1, 10, what="Envoy's ADS stream on the first replica")
                real.start()
                _service([real], "web", web.port)
                leaving.hand_over.set()
                wait_until(lambda: _held_by([real], "caller-1") == [0], 10,
                           what="Envoy's ADS stream on the replica that kept serving")
                wait_until(lambda: through(outbound, "web")[0] == 200, 10, what="web routed with the other's config")
            finally:
                proxy.stop()
    finally:
        real.stop()
        leaving.stop()


def test_a_replica_that_stops_answering_without_closing_its_connections_is_left() -> None:
    """SIGSTOP: the replica's sockets stay open and the kernel still takes connections, but nothing answers.
    Envoy's HTTP/2 keepalive (PING every 10 s, 3 s to answer) and meshdns' (10 s + 5 s, then a 5 s bound on
    connecting) move their streams to the other replica."""
    workdir = tmpdir("meshpilot-failover-stop-")
    with _replicas(workdir) as cps, http_backend("web") as web:
        _service(cps, "web", web.port)
        targets = ",".join(f"127.0.0.1:{cp.xds_port}" for cp in cps)
        outbound, boot = free_port(), workdir / "envoy-bootstrap.json"
        made = subprocess.run([str(VENV_BIN / "meshpilot"), "bootstrap", "--node", "caller-1", "--admin-port", "0",
                               "--control-plane", targets, "--outbound-port", str(outbound), "-o", str(boot)],
                              capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        proxy = EnvoyProc(workdir, json.loads(boot.read_text()), name="caller")
        dnsproc = subprocess.Popen(
            [sys.executable, "-m", "meshpilot.cli", "meshdns", "--listen", "127.0.0.1:0", "--control-plane", targets,
             "--node-id", "node-a", "--upstream", "127.0.0.1:9"],
            stdout=subprocess.PIPE, stderr=open(workdir / "meshdns.log", "wb"), cwd=ROOT)
        stopped: ControlPlaneProc | None = None
        try:
            proxy.start()
            wait_until(lambda: through(outbound, "web")[0] == 200, 20, what="a first 200 through Envoy")
            for node in ("caller-1", "node-a"):
                held = wait_until(lambda n=node: _held_by(cps, n), 10, what=f"a replica holding {node}'s stream")
                victim, survivor = cps[held[0]], cps[1 - held[0]]
                assert victim.proc is not None
                victim.proc.send_signal(signal.SIGSTOP)
                stopped = victim
                t0 = time.monotonic()
                wait_until(lambda n=node, s=survivor: n in _ads_nodes(s), 40,
                           what=f"{node}'s stream on the replica that still answers :{survivor.xds_port}")
                print(f"{node}: left the stopped replica after {time.monotonic() - t0:.1f}s")
                victim.proc.send_signal(signal.SIGCONT)
                stopped = None
        finally:
            if stopped is not None and stopped.proc is not None:
                stopped.proc.send_signal(signal.SIGCONT)
            proxy.stop()
            if dnsproc.poll() is None:
                dnsproc.terminate()
                try:
                    dnsproc.wait(5)
                except subprocess.TimeoutExpired:
                    dnsproc.kill()
                    dnsproc.wait()


def _free_xds_port() -> int:
    """An xDS port whose enrolment port (xDS + 2, the default) is free as well."""
    import socket

    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 2))
            except OSError:
                continue
        return port
    raise AssertionError("no xDS port with a free enrolment port beside it")


def test_with_identity_the_agent_moves_to_the_other_replica_over_tls() -> None:
    """Two replicas on one shared etcd with identity on (one mesh CA): the agent enrols at one replica, its Envoy
    holds ADS over TLS (each replica checked for the control plane's SPIFFE id); the replica holding the
    Envoy's stream is SIGKILLed and the Envoy (0 failed requests), meshdns and the bundle watch continue on the
    other over TLS, under the same certificate."""
    import yaml

    from tests.etcd_cluster import etcd_cluster

    token = "admin-secret"
    admin = {"Authorization": f"Bearer {token}"}
    workdir = tmpdir("meshpilot-failover-identity-")
    cfg = workdir / "cp.yaml"
    cfg.write_text(yaml.safe_dump({"identity": True, "token": token, "debounce_ms": 20, "hds_interval_s": 0.3}))
    with etcd_cluster(workdir / "etcd") as etcd, http_backend("web-app") as app, http_backend("other") as other:
        cps: list[ControlPlaneProc] = []
        agent: subprocess.Popen[bytes] | None = None
        envoy_pid = 0
        try:
            for name in ("a", "b"):
                (workdir / name).mkdir()
                cps.append(ControlPlaneProc(workdir / name, store=etcd.url, extra=["--config", str(cfg)],
                                            xds_port=_free_xds_port()).start())
            a = cps[0]

            def admin_call(cp: ControlPlaneProc, method: str, path: str, body: Any = None) -> Any:
                status, data = cp.call(method, path, body, admin)
                assert status in (200, 201), f"{method} {path}: expected 200/201, got {status} {data}"
                return data

            for cp in cps:  # the replicas share the store: what one wrote the other serves
                wait_until(lambda c=cp: c.call("GET", "/v1/identity/bundle", headers=admin)[0] == 200, 10,
                           what="the mesh CA on each replica")
            admin_call(a, "POST", "/v1/services", {"name": "other", "ports": [{"name": "http", "port": 80}]})
            admin_call(a, "POST", "/v1/services/default/other/instances",
                       {"id": "other-1", "address": "127.0.0.1", "ports": {"http": other.port}})
            bundles = {cp.call("GET", "/v1/identity/bundle", headers=admin)[1] for cp in cps}
            assert len(bundles) == 1, "expected one mesh CA for both replicas"
            (workdir / "bundle.pem").write_text(str(bundles.pop()))
            secret = admin_call(a, "POST", "/v1/identity/tokens", {"namespace": "default", "service": "web"})["secret"]
            (workdir / "join-token").write_text(secret)
            inbound, outbound = free_port(), free_port()
            spec = workdir / "spec.yaml"
            spec.write_text(yaml.safe_dump({
                "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                "spec": {"ports": [{"name": "http", "port": 80, "targetPort": app.port}]},
                "mesh": {"healthCheck": {"http": {"path": "/"}, "interval": "1s", "timeout": "1s", "healthyThreshold": 1},
                         "drainTime": "0s", "syncTimeout": "2s",
                         "sidecar": {"adminPort": 0, "inboundPort": inbound, "outboundPort": outbound},
                         "dns": {"listen": "127.0.0.1:0", "upstreams": ["127.0.0.1:9"]}},
            }))
            ready, log = workdir / "ready.json", workdir / "agent.log"
            agent = subprocess.Popen(
                [str(VENV_BIN / "meshpilot"), "sidecar", "--spec", str(spec),
                 "--control-plane", ",".join(f"127.0.0.1:{cp.xds_port}" for cp in cps),
                 "--api", ",".join(cp.api for cp in cps), "--token", token, "--node-id", "web-1",
                 "--workdir", str(workdir / "agent"), "--ready-file", str(ready),
                 "--join-token-file", str(workdir / "join-token"), "--trust-bundle", str(workdir / "bundle.pem")],
                stdout=open(log, "ab"), stderr=subprocess.STDOUT)
            wait_until(lambda: ready.exists() or agent.poll() is not None, 40, what="the agent's ready file")
            assert agent.poll() is None, f"the agent exited with {agent.returncode}:\n{log.read_text()[-3000:]}"
            info = json.loads(ready.read_text())
            envoy_pid, dns_port = info["envoy_pid"], info["dns_port"]
            assert info["spiffe_id"] == "spiffe://mesh.local/ns/default/sa/web", info
            wait_until(lambda: through(outbound, "other")[0] == 200, 30, what="a first 200 through the agent's Envoy")
            held = wait_until(lambda: _held_by(cps, "web-1", admin), 10, what="a replica holding the Envoy's ADS stream")
            victim, survivor = cps[held[0]], cps[1 - held[0]]
            identities = {p["node_id"]: p["identity"] for p in _ok(victim, "GET", "/v1/proxies", headers=admin)}
            assert identities.get("web-1") == info["spiffe_id"], f"expected ADS under the workload id, got {identities}"
            with _Load(outbound, "other") as load:
                wait_until(lambda: load.ok >= 20, 10, what="20 requests before the kill")
                _kill(victim)
                wait_until(lambda: {"web-1", "web-1~meshdns"} <= _ads_nodes(survivor, admin), 20,
                           what=f"the Envoy's ADS and meshdns' stream over TLS on the survivor :{survivor.xds_port}")
                n = load.ok
                wait_until(lambda: load.ok >= n + 100, 20, what="100 more requests after the kill")
            assert not load.failed, f"expected 0 failed requests, got {len(load.failed)}: {load.failed[:5]}"
            identities = {p["node_id"]: p["identity"] for p in _ok(survivor, "GET", "/v1/proxies", headers=admin)}
            assert identities.get("web-1") == info["spiffe_id"], f"expected ADS under the workload id, got {identities}"
            admin_call(survivor, "POST", "/v1/services", {"name": "fresh", "ports": [{"name": "http", "port": 80}]})
            wait_until(lambda: _query(dns_port, "fresh.default.svc.mesh"), 10,
                       what="'fresh' from the agent's meshdns, fed over TLS by the survivor")
            wait_until(lambda: f"event=bundle_watch_open control_plane=127.0.0.1:{survivor.xds_port}" in log.read_text(),
                       20, what="the bundle watch on the survivor")
        finally:
            if agent is not None and agent.poll() is None:
                agent.terminate()
                try:
                    agent.wait(20)
                except subprocess.TimeoutExpired:
                    agent.kill()
                    agent.wait()
            if envoy_pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(envoy_pid, signal.SIGKILL)
            for cp in cps:
                cp.stop()
