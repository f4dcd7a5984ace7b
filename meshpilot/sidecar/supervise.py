"""Process supervision for the sidecar agent: run a child, restart it with back-off when it dies,
stop it on request (SIGTERM, then SIGKILL after a grace period).

``next_delay`` is the pure back-off policy; ``Supervised`` owns one child process at a time and is
run inside the agent's TaskGroup, so a failure is seen by its owner (STYLE.md: structured
concurrency). Restarts are logged as one structured line each.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["Supervised", "next_delay"]

log = logging.getLogger("meshpilot.sidecar")

BASE_DELAY_S = 0.2
MAX_DELAY_S = 10.0
STABLE_AFTER_S = 10.0


def next_delay(previous: float, ran_for: float) -> float:
    """Back-off before the next restart: doubles while the child keeps dying quickly, resets
    once it has run for ``STABLE_AFTER_S``."""
    if ran_for >= STABLE_AFTER_S or previous <= 0:
        return BASE_DELAY_S
    return min(MAX_DELAY_S, previous * 2)


class Supervised:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        on_start: Callable[[asyncio.subprocess.Process], None] | None = None,
        before_start: Callable[[], None] | None = None,
    ) -> None:
        """``before_start`` runs right before each start, restarts included (clear what the last
        child left behind); ``on_start`` right after."""
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.on_start = on_start
        self.before_start = before_start
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.started = asyncio.Event()
        self._stopping = False

    async def run(self) -> None:
        """Keep the child running until ``stop`` is called."""
        loop = asyncio.get_running_loop()
        delay = 0.0
        while not self._stopping:
            if self.before_start is not None:
                self.before_start()
            with open(self.log_path, "ab") as out:
                self.proc = await asyncio.create_subprocess_exec(
                    *self.argv, stdout=out, stderr=asyncio.subprocess.STDOUT, env=self.env, cwd=self.cwd,
                    start_new_session=True,
                )
            began = loop.time()
            log.info("event=process_started name=%s pid=%d restarts=%d", self.name, self.proc.pid, self.restarts)
            if self.on_start is not None:
                self.on_start(self.proc)
            self.started.set()
            code = await self.proc.wait()
            if self._stopping:
                break
            ran = loop.time() - began
            delay = next_delay(delay, ran)
            self.restarts += 1
            log.warning("event=process_exited name=%s code=%s ran_s=%.1f restart_in_s=%.1f", self.name, code, ran, delay)
            await asyncio.sleep(delay)

    async def stop(self, grace_s: float = 10.0) -> int | None:
        """Stop the child (SIGTERM to its process group, SIGKILL after ``grace_s``)."""
        self._stopping = True
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return proc.returncode if proc else None
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(grace_s):
                return await proc.wait()
        except TimeoutError:
            log.warning("event=process_killed name=%s after_s=%.1f", self.name, grace_s)
            _signal_group(proc.pid, signal.SIGKILL)
            return await proc.wait()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)
