"""``meshpilot demo``: a small mesh on this machine, to see the product work in a minute.

It starts the control plane with workload identities on (embedded store and a generated mesh CA in
a scratch directory), a ``frontend`` app and two ``backend`` instances, each a real HTTP server
behind the real sidecar agent: the agent makes its key, enrols with a join token, hands Envoy its
certificate over SDS and registers the app over HDS. The frontend calls ``http://backend/`` through
its own sidecar, so every request crosses the mesh twice, the second time over mutual TLS with the
caller's SPIFFE id checked by the callee. Traffic is sent, the spread over the backends is printed
with the URLs worth opening, and Ctrl-C stops everything that was started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from aiohttp import ClientSession, ClientTimeout, web

from meshpilot.controlplane import ControlPlane
from meshpilot.model import Service, ServicePort
from meshpilot.plugins import install_plugins
from meshpilot.settings import Settings

__all__ = ["run_demo"]


def _port(preferred: int) -> int:
    """The preferred port when it is free on loopback, else one the OS picks."""
    for candidate in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            bound: int = s.getsockname()[1]
            return bound
    raise OSError("no free port")


def _private(path: Path, secret: str) -> Path:
    """A secret in a file only its owner can read, from the first byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret)
    return path


def _meshpilot() -> str:
    found = shutil.which("meshpilot", path=str(Path(sys.executable).parent)) or shutil.which("meshpilot")
    if not found:
        raise SystemExit("meshpilot demo: the meshpilot command was not found next to this Python")
    return found


async def _app(name: str, outbound_port: int | None) -> web.AppRunner:
    async def handle(request: web.Request) -> web.Response:
        body: dict[str, object] = {"app": name, "caller": request.headers.get("x-mesh-caller", "")}
        if outbound_port:
            # call the backend by its mesh name through this app's own sidecar
            async with ClientSession(timeout=ClientTimeout(total=5)) as s:
                async with s.get(f"http://127.0.0.1:{outbound_port}/", headers={"Host": "backend"}) as r:
                    body["backend"] = await r.json()
        return web.json_response(body)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", handle)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    return runner


class _Sidecar:
    """``meshpilot sidecar`` for one app: enrols with its join token, then runs Envoy."""

    def __init__(self, workdir: Path, node: str, service: str, app_port: int, inbound: int, outbound: int) -> None:
        self.name = node
        self.dir = workdir / node
        self.dir.mkdir()
        self.service = service
        self.app_port = app_port
        self.inbound_port = inbound
        self.outbound_port = outbound
        self.log = self.dir / "agent.log"
        self.ready = self.dir / "ready.json"
        self.proc: asyncio.subprocess.Process | None = None
        self.admin_port = 0

    def _spec(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": self.service, "labels": {"version": "v1"}},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": self.app_port}]},
            "mesh": {
                "healthCheck": {"http": {"path": "/healthz"}, "interval": "0.5s", "timeout": "0.5s", "healthyThreshold": 1},
                "drainTime": "0s", "syncTimeout": "2s",
                "sidecar": {"adminPort": 0, "inboundPort": self.inbound_port, "outboundPort": self.outbound_port},
                "dns": {"enabled": False},  # three sidecars share this machine's port 15053
            },
        }

    async def start(self, cp: ControlPlane, api: str, token_file: Path, join_token: str, bundle: Path, enrol_port: int) -> None:
        spec = self.dir / "spec.yaml"
        spec.write_text(yaml.safe_dump(self._spec()))
        join = _private(self.dir / "join-token", join_token)
        self.proc = await asyncio.create_subprocess_exec(
            _meshpilot(), "sidecar", "--spec", str(spec), "--control-plane", f"127.0.0.1:{cp.ports['xds']}",
            "--api", api, "--token-file", str(token_file), "--node-id", self.name, "--workdir", str(self.dir),
            "--ready-file", str(self.ready), "--join-token-file", str(join), "--trust-bundle", str(bundle),
            "--enrol-port", str(enrol_port), "--log-level", "warning",
            stdout=open(self.log, "ab"), stderr=asyncio.subprocess.STDOUT,
        )
        async with asyncio.timeout(60):
            while not self.ready.exists():
                if self.proc.returncode is not None:
                    raise RuntimeError(f"{self.name}: the sidecar agent exited; see {self.log}")
                await asyncio.sleep(0.05)
        self.admin_port = int(json.loads(self.ready.read_text())["admin_port"])

    async def stop(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)  # graceful offline: deregister, drain, stop Envoy
            try:
                async with asyncio.timeout(15):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


@dataclass(frozen=True, slots=True)
class _Mesh:
    cp: ControlPlane
    frontend_in: int
    frontend_out: int
    sidecars: list[_Sidecar]
    token_file: Path


async def _admin_call(s: ClientSession, method: str, url: str, token: str, body: Any = None) -> Any:
    async with s.request(method, url, json=body, headers={"Authorization": f"Bearer {token}"}) as r:
        if r.status >= 300:
            raise RuntimeError(f"{method} {url}: {r.status} {await r.text()}")
        return await r.json() if r.content_type == "application/json" else await r.text()


