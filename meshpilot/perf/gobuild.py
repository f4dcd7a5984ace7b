"""Building a Go program the benchmarks run (a load generator, an xDS peer) on first use, with the
machine's Go toolchain and modules from the Go module proxy, into a cache kept between runs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

__all__ = ["go_binary"]


def go_binary(sources: Path, cache: Path, name: str, what: str, timeout_s: float = 900) -> Path:
    """``cache/name`` built from ``sources``, unless a build newer than every source is there already.
    ``what`` names the program in the errors."""
    go = shutil.which("go") or next((p for p in ("/usr/local/go/bin/go",) if Path(p).exists()), None)
    if go is None:
        raise RuntimeError(f"{what} needs a Go toolchain (go on PATH or /usr/local/go/bin/go)")
    binary = cache / name
    newest = max(p.stat().st_mtime for p in sources.iterdir())
    if binary.exists() and binary.stat().st_mtime >= newest:
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOFLAGS": "-buildvcs=false -mod=readonly", "GOTOOLCHAIN": "local"}
    proc = subprocess.run([go, "build", "-o", str(binary), "."], cwd=sources, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"building {what} failed:\n{proc.stderr[-3000:]}")
    return binary
