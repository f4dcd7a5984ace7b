"""The name table's feed: a delta ADS client for ``meshpilot.dns.v1.DnsService`` resources, and its state file.

:class:`AdsState` is the protocol as a pure state machine (no I/O): it produces the first request of a stream
(wildcard subscription, node id, the versions it already holds) and turns each ``DeltaDiscoveryResponse`` into
the ACK or NACK to send back plus whether the table changed. A response with any invalid resource is NACKed as a
whole with the reason and the last good table stays. :func:`run_ads` moves those messages over a grpc.aio
stream to the control plane, reconnecting with capped, jittered exponential back-off. Given several replicas of
the control plane (``a:p,b:p``), it holds one stream to one of them (a random one first, so nodes spread) and
moves to the next whenever the stream fails or the replica ends it (a replica cut off from the shared store hands
its streams over that way); the versions it holds go along, so the next replica sends only what differs, and
each move is logged with the replica's address. The caller's callback
installs each new table and persists it (:func:`save_state`, an atomic replace) so a restarted meshdns serves
the last table before the control plane answers, and keeps serving it through an outage. With ``tls`` (a
:class:`~meshpilot.meshdns.config.TableTls`, the node's workload certificate) the channel is TLS, and a new
certificate ends the stream and opens the next one with it at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf.message import DecodeError
from google.rpc import status_pb2

from meshpilot.meshdns.config import TableTls
from meshpilot.meshdns.dns_pb2 import DnsService
from meshpilot.meshdns.table import Service
from meshpilot.xds.resource import TYPE

__all__ = ["TYPE_URL", "AdsState", "load_state", "run_ads", "save_state", "split_targets"]

TYPE_URL = TYPE.DNS
log = logging.getLogger("meshpilot.meshdns")

Resources = dict[str, tuple[str, Service]]

# a replica that vanished without closing the connection is noticed by HTTP/2 PINGs (the control plane allows one
# every 5 s without data); one that does not accept a connection is left after CONNECT_TIMEOUT_S
_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.ping_timeout_ms", 5_000),  # without it an unanswered PING closes nothing (grpcio 1.85)
    ("grpc.keepalive_permit_without_calls", 1),
)
CONNECT_TIMEOUT_S = 5.0


def split_targets(target: str | Sequence[str]) -> list[str]:
    """The replicas' gRPC targets: ``"a:p,b:p"`` or a list; ValueError when there is none or one is empty."""
    items = target.split(",") if isinstance(target, str) else list(target)
    targets = [t.strip() for t in items]
    if not targets or not all(targets):
        raise ValueError(f"{target!r}: expected HOST:PORT[,HOST:PORT...]")
    return targets


class AdsState:
    """What the client holds (resource name → (version, service)) and what it last answered."""

    def __init__(self, node_id: str, resources: Resources | None = None) -> None:
        self.node_id = node_id
        self.resources: Resources = dict(resources or {})
        self.last_error: str | None = None
        self.acks = 0
        self.nacks = 0

    def services(self) -> list[Service]:
        return [svc for _, svc in sorted(self.resources.values(), key=lambda vs: vs[1].resource_name)]

    def initial_request(self) -> discovery_pb2.DeltaDiscoveryRequest:
        """First message of every stream: wildcard subscription plus the versions already held, so a reconnect
        only receives what changed meanwhile (and removals of what is gone)."""
        return discovery_pb2.DeltaDiscoveryRequest(
            node=base_pb2.Node(id=self.node_id),
            type_url=TYPE_URL,
            resource_names_subscribe=["*"],
            initial_resource_versions={name: version for name, (version, _) in self.resources.items()},
        )

    def on_response(
        self, resp: discovery_pb2.DeltaDiscoveryResponse
    ) -> tuple[discovery_pb2.DeltaDiscoveryRequest, bool]:
        """The ACK/NACK for ``resp`` and whether the table changed."""
        errors: list[str] = []
        if resp.type_url != TYPE_URL:
            errors.append(f"type_url: expected {TYPE_URL}, got {resp.type_url!r}")
        new = dict(self.resources)
        for res in resp.resources:
            where = f"resource {res.name!r}"
            if not res.HasField("resource"):
                errors.append(f"{where}: no resource body")
                continue
            if res.resource.type_url != TYPE_URL:
                errors.append(f"{where}: type_url {res.resource.type_url!r}, expected {TYPE_URL}")
                continue
            msg = DnsService()
            try:
                msg.ParseFromString(res.resource.value)
                svc = Service.from_proto(msg)
            except (DecodeError, ValueError) as exc:
                errors.append(f"{where}: {exc}")
                continue
            if svc.resource_name != res.name:
                errors.append(f"{where}: name must be <name>.<namespace> = {svc.resource_name!r}")
                continue
            new[res.name] = (res.version, svc)
        for name in resp.removed_resources:
            new.pop(name, None)
        if errors:
            self.nacks += 1
            self.last_error = "; ".join(errors)
            return discovery_pb2.DeltaDiscoveryRequest(
                type_url=TYPE_URL,
                response_nonce=resp.nonce,
                error_detail=status_pb2.Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                               message=self.last_error),
            ), False
        changed = {k: v[1] for k, v in new.items()} != {k: v[1] for k, v in self.resources.items()}
        self.resources = new
        self.acks += 1
        self.last_error = None
        return discovery_pb2.DeltaDiscoveryRequest(type_url=TYPE_URL, response_nonce=resp.nonce), changed


