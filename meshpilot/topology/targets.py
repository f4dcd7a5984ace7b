"""What Prometheus should scrape in the mesh, as a file_sd / http_sd document: one target per connected
sidecar's read-only stats listener (``STATS_PORT`` in its node metadata, translate/bootstrap.py) and one
per live control-plane replica's ``/metrics`` (the ``replicas`` table every replica writes once its
management API listens). Pure: connected nodes and replica records in, a JSON-serialisable list out,
the same list for the same mesh (sorted), so the file is rewritten only when the mesh changed.

Each group holds one target with the labels an operator filters by: ``kind`` (``sidecar`` or
``controlplane``), ``service``, ``namespace``, ``node``, ``zone``, ``instance`` (``host:port``, as
Prometheus would set it) and ``__metrics_path__`` (Envoy serves ``/stats/prometheus``), so a stock
Prometheus needs nothing but the ``file_sd_configs`` (or ``http_sd_configs``) entry.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from meshpilot.translate.bootstrap import STATS_PATH, STATS_PORT_META
from meshpilot.xds.resource import NodeInfo

__all__ = ["CONTROL_PLANE_SERVICE", "METRICS_PATH", "file_sd", "host_port", "merge_file_sd", "sidecar_target", "stats_port",
           "write_file_sd"]

METRICS_PATH = "/metrics"
CONTROL_PLANE_SERVICE = "meshpilot"  # the ``service`` label of the control plane's own targets


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def stats_port(node: NodeInfo) -> int:
    """The node's stats listener port from its metadata, 0 when it has none (or junk)."""
    raw = node.extra.get(STATS_PORT_META) if isinstance(node.extra, dict) else None
    try:
        port = int(raw) if isinstance(raw, (int, float, str)) and not isinstance(raw, bool) else 0
    except ValueError:
        return 0
    return port if 0 < port < 65536 else 0


def _routable(host: str) -> bool:
    try:
        return not ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return bool(host)  # a name


def sidecar_target(node: NodeInfo) -> dict[str, Any] | None:
    """The node's scrape target, or None: no stats listener, a proxyless client, or an address nobody
    else can reach (a wildcard bind address without an advertised one)."""
    port = stats_port(node)
    if not port or node.proxyless or not _routable(node.address):
        return None
    instance = host_port(node.address, port)
    labels = {"kind": "sidecar", "node": node.id, "instance": instance, "__metrics_path__": STATS_PATH}
    if node.service:
        labels["service"] = node.service
        labels["namespace"] = node.namespace
    if node.zone:
        labels["zone"] = node.zone
    return {"targets": [instance], "labels": labels}


def _replica_target(replica: str, record: Any) -> dict[str, Any] | None:
    api = record.get("api") if isinstance(record, dict) else None
    if not (isinstance(api, list) and len(api) == 2 and isinstance(api[0], str) and isinstance(api[1], int)
            and not isinstance(api[1], bool) and 0 < api[1] < 65536 and _routable(api[0])):
        return None
    instance = host_port(api[0], api[1])
    return {"targets": [instance], "labels": {
        "kind": "controlplane", "service": CONTROL_PLANE_SERVICE, "node": replica, "instance": instance,
        "__metrics_path__": METRICS_PATH,
    }}


def file_sd(nodes: Iterable[NodeInfo], replicas: Iterable[tuple[str, Any]]) -> list[dict[str, Any]]:
    """Every target: the control-plane replicas first, then the sidecars, each group in the order of its
    address; a target two records name (a node reconnected under another id) is listed once."""
    groups = [g for g in (_replica_target(r, rec) for r, rec in replicas) if g is not None]
    groups.sort(key=lambda g: (g["targets"][0], g["labels"]["node"]))
    sidecars = [g for g in (sidecar_target(n) for n in nodes) if g is not None]
    sidecars.sort(key=lambda g: (g["targets"][0], g["labels"]["node"]))
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for g in (*groups, *sidecars):
        if g["targets"][0] not in seen:
            seen.add(g["targets"][0])
            out.append(g)
    return out


def merge_file_sd(documents: Iterable[Any]) -> list[dict[str, Any]]:
    """Several replicas' documents as one, in the same order as :func:`file_sd`; a target two of them
    name (every replica lists every replica's /metrics) is listed once. Groups that are not a target with
    labels (an answer from something else) are left out."""
    groups: dict[str, dict[str, Any]] = {}
    for doc in documents:
        for g in doc if isinstance(doc, list) else ():
            targets, labels = (g.get("targets"), g.get("labels")) if isinstance(g, dict) else (None, None)
            if (isinstance(targets, list) and len(targets) == 1 and isinstance(targets[0], str) and isinstance(labels, dict)
                    and all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())):
                groups.setdefault(targets[0], {"targets": [targets[0]], "labels": dict(labels)})
    ordered = sorted(groups.values(), key=lambda g: (g["labels"].get("kind") != "controlplane", g["targets"][0],
                                                     g["labels"].get("node", "")))
    return ordered


def write_file_sd(path: str | Path, groups: list[dict[str, Any]]) -> None:
    """Replace the file in one step (a temporary file beside it, then rename), so Prometheus, which
    rereads it on every change, never sees half of it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(groups, f, indent=1, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
