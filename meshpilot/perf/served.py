"""A control plane of this checkout served in a child process for the xDS benchmarks, and the
services they seed it with.

``control_plane`` starts ``meshpilot serve`` on OS-chosen ports with a memory store (Consul and
Eureka off), waits for its ready file and always stops it; ``seed`` creates ``svc0..svcN-1`` with
``endpoints`` instances each through the management API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import ClientSession, TCPConnector

__all__ = ["Served", "control_plane", "seed", "stop"]


@dataclass(frozen=True, slots=True)
class Served:
    proc: subprocess.Popen[bytes]
    ports: dict[str, int]
    workdir: Path

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}"


@contextlib.contextmanager
def control_plane(prefix: str = "meshpilot-perf-", env: Mapping[str, str] | None = None) -> Iterator[Served]:
    """``env``: extra ``MESHPILOT_*`` settings for the served process."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    ready = workdir / "ready.json"
    log_path = workdir / "control-plane.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshpilot.cli", "serve", "--store", "memory:", "--xds-port", "0", "--api-port", "0",
             "--consul-port", "-1", "--eureka-port", "-1", "--ready-file", str(ready)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MESHPILOT_LOG_LEVEL": "WARNING", **(env or {})},
        )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"control plane did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        yield Served(proc, json.loads(ready.read_text()), workdir)
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s; returns once the process is gone."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def seed(api: str, services: int, endpoints: int) -> None:
    async with ClientSession(connector=TCPConnector(limit=8)) as s:
        sem = asyncio.Semaphore(8)

        async def one(i: int) -> None:
            async with sem:
                async with s.post(f"{api}/v1/services", json={"name": f"svc{i}", "ports": [{"name": "http", "port": 80}]}) as r:
                    if r.status != 201:
                        raise RuntimeError(f"creating svc{i}: {r.status} {await r.text()}")
                for e in range(endpoints):
                    body = {"id": f"svc{i}-{e}", "address": f"10.{(i >> 8) & 255}.{i & 255}.{e + 1}", "ports": {"http": 8080}}
                    async with s.post(f"{api}/v1/services/default/svc{i}/instances", json=body) as r:
                        if r.status != 201:
                            raise RuntimeError(f"registering {body['id']}: {r.status} {await r.text()}")

        await asyncio.gather(*(one(i) for i in range(services)))
