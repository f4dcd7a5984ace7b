"""A filter configuration the filter rejects, delivered like the control plane delivers it (ECDS, here
from a watched file): proxy_on_configure returns false, Envoy NACKs the update, logs why, keeps running
and keeps enforcing the last good configuration until a good one arrives."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from meshpilot.wasm import config, modules
from meshpilot.wasm import testbed as tb


def build_modules() -> None:
    if not Path("/usr/bin/cargo").exists() and not (Path(modules.__file__).parent / "mesh.wasm").exists():
        pytest.skip("no built filter modules and no /usr/bin/cargo to build them")
    if Path("/usr/bin/cargo").exists():
        subprocess.run(["bash", str(Path(__file__).resolve().parents[2] / "scripts" / "build-filters.sh")], check=True)


def status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def wait_stat(envoy: tb.Envoy, name: str, at_least: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    value = 0
    while time.monotonic() < deadline:
        value = envoy.stats(name).get(name, 0)
        if value >= at_least:
            return value
        time.sleep(0.05)
    raise AssertionError(f"expected {name} >= {at_least} within {timeout}s, got {value}")


def test_rejected_config_is_nacked_and_the_last_good_one_stays(tmp_path: Path) -> None:
    build_modules()
    ecds_dir = tmp_path / "ecds"
    ecds_dir.mkdir()
    ecds = ecds_dir / "meshpilot.json"
    good = config.encode({"rate_limits": [{"name": "tight", "match": {"route": "limited"}, "key": "rule",
                                           "rate": "1/h", "burst": 2}]})
    tb.write_ecds(ecds, "meshpilot", modules.wasm_filter(good), "1")
    bport, pport = tb.free_port(), tb.free_port()
    proxy = tb.proxy_bootstrap(pport, [tb.Route("limited", "/limited", "backend"), tb.Route("open", "/", "backend")],
                               {"backend": bport}, [tb.ecds_filter("meshpilot", ecds)])
    with tb.Envoy(tb.direct_response_bootstrap(bport), bport), tb.Envoy(proxy, pport, concurrency=2) as envoy:
        codes = [status(pport, "/limited") for _ in range(3)]
        assert codes == [200, 200, 429], f"expected the good config enforced (burst 2), got {codes}"
        reloads = envoy.stats("extension_config_discovery.http_filter.meshpilot.config_reload").get(
            "extension_config_discovery.http_filter.meshpilot.config_reload", 0)

        bad = "[filter]\ntick_ms = 100\n\n[breaker api]\nwindow = sideways\n"
        tb.write_ecds(ecds, "meshpilot", modules.wasm_filter(bad), "2")
        wait_stat(envoy, "extension_config_discovery.http_filter.meshpilot.config_fail", 1)
        deadline = time.monotonic() + 5
        while "configuration rejected" not in envoy.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        log = envoy.log_text()
        assert "meshpilot filter: configuration rejected: config line 5: window" in log, (
            f"expected the filter to log why it rejected the config; log tail:\n{envoy.log_tail(30)}")
        assert envoy.alive(), f"expected Envoy to keep running; log tail:\n{envoy.log_tail(30)}"
        codes = [status(pport, "/limited"), status(pport, "/other")]
        assert codes == [429, 200], f"expected the last good config still enforced, got {codes}"

        fixed = config.encode({"rate_limits": [{"name": "roomy", "match": {"route": "limited"}, "key": "rule",
                                                "rate": "1/h", "burst": 5}]})
        tb.write_ecds(ecds, "meshpilot", modules.wasm_filter(fixed), "3")
        wait_stat(envoy, "extension_config_discovery.http_filter.meshpilot.config_reload", reloads + 1)
        codes = [status(pport, "/limited") for _ in range(6)]
        assert codes == [200] * 5 + [429], f"expected the new good config (burst 5) enforced, got {codes}"
