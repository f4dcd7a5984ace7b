"""`meshpilot demo` runs a real mesh with identities on and sends traffic through it without failures."""

from __future__ import annotations

import re
import subprocess

from tests.support import VENV_BIN


def test_demo_sends_traffic_through_the_mesh() -> None:
    proc = subprocess.run([str(VENV_BIN / "meshpilot"), "demo", "--once", "--requests", "30"], capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"demo exited {proc.returncode}:\n{out[-3000:]}"
    served = {m.group(1): int(m.group(2)) for m in re.finditer(r"served by (backend-\d): (\d+)", out)}
    assert set(served) == {"backend-1", "backend-2"} and sum(served.values()) == 30, f"expected 30 requests over both backends, got {served}\n{out}"
    assert "failed: 0" in out
    assert "the backends saw caller spiffe://mesh.local/ns/default/sa/frontend: 30" in out, \
        f"expected every call to reach the backends over mTLS with the frontend's certificate identity:\n{out}"
    assert "/v1/proxies" in out and "curl" in out
