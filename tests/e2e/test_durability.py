"""Acknowledged writes are on disk: strace on the running control plane shows an fsync of the
store's files completing while each write request is in flight, i.e. before its answer."""

from __future__ import annotations

import re
import time
from pathlib import Path

from meshpilot.perf.registry import strace_attached
from tests.support import control_plane


WRITES = 201  # one service and 200 instances
# "PID 1733100000.123456 fdatasync(7</path/meshpilot.db-wal>) = 0 <0.000812>", or split into
# "... fdatasync(7</path/...> <unfinished ...>" and "PID TS <... fdatasync resumed>) = 0 <0.000812>"
# (strace pads a short pid: "8164  1733100000.123456 ...")
_SYNC = re.compile(r"^\d+ +(?P<ts>\d+\.\d+) (?:(?P<call>f(?:data)?sync)\((?P<fd>\d+<[^>]*>)\) = 0 <(?P<dur>[\d.]+)>"
                   r"|<\.\.\. (?P<resumed>f(?:data)?sync) resumed>\) = 0 <[\d.]+>)")
_START = re.compile(r"^(?P<pid>\d+) +[\d.]+ f(?:data)?sync\((?P<fd>\d+<[^>]*>) <unfinished \.\.\.>")


def _sync_ends(log: str, db: str) -> list[float]:
    """Wall-clock times at which an fsync/fdatasync of a file of the database ``db`` returned."""
    ends: list[float] = []
    open_calls: dict[str, str] = {}  # pid -> fd of its unfinished sync
    for line in log.splitlines():
        if m := _START.match(line):
            open_calls[m["pid"]] = m["fd"]
        elif m := _SYNC.match(line):
            if m["call"]:
                if db in m["fd"]:
                    ends.append(float(m["ts"]) + float(m["dur"]))
            elif db in open_calls.pop(line.split(" ", 1)[0], ""):
                ends.append(float(m["ts"]))
    return ends


def test_each_acknowledged_write_is_synced_before_its_answer(workdir: Path) -> None:
    db = str(workdir / "meshpilot.db")
    trace = workdir / "strace.log"
    windows: list[tuple[float, float]] = []
    with control_plane(workdir, store=f"sqlite:{db}") as cp:
        assert cp.proc is not None
        with strace_attached(cp.proc.pid, trace, "-y", "-ttt", "-T", "-e", "trace=fsync,fdatasync"):
            for n in range(WRITES):
                if n == 0:
                    call = ("POST", "/v1/services", {"name": "web", "ports": [{"name": "http", "port": 80}]})
                else:
                    call = ("POST", "/v1/services/default/web/instances", {"id": f"w{n}", "address": "127.0.0.1", "ports": {"http": 8000 + n}})
                t0 = time.time()
                status, body = cp.call(*call)
                windows.append((t0, time.time()))
                assert status == 201, f"write {n}: expected 201, got {status} {body}"
    ends = _sync_ends(trace.read_text(), db)
    unsynced = [n for n, (t0, t1) in enumerate(windows) if not any(t0 <= e <= t1 for e in ends)]
    assert not unsynced, (
        f"expected each of the {WRITES} acknowledged writes to be synced to disk before its answer; "
        f"{len(unsynced)} were answered with no fsync/fdatasync of {db}* in flight (first: write {unsynced[0]}), "
        f"{len(ends)} such syncs in all"
    )
