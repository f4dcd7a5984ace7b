"""The ``sidecar`` subcommand: the node agent that runs Envoy (and optionally the app) for one spec.yaml.
``capture`` (sidecar/capture.py) and ``inject``/``webhook`` (kube/command.py) register themselves."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

__all__ = ["register"]


def _split_hostport(value: str, default_port: int) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        return value, default_port
    try:
        return host.strip("[]") or "127.0.0.1", int(port)
    except ValueError:
        raise SystemExit(f"meshpilot: {value!r}: expected HOST:PORT") from None


def cmd_sidecar(args: argparse.Namespace) -> int:
    from meshpilot.api.client import api_token
    from meshpilot.sidecar.agent import AgentConfig, default_envoy, run_agent
    from meshpilot.sidecar.render import SidecarOptions
    from meshpilot.sidecar.spec import SpecError, load_spec

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        spec = load_spec(Path(args.spec).read_bytes())
    except OSError as exc:
        print(f"meshpilot sidecar: cannot read {args.spec}: {exc.strerror}", file=sys.stderr)
        return 2
    except SpecError as exc:
        print(f"meshpilot sidecar: {args.spec}: invalid spec:", file=sys.stderr)
        for f in exc.fields:
            print(f"  {f['field']}: {f['reason']}", file=sys.stderr)
        return 2
    host, port = _split_hostport(args.control_plane, 15010)
    api = args.api or f"http://{host}:15014"
    opts = SidecarOptions(
        control_plane_host=host, control_plane_port=port, node_id=args.node_id or "",
        api_type="GRPC" if args.sotw else "DELTA_GRPC",
        admin_port=args.admin_port, inbound_port=args.inbound_port, outbound_port=args.outbound_port,
        advertise_address=args.advertise_address or os.environ.get("MESHPILOT_ADVERTISE_ADDRESS", ""),
    )
    cfg = AgentConfig(
        spec=spec, options=opts, api_url=api.rstrip("/"), token=api_token(args),
        workdir=Path(args.workdir), envoy=args.envoy or default_envoy(),
        ready_file=Path(args.ready_file) if args.ready_file else None,
    )
    import uvloop

    return uvloop.run(run_agent(cfg))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("sidecar", help="run Envoy (and optionally the app) for one app described by spec.yaml")
    p.add_argument("--spec", required=True, help="spec.yaml: a Kubernetes Service plus a mesh section")
    p.add_argument("--control-plane", default="127.0.0.1:15010", help="HOST:PORT of the xDS/HDS server")
    p.add_argument("--api", help="management API URL (default http://HOST:15014)")
    p.add_argument("--token", help="bearer token for the management API (visible in ps: prefer --token-file or MESHPILOT_TOKEN)")
    p.add_argument("--token-file", help="read the bearer token from this file (or MESHPILOT_TOKEN_FILE)")
    p.add_argument("--node-id", help="node and instance id (default NAME.NAMESPACE-HOST-INBOUNDPORT)")
    p.add_argument("--admin-port", type=int, help="Envoy admin port on loopback (0: pick one)")
    p.add_argument("--inbound-port", type=int)
    p.add_argument("--outbound-port", type=int)
    p.add_argument("--advertise-address", help="address callers reach the inbound port at (or MESHPILOT_ADVERTISE_ADDRESS)")
    p.add_argument("--sotw", action="store_true", help="state-of-the-world ADS instead of delta")
    p.add_argument("--envoy", help="Envoy binary (default: the one next to this Python)")
    p.add_argument("--workdir", default="var/sidecar", help="bootstrap, logs and admin address go here")
    p.add_argument("--ready-file", help="write pids and ports as JSON here once Envoy's admin answers")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_sidecar)
