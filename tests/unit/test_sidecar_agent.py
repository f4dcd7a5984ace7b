"""The agent's view of its Envoy across restarts: the ready file follows the admin port of the Envoy that
runs now, however early the new Envoy writes its admin address file (sockets on 127.0.0.1, no process:
the supervised Envoy is a stand-in with a pid)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshpilot.sidecar.agent import AgentConfig, _Agent
from meshpilot.sidecar.render import SidecarOptions
from meshpilot.sidecar.spec import load_spec

SPEC = """
metadata: {name: reviews}
spec:
  ports: [{name: http, port: 80, targetPort: 9080}]
"""


@dataclass
class _Proc:
    pid: int
    returncode: int | None = None


@dataclass
class _Envoy:
    proc: _Proc
    restarts: int = 0


async def _listener() -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _ready_admin_port(ready: Path, want: int, within_s: float) -> Any:
    last = None
    try:
        async with asyncio.timeout(within_s):
            while True:
                if ready.exists():
                    last = json.loads(ready.read_text())
                    if last["admin_port"] == want:
                        return last
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"expected the ready file to name admin port {want} within {within_s}s, last: {last}") from None


async def test_a_restarted_envoy_that_writes_its_address_at_once_is_found(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    agent = _Agent(AgentConfig(spec=load_spec(SPEC), options=SidecarOptions(admin_port=0, node_id="reviews-1"),
                               api_url="http://127.0.0.1:9", workdir=tmp_path, ready_file=ready))
    first, first_port = await _listener()
    second, second_port = await _listener()
    envoy = _Envoy(_Proc(101))
    agent.envoy = envoy  # type: ignore[assignment]  # the watcher reads only .proc and .restarts
    agent.forget_admin_address()  # what the supervisor runs before each start
    agent.admin_path.write_text(f"127.0.0.1:{first_port}")
    watcher = asyncio.create_task(agent._watch_envoy())
    try:
        await _ready_admin_port(ready, first_port, 5)
        # the Envoy dies; the supervisor clears the address and starts another, which writes its own
        # address before the watcher's next look
        envoy.proc.returncode = -9
        agent.forget_admin_address()
        envoy.proc, envoy.restarts = _Proc(102), 1
        agent.admin_path.write_text(f"127.0.0.1:{second_port}")
        doc = await _ready_admin_port(ready, second_port, 5)
        assert doc["envoy_pid"] == 102 and doc["envoy_restarts"] == 1, f"expected the new Envoy in the ready file, got {doc}"
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        first.close()
        second.close()