@contextlib.asynccontextmanager
async def _mesh(workdir: Path) -> AsyncIterator[_Mesh]:
    token = secrets.token_urlsafe(24)
    token_file = _private(workdir / "admin-token", token)
    settings = Settings(
        store=f"sqlite:{workdir / 'meshpilot.db'}",
        xds_port=_port(15010),
        api_port=_port(15014),
        consul_port=_port(8500),
        eureka_port=_port(8761),
        enrolment_port=_port(15012),
        identity=True,
        token=token,
        hds_interval_s=0.5,
    )
    cp = ControlPlane(settings)
    install_plugins(cp)
    runners: list[web.AppRunner] = []
    sidecars: list[_Sidecar] = []
    serving = asyncio.create_task(cp.run())
    try:
        async with asyncio.timeout(15):
            await cp.ready.wait()
        reg = cp.registry
        reg.put_service(Service(name="frontend", ports=[ServicePort(name="http", port=80)], labels={"demo": "true"}))
        reg.put_service(Service(name="backend", ports=[ServicePort(name="http", port=80)], labels={"demo": "true"}))
        api = f"http://127.0.0.1:{cp.ports['api']}"
        async with ClientSession(timeout=ClientTimeout(total=10)) as s:
            bundle = workdir / "trust-bundle.pem"
            bundle.write_text(await _admin_call(s, "GET", f"{api}/v1/identity/bundle", token))
            # the agents get a token of their own with the scope they need (write), not the admin's
            agents = await _admin_call(s, "POST", f"{api}/v1/access/tokens", token,
                                       {"scope": "write", "description": "meshpilot demo: sidecar agents"})
            agent_token = _private(workdir / "agent-token", agents["secret"])
            enrol_port = int((await _admin_call(s, "GET", f"{api}/v1/identity", token))["enrolment_port"])
            fe_out, fe_in = _port(0), _port(0)
            apps = [("frontend", "frontend-1", fe_out, fe_in), ("backend", "backend-1", 0, _port(0)), ("backend", "backend-2", 0, _port(0))]
            for service, node, out_port, in_port in apps:
                runner = await _app(node, fe_out if service == "frontend" else None)
                site = web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                runners.append(runner)
                app_port = runner.addresses[0][1]
                join = await _admin_call(s, "POST", f"{api}/v1/identity/tokens", token,
                                         {"namespace": "default", "service": service, "single_use": True,
                                          "description": f"meshpilot demo: {node}"})
                car = _Sidecar(workdir, node, service, app_port, in_port, out_port or _port(0))
                sidecars.append(car)
                await car.start(cp, api, agent_token, join["secret"], bundle, enrol_port)
        yield _Mesh(cp, fe_in, fe_out, sidecars, token_file)
    finally:
        for car in sidecars:
            await car.stop()
        for runner in runners:
            await runner.cleanup()
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving


async def _accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


async def run_demo(requests: int = 20, keep_running: bool = True) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="meshpilot-demo-"))
    try:
        async with _mesh(workdir) as mesh:
            cp, fe_in = mesh.cp, mesh.frontend_in
            print("meshpilot demo: control plane up with identities on; 3 apps behind 3 enrolled sidecars "
                  "(mutual TLS between them); sending traffic...", flush=True)
            spread: Counter[str] = Counter()
            callers: Counter[str] = Counter()
            failures = 0
            frontend = mesh.sidecars[0]
            async with ClientSession(timeout=ClientTimeout(total=5)) as s:
                # ready when the frontend's Envoy holds both backends (ADS pushes take milliseconds)
                clusters_url = f"http://127.0.0.1:{frontend.admin_port}/clusters"
                for _ in range(300):
                    try:
                        async with s.get(clusters_url) as r:
                            text = await r.text()
                        healthy = [
                            line for line in text.splitlines()
                            if line.startswith("outbound|80||backend.default.svc.mesh::") and line.endswith("::health_flags::healthy")
                        ]
                        # ... and every sidecar's listeners serve (they start once their filter config is in)
                        listening = all([await _accepts(car.inbound_port) for car in mesh.sidecars])
                        if len(healthy) == 2 and listening:
                            break
                    except OSError:
                        pass
                    await asyncio.sleep(0.05)
                for _ in range(requests):
                    try:
                        async with s.get(f"http://127.0.0.1:{fe_in}/") as r:
                            body = await r.json()
                            spread[body["backend"]["app"]] += 1
                            callers[body["backend"]["caller"]] += 1
                    except Exception:  # noqa: BLE001 - counted and reported
                        failures += 1
            api = f"http://127.0.0.1:{cp.ports['api']}"
            print(f"\n{requests} requests: client -> frontend sidecar -> frontend -> its sidecar -> backend sidecar -> backend")
            for app, n in sorted(spread.items()):
                print(f"  served by {app}: {n}")
            print(f"  failed: {failures}")
            for caller, n in sorted(callers.items()):
                print(f"  the backends saw caller {caller or '(none)'}: {n}   (from the frontend sidecar's certificate)")
            print(f"\nThe API needs the admin token now: export MESHPILOT_TOKEN_FILE={mesh.token_file}")
            print("\nLook at (curl -H \"Authorization: Bearer $(cat $MESHPILOT_TOKEN_FILE)\" ...):")
            print(f"  services        {api}/v1/services")
            print(f"  Envoys          {api}/v1/proxies   (streams, ACKed versions, NACKs)")
            print(f"  metrics         {api}/metrics")
            print(f"  identities      {api}/v1/identity/enrolments   (nodes, their SPIFFE ids)")
            print(f"  API document    {api}/openapi.json")
            for car in mesh.sidecars:
                print(f"  {car.name:15} Envoy admin http://127.0.0.1:{car.admin_port}/clusters")
            print("\nTry:")
            print(f"  curl http://127.0.0.1:{fe_in}/")
            print(f"  curl -H 'Host: backend' http://127.0.0.1:{mesh.frontend_out}/")
            print("  .venv/bin/meshpilot policy apply -f authz.yaml   # an AuthorizationPolicy for backend: docs/policy.md")
            if failures:
                raise SystemExit(f"meshpilot demo: {failures} of {requests} requests failed")
            if keep_running:
                print("\nCtrl-C stops everything.", flush=True)
                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, stop.set)
                await stop.wait()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)



if __name__ == "__main__":  # pragma: no cover
    asyncio.run(run_demo())
