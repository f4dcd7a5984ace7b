"""Which node a certificate may speak for: the rule the xDS and HDS streams apply to their clients
when the control plane authenticates them.

A workload certificate names one SPIFFE id (namespace and service) and one node id (its subject
CN; the CA binds a node id to one identity at enrolment). A stream's node must be that node, or
one of its auxiliary streams (``<node>~<what>``, such as the node's meshdns table stream), and a
node that says which service it runs must run the certificate's service. Pure: a Peer and the
node's claims in, a refusal or None out.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshpilot.pki.peer import Peer

__all__ = ["Refusal", "refusal"]


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a client may not speak for a node; ``authenticated`` is False when it proved no identity."""

    authenticated: bool
    reason: str


def refusal(peer: Peer | None, trust_domain: str, node_id: str, service: str = "", namespace: str = "default") -> Refusal | None:
    if peer is None:
        return Refusal(False, "a client certificate issued by the mesh CA is required")
    if peer.trust_domain != trust_domain:
        return Refusal(True, f"the certificate {peer.spiffe} is not of trust domain {trust_domain!r}")
    if not peer.service:
        return Refusal(True, "the control plane's certificate is no node's")
    if not peer.node_id:
        return Refusal(True, f"the certificate {peer.spiffe} names no node")
    if node_id != peer.node_id and not node_id.startswith(peer.node_id + "~"):
        return Refusal(True, f"node.id {node_id!r} is not the certificate's node {peer.node_id!r}")
    if service and (service, namespace) != (peer.service, peer.namespace):
        return Refusal(True, f"node {node_id!r} claims service {service}.{namespace}; its certificate is {peer.spiffe}")
    return None
