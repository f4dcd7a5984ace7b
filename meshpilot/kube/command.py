"""Kubernetes subcommands: ``inject`` (patch manifests, like ``istioctl kube-inject``) and
``webhook`` (the same injection as an HTTPS mutating admission webhook, AdmissionReview v1)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshpilot.kube.inject import InjectConfig

__all__ = ["register"]


def _config(args: argparse.Namespace) -> InjectConfig:
    from meshpilot.kube.inject import InjectConfig

    return InjectConfig(image=args.image, control_plane=args.control_plane, api=args.api, vip_cidr=args.vip_cidr,
                        identity=args.identity, join_token_secret=args.join_token_secret or "",
                        trust_bundle_configmap=args.trust_bundle_configmap)


def cmd_inject(args: argparse.Namespace) -> int:
    from meshpilot.kube.inject import InjectError, inject_documents

    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    except OSError as exc:
        print(f"meshpilot inject: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        out = inject_documents(text, _config(args))
    except InjectError as exc:
        print(f"meshpilot inject: {args.file}: {exc}", file=sys.stderr)
        return 1
    if args.output:
        Path(args.output).write_text(out)
    else:
        sys.stdout.write(out)
    return 0


def cmd_webhook(args: argparse.Namespace) -> int:
    from meshpilot.kube.webhook import serve

    return serve(args.listen, args.port, args.cert, args.key, _config(args), args.ready_file)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", default="meshpilot/meshpilot:latest", help="image of the sidecar and init containers")
    p.add_argument("--control-plane", default="meshpilot.meshpilot-system.svc:15010", metavar="HOST:PORT[,HOST:PORT...]",
                   help="the xDS server every injected sidecar uses: one name that resolves to every replica, or "
                        "several replicas comma-separated (default %(default)s)")
    p.add_argument("--api", default="http://meshpilot.meshpilot-system.svc:15014")
    p.add_argument("--vip-cidr", default="240.240.0.0/16")
    p.add_argument("--identity", action="store_true",
                   help="give every sidecar a workload identity: each pod reads its join token (key: token) from the "
                        "Secret its meshpilot.io/join-token-secret annotation names, else meshpilot-join-<service>")
    p.add_argument("--join-token-secret", metavar="NAME",
                   help="the Secret (key: token) for every pod without the annotation, instead of "
                        "meshpilot-join-<service> (turns --identity on); a join token enrols one service only, so "
                        "this fits only where every injected pod is that service")
    p.add_argument("--trust-bundle-configmap", default="meshpilot-trust-bundle",
                   help="ConfigMap with the trust bundle (key: bundle.pem) for sidecars with an identity")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("inject", help="add the sidecar and capture init container to Kubernetes manifests")
    p.add_argument("-f", "--file", required=True, help="manifest (YAML, several documents allowed; - for stdin)")
    p.add_argument("-o", "--output", help="write here instead of stdout")
    _common(p)
    p.set_defaults(func=cmd_inject)

    p = sub.add_parser("webhook", help="serve sidecar injection as a mutating admission webhook over HTTPS")
    p.add_argument("--listen", default="0.0.0.0")
    p.add_argument("--port", type=int, default=9443)
    p.add_argument("--cert", required=True, help="TLS certificate (PEM)")
    p.add_argument("--key", required=True, help="TLS private key (PEM)")
    p.add_argument("--ready-file", help="write the bound port as JSON here once serving")
    _common(p)
    p.set_defaults(func=cmd_webhook)
