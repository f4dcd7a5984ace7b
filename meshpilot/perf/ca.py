"""``meshpilot perf ca``: how fast the mesh CA signs workload certificates.

Two measurements, in one run, each for ``--duration`` seconds:

- **authority_sign**: ``pki.Authority.sign`` called in a loop in this process on CSRs made beforehand
  (making a key and a CSR is the node's work, not the CA's): the CSR's signature checked, a leaf
  built and signed with the root's EC P-256 key. One core, no I/O: the ceiling of what any front end
  can get out of one CA process.
- **grpc_sign**: the control plane's ``meshpilot.identity.v1.Identity/Sign`` as nodes enrol: a
  control plane of this checkout (``meshpilot serve`` with ``identity`` on, memory store) in a child
  process, one reusable join token made through the management API, and ``--concurrency`` calls in
  flight over one TLS channel to the enrolment port, each a new node id with the token. The control
  plane's CPU time per signed CSR is read from /proc; the client runs here, on the same cores.

``--skip-grpc`` measures only the first. Prints JSON (CSRs per second, CPU microseconds per CSR,
latency percentiles of the gRPC calls) and a summary line, like the other harnesses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import urllib.request
from typing import Any

import grpc

from meshpilot import pki
from meshpilot.perf.served import control_plane
from meshpilot.pki import ca_pb2

__all__ = ["SIGN_METHOD", "add_arguments", "main", "sign_rate"]

SIGN_METHOD = "/meshpilot.identity.v1.Identity/Sign"
_TRUST_DOMAIN = "mesh.local"
_NAMESPACE, _SERVICE = "default", "bench"
_CSRS = 64  # distinct keys and CSRs, used in turn


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, default=3.0, help="seconds per measurement (default 3)")
    p.add_argument("--concurrency", type=int, default=8, help="Sign calls in flight over gRPC (default 8)")
    p.add_argument("--skip-grpc", action="store_true", help="measure only pki.Authority.sign in this process")
    p.add_argument("--output", help="also write the JSON report to this file")


def _csrs(n: int, spiffe: str) -> list[bytes]:
    return [pki.build_csr(pki.new_key(), spiffe, f"bench-csr-{i}") for i in range(n)]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rate(count: int, wall: float, cpu: float) -> dict[str, Any]:
    return {"signed": count, "seconds": round(wall, 3), "csrs_per_s": round(count / wall, 1) if wall > 0 else None,
            "cpu_us_per_csr": round(cpu * 1e6 / count, 1) if count else None}


def sign_rate(duration: float, csrs: list[bytes] | None = None) -> dict[str, Any]:
    """``Authority.sign`` in a loop for ``duration`` seconds: CSRs per second and CPU per CSR."""
    authority = pki.Authority.generate(_TRUST_DOMAIN)
    spiffe = pki.spiffe_id(_TRUST_DOMAIN, _NAMESPACE, _SERVICE)
    pool = csrs or _csrs(_CSRS, spiffe)
    authority.sign(pool[0], spiffe, "warm-up", 3600)
    count = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    deadline = t0 + duration
    while True:
        issued = authority.sign(pool[count % len(pool)], spiffe, f"node-{count}", 86400)
        count += 1
        if time.perf_counter() >= deadline:
            break
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    if not issued.chain_pem.startswith(b"-----BEGIN CERTIFICATE-----"):
        raise RuntimeError("Authority.sign returned no certificate")
    return _rate(count, wall, cpu)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


_ADMIN_TOKEN = "perf-ca-admin"  # the served control plane's bootstrap token (identity needs one)


def _api(base: str, path: str, body: dict[str, Any] | None = None) -> bytes:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {_ADMIN_TOKEN}", **({"content-type": "application/json"} if data else {})}
    req = urllib.request.Request(base + path, data=data, method="POST" if body is not None else "GET", headers=headers)
    with urllib.request.urlopen(req, timeout=10) as r:
        out: bytes = r.read()
        return out


async def _sign_load(port: int, bundle: bytes, token: str, csrs: list[bytes], duration: float,
                     concurrency: int, pid: int) -> dict[str, Any]:
    creds = grpc.ssl_channel_credentials(root_certificates=bundle)
    # the control plane's certificate names it "localhost" (xds_server_names) and its SPIFFE id
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds,
                                       options=[("grpc.ssl_target_name_override", "localhost")]) as channel:
        sign = channel.unary_unary(SIGN_METHOD, request_serializer=ca_pb2.SignRequest.SerializeToString,
                                   response_deserializer=ca_pb2.SignResponse.FromString)
        counter = iter(range(1 << 62))
        latencies: list[float] = []
        errors: dict[str, int] = {}

        async def one() -> None:
            i = next(counter)
            req = ca_pb2.SignRequest(csr_pem=csrs[i % len(csrs)], node_id=f"bench-node-{i}", token=token)
            t = time.perf_counter()
            try:
                resp = await sign(req, timeout=30)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                return
            latencies.append(time.perf_counter() - t)
            if not resp.cert_chain_pem:
                errors["EMPTY"] = errors.get("EMPTY", 0) + 1

        await one()  # the channel's handshake, not measured
        if errors:
            raise RuntimeError(f"Sign refused the benchmark's first CSR: {errors}")
        latencies.clear()

        async def worker(deadline: float) -> None:
            while time.perf_counter() < deadline:
                await one()

        cpu0, t0 = _cpu_seconds(pid), time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for _ in range(concurrency):
                tg.create_task(worker(t0 + duration))
        wall, cpu = time.perf_counter() - t0, _cpu_seconds(pid) - cpu0
    out = _rate(len(latencies), wall, cpu)
    out["cpu_us_per_csr_note"] = "the control plane process's CPU"
    out["errors"] = errors
    if latencies:
        out["latency_ms"] = {"p50": round(statistics.median(latencies) * 1e3, 2),
                             "p99": round(_percentile(latencies, 0.99) * 1e3, 2)}
    return out


def grpc_sign_rate(duration: float, concurrency: int) -> dict[str, Any]:
    """Sign over gRPC against a served control plane with identity on (see the module docstring)."""
    csrs = _csrs(_CSRS, pki.spiffe_id(_TRUST_DOMAIN, _NAMESPACE, _SERVICE))
    env = {"MESHPILOT_IDENTITY": "true", "MESHPILOT_TRUST_DOMAIN": _TRUST_DOMAIN, "MESHPILOT_TOKEN": _ADMIN_TOKEN}
    with control_plane(prefix="meshpilot-perf-ca-", env=env) as served:
        summary = json.loads(_api(served.api, "/v1/identity"))
        port = int(summary.get("enrolment_port") or 0)
        deadline = time.monotonic() + 10
        while not port and time.monotonic() < deadline:  # the enrolment listener starts beside the API
            time.sleep(0.05)
            port = int(json.loads(_api(served.api, "/v1/identity")).get("enrolment_port") or 0)
        if not port:
            raise RuntimeError("the control plane reports no enrolment port")
        token = json.loads(_api(served.api, "/v1/identity/tokens", {"namespace": _NAMESPACE, "service": _SERVICE,
                                                                    "description": "perf ca"}))["secret"]
        bundle = _api(served.api, "/v1/identity/bundle")
        return asyncio.run(_sign_load(port, bundle, token, csrs, duration, concurrency, served.proc.pid))


def main(args: argparse.Namespace) -> int:
    if args.duration <= 0 or args.concurrency < 1:
        print("perf ca: --duration must be positive and --concurrency at least 1", file=sys.stderr)
        return 2
    results: dict[str, Any] = {"authority_sign": {"what": "pki.Authority.sign in one process (EC P-256 root)",
                                                  **sign_rate(args.duration)}}
    if not args.skip_grpc:
        results["grpc_sign"] = {"what": "Identity/Sign with a join token, over TLS to a served control plane",
                                **grpc_sign_rate(args.duration, args.concurrency)}
    report = {"benchmark": "ca",
              "settings": {"duration_s": args.duration, "grpc_concurrency": args.concurrency, "csrs": _CSRS,
                           "key": "EC P-256", "store": "memory", "cpus": os.cpu_count()},
              "scenarios": results}
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    summary = ", ".join(f"{n}={r['csrs_per_s']}/s ({r['cpu_us_per_csr']} us CPU)" for n, r in results.items())
    print(f"perf ca: CSRs signed: {summary}", file=sys.stderr)
    return 1 if results.get("grpc_sign", {}).get("errors") else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="meshpilot perf ca", description=(__doc__ or "").splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
