"""Reports of the benchmarks: each ``meshpilot perf`` run's JSON kept in a directory, and one HTML page
with inline SVG plots of every result found there.

A benchmark run with ``--report DIR`` (perf/command.py) writes ``DIR/<command>.json``: the JSON report
the benchmark prints, wrapped with the facts needed to read it later (the command line, the time, the
machine's cores and CPU model, the versions of Python, meshpilot and Envoy). ``DIR/index.html`` then
renders every such file in DIR, so several benchmarks run into one directory make one report, and
``meshpilot perf report DIR`` renders it again. Each plot is also written as ``DIR/<name>.svg`` for the
docs (docs/perf.md).

The rendering is pure (a report document in, SVG or HTML text out): ``charts`` picks what to plot from
one command's result, ``svg`` draws a chart, ``render_index`` lays out a page. No JavaScript, nothing
fetched: the page is one file that opens anywhere. Only ``machine_facts`` (which reads /proc and asks
git and Envoy their versions), ``write_report``, ``load_reports`` and ``write_index`` look outside. Like the rest of perf/ this sits beside the product and measures it;
nothing in the product imports it.
"""

from __future__ import annotations

import datetime
import html
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Bars", "Cdf", "Chart", "Loaded", "cdf_points", "charts", "document", "load_reports", "machine_facts",
    "render_index", "svg", "write_index", "write_report",
]

FORMAT = 1  # the version of the wrapper document's layout
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22")


# ---- what a chart is ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cdf:
    """Empirical CDFs of samples, one line per series (a peer, a variant, a server)."""

    name: str  # a file name stem for the SVG: letters, digits, '-'
    title: str
    x_label: str
    series: dict[str, list[float]]
    note: str = ""


@dataclass(frozen=True, slots=True)
class Bars:
    """Horizontal bars: one row per group (a scenario, a phase), one bar per series within it."""

    name: str
    title: str
    x_label: str
    groups: list[str]
    series: dict[str, list[float | None]]  # each aligned with groups; None: not measured
    note: str = ""


Chart = Cdf | Bars


@dataclass(frozen=True, slots=True)
class Loaded:
    """One JSON file of a report directory: its document, or why it could not be read."""

    file: str
    doc: dict[str, Any] | None = None
    error: str = ""
    label: str = field(default="")


# ---- the document a run writes --------------------------------------------------------------------


