"""The node's workload identity: a key made here, a certificate from the control plane's CA, kept fresh.

The agent (and ``meshpilot identity-files`` for proxyless apps) holds one :class:`WorkloadIdentity`. It
makes an EC key on the node, sends a CSR to the control plane's ``Identity.Sign`` over TLS (first contact:
the enrolment port with the join token; renewals: the xDS port with its current certificate), and renews at
half of the certificate's life. The private key
leaves the process only into the local Envoy's SDS secret and the work directory (0600 files, so a
restarted agent renews with its certificate instead of needing a join token that was good for one use).
``WatchBundle`` (on the xDS port, with the client certificate) keeps the trust bundle current; listeners
(SDS, meshdns) hear of every new :class:`Material`.

Trust: the operator's ``--trust-bundle`` file authenticates the control plane only until the first bundle
arrives over a channel it authenticated (a Sign answer's ``trust_bundle_pem``, or WatchBundle). From then on
the control plane's bundle alone is what Envoy's ``ROOTCA`` holds, what the next channel checks the control
plane against, what the state directory keeps (and a restarted node loads, instead of the file) and what a
proxyless app's ``bundle.pem`` holds: a root removed at the control plane (``meshpilot identity roots remove``)
leaves every node's trust, even when the file the node was installed with still names it.

When to act is a pure machine, :class:`Lifecycle` (no clock, no I/O: times in, plans out); the wire is a
:class:`Signer` (:class:`GrpcSigner` in production, a fake in tests), so the whole loop runs in tests on an
injected clock without a control plane.

Several control-plane replicas (they share the mesh CA): :class:`GrpcSigner` knows every one. A Sign that
cannot reach a replica (or that a replica cut off from the shared store turns away as unavailable) is sent to
the next one in the same attempt; when none answers, the attempt fails and the lifecycle's jittered back-off
applies. The bundle watch moves to the next replica whenever its stream fails or the replica ends it. Each
log line names the replica it used.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from meshpilot import pki
from meshpilot.pki import ca_pb2

__all__ = [
    "ChannelTls",
    "GrpcSigner",
    "Lifecycle",
    "Material",
    "Phase",
    "Plan",
    "SignError",
    "SignResult",
    "Signer",
    "WorkloadIdentity",
    "enrol_target",
    "publish_files",
    "server_name_for",
    "write_private",
]

log = logging.getLogger("meshpilot.identity")

SIGN = "/meshpilot.identity.v1.Identity/Sign"
WATCH_BUNDLE = "/meshpilot.identity.v1.Identity/WatchBundle"
_PLACEHOLDER_SPIFFE = "spiffe://mesh.local/ns/default/sa/unknown"  # a CSR must ask for something
_REFUSALS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT)


# ---- what the node holds --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Material:
    """The current identity: key, chain (leaf first), trust bundle, and what the leaf says."""

    key_pem: bytes = field(repr=False)
    chain_pem: bytes
    bundle_pem: bytes
    spiffe: str
    trust_domain: str
    node_id: str
    not_before: float
    not_after: float


def renew_at(start: float, not_after: float) -> float:
    """Half-life: late enough not to bother the CA, early enough to survive a long outage."""
    return start + (not_after - start) / 2


def _leaf(chain_pem: bytes) -> x509.Certificate:
    certs = x509.load_pem_x509_certificates(chain_pem)
    if not certs:
        raise ValueError("no certificate in the chain")
    return certs[0]


def _ts(t: dt.datetime) -> float:
    return t.replace(tzinfo=dt.timezone.utc).timestamp() if t.tzinfo is None else t.timestamp()


def material_of(key_pem: bytes, chain_pem: bytes, bundle_pem: bytes) -> Material:
    """A :class:`Material` from PEM parts; ValueError when the leaf carries no workload SPIFFE id."""
    leaf = _leaf(chain_pem)
    peer = pki.peer_of(chain_pem)
    if peer is None or not peer.namespace:
        raise ValueError("the certificate carries no workload SPIFFE id")
    cns = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    node_id = str(cns[0].value) if cns else ""
    return Material(key_pem=key_pem, chain_pem=chain_pem, bundle_pem=bundle_pem, spiffe=peer.spiffe,
                    trust_domain=peer.trust_domain, node_id=node_id,
                    not_before=_ts(leaf.not_valid_before_utc), not_after=_ts(leaf.not_valid_after_utc))


# ---- when to act: a pure machine ------------------------------------------------------------------------


class Phase(Enum):
    ENROL = "enrol"  # no usable certificate: a join token is needed
    RENEW = "renew"  # a valid certificate authenticates the request


@dataclass(frozen=True, slots=True)
class Plan:
    phase: Phase
    at: float  # clock time at which to try


class Lifecycle:
    """When to enrol or renew. Holds the current certificate's validity and the failures since the last
    success; knows nothing of keys, sockets or clocks (every method takes ``now``).

    The half-life is counted from when the node got the certificate (or loaded it at a restart), not from
    its ``not_before``: the CA backdates that by a minute for clock skew, which would otherwise make a
    short-lived certificate due for renewal the moment it arrives."""

    def __init__(self, *, base_delay_s: float = 0.5, max_delay_s: float = 30.0,
                 rand: Callable[[], float] = random.random) -> None:
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self._rand = rand
        self.not_before: float | None = None
        self.not_after: float | None = None
        self.start = 0.0  # when the node got the certificate (within its validity)
        self.failures = 0
        self._retry_at = -math.inf

    def has_certificate(self, now: float) -> bool:
        return self.not_after is not None and now < self.not_after

    def plan(self, now: float) -> Plan:
        """What to do next and when. An expired certificate cannot renew itself: enrol again."""
        if self.not_before is None or self.not_after is None or now >= self.not_after:
            return Plan(Phase.ENROL, max(now, self._retry_at))
        return Plan(Phase.RENEW, max(renew_at(self.start, self.not_after), self._retry_at))

    def issued(self, not_before: float, not_after: float, *, now: float) -> None:
        """A certificate valid from ``not_before`` to ``not_after`` arrived (or was loaded) at ``now``."""
        self.not_before, self.not_after = not_before, not_after
        self.start = min(max(not_before, now), not_after)
        self.failures = 0
        self._retry_at = -math.inf

    def failed(self, now: float, *, refused: bool) -> float:
        """Record a failed attempt; returns the delay before the next one (capped, jittered exponential).
        ``refused``: the control plane answered no to a renewal (the certificate is revoked, or its node id
        now belongs to another identity); the certificate is then dropped and only a join token helps."""
        self.failures += 1
        if refused:
            self.not_before = self.not_after = None
        delay = min(self.max_delay_s, self.base_delay_s * 2.0 ** min(self.failures - 1, 30))
        delay *= 0.5 + self._rand() / 2
        self._retry_at = now + delay
        return delay


# ---- the wire -------------------------------------------------------------------------------------------


class SignError(Exception):
    """An attempt that gave no certificate. ``refused``: the control plane said no (as opposed to could not
    be reached); ``reason`` is one word-ish token for the log line."""

    def __init__(self, reason: str, detail: str = "", *, refused: bool = False) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.refused = refused


@dataclass(frozen=True, slots=True)
class SignResult:
    chain_pem: bytes
    bundle_pem: bytes
    not_after: float
    control_plane: str = ""  # the replica that signed, for the log


class Signer(Protocol):
    """The control plane's Identity service as the node sees it."""

    async def sign(self, csr_pem: bytes, node_id: str, token: str, client: Material | None,
                   trust_pem: bytes) -> SignResult: ...

    def watch_bundle(self, client: Material, trust_pem: bytes) -> AsyncIterator[bytes]: ...


