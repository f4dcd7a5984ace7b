"""Shared fixtures and the markers by directory.

Every test under tests/e2e is marked ``e2e`` and every test under tests/interop ``interop``, so
``-m "not e2e and not interop"`` selects exactly tests/unit, whose tests start no process
(tests/unit/conftest.py enforces that)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import tmpdir

TESTS = Path(__file__).resolve().parent
MARK_BY_DIRECTORY = {"e2e": pytest.mark.e2e, "interop": pytest.mark.interop}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        try:
            directory = item.path.resolve().relative_to(TESTS).parts[0]
        except ValueError:
            continue
        mark = MARK_BY_DIRECTORY.get(directory)
        if mark is not None:
            item.add_marker(mark)


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = tmpdir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
