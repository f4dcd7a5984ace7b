"""One trace across frameworks: a Spring Boot app with Spring's standard tracing (Micrometer Tracing over
Brave, W3C propagation, spans reported as Zipkin v2 JSON) calls a mesh app, which calls another Spring
Boot app, each behind a real `meshpilot sidecar` with a real Envoy.

    test -> front (Spring) -> front's sidecar -> mid's sidecar -> mid (Python, forwards the trace
    headers) -> mid's sidecar -> back's sidecar -> back (Spring)

The Spring apps report their spans to their node's span receiver (the agent's, ``mesh.tracing.port``),
so their spans take the same way to the control plane as the sidecars'. The test asks ``/v1/traces`` for
the trace id the back app saw and expects one tree holding all seven spans in call order: front's server
and client spans, the three sidecars' spans, and back's server span. The app (tests/interop/spring_trace)
is built with Maven once per source version into var/spring-trace-build/; without Maven Central the test
says so and is skipped.
"""

from __future__ import annotations

import contextlib
import http.server as httpserver
import json
import shutil
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.test_sidecar import AUTH, TOKEN, sidecar, spec_doc
from tests.interop.test_spring import _NETWORK_ERRORS, source_digest
from tests.support import ROOT, ControlPlaneProc, free_port, http, tmpdir, wait_until

pytestmark = [pytest.mark.interop, pytest.mark.timeout(1200)]

SOURCES = ROOT / "tests" / "interop" / "spring_trace"
BUILD = ROOT / "var" / "spring-trace-build"
_TRACE_HEADERS = ("traceparent", "tracestate", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled",
                  "x-b3-flags", "b3", "x-request-id")


@pytest.fixture(scope="module")
def trace_jar() -> Path:
    if shutil.which("mvn") is None or shutil.which("java") is None:
        pytest.skip("Maven and a JDK 17 are needed to build the Spring app; mvn or java is not on PATH")
    digest, src, stamp = source_digest(SOURCES), BUILD / "src", BUILD / "built.sha256"
    jar = src / "target" / "trace-app.jar"
    if stamp.exists() and stamp.read_text() == digest and jar.exists():
        return jar
    if src.exists():
        shutil.rmtree(src)
    shutil.copytree(SOURCES, src, ignore=shutil.ignore_patterns("target"))
    log = BUILD / "build.log"
    with open(log, "wb") as out:
        rc = subprocess.call(["mvn", "-B", "-q", "-DskipTests", f"-Dmaven.repo.local={BUILD / 'm2'}", "package"],
                             cwd=src, stdout=out, stderr=subprocess.STDOUT, timeout=1500)
    text = log.read_text(errors="replace")
    if rc != 0:
        if any(e in text for e in _NETWORK_ERRORS):
            pytest.skip(f"Maven Central is unreachable, so the Spring app cannot be built (see {log}): {text[-500:]}")
        raise AssertionError(f"expected the Spring app to build; mvn exited {rc}:\n{text[-3000:]}")
    stamp.write_text(digest)
    return jar


