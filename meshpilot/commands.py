"""Control-plane subcommands: ``serve``, ``bootstrap``, ``demo`` and the management CLI
(``service``, ``instance``, ``proxies``) that talks to a running control plane's HTTP API."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from meshpilot.api.client import add_api_flags, api_client, print_json

__all__ = ["register"]


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
    )


def _run(coro: Any) -> None:
    import uvloop

    uvloop.run(coro)


def cmd_serve(args: argparse.Namespace) -> int:
    from meshpilot.controlplane import ControlPlane
    from meshpilot.plugins import install_plugins
    from meshpilot.settings import load_settings

    flags = {
        "listen_address": args.listen,
        "xds_port": args.xds_port,
        "api_port": args.api_port,
        "store": args.store,
        "token": args.token,
        "token_file": args.token_file,
        "debounce_ms": args.debounce_ms,
        "debug_api": True if args.debug_api else None,
        "domain": args.domain,
        "consul_port": args.consul_port,
        "eureka_port": args.eureka_port,
    }
    overrides = {k: v for k, v in flags.items() if v is not None}
    for port in ("consul_port", "eureka_port"):
        if overrides.get(port, 0) < 0:
            overrides[port] = None  # -1 disables that front door
    try:
        settings = load_settings(args.config, **overrides)
    except ValueError as exc:
        print(f"meshpilot serve: {exc}", file=sys.stderr)
        return 2
    _setup_logging(settings.log_level)

    async def main() -> None:
        cp = ControlPlane(settings)
        install_plugins(cp)
        await cp.run(ready_file=args.ready_file)

    try:
        _run(main())
    except KeyboardInterrupt:
        pass
    return 0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from meshpilot.translate.bootstrap import BootstrapOptions, build_bootstrap, parse_control_planes

    try:
        control_planes = parse_control_planes(args.control_plane)
    except ValueError as exc:
        print(f"meshpilot bootstrap: --control-plane {exc}", file=sys.stderr)
        return 2
    opts = BootstrapOptions(
        node_id=args.node,
        service=args.service or "",
        namespace=args.namespace,
        zone=args.zone,
        control_planes=control_planes,
        api_type="GRPC" if args.sotw else "DELTA_GRPC",
        admin_port=args.admin_port,
        outbound_port=args.outbound_port,
        inbound_port=args.inbound_port,
        app_port=args.app_port,
        hds=args.hds,
        service_port=args.service_port,
    )
    doc = build_bootstrap(opts)
    text = json.dumps(doc, indent=2)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


def _parse_ports(specs: list[str]) -> list[dict[str, Any]]:
    ports = []
    for spec in specs:
        # name:port[/protocol]
        try:
            name, rest = spec.split(":", 1)
            port, _, proto = rest.partition("/")
            ports.append({"name": name, "port": int(port), "protocol": proto or "http"})
        except ValueError:
            raise SystemExit(f"meshpilot: --port {spec!r}: expected NAME:PORT[/PROTOCOL]") from None
    return ports


def cmd_service(args: argparse.Namespace) -> int:
    api = api_client(args)
    if args.action == "list":
        print_json(api.call("GET", "/v1/services"))
    elif args.action == "get":
        print_json(api.call("GET", f"/v1/services/{args.namespace}/{args.name}"))
    elif args.action == "delete":
        print_json(api.call("DELETE", f"/v1/services/{args.namespace}/{args.name}"))
    elif args.action in ("create", "apply"):
        if args.file:
            import yaml

            with open(args.file) as f:
                body = yaml.safe_load(f)
        else:
            body = {"name": args.name, "namespace": args.namespace, "ports": _parse_ports(args.port or ["http:80"])}
        if args.action == "create":
            print_json(api.call("POST", "/v1/services", body))
        else:
            print_json(api.call("PUT", f"/v1/services/{body.get('namespace', 'default')}/{body['name']}", body))
    return 0


def cmd_instance(args: argparse.Namespace) -> int:
    api = api_client(args)
    if args.action == "list":
        path = f"/v1/services/{args.namespace}/{args.service}/instances" if args.service else "/v1/instances"
        print_json(api.call("GET", path))
    elif args.action == "register":
        ports = dict(p.split("=", 1) for p in (args.port or []))
        body = {
            "id": args.id,
            "address": args.address,
            "ports": {k: int(v) for k, v in ports.items()},
            "zone": args.zone,
            "weight": args.weight,
            "labels": dict(kv.split("=", 1) for kv in (args.label or [])),
        }
        print_json(api.call("POST", f"/v1/services/{args.namespace}/{args.service}/instances", body))
    elif args.action == "deregister":
        print_json(api.call("DELETE", f"/v1/instances/{args.id}"))
    elif args.action == "health":
        print_json(api.call("PUT", f"/v1/instances/{args.id}/health", {"status": args.status}))
    return 0


def cmd_proxies(args: argparse.Namespace) -> int:
    print_json(api_client(args).call("GET", "/v1/proxies"))
    return 0


def _seconds(text: str) -> int:
    """``--ttl``: seconds, or a number with s, m, h or d."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], units[text[-1]]) if text and text[-1] in units else (text, 1)
    try:
        value = int(number) * unit
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds, or a number with s, m, h or d (30d)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
    return value


