"""Real Spring Cloud apps join the mesh through meshpilot's Consul- and Eureka-compatible APIs.

Each app (tests/interop/spring, built here with Maven) registers itself in meshpilot, is called by a
mesh app through a real Envoy sidecar (so its registration reached EDS), and calls a mesh service
by name through its own load-balanced client (so mesh instances reach the SDK's discovery). The
build runs once per session into var/spring-build/ and is reused while the sources are unchanged.
If Maven Central cannot be reached the tests say so and are skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import (
    ROOT,
    ControlPlaneProc,
    control_plane,
    envoy,
    free_port,
    http,
    http_backend,
    sidecar_bootstrap,
    through,
    tmpdir,
    wait_until,
)

pytestmark = pytest.mark.timeout(900)

SOURCES = ROOT / "tests" / "interop" / "spring"
BUILD = ROOT / "var" / "spring-build"
_NETWORK_ERRORS = ("Could not transfer", "Unknown host", "Could not resolve", "Connection refused", "Network is unreachable",
                   "Connect timed out", "UnknownHostException")


def source_digest(sources: Path = SOURCES) -> str:
    """A digest of a Maven project's sources (its build output left out): the build is redone when it changes."""
    h = hashlib.sha256()
    for p in sorted(sources.rglob("*")):
        if p.is_file() and "target" not in p.relative_to(sources).parts:
            h.update(str(p.relative_to(sources)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def spring_jars() -> dict[str, Path]:
    """consul-app.jar and eureka-app.jar, built with Maven once per source version."""
    if shutil.which("mvn") is None or shutil.which("java") is None:
        pytest.skip("Maven and a JDK 17 are needed to build the Spring Cloud apps; mvn or java is not on PATH")
    digest = source_digest()
    src = BUILD / "src"
    stamp = BUILD / "built.sha256"
    jars = {k: src / f"{k}-app" / "target" / f"{k}-app.jar" for k in ("consul", "eureka")}
    if stamp.exists() and stamp.read_text() == digest and all(j.exists() for j in jars.values()):
        return jars
    if src.exists():
        shutil.rmtree(src)
    shutil.copytree(SOURCES, src, ignore=shutil.ignore_patterns("target"))
    log = BUILD / "build.log"
    with open(log, "wb") as out:
        rc = subprocess.call(
            ["mvn", "-B", "-q", "-DskipTests", f"-Dmaven.repo.local={BUILD / 'm2'}", "package"],
            cwd=src, stdout=out, stderr=subprocess.STDOUT, timeout=1500,
        )
    text = log.read_text(errors="replace")
    if rc != 0:
        if any(e in text for e in _NETWORK_ERRORS):
            pytest.skip(f"Maven Central is unreachable, so the Spring Cloud apps cannot be built (see {log}): {text[-500:]}")
        raise AssertionError(f"expected the Spring apps to build; mvn exited {rc}:\n{text[-3000:]}")
    stamp.write_text(digest)
    return jars


@pytest.fixture(scope="module")
def mesh() -> Iterator[tuple[ControlPlaneProc, Path]]:
    """A control plane with the Consul and Eureka APIs on OS-chosen ports."""
    work = tmpdir("meshpilot-spring-")
    with control_plane(work, extra=["--consul-port", "0", "--eureka-port", "0", "--debounce-ms", "20"]) as cp:
        yield cp, work


@contextlib.contextmanager
def java_app(jar: Path, work: Path, name: str, args: list[str]) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    port = free_port()
    log = work / f"{name}.log"
    cmd = ["java", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-Xmx256m", "-jar", str(jar),
           f"--server.port={port}", f"--spring.application.name={name}", "--management.endpoints.web.exposure.include=health",
           "--spring.cloud.loadbalancer.cache.ttl=1s", "--logging.level.root=WARN", *args]
    proc = subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=work)
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"expected {name} to run; it exited {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
            status, _, _ = http("GET", f"http://127.0.0.1:{port}/actuator/health", timeout=2)
            return status == 200

        wait_until(up, 120, 0.5, what=f"{name} /actuator/health to answer 200")
        yield proc, port, log
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _mesh_service(cp: ControlPlaneProc, name: str, port: int) -> None:
    status, body = cp.call("POST", "/v1/services", {"name": name, "ports": [{"name": "http", "port": 80, "protocol": "http"}]})
    assert status in (201, 409), f"expected the mesh service to be created, got {status} {body}"
    status, body = cp.call("POST", f"/v1/services/default/{name}/instances", {"id": f"{name}-1", "address": "127.0.0.1", "ports": {"http": port}})
    assert status == 201, f"expected the mesh instance to register, got {status} {body}"


def _check_both_ways(cp: ControlPlaneProc, work: Path, app: str, app_port: int, mesh_name: str, backend: object) -> None:
    outbound = free_port()
    with envoy(work, sidecar_bootstrap(f"caller-of-{app}", cp.xds_port, outbound_port=outbound), name=f"envoy-{app}") as e:
        def routed() -> object:
            status, body = through(outbound, app, "/hello", timeout=3)
            return body if status == 200 and isinstance(body, dict) and body.get("app") == app else None

        body = wait_until(routed, 60, 0.2, what=f"the mesh app to reach {app} through Envoy by name")
        assert body["app"] == app, f"expected an answer from {app}, got {body}"
        hosts = e.cluster_hosts(f"outbound|{app_port}||{app}.default.svc.mesh")
        assert f"127.0.0.1:{app_port}" in hosts, f"expected {app}'s instance in Envoy's EDS, got {hosts}"

    def called() -> object:
        status, text, _ = http("GET", f"http://127.0.0.1:{app_port}/call/{mesh_name}", timeout=5)
        if status != 200:
            return None
        data = json.loads(text) if isinstance(text, str) else text
        return data if data.get("server") == mesh_name else None

    got = wait_until(called, 60, 0.5, what=f"{app} to call the mesh service {mesh_name} through its load-balanced client")
    assert got["path"] == f"/from-{app}", f"expected the Spring app's request path /from-{app}, got {got['path']}"
    assert backend.hits >= 1, "expected the mesh backend to have been called"  # type: ignore[attr-defined]


def test_spring_consul_app_and_mesh_call_each_other(spring_jars: dict[str, Path], mesh: tuple[ControlPlaneProc, Path]) -> None:
    cp, work = mesh
    consul = cp.ports["consul"]
    with http_backend("mesh-echo") as backend:
        _mesh_service(cp, "mesh-echo", backend.port)
        args = [
            "--spring.cloud.consul.host=127.0.0.1", f"--spring.cloud.consul.port={consul}",
            "--spring.cloud.consul.discovery.prefer-ip-address=true", "--spring.cloud.consul.discovery.ip-address=127.0.0.1",
            "--spring.cloud.consul.discovery.health-check-interval=1s", "--spring.cloud.consul.discovery.catalog-services-watch-delay=1000",
            "--spring.cloud.consul.discovery.catalog-services-watch-timeout=1", "--spring.cloud.consul.config.enabled=false",
        ]
        with java_app(spring_jars["consul"], work, "spring-consul", args) as (proc, port, _log):
            status, entries, hdrs = http("GET", f"http://127.0.0.1:{consul}/v1/health/service/spring-consul")
            assert status == 200 and len(entries) == 1, f"expected one spring-consul entry, got {status} {entries}"
            check_types = sorted(c["Type"] for c in entries[0]["Checks"] if c["CheckID"] != "serfHealth")
            assert check_types == ["http"], f"expected Spring's HTTP check to be registered, got {check_types}"
            _check_both_ways(cp, work, "spring-consul", port, "mesh-echo", backend)
            proc.terminate()
            proc.wait(20)

            def gone() -> bool:
                status, entries, _ = http("GET", f"http://127.0.0.1:{consul}/v1/health/service/spring-consul")
                return status == 200 and entries == []

            wait_until(gone, 20, what="spring-consul to deregister itself on shutdown")


def test_spring_eureka_app_and_mesh_call_each_other(spring_jars: dict[str, Path], mesh: tuple[ControlPlaneProc, Path]) -> None:
    cp, work = mesh
    eureka = cp.ports["eureka"]
    with http_backend("mesh-echo2") as backend:
        _mesh_service(cp, "mesh-echo2", backend.port)
        args = [
            f"--eureka.client.service-url.defaultZone=http://127.0.0.1:{eureka}/eureka/",
            "--eureka.instance.prefer-ip-address=true", "--eureka.instance.ip-address=127.0.0.1",
            "--eureka.client.registry-fetch-interval-seconds=1", "--eureka.instance.lease-renewal-interval-in-seconds=1",
            "--eureka.instance.lease-expiration-duration-in-seconds=5",
            "--eureka.client.initial-instance-info-replication-interval-seconds=1",
            "--eureka.client.instance-info-replication-interval-seconds=1",
        ]
        with java_app(spring_jars["eureka"], work, "spring-eureka", args) as (proc, port, _log):
            def registered() -> object:
                status, body, _ = http("GET", f"http://127.0.0.1:{eureka}/eureka/apps/SPRING-EUREKA", headers={"Accept": "application/json"})
                return body if status == 200 else None

            body = wait_until(registered, 30, 0.2, what="spring-eureka to register through the Eureka API")
            inst = body["application"]["instance"][0]
            assert inst["status"] == "UP", f"expected spring-eureka UP, got {inst['status']}"
            _check_both_ways(cp, work, "spring-eureka", port, "mesh-echo2", backend)
            proc.terminate()
            proc.wait(20)

            def gone() -> bool:
                status, _body, _ = http("GET", f"http://127.0.0.1:{eureka}/eureka/apps/SPRING-EUREKA", headers={"Accept": "application/json"})
                return status == 404

            wait_until(gone, 20, what="spring-eureka to cancel its lease on shutdown")