def server_name_for(host: str, override: str = "") -> str:
    """The name the control plane's serving certificate is checked against: ``override`` when given, the
    host itself when it is a DNS name, else ``localhost`` (the default of settings.xds_server_names; an IP
    target would otherwise have to equal the control plane's listen address)."""
    if override:
        return override
    import ipaddress

    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host
    return "localhost"


def channel_options(server_name: str) -> list[tuple[str, Any]]:
    return [("grpc.ssl_target_name_override", server_name)] if server_name else []


def enrol_target(host: str, xds_port: int, enrol_port: int | None = None) -> str:
    """HOST:PORT of the control plane's enrolment listener (default: the xDS port + 2)."""
    port = enrol_port if enrol_port is not None else xds_port + 2
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# a replica that vanished without closing the connection is noticed by HTTP/2 PINGs (the control plane allows one
# every 5 s without data)
_KEEPALIVE: tuple[tuple[str, Any], ...] = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.ping_timeout_ms", 5_000),  # without it an unanswered PING closes nothing (grpcio 1.85)
    ("grpc.keepalive_permit_without_calls", 1),
)
# what a replica that cannot serve now answers (or what gRPC says of one it cannot reach): try another
_TRY_ANOTHER = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED)


def _target_list(target: str | Sequence[str]) -> list[str]:
    items = target.split(",") if isinstance(target, str) else list(target)
    return [t.strip() for t in items if t.strip()]


