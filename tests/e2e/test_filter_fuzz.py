"""Junk configurations fed to the real filter in Envoy through file-based ECDS: every document is either
accepted or NACKed exactly as the filter's parser (the native check-config) decides, Envoy never stops,
and traffic keeps flowing."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshpilot.wasm import modules
from meshpilot.wasm import testbed as tb


FILTERS = Path(__file__).resolve().parents[2] / "filters"
RELOAD = "extension_config_discovery.http_filter.meshpilot.config_reload"
FAIL = "extension_config_discovery.http_filter.meshpilot.config_fail"

SEED = """[filter]
tick_ms = 50
[breaker b]
per = route
window = time
window_size = 10
min_calls = 3
failure_status = 5xx, 429
slow_call_duration = 250ms
open_wait = 2s
reply_header = x-a: b
[ratelimit r]
key = header:x-user
rate = 100/s
burst = 10
"""
TOKENS = ["[", "]", "=", "\n", "#", " ", "[breaker x]", "[ratelimit y]", "[filter]", "rate", "burst", "100/s",
          "0", "-1", "99999999999", "ms", "s", "%", ".", "/", "**", "{id}", "key = header:", "reply_header = a:b",
          "\\", "\\n", "window = count", "window_size = 600", "min_calls = 700", "5xx", "-", ",", "é"]


@st.composite
def documents(draw: st.DrawFn) -> str:
    doc = SEED
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(doc)))
        op = draw(st.sampled_from(["insert", "delete", "dup"]))
        if op == "insert":
            doc = doc[:at] + draw(st.sampled_from(TOKENS)) + doc[at:]
        elif op == "delete":
            doc = doc[:at] + doc[at + draw(st.integers(1, 30)):]
        else:
            doc = doc[:at] + doc[at:at + draw(st.integers(1, 30))] + doc[at:]
    return doc


@pytest.fixture(scope="module")
def checker() -> Path:
    if not Path("/usr/bin/cargo").exists():
        pytest.skip("Debian's /usr/bin/cargo is not installed; cannot build the filter or its checker")
    env = {**os.environ, "RUSTC": "/usr/bin/rustc"}
    subprocess.run(["bash", str(FILTERS.parent / "scripts" / "build-filters.sh")], check=True)
    proc = subprocess.run(["/usr/bin/cargo", "build", "--offline", "--quiet", "--bin", "check-config"],
                          cwd=FILTERS, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"expected the checker to build, got:\n{proc.stderr[-3000:]}"
    return FILTERS / "target" / "debug" / "check-config"


@pytest.fixture(scope="module")
def envoy(tmp_path_factory: pytest.TempPathFactory, checker: Path) -> Iterator[tuple[tb.Envoy, Path]]:
    ecds_dir = tmp_path_factory.mktemp("ecds")
    ecds = ecds_dir / "meshpilot.json"
    tb.write_ecds(ecds, "meshpilot", modules.wasm_filter(""), "0")
    bport, pport = tb.free_port(), tb.free_port()
    proxy = tb.proxy_bootstrap(pport, [tb.Route("all", "/", "backend")], {"backend": bport},
                               [tb.ecds_filter("meshpilot", ecds)])
    with tb.Envoy(tb.direct_response_bootstrap(bport), bport), tb.Envoy(proxy, pport, concurrency=2) as e:
        yield e, ecds


_version = iter(range(1, 1_000_000))
PREFIX = "extension_config_discovery.http_filter.meshpilot"


def settled(proxy: tb.Envoy, quiet: float = 0.3) -> dict[str, int]:
    """ECDS counters once they have not moved for `quiet` seconds (a file watch may fire twice)."""
    last = proxy.stats(PREFIX)
    since = time.monotonic()
    deadline = since + 10
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.05)
        now = proxy.stats(PREFIX)
        if now != last:
            last, since = now, time.monotonic()
    return last


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(doc=documents())
def test_envoy_agrees_with_the_parser_and_survives(envoy: tuple[tb.Envoy, Path], checker: Path, doc: str) -> None:
    proxy, ecds = envoy
    n = next(_version)
    doc = f"# update {n}\n{doc}"  # every update differs, so Envoy reloads or rejects each one
    verdict = subprocess.run([str(checker)], input=doc.encode(), capture_output=True, timeout=30).returncode
    before = settled(proxy)
    tb.write_ecds(ecds, "meshpilot", modules.wasm_filter(doc), str(n))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proxy.stats(PREFIX).get(RELOAD, 0) <= before.get(RELOAD, 0):
        time.sleep(0.02)
    after = settled(proxy)
    # Envoy counts every update it reads as a reload, and a rejected one also as a failure.
    assert after.get(RELOAD, 0) - before.get(RELOAD, 0) == 1, (
        f"expected Envoy to read update {n} once, got reloads {before.get(RELOAD, 0)}->{after.get(RELOAD, 0)}")
    rejected = after.get(FAIL, 0) > before.get(FAIL, 0)
    accepted = not rejected
    assert accepted == (verdict == 0), (
        f"expected Envoy to {'accept' if verdict == 0 else 'reject'} the document (as the parser does), "
        f"got {'accepted' if accepted else 'rejected'}:\n{doc}")
    assert proxy.alive(), f"expected Envoy to keep running; log:\n{proxy.log_tail(30)}"
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{proxy.port}/", timeout=10) as r:
            code = r.status
    except urllib.error.HTTPError as e:
        code = e.code
    assert code in (200, 429, 503), f"expected traffic to keep flowing, got {code}"
