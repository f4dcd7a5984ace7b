"""Outbound capture: iptables rules that send the mesh's virtual-IP range to Envoy's outbound port
and DNS (port 53) to meshdns, so an unmodified app's ``curl http://<service>/`` goes through the mesh.

Envoy and meshdns must not capture their own traffic. Everything may run as root, so they are
exempted by a dedicated uid (``--exempt-uid``, e.g. the uid Envoy runs as) and/or a socket mark
(``--exempt-mark``, set with SO_MARK), never by "root". All rules live in our own nat chain
``MESHPILOT_OUTPUT`` jumped to from OUTPUT, so ``remove`` takes exactly what ``install`` added.
The VIP range also needs a route in the (network) namespace, or connect() fails before netfilter
sees the packet: ``install`` adds one through loopback unless a route exists.

``install_commands`` / ``remove_commands`` are pure (options in, argv lists out); ``apply`` runs them.
"""

from __future__ import annotations

import argparse
import ipaddress
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["CHAIN", "CaptureOptions", "apply", "install_commands", "register", "remove_commands"]

CHAIN = "MESHPILOT_OUTPUT"


@dataclass(frozen=True, slots=True)
class CaptureOptions:
    vip_cidr: str = "240.240.0.0/16"
    outbound_port: int = 15001
    dns_port: int | None = 15053  # None: leave DNS alone
    exempt_uids: tuple[int, ...] = ()
    exempt_marks: tuple[int, ...] = (0x539,)
    add_route: bool = True

    def validate(self) -> None:
        try:
            net = ipaddress.ip_network(self.vip_cidr)
        except ValueError:
            raise ValueError(f"vip-cidr: {self.vip_cidr!r} is not a network such as 240.240.0.0/16") from None
        if net.version != 4:
            raise ValueError("vip-cidr: only IPv4 ranges are captured (iptables); use ip6tables for IPv6")
        for name, port in (("outbound-port", self.outbound_port), ("dns-port", self.dns_port)):
            if port is not None and not 1 <= port <= 65535:
                raise ValueError(f"{name}: {port} is not a port between 1 and 65535")
        for uid in self.exempt_uids:
            if uid <= 0 or uid > 2**32 - 2:
                raise ValueError(f"exempt-uid: {uid} is not allowed (0 is root: exempting root would exempt every app)")
        for mark in self.exempt_marks:
            if not 0 < mark < 2**32:
                raise ValueError(f"exempt-mark: {mark} must be between 1 and 2^32-1")
        if not self.exempt_uids and not self.exempt_marks:
            raise ValueError("exempt-uid/exempt-mark: give at least one, or Envoy would capture its own traffic")


def install_commands(o: CaptureOptions) -> list[list[str]]:
    o.validate()
    net = str(ipaddress.ip_network(o.vip_cidr))
    ipt = ["iptables", "-w", "-t", "nat"]
    cmds = [[*ipt, "-N", CHAIN]]
    for uid in o.exempt_uids:
        cmds.append([*ipt, "-A", CHAIN, "-m", "owner", "--uid-owner", str(uid), "-j", "RETURN"])
    for mark in o.exempt_marks:
        cmds.append([*ipt, "-A", CHAIN, "-m", "mark", "--mark", hex(mark), "-j", "RETURN"])
    cmds.append([*ipt, "-A", CHAIN, "-p", "tcp", "-d", net, "-j", "REDIRECT", "--to-ports", str(o.outbound_port)])
    if o.dns_port is not None:
        for proto in ("udp", "tcp"):
            cmds.append([*ipt, "-A", CHAIN, "-p", proto, "--dport", "53", "-j", "REDIRECT", "--to-ports", str(o.dns_port)])
    cmds.append([*ipt, "-A", "OUTPUT", "-j", CHAIN])
    return cmds


def remove_commands(o: CaptureOptions) -> list[list[str]]:
    ipt = ["iptables", "-w", "-t", "nat"]
    return [[*ipt, "-D", "OUTPUT", "-j", CHAIN], [*ipt, "-F", CHAIN], [*ipt, "-X", CHAIN]]


