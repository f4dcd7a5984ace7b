"""Unit tests drive pure cores and start no process: every way of starting one (subprocess, asyncio's
subprocess functions, os.system, fork and posix_spawn) fails a unit test that tries, naming the command
and where such a test belongs. Tests that need real Envoy, cargo, openssl or the CLI go to tests/e2e."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest


class ProcessStarted(AssertionError):
    pass


class ProcessGuard:
    """What the test tried to start; a test of the guard itself may read and clear it."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def refuse(self, how: str, what: Any) -> ProcessStarted:
        self.attempts.append(f"{how}: {what!r}")
        return ProcessStarted(f"expected a unit test to start no process, but it called {how} {what!r}; "
                              "a test that needs real processes belongs in tests/e2e")


_CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    return report


@pytest.fixture(autouse=True)
def no_processes(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[ProcessGuard]:
    guard = ProcessGuard()

    def execute_child(self: subprocess.Popen[Any], args: Any, *rest: Any, **kw: Any) -> None:
        raise guard.refuse("subprocess", args)

    def refusing(how: str) -> Any:
        def refuse(*args: Any, **kw: Any) -> Any:
            raise guard.refuse(how, args[:2])
        return refuse

    async def refusing_async(program: Any, *args: Any, **kw: Any) -> Any:
        raise guard.refuse("asyncio subprocess", (program, *args))

    monkeypatch.setattr(subprocess.Popen, "_execute_child", execute_child)
    for module in (asyncio, asyncio.subprocess):
        monkeypatch.setattr(module, "create_subprocess_exec", refusing_async)
        monkeypatch.setattr(module, "create_subprocess_shell", refusing_async)
    for name in ("system", "fork", "forkpty", "posix_spawn", "posix_spawnp"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, refusing(f"os.{name}"))
    yield guard
    # code under test may have swallowed the exception: the attempt still fails the test
    if guard.attempts and not request.node.stash.get(_CALL_FAILED, False):
        pytest.fail(f"expected a unit test to start no process, it tried: {guard.attempts}")
