"""The agent's SDS server: the node's certificate and trust bundle for its own Envoy, over a unix socket.

Envoy's bootstrap names a static cluster ``meshpilot-sds`` (a pipe address, HTTP/2) and asks it for two
secrets: ``default`` (a ``tls_certificate``: the workload chain and its key, inline bytes) and ``ROOTCA``
(a ``validation_context``: the trust bundle). The key never touches a file Envoy reads: it goes from the
agent's memory to Envoy over a socket in the work directory that only this user can open (the directory
is 0700, the socket 0600).

As in xds/: :class:`SecretStore` holds the current secrets, each serialised once and versioned by its
content; :class:`SotwSecrets` (``StreamSecrets``, what Envoy uses for ``api_type: GRPC``) and
:class:`DeltaSecrets` (``DeltaSecrets``) are stream machines without I/O that turn requests and store
changes into responses; :class:`SdsServer` only moves messages. A renewal or a new bundle is a new
version pushed to every stream that holds the secret; Envoy uses the new context for new connections and
keeps the ones it has.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

__all__ = [
    "DEFAULT",
    "ROOTCA",
    "SDS_SERVICE",
    "SECRET_TYPE",
    "DeltaSecrets",
    "SdsServer",
    "SecretStore",
    "SotwSecrets",
]

log = logging.getLogger("meshpilot.sds")

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
SDS_SERVICE = "envoy.service.secret.v3.SecretDiscoveryService"
DEFAULT = "default"  # the workload's certificate chain and key
ROOTCA = "ROOTCA"  # the trust bundle


@dataclass(frozen=True, slots=True)
class _Held:
    version: str
    resource: Any  # any_pb2.Any holding the serialised Secret


Secrets = Mapping[str, _Held]


def _secrets(key_pem: bytes, chain_pem: bytes, bundle_pem: bytes) -> dict[str, Any]:
    cert = secret_pb2.Secret(name=DEFAULT, tls_certificate=common_pb2.TlsCertificate(
        certificate_chain=base_pb2.DataSource(inline_bytes=chain_pem),
        private_key=base_pb2.DataSource(inline_bytes=key_pem)))
    roots = secret_pb2.Secret(name=ROOTCA, validation_context=common_pb2.CertificateValidationContext(
        trusted_ca=base_pb2.DataSource(inline_bytes=bundle_pem)))
    return {DEFAULT: cert, ROOTCA: roots}


class SecretStore:
    """The secrets Envoy may ask for, each serialised once; streams register a wake-up callback."""

    def __init__(self) -> None:
        self._held: dict[str, _Held] = {}
        self._watchers: set[asyncio.Event] = set()

    def set(self, key_pem: bytes, chain_pem: bytes, bundle_pem: bytes) -> None:
        """Install the current identity; only secrets whose content changed get a new version."""
        changed = False
        for name, secret in _secrets(key_pem, chain_pem, bundle_pem).items():
            body = secret.SerializeToString(deterministic=True)
            version = hashlib.sha256(body).hexdigest()[:16]
            if name in self._held and self._held[name].version == version:
                continue
            self._held[name] = _Held(version, any_pb2.Any(type_url=SECRET_TYPE, value=body))
            changed = True
            log.info("event=secret_updated name=%s version=%s", name, version)
        if changed:
            for wake in self._watchers:
                wake.set()

    def snapshot(self) -> Secrets:
        return dict(self._held)

    def watch(self, wake: asyncio.Event) -> None:
        self._watchers.add(wake)

    def unwatch(self, wake: asyncio.Event) -> None:
        self._watchers.discard(wake)


def _error(req: Any) -> str | None:
    if not req.error_detail.code:
        return None
    return str(req.error_detail.message) or f"code {req.error_detail.code}"


@dataclass(slots=True)
class SotwSecrets:
    """One StreamSecrets stream: the subscribed names, what the last response held, ACKs and NACKs."""

    names: frozenset[str] = frozenset()
    sent: dict[str, str] = field(default_factory=dict)  # name → version in the last response
    nonce: str = ""
    acked: str = ""  # version_info of the last ACKed response
    last_error: str | None = None
    _nonces: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def on_request(self, req: Any, secrets: Secrets) -> Any | None:
        """The response to send for ``req`` (a DiscoveryRequest), or None."""
        if req.response_nonce and req.response_nonce != self.nonce:
            return None  # answers an older response; a newer one is on its way
        if req.response_nonce:
            error = _error(req)
            if error is not None:
                self.last_error = error
                log.warning("event=sds_nack names=%s version=%s error=%s", ",".join(sorted(self.names)),
                            req.version_info, " ".join(error.split())[:300])
            else:
                self.acked, self.last_error = req.version_info, None
        self.names = frozenset(req.resource_names)
        return self._respond(secrets)

    def on_change(self, secrets: Secrets) -> Any | None:
        return self._respond(secrets)

    def _respond(self, secrets: Secrets) -> Any | None:
        wanted = {n: secrets[n].version for n in sorted(self.names) if n in secrets}
        if not wanted or wanted == self.sent:
            return None  # unknown names get nothing; a NACKed version is not sent again
        self.sent = wanted
        self.nonce = str(next(self._nonces))
        version = hashlib.sha256(repr(sorted(wanted.items())).encode()).hexdigest()[:16]
        return discovery_pb2.DiscoveryResponse(version_info=version, type_url=SECRET_TYPE, nonce=self.nonce,
                                               resources=[secrets[n].resource for n in wanted])


@dataclass(slots=True)
class DeltaSecrets:
    """One DeltaSecrets stream: the subscribed names and the version the client holds of each."""

    names: set[str] = field(default_factory=set)
    held: dict[str, str] = field(default_factory=dict)  # name → version the client has (or is being sent)
    started: bool = False
    nonce: str = ""
    last_error: str | None = None
    _nonces: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def on_request(self, req: Any, secrets: Secrets) -> Any | None:
        """The response to send for ``req`` (a DeltaDiscoveryRequest), or None."""
        if not self.started:
            self.started = True
            self.held.update(req.initial_resource_versions)
        error = _error(req)
        if req.response_nonce and error is not None:
            self.last_error = error
            log.warning("event=sds_nack names=%s error=%s", ",".join(sorted(self.names)), " ".join(error.split())[:300])
        elif req.response_nonce == self.nonce:
            self.last_error = None
        self.names.update(req.resource_names_subscribe)
        for name in req.resource_names_unsubscribe:
            self.names.discard(name)
            self.held.pop(name, None)
        return self._respond(secrets)

    def on_change(self, secrets: Secrets) -> Any | None:
        return self._respond(secrets)

    def _respond(self, secrets: Secrets) -> Any | None:
        out = [n for n in sorted(self.names) if n in secrets and self.held.get(n) != secrets[n].version]
        if not out:
            return None
        for n in out:
            self.held[n] = secrets[n].version
        self.nonce = str(next(self._nonces))
        return discovery_pb2.DeltaDiscoveryResponse(
            type_url=SECRET_TYPE, nonce=self.nonce,
            resources=[discovery_pb2.Resource(name=n, version=secrets[n].version, resource=secrets[n].resource)
                       for n in out])


def _serialize(msg: Any) -> bytes:
    return bytes(msg.SerializeToString())


class SdsServer:
    """``async with SdsServer(store, socket_path):`` serves SDS on ``unix:socket_path`` until the block ends."""

    def __init__(self, store: SecretStore, socket_path: Path) -> None:
        self.store = store
        self.socket_path = socket_path
        self.streams = 0
        self._server: grpc.aio.Server | None = None

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SDS_SERVICE, {
            "StreamSecrets": grpc.stream_stream_rpc_method_handler(
                self._sotw, request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                response_serializer=_serialize),
            "DeltaSecrets": grpc.stream_stream_rpc_method_handler(
                self._delta, request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                response_serializer=_serialize),
            "FetchSecrets": grpc.unary_unary_rpc_method_handler(
                self._fetch, request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                response_serializer=_serialize),
        })

    async def start(self) -> None:
        directory = self.socket_path.parent
        directory.parent.mkdir(parents=True, exist_ok=True)
        directory.mkdir(mode=0o700, exist_ok=True)  # created private: nobody else ever reaches the socket
        os.chmod(directory, 0o700)  # (one left by an earlier agent, or narrowed by the umask)
        self.socket_path.unlink(missing_ok=True)  # a previous agent's
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((self.handler(),))
        if server.add_insecure_port(f"unix:{self.socket_path}") == 0:
            raise OSError(f"cannot listen on unix:{self.socket_path}")
        await server.start()
        os.chmod(self.socket_path, 0o600)
        self._server = server
        log.info("event=sds_listening socket=%s", self.socket_path)

    async def stop(self, grace: float | None = 0.5) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        self.socket_path.unlink(missing_ok=True)

    async def __aenter__(self) -> SdsServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def _fetch(self, req: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        secrets = self.store.snapshot()
        found = [secrets[n] for n in req.resource_names if n in secrets]
        version = hashlib.sha256(repr(sorted((h.version for h in found))).encode()).hexdigest()[:16]
        return discovery_pb2.DiscoveryResponse(version_info=version, type_url=SECRET_TYPE,
                                               resources=[h.resource for h in found])

    async def _sotw(self, requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await self._serve(SotwSecrets(), context)

    async def _delta(self, requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await self._serve(DeltaSecrets(), context)

    async def _serve(self, machine: SotwSecrets | DeltaSecrets, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Requests and store changes go through the machine; what it returns goes out."""
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        wake = asyncio.Event()
        self.store.watch(wake)
        self.streams += 1

        async def read() -> None:
            while True:
                req = await context.read()
                await inbox.put(req)
                if req is grpc.aio.EOF:
                    return

        async def changes() -> None:
            while True:
                await wake.wait()
                wake.clear()
                await inbox.put(_CHANGED)

        try:
            async with asyncio.TaskGroup() as tg:
                reader = tg.create_task(read())
                watcher = tg.create_task(changes())
                while True:
                    item = await inbox.get()
                    if item is grpc.aio.EOF:
                        break
                    secrets = self.store.snapshot()
                    resp = machine.on_change(secrets) if item is _CHANGED else machine.on_request(item, secrets)
                    if resp is not None:
                        await context.write(resp)
                reader.cancel()
                watcher.cancel()
        finally:
            self.streams -= 1
            self.store.unwatch(wake)


_CHANGED = object()
