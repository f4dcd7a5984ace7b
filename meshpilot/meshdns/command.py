"""``meshpilot meshdns``: run the per-node DNS server from the command line.

Registers the subcommand with the central ``meshpilot`` parser and turns its options into a
:class:`~meshpilot.meshdns.config.MeshDnsConfig`. Once both listeners are bound it prints one line,
``meshdns listening HOST:PORT``, so whoever started it (a test, a supervisor) learns the port when 0 was asked.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

from meshpilot.meshdns.config import MeshDnsConfig, parse_hostport

__all__ = ["register", "add_arguments", "config_from_args", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default="127.0.0.1:15053", metavar="HOST:PORT",
                   help="UDP and TCP listening address (port 0 picks one; default %(default)s)")
    p.add_argument("--control-plane", default="127.0.0.1:15010", metavar="HOST:PORT[,HOST:PORT...]",
                   help="xDS server with the name table; several replicas comma-separated (the table stream moves "
                        "to another when one fails); 'none' to run without one (default %(default)s)")
    p.add_argument("--node-id", default=None, help="node id sent to the control plane (default: HOSTNAME~meshdns)")
    p.add_argument("--state-file", default=None, help="where the last table is kept across restarts")
    p.add_argument("--upstream", action="append", default=[], metavar="HOST[:PORT]",
                   help="resolver for non-mesh names, repeatable (default: nameservers of /etc/resolv.conf)")
    p.add_argument("--upstream-mark", default=None, metavar="MARK",
                   help="SO_MARK for upstream queries, e.g. 0x539, the mark `meshpilot capture` exempts (needs "
                        "CAP_NET_ADMIN; default: none)")
    p.add_argument("--upstream-timeout", type=float, default=1.5, help="seconds per upstream try (%(default)s)")
    p.add_argument("--ttl", type=int, default=30, help="TTL of mesh answers in seconds (%(default)s)")
    p.add_argument("--domain", default="mesh", help="mesh domain (%(default)s)")
    p.add_argument("--namespace", default="default", help="this node's namespace, for bare <svc> names")
    p.add_argument("--search", action="append", default=[], metavar="SUFFIX",
                   help="search suffix mesh names are also answered under, repeatable or comma-separated "
                        "(default: search list of /etc/resolv.conf)")
    p.add_argument("--static-table", default=None, metavar="FILE",
                   help="JSON/YAML list of services to serve instead of the control plane's table")
    p.add_argument("--no-udp-batch", dest="udp_batch", action="store_false",
                   help="serve UDP through a plain asyncio DatagramProtocol instead of batched recvmmsg/sendmmsg")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _mark(text: str | None) -> int | None:
    if text is None or text.strip().lower() in ("", "none", "0"):
        return None
    try:
        mark = int(text, 0)
    except ValueError:
        raise ValueError(f"--upstream-mark: {text!r} is not a number such as 0x539") from None
    if not 0 < mark < 2**32:
        raise ValueError(f"--upstream-mark: {text!r} must be between 1 and 2^32-1")
    return mark


def _control_planes(text: str) -> str:
    """``--control-plane``: each replica checked as HOST:PORT, the list given back as gRPC targets, comma-separated."""
    targets = []
    for item in text.split(","):
        try:
            host, port = parse_hostport(item, 15010)
        except ValueError as exc:
            raise ValueError(f"--control-plane: {item.strip()!r}: expected HOST:PORT ({exc})") from None
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if target in targets:
            raise ValueError(f"--control-plane: {item.strip()!r} is listed twice")
        targets.append(target)
    return ",".join(targets)


def config_from_args(args: argparse.Namespace) -> MeshDnsConfig:
    host, port = parse_hostport(args.listen, 15053)
    cp = None if args.control_plane.lower() in ("", "none") else _control_planes(args.control_plane)
    search = tuple(s for item in args.search for s in item.split(",") if s.strip("."))
    kwargs: dict[str, Any] = {}
    if args.node_id:
        kwargs["node_id"] = args.node_id
    return MeshDnsConfig(
        host=host, port=port, control_plane=cp, state_file=args.state_file,
        upstreams=tuple(parse_hostport(u, 53) for u in args.upstream), upstream_timeout=args.upstream_timeout,
        ttl=args.ttl, domain=args.domain.strip("."), namespace=args.namespace, search=search,
        static_table=args.static_table, udp_batch=args.udp_batch, upstream_mark=_mark(args.upstream_mark), **kwargs,
    )


async def _run(config: MeshDnsConfig) -> None:
    from meshpilot.meshdns.server import MeshDns, serve

    main_task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    assert main_task is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, main_task.cancel)

    def ready(dns: MeshDns) -> None:
        print(f"meshdns listening {config.host}:{dns.port}", flush=True)

    try:
        await serve(config, ready=ready)
    except asyncio.CancelledError:
        pass


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="ts=%(asctime)s level=%(levelname)s %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"meshdns: {exc}", file=sys.stderr)
        return 2
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_run(config))
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("meshdns", help="per-node DNS: mesh names to virtual IPs, the rest forwarded",
                              description=__doc__.splitlines()[0] if __doc__ else None)
    add_arguments(p)
    p.set_defaults(func=main)
