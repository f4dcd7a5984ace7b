"""Runs the Rust filters' native test suite (config parser fuzzing, breaker and rate-limit state
machines, ABI helpers) so the project's single pytest command covers it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support import ROOT

FILTERS = ROOT / "filters"
CARGO = "/usr/bin/cargo"
RUSTC = "/usr/bin/rustc"
needs_cargo = pytest.mark.skipif(not (Path(CARGO).exists() and Path(RUSTC).exists()),
                                 reason="Debian's /usr/bin/cargo and /usr/bin/rustc are not installed; the Rust tests need them")


@needs_cargo
def test_cargo_test_passes() -> None:
    env = {**os.environ, "RUSTC": RUSTC}
    proc = subprocess.run([CARGO, "test", "--offline", "--quiet"], cwd=FILTERS, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"expected `cargo test` to pass, got exit {proc.returncode}:\n{out[-4000:]}"
    assert "test result: ok" in out and "FAILED" not in out, f"expected passing test results, got:\n{out[-4000:]}"
