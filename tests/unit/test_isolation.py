"""The unit set is what `-m "not e2e and not interop"` selects, and it starts no process: the guard in
tests/unit/conftest.py refuses every way of starting one, and the markers come from each test's directory."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import MARK_BY_DIRECTORY, TESTS
from tests.unit.conftest import ProcessGuard, ProcessStarted


def test_starting_a_process_fails_a_unit_test(no_processes: ProcessGuard) -> None:
    with pytest.raises(ProcessStarted, match="tests/e2e"):
        subprocess.run(["true"], check=False)
    with pytest.raises(ProcessStarted):
        subprocess.Popen(["envoy", "--version"])
    with pytest.raises(ProcessStarted):
        os.system("true")
    with pytest.raises(ProcessStarted):
        asyncio.run(asyncio.create_subprocess_exec("cargo", "test"))
    assert len(no_processes.attempts) == 4, f"expected four refused starts recorded, got {no_processes.attempts}"
    assert "'envoy'" in no_processes.attempts[1], f"expected the command named, got {no_processes.attempts[1]}"
    no_processes.attempts.clear()  # refused on purpose: the guard's teardown would fail this test otherwise


def test_markers_follow_the_directory(request: pytest.FixtureRequest) -> None:
    """Every test this run selected carries exactly its directory's marker (none under tests/unit)."""
    wrong = []
    for item in request.session.items:
        directory = Path(item.path).resolve().relative_to(TESTS).parts[0]
        have = {name for name in MARK_BY_DIRECTORY if item.get_closest_marker(name) is not None}
        want = {directory} & MARK_BY_DIRECTORY.keys()
        if have != want:
            wrong.append(f"{item.nodeid}: {sorted(have)}, expected {sorted(want)}")
    assert not wrong, "expected each test marked by its directory alone:\n" + "\n".join(wrong)
