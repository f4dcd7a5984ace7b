"""``meshpilot identity``: the mesh CA through the management API.

``token create|list|revoke`` administers join tokens (a new token's secret is printed once);
``bundle`` prints the trust bundle (PEM) an agent pins before its first contact; ``roots
list|add|activate|remove`` rotates roots; ``enrolments list|remove`` shows the enrolled nodes and
cuts one off (it can no longer renew). Standard library only, so the command starts fast.
"""

from __future__ import annotations

import argparse
import sys
import urllib.parse

from meshpilot.api.client import add_api_flags, api_client, print_json

__all__ = ["register"]


def _quote(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def cmd_token(args: argparse.Namespace) -> int:
    api = api_client(args)
    if args.action == "create":
        if not args.namespace or not args.service:
            raise SystemExit("meshpilot: identity token create: --namespace and --service are required")
        body: dict[str, object] = {"namespace": args.namespace, "service": args.service,
                                   "single_use": bool(args.single_use), "description": args.description or ""}
        if args.ttl is not None:
            body["ttl_s"] = args.ttl
        if args.max_uses is not None:
            body["max_uses"] = args.max_uses
        print_json(api.call("POST", "/v1/identity/tokens", body))
    elif args.action == "list":
        print_json(api.call("GET", "/v1/identity/tokens"))
    elif args.action == "revoke":
        if not args.id:
            raise SystemExit("meshpilot: identity token revoke: the token ID is required")
        print_json(api.call("DELETE", f"/v1/identity/tokens/{_quote(args.id)}"))
    return 0


def cmd_bundle(args: argparse.Namespace) -> int:
    summary = api_client(args).call("GET", "/v1/identity")
    sys.stdout.write(str(summary.get("bundle_pem", "")) if isinstance(summary, dict) else "")
    return 0


def cmd_roots(args: argparse.Namespace) -> int:
    api = api_client(args)
    if args.action in ("activate", "remove") and not args.serial:
        raise SystemExit(f"meshpilot: identity roots {args.action}: the root's SERIAL is required")
    if args.action == "list":
        print_json(api.call("GET", "/v1/identity/roots"))
    elif args.action == "add":
        body = None
        if args.cert:
            try:
                with open(args.cert) as f:
                    body = {"cert_pem": f.read()}
            except OSError as exc:
                raise SystemExit(f"meshpilot: identity roots add: {args.cert}: {exc.strerror}") from None
        print_json(api.call("POST", "/v1/identity/roots", body))
    elif args.action == "activate":
        print_json(api.call("POST", f"/v1/identity/roots/{_quote(args.serial)}/activate"))
    elif args.action == "remove":
        query = "?force=true" if args.force else ""
        print_json(api.call("DELETE", f"/v1/identity/roots/{_quote(args.serial)}{query}"))
    return 0


def cmd_enrolments(args: argparse.Namespace) -> int:
    api = api_client(args)
    if args.action == "list":
        print_json(api.call("GET", "/v1/identity/enrolments"))
    else:
        if not args.node:
            raise SystemExit("meshpilot: identity enrolments remove: the NODE id is required")
        print_json(api.call("DELETE", f"/v1/identity/enrolments/{_quote(args.node)}"))
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("identity", help="the mesh CA: join tokens, trust bundle, roots, enrolled nodes")
    groups = p.add_subparsers(dest="identity_command", metavar="WHAT", required=True)

    def usage(_args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=usage)  # each WHAT below sets its own

    t = groups.add_parser("token", help="join tokens: create, list, revoke")
    t.add_argument("action", choices=["create", "list", "revoke"])
    t.add_argument("id", nargs="?", help="revoke: the token's id")
    t.add_argument("--namespace", help="create: the namespace the token enrols nodes in")
    t.add_argument("--service", help="create: the service the token enrols nodes as")
    t.add_argument("--single-use", action="store_true", help="create: the token enrols one node only")
    t.add_argument("--max-uses", type=int, default=None, help="create: the token enrols at most this many nodes")
    t.add_argument("--ttl", type=float, metavar="SECONDS", help="create: the token expires after this long")
    t.add_argument("--description", help="create: a note for whoever lists tokens later")
    add_api_flags(t)
    t.set_defaults(func=cmd_token)

    b = groups.add_parser("bundle", help="print the trust bundle (PEM)")
    add_api_flags(b)
    b.set_defaults(func=cmd_bundle)

    r = groups.add_parser("roots", help="trusted roots: list, add [--cert FILE], activate SERIAL, remove SERIAL")
    r.add_argument("action", choices=["list", "add", "activate", "remove"])
    r.add_argument("serial", nargs="?", help="activate, remove: the root's serial (hex, from roots list)")
    r.add_argument("--cert", metavar="FILE",
                   help="add: trust this CA certificate (PEM; its key stays with you) instead of generating a root")
    r.add_argument("--force", action="store_true",
                   help="remove: even while nodes' current certificates chain to it (they fail until they re-enrol)")
    add_api_flags(r)
    r.set_defaults(func=cmd_roots)

    e = groups.add_parser("enrolments", help="enrolled nodes: list, remove NODE")
    e.add_argument("action", choices=["list", "remove"])
    e.add_argument("node", nargs="?", help="remove: the node id")
    add_api_flags(e)
    e.set_defaults(func=cmd_enrolments)