class GrpcSigner:
    """Sign and WatchBundle over TLS. The control plane's xDS port (``target``) requires a client
    certificate, so first contact (a join token, no certificate yet) goes to its enrolment port
    (``enrol_target``: TLS that asks for no client certificate); renewals and the bundle watch go to the
    xDS port with the current certificate.

    ``target`` and ``enrol_target`` may name several replicas (comma-separated or a list, replica i's
    enrolment port at ``enrol_target[i]``). The first replica tried is a random one (nodes spread over the
    replicas); a Sign that fails for want of a replica moves on to the next within the same call, a
    refusal does not (the replica answered). The bundle watch starts where the last Sign succeeded and moves
    on whenever its stream ends."""

    def __init__(self, target: str | Sequence[str], server_name: str = "", *,
                 enrol_target: str | Sequence[str] = "", timeout_s: float = 10.0,
                 first: int | None = None) -> None:
        self.targets = _target_list(target)
        if not self.targets:
            raise ValueError(f"{target!r}: no control plane to send to")
        self.enrol_targets = _target_list(enrol_target) or self.targets
        self.server_name = server_name
        self.timeout_s = timeout_s
        self._index = random.randrange(len(self.targets)) if first is None else first % len(self.targets)

    @property
    def target(self) -> str:
        """The replica the next call goes to first."""
        return self.targets[self._index % len(self.targets)]

    @property
    def enrol_target(self) -> str:
        return self.enrol_targets[self._index % len(self.enrol_targets)]

    def _channel(self, client: Material | None, trust_pem: bytes, target: str) -> grpc.aio.Channel:
        creds = grpc.ssl_channel_credentials(
            root_certificates=trust_pem,
            private_key=client.key_pem if client else None,
            certificate_chain=client.chain_pem if client else None,
        )
        return grpc.aio.secure_channel(target, creds, options=[*channel_options(self.server_name), *_KEEPALIVE])

    async def sign(self, csr_pem: bytes, node_id: str, token: str, client: Material | None,
                   trust_pem: bytes) -> SignResult:
        targets = self.targets if client is not None else self.enrol_targets
        failures: list[str] = []
        last: grpc.aio.AioRpcError | None = None
        for step in range(len(targets)):
            index = (self._index + step) % len(targets)
            target = targets[index]
            async with self._channel(client, trust_pem, target) as channel:
                call = channel.unary_unary(SIGN, request_serializer=ca_pb2.SignRequest.SerializeToString,
                                           response_deserializer=ca_pb2.SignResponse.FromString)
                try:
                    resp = await call(ca_pb2.SignRequest(csr_pem=csr_pem, node_id=node_id, token=token),
                                      timeout=self.timeout_s)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() in _TRY_ANOTHER and len(targets) > 1:
                        last = exc
                        failures.append(f"{target}={exc.code().name}")
                        log.info("event=sign_replica_failed control_plane=%s code=%s detail=%s", target,
                                 exc.code().name, _one_line(exc.details() or ""))
                        continue
                    raise SignError(exc.code().name, _with_target(exc.details() or "", target),
                                    refused=exc.code() in _REFUSALS) from None
            self._index = index
            return SignResult(chain_pem=resp.cert_chain_pem, bundle_pem=resp.trust_bundle_pem,
                              not_after=resp.not_after, control_plane=target)
        assert last is not None
        self._index = (self._index + 1) % len(targets)
        raise SignError(last.code().name, "no replica answered: " + " ".join(failures))

    async def watch_bundle(self, client: Material, trust_pem: bytes) -> AsyncIterator[bytes]:
        """One WatchBundle stream on the current replica; when it ends or fails, the next call goes to the
        next replica."""
        target = self.target
        try:
            async with self._channel(client, trust_pem, target) as channel:
                call = channel.unary_stream(WATCH_BUNDLE, request_serializer=ca_pb2.BundleRequest.SerializeToString,
                                            response_deserializer=ca_pb2.BundleResponse.FromString)
                log.info("event=bundle_watch_open control_plane=%s", target)
                try:
                    async for resp in call(ca_pb2.BundleRequest()):
                        yield resp.trust_bundle_pem
                except grpc.aio.AioRpcError as exc:
                    raise SignError(exc.code().name, _with_target(exc.details() or "", target),
                                    refused=exc.code() in _REFUSALS) from None
        finally:
            if len(self.targets) > 1 and self.target == target:
                self._index = (self._index + 1) % len(self.targets)


