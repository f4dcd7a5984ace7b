"""The benchmarks' report (perf/report.py): CDF points, the SVG charts drawn from each command's result,
and the HTML page of a report directory, including files that are not reports."""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

import argparse

import pytest

from meshpilot.perf import command, report


@given(st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=300))
def test_cdf_points_rise_and_end_at_one(samples: list[float]) -> None:
    pts = report.cdf_points(samples)
    xs, ys = [x for x, _ in pts], [y for _, y in pts]
    assert xs == sorted(set(xs)), f"expected strictly increasing values, got {xs[:10]}"
    assert all(a < b for a, b in zip(ys, ys[1:])), f"expected strictly increasing shares, got {ys[:10]}"
    assert ys[-1] == 1.0, f"expected the last share to be 1.0, got {ys[-1]}"
    assert xs[0] == min(samples) and xs[-1] == max(samples), f"expected the CDF to span {min(samples)}..{max(samples)}, got {xs[0]}..{xs[-1]}"


def test_cdf_points_count_duplicates_and_skip_non_finite() -> None:
    assert report.cdf_points([0.2, 0.1, 0.2, float("nan"), 0.4]) == [(0.1, 0.25), (0.2, 0.75), (0.4, 1.0)]
    assert report.cdf_points([]) == [], "expected no points for no samples"


def _xds_result(variants: dict[str, list[float]]) -> dict[str, Any]:
    return {"benchmark": "xds_push", "results": [
        {"variant": v, "clients": len(s), "services": 10, "endpoints_per_service": 2,
         "single_change": {"p50": 0.1, "p99": 0.2, "max": 0.3, "samples_s": s},
         "burst": {"registrations": 20, "samples_from_last_write_s": [x * 2 for x in s]}}
        for v, s in variants.items()]}


def _doc(command: str, result: dict[str, Any], argv: list[str] | None = None) -> dict[str, Any]:
    t = datetime.datetime(2026, 12, 2, 10, 0, tzinfo=datetime.timezone.utc)
    machine = {"cores": 2, "cpu_model": "Test CPU <fast>", "kernel": "6.1", "load_average": [1.0, 1.0, 1.0],
               "versions": {"python": "3.11", "meshpilot": "0.1.0", "envoy": "1.40.0"}}
    return report.document(command, result, argv or ["meshpilot", "perf", command], t, t + datetime.timedelta(seconds=42), 0, machine)


def _series(svg: str) -> list[str]:
    return re.findall(r'<g class="series" data-series="([^"]*)"', svg)


def test_xds_cdf_names_every_variant_in_the_legend_and_labels_its_axes() -> None:
    charts = report.charts("xds", _xds_result({"delta": [0.12, 0.1, 0.3], "sotw": [0.2, 0.25]}))
    single = next(c for c in charts if c.name == "xds-single-change")
    svg = report.svg(single)
    assert _series(svg) == ["delta", "sotw"], f"expected a line per variant, got {_series(svg)}"
    legend = re.findall(r'<g class="legend-entry" data-series="([^"]*)">.*?<text[^>]*>([^<]*)</text>', svg)
    assert legend == [("delta", "delta (3 samples; p50 0.12, p99 0.3, max 0.3)"), ("sotw", "sotw (2 samples; p50 0.25, p99 0.25, max 0.25)")], \
        f"expected every variant in the legend with its samples and percentiles, got {legend}"
    assert 'class="x-label"' in svg and "seconds from the write" in svg, "expected the x axis labelled with its unit"
    assert "share of samples ≤ x" in svg, "expected the y axis labelled"
    # the last corner of each line is at share 1.0: the plot's top
    for path in re.findall(r'<path d="([^"]+)"', svg):
        last_y = float(path.rsplit(",", 1)[1])
        assert last_y == float(report._TOP), f"expected each CDF to end at the top of the plot (share 1.0), ends at y={last_y}"


