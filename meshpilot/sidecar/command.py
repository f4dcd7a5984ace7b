"""The ``sidecar`` subcommand: the node agent that runs Envoy (and optionally the app) for one spec.yaml;
and ``identity-files``: a proxyless app's workload identity kept fresh as files (key.pem, cert.pem,
bundle.pem) for gRPC's xDS ``certificate_providers`` file_watcher; and ``proxyless-bootstrap``: the xDS
bootstrap file of a proxyless gRPC app (meshpilot/proxyless/bootstrap.py).
``capture`` (sidecar/capture.py) and ``inject``/``webhook`` (kube/command.py) register themselves.
``--control-plane`` names one control plane or several replicas (``HOST:PORT,HOST:PORT``); every client the
agent runs (Envoy's ADS and HDS, meshdns' table stream, the certificate's enrolment, renewals and bundle watch,
the management-API calls) knows them all and moves to another when one fails."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

__all__ = ["register"]


def _control_planes(value: str, command: str) -> tuple[tuple[str, int], ...] | None:
    """``--control-plane``: the replicas, or None after printing what is wrong."""
    from meshpilot.translate.bootstrap import parse_control_planes

    try:
        return parse_control_planes(value)
    except ValueError as exc:
        print(f"meshpilot {command}: --control-plane {exc}", file=sys.stderr)
        return None


def _sidecar_control_planes(flag: str | None, spec_replicas: tuple[tuple[str, int], ...]
                            ) -> tuple[tuple[str, int], ...] | None:
    """The agent's replicas: ``--control-plane`` when given, else spec.yaml's ``mesh.controlPlanes``, else
    127.0.0.1:15010; None after printing what is wrong with the flag."""
    if flag is None and spec_replicas:
        return spec_replicas
    return _control_planes(flag or "127.0.0.1:15010", "sidecar")


def _api_urls(value: str | None, control_planes: tuple[tuple[str, int], ...]) -> tuple[str, ...]:
    """``--api`` (comma-separated for several replicas), default each control-plane host's port 15014."""
    if value:
        return tuple(u.strip().rstrip("/") for u in value.split(",") if u.strip())
    hosts = dict.fromkeys(f"[{h}]" if ":" in h else h for h, _ in control_planes)
    return tuple(f"http://{h}:15014" for h in hosts)


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
    control_planes = _sidecar_control_planes(args.control_plane, spec.mesh.control_plane_addresses)
    if control_planes is None:
        return 2
    host, port = control_planes[0]
    api_urls = _api_urls(args.api, control_planes)
    if not api_urls:
        print("meshpilot sidecar: --api names no URL", file=sys.stderr)
        return 2
    opts = SidecarOptions(
        control_plane_host=host, control_plane_port=port, control_planes=control_planes, node_id=args.node_id or "",
        api_type="GRPC" if args.sotw else "DELTA_GRPC",
        admin_port=args.admin_port, inbound_port=args.inbound_port, outbound_port=args.outbound_port,
        advertise_address=args.advertise_address or os.environ.get("MESHPILOT_ADVERTISE_ADDRESS", ""),
        join_token_file=args.join_token_file or "", trust_bundle_file=args.trust_bundle or "",
        trust_domain=args.trust_domain or "", control_plane_name=args.control_plane_name or "",
        enrol_port=args.enrol_port,
    )
    cfg = AgentConfig(
        spec=spec, options=opts, api_url=api_urls[0], api_urls=api_urls, token=api_token(args),
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
    from meshpilot.translate.bootstrap import grpc_target

    control_planes = _control_planes(args.control_plane, "identity-files")
    if control_planes is None:
        return 2
    out = Path(args.out)
    identity = WorkloadIdentity(
        node_id=args.node_id,
        signer=GrpcSigner([grpc_target(h, p) for h, p in control_planes],
                          server_name_for(control_planes[0][0], args.control_plane_name or ""),
                          enrol_target=[enrol_target(h, p, args.enrol_port) for h, p in control_planes]),
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


def cmd_proxyless_bootstrap(args: argparse.Namespace) -> int:
    import json

    from meshpilot.proxyless.bootstrap import GrpcBootstrapOptions, build_grpc_bootstrap

    control_planes = _control_planes(args.control_plane, "proxyless-bootstrap")
    if control_planes is None:
        return 2
    addresses = tuple(a.strip() for item in args.server_address or [] for a in item.split(",") if a.strip())
    try:
        doc = build_grpc_bootstrap(GrpcBootstrapOptions(
            node_id=args.node_id, control_planes=control_planes, cluster=args.cluster or "", zone=args.zone,
            service=args.service or "", namespace=args.namespace, server_addresses=addresses,
            identity_dir=args.identity_dir or ""))
    except ValueError as exc:
        print(f"meshpilot proxyless-bootstrap: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(doc, indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
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
    p.add_argument("--control-plane", metavar="HOST:PORT[,HOST:PORT...]",
                   help="the xDS/HDS server; several replicas comma-separated: every client of the node moves to "
                        "another when one fails (default: the spec's mesh.controlPlanes, else 127.0.0.1:15010)")
    p.add_argument("--api", metavar="URL[,URL...]",
                   help="management API URL, several comma-separated (default http://HOST:15014 for each "
                        "control-plane host)")
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
    p.add_argument("--control-plane", default="127.0.0.1:15010", metavar="HOST:PORT[,HOST:PORT...]",
                   help="the xDS server; several replicas comma-separated (default %(default)s)")
    p.add_argument("--node-id", required=True, help="the node id the certificate is issued for (its CN)")
    p.add_argument("--log-level", default="info")
    _identity_arguments(p)
    p.set_defaults(func=cmd_identity_files)

    p = sub.add_parser("proxyless-bootstrap", help="print the xDS bootstrap of a proxyless gRPC app "
                                                   "(the file GRPC_XDS_BOOTSTRAP names)")
    p.add_argument("--node-id", required=True, help="node id, unique per client process")
    p.add_argument("--control-plane", default="127.0.0.1:15010", metavar="HOST:PORT[,HOST:PORT...]",
                   help="the xDS server; several replicas by IP address comma-separated become one gRPC target "
                        "(ipv4:A,B) that reconnects to another when one fails (default %(default)s)")
    p.add_argument("--cluster", help="node cluster (default: the service, else the node id)")
    p.add_argument("--zone", default="")
    p.add_argument("--service", help="the app's own service (needed with --server-address)")
    p.add_argument("-n", "--namespace", default="default")
    p.add_argument("--server-address", action="append", metavar="IP:PORT",
                   help="an address the app's xDS-enabled gRPC server listens on, repeatable or comma-separated")
    p.add_argument("--identity-dir", metavar="DIR",
                   help="the directory `meshpilot identity-files --out` keeps fresh: TLS to the control plane and "
                        "the certificate provider 'mesh'")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_proxyless_bootstrap)