def _route_exists(cidr: str) -> bool:
    net = ipaddress.ip_network(cidr)
    out = subprocess.run(["ip", "-4", "route", "get", str(net.network_address + 1)], capture_output=True, text=True)
    return out.returncode == 0


def apply(o: CaptureOptions, action: str) -> None:
    """Install or remove the rules. A failed install removes what it had added."""
    if action == "install":
        cmds = install_commands(o)
        done: list[list[str]] = []
        try:
            for cmd in cmds:
                _run(cmd)
                done.append(cmd)
            if o.add_route and not _route_exists(o.vip_cidr):
                for cmd in _route_commands(o.vip_cidr):
                    _run(cmd)
        except RuntimeError:
            for cmd in remove_commands(o):
                subprocess.run(cmd, capture_output=True)
            raise
    else:
        errors = []
        for cmd in remove_commands(o):
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                errors.append(f"{' '.join(cmd)}: {r.stderr.strip()}")
        if o.add_route:
            net = ipaddress.ip_network(o.vip_cidr)
            subprocess.run(["ip", "route", "del", str(net), "dev", "lo"], capture_output=True)
            subprocess.run(["ip", "addr", "del", f"{net.network_address}/{net.prefixlen}", "dev", "lo"], capture_output=True)
        if len(errors) == len(remove_commands(o)):
            raise RuntimeError("no capture rules were installed: " + "; ".join(errors))


def _route_commands(cidr: str) -> list[list[str]]:
    """A route for the VIP range through loopback, with a source address of the range (without
    one, connections to a VIP never reach the REDIRECT rule)."""
    net = ipaddress.ip_network(cidr)
    src = str(net.network_address)
    return [
        ["ip", "addr", "add", f"{src}/{net.prefixlen}", "dev", "lo", "noprefixroute"],
        ["ip", "route", "add", str(net), "dev", "lo", "src", src],
    ]


def _run(cmd: Sequence[str]) -> None:
    r = subprocess.run(list(cmd), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip() or r.stdout.strip()}")


def _cmd(args: argparse.Namespace) -> int:
    o = CaptureOptions(
        vip_cidr=args.vip_cidr,
        outbound_port=args.outbound_port,
        dns_port=None if args.dns_port == 0 else args.dns_port,
        exempt_uids=tuple(args.exempt_uid or ()),
        exempt_marks=tuple(int(m, 0) for m in (args.exempt_mark or ["0x539"])),
        add_route=not args.no_route,
    )
    try:
        if args.dry_run:
            cmds = install_commands(o) if args.action == "install" else remove_commands(o)
            print("\n".join(" ".join(c) for c in cmds))
            return 0
        apply(o, args.action)
    except (ValueError, RuntimeError) as exc:
        print(f"meshpilot capture {args.action}: {exc}", file=sys.stderr)
        return 1
    print(f"meshpilot capture: {args.action} done ({o.vip_cidr} -> :{o.outbound_port}"
          + (f", dns -> :{o.dns_port}" if o.dns_port else "") + ")")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("capture", help="install or remove the iptables rules that send mesh traffic to the sidecar")
    p.add_argument("action", choices=["install", "remove"])
    p.add_argument("--vip-cidr", default="240.240.0.0/16")
    p.add_argument("--outbound-port", type=int, default=15001)
    p.add_argument("--dns-port", type=int, default=15053, help="meshdns port; 0 leaves DNS alone")
    p.add_argument("--exempt-uid", type=int, action="append", help="uid whose traffic is never captured (Envoy's, meshdns')")
    p.add_argument("--exempt-mark", action="append", help="SO_MARK value never captured (default 0x539)")
    p.add_argument("--no-route", action="store_true", help="do not add a route for the VIP range")
    p.add_argument("--dry-run", action="store_true", help="print the iptables commands instead of running them")
    p.set_defaults(func=_cmd)
