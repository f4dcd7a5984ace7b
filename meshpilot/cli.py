"""The one `meshpilot` command.

Each area of the product contributes its own subcommands: a module listed in
``_COMMAND_MODULES`` defines ``register(subparsers)``, which adds parsers whose
``func`` attribute takes the parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from types import ModuleType

_COMMAND_MODULES = (
    "meshpilot.commands",
    "meshpilot.meshdns.command",
    "meshpilot.sidecar.command",
    "meshpilot.perf.command",
    "meshpilot.policy.command",
)


def import_optional(name: str) -> ModuleType | None:
    """The module, or None when that module itself does not exist (errors inside it still raise)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshpilot", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        module = import_optional(name)
        if module is not None:
            module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # gRPC's fork handlers only log noise when sidecars start Envoy subprocesses
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    code = args.func(args)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
