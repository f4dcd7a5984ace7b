"""The ``meshpilot.identity.v1.Identity`` gRPC service: nodes enrol, renew and watch the bundle.

``Sign`` with a join token is first contact: the token names the namespace and service, and the CA
signs ``spiffe://<td>/ns/<ns>/sa/<svc>`` with the node id as CN for the CSR's key. ``Sign`` without a
token is renewal: the caller's TLS client certificate (verified again here against the current
bundle) names the SPIFFE id and node id that are signed again; what the CSR asks for is ignored
either way. A node id is bound to the SPIFFE id it first enrolled under (table ``enrolments``):
enrolling it under another is refused, and so is enrolling it with a token again while its current
certificate is valid (one fleet token must not let a second machine take over an enrolled node id;
an operator removes the enrolment first). A renewal must present the enrolment's current
certificate, or the one presented at the last renewal (whose answer may have been lost), issued
by one of the mesh's own CAs; a node whose enrolment an operator removed can not renew. Every
refusal is logged (``event=enrol_refused``) and counted. ``WatchBundle`` sends the trust bundle at
once and again after every change, latest first (a slow reader skips the bundles in between), to
enrolled nodes only; ``cut_off`` ends a node's watches when its enrolment is removed.

gRPC Python can require client certificates or not ask for them, nothing between; so the service is
served twice: on the xDS port (client certificates required: renewal, bundle watch;
``identity_handler``) and on the enrolment port (server-authenticated TLS only: ``Sign`` with a
token, nothing else; ``enrolment_handler``) by ``EnrolmentServer``. A stranger on the enrolment port
can therefore hold no stream open: the bundle watchers' limit is spent only by enrolled nodes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
from cryptography import x509

from meshpilot import metrics, pki
from meshpilot.identity.ca import ENROLMENTS, MeshCa
from meshpilot.identity.tokens import JoinTokens, TokenRefused
from meshpilot.pki import ca_pb2

__all__ = ["IDENTITY_SERVICE", "MAX_REQUEST_BYTES", "MAX_WATCHERS", "EnrolmentServer", "IdentityService",
           "enrolment_handler", "identity_handler"]

log = logging.getLogger("meshpilot.identity")

IDENTITY_SERVICE = "meshpilot.identity.v1.Identity"
MAX_REQUEST_BYTES = 32 * 1024  # a P-256 CSR is under 1 KiB; an RSA-4096 one under 4 KiB
_MAX_CSR = 16 * 1024
MAX_WATCHERS = 20_000  # open WatchBundle streams of enrolled nodes (one per node is the norm)
_MAX_TOKEN = 256

Context = grpc.aio.ServicerContext[Any, Any]

_TOKEN_REASONS = {"unknown": "token_unknown", "revoked": "token_revoked", "expired": "token_expired",
                  "already used": "token_used", "used up": "token_used_up"}


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@dataclass(eq=False)
class _Watch:
    """One WatchBundle stream: its node and how the CA tells it of a change or of its end."""

    node_id: str
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    cut: str = ""  # why the stream must end ("" while it may go on)


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.reason = reason
        self.detail = detail


class IdentityService:
    """Sign and WatchBundle over one ``MeshCa`` and its join tokens."""

    def __init__(self, ca: MeshCa, tokens: JoinTokens, clock: Callable[[], float] = time.time) -> None:
        self.ca = ca
        self.tokens = tokens
        self.clock = clock
        self.trust_domain = ca.settings.trust_domain
        self.watchers = 0
        self._watches: set[_Watch] = set()

    # ---- Sign -----------------------------------------------------------------------------

    async def sign(self, request: ca_pb2.SignRequest, context: Context) -> ca_pb2.SignResponse:
        node = request.node_id if len(request.node_id) <= 253 else request.node_id[:253] + "..."
        if not node:  # a renewal names its node in its certificate
            caller = pki.peer_from_context(context)
            node = caller.node_id if caller is not None else ""
        try:
            issued, spiffe, node_id, kind = self._sign(request, context)
        except _Refused as exc:
            log.warning("event=enrol_refused node=%r reason=%s peer=%s detail=%r",
                        node, exc.reason, _peer_address(context), exc.detail)
            metrics.IDENTITY_REFUSED.labels(exc.reason).inc()
            await _abort(context, exc.code, exc.detail)
        await self.ca.durable()  # the enrolment, a spent token and the root are on disk before the answer
        metrics.IDENTITY_ISSUED.labels(kind).inc()
        log.info("event=%s node=%r spiffe=%s serial=%s not_after=%.0f",
                 "enrolled" if kind == "enrol" else "renewed", node_id, spiffe, issued.serial, issued.not_after)
        return ca_pb2.SignResponse(
            cert_chain_pem=issued.chain_pem, trust_bundle_pem=self.ca.bundle_pem(), not_after=issued.not_after
        )

    def _sign(self, request: ca_pb2.SignRequest, context: Context) -> tuple[pki.Issued, str, str, str]:
        """Everything between the request and the certificate, with no await: a token's use and
        the node's binding are checked and written in one step of the event loop."""
        if len(request.csr_pem) > _MAX_CSR or len(request.token) > _MAX_TOKEN:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "too_large",
                           f"csr_pem is at most {_MAX_CSR} bytes and token at most {_MAX_TOKEN} characters")
        if request.token:
            return self._enrol(request)
        return self._renew(request, context)

    def _enrol(self, request: ca_pb2.SignRequest) -> tuple[pki.Issued, str, str, str]:
        node_id = _node_id(request.node_id)
        try:
            namespace, service = self.tokens.check(request.token)
        except TokenRefused as exc:
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, _TOKEN_REASONS.get(exc.reason, "token_unknown"),
                           f"{exc}") from None
        spiffe = pki.spiffe_id(self.trust_domain, namespace, service)
        self._check_binding(node_id, spiffe)
        enrolled = self.ca.store.get(ENROLMENTS, node_id)
        if isinstance(enrolled, dict) and float(enrolled.get("not_after", 0)) > self.clock():
            raise _Refused(grpc.StatusCode.PERMISSION_DENIED, "node_enrolled",
                           f"node {node_id!r} is enrolled, its current certificate valid until "
                           f"{_iso(float(enrolled['not_after']))}: it renews with that certificate. A node that lost it "
                           "enrols again with a token after an operator removes its enrolment "
                           "(DELETE /v1/identity/enrolments/{node})")
        issued = self._issue(request.csr_pem, spiffe, node_id)
        token_id = pki.token_id_of(request.token) or ""
        self.tokens.redeem(request.token)
        self._record(node_id, spiffe, issued, token_id=token_id, presented="")
        return issued, spiffe, node_id, "enrol"

    def _renew(self, request: ca_pb2.SignRequest, context: Context) -> tuple[pki.Issued, str, str, str]:
        peer, serial, enrolled = self._enrolled_caller(context, request.node_id)
        issued = self._issue(request.csr_pem, peer.spiffe, peer.node_id)
        self._record(peer.node_id, peer.spiffe, issued, token_id=str(enrolled.get("token_id", "")), presented=serial)
        return issued, peer.spiffe, peer.node_id, "renew"

    def caller_refusal(self, context: Context) -> tuple[grpc.StatusCode, str] | None:
        """Why the caller's client certificate may not speak for its node now, as (code, detail): no
        valid certificate, not one the mesh CA issued, its node's enrolment removed, or not the
        enrolment's current (or last presented) certificate. None when it may. For the xDS and HDS
        streams' admission: the TLS handshake alone admits a node whose enrolment was removed."""
        try:
            self._enrolled_caller(context)
        except _Refused as exc:
            return exc.code, exc.detail
        return None

    def _enrolled_caller(self, context: Context, node_id: str = "") -> tuple[pki.Peer, str, dict[str, Any]]:
        """The caller's verified workload certificate (its Peer and serial) and its node's enrolment,
        when that certificate is one the enrolment stands for; _Refused otherwise."""
        verified = self._verified_leaf(context)
        if verified is None:
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "no_certificate",
                           "no join token and no valid client certificate: the first Sign needs a join token, "
                           "a renewal the node's current certificate as its TLS client certificate")
        peer, leaf = verified
        if not self.ca.issued_here(leaf):
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "foreign_issuer",
                           f"the certificate of {peer.spiffe} was not issued by the mesh CA (issuer "
                           f"{leaf.issuer.rfc4514_string()}); only the mesh's own certificates renew")
        if not peer.namespace or peer.trust_domain != self.trust_domain:
            raise _Refused(grpc.StatusCode.PERMISSION_DENIED, "not_workload",
                           f"{peer.spiffe} is not a workload identity of trust domain {self.trust_domain}")
        if node_id and node_id != peer.node_id:
            raise _Refused(grpc.StatusCode.PERMISSION_DENIED, "node_mismatch",
                           f"node_id {node_id!r}: a certificate renews only its own node id ({peer.node_id!r})")
        node = _node_id(peer.node_id)
        enrolled = self.ca.store.get(ENROLMENTS, node)
        if not isinstance(enrolled, dict):
            raise _Refused(grpc.StatusCode.PERMISSION_DENIED, "not_enrolled",
                           f"node {node!r} is not enrolled (its enrolment was removed); enrol again with a join token")
        self._check_binding(node, peer.spiffe)
        serial = pki.serial_of(leaf)
        if serial not in (enrolled.get("serial"), enrolled.get("previous_serial")):
            raise _Refused(grpc.StatusCode.PERMISSION_DENIED, "stale_certificate",
                           f"certificate {serial} is not the current certificate of node {node!r} ({enrolled.get('serial')}): "
                           "an older copy, or one from before its enrolment was removed, does not renew")
        return peer, serial, enrolled

    def _verified_leaf(self, context: Context) -> tuple[pki.Peer, x509.Certificate] | None:
        try:
            certs = list(context.auth_context().get("x509_pem_cert", ()))
        except Exception:  # not a TLS call: no certificate
            return None
        if not certs:
            return None
        # the TLS handshake verified it against the bundle of that moment; a root removed since
        # (or a certificate expired on a long-lived connection) must not renew
        peer = pki.verified_peer(certs[0], self.ca.bundle_pem(), self.ca.intermediates(), now=self.clock())
        if peer is None:
            return None
        try:
            leaf = x509.load_pem_x509_certificate(certs[0])
        except ValueError:
            return None
        return peer, leaf

    def _check_binding(self, node_id: str, spiffe: str) -> None:
        enrolled = self.ca.store.get(ENROLMENTS, node_id)
        if isinstance(enrolled, dict) and enrolled.get("spiffe") != spiffe:
            raise _Refused(grpc.StatusCode.PERMISSION_DENIED, "node_taken",
                           f"node {node_id!r} is enrolled as {enrolled.get('spiffe')}, not {spiffe}; "
                           "an operator removes its enrolment before it can enrol as another identity")

    def _issue(self, csr_pem: bytes, spiffe: str, node_id: str) -> pki.Issued:
        try:
            return self.ca.sign(csr_pem, spiffe, node_id)
        except ValueError as exc:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "bad_csr", f"csr_pem: {exc}") from None

    def _record(self, node_id: str, spiffe: str, issued: pki.Issued, token_id: str, presented: str) -> None:
        """Write the node's enrolment: a token enrolment (``presented`` "") starts a new one; a
        renewal keeps the serial it presented, which may renew once more if this answer is lost."""
        now = self.clock()
        old = self.ca.store.get(ENROLMENTS, node_id) if presented else None
        td_ns_svc = pki.parse_spiffe_id(spiffe) or ("", "", "")
        doc = {
            "node_id": node_id,
            "spiffe": spiffe,
            "namespace": td_ns_svc[1],
            "service": td_ns_svc[2],
            "serial": issued.serial,
            "previous_serial": presented,
            "not_after": issued.not_after,
            "root": self.ca.signing_serial,
            "token_id": token_id,
            "enrolled_at": old.get("enrolled_at", now) if isinstance(old, dict) else now,
            "renewed_at": now,
        }
        self.ca.store.write({(ENROLMENTS, node_id): doc})

    # ---- WatchBundle ------------------------------------------------------------------------

    async def watch_bundle(self, request: ca_pb2.BundleRequest, context: Context) -> AsyncIterator[ca_pb2.BundleResponse]:
        try:
            peer, _serial, _enrolled = self._enrolled_caller(context)
        except _Refused as exc:
            log.warning("event=bundle_watch_refused reason=%s peer=%s detail=%r",
                        exc.reason, _peer_address(context), exc.detail)
            metrics.IDENTITY_REFUSED.labels(exc.reason).inc()
            await _abort(context, exc.code, exc.detail)
        if self.watchers >= MAX_WATCHERS:
            metrics.IDENTITY_REFUSED.labels("too_many_watchers").inc()
            await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"at most {MAX_WATCHERS} bundle watchers")
        loop = asyncio.get_running_loop()
        watch = _Watch(peer.node_id)

        def on_change(_bundle: bytes) -> None:
            loop.call_soon_threadsafe(watch.changed.set)

        self.watchers += 1
        self._watches.add(watch)
        cancel = self.ca.watch(on_change)
        try:
            sent = b""
            while True:
                if watch.cut:
                    await _abort(context, grpc.StatusCode.PERMISSION_DENIED, watch.cut)
                bundle = self.ca.bundle_pem()
                if bundle != sent:
                    yield ca_pb2.BundleResponse(trust_bundle_pem=bundle)
                    sent = bundle
                await watch.changed.wait()
                watch.changed.clear()
        finally:
            cancel()
            self._watches.discard(watch)
            self.watchers -= 1

    def cut_off(self, node_id: str, reason: str) -> int:
        """End the WatchBundle streams of ``node_id`` and its ``<node>~<what>`` streams (PERMISSION_DENIED
        with ``reason``); how many were open. Called when the node's enrolment is removed."""
        cut = 0
        for watch in list(self._watches):
            if watch.node_id == node_id or watch.node_id.startswith(node_id + "~"):
                watch.cut = f"node {node_id!r}: {reason}"
                watch.changed.set()
                cut += 1
        return cut


