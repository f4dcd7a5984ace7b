"""``meshpilot perf ...``: the benchmark harnesses (not tests). Each prints JSON and a summary line.

Every benchmark also takes ``--report DIR``: the JSON it prints is kept as ``DIR/<command>.json`` with
the run's facts (command line, time, machine, versions), and ``DIR/index.html`` is drawn again from
every result in DIR (perf/report.py). ``meshpilot perf report DIR`` only draws the page again.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib
import io
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

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

_Main = Callable[[argparse.Namespace], int]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    perf = sub.add_parser("perf", help="run a benchmark")
    kinds = perf.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for name, (module_name, help_text) in _BENCHMARKS.items():
        module = importlib.import_module(module_name)
        p = kinds.add_parser(name, help=help_text)
        module.add_arguments(p)
        p.add_argument("--report", metavar="DIR", type=Path, default=None,
                       help=f"keep the result as DIR/{name}.json (with the command line, time, machine and versions) and "
                            "draw DIR/index.html from every result in DIR")
        p.add_argument("--report-name", metavar="NAME", default="",
                       help=f"with --report: write DIR/NAME.json instead of DIR/{name}.json, so several runs of one "
                            "benchmark (another store, another peer) sit side by side in its charts")
        p.set_defaults(func=_reported(name, module.main))
    r = kinds.add_parser("report", help="draw DIR/index.html again from the results in DIR")
    r.add_argument("dir", metavar="DIR", type=Path, help="a directory that --report wrote results into")
    r.set_defaults(func=_redraw)


def _redraw(args: argparse.Namespace) -> int:
    from meshpilot.perf import report

    try:
        path = report.write_index(args.dir)
    except FileNotFoundError as exc:
        print(f"meshpilot perf report: {exc}", file=sys.stderr)
        return 1
    bad = [item for item in report.load_reports(args.dir) if item.doc is None]
    for item in bad:
        print(f"meshpilot perf report: {item.file}: {item.error}", file=sys.stderr)
    print(f"meshpilot perf report: {path}", file=sys.stderr)
    return 0


class _Tee(io.TextIOBase):
    """Passes what a benchmark prints on to stdout and keeps a copy, to find its JSON report in."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self.kept = io.StringIO()

    def write(self, s: str) -> int:
        self.kept.write(s)
        return self._out.write(s)

    def flush(self) -> None:
        self._out.flush()


def _reported(command: str, main: _Main) -> _Main:
    """``main``, and with ``--report DIR`` the JSON report it printed kept in DIR with the run's facts.
    The benchmark is left as it is: its stdout is its report (docs/perf.md), read from a copy."""

    @functools.wraps(main)
    def run(args: argparse.Namespace) -> int:
        directory: Path | None = getattr(args, "report", None)
        if directory is None:
            return main(args)
        from meshpilot.perf import report

        stem = args.report_name or command
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", stem) or stem == "index":
            print(f"meshpilot perf {command}: --report-name {stem!r}: expected letters, digits, '.', '_' or '-' "
                  "(a file name stem other than 'index')", file=sys.stderr)
            return 2
        directory.mkdir(parents=True, exist_ok=True)  # fail before the run, not after it
        machine = report.machine_facts()
        started = datetime.datetime.now(datetime.timezone.utc)
        tee = _Tee(sys.stdout)
        with contextlib.redirect_stdout(tee):
            code = main(args)
        finished = datetime.datetime.now(datetime.timezone.utc)
        result = report.first_json_object(tee.kept.getvalue())
        if result is None:
            print(f"meshpilot perf {command}: --report: the benchmark printed no JSON report (exit code {code}); "
                  f"nothing written to {directory}", file=sys.stderr)
            return code or 1
        machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        argv = ["meshpilot", *sys.argv[1:]] if Path(sys.argv[0]).name in ("meshpilot", "cli.py") else sys.argv
        arguments = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
        doc = report.document(command, result, argv, started, finished, code, machine, arguments)
        path = report.write_report(directory, doc, stem)
        print(f"meshpilot perf {command}: report {path} and {directory / 'index.html'}", file=sys.stderr)
        return code

    return run
