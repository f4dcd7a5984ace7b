"""The served ``/openapi.json`` agrees with what the management API does: a schemathesis run
(every phase and check) against a running control plane, with its plugins and a token, is clean.
The rules JSON Schema cannot state are listed in openapi_hooks.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support import ROOT, VENV_BIN, control_plane


TOKEN = "schemathesis-t0ken"
MAX_EXAMPLES = 25  # per operation and phase: about a minute on two cores


def test_served_openapi_document_matches_behaviour(workdir: Path) -> None:
    with control_plane(workdir, extra=["--token", TOKEN]) as cp:
        cmd = [str(VENV_BIN / "schemathesis"), "run", f"{cp.api}/openapi.json", "--checks", "all",
               "--max-examples", str(MAX_EXAMPLES), "--seed", "1", "--workers", "1", "--request-timeout", "10",
               "--header", f"Authorization: Bearer {TOKEN}", "--no-color"]
        env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.e2e.openapi_hooks", "PYTHONPATH": str(ROOT)}
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=workdir, env=env)
        assert r.returncode == 0, f"schemathesis found disagreements between /openapi.json and the API:\n{r.stdout[-12000:]}\n{r.stderr[-2000:]}"
