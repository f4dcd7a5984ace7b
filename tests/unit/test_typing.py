"""The package type-checks under ``mypy --strict`` with pyproject's configuration (STYLE.md: explicit types):
a change that loses a type, or adds an unexplained ``type: ignore``, fails here with mypy's own report."""

from __future__ import annotations

import os
from pathlib import Path

from mypy import api

ROOT = Path(__file__).resolve().parents[2]


def test_meshpilot_is_mypy_strict_clean() -> None:
    cwd = os.getcwd()
    os.chdir(ROOT)  # pyproject.toml's [tool.mypy] names the files and the settings
    try:
        out, err, status = api.run(["--config-file", str(ROOT / "pyproject.toml")])
    finally:
        os.chdir(cwd)
    assert status == 0, f"expected mypy --strict to pass on meshpilot/, got exit {status}:\n{out}{err}"