def document(command: str, result: dict[str, Any], argv: Sequence[str], started: datetime.datetime,
             finished: datetime.datetime, exit_code: int, machine: dict[str, Any],
             arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON kept for one run of ``meshpilot perf <command>``: its result, the command line as given
    and every option's value as parsed (defaults included), the time and the machine."""
    return {
        "meshpilot_perf_report": FORMAT,
        "command": command,
        "command_line": shlex.join(argv),
        "arguments": arguments or {},
        "started_utc": started.astimezone(datetime.timezone.utc).isoformat(timespec="seconds"),
        "finished_utc": finished.astimezone(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round((finished - started).total_seconds(), 1),
        "exit_code": exit_code,
        "machine": machine,
        "result": result,
    }


def machine_facts() -> dict[str, Any]:
    """Cores, CPU model, kernel, load average and the versions that shape a benchmark's numbers."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu_model": model or platform.processor() or "unknown",
        "kernel": platform.release(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "versions": {"python": platform.python_version(), "meshpilot": _meshpilot_version(), "envoy": _envoy_version()},
    }


def _meshpilot_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("meshpilot")
    except PackageNotFoundError:
        v = "unknown"
    here = str(Path(__file__).resolve().parent.parent)
    commit = _run(["git", "-C", here, "rev-parse", "--short", "HEAD"])
    if not commit:
        return v
    dirty = _run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no", "--", "."])
    return f"{v} (commit {commit}{', with uncommitted changes in meshpilot/' if dirty else ''})"


def _envoy_version() -> str:
    envoy = shutil.which("envoy") or str(Path(sys.executable).with_name("envoy"))
    out = _run([envoy, "--version"])
    m = re.search(r"version: \S+/(\d+\.\d+\.\d+)", out)
    return m.group(1) if m else (out.strip().splitlines()[-1] if out.strip() else "not found")


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def first_json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object printed on its own lines in ``text`` (a benchmark's stdout), or None."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"^\{", text, re.M):
        try:
            value, _end = decoder.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


# ---- reading and writing a report directory --------------------------------------------------------


def write_report(directory: Path, doc: dict[str, Any], stem: str = "") -> Path:
    """Write ``doc`` as ``directory/<stem or command>.json`` and render the directory's index again."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem or doc['command']}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(path)
    write_index(directory)
    return path


def load_reports(directory: Path) -> list[Loaded]:
    """Every ``*.json`` in ``directory``, each read on its own: a file that is not a report is an error
    entry naming the file and the reason, and the others are read as usual."""
    out = []
    for path in sorted(directory.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except UnicodeDecodeError as exc:
            out.append(Loaded(path.name, error=f"not text: {exc.reason} at byte {exc.start}"))
            continue
        except json.JSONDecodeError as exc:
            out.append(Loaded(path.name, error=f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"))
            continue
        except OSError as exc:
            out.append(Loaded(path.name, error=f"cannot be read: {exc.strerror or exc}"))
            continue
        problem = _not_a_report(doc)
        out.append(Loaded(path.name, error=problem) if problem else Loaded(path.name, doc=doc, label=path.stem))
    return out


def _not_a_report(doc: Any) -> str:
    if not isinstance(doc, dict):
        return f"not a meshpilot perf report: the top level is a JSON {type(doc).__name__}, expected an object"
    if not isinstance(doc.get("command"), str) or not doc["command"]:
        return "not a meshpilot perf report: no 'command' (a string naming the benchmark)"
    if not isinstance(doc.get("result"), dict):
        return "not a meshpilot perf report: no 'result' object (the benchmark's JSON report)"
    return ""


def write_index(directory: Path) -> Path:
    """Render ``directory/index.html`` (and each chart as ``<name>.svg``) from the reports in it."""
    if not directory.is_dir():
        raise FileNotFoundError(f"no report directory {directory}")
    loaded = load_reports(directory)
    if not loaded:
        raise FileNotFoundError(f"no report in {directory}: expected <command>.json files written by `meshpilot perf <command> --report {directory}`")
    for chart in _all_charts(loaded):
        (directory / f"{chart.name}.svg").write_text(svg(chart, standalone=True))
    path = directory / "index.html"
    path.write_text(render_index(loaded))
    return path


# ---- what to plot from each benchmark's result ---------------------------------------------------


def charts(command: str, result: dict[str, Any]) -> list[Chart]:
    """The charts of one run of ``meshpilot perf <command>``; KeyError/TypeError/ValueError when the
    result does not have the fields the command's charts read."""
    bench = result.get("benchmark")
    if bench == "xds_churn":
        return _xds_churn(result)
    if bench == "xds_peer_real_envoys":
        return _xds_peer(result)
    fn = _CHARTS.get(command)
    return fn(result) if fn else []


def _samples(d: dict[str, Any], key: str) -> list[float]:
    v = d.get("samples", {}).get(key) if isinstance(d.get("samples"), dict) else None
    if v is None:
        v = d.get(key)
    return [float(x) for x in v] if isinstance(v, list) else []


def _xds_push(result: dict[str, Any]) -> list[Chart]:
    rs = result["results"]
    single = {r["variant"]: _samples(r["single_change"], "samples_s") for r in rs}
    burst = {r["variant"]: _samples(r["burst"], "samples_from_last_write_s") for r in rs}
    r0 = rs[0]
    size = f"{r0['clients']} clients, {r0['services']} services × {r0['endpoints_per_service']} endpoints"
    return [
        Cdf("xds-single-change", f"One new instance → each client has it ({size})", "seconds from the write", single),
        Cdf("xds-burst", f"Burst of {r0['burst']['registrations']} registrations: last write → each client has the last one ({size})",
            "seconds from the last write", burst),
    ]


def _xds_churn(result: dict[str, Any]) -> list[Chart]:
    rs = result["results"]
    r0 = rs[0]
    return [Cdf("xds-churn", f"Service update + new instance → each Envoy applied both ({r0['envoys']} Envoys, {r0['rounds']} rounds)",
                "seconds from the last write", {r["variant"]: _samples(r, "last_write_to_each_envoy_s") for r in rs})]


def _xds_envoys(result: dict[str, Any]) -> list[Chart]:
    rs = result["results"]
    r0 = rs[0]
    size = f"{r0['envoys']} Envoys, {r0['services']} × {r0['endpoints_per_service']}"
    each = {r["variant"]: _samples(r["single_change"], "write_to_each_envoy_ack_s") for r in rs}
    last = {r["variant"]: _samples(r["single_change"], "write_to_last_envoy_ack_s") for r in rs}
    return [
        Cdf("xds-envoys-each", f"Single change: write → each Envoy's ACK ({size})", "seconds from the write", each),
        Cdf("xds-envoys-last", f"Single change: write → the last Envoy's ACK, per round ({size})", "seconds from the write", last),
    ]


def _xds_peer(result: dict[str, Any]) -> list[Chart]:
    rs = result["results"]
    r0 = rs[0]
    size = f"{r0['envoys']} Envoys, {r0['services']} × {r0['endpoints_per_service']}"
    multi = len(rs) > 1
    each: dict[str, list[float]] = {}
    last: dict[str, list[float]] = {}
    cpu: dict[str, list[float | None]] = {}
    for r in rs:
        for peer, p in r["peers"].items():
            name = f"{peer} ({r['variant']})" if multi else peer
            each[name] = _samples(p["single_change"], "write_to_each_envoy_applied_s")
            last[name] = _samples(p["single_change"], "write_to_last_envoy_applied_s")
            cpu[name] = [p["single_change"].get("cpu_seconds_per_change"), p["burst"].get("cpu_seconds_per_change")]
    variants = ", ".join(r["variant"] for r in rs)
    return [
        Cdf("xds-peers-each", f"Single change: write → each Envoy applied it, from Envoy's log ({size}, {variants})",
            "seconds from the write", each),
        Cdf("xds-peers-last", f"Single change: write → the last Envoy applied it, per round ({size}, {variants})",
            "seconds from the write", last),
        Bars("xds-peers-cpu", f"Control-plane CPU per change ({size}, {variants})", "CPU seconds per change",
             ["single change", "burst (per change)"], cpu),
    ]


_KIND = {"mesh": "mesh names", "forwarded_cached": "cached forwarded names"}
_PCTS = (("p50_ms", "p50"), ("p90_ms", "p90"), ("p99_ms", "p99"), ("p999_ms", "p99.9"))


def _dns(result: dict[str, Any]) -> list[Chart]:
    res: dict[str, Any] = result["results"]
    settings = result.get("settings", {})
    kinds = [k for k in _KIND if any(k in r for r in res.values())]
    servers = list(res)
    out: list[Chart] = [
        Bars("dns-cpu", f"Server CPU per answered query at {settings.get('cpu_qps', '?')} qps offered (median round)",
             "CPU µs per query", [_KIND[k] for k in kinds],
             {s: [res[s].get(k, {}).get("cpu", {}).get("cpu_us_per_query") for k in kinds] for s in servers}),
    ]
    for k in kinds:
        out.append(Bars(f"dns-latency-{k.replace('_', '-')}",
                        f"Latency percentiles at {settings.get('latency_qps', '?')} qps, {_KIND[k]} (median round)", "milliseconds",
                        [label for _key, label in _PCTS],
                        {s: [res[s].get(k, {}).get("latency", {}).get(key) for key, _label in _PCTS] for s in servers}))
    quantiles = {s: _samples(res[s].get("mesh", {}).get("latency", {}), "quantiles_ms") for s in servers}
    if any(quantiles.values()):
        out.append(Cdf("dns-latency-cdf", f"Latency at {settings.get('latency_qps', '?')} qps, mesh names (median round)",
                       "milliseconds", quantiles, note="drawn from the run's 101 latency quantiles (0, 1, …, 100 %)"))
    out.append(Bars("dns-qps", "Saturated throughput (dnsperf at full speed, median round)", "queries per second",
                    [_KIND[k] for k in kinds],
                    {s: [res[s].get(k, {}).get("throughput", {}).get("qps") for k in kinds] for s in servers}))
    return out


def _route(result: dict[str, Any]) -> list[Chart]:
    sc: dict[str, Any] = result["scenarios"]
    names = list(sc)
    if result.get("benchmark") == "tracing":
        s = result.get("settings", {})
        return [
            Bars("route-tracing-rps", f"Requests per second on a sidecar hop by tracing sampling (rounds: {s.get('rounds', 1)})",
                 "requests per second", names, {"rps": [sc[n].get("rps") for n in names]}),
            Bars("route-tracing-cpu", "Both Envoys' CPU per request by tracing sampling", "CPU µs per request", names,
                 {"Envoys": [sc[n].get("envoy_cpu_us_per_request") for n in names],
                  "span receiver": [sc[n].get("cpu_us_per_request_by_role", {}).get("receiver") for n in names]}),
        ]
    if result.get("benchmark") == "route-instructions":
        return [Bars("route-instructions", "Instructions per request (callgrind)", "instructions per request", names,
                     {"instructions": [sc[n].get("instructions_per_request") for n in names]})]
    s = result.get("settings", {})
    how = f"wrk {s.get('wrk_threads', '?')} threads × {s.get('connections', '?')} connections, {s.get('duration_s', '?')} s per scenario"
    return [
        Bars("route-rps", f"Requests per second per scenario ({how}, rounds: {s.get('rounds', 1)})", "requests per second",
             names, {"rps": [sc[n].get("rps") for n in names]}),
        Bars("route-cpu", "Proxy CPU per request (for a hop: caller + callee)", "CPU µs per request", names,
             {"CPU": [sc[n].get("proxy_cpu_us_per_request") for n in names]}),
    ]


def _registry(result: dict[str, Any]) -> list[Chart]:
    reg = result["registrations"]
    store = _store_kind(str(result.get("store") or "store"), str(result.get("target", "")))
    phases = ["register", "deregister"]
    size = f"{reg['registrations']} registrations of {reg['services']} services, {reg['concurrency']} in flight"
    out: list[Chart] = [
        Bars("registry-rate", f"Consul API writes per second ({size})", "writes per second", phases,
             {store: [reg[p]["per_s"] for p in phases]}),
        Bars("registry-p99", f"Consul API write latency, p99 ({size})", "milliseconds", phases,
             {store: [reg[p]["p99_ms"] for p in phases]}),
    ]
    wake = result.get("blocking_query_wakeup")
    if isinstance(wake, dict) and wake.get("wakeups"):
        out.append(Bars("registry-wakeup", f"Blocking-query wakeup ({wake['watchers']} watchers, {wake['rounds']} rounds)",
                        "seconds", ["p50", "p99", "max"], {store: [wake.get("p50"), wake.get("p99"), wake.get("max")]}))
    return out


def _store_kind(store: str, target: str = "") -> str:
    """``SQLite`` from ``sqlite:/tmp/x/bench.db``, ``3-member etcd`` from ``3-member etcd: etcd://...``,
    ``Consul API at HOST:PORT`` for a target the benchmark did not start (``--consul``: a peer)."""
    if store == "(external)":
        return f"Consul API at {target}" if target else "external Consul API"
    m = re.match(r"(\d+-member etcd)", store)
    if m:
        return m.group(1)
    kind = store.split(":", 1)[0]
    return {"sqlite": "SQLite", "etcd": "etcd", "memory": "memory"}.get(kind, store)


def _ca(result: dict[str, Any]) -> list[Chart]:
    sc: dict[str, Any] = result["scenarios"]
    names = list(sc)
    return [
        Bars("ca-rate", "CSRs signed per second", "CSRs per second", names, {"CSRs/s": [sc[n].get("csrs_per_s") for n in names]}),
        Bars("ca-cpu", "CPU per signed CSR", "CPU µs per CSR", names, {"CPU": [sc[n].get("cpu_us_per_csr") for n in names]}),
    ]


def _xds_abuse(result: dict[str, Any]) -> list[Chart]:
    r = result["result"]
    out: list[Chart] = []
    d = r.get("dead_readers")
    if isinstance(d, dict):
        groups = ["clusters", "endpoints"]
        out.append(Bars("xds-abuse-first-config", f"A reading client's first config beside {d.get('streams', '?')} streams that never read",
                        "seconds", groups,
                        {"alone": [d.get("first_config_alone_seconds", {}).get(g) for g in groups],
                         "behind the dead readers": [d.get("first_config_seconds", {}).get(g) for g in groups],
                         "once each was sent a response": [d.get("first_config_after_that_seconds", {}).get(g) for g in groups]}))
    h = r.get("huge_requests")
    if isinstance(h, dict):
        lat = h.get("api_latency_seconds", {})
        out.append(Bars("xds-abuse-api", f"Management API latency while {h.get('clients', '?')} requests of {h.get('mb_each', '?')} MB arrive",
                        "seconds", ["median", "max"], {"API": [lat.get("median"), lat.get("max")]}))
    return out


_CHARTS = {"xds": _xds_push, "xds-envoys": _xds_envoys, "dns": _dns, "route": _route, "registry": _registry,
           "ca": _ca, "xds-abuse": _xds_abuse}


def _merged(loaded: list[Loaded]) -> tuple[list[Chart], dict[str, str]]:
    """The charts of the runs of one command: charts of the same name become one, each series named
    after its run's file when two runs would draw a series of the same name in it. Returns the charts and, per file, why
    its result could not be plotted."""
    per_run: list[tuple[str, list[Chart]]] = []
    errors: dict[str, str] = {}
    for item in loaded:
        assert item.doc is not None
        try:
            per_run.append((item.label, charts(item.doc["command"], item.doc["result"])))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            errors[item.file] = f"its result lacks what the {item.doc['command']} charts read: {type(exc).__name__} {exc}"
    series_of: dict[str, list[str]] = {}  # chart name -> the series every run draws in it
    for _label, chs in per_run:
        for c in chs:
            series_of.setdefault(c.name, []).extend(c.series)
    by_name: dict[str, Chart] = {}
    order: list[str] = []
    for label, chs in per_run:
        for c in chs:
            names = series_of[c.name]
            mine = _relabelled(c, label) if len(set(names)) < len(names) else c
            if c.name not in by_name:
                order.append(c.name)
                by_name[c.name] = mine
            else:
                by_name[c.name] = _combined(by_name[c.name], mine)
    return [by_name[n] for n in order], errors


def _relabelled(c: Chart, label: str) -> Chart:
    if isinstance(c, Cdf):
        return Cdf(c.name, c.title, c.x_label, {f"{label}: {k}": v for k, v in c.series.items()}, c.note)
    return Bars(c.name, c.title, c.x_label, c.groups, {f"{label}: {k}": v for k, v in c.series.items()}, c.note)


def _combined(a: Chart, b: Chart) -> Chart:
    if isinstance(a, Cdf) and isinstance(b, Cdf):
        return Cdf(a.name, a.title, a.x_label, {**a.series, **b.series}, a.note)
    if isinstance(a, Bars) and isinstance(b, Bars):
        groups = a.groups + [g for g in b.groups if g not in a.groups]
        series: dict[str, list[float | None]] = {}
        for c in (a, b):
            for k, vals in c.series.items():
                at = dict(zip(c.groups, vals))
                series[k] = [at.get(g) for g in groups]
        return Bars(a.name, a.title, a.x_label, groups, series, a.note)
    return a


def _by_command(loaded: list[Loaded]) -> dict[str, list[Loaded]]:
    out: dict[str, list[Loaded]] = {}
    for item in loaded:
        if item.doc is not None:
            out.setdefault(str(item.doc["command"]), []).append(item)
    return out


def _all_charts(loaded: list[Loaded]) -> list[Chart]:
    return [c for items in _by_command(loaded).values() for c in _merged(items)[0]]


# ---- drawing --------------------------------------------------------------------------------------


def cdf_points(samples: Iterable[float]) -> list[tuple[float, float]]:
    """The empirical CDF of ``samples`` as (value, share of samples ≤ value) corners, one per distinct
    value, in increasing order; the last share is 1.0. Non-finite samples are left out."""
    v = sorted(x for x in samples if isinstance(x, (int, float)) and math.isfinite(x))
    n = len(v)
    out: list[tuple[float, float]] = []
    for i, x in enumerate(v):
        if i + 1 < n and v[i + 1] == x:
            continue
        out.append((float(x), (i + 1) / n))
    return out


@dataclass(frozen=True, slots=True)
class _Scale:
    lo: float
    hi: float
    a: float  # pixel of lo
    b: float  # pixel of hi
    log: bool
    step: float = 0.0  # linear: the tick step lo and hi were rounded to (0: choose one)

    def __call__(self, x: float) -> float:
        if self.log:
            x = max(x, self.lo)
            t = (math.log10(x) - math.log10(self.lo)) / ((math.log10(self.hi) - math.log10(self.lo)) or 1.0)
        else:
            t = (x - self.lo) / ((self.hi - self.lo) or 1.0)
        return self.a + t * (self.b - self.a)

    def ticks(self) -> list[float]:
        if self.log:
            lo, hi = math.floor(math.log10(self.lo)), math.ceil(math.log10(self.hi))
            steps = (1, 2, 5) if hi - lo <= 3 else (1,)
            return [m * 10.0**e for e in range(lo, hi + 1) for m in steps if self.lo <= m * 10.0**e <= self.hi * 1.0001]
        step = self.step or _nice_step((self.hi - self.lo) / 5)
        start = math.ceil(self.lo / step - 1e-9) * step
        return [start + i * step for i in range(int((self.hi - start) / step + 1e-9) + 1)]


def _nice_step(raw: float) -> float:
    if raw <= 0 or not math.isfinite(raw):
        return 1.0
    e = math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if m * 10**e >= raw:
            return float(m * 10**e)
    return float(10 ** (e + 1))


def _axis(values: Sequence[float], a: float, b: float, from_zero: bool) -> _Scale:
    finite = [x for x in values if math.isfinite(x)]
    if not finite:
        return _Scale(0.0, 1.0, a, b, False)
    lo, hi = min(finite), max(finite)
    positive = [x for x in finite if x > 0]
    if len(positive) == len(finite) and lo > 0 and hi / lo > 50:
        lo_l, hi_l = 10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi))
        return _Scale(lo_l, hi_l, a, b, True)
    if from_zero:
        lo = min(0.0, lo)
    if hi == lo:
        hi = lo + (abs(lo) or 1.0)
    step = _nice_step((hi - lo) / 5)
    return _Scale(math.floor(lo / step) * step, math.ceil(hi / step) * step, a, b, False, step)


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 10000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.3g}"


def _e(s: object) -> str:
    return html.escape(str(s), quote=True)


_W, _LEFT, _RIGHT, _TOP = 720, 70, 20, 52


def svg(chart: Chart, standalone: bool = False) -> str:
    """``chart`` as SVG text (with the XML namespace when ``standalone``, for a file of its own)."""
    return _svg_cdf(chart, standalone) if isinstance(chart, Cdf) else _svg_bars(chart, standalone)


def _open(name: str, title: str, height: float, standalone: bool) -> list[str]:
    ns = ' xmlns="http://www.w3.org/2000/svg"' if standalone else ""
    return [
        f'<svg{ns} class="chart" data-chart="{_e(name)}" width="{_W}" height="{height:.0f}" viewBox="0 0 {_W} {height:.0f}" '
        f'font-family="sans-serif" font-size="12" role="img" aria-label="{_e(title)}">',
        f"<title>{_e(title)}</title>",
        f'<rect width="{_W}" height="{height:.0f}" fill="white"/>',
        *(f'<text x="{_W / 2:.0f}" y="{16 + 15 * i}" text-anchor="middle" font-size="13" font-weight="bold">{_e(line)}</text>'
          for i, line in enumerate(_lines(title, 84, 2))),
    ]


def _lines(s: str, width: int, most: int) -> list[str]:
    """``s`` broken at spaces into at most ``most`` lines of about ``width`` characters."""
    out: list[str] = []
    for word in s.split(" "):
        if out and len(out[-1]) + 1 + len(word) <= width:
            out[-1] += " " + word
        else:
            out.append(word)
    if len(out) > most:
        out = out[: most - 1] + [_clip(" ".join(out[most - 1:]), width)]
    return out


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _legend(names: Sequence[str], x: float, y: float, labels: Sequence[str] = ()) -> list[str]:
    out = ['<g class="legend">']
    for i, name in enumerate(names):
        label = labels[i] if labels else name
        yy = y + i * 16
        out.append(f'<g class="legend-entry" data-series="{_e(name)}"><rect x="{x:.0f}" y="{yy - 9:.0f}" width="12" height="10" '
                   f'fill="{_PALETTE[i % len(_PALETTE)]}"/><text x="{x + 17:.0f}" y="{yy:.0f}">{_e(label)}</text></g>')
    out.append("</g>")
    return out


def _svg_cdf(c: Cdf, standalone: bool) -> str:
    names = list(c.series)
    points = {n: cdf_points(c.series[n]) for n in names}
    plot_h = 260.0
    height = _TOP + plot_h + 50 + 16 * len(names) + (16 if c.note else 0)
    x0, x1, y0, y1 = _LEFT, _W - _RIGHT, _TOP + plot_h, _TOP
    finite = [x for p in points.values() for x, _y in p]
    xs = _axis(finite, x0, x1, from_zero=bool(finite) and min(finite) <= 0.3 * max(finite))
    ys = _Scale(0.0, 1.0, y0, y1, False)
    out = _open(c.name, c.title, height, standalone)
    out += _frame(xs, ys, x0, x1, y0, y1, [0.0, 0.25, 0.5, 0.75, 0.9, 1.0], c.x_label + (" (log scale)" if xs.log else ""),
                  "share of samples ≤ x")
    for i, n in enumerate(names):
        p = points[n]
        color = _PALETTE[i % len(_PALETTE)]
        if not p:
            continue
        d = [f"M{xs(p[0][0]):.1f},{ys(0.0):.1f}"]
        prev = 0.0
        for x, y in p:
            d.append(f"L{xs(x):.1f},{ys(prev):.1f}L{xs(x):.1f},{ys(y):.1f}")
            prev = y
        out.append(f'<g class="series" data-series="{_e(n)}" data-samples="{len(c.series[n])}">'
                   f'<path d="{"".join(d)}" fill="none" stroke="{color}" stroke-width="1.8"/></g>')
    labels = [_cdf_label(n, c.series[n]) for n in names]
    out += _legend(names, x0, y0 + 48, labels)
    if c.note:
        out.append(f'<text x="{x0}" y="{height - 6:.0f}" font-style="italic" fill="#555">{_e(c.note)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _cdf_label(name: str, samples: list[float]) -> str:
    v = sorted(x for x in samples if math.isfinite(x))
    if not v:
        return f"{name} (no samples)"
    p50, p99 = v[len(v) // 2], v[min(len(v) - 1, int(len(v) * 0.99))]
    return f"{name} ({len(v)} samples; p50 {_fmt(p50)}, p99 {_fmt(p99)}, max {_fmt(v[-1])})"


def _frame(xs: _Scale, ys: _Scale, x0: float, x1: float, y0: float, y1: float, yticks: Sequence[float], x_label: str,
           y_label: str) -> list[str]:
    out = [f'<g class="axes" stroke="#999" stroke-width="1"><line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}"/>'
           f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}"/></g>']
    for t in xs.ticks():
        px = xs(t)
        out.append(f'<line x1="{px:.1f}" y1="{y0}" x2="{px:.1f}" y2="{y1}" stroke="#eee"/>'
                   f'<text x="{px:.1f}" y="{y0 + 15}" text-anchor="middle">{_fmt(t)}</text>')
    for t in yticks:
        py = ys(t)
        out.append(f'<line x1="{x0}" y1="{py:.1f}" x2="{x1}" y2="{py:.1f}" stroke="#eee"/>'
                   f'<text x="{x0 - 5}" y="{py + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    out.append(f'<text class="x-label" x="{(x0 + x1) / 2:.0f}" y="{y0 + 32}" text-anchor="middle">{_e(x_label)}</text>')
    out.append(f'<text class="y-label" x="14" y="{(y0 + y1) / 2:.0f}" text-anchor="middle" '
               f'transform="rotate(-90 14 {(y0 + y1) / 2:.0f})">{_e(y_label)}</text>')
    return out


def _svg_bars(c: Bars, standalone: bool) -> str:
    names = list(c.series)
    label_w = min(260, 12 + 7 * max((len(g) for g in c.groups), default=4))
    bar_h, gap = 14.0, 10.0
    row_h = bar_h * max(1, len(names)) + gap
    plot_h = row_h * max(1, len(c.groups))
    height = _TOP + plot_h + 50 + 16 * len(names) + (16 if c.note else 0)
    x0, x1, y0, y1 = label_w + 10, _W - _RIGHT - 50, _TOP + plot_h, _TOP
    values = [v for vals in c.series.values() for v in vals if v is not None and math.isfinite(v)]
    xs = _axis([0.0, *values], x0, x1, from_zero=True)
    if xs.log:  # bars grow from zero: keep them linear
        hi = max(values)
        step = _nice_step(hi / 5)
        xs = _Scale(0.0, math.ceil(hi / step) * step, x0, x1, False, step)
    out = _open(c.name, c.title, height, standalone)
    out.append(f'<g class="axes" stroke="#999"><line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}"/><line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}"/></g>')
    for t in xs.ticks():
        px = xs(t)
        out.append(f'<line x1="{px:.1f}" y1="{y0}" x2="{px:.1f}" y2="{y1}" stroke="#eee"/>'
                   f'<text x="{px:.1f}" y="{y0 + 15}" text-anchor="middle">{_fmt(t)}</text>')
    out.append(f'<text class="x-label" x="{(x0 + x1) / 2:.0f}" y="{y0 + 32}" text-anchor="middle">{_e(c.x_label)}</text>')
    for gi, g in enumerate(c.groups):
        top = y1 + gi * row_h + gap / 2
        out.append(f'<text class="group" x="{x0 - 6}" y="{top + row_h / 2:.1f}" text-anchor="end">{_e(_clip(g, 40))}</text>')
    for si, n in enumerate(names):
        color = _PALETTE[si % len(_PALETTE)]
        out.append(f'<g class="series" data-series="{_e(n)}">')
        for gi, v in enumerate(c.series[n]):
            top = y1 + gi * row_h + gap / 2 + si * bar_h
            if v is None or not math.isfinite(v):
                out.append(f'<text x="{x0 + 4}" y="{top + bar_h - 3:.1f}" fill="#777" font-size="10">not measured</text>')
                continue
            w = max(0.0, xs(v) - x0)
            out.append(f'<rect x="{x0}" y="{top:.1f}" width="{w:.1f}" height="{bar_h - 2}" fill="{color}"/>'
                       f'<text x="{x0 + w + 4:.1f}" y="{top + bar_h - 4:.1f}" font-size="10">{_fmt(v)}</text>')
        out.append("</g>")
    out += _legend(names, x0, y0 + 48)
    if c.note:
        out.append(f'<text x="{x0}" y="{height - 6:.0f}" font-style="italic" fill="#555">{_e(c.note)}</text>')
    out.append("</svg>")
    return "\n".join(out)


# ---- the page -------------------------------------------------------------------------------------

_CSS = """body{font-family:sans-serif;max-width:780px;margin:2em auto;color:#222}
section{border-top:1px solid #ccc;margin-top:2em}table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ddd;padding:2px 6px;text-align:left;vertical-align:top}code{font-size:12px}
.error{color:#a00;background:#fee;padding:4px 8px}figure{margin:1em 0}"""


def render_index(loaded: list[Loaded]) -> str:
    """The report page of a directory's results: a section per command (every run of it), each with
    its charts and, per run, the command line, time and machine; files that could not be read are
    listed with the reason, and the rest of the page is drawn as usual."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>meshpilot perf report</title>',
           f"<style>{_CSS}</style></head><body>", "<h1>meshpilot perf report</h1>"]
    bad = [item for item in loaded if item.doc is None]
    if bad:
        out.append('<div class="errors">')
        out += [f'<p class="error">{_e(item.file)}: {_e(item.error)}</p>' for item in bad]
        out.append("</div>")
    groups = _by_command(loaded)
    if not groups:
        out.append("<p>No results to show.</p>")
    for command, items in groups.items():
        out.append(f'<section id="{_e(command)}" data-command="{_e(command)}"><h2>meshpilot perf {_e(command)}</h2>')
        chs, errors = _merged(items)
        for file, err in errors.items():
            out.append(f'<p class="error">{_e(file)}: {_e(err)}</p>')
        for item in items:
            out.append(_run_table(item))
        if not chs and not errors:
            out.append("<p>This benchmark's result has no plots; its numbers are in the JSON file.</p>")
        for ch in chs:
            caption = f'<a href="{_e(ch.name)}.svg">{_e(ch.name)}.svg</a>' + (f": {_e(ch.note)}" if ch.note else "")
            out.append(f"<figure>{svg(ch)}<figcaption>{caption}</figcaption></figure>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _run_table(item: Loaded) -> str:
    doc = item.doc or {}
    m = doc.get("machine", {}) if isinstance(doc.get("machine"), dict) else {}
    versions = m.get("versions", {}) if isinstance(m.get("versions"), dict) else {}
    rows = [
        ("file", f'<a href="{_e(item.file)}">{_e(item.file)}</a>'),
        ("command", f"<code>{_e(doc.get('command_line', '?'))}</code>"),
        ("time (UTC)", _e(f"{doc.get('started_utc', '?')} → {doc.get('finished_utc', '?')} ({doc.get('wall_seconds', '?')} s)")),
        ("machine", _e(f"{m.get('cores', '?')} cores, {m.get('cpu_model', '?')}, Linux {m.get('kernel', '?')}, "
                       f"load average {m.get('load_average', '?')} at the start")),
        ("versions", _e(", ".join(f"{k} {v}" for k, v in versions.items()) or "?")),
    ]
    arguments = doc.get("arguments")
    if isinstance(arguments, dict) and arguments:
        rows.append(("options", _e(", ".join(f"{k}={v}" for k, v in arguments.items()))))
    if doc.get("exit_code"):
        rows.append(("exit code", _e(doc["exit_code"])))
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="run" data-file="{_e(item.file)}">{body}</table>'
