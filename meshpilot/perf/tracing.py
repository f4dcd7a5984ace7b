"""What tracing costs per request on a caller sidecar → callee sidecar hop, measured with real Envoys.

wrk drives a caller Envoy whose cluster reaches a callee Envoy in front of a fast backend (an Envoy
answering with a direct response), as ``meshpilot perf route``'s plaintext hop (j) does, in the same
run: (untraced) no tracing; (traced_1) both Envoys' connection managers carry the product's tracing
config (translate/tracing.py: Zipkin tracer, B3 + W3C, 128-bit ids) at 1 % sampling, the mesh's
default; (traced_100) the same at 100 %. Spans go to the node's real span receiver and spool
(``python -m meshpilot.sidecar.traces``, the agent's code without its shipper), whose CPU is counted
apart. Rounds run the scenarios in turn; the median round by rps is reported. Prints JSON: rps,
latency, the two Envoys' CPU time per request, the receiver's CPU per request and spans per request,
each as a ratio to (untraced). On a machine shared with other work rps swings with the neighbours;
CPU time per request is steadier.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from meshpilot.telemetry.spans import COLLECTOR_CLUSTER
from meshpilot.translate.tracing import Tracing, build_tracing
from meshpilot.wasm import testbed as tb

__all__ = ["SCENARIOS", "add_arguments", "hop_bootstraps", "main"]

SCENARIOS = {
    "untraced": "caller Envoy → callee Envoy, plaintext, no tracing",
    "traced_1": "the same hop, both Envoys tracing at 1 % (the mesh default), spans to the node's receiver",
    "traced_100": "the same hop, both Envoys tracing at 100 %",
}
_SAMPLING = {"traced_1": 1.0, "traced_100": 100.0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=int, default=10, help="seconds of load per scenario (default 10)")
    p.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of all scenarios; the median round is reported (default 3)")
    p.add_argument("--output", help="also write the JSON report to this file")


def _traced(boot: dict[str, Any], service: str, sampling: float, receiver_port: int) -> None:
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    t = build_tracing(Tracing(sampling=sampling, service_key=f"{service}.default"))
    hcm["tracing"] = json_format.MessageToDict(t, preserving_proto_field_name=True)
    boot["node"] = {"id": f"{service}-1", "cluster": service}
    boot["static_resources"]["clusters"].append({
        "name": COLLECTOR_CLUSTER, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": COLLECTOR_CLUSTER, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": receiver_port}}}}]}]},
    })


def hop_bootstraps(name: str, port: int, callee_port: int, backend_port: int, receiver_port: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(caller, callee) bootstraps of scenario ``name``; traced ones report to ``receiver_port``."""
    caller = tb.proxy_bootstrap(port, [tb.Route("callee", "/", "callee")], {"callee": callee_port}, stat_prefix="outbound")
    callee = tb.proxy_bootstrap(callee_port, [tb.Route("inbound", "/", "backend")], {"backend": backend_port}, stat_prefix="inbound")
    caller["static_resources"]["listeners"][0]["traffic_direction"] = "OUTBOUND"
    callee["static_resources"]["listeners"][0]["traffic_direction"] = "INBOUND"
    if name in _SAMPLING:
        _traced(caller, "caller", _SAMPLING[name], receiver_port)
        _traced(callee, "callee", _SAMPLING[name], receiver_port)
    return caller, callee


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _spans(directory: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in directory.glob("spans-*.jsonl"))