def _node_id(node_id: str) -> str:
    try:
        return pki.check_node_id(node_id)
    except ValueError as exc:
        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "bad_node_id", f"node_id: {exc}") from None


def _peer_address(context: Context) -> str:
    try:
        return str(context.peer())
    except Exception:
        return "?"


async def _abort(context: Context, code: grpc.StatusCode, detail: str) -> NoReturn:
    await context.abort(code, detail)
    raise AssertionError("context.abort returned")  # grpc.aio's abort always raises


def _sign_handler(service: IdentityService) -> grpc.RpcMethodHandler[Any, Any]:
    return grpc.unary_unary_rpc_method_handler(
        service.sign,
        request_deserializer=ca_pb2.SignRequest.FromString,
        response_serializer=ca_pb2.SignResponse.SerializeToString,
    )


def identity_handler(service: IdentityService) -> grpc.GenericRpcHandler:
    """The grpc.aio handler of /meshpilot.identity.v1.Identity/{Sign,WatchBundle}, for the xDS port
    (client certificates required)."""
    return grpc.method_handlers_generic_handler(
        IDENTITY_SERVICE,
        {
            "Sign": _sign_handler(service),
            "WatchBundle": grpc.unary_stream_rpc_method_handler(
                service.watch_bundle,
                request_deserializer=ca_pb2.BundleRequest.FromString,
                response_serializer=ca_pb2.BundleResponse.SerializeToString,
            ),
        },
    )


