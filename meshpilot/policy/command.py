"""``meshpilot policy list|get|apply|delete``: policies through the management API.

``apply -f FILE`` reads YAML or JSON holding one policy or several (a list, or YAML documents
separated by ``---``), each with its ``kind``, and creates or replaces each one.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from meshpilot.api.client import add_api_flags, api_client, print_json

__all__ = ["register"]


def _documents(path: str) -> list[dict[str, Any]]:
    import yaml

    try:
        with open(path) if path != "-" else sys.stdin as f:
            loaded = [d for d in yaml.safe_load_all(f) if d is not None]
    except (OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"meshpilot: {path}: {exc}") from None
    docs: list[Any] = []
    for d in loaded:
        docs.extend(d if isinstance(d, list) else [d])
    for n, d in enumerate(docs):
        if not isinstance(d, dict) or not d.get("kind") or not d.get("name"):
            raise SystemExit(f"meshpilot: {path}: policy {n + 1}: a mapping with 'kind' and 'name' is required")
    return docs


def cmd_policy(args: argparse.Namespace) -> int:
    api = api_client(args)
    if args.action == "list":
        path = f"/v1/policies/{args.kind}" if args.kind else "/v1/policies"
        if args.namespace:
            path += f"?namespace={args.namespace}"
        print_json(api.call("GET", path))
    elif args.action in ("get", "delete"):
        if not args.kind or not args.name:
            raise SystemExit(f"meshpilot: policy {args.action}: KIND and NAME are required")
        method = "GET" if args.action == "get" else "DELETE"
        print_json(api.call(method, f"/v1/policies/{args.kind}/{args.namespace or 'default'}/{args.name}"))
    elif args.action == "apply":
        if not args.file:
            raise SystemExit("meshpilot: policy apply: -f FILE is required")
        out = []
        for doc in _documents(args.file):
            ns = doc.get("namespace") or args.namespace or "default"
            out.append(api.call("PUT", f"/v1/policies/{doc['kind']}/{ns}/{doc['name']}", {**doc, "namespace": ns}))
        print_json(out if len(out) != 1 else out[0])
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("policy", help="manage policies (RoutingPolicy, ...)")
    p.add_argument("action", choices=["list", "get", "apply", "delete"])
    p.add_argument("kind", nargs="?", help="policy kind, e.g. RoutingPolicy")
    p.add_argument("name", nargs="?")
    p.add_argument("-n", "--namespace", help="namespace (default: default; list: all)")
    p.add_argument("-f", "--file", help="apply: policy file (YAML or JSON; - for stdin)")
    add_api_flags(p)
    p.set_defaults(func=cmd_policy)
