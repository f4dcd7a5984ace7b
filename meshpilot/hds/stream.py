"""One HDS stream as a state machine without I/O: messages in, effects out.

The first message carries the node; from its metadata the stream registers the node's app
(source ``mesh``, a critical ``hds`` check) and sends the specifier telling that Envoy to check
its own app. Reports then drive the ``hds`` check, so the instance enters EDS only after its first
HEALTHY report (DESIGN.md: lossless publish). The gRPC glue (server.py) only moves messages in and
carries the effects out to the wire and the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from envoy.config.core.v3 import health_check_pb2
from envoy.service.health.v3 import hds_pb2
from google.protobuf import json_format

from meshpilot.hds.metadata import CHECK_ID, OWNER, SOURCE, HdsError, Registration, registration
from meshpilot.hds.specifier import build_specifier
from meshpilot.model import Check, CheckStatus, Instance
from meshpilot.xds.resource import NodeInfo, node_info

__all__ = ["Admit", "Effect", "HdsSession", "HdsStream", "Refused", "Register", "Reject", "Send", "SetCheck"]

_STATUS = {
    health_check_pb2.HEALTHY: CheckStatus.passing,
    health_check_pb2.DEGRADED: CheckStatus.warning,
    health_check_pb2.UNHEALTHY: CheckStatus.critical,
    health_check_pb2.DRAINING: CheckStatus.critical,
    health_check_pb2.TIMEOUT: CheckStatus.critical,
}


@dataclass(frozen=True, slots=True)
class Register:
    """Register (or replace) the node's instance."""

    instance: Instance
    registration: Registration


@dataclass(frozen=True, slots=True)
class Send:
    specifier: hds_pb2.HealthCheckSpecifier


@dataclass(frozen=True, slots=True)
class SetCheck:
    instance_id: str
    check: Check


@dataclass(frozen=True, slots=True)
class Reject:
    """End the stream with ``code`` (a grpc.StatusCode name); ``node`` is "" when the stream never named one."""

    node: str
    reason: str
    code: str = "INVALID_ARGUMENT"


class Refused(Exception):
    """Raised by an ``admit`` function: the client may not speak for the node it names."""

    def __init__(self, reason: str, authenticated: bool) -> None:
        super().__init__(reason)
        self.authenticated = authenticated


Admit = Callable[[NodeInfo], str]  # the client's SPIFFE id, or Refused


Effect = Register | Send | SetCheck | Reject


@dataclass(slots=True)
class HdsSession:
    """One HDS stream after its first message: reports in, check status (or nothing new) out."""

    registration: Registration
    started: float
    seen_healthy: bool = False
    reports: int = 0
    last: CheckStatus | None = None
    # a reconnect of an instance that was passing: its restarted Envoy checks through its own
    # inbound listener, which warms (filter configs, WASM code) before it accepts connections
    resumed: bool = False
    warmup_s: float = 10.0

    def report(self, resp: hds_pb2.EndpointHealthResponse, now: float) -> CheckStatus | None:
        """The status this report sets for the ``hds`` check, or None when it says nothing new."""
        status = self._status_in(resp)
        if status is None:
            return None
        self.reports += 1
        if status is CheckStatus.passing:
            self.seen_healthy = True
        elif not self.seen_healthy and now - self.started < self.registration.plan.cycle_s:
            # Envoy reports a host failed until its first check completes
            return None
        elif not self.seen_healthy and self.resumed and now - self.started < self.warmup_s:
            return None
        if status == self.last:
            return None
        self.last = status
        return status

    def _status_in(self, resp: hds_pb2.EndpointHealthResponse) -> CheckStatus | None:
        want = self.registration.cluster
        for c in resp.cluster_endpoints_health:
            if c.cluster_name != want:
                continue
            worst: CheckStatus | None = None
            for loc in c.locality_endpoints_health:
                for eh in loc.endpoints_health:
                    s = _STATUS.get(eh.health_status)
                    if s is not None and (worst is None or s.rank > worst.rank):
                        worst = s
            return worst
        return None


class HdsStream:
    """Messages of one HDS stream in, effects out. ``token(node_id)`` is the node's health token;
    ``stored(instance_id)`` (given to ``receive``) reads the registry's current instance.
    ``admit`` (when the control plane authenticates its clients) judges the node the stream names
    before anything is registered: the node's instance then carries the client's SPIFFE id."""

    def __init__(self, report_interval_s: float, token: Callable[[str], str], admit: Admit | None = None) -> None:
        self.report_interval_s = report_interval_s
        self.token = token
        self.admit = admit
        self.session: HdsSession | None = None
        self.rejected = False

    def receive(
        self, msg: hds_pb2.HealthCheckRequestOrEndpointHealthResponse, now: float, stored: Callable[[str], Instance | None]
    ) -> list[Effect]:
        if self.rejected:
            return []
        if self.session is None:
            return self._hello(msg, now, stored)
        if not msg.HasField("endpoint_health_response"):
            return []  # a later request changes nothing: the node spoke in its first message
        status = self.session.report(msg.endpoint_health_response, now)
        iid = self.session.registration.instance.id
        if status is None or stored(iid) is None:
            return []  # nothing new, or deregistered (graceful offline): reports no longer matter
        out = "health check passing" if status is CheckStatus.passing else f"health check {status.value}"
        return [SetCheck(iid, Check(id=CHECK_ID, owner=OWNER, status=status, output=out))]

    def _hello(
        self, msg: hds_pb2.HealthCheckRequestOrEndpointHealthResponse, now: float, stored: Callable[[str], Instance | None]
    ) -> list[Effect]:
        if not msg.HasField("health_check_request") or not msg.health_check_request.node.id:
            self.rejected = True
            return [Reject("", "the first message must be a HealthCheckRequest carrying node.id")]
        n = msg.health_check_request.node
        md = json_format.MessageToDict(n.metadata) if n.HasField("metadata") else {}
        node = node_info(n.id, n.cluster, md, n.locality.zone)
        spiffe = ""
        if self.admit is not None:
            try:
                spiffe = self.admit(node)
            except Refused as exc:
                self.rejected = True
                return [Reject(n.id, str(exc), "PERMISSION_DENIED" if exc.authenticated else "UNAUTHENTICATED")]
            if node.id != node.id.split("~", 1)[0]:
                self.rejected = True
                return [Reject(n.id, "an auxiliary stream of a node (node.id with '~') registers no instance", "PERMISSION_DENIED")]
        try:
            reg = registration(node)
        except HdsError as exc:
            self.rejected = True
            return [Reject(n.id, str(exc))]
        inst = reg.instance
        if spiffe:
            inst = inst.model_copy(update={"metadata": {**inst.metadata, "spiffe": spiffe}})
        before = stored(inst.id)
        if before is not None and before.source != SOURCE and self.admit is not None:
            # another front door's instance of the same id is not this node's to take over
            self.rejected = True
            return [Reject(n.id, f"instance {inst.id!r} was registered by {before.source}, not by a sidecar", "PERMISSION_DENIED")]
        ours = before is not None and before.source == SOURCE
        if ours:
            # a reconnect (Envoy restarted): keep the current hds check, no churn in EDS
            inst = inst.model_copy(update={"checks": []})
        self.session = HdsSession(reg, now, resumed=ours and before is not None and before.routable)
        return [Register(inst, reg), Send(build_specifier(reg, self.report_interval_s, self.token(inst.id)))]