def test_peer_result_plots_one_line_per_peer() -> None:
    peer = {"single_change": {"write_to_each_envoy_applied_s": [0.02, 0.03], "write_to_last_envoy_applied_s": [0.03],
                              "cpu_seconds_per_change": 0.01},
            "burst": {"cpu_seconds_per_change": 0.001}}
    result = {"benchmark": "xds_peer_real_envoys", "results": [
        {"variant": "delta", "envoys": 2, "services": 6, "endpoints_per_service": 2,
         "peers": {"meshpilot": peer, "go-control-plane": {**peer, "single_change": {**peer["single_change"], "samples": {
             "write_to_each_envoy_applied_s": [1.0, 2.0, 3.0]}}}}}]}
    charts = report.charts("xds-envoys", result)
    each = next(c for c in charts if c.name == "xds-peers-each")
    assert isinstance(each, report.Cdf)
    assert each.series == {"meshpilot": [0.02, 0.03], "go-control-plane": [1.0, 2.0, 3.0]}, f"got {each.series}"
    assert _series(report.svg(each)) == ["meshpilot", "go-control-plane"]


def test_bars_draw_every_series_and_mark_what_was_not_measured() -> None:
    bars = report.Bars("b", "Title", "requests per second", ["a_none", "e_both"], {"rps": [1000.0, None]})
    svg = report.svg(bars)
    assert _series(svg) == ["rps"], f"expected the one series, got {_series(svg)}"
    assert svg.count("<rect x=") == 1 + 1, "expected one bar (and the legend swatch)"
    assert "not measured" in svg, "expected the missing value marked, not drawn as zero"
    assert "requests per second" in svg and ">a_none<" in svg and ">e_both<" in svg, "expected the axis and row labels"


def test_names_are_escaped() -> None:
    chart = report.Cdf("x", "<b>title</b>", "s & ms", {'<script>alert("x")</script>': [0.1, 0.2]})
    svg = report.svg(chart)
    assert "<script>" not in svg and "<b>" not in svg, "expected markup in names escaped"
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in svg and "s &amp; ms" in svg, "expected escaped names shown"
    page = report.render_index([report.Loaded("x.json", doc=_doc("xds", _xds_result({"<i>v</i>": [0.1]}), ["a", "<b>"]), label="x")])
    assert "<i>v</i>" not in page and "&lt;i&gt;v&lt;/i&gt;" in page, "expected the variant name escaped on the page"
    assert "Test CPU &lt;fast&gt;" in page, "expected the machine's CPU model escaped on the page"


def test_each_command_has_its_charts() -> None:
    dns = {"settings": {"cpu_qps": 20000, "latency_qps": 10000}, "results": {
        s: {k: {"throughput": {"qps": 1e5}, "cpu": {"cpu_us_per_query": 9.5},
                "latency": {"p50_ms": 0.05, "p90_ms": 0.1, "p99_ms": 1.0, "p999_ms": 3.0, "quantiles_ms": [0.01 * i for i in range(101)]}}
            for k in ("mesh", "forwarded_cached")} for s in ("meshdns", "dnsmasq", "unbound")}}
    route = {"benchmark": "route", "settings": {"duration_s": 2, "connections": 16, "wrk_threads": 2, "rounds": 1},
             "scenarios": {"a_none": {"rps": 9000.0, "proxy_cpu_us_per_request": 50.0}, "e_both": {"rps": 8000.0, "proxy_cpu_us_per_request": 60.0}}}
    registry = {"store": "sqlite:/tmp/x", "registrations": {"registrations": 60, "services": 60, "concurrency": 4,
                "register": {"per_s": 500.0, "p99_ms": 20.0}, "deregister": {"per_s": 800.0, "p99_ms": 9.0}}}
    ca = {"scenarios": {"authority_sign": {"csrs_per_s": 3000, "cpu_us_per_csr": 270}}}
    names = {cmd: [c.name for c in report.charts(cmd, r)] for cmd, r in
             (("dns", dns), ("route", route), ("registry", registry), ("ca", ca))}
    assert names == {
        "dns": ["dns-cpu", "dns-latency-mesh", "dns-latency-forwarded-cached", "dns-latency-cdf", "dns-qps"],
        "route": ["route-rps", "route-cpu"],
        "registry": ["registry-rate", "registry-p99"],
        "ca": ["ca-rate", "ca-cpu"],
    }, f"got {names}"
    dns_cpu = report.svg(report.charts("dns", dns)[0])
    assert _series(dns_cpu) == ["meshdns", "dnsmasq", "unbound"], f"expected every server in the DNS CPU chart, got {_series(dns_cpu)}"


