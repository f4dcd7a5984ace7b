"""``meshpilot perf ... --report DIR`` run for real, as a user runs it: two short benchmarks (xDS push to
simulated clients, and meshdns against dnsmasq and unbound) write their results into one directory,
which then holds each result as JSON with the run's facts and one index.html with an SVG chart per
benchmark in which every peer (xDS variant, DNS server) is drawn; ``meshpilot perf report DIR`` draws
the page again and names a file that is not a report."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]


def _meshpilot(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).with_name("meshpilot")), *args], capture_output=True, text=True, timeout=timeout)


def _svg(page: str, chart: str) -> str:
    start = page.index(f'data-chart="{chart}"')
    return page[start: page.index("</svg>", start)]


def test_two_benchmarks_into_one_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    xds = _meshpilot("perf", "xds", "--clients", "20", "--services", "20", "--endpoints", "2", "--burst", "20", "--report", str(out))
    assert xds.returncode == 0, f"expected perf xds to exit 0, got {xds.returncode}: {xds.stderr[-2000:]}"
    printed = json.loads(xds.stdout)
    assert printed["benchmark"] == "xds_push", f"expected the benchmark's own JSON on stdout as before, got {xds.stdout[:200]!r}"

    doc = json.loads((out / "xds.json").read_text())
    assert doc["result"] == printed, "expected xds.json to keep exactly the report the benchmark printed"
    assert doc["command_line"].startswith("meshpilot perf xds --clients 20"), f"expected the command line, got {doc['command_line']!r}"
    assert doc["arguments"]["clients"] == 20 and doc["arguments"]["burst"] == 20, f"expected the parsed options, got {doc['arguments']}"
    machine = doc["machine"]
    assert machine["cores"] >= 1 and machine["cpu_model"], f"expected the machine's cores and CPU model, got {machine}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", machine["versions"]["envoy"]), f"expected Envoy's version, got {machine['versions']}"
    for r in doc["result"]["results"]:
        samples = r["single_change"]["samples_s"]
        assert len(samples) == 20 and samples == sorted(samples), f"expected one sorted sample per client for {r['variant']}, got {samples}"
        assert len(r["burst"]["samples_from_last_write_s"]) == 20, f"expected the burst's samples for {r['variant']}"

    page = (out / "index.html").read_text()
    for chart in ("xds-single-change", "xds-burst"):
        got = re.findall(r'<g class="series" data-series="([^"]*)" data-samples="(\d+)"', _svg(page, chart))
        assert got == [("delta", "20"), ("sotw", "20")], f"expected a CDF of 20 samples per variant in {chart}, got {got}"
        assert (out / f"{chart}.svg").read_text().startswith("<svg xmlns="), f"expected {chart}.svg written beside the page"

    if not all(shutil.which(t) for t in ("dnsperf", "dnsmasq", "unbound")):
        pytest.skip("the DNS half needs dnsperf, dnsmasq and unbound")
    dns = _meshpilot("perf", "dns", "--names", "20", "--duration", "0.5", "--cpu-duration", "0.5", "--latency-duration", "0.5",
                     "--cpu-qps", "2000", "--latency-qps", "1000", "--rounds", "1", "--report", str(out))
    assert dns.returncode == 0, f"expected perf dns to exit 0, got {dns.returncode}: {dns.stderr[-2000:]}"
    assert (out / "dns.json").exists() and (out / "xds.json").exists(), "expected both results kept side by side"
    page = (out / "index.html").read_text()
    assert 'data-command="xds"' in page and 'data-command="dns"' in page, "expected one page with both benchmarks"
    for chart in ("dns-cpu", "dns-latency-mesh", "dns-latency-cdf", "dns-qps"):
        got = re.findall(r'<g class="series" data-series="([^"]*)"', _svg(page, chart))
        assert got == ["meshdns", "dnsmasq", "unbound"], f"expected every server in {chart}, got {got}"

    (out / "broken.json").write_text('{"command": "route", "result": ')
    redraw = _meshpilot("perf", "report", str(out), timeout=60)
    assert redraw.returncode == 0, f"expected the page drawn again, got {redraw.returncode}: {redraw.stderr}"
    assert "broken.json: not JSON" in redraw.stderr, f"expected the broken file named, got {redraw.stderr!r}"
    page = (out / "index.html").read_text()
    assert "broken.json: not JSON" in page and 'data-chart="xds-single-change"' in page and 'data-chart="dns-cpu"' in page, \
        "expected the broken file named on the page and both benchmarks still drawn"