@contextlib.contextmanager
def spring(jar: Path, work: Path, name: str, port: int, zipkin_port: int, args: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    log = work / f"{name}.log"
    cmd = ["java", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-Xmx256m",
           "-Dsun.net.http.allowRestrictedHeaders=true",  # the RestClient names the mesh service in Host
           "-jar", str(jar), f"--server.port={port}", f"--spring.application.name={name}",
           "--management.tracing.sampling.probability=1.0",
           f"--management.zipkin.tracing.endpoint=http://127.0.0.1:{zipkin_port}/api/v2/spans",
           "--logging.level.root=WARN", *args]
    proc = subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=work)
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"expected {name} to run; it exited {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
            return http("GET", f"http://127.0.0.1:{port}/healthz", timeout=2)[0] == 200

        wait_until(up, 180, 0.5, what=f"{name} /healthz to answer 200")
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def forwarding_app(outbound: int, host: str) -> Iterator[int]:
    """The mesh app in the middle: answers /healthz, and /chain by calling ``host`` through its
    sidecar's outbound listener with the trace headers it got (as apps in a mesh must)."""

    class H(httpserver.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/healthz":
                body = b"ok"
            else:
                headers = {k: v for k, v in self.headers.items() if k.lower() in _TRACE_HEADERS}
                req = urllib.request.Request(f"http://127.0.0.1:{outbound}/chain", headers={**headers, "Host": host})
                with urllib.request.urlopen(req, timeout=10) as r:
                    body = r.read()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: Any) -> None:
            pass

    class S(httpserver.ThreadingHTTPServer):
        daemon_threads = True

    srv = S(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def _path(tree: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(service, kind, from a sidecar) of the spans from the root down, following first children."""
    assert len(tree["roots"]) == 1, f"expected one root span, got {[(r['service'], r.get('kind'), r.get('name')) for r in tree['roots']]}"
    out, node = [], tree["roots"][0]
    while True:
        out.append((node["service"], node.get("kind", ""), "mesh.service" in node.get("tags", {})))
        if not node["children"]:
            return out
        node = sorted(node["children"], key=lambda c: c["offset_us"])[0]


EXPECTED = [("front", "SERVER", False), ("front", "CLIENT", False), ("front", "CLIENT", True), ("mid", "SERVER", True),
            ("mid", "CLIENT", True), ("back", "SERVER", True), ("back", "SERVER", False)]


def test_spring_to_mesh_app_to_spring_is_one_trace(trace_jar: Path) -> None:
    work = tmpdir("meshpilot-spring-trace-")
    cfg = work / "cp.yaml"
    cfg.write_text(yaml.safe_dump({"hds_interval_s": 0.3, "debounce_ms": 20, "token": TOKEN}))
    cp = ControlPlaneProc(work, extra=["--config", str(cfg)])
    ports = {n: free_port() for n in ("front_app", "back_app", "front_out", "mid_out", "back_out", "front_zipkin", "back_zipkin")}
    try:
        cp.start()
        status, body = cp.call("PUT", "/v1/policies/TracingPolicy/default/all",
                               {"kind": "TracingPolicy", "name": "all", "sampling": 100}, AUTH)
        assert status in (200, 201), f"expected the TracingPolicy stored, got {status} {body}"

        def doc(name: str, app_port: int, outbound: int, zipkin: int = 0) -> dict[str, Any]:
            d = spec_doc(name, app_port, free_port(), outbound)
            d["mesh"]["tracing"] = {"port": zipkin}
            return d

        with forwarding_app(ports["mid_out"], "back") as mid_port, \
                sidecar(work, "front", doc("front", ports["front_app"], ports["front_out"], ports["front_zipkin"]), cp, "front-1"), \
                sidecar(work, "mid", doc("mid", mid_port, ports["mid_out"]), cp, "mid-1"), \
                sidecar(work, "back", doc("back", ports["back_app"], ports["back_out"], ports["back_zipkin"]), cp, "back-1"), \
                spring(trace_jar, work, "back", ports["back_app"], ports["back_zipkin"], []), \
                spring(trace_jar, work, "front", ports["front_app"], ports["front_zipkin"],
                       [f"--next.url=http://127.0.0.1:{ports['front_out']}/chain", "--next.host=mid"]):

            def chained() -> dict[str, Any] | None:
                status, text, _ = http("GET", f"http://127.0.0.1:{ports['front_app']}/chain", timeout=10)
                if status != 200 or not isinstance(text, dict):
                    return None
                back = json.loads(text["next"])
                return {"front": text, "back": back} if back.get("app") == "back" else None

            got = wait_until(chained, 60, 0.5, what="front -> mid -> back through the sidecars")
            trace_id = got["back"]["traceId"].rjust(32, "0")
            assert got["front"]["traceId"].rjust(32, "0") == trace_id, f"expected front and back in one trace, got {got}"

            def whole() -> dict[str, Any] | None:
                status, tree = cp.call("GET", f"/v1/traces/{trace_id}", headers=AUTH)
                return tree if status == 200 and tree["span_count"] >= len(EXPECTED) else None

            tree = wait_until(whole, 60, 0.5, what=f"trace {trace_id} with all {len(EXPECTED)} spans in /v1/traces")
            path = wait_until(lambda: (p := _path(whole() or tree)) == EXPECTED and p, 20, 0.5,
                              what=f"the spans of trace {trace_id} in call order {EXPECTED}")
            assert path == EXPECTED
    finally:
        cp.stop()