def enrolment_handler(service: IdentityService) -> grpc.GenericRpcHandler:
    """The enrolment port's handler: /meshpilot.identity.v1.Identity/Sign only (first contact with a
    join token); anything else there is UNIMPLEMENTED."""
    return grpc.method_handlers_generic_handler(IDENTITY_SERVICE, {"Sign": _sign_handler(service)})


class EnrolmentServer:
    """``Sign`` on its own TLS port that does not ask for client certificates, so a node without a
    certificate yet can present its join token (it watches the bundle on the xDS port afterwards). ``port`` is the bound port once
    ``run`` has started it (``port`` 0 asks the OS for one)."""

    def __init__(self, service: IdentityService, address: str, port: int) -> None:
        self.service = service
        self.address = address
        self.requested_port = port
        self.port = 0
        self.started = asyncio.Event()

    async def run(self) -> None:
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
            ("grpc.max_concurrent_streams", 256),
            ("grpc.so_reuseport", 0),
        ])
        server.add_generic_rpc_handlers((enrolment_handler(self.service),))
        creds = self.service.ca.server_credentials(require_client_cert=False)
        where = f"{self.address}:{self.requested_port}"
        port = server.add_secure_port(where, creds)
        if port == 0:
            raise OSError(f"identity enrolment: cannot listen on {where}")
        self.port = port
        await server.start()
        log.info("event=enrolment_listening address=%s port=%d", self.address, port)
        self.started.set()
        try:
            await server.wait_for_termination()
        finally:
            self.started.clear()
            await server.stop(grace=1.0)