def cmd_access_token(args: argparse.Namespace) -> int:
    api = api_client(args)
    if args.action == "create":
        body: dict[str, Any] = {"scope": args.scope, "description": args.description}
        if args.ttl is not None:
            body["ttl_s"] = args.ttl
        made = api.call("POST", "/v1/access/tokens", body)
        if args.quiet:
            print(made["secret"])
        else:
            print_json(made)
            print("meshpilot: the secret is shown this once; keep it now", file=sys.stderr)
    elif args.action == "list":
        print_json(api.call("GET", "/v1/access/tokens"))
    elif args.action == "revoke":
        print_json(api.call("DELETE", f"/v1/access/tokens/{args.id}"))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from meshpilot.demo import run_demo

    _setup_logging("WARNING")
    try:
        _run(run_demo(requests=args.requests, keep_running=not args.once))
    except KeyboardInterrupt:
        print("\nmeshpilot demo: stopped")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the control plane")
    p.add_argument("--config", help="settings YAML file")
    p.add_argument("--listen", help="address for every listener (default 127.0.0.1)")
    p.add_argument("--xds-port", type=int)
    p.add_argument("--api-port", type=int)
    p.add_argument("--consul-port", type=int, help="-1 disables the Consul API")
    p.add_argument("--eureka-port", type=int, help="-1 disables the Eureka API")
    p.add_argument("--store", help="sqlite:PATH, etcd://HOST:PORT[,HOST:PORT...] (several replicas: docs/ha.md) or memory:")
    p.add_argument("--token", help="the bootstrap (admin) token; when set, every API request needs a token, reads too "
                                   "(visible in ps: prefer --token-file or MESHPILOT_TOKEN)")
    p.add_argument("--token-file", help="read the bearer token from this file (or MESHPILOT_TOKEN_FILE)")
    p.add_argument("--domain", help="mesh DNS domain (default mesh)")
    p.add_argument("--debounce-ms", type=int)
    p.add_argument("--debug-api", action="store_true", help="enable /v1/debug resource injection (tests only)")
    p.add_argument("--ready-file", help="write the bound ports as JSON here once serving")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bootstrap", help="print an Envoy bootstrap for a sidecar of this control plane")
    p.add_argument("--node", required=True, help="node id")
    p.add_argument("--service", help="the node's own service")
    p.add_argument("--namespace", default="default")
    p.add_argument("--zone", default="")
    p.add_argument("--control-plane", default="127.0.0.1:15010", metavar="HOST:PORT[,HOST:PORT...]",
                   help="the xDS server; several replicas comma-separated, Envoy moves its streams to another when "
                        "one fails (default %(default)s)")
    p.add_argument("--sotw", action="store_true", help="state-of-the-world ADS (GRPC) instead of delta")
    p.add_argument("--hds", action="store_true", help="also open the health discovery stream")
    p.add_argument("--admin-port", type=int, default=15000)
    p.add_argument("--outbound-port", type=int, default=15001)
    p.add_argument("--inbound-port", type=int, default=15006)
    p.add_argument("--app-port", type=int, default=0)
    p.add_argument("--service-port", type=int, default=0, help="the node's own service port; with --zone enables zone-aware routing")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_bootstrap)

    p = sub.add_parser("service", help="manage services")
    p.add_argument("action", choices=["list", "get", "create", "apply", "delete"])
    p.add_argument("name", nargs="?")
    p.add_argument("-n", "--namespace", default="default")
    p.add_argument("--port", action="append", help="NAME:PORT[/PROTOCOL], repeatable")
    p.add_argument("-f", "--file", help="service definition (YAML or JSON)")
    add_api_flags(p)
    p.set_defaults(func=cmd_service)

    p = sub.add_parser("instance", help="manage instances")
    p.add_argument("action", choices=["list", "register", "deregister", "health"])
    p.add_argument("--service")
    p.add_argument("-n", "--namespace", default="default")
    p.add_argument("--id")
    p.add_argument("--address")
    p.add_argument("--port", action="append", help="PORTNAME=PORT, repeatable")
    p.add_argument("--zone", default="")
    p.add_argument("--weight", type=int, default=100)
    p.add_argument("--label", action="append", help="KEY=VALUE, repeatable")
    p.add_argument("--status", choices=["passing", "warning", "critical"])
    add_api_flags(p)
    p.set_defaults(func=cmd_instance)

    p = sub.add_parser("proxies", help="list connected Envoys")
    add_api_flags(p)
    p.set_defaults(func=cmd_proxies)

    p = sub.add_parser("access", help="access tokens for the management, Consul and Eureka APIs (admin scope)")
    access = p.add_subparsers(dest="what", metavar="WHAT")
    p.set_defaults(func=lambda _args, p=p: p.print_help() or 2)
    p = access.add_parser("token", help="create, list or revoke access tokens")
    token = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = token.add_parser("create", help="create a token; its secret is printed this once")
    p.add_argument("--scope", required=True, choices=["read", "write", "admin"])
    p.add_argument("--description", default="", help="what the token is for")
    p.add_argument("--ttl", type=_seconds, help="expire after this long (seconds, or 30m, 12h, 90d); default never")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the secret")
    add_api_flags(p)
    p.set_defaults(func=cmd_access_token)
    p = token.add_parser("list", help="list tokens (never their secrets)")
    add_api_flags(p)
    p.set_defaults(func=cmd_access_token)
    p = token.add_parser("revoke", help="revoke a token by its id: refused from the next request on")
    p.add_argument("id")
    add_api_flags(p)
    p.set_defaults(func=cmd_access_token)

    p = sub.add_parser("demo", help="run a small mesh on this machine and send traffic through it")
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--once", action="store_true", help="exit after the traffic instead of waiting for Ctrl-C")
    p.set_defaults(func=cmd_demo)
