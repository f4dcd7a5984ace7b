"""``meshpilot perf ...``: the benchmark harnesses (not tests). Each prints JSON and a summary line."""

from __future__ import annotations

import argparse
import importlib

__all__ = ["register"]

_BENCHMARKS = {
    "xds": ("meshpilot.perf.xds_push", "xDS push latency to many ADS clients"),
    "xds-envoys": ("meshpilot.perf.xds_envoys", "single changes and a burst to real Envoys, write to each Envoy's ACK"),
    "xds-abuse": ("meshpilot.perf.xds_abuse", "streams that never read and huge xDS requests beside a real client"),
    "dns": ("meshpilot.perf.dns", "meshdns vs dnsmasq and unbound under dnsperf"),
    "route": ("meshpilot.perf.route", "request cost of the WASM filters through Envoy"),
    "registry": ("meshpilot.perf.registry", "Consul API registrations/s and blocking-query wakeups"),
    "ca": ("meshpilot.perf.ca", "CSRs signed per second by the mesh CA, in process and over gRPC"),
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    perf = sub.add_parser("perf", help="run a benchmark")
    kinds = perf.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for name, (module_name, help_text) in _BENCHMARKS.items():
        module = importlib.import_module(module_name)
        p = kinds.add_parser(name, help=help_text)
        module.add_arguments(p)
        p.set_defaults(func=module.main)
