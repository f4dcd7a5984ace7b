"""`meshpilot access token` against a running control plane: the operator's bootstrap token mints
scoped tokens, each does what its scope allows on the management and Consul ports, and a revoked
one is refused at once."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from tests.support import VENV_BIN, control_plane

BOOT = "b00tstrap"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHPILOT_TOKEN")}
    return subprocess.run([str(VENV_BIN / "meshpilot"), *args], capture_output=True, text=True, timeout=30, env=env)


def _consul(port: int, path: str, token: str, method: str = "GET", body: bytes | None = None) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method, headers={"X-Consul-Token": token})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_access_tokens_from_the_cli(workdir: Path) -> None:
    with control_plane(workdir, extra=["--token", BOOT, "--consul-port", "0"]) as cp:
        admin = ["--api", cp.api, "--token", BOOT]
        r = _cli("access", "token", "create", "--scope", "read", "--description", "dashboards", "--ttl", "1h", *admin)
        assert r.returncode == 0, r.stderr
        made = json.loads(r.stdout)
        assert made["scope"] == "read" and made["secret"] and "shown this once" in r.stderr, f"got {r.stdout!r} {r.stderr!r}"
        reader = ["--api", cp.api, "--token", made["secret"]]
        r = _cli("service", "list", *reader)
        assert r.returncode == 0 and json.loads(r.stdout) == [], f"a read token lists services, got {r.returncode} {r.stderr!r}"
        r = _cli("service", "create", "web", *reader)
        assert r.returncode != 0 and "403" in r.stderr and "write" in r.stderr, f"a read token must not write, got {r.returncode} {r.stderr!r}"
        r = _cli("access", "token", "create", "--scope", "admin", *reader)
        assert r.returncode != 0 and "403" in r.stderr, f"a read token must not mint tokens, got {r.stderr!r}"
        writer = _cli("access", "token", "create", "--scope", "write", "-q", *admin).stdout.strip()
        assert writer.startswith("mpa."), f"-q prints the secret alone, got {writer!r}"
        assert _cli("service", "create", "web", "--api", cp.api, "--token", writer).returncode == 0
        consul = cp.ports["consul"]
        assert _consul(consul, "/v1/catalog/services", made["secret"]) == 200, "the read token reads the Consul catalog"
        assert _consul(consul, "/v1/kv/x", made["secret"], "PUT", b"1") == 403, "the read token cannot write Consul KV"
        assert _consul(consul, "/v1/kv/x", writer, "PUT", b"1") == 200
        listed = json.loads(_cli("access", "token", "list", *admin).stdout)
        assert {t["id"] for t in listed} == {made["id"], writer.split(".")[1]} and "secret" not in json.dumps(listed)
        r = _cli("access", "token", "revoke", made["id"], *admin)
        assert r.returncode == 0, r.stderr
        r = _cli("service", "list", *reader)
        assert r.returncode != 0 and "401" in r.stderr, f"a revoked token must be refused at once, got {r.returncode} {r.stderr!r}"
        assert _consul(consul, "/v1/catalog/services", made["secret"]) == 403, "and on the Consul port too"
