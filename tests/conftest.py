"""Shared fixtures: a scratch directory per test that is removed afterwards."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import tmpdir


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = tmpdir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
