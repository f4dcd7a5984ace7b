"""The npm ``consul`` client (installed from the npm registry by this test) against the Consul API."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.support import ROOT, control_plane, tmpdir

pytestmark = pytest.mark.timeout(300)

SOURCES = ROOT / "tests" / "interop" / "node"
INSTALL = ROOT / "var" / "node-consul"


@pytest.fixture(scope="session")
def node_client() -> str:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed for the npm consul client")
    INSTALL.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json", "consul-client.mjs"):
        shutil.copy(SOURCES / name, INSTALL / name)
    if not (INSTALL / "node_modules" / "consul").exists():
        proc = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=INSTALL, capture_output=True, text=True, timeout=240)
        if proc.returncode != 0:
            if "ENOTFOUND" in proc.stderr or "ECONNREFUSED" in proc.stderr or "ETIMEDOUT" in proc.stderr:
                pytest.skip(f"the npm registry is unreachable: {proc.stderr[-400:]}")
            raise AssertionError(f"expected npm ci to install the consul client, it failed:\n{proc.stderr[-2000:]}")
    return str(INSTALL / "consul-client.mjs")


def test_npm_consul_client_registers_heartbeats_watches_and_discovers(node_client: str) -> None:
    with control_plane(tmpdir("meshpilot-consul-node-"), extra=["--consul-port", "0"]) as cp:
        proc = subprocess.run(["node", node_client, str(cp.ports["consul"])], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"expected the node client to finish, it exited {proc.returncode}:\n{proc.stderr[-2000:]}"
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["beforePass"] == 0, f"expected no passing instance before the first heartbeat, got {out}"
    assert out["watchChanges"] == [0, 1], f"expected the watch to see 0 then 1 passing instance, got {out['watchChanges']}"
    assert out["afterPass"] == [{"id": "node-web-1", "port": 7070, "version": "2", "tags": ["node"]}], out["afterPass"]
    assert out["catalog"].get("node-web") == ["node"], f"expected node-web in the catalog, got {out['catalog']}"
    assert out["kv"] == "value" and out["kvAfterDelete"] is None, out
    assert out["afterDeregister"] == 0, out