def _with_target(detail: str, target: str) -> str:
    return f"{detail} (control_plane={target})" if detail else f"control_plane={target}"


# ---- files ----------------------------------------------------------------------------------------------


def write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically with ``data``, readable by this user only (0600) from the first byte: a
    new file created 0600 (``O_EXCL``: never an existing file or a planted symlink), written whole, synced,
    then renamed over ``path``. A failed write leaves ``path`` as it was and no temporary behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # the umask can only narrow the creation mode; this is the exact mode
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def private_dir(path: Path) -> Path:
    """``path`` as a directory only this user can enter (0700). Each directory made here, ``path`` and any
    missing parent, is created 0700 (never created wider and narrowed later); one that exists is set to
    0700."""
    missing: list[Path] = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path


FILES = ("key.pem", "cert.pem", "bundle.pem")


def publish_files(out: Path, m: Material) -> Path:
    """``key.pem``, ``cert.pem`` and ``bundle.pem`` in ``out`` for a proxyless gRPC app's
    ``certificate_providers`` file_watcher, replaced together: each name is a symlink into ``..data``, and
    ``..data`` is itself a symlink swapped atomically to a new directory (the layout of Kubernetes secret
    volumes), so a reader never sees a key with another certificate. Returns the new directory."""
    private_dir(out)
    gen = out / f"..{time.time_ns()}"
    gen.mkdir(mode=0o700)
    for name, data in zip(FILES, (m.key_pem, m.chain_pem, m.bundle_pem)):
        write_private(gen / name, data)
    link = out / "..data_tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(gen.name)
    os.replace(link, out / "..data")
    for name in FILES:
        path = out / name
        if not path.is_symlink():
            path.unlink(missing_ok=True)
            path.symlink_to(f"..data/{name}")
    for old in out.iterdir():
        if old.name.startswith("..") and old.name[2:].isdigit() and old != gen:
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
    return gen


# ---- the loop -------------------------------------------------------------------------------------------


Listener = Callable[[Material], None]


