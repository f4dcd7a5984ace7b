"""``meshpilot perf xds-envoys --peer go-control-plane`` run end to end on a small mesh: it builds the
go-control-plane peer (perf/gcp_peer), serves a seeded meshpilot's resources from both to real Envoys,
runs the same changes through each, and reports each peer's propagation as Envoy logged it; every
process it started is gone when it returns. Run as ``meshpilot perf xds-envoys ... --report DIR``, it
also keeps its result in DIR with every sample, and DIR/index.html draws each peer's CDF."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import psutil
import pytest

from meshpilot import cli
from meshpilot.perf import xds_peer

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(600),
    pytest.mark.skipif(shutil.which("go") is None and not Path("/usr/local/go/bin/go").exists(),
                       reason="the go-control-plane peer is built with a Go toolchain (go on PATH or /usr/local/go/bin/go)"),
]


def test_meshpilot_and_go_control_plane_side_by_side(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = cli.main(["perf", "xds-envoys", "--peer", "go-control-plane", "--envoys", "2", "--services", "6", "--endpoints", "2",
                     "--rounds", "3", "--burst", "4", "--gap", "0.2", "--round-timeout", "10", "--variants", "delta",
                     "--report", str(tmp_path)])
    assert code == 0, "expected the benchmark to exit 0"
    report = json.loads(capsys.readouterr().out)
    assert report["benchmark"] == "xds_peer_real_envoys", f"expected the peer benchmark's report, got {report['benchmark']}"
    (result,) = report["results"]
    assert set(result["peers"]) == {"meshpilot", "go-control-plane"}, f"expected both peers, got {sorted(result['peers'])}"
    for name, peer in result["peers"].items():
        single, burst = peer["single_change"], peer["burst"]
        assert single["envoy_rounds_timed_out"] == 0, f"expected every Envoy to apply every change from {name}, {single['envoy_rounds_timed_out']} did not"
        w = single["write_to_last_envoy_applied"]
        assert 0 < w["p50"] <= w["p99"] < 10, f"expected {name}'s single changes timed from Envoy's log, got {w}"
        assert math.isfinite(single["cpu_seconds_per_change"]), f"expected {name}'s CPU per change, got {single['cpu_seconds_per_change']}"
        assert burst["last_write_to_last_envoy_applied"] is not None, f"expected every Envoy to apply {name}'s burst, got {burst}"
        assert burst["envoys_holding_last_change"] == 2, f"expected both Envoys to hold {name}'s last change (admin /stats), got {burst}"
    workdir = result["workdir"]
    left = [p.info for p in psutil.process_iter(["pid", "cmdline"]) if any(workdir in a for a in p.info["cmdline"] or [])]
    assert not left, f"expected no process of the run left, got {left}"
    assert Path(workdir, "gcp-resources.json").exists(), "expected the peer's resources file in the run's directory"
    assert xds_peer.gcp_peer_binary(Path.home() / ".cache" / "meshpilot" / "gcp-peer").exists(), "expected the built peer to be cached"

    kept = json.loads((tmp_path / "xds-envoys.json").read_text())
    assert kept["command"] == "xds-envoys" and kept["result"] == report, "expected xds-envoys.json to keep the printed report"
    for name, peer in kept["result"]["results"][0]["peers"].items():
        each = peer["single_change"]["samples"]["write_to_each_envoy_applied_s"]
        assert len(each) == 3 * 2, f"expected a sample per Envoy per round from {name}, got {each}"
    page = (tmp_path / "index.html").read_text()
    for chart in ("xds-peers-each", "xds-peers-last"):
        start = page.index(f'data-chart="{chart}"')
        drawn = re.findall(r'<g class="series" data-series="([^"]*)" data-samples="(\d+)"', page[start:page.index("</svg>", start)])
        want = [("meshpilot", "6" if chart.endswith("each") else "3"), ("go-control-plane", "6" if chart.endswith("each") else "3")]
        assert drawn == want, f"expected a CDF per peer in {chart}, got {drawn}"
