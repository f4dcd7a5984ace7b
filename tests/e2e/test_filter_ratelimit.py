"""The rate limiter in a real Envoy 1.40: under wrk load through a 2-worker Envoy for 10 s it admits
rate × duration + burst within ±5 % (the workers share one bucket through shared data), rejects the
rest with 429 and Retry-After, and keeps one bucket per calling service."""

from __future__ import annotations

import re
import shutil
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


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}


def parse_wrk(out: str) -> tuple[int, float, int]:
    """(requests, seconds, non-2xx/3xx responses) from wrk's summary."""
    m = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    assert m, f"expected wrk's summary line, got:\n{out}"
    secs = float(m.group(2)) / (1000 if m.group(3) == "ms" else 1)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    assert not errors or errors.group(1) == "0", f"expected no connect errors, got:\n{out}"
    return int(m.group(1)), secs, int(bad.group(1)) if bad else 0


RATE, BURST = 500, 100


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (Debian package wrk)")
def test_accepted_is_rate_times_duration_plus_burst_under_wrk() -> None:
    build_modules()
    bport, pport = tb.free_port(), tb.free_port()
    policy = {"tick_ms": 100, "rate_limits": [
        {"name": "api", "match": {"route": "limited"}, "key": "route", "rate": RATE, "burst": BURST}]}
    proxy = tb.proxy_bootstrap(
        pport, [tb.Route("probe", "/probe", "backend"), tb.Route("limited", "/", "backend")], {"backend": bport},
        [{"name": "meshpilot", "typed_config": modules.wasm_filter(config.encode(policy))}])
    with tb.Envoy(tb.direct_response_bootstrap(bport), bport), tb.Envoy(proxy, pport, concurrency=2) as envoy:
        code, _ = get(pport, "/probe")  # the unlimited route proves the path works without spending tokens
        assert code == 200, f"expected the probe route to pass, got {code}"
        proc = subprocess.run(["wrk", "-t2", "-c32", "-d10s", "--latency", f"http://127.0.0.1:{pport}/x"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"wrk failed: {proc.stderr}"
        total, secs, rejected = parse_wrk(proc.stdout)
        accepted = total - rejected
        want = RATE * secs + BURST
        assert rejected > 0, f"expected wrk to exceed the limit, got {total} requests and no rejections"
        assert abs(accepted - want) <= 0.05 * want, (
            f"expected {want:.0f} ± 5% accepted ({RATE}/s × {secs:.2f}s + {BURST}), got {accepted} "
            f"of {total} ({(accepted - want) / want:+.1%})\n{proc.stdout}")

        # The filter's own counters agree once the workers' ticks have flushed them; they also count the
        # requests still in flight when wrk stopped (at most one per connection).
        def counted() -> tuple[int, int]:
            s = envoy.stats("meshpilot.ratelimit.api.limited")
            return (s.get("wasmcustom.meshpilot.ratelimit.api.limited.allowed", 0),
                    s.get("wasmcustom.meshpilot.ratelimit.api.limited.rejected", 0))

        def agrees() -> bool:
            allowed, denied = counted()
            return allowed >= accepted and denied >= rejected and (allowed + denied) - total <= 32

        deadline = time.monotonic() + 5
        while not agrees() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert agrees(), f"expected stats allowed/rejected = {(accepted, rejected)} + up to 32 in flight, got {counted()}"
        code, headers = get(pport, "/x")
        assert code in (200, 429), f"expected 200 or 429 after the run, got {code}"


def test_buckets_per_caller_and_retry_after() -> None:
    build_modules()
    bport, pport = tb.free_port(), tb.free_port()
    policy = {"rate_limits": [{"name": "callers", "key": "caller", "rate": "1/h", "burst": 2,
                               "reply": {"body": "slow down\n", "headers": {"x-limit": "callers"}}}]}
    proxy = tb.proxy_bootstrap(pport, [tb.Route("all", "/", "backend")], {"backend": bport},
                               [{"name": "meshpilot", "typed_config": modules.wasm_filter(config.encode(policy))}])
    with tb.Envoy(tb.direct_response_bootstrap(bport), bport), tb.Envoy(proxy, pport, concurrency=2):
        for caller in ("web", "batch"):
            codes = [get(pport, "/", {"x-mesh-caller": caller})[0] for _ in range(2)]
            assert codes == [200, 200], f"caller {caller}: expected its burst of 2 to pass, got {codes}"
            code, headers = get(pport, "/", {"x-mesh-caller": caller})
            assert code == 429, f"caller {caller}: expected 429 after the burst, got {code}"
            assert headers.get("x-limit") == "callers", f"expected the configured reply header, got {headers}"
            # One token per hour: the next one is up to an hour away (the filter keeps rates in millionths
            # of a token per second, so 1/h refills a token every ~3610 s).
            assert 3500 <= int(headers.get("retry-after", "0")) <= 3620, f"expected Retry-After ~3600, got {headers}"
        codes = [get(pport, "/")[0] for _ in range(3)]
        assert codes == [200, 200, 429], f"requests without a caller share one bucket: expected [200, 200, 429], got {codes}"