@contextlib.contextmanager
def _receiver(work: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    spool, port_file = work / "spool", work / "receiver.port"
    proc = subprocess.Popen([sys.executable, "-m", "meshpilot.sidecar.traces", "--dir", str(spool), "--port-file", str(port_file)],
                            stdout=open(work / "receiver.log", "wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the span receiver did not start:\n{(work / 'receiver.log').read_text()[-2000:]}")
            time.sleep(0.05)
        yield proc, int(port_file.read_text()), spool
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _parse_wrk(out: str) -> dict[str, Any]:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not rps or not total:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    latency = {f"p{pct}": round(float(v) * _UNIT_MS[unit], 3)
               for pct, v, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": round(float(rps.group(1)), 1), "latency_ms": latency, "requests": int(total.group(1)),
            "non_2xx": int(non2xx.group(1)) if non2xx else 0}


def _run_one(name: str, backend_port: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    port, callee_port = tb.free_port(), tb.free_port()
    scenario_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))
    with contextlib.ExitStack() as stack:
        receiver, receiver_port, spool = stack.enter_context(_receiver(scenario_dir))
        caller_boot, callee_boot = hop_bootstraps(name, port, callee_port, backend_port, receiver_port)
        callee = stack.enter_context(tb.Envoy(callee_boot, callee_port, log_level="warn"))
        caller = stack.enter_context(tb.Envoy(caller_boot, port, log_level="warn"))
        url = f"http://127.0.0.1:{port}/"
        subprocess.run(["wrk", "-t1", "-c4", "-d1s", url], capture_output=True, timeout=30, check=False)
        time.sleep(5.5)  # Envoy's Zipkin tracer flushes every 5 s: the warm-up's spans land before counting
        pids = {"caller": caller.proc.pid, "callee": callee.proc.pid, "receiver": receiver.pid}  # type: ignore[union-attr]
        before = {role: _cpu_seconds(pid) for role, pid in pids.items()}
        spans_before = _spans(spool)
        proc = subprocess.run(["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s", "--latency", url],
                              capture_output=True, text=True, timeout=args.duration + 60)
        time.sleep(5.5)  # the last spans of the run are flushed and received
        cpu = {role: _cpu_seconds(pid) - before[role] for role, pid in pids.items()}
        spans = _spans(spool) - spans_before
        # Envoy's own count of what its tracer sent, dropped or failed to report (the whole run, warm-up too)
        zipkin = {k: caller.stats("tracing.zipkin.").get(f"tracing.zipkin.{k}", 0) + callee.stats("tracing.zipkin.").get(f"tracing.zipkin.{k}", 0)
                  for k in ("spans_sent", "reports_sent", "reports_dropped", "reports_failed")}
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed for {name}: {proc.stderr}")
    result = _parse_wrk(proc.stdout)
    n = result["requests"] or 0
    if n:
        # the receiver's CPU counts the flush wait after the run too; it is idle then but for the last spans
        result["envoy_cpu_us_per_request"] = round((cpu["caller"] + cpu["callee"]) * 1e6 / n, 2)
        result["cpu_us_per_request_by_role"] = {role: round(c * 1e6 / n, 2) for role, c in cpu.items()}
        result["spans_per_request"] = round(spans / n, 4)
    result["envoy_zipkin"] = zipkin
    return result


def main(args: argparse.Namespace) -> int:
    if shutil.which("wrk") is None:
        print("perf tracing: wrk is not installed (Debian package wrk)", file=sys.stderr)
        return 1
    rounds: dict[str, list[dict[str, Any]]] = {n: [] for n in SCENARIOS}
    work = Path(tempfile.mkdtemp(prefix="meshpilot-perf-tracing-"))
    bport = tb.free_port()
    try:
        with tb.Envoy(tb.direct_response_bootstrap(bport), bport, concurrency=1, log_level="warn"):
            for _ in range(max(1, args.rounds)):
                for name in SCENARIOS:
                    rounds[name].append(_run_one(name, bport, args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results: dict[str, Any] = {}
    for name, runs in rounds.items():
        median_rps = statistics.median(r["rps"] for r in runs)
        best = min(runs, key=lambda r: abs(r["rps"] - median_rps))
        results[name] = {"what": SCENARIOS[name], **best, "rounds_rps": [r["rps"] for r in runs],
                         "rounds_envoy_cpu_us": [r.get("envoy_cpu_us_per_request") for r in runs]}
    base = results["untraced"]
    for name, r in results.items():
        r["rps_ratio_to_untraced"] = round(r["rps"] / base["rps"], 4)
        if r.get("envoy_cpu_us_per_request") and base.get("envoy_cpu_us_per_request"):
            r["envoy_cpu_ratio_to_untraced"] = round(r["envoy_cpu_us_per_request"] / base["envoy_cpu_us_per_request"], 4)
        p99, base_p99 = r["latency_ms"].get("p99"), base["latency_ms"].get("p99")
        if p99 and base_p99:
            r["p99_ratio_to_untraced"] = round(p99 / base_p99, 4)
    report = {"benchmark": "tracing", "settings": {"duration_s": args.duration, "connections": args.connections,
                                                    "wrk_threads": args.threads, "rounds": args.rounds, "cpus": os.cpu_count(),
                                                    "envoy_workers": 1, "backend": "Envoy direct_response, 1 worker"},
              "scenarios": results}
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print("perf tracing: " + ", ".join(
        f"{n}={r['rps']:.0f}rps ({r['rps_ratio_to_untraced']:.3f}) cpu={r.get('envoy_cpu_us_per_request')}us "
        f"({r.get('envoy_cpu_ratio_to_untraced')}) spans/req={r.get('spans_per_request')}" for n, r in results.items()))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m meshpilot.perf.tracing", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
