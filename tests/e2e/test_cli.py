"""The `meshpilot` CLI against a running control plane, and `meshpilot bootstrap` against Envoy."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.support import VENV_BIN, assert_envoy_accepts, control_plane


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "meshpilot"), *args], capture_output=True, text=True, timeout=30)


def test_cli_manages_services_and_instances(workdir: Path) -> None:
    with control_plane(workdir, extra=["--token", "t0k"]) as cp:
        api = ["--api", cp.api, "--token", "t0k"]
        r = _cli("service", "create", "web", "--port", "http:80", "--port", "grpc:9090/grpc", *api)
        assert r.returncode == 0, r.stderr
        svc = json.loads(r.stdout)
        assert svc["vip"] and [p["protocol"] for p in svc["ports"]] == ["http", "grpc"]
        r = _cli("instance", "register", "--service", "web", "--id", "w1", "--address", "127.0.0.1", "--port", "http=8080", "--label", "version=v2", *api)
        assert r.returncode == 0, r.stderr
        r = _cli("instance", "list", "--service", "web", *api)
        assert [i["id"] for i in json.loads(r.stdout)] == ["w1"]
        # with a token configured, reads need one too
        r = _cli("instance", "list", "--service", "web", "--api", cp.api)
        assert r.returncode != 0 and "401" in r.stderr and "w1" not in r.stdout, f"a read without the token: expected a 401, got {r.returncode} {r.stderr!r}"
        # writes without the token fail with the API's message, and change nothing
        r = _cli("instance", "deregister", "--id", "w1", "--api", cp.api)
        assert r.returncode != 0 and "401" in r.stderr, f"expected a 401 error, got {r.returncode} {r.stderr!r}"
        r = _cli("instance", "health", "--id", "w1", "--status", "critical", *api)
        assert json.loads(r.stdout)["routable"] is False
        r = _cli("instance", "deregister", "--id", "w1", *api)
        assert r.returncode == 0
        r = _cli("service", "get", "web", *api)
        assert json.loads(r.stdout)["instances"] == []
        r = _cli("service", "delete", "nope", *api)
        assert r.returncode != 0 and "404" in r.stderr


def test_bootstrap_command_output_is_valid_envoy_config(workdir: Path) -> None:
    out = workdir / "envoy.json"
    for extra in ([], ["--sotw", "--hds", "--zone", "z1"]):
        r = _cli("bootstrap", "--node", "n1", "--service", "web", "--app-port", "8080", "-o", str(out), *extra)
        assert r.returncode == 0, r.stderr
        doc = json.loads(out.read_text())
        assert doc["dynamic_resources"]["ads_config"]["api_type"] == ("GRPC" if extra else "DELTA_GRPC")
        assert_envoy_accepts(out, workdir, f"the bootstrap printed by `meshpilot bootstrap {' '.join(extra)}`")
