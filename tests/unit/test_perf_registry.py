"""`meshpilot perf registry`'s own parts: syncs read from strace's summary, a process's CPU from
/proc, etcd's WAL fsyncs from its metrics text, and py-spy's collapsed stacks summarised."""

from __future__ import annotations

import os
import time

from meshpilot.perf import registry


def test_syncs_are_read_from_an_strace_summary() -> None:
    summary = "\n".join([
        "% time     seconds  usecs/call     calls    errors syscall",
        "------ ----------- ----------- --------- --------- ----------------",
        " 97.10    0.301234        1204       250           fdatasync",
        "  2.90    0.009000         900        10         1 fsync",
        "------ ----------- ----------- --------- --------- ----------------",
        "100.00    0.310234        1193       260         1 total",
    ])
    assert registry._syncs(summary) == 260, f"expected 250 fdatasync + 10 fsync, got {registry._syncs(summary)}"


def test_process_cpu_grows_with_work_done() -> None:
    before = registry.process_cpu_s(os.getpid())
    end = time.process_time() + 0.05
    while time.process_time() < end:
        pass
    after = registry.process_cpu_s(os.getpid())
    assert after - before >= 0.03, f"expected at least 30 ms more CPU after 50 ms of work, /proc said {after - before:.3f} s"


def test_etcd_metric_is_read_with_or_without_labels() -> None:
    text = "# HELP x\netcd_disk_wal_fsync_duration_seconds_sum 1.5\netcd_disk_wal_fsync_duration_seconds_count 4021\n"
    assert registry._metric(text, "etcd_disk_wal_fsync_duration_seconds_count") == 4021.0
    assert registry._metric('m{a="b"} 7\n', "m") == 7.0
    assert registry._metric("other 1\n", "m") is None


def test_profile_summary_counts_a_function_once_per_stack() -> None:
    collapsed = "\n".join([
        "run (a/loop.py:10);handle (a/http.py:20);handle (a/http.py:20);parse (a/defs.py:5) 6",
        "run (a/loop.py:10);commit (a/store.py:30) 4",
        "",
    ])
    got = registry.profile_summary(collapsed)
    inclusive = dict((f, pct) for f, pct in got["inclusive_pct"])
    own = dict((f, pct) for f, pct in got["self_pct"])
    assert got["samples"] == 10, f"expected 10 samples, got {got['samples']}"
    assert inclusive["run loop.py:10"] == 100.0 and inclusive["handle http.py:20"] == 60.0, f"unexpected inclusive shares {inclusive}"
    assert own == {"parse defs.py:5": 60.0, "commit store.py:30": 40.0}, f"unexpected self shares {own}"