class WorkloadIdentity:
    """Enrols, renews and watches the bundle until cancelled (:meth:`run`); :attr:`material` is the current
    identity (None until the first certificate), :meth:`ready` waits for it, listeners hear every change.

    ``state_dir`` (0700) keeps key.pem, cert.pem and bundle.pem (0600) across restarts. The token file is
    read at each enrolment, never kept. ``requested_spiffe`` only fills the CSR (the CA decides the id)."""

    def __init__(
        self,
        *,
        node_id: str,
        signer: Signer,
        trust_bundle_file: Path,
        join_token_file: Path | None = None,
        state_dir: Path | None = None,
        requested_spiffe: str = "",
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Any] = asyncio.sleep,
        lifecycle: Lifecycle | None = None,
        max_sleep_s: float = 60.0,
    ) -> None:
        self.node_id = node_id
        self.signer = signer
        self.trust_bundle_file = trust_bundle_file
        self.join_token_file = join_token_file
        self.state_dir = state_dir
        self.requested_spiffe = requested_spiffe or _PLACEHOLDER_SPIFFE
        self.clock = clock
        self._sleep = sleep
        self.lifecycle = lifecycle or Lifecycle()
        self.max_sleep_s = max_sleep_s
        self.material: Material | None = None
        self.generation = 0
        self.last_error: str | None = None
        self.last_control_plane = ""  # the replica of the last successful Sign
        self._listeners: list[Listener] = []
        self._changed = asyncio.Condition()
        # the trust bundle the control plane gave over an authenticated channel (or the saved one): b"" until
        # then; once set, the operator's file is never read again
        self.control_plane_bundle = b""
        self._load_state()

    # -- listeners ------------------------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """``listener(material)`` on every new certificate or bundle (and at once when one is held)."""
        self._listeners.append(listener)
        if self.material is not None:
            listener(self.material)

    async def ready(self) -> Material:
        async with self._changed:
            await self._changed.wait_for(lambda: self.material is not None)
        assert self.material is not None
        return self.material

    async def wait_newer(self, generation: int) -> int:
        """Wait until the material is newer than ``generation``; returns the new generation."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.generation > generation)
        return self.generation

    async def _set(self, material: Material) -> None:
        self.material = material
        self.generation += 1
        for listener in self._listeners:
            try:
                listener(material)
            except Exception:  # noqa: BLE001 - one listener's bug must not stop renewals
                log.exception("event=identity_listener_failed")
        async with self._changed:
            self._changed.notify_all()

    # -- trust --------------------------------------------------------------------------------------------

    def trust_pem(self) -> bytes:
        """What the control plane's serving certificate is checked against: the bundle the control plane gave
        over an authenticated channel once there is one; before that, the operator's file. Raises OSError or
        ValueError when the file is needed and cannot be read."""
        if self.control_plane_bundle:
            return self.control_plane_bundle
        return pki.bundle_pem([self.trust_bundle_file.read_bytes()])

    # -- persistence ----------------------------------------------------------------------------------------

    def _load_state(self) -> None:
        """Load the saved identity. The saved bundle (the control plane's) is the trust from now on even when
        the certificate beside it is not used (expired, another node's): falling back to the operator's file
        would trust again a root removed since, for the very channel the join token is sent over."""
        if self.state_dir is None:
            return
        bundle = self.state_dir / "bundle.pem"
        try:
            saved = _checked_bundle(bundle.read_bytes()) if bundle.exists() else b""
        except OSError as exc:
            log.warning("event=stored_bundle_ignored reason=unreadable error=%r", exc)
            saved = b""
        self.control_plane_bundle = saved
        key, cert = self.state_dir / "key.pem", self.state_dir / "cert.pem"
        if not key.exists() or not cert.exists():
            return
        try:
            # without a saved bundle, the file authenticates the control plane again
            m = material_of(key.read_bytes(), cert.read_bytes(), saved or self.trust_pem())
            arrived = cert.stat().st_mtime  # written when the certificate came
        except (OSError, ValueError) as exc:
            log.warning("event=stored_identity_ignored reason=unreadable error=%r", exc)
            return
        if m.node_id != self.node_id:
            log.warning("event=stored_identity_ignored reason=other_node stored=%s node=%s", m.node_id, self.node_id)
            return
        if self.clock() >= m.not_after:
            log.info("event=stored_identity_ignored reason=expired spiffe=%s", m.spiffe)
            return
        self.material = m
        self.generation = 1
        self.lifecycle.issued(m.not_before, m.not_after, now=min(arrived, self.clock()))
        log.info("event=identity_loaded spiffe=%s not_after=%s", m.spiffe, _iso(m.not_after))

    def _save_state(self, m: Material) -> None:
        if self.state_dir is None:
            return
        try:
            d = private_dir(self.state_dir)
            write_private(d / "key.pem", m.key_pem)
            write_private(d / "cert.pem", m.chain_pem)
            if self.control_plane_bundle:  # only the control plane's bundle is kept, never the file's
                write_private(d / "bundle.pem", self.control_plane_bundle)
            else:
                (d / "bundle.pem").unlink(missing_ok=True)
        except OSError as exc:  # the certificate in memory still serves; a restart would need the token
            log.error("event=identity_save_failed dir=%s error=%r", self.state_dir, exc)

    # -- one attempt --------------------------------------------------------------------------------------

    def _token(self) -> str:
        if self.join_token_file is None:
            raise SignError("no_token", "no join token file given and no valid certificate held")
        try:
            token = self.join_token_file.read_text().strip()
        except OSError as exc:
            raise SignError("no_token", f"{self.join_token_file}: {exc.strerror}") from None
        if not token:
            raise SignError("no_token", f"{self.join_token_file} is empty")
        return token

    async def attempt(self, phase: Phase) -> Material:
        """Enrol (``Phase.ENROL``, join token) or renew (client certificate) once; raises SignError. A bundle
        in the answer becomes :attr:`control_plane_bundle` (it came over a channel checked against the
        current trust)."""
        client = self.material if phase is Phase.RENEW else None
        token = self._token() if phase is Phase.ENROL else ""
        try:
            trust = self.trust_pem()
        except (OSError, ValueError) as exc:
            raise SignError("no_trust_bundle", f"{self.trust_bundle_file}: {exc}") from None
        key = pki.new_key()
        csr = pki.build_csr(key, self.material.spiffe if self.material else self.requested_spiffe, self.node_id)
        try:
            result = await self.signer.sign(csr, self.node_id, token, client, trust)
        except SignError:
            raise
        except (OSError, grpc.RpcError) as exc:
            raise SignError("unreachable", repr(exc)) from None
        except Exception as exc:  # noqa: BLE001 - a signer's bug is one failed attempt, retried like the others
            raise SignError("error", repr(exc)) from None
        given = _checked_bundle(result.bundle_pem)
        if result.bundle_pem and not given:
            log.warning("event=bundle_ignored reason=not_pem_certificates source=sign")
        try:
            # without a bundle in the answer: the one held (the control plane's, or before any, the file's)
            m = material_of(pki.key_pem(key), result.chain_pem, given or trust)
        except ValueError as exc:
            raise SignError("bad_certificate", str(exc), refused=False) from None
        if _public_der(_leaf(m.chain_pem).public_key()) != _public_der(key.public_key()):
            raise SignError("bad_certificate", "the certificate is not for the key this node sent")
        if given:
            self.control_plane_bundle = given
        self.last_control_plane = result.control_plane
        return m

    async def step(self) -> Plan:
        """Sleep until the plan is due (a slice at a time, so a clock jump is noticed), then act once.
        Returns the plan that was carried out (or is still pending after a slice)."""
        plan = self.lifecycle.plan(self.clock())
        wait = plan.at - self.clock()
        if wait > 0:
            await self._sleep(min(wait, self.max_sleep_s))
            if plan.at - self.clock() > 0:
                return plan
        try:
            m = await self.attempt(plan.phase)
        except SignError as exc:
            now = self.clock()
            had = self.lifecycle.has_certificate(now)
            delay = self.lifecycle.failed(now, refused=exc.refused and plan.phase is Phase.RENEW)
            self.last_error = str(exc)
            event = "enrol_failed" if plan.phase is Phase.ENROL else "renew_failed"
            log.warning("event=%s reason=%s detail=%s node=%s retry_in_s=%.1f%s", event, exc.reason,
                        _one_line(exc.detail), self.node_id, delay,
                        " certificate_dropped=true" if had and not self.lifecycle.has_certificate(now) else "")
            return plan
        self.lifecycle.issued(m.not_before, m.not_after, now=self.clock())
        self.last_error = None
        self._save_state(m)
        await self._set(m)
        log.info("event=%s spiffe=%s node=%s not_after=%s renew_at=%s control_plane=%s",
                 "enrolled" if plan.phase is Phase.ENROL else "renewed", m.spiffe, self.node_id,
                 _iso(m.not_after), _iso(self.lifecycle.plan(self.clock()).at), self.last_control_plane or "-")
        return plan

    # -- the bundle ---------------------------------------------------------------------------------------

    async def _on_bundle(self, bundle: bytes) -> None:
        """A bundle from WatchBundle replaces the one held (an empty or unparseable one is ignored: it would
        leave Envoy and the next channel trusting nothing)."""
        given = _checked_bundle(bundle)
        if not given:
            log.warning("event=bundle_ignored reason=%s source=watch", "not_pem_certificates" if bundle else "empty")
            return
        self.control_plane_bundle = given
        m = self.material
        if m is None or given == m.bundle_pem:
            return
        new = replace(m, bundle_pem=given)
        self._save_state(new)
        await self._set(new)
        log.info("event=bundle_changed roots=%d", given.count(b"-----BEGIN CERTIFICATE-----"))

    async def watch_bundle(self) -> None:
        """Follow WatchBundle with the current certificate, reconnecting with back-off."""
        delay = self.lifecycle.base_delay_s
        while True:
            client = await self.ready()
            try:
                async for bundle in self.signer.watch_bundle(client, self.trust_pem()):
                    delay = self.lifecycle.base_delay_s
                    await self._on_bundle(bundle)
                log.info("event=bundle_watch_closed")
            except SignError as exc:
                log.info("event=bundle_watch_failed reason=%s detail=%s retry_in_s=%.1f", exc.reason,
                         _one_line(exc.detail), delay)
            except (OSError, ValueError, grpc.RpcError) as exc:
                log.info("event=bundle_watch_failed reason=error detail=%r retry_in_s=%.1f", exc, delay)
            # jittered, so the nodes of a replica that went away do not all come back to the next one at once
            await self._sleep(delay * (0.5 + random.random() / 2))
            delay = min(self.lifecycle.max_delay_s, delay * 2)

    async def run(self) -> None:
        """Keep the identity fresh until cancelled."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.watch_bundle())
            while True:
                await self.step()


def _checked_bundle(pem: bytes) -> bytes:
    """``pem`` as a trust bundle (each certificate once), or b"" when it holds no certificate or is not PEM."""
    if not pem:
        return b""
    try:
        return pki.bundle_pem([pem])
    except ValueError:
        return b""


def _public_der(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, tz=dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300] or "-"


# ---- for a TLS table stream (meshdns) --------------------------------------------------------------------


class ChannelTls:
    """A client's TLS to the control plane with the node's identity: meshdns's table stream uses it
    (``meshpilot.meshdns.config.TableTls``) and reconnects when :meth:`wait_newer` returns."""

    def __init__(self, identity: WorkloadIdentity, server_name: str = "") -> None:
        self.identity = identity
        self.server_name = server_name

    def channel_credentials(self) -> tuple[int, grpc.ChannelCredentials, Sequence[tuple[str, Any]]]:
        m = self.identity.material
        if m is None:
            raise RuntimeError("no workload certificate yet")
        creds = grpc.ssl_channel_credentials(root_certificates=self.identity.trust_pem(), private_key=m.key_pem,
                                             certificate_chain=m.chain_pem)
        return self.identity.generation, creds, channel_options(self.server_name)

    async def wait_newer(self, generation: int) -> int:
        return await self.identity.wait_newer(generation)