def test_a_directory_page_keeps_good_sections_beside_garbled_files(tmp_path: Path) -> None:
    (tmp_path / "xds.json").write_text(json.dumps(_doc("xds", _xds_result({"delta": [0.1, 0.2], "sotw": [0.3]}))))
    (tmp_path / "dns.json").write_text('{"command": "dns", "result": {')  # cut short
    (tmp_path / "notes.json").write_text('["not", "a", "report"]')
    (tmp_path / "route.json").write_text(json.dumps(_doc("route", {"benchmark": "route", "scenarios": "junk"})))
    page = report.write_index(tmp_path).read_text()
    assert "dns.json: not JSON: " in page and "line 1 column" in page, "expected the cut-short file named with where it breaks"
    assert "notes.json: not a meshpilot perf report: the top level is a JSON list" in page, "expected the list named as not a report"
    assert "route.json: its result lacks what the route charts read" in page, "expected the route result's problem shown"
    assert 'data-command="xds"' in page and _series(page).count("delta") == 2, "expected the xds section drawn in full (two CDFs)"
    assert (tmp_path / "xds-single-change.svg").read_text().startswith('<svg xmlns="http://www.w3.org/2000/svg"'), \
        "expected each chart also written as a standalone SVG file"


def test_several_runs_of_one_command_share_charts(tmp_path: Path) -> None:
    reg = {"store": "", "registrations": {"registrations": 60, "services": 60, "concurrency": 4,
           "register": {"per_s": 500.0, "p99_ms": 20.0}, "deregister": {"per_s": 800.0, "p99_ms": 9.0}}}
    report.write_report(tmp_path, _doc("registry", {**reg, "store": "sqlite:/tmp/x/bench.db"}), stem="registry-sqlite")
    report.write_report(tmp_path, _doc("registry", {**reg, "store": "3-member etcd: etcd://127.0.0.1:1"}), stem="registry-etcd")
    page = (tmp_path / "index.html").read_text()
    rate = page[page.index('data-chart="registry-rate"'):]
    rate = rate[: rate.index("</svg>")]
    assert _series(rate) == ["3-member etcd", "SQLite"], f"expected both stores in one chart, got {_series(rate)}"
    # two runs of the same variants: each line named after its run's file
    report.write_report(tmp_path, _doc("xds", _xds_result({"delta": [0.1]})), stem="xds-a")
    report.write_report(tmp_path, _doc("xds", _xds_result({"delta": [0.2]})), stem="xds-b")
    page = (tmp_path / "index.html").read_text()
    single = page[page.index('data-chart="xds-single-change"'):]
    assert _series(single[: single.index("</svg>")]) == ["xds-a: delta", "xds-b: delta"], f"got {_series(single)}"


def test_an_empty_or_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    for d, words in ((tmp_path, "no report in"), (tmp_path / "nope", "no report directory")):
        try:
            report.write_index(d)
        except FileNotFoundError as exc:
            assert words in str(exc), f"expected {words!r} in the error, got {exc}"
        else:
            raise AssertionError(f"expected an error for {d}, got an index")


def test_first_json_object_in_a_benchmarks_output() -> None:
    out = "12:00:01 starting\n{\n  \"benchmark\": \"x\",\n  \"v\": [1, {\"a\": 2}]\n}\nperf x: summary {not json}\n"
    assert report.first_json_object(out) == {"benchmark": "x", "v": [1, {"a": 2}]}
    assert report.first_json_object("no json here\n{broken\n") is None


def test_an_axis_that_starts_above_zero_labels_its_start() -> None:
    svg = report.svg(report.Cdf("c", "t", "s", {"a": [0.1609 + 0.001 * i for i in range(341)]}))
    ticks = re.findall(r'text-anchor="middle">([0-9.]+)</text>', svg)
    assert ticks[:2] == ["0.1", "0.2"], f"expected the x axis labelled from its start, 0.1, got {ticks}"


