"""The Python encoder of the filter configuration agrees with the filter's own parser: the native
`check-config` binary built by cargo from filters/mesh accepts what the encoder renders, for a full
policy, an empty one and generated ones (the rendering itself and its field errors: tests/unit/test_filter_config.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from meshpilot.wasm.config import FilterConfigError, encode
from tests.e2e.test_filters_pass_cargo_test import CARGO, FILTERS, RUSTC, needs_cargo
from tests.unit.test_filter_config import FULL, _policy

pytestmark = needs_cargo


@pytest.fixture(scope="module")
def check_config() -> Path:
    env = {**os.environ, "RUSTC": RUSTC}
    proc = subprocess.run([CARGO, "build", "--offline", "--quiet", "--bin", "check-config"],
                          cwd=FILTERS, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"expected the checker to build, got:\n{proc.stderr[-3000:]}"
    return FILTERS / "target" / "debug" / "check-config"


def run_check(binary: Path, text: str) -> tuple[int, str]:
    proc = subprocess.run([str(binary)], input=text.encode(), capture_output=True, timeout=30)
    return proc.returncode, proc.stdout.decode(errors="replace").strip()


def test_full_policy_renders_what_the_filter_accepts(check_config: Path) -> None:
    rc, out = run_check(check_config, encode(FULL))
    assert rc == 0 and out.startswith("ok breakers=1 ratelimits=1 tick_ms=50"), f"expected ok, got {rc}: {out}"


def test_empty_policy_is_a_passthrough(check_config: Path) -> None:
    rc, out = run_check(check_config, encode({}))
    assert (rc, out) == (0, "ok breakers=0 ratelimits=0 tick_ms=100"), f"got {rc}: {out}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_policy)
def test_everything_the_encoder_accepts_the_filter_accepts(check_config: Path, policy: dict) -> None:
    try:
        text = encode(policy)
    except FilterConfigError:
        return  # refused, naming the field: the unit tests check that
    rc, out = run_check(check_config, text)
    assert rc == 0, f"expected the filter to accept the encoder's output, got {out!r} for:\n{text}"
