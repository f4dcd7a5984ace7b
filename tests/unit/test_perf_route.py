"""`meshpilot perf route`'s own parts: wrk's report parsed, callgrind's totals summed, the scenarios'
proxy configurations (the switched-off route, the probes, the CEL header), and bad flag pairs."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from meshpilot.perf import route
from meshpilot.wasm import modules

needs_modules = pytest.mark.skipif(not all((modules._DIR / f"{m}.wasm").is_file() for m in modules.MODULES),
                                   reason="the WASM modules are not built (scripts/build-filters.sh)")

WRK = """Running 10s test @ http://127.0.0.1:1234/
  2 threads and 16 connections
  Latency Distribution
     50%    2.36ms
     75%  870.00us
     90%    1.02s
     99%    3.92ms
  65343 requests in 10.00s, 9.54MB read
  Non-2xx or 3xx responses: 12
Requests/sec:   6534.30
"""


def test_wrk_report_is_parsed_with_units() -> None:
    got = route._parse_wrk(WRK)
    assert got["rps"] == 6534.3 and got["requests"] == 65343 and got["non_2xx"] == 12, f"unexpected totals {got}"
    assert got["latency_ms"] == {"p50": 2.36, "p75": 0.87, "p90": 1020.0, "p99": 3.92}, f"unexpected latencies {got['latency_ms']}"
    with pytest.raises(RuntimeError, match="unexpected wrk output"):
        route._parse_wrk("connection refused")


def test_callgrind_totals_are_summed_over_dumps(tmp_path: Path) -> None:
    (tmp_path / "cg.out.1").write_text("events: Ir\nfn=main\n1 5\nsummary: 1500\ntotals: 1500\n")
    (tmp_path / "cg.out").write_text("events: Ir\ntotals: 20\n")
    (tmp_path / "envoy.log").write_text("totals: 999999\n")
    assert route._callgrind_total(str(tmp_path)) == 1520, "expected the dumps' totals summed and other files ignored"


@needs_modules
def test_scenario_configurations() -> None:
    def routes(name: str) -> list[dict]:
        boot = route._bootstrap(name, 10001, 10002)
        hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        return hcm["route_config"]["virtual_hosts"][0]["routes"]

    off = routes("h_switched_off")[0].get("typed_per_filter_config", {}).get("meshpilot", {})
    assert off.get("disabled") is True, f"expected (h) to switch the filter off on its route, got {off}"
    assert "typed_per_filter_config" not in routes("e_both")[0], "expected (e) to run the filter"
    both = route._filters("e_both")[0]["typed_config"]["config"]["configuration"]["value"]
    assert "[breaker" in both and "[ratelimit" in both, f"expected (e) to configure both sections, got:\n{both}"
    probe = route._filters("p_route")[0]["typed_config"]["config"]
    assert probe["configuration"]["value"] == "route = 10" and probe["vm_config"]["vm_id"] == "probe", f"unexpected probe config {probe}"
    cel = routes("p_cel_header")[0]["response_headers_to_add"][0]
    assert cel["header"]["value"].startswith("%CEL(") and cel["keep_empty_value"] is False, f"unexpected CEL header {cel}"


def test_probes_need_instructions() -> None:
    parser = argparse.ArgumentParser()
    route.add_arguments(parser)
    assert route.main(parser.parse_args(["--probes"])) == 2, "expected --probes without --instructions to be refused"
    assert route.main(parser.parse_args(["--instructions", "-5"])) == 2, "expected a negative request count to be refused"
