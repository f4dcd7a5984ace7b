"""The bearer token comes from a file or the environment as well as the command line, for
`meshpilot serve` and for the CLI clients, so that it need not show in `ps`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support import VENV_BIN, control_plane


TOKEN = "f1le-t0ken"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MESHPILOT_TOKEN")}
    return subprocess.run([str(VENV_BIN / "meshpilot"), *args], capture_output=True, text=True, timeout=30, env={**base, **(env or {})})


def test_token_from_a_file_or_the_environment(workdir: Path) -> None:
    secret = workdir / "token"
    secret.write_text(TOKEN + "\n")
    with control_plane(workdir, extra=["--token-file", str(secret)]) as cp:
        assert cp.proc is not None
        cmdline = Path(f"/proc/{cp.proc.pid}/cmdline").read_bytes().decode()
        assert TOKEN not in cmdline, f"the token shows in the server's command line: {cmdline!r}"
        api = ["--api", cp.api]
        r = _cli("service", "create", "nope", *api)
        assert r.returncode != 0 and "401" in r.stderr, f"a write without a token: expected a 401, got {r.returncode} {r.stderr!r}"
        r = _cli("service", "create", "web", *api, "--token-file", str(secret))
        assert r.returncode == 0, f"--token-file: expected the write to pass, got {r.stderr!r}"
        r = _cli("service", "create", "env", *api, env={"MESHPILOT_TOKEN": TOKEN})
        assert r.returncode == 0, f"MESHPILOT_TOKEN: expected the write to pass, got {r.stderr!r}"
        r = _cli("service", "create", "envfile", *api, env={"MESHPILOT_TOKEN_FILE": str(secret)})
        assert r.returncode == 0, f"MESHPILOT_TOKEN_FILE: expected the write to pass, got {r.stderr!r}"
        r = _cli("service", "list", *api)
        assert r.returncode != 0 and "401" in r.stderr, f"a read without a token: expected a 401, got {r.returncode} {r.stderr!r}"
        names = sorted(s["name"] for s in json.loads(_cli("service", "list", *api, env={"MESHPILOT_TOKEN": TOKEN}).stdout))
        assert names == ["env", "envfile", "web"], f"expected the three authorised services, got {names}"
        r = _cli("service", "delete", "web", *api, "--token-file", str(workdir / "missing"))
        assert r.returncode != 0 and "--token-file" in r.stderr, f"an unreadable token file must be named, got {r.stderr!r}"


def test_serve_takes_the_token_file_from_the_environment(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = workdir / "token"
    secret.write_text(TOKEN)
    monkeypatch.setenv("MESHPILOT_TOKEN_FILE", str(secret))
    with control_plane(workdir) as cp:
        r = _cli("service", "create", "web", "--api", cp.api, "--token", "wrong")
        assert r.returncode != 0 and "401" in r.stderr, f"expected a 401 with a wrong token, got {r.returncode} {r.stderr!r}"
        r = _cli("service", "create", "web", "--api", cp.api, "--token", TOKEN)
        assert r.returncode == 0, r.stderr
