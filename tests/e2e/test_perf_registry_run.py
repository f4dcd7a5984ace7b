"""`meshpilot perf registry` run end to end on a small load: it starts its own control plane (SQLite),
registers and deregisters through the Consul API with each load generator, and reports per phase
the rate, latencies, the control plane's CPU per write and the store's commits per write (the
control plane runs untraced); and the disk syncs of registrations made one at a time and
concurrently, counted by an strace attached for that phase (``--sync-writes``)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from meshpilot.perf import registry

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

needs_go = pytest.mark.skipif(shutil.which("go") is None and not Path("/usr/local/go/bin/go").exists(),
                              reason="the Go load generator needs a Go toolchain")


def _run(tmp_path: Path, *extra: str) -> dict[str, object]:
    parser = argparse.ArgumentParser()
    registry.add_arguments(parser)
    out = tmp_path / "report.json"
    args = parser.parse_args(["--services", "60", "--concurrency", "4", "--watchers", "0", "--output", str(out), *extra])
    assert registry.main(args) == 0, "expected the benchmark to exit 0"
    report: dict[str, object] = json.loads(out.read_text())
    return report


def _check_phases(report: dict[str, object], registrations: int, services: int) -> None:
    reg = report["registrations"]
    assert isinstance(reg, dict)
    assert (reg["registrations"], reg["services"]) == (registrations, services), \
        f"expected {registrations} registrations of {services} services, the report says {reg['registrations']} of {reg['services']}"
    for phase in ("register", "deregister"):
        p = reg[phase]
        for field in ("per_s", "p50_ms", "p99_ms", "client_cpu_ms_per_write", "control_plane_cpu_ms_per_write", "store_commits_per_write"):
            assert field in p, f"expected {field} in the {phase} phase, got {sorted(p)}"
        assert p["per_s"] > 0 and p["p99_ms"] >= p["p50_ms"] > 0, f"expected a rate and ordered latencies for {phase}, got {p}"
        assert p["control_plane_cpu_ms_per_write"] > 0, f"expected the control plane's CPU to be counted for {phase}, got {p}"
        # durable acknowledgements: commits while writes were made, at most one per write (4 in flight may share one)
        assert 0 < p["store_commits_per_write"] <= 1.5, f"expected SQLite commits during {phase}, got {p['store_commits_per_write']} per write"


@pytest.mark.skipif(shutil.which("strace") is None, reason="syncs are counted with strace")
def test_python_client_one_service_per_registration(tmp_path: Path) -> None:
    report = _run(tmp_path, "--client", "python", "--sync-writes", "10")
    assert report["client"] == "python: aiohttp", f"expected the aiohttp client, got {report['client']}"
    _check_phases(report, 60, 60)
    # an strace attached to the control plane counts its syncs, one write at a time and then 4 in flight
    syncs = report["disk_syncs"]
    one, four = syncs["one_at_a_time"], syncs["4_in_flight"]  # type: ignore[index]
    assert one["syncs_per_registration"] >= 1, f"expected at least one sync per registration made one at a time, got {one}"
    assert 0 < four["syncs"], f"expected syncs while registrations were made 4 at a time, got {four}"


@needs_go
@pytest.mark.skipif(shutil.which("strace") is None, reason="syncs are counted with strace")
def test_go_client_several_instances_per_service(tmp_path: Path) -> None:
    report = _run(tmp_path, "--client", "go", "--per-service", "20", "--sync-writes", "0")
    assert str(report["client"]).startswith("go:"), f"expected HashiCorp's Go client, got {report['client']}"
    _check_phases(report, 60, 3)
