"""Fetching a service's OpenAPI document from one of its registered instances.

The control plane sits inside the mesh's network with the access of a trusted component, so a
management API that fetched any URL it was given would let a caller with a write token make it
request internal addresses (server-side request forgery: cloud metadata endpoints, admin ports,
other tenants' services) and read the answers back through error messages. What this module guards,
exactly:

- the import takes no URL: it takes an instance of the service (registered in the registry) and a
  path on it, and builds ``http://<address>:<port><path>`` itself (the path cannot name a host);
- the instance must be routable (healthy once, not critical now: what EDS would send traffic to);
- its address may not be link-local (169.254.0.0/16 and fe80::/10, where cloud metadata lives),
  unspecified (0.0.0.0, ::) or multicast, IPv4-mapped IPv6 included, and the address and port may not
  be one of the control plane's own listeners;
- no redirect is followed, it gives up after a timeout and reads at most ``MAX_DOCUMENT_BYTES``;
- a fetch that fails says only "could not connect" (refused, reset, timed out alike), so the import
  does not tell a closed port from a filtered one, and a document's own values are not echoed.

What it does not guard: a caller who may register instances (write scope, as the import needs) can
still register one at any other address, a private or loopback one included, and have the control
plane send it one GET; what comes back is only ever read as an OpenAPI document.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Collection

import aiohttp
from yarl import URL

from meshpilot.catalog.openapi import MAX_DOCUMENT_BYTES
from meshpilot.model import Instance, Service

__all__ = ["DEFAULT_PATH", "FETCH_TIMEOUT_S", "FetchError", "check_target", "choose", "document_url", "fetch"]

DEFAULT_PATH = "/v3/api-docs"  # springdoc-openapi's default
FETCH_TIMEOUT_S = 5.0
_PATH = re.compile(r"^/(?!/)[A-Za-z0-9._~!$&'()*+,;=:@%/-]{0,511}(\?[A-Za-z0-9._~!$&'()*+,;=:@%/?-]{0,512})?$")


class FetchError(Exception):
    """The import cannot go ahead: ``field`` of the request (or ``source`` for the fetch) and ``reason``;
    ``status``: the management API's answer."""

    def __init__(self, status: int, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.status = status
        self.field = field
        self.reason = reason


def choose(service: Service, instances: list[Instance], instance_id: str | None, port_name: str | None) -> tuple[Instance, int]:
    """The instance and port to fetch from: the one named (it must be the service's and routable), else
    the first routable one at an address :func:`check_target` allows; the port named, else the service's first HTTP port the instance has."""
    if instance_id is not None:
        found = [i for i in instances if i.id == instance_id]
        if not found:
            raise FetchError(404, "instance", f"{instance_id!r} is not a registered instance of {service.key}")
        inst = found[0]
        if not inst.routable:
            raise FetchError(409, "instance", f"{instance_id!r} is not routable (never healthy, or critical now); "
                                              "the import fetches only from an instance the mesh would send traffic to")
    else:
        ready = [i for i in instances if i.routable and _fetchable(i.address)]
        if not ready:
            what = "no routable instance (healthy once, not critical now, at an address fetched from)" if instances else "no registered instance"
            raise FetchError(409, "instance", f"{service.key} has {what} to fetch from")
        inst = sorted(ready, key=lambda i: i.id)[0]
    if port_name is not None:
        if port_name not in inst.ports or not inst.ports[port_name]:
            raise FetchError(400, "port", f"instance {inst.id!r} has no port {port_name!r} (ports: {', '.join(sorted(inst.ports))})")
        return inst, inst.ports[port_name]
    for p in service.ports:
        if p.protocol in ("http", "http2") and inst.ports.get(p.name):
            return inst, inst.ports[p.name]
    raise FetchError(400, "port", f"instance {inst.id!r} has no HTTP port of {service.key}; name one with port")


def _fetchable(address: str) -> bool:
    try:
        check_target(address, 0)
    except FetchError:
        return False
    return True


def check_target(address: str, port: int, own: Collection[tuple[str, int]] = ()) -> None:
    """FetchError(400, instance) when ``address`` is link-local, unspecified or multicast, or
    ``address:port`` is one of ``own`` (the control plane's listeners: (listen address, port); a
    loopback or unspecified listen address stands for every local address)."""
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    ip = mapped or ip
    for kind, hit in (("link-local", ip.is_link_local), ("unspecified", ip.is_unspecified), ("multicast", ip.is_multicast)):
        if hit:
            raise FetchError(400, "instance", f"its address {address} is {kind}: such addresses are not fetched from")
    for host, own_port in own:
        if port != own_port:
            continue
        try:
            listen = ipaddress.ip_address(host)
        except ValueError:  # a host name: it may be any local address
            listen = ipaddress.ip_address("0.0.0.0")
        if listen == ip or listen.is_unspecified or (listen.is_loopback and ip.is_loopback):
            raise FetchError(400, "instance", f"{address}:{port} is the control plane's own listener: it is not fetched from")


def document_url(inst: Instance, port: int, path: str, own: Collection[tuple[str, int]] = ()) -> URL:
    """``http://<address>:<port><path>``; ``path`` is a path (and query) only, never a host; the
    address passes :func:`check_target`."""
    check_target(inst.address, port, own)
    if not _PATH.match(path):
        raise FetchError(400, "path", "expected a path on the instance such as /v3/api-docs (no scheme, host or '//')")
    raw_path, _, query = path.partition("?")
    return URL.build(scheme="http", host=inst.address, port=port, path=raw_path, query_string=query, encoded=True)


async def fetch(url: URL, timeout_s: float = FETCH_TIMEOUT_S, limit: int = MAX_DOCUMENT_BYTES) -> bytes:
    """The body at ``url`` (a 200, at most ``limit`` bytes, within ``timeout_s``), or FetchError."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
            async with session.get(url, allow_redirects=False, headers={"Accept": "application/json, application/yaml;q=0.9"}) as resp:
                if resp.status != 200:
                    hint = " (redirects are not followed)" if 300 <= resp.status < 400 else ""
                    raise FetchError(502, "source", f"{url} answered {resp.status}{hint}; expected 200 with the OpenAPI document")
                if resp.content_length is not None and resp.content_length > limit:
                    raise FetchError(413, "source", f"{url} sends {resp.content_length} bytes; at most {limit} are read")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > limit:
                        raise FetchError(413, "source", f"{url} sent more than {limit} bytes; at most {limit} are read")
                return bytes(body)
    except (asyncio.TimeoutError, aiohttp.ClientError, OSError):
        # refused, reset and timed out alike: the reason would tell a closed port from a filtered one
        raise FetchError(502, "source", f"{url} could not connect, or no answer within {timeout_s:g} s") from None