def test_the_other_shapes_have_their_charts() -> None:
    churn = {"benchmark": "xds_churn", "results": [
        {"variant": v, "envoys": 3, "rounds": 2, "samples": {"last_write_to_each_envoy_s": [0.1, 0.2, 0.15]}} for v in ("delta", "sotw")]}
    (c,) = report.charts("xds", churn)
    assert isinstance(c, report.Cdf) and c.series == {"delta": [0.1, 0.2, 0.15], "sotw": [0.1, 0.2, 0.15]}, f"got {c}"
    envoys = {"benchmark": "xds_single_real_envoys", "results": [
        {"variant": "delta", "envoys": 2, "services": 5, "endpoints_per_service": 1,
         "single_change": {"samples": {"write_to_each_envoy_ack_s": [0.01, 0.02], "write_to_last_envoy_ack_s": [0.02]}}}]}
    each, last = report.charts("xds-envoys", envoys)
    assert (each.series, last.series) == ({"delta": [0.01, 0.02]}, {"delta": [0.02]}), f"got {each.series} {last.series}"
    abuse = {"benchmark": "xds_abuse", "result": {
        "dead_readers": {"streams": 10, "first_config_seconds": {"clusters": 0.1, "endpoints": 0.2},
                         "first_config_alone_seconds": {"clusters": 0.01, "endpoints": 0.02}},
        "huge_requests": {"clients": 2, "mb_each": 4, "api_latency_seconds": {"median": 0.003, "max": 0.009}}}}
    first, api = report.charts("xds-abuse", abuse)
    assert isinstance(first, report.Bars) and first.series["once each was sent a response"] == [None, None], f"got {first.series}"
    assert isinstance(api, report.Bars) and api.series == {"API": [0.003, 0.009]}, f"got {api.series}"
    consul = {"store": "(external)", "target": "127.0.0.1:8500", "registrations": {
        "registrations": 1, "services": 1, "concurrency": 1, "register": {"per_s": 1.0, "p99_ms": 1.0},
        "deregister": {"per_s": 1.0, "p99_ms": 1.0}}}
    assert list(report.charts("registry", consul)[0].series) == ["Consul API at 127.0.0.1:8500"], "expected an external target named"
    tracing = {"benchmark": "tracing", "settings": {"rounds": 3}, "scenarios": {
        "untraced": {"rps": 9000.0, "envoy_cpu_us_per_request": 90.0, "cpu_us_per_request_by_role": {"receiver": 0.1}},
        "traced_100": {"rps": 4000.0, "envoy_cpu_us_per_request": 230.0, "cpu_us_per_request_by_role": {"receiver": 61.0}}}}
    rps, cpu = report.charts("route", tracing)  # perf route --tracing
    assert rps.groups == ["untraced", "traced_100"] and rps.series == {"rps": [9000.0, 4000.0]}, f"got {rps}"
    assert cpu.series == {"Envoys": [90.0, 230.0], "span receiver": [0.1, 61.0]}, f"got {cpu.series}"


def _parsed(tmp_path: Path, *extra: str) -> argparse.Namespace:
    return argparse.Namespace(report=tmp_path, report_name="", **dict(zip(extra[::2], extra[1::2])))


@pytest.fixture
def facts(monkeypatch: pytest.MonkeyPatch) -> None:
    """No git or Envoy asked for versions: unit tests start no process."""
    monkeypatch.setattr(report, "machine_facts", lambda: {"cores": 2, "cpu_model": "x", "versions": {}})


def test_report_keeps_what_the_benchmark_printed(tmp_path: Path, facts: None, capsys: pytest.CaptureFixture[str]) -> None:
    def main(args: argparse.Namespace) -> int:
        print(json.dumps(_xds_result({"delta": [0.1, 0.2]}), indent=2))
        print("a summary line")
        return 0

    assert command._reported("xds", main)(_parsed(tmp_path)) == 0
    out = capsys.readouterr().out
    assert out.startswith("{") and out.endswith("a summary line\n"), f"expected the benchmark's output untouched, got {out[-200:]!r}"
    doc = json.loads((tmp_path / "xds.json").read_text())
    assert doc["result"] == _xds_result({"delta": [0.1, 0.2]}) and doc["machine"]["cores"] == 2, f"got {doc}"
    assert "load_average_at_end" in doc["machine"], "expected the load at the end recorded"
    assert 'data-chart="xds-single-change"' in (tmp_path / "index.html").read_text(), "expected the page drawn"


def test_report_of_a_benchmark_that_printed_no_json_writes_nothing(tmp_path: Path, facts: None,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert command._reported("route", lambda args: 1)(_parsed(tmp_path)) == 1, "expected the benchmark's exit code"
    assert "printed no JSON report (exit code 1); nothing written" in capsys.readouterr().err
    assert not list(tmp_path.iterdir()), f"expected nothing written, got {list(tmp_path.iterdir())}"
    bad = argparse.Namespace(report=tmp_path, report_name="../x")
    assert command._reported("route", lambda args: 0)(bad) == 2, "expected a report name that is not a file name stem refused"
    assert "--report-name '../x'" in capsys.readouterr().err
