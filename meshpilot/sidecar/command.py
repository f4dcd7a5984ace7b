"""The ``sidecar`` subcommand: the node agent that runs Envoy (and optionally the app) for one spec.yaml;
and ``identity-files``: a proxyless app's workload identity kept fresh as files (key.pem, cert.pem,
bundle.pem) for gRPC's xDS ``certificate_providers`` file_watcher.
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
        join_token_file=args.join_token_file or "", trust_bundle_file=args.trust_bundle or "",
        trust_domain=args.trust_domain or "", control_plane_name=args.control_plane_name or "",
        enrol_port=args.enrol_port,
    )
    cfg = AgentConfig(
        spec=spec, options=opts, api_url=api.rstrip("/"), token=api_token(args),
        workdir=Path(args.workdir), envoy=args.envoy or default_envoy(),
        ready_file=Path(args.ready_file) if args.ready_file else None,
        identity_wait_s=args.identity_wait,
    )
    import uvloop

    try:
        return uvloop.run(run_agent(cfg))
    except ValueError as exc:  # identity settings that cannot work, found before anything starts
        print(f"meshpilot sidecar: {exc}", file=sys.stderr)
        return 2


def cmd_identity_files(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from meshpilot.sidecar.identity import (
        GrpcSigner,
        Material,
        WorkloadIdentity,
        enrol_target,
        publish_files,
        server_name_for,
    )

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
    )
    if not args.trust_bundle:
        print("meshpilot identity-files: --trust-bundle is required (the control plane's certificate is checked "
              "against it)", file=sys.stderr)
        return 2
    host, port = _split_hostport(args.control_plane, 15010)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    out = Path(args.out)
    identity = WorkloadIdentity(
        node_id=args.node_id,
        signer=GrpcSigner(target, server_name_for(host, args.control_plane_name or ""),
                          enrol_target=enrol_target(host, port, args.enrol_port)),
        trust_bundle_file=Path(args.trust_bundle),
        join_token_file=Path(args.join_token_file) if args.join_token_file else None,
        state_dir=out / ".state",
    )
    log = logging.getLogger("meshpilot.identity")

    def publish(m: Material) -> None:
        publish_files(out, m)
        log.info("event=files_written dir=%s spiffe=%s", out, m.spiffe)

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        identity.add_listener(publish)
        try:
            await identity.run()
        except asyncio.CancelledError:
            pass

    import uvloop

    uvloop.run(main())
    return 0


def _identity_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--join-token-file", help="join token for the first enrolment (read when needed, never kept)")
    p.add_argument("--trust-bundle", metavar="FILE",
                   help="PEM roots the control plane's certificate is checked against; turns the workload identity on")
    p.add_argument("--control-plane-name",
                   help="name the control plane's certificate must hold (default: the host, or localhost for an address)")
    p.add_argument("--enrol-port", type=int, metavar="PORT",
                   help="the control plane's enrolment port, for the first contact with a join token (default: the "
                        "xDS port + 2)")


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
    _identity_arguments(p)
    p.add_argument("--trust-domain", help="SPIFFE trust domain (default: the issued certificate's)")
    p.add_argument("--identity-wait", type=float, default=60.0, metavar="SECONDS",
                   help="give up when the first certificate has not come within this time (default %(default)s)")
    p.set_defaults(func=cmd_sidecar)

    p = sub.add_parser("identity-files", help="keep a proxyless app's workload certificate fresh as files "
                                              "(key.pem, cert.pem, bundle.pem) for gRPC's file_watcher")
    p.add_argument("--out", required=True, help="directory for key.pem, cert.pem and bundle.pem (0700)")
    p.add_argument("--control-plane", default="127.0.0.1:15010", help="HOST:PORT of the xDS server")
    p.add_argument("--node-id", required=True, help="the node id the certificate is issued for (its CN)")
    p.add_argument("--log-level", default="info")
    _identity_arguments(p)
    p.set_defaults(func=cmd_identity_files)
