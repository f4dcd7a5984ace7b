"""The mesh CA's part of the control plane, when ``identity`` is on: the Identity gRPC service on
the xDS port (whose TLS credentials it gives, client certificates required), the same service on
the enrolment port (TLS without client certificates: a node's first Sign with its join token), and
the /v1/identity management routes. Removing a node's enrolment there ends its bundle watches and,
through ``core.disconnect``, its xDS streams. With ``identity`` off it contributes nothing.

The enrolment port is the ``enrolment_port`` setting, else ``xds_port + 2`` (15012 by default), or one
the OS picks when ``xds_port`` is 0; ``GET /v1/identity`` reports the bound one.
"""

from __future__ import annotations

from meshpilot.identity.ca import ENROLMENTS, ROOTS, MeshCa
from meshpilot.identity.routes import identity_routes
from meshpilot.identity.service import EnrolmentServer, IdentityService, identity_handler
from meshpilot.identity.tokens import JoinTokens
from meshpilot.parts import Core, Part, Task
from meshpilot.registry import Change
from meshpilot.settings import Settings

__all__ = ["ENROLMENT_REMOVED", "enrolment_port", "install"]

ENROLMENT_REMOVED = "enrolment removed"


def enrolment_port(settings: Settings) -> int:
    """The port the enrolment listener asks for: the ``enrolment_port`` setting, else ``xds_port + 2``,
    or 0 (the OS picks) with ``xds_port`` 0."""
    if settings.enrolment_port is not None:
        return settings.enrolment_port
    return settings.xds_port + 2 if settings.xds_port else 0


def install(core: Core) -> Part:
    settings = core.settings
    if not settings.identity:
        return Part()
    store = core.registry.store
    ca = MeshCa(store, settings)
    tokens = JoinTokens(store)
    service = IdentityService(ca, tokens)
    enrolment = EnrolmentServer(service, settings.listen_address, enrolment_port(settings))

    def cut_off(node_id: str) -> None:
        # called once the removal is on disk: the node's bundle watches and xDS streams end now
        service.cut_off(node_id, ENROLMENT_REMOVED)
        core.disconnect(node_id, ENROLMENT_REMOVED)

    def follow(change: Change) -> None:
        # another replica of a shared store rotated a root or removed an enrolment: the same here
        if not change.remote or change.kind != "document":
            return
        if change.table == ROOTS:
            ca.follow_store()
        elif change.table == ENROLMENTS and change.op == "delete":
            cut_off(change.key)

    core.registry.subscribe(follow)

    return Part(
        grpc_handlers=[identity_handler(service)],
        routes=identity_routes(ca, tokens, lambda: enrolment.port, on_removed=cut_off),
        tasks=[Task("identity-enrolment", enrolment.run)],
        server_credentials=ca.server_credentials,
        admission=service.caller_refusal,
    )