async def run_ads(
    target: str | Sequence[str],
    state: AdsState,
    on_change: Callable[[], Awaitable[None]],
    *,
    backoff_initial: float = 0.1,
    backoff_max: float = 5.0,
    counters: dict[str, int] | None = None,
    tls: TableTls | None = None,
    first: int | None = None,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
) -> None:
    """Keep ``state`` in sync with the control plane until cancelled. ``target``: one replica's ``HOST:PORT``,
    several comma-separated, or a list; ``first``: the index of the replica to try first (default: a random
    one). A stream that fails or ends moves to the next replica at once when it had answered, else after a
    back-off that doubles each time every replica has failed in a row (jittered, capped at ``backoff_max``)."""
    targets = split_targets(target)
    counters = counters if counters is not None else {}
    index = random.randrange(len(targets)) if first is None else first % len(targets)
    delay = backoff_initial
    failed = 0  # attempts in a row without a response
    while True:
        target = targets[index]
        progress: list[bool] = []  # a response arrived on this stream: the back-off starts over
        reconnect_here = False
        try:
            if tls is None:
                async with grpc.aio.insecure_channel(target, options=list(_CHANNEL_OPTIONS)) as channel:
                    await _connect(channel, connect_timeout_s)
                    await _stream(channel, target, state, on_change, counters, progress)
            else:
                generation, creds, options = tls.channel_credentials()
                async with grpc.aio.secure_channel(target, creds, options=[*options, *_CHANNEL_OPTIONS]) as channel:
                    await _connect(channel, connect_timeout_s)
                    stream = asyncio.ensure_future(_stream(channel, target, state, on_change, counters, progress))
                    newer = asyncio.ensure_future(tls.wait_newer(generation))
                    try:
                        await asyncio.wait((stream, newer), return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for task in (stream, newer):
                            task.cancel()
                        await asyncio.gather(stream, newer, return_exceptions=True)
                    if newer.done() and not newer.cancelled() and newer.exception() is None:
                        counters["ads_credential_reconnects"] = counters.get("ads_credential_reconnects", 0) + 1
                        log.info("event=ads_reconnect reason=new_credentials target=%s", target)
                        reconnect_here = True
                    else:
                        stream.result()
        except grpc.aio.AioRpcError as exc:
            counters["ads_errors"] = counters.get("ads_errors", 0) + 1
            log.info("event=ads_unavailable target=%s code=%s", target, exc.code().name)
        except _Unreachable:
            counters["ads_errors"] = counters.get("ads_errors", 0) + 1
            log.info("event=ads_unavailable target=%s code=UNREACHABLE", target)
        except TimeoutError:
            counters["ads_errors"] = counters.get("ads_errors", 0) + 1
            log.info("event=ads_unavailable target=%s code=CONNECT_TIMEOUT after_s=%.1f", target, connect_timeout_s)
        if reconnect_here:
            delay, failed = backoff_initial, 0
            continue
        if progress:
            delay, failed = backoff_initial, 0
        else:
            failed += 1
        pause = 0.0 if progress and len(targets) > 1 else random.uniform(delay / 2, delay)
        if len(targets) > 1:
            index = (index + 1) % len(targets)
            counters["ads_replica_moves"] = counters.get("ads_replica_moves", 0) + 1
            log.info("event=ads_next_replica target=%s after=%s retry_in=%.2fs", targets[index], target, pause)
        else:
            log.info("event=ads_retry target=%s retry_in=%.2fs", target, pause)
        await asyncio.sleep(pause)
        if failed and failed % len(targets) == 0:
            delay = min(delay * 2, backoff_max)


class _Unreachable(Exception):
    """The replica refused or failed the connection."""


async def _connect(channel: grpc.aio.Channel, timeout_s: float) -> None:
    """Wait for the channel's connection: a refused or failed one is left at once (``_Unreachable``) instead
    of being retried by the channel, and one that never answers (a host that is down drops the SYN) after
    ``timeout_s`` (TimeoutError) instead of gRPC's 20 s connect deadline."""
    async with asyncio.timeout(timeout_s):
        state = channel.get_state(try_to_connect=True)
        while state is not grpc.ChannelConnectivity.READY:
            if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                raise _Unreachable()
            await channel.wait_for_state_change(state)
            state = channel.get_state(try_to_connect=True)


async def _stream(channel: grpc.aio.Channel, target: str, state: AdsState, on_change: Callable[[], Awaitable[None]],
                  counters: dict[str, int], progress: list[bool]) -> None:
    """One stream until the server ends it; ``progress`` gets an entry at the first response."""
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
    call = stub.DeltaAggregatedResources()
    await call.write(state.initial_request())
    counters["ads_streams"] = counters.get("ads_streams", 0) + 1
    while True:
        resp = await call.read()
        if resp is grpc.aio.EOF:
            log.info("event=ads_stream_closed target=%s", target)
            return
        if not progress:
            progress.append(True)
            log.info("event=ads_connected target=%s", target)
        reply, changed = state.on_response(resp)
        if state.last_error:
            counters["ads_nacks"] = counters.get("ads_nacks", 0) + 1
            log.warning("event=ads_nack nonce=%s error=%s", resp.nonce, state.last_error)
        elif changed:
            counters["ads_updates"] = counters.get("ads_updates", 0) + 1
            await on_change()
        await call.write(reply)


def save_state(path: str | Path, resources: Resources) -> None:
    """Write the table atomically: a temporary file in the same directory, fsync, rename over the old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": 1, "resources": {name: {"version": version, "service": svc.to_dict()}
                                      for name, (version, svc) in sorted(resources.items())}}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state(path: str | Path) -> Resources:
    """The table saved by :func:`save_state`; empty (and logged) when the file is missing or unreadable."""
    try:
        doc = json.loads(Path(path).read_text())
        out: Resources = {}
        for name, item in doc["resources"].items():
            out[name] = (str(item["version"]), Service.from_dict(item["service"]))
        return out
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("event=state_file_unreadable path=%s error=%r", path, exc)
        return {}
