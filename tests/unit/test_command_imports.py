"""The subcommand modules share the management API's client through its public names
(meshpilot/api/client.py), never another module's private helpers."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

from meshpilot import cli


def _private_imports(module: str) -> list[str]:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"expected {module} to exist"
    tree = ast.parse(Path(spec.origin).read_text())
    return [
        f"{module}:{node.lineno}: from {node.module} import {alias.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("meshpilot")
        for alias in node.names
        if alias.name.startswith("_") and node.module != module
    ]


def test_no_subcommand_module_imports_another_modules_private_names() -> None:
    found = [line for module in cli._COMMAND_MODULES for line in _private_imports(module)]
    assert not found, f"expected only public names imported across modules, found: {found}"
