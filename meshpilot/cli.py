"""The one `meshpilot` command.

Each area of the product contributes its own subcommands: a module listed in
``_COMMAND_MODULES`` defines ``register(subparsers)``, which adds parsers whose
``func`` attribute takes the parsed arguments and returns an exit code. Every listed
module is part of the product: one that cannot be imported is an error, not a
subcommand quietly left out.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

_COMMAND_MODULES = (
    "meshpilot.commands",
    "meshpilot.meshdns.command",
    "meshpilot.sidecar.command",
    "meshpilot.sidecar.capture",
    "meshpilot.kube.command",
    "meshpilot.perf.command",
    "meshpilot.policy.command",
    "meshpilot.identity.command",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshpilot", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
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
