"""The API catalog's "try it": one request to a catalogued operation, sent through the mesh from the
control plane's own sidecar, answered with the response and the id of its trace.

The control plane never runs node-side code, so "its own sidecar" is an ordinary ``meshpilot sidecar``
the operator runs on the control plane's host (for a service such as ``meshpilot-console``); the
setting ``try_it_proxy`` names that sidecar's outbound listener (HOST:PORT). A try is a request to that
listener with Host the service's mesh name (``<name>.<namespace>:<port>``), so it takes the path any
mesh caller takes: the caller sidecar's routes, policies and identity, the callee's sidecar, its app.
It carries a fresh W3C ``traceparent`` with the sampled flag set, which Envoy's Zipkin tracer keeps
whatever the TracingPolicy's rate, so both sidecars' spans reach ``/v1/traces/{trace_id}`` once their
agents ship them (meshpilot/tracing).

The pure core (``prepare``) turns the operator's request into what is sent, or a ``TryError`` naming
the field: the operation must be in the service's current catalog version; its path parameters are
all given and each is percent-encoded as one segment (``/`` ``?`` ``#`` ``%`` cannot add segments, a
query or a fragment; ``.``, ``..`` and values with ``/`` or ``\\``, which the sidecars refuse
escaped, are refused), its required query, header and cookie parameters
are present; headers that would speak for the mesh or the connection (hop-by-hop headers, Host,
``x-mesh-*``, ``x-envoy-*``, the trace headers, client-certificate headers) are refused; the request
body is bounded. ``TryIt.send`` does the I/O: one request with a timeout, no redirects followed, at
most ``MAX_RESPONSE_BYTES`` of the response read (the rest is dropped and the body marked
truncated). docs/catalog.md (Try it) is the user's page.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
from pydantic import BaseModel, ConfigDict, Field
from yarl import URL

from meshpilot.catalog.openapi import Operation
from meshpilot.model import Service

__all__ = [
    "MAX_REQUEST_BODY_BYTES", "MAX_RESPONSE_BYTES", "Prepared", "TryError", "TryIn", "TryIt", "check_headers", "expand_path",
    "find_operation", "prepare", "query_string", "traceparent",
]

MAX_REQUEST_BODY_BYTES = 1024 * 1024
MAX_RESPONSE_BYTES = 256 * 1024  # shown in a browser as text; a larger answer is cut and flagged
MAX_VALUE = 4096  # one parameter or header value
MAX_HEADERS_SHOWN = 100
TIMEOUT_S = 10.0
CONCURRENT = 8  # tries in flight at once per control plane; more wait their turn

# hop-by-hop headers (RFC 9110 7.6.1) and the ones the client sets itself
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                         "transfer-encoding", "upgrade", "host", "content-length", "expect", "http2-settings"})
# what the mesh says about a request: who called (x-mesh-caller), which trace it is in, the client's certificate
_MESH = frozenset({"traceparent", "tracestate", "b3", "x-request-id", "x-forwarded-client-cert", "x-forwarded-for",
                   "x-forwarded-proto", "x-forwarded-host", "x-real-ip", "forwarded", "x-ot-span-context"})
_MESH_PREFIXES = ("x-mesh-", "x-envoy-", "x-b3-", "x-meshpilot-")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$")  # an HTTP field name (RFC 9110 5.1)
_PARAM = re.compile(r"\{([^{}/]*)\}")
_HEX = "0123456789abcdef"

Scalar = str | int | float | bool


class TryError(ValueError):
    """The try cannot be sent: ``status`` (4xx, or 502/504 for the mesh's side), ``field``, ``reason``."""

    def __init__(self, status: int, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.status = status
        self.field = field
        self.reason = reason


class TryIn(BaseModel):
    """One request to a catalogued operation, sent through the control plane's own sidecar."""

    model_config = ConfigDict(extra="forbid")
    operation: str = Field(min_length=1, max_length=300, description="the operation's operationId (or 'METHOD /path/template' for one without)")
    path: dict[str, Scalar] = Field(default_factory=dict, max_length=64, description="a value for each {parameter} of the path template")
    query: dict[str, Scalar | list[Scalar]] = Field(default_factory=dict, max_length=64, description="query parameters (a list repeats the name)")
    headers: dict[str, str] = Field(default_factory=dict, max_length=64,
                                    description="request headers; hop-by-hop, Host, trace and mesh identity headers (x-mesh-*, x-envoy-*) are refused")
    cookies: dict[str, str] = Field(default_factory=dict, max_length=32, description="cookie parameters, sent as one Cookie header")
    body: Any = Field(default=None, description="the request body: a string is sent as it is, any other JSON value as application/json")
    port: str | None = Field(default=None, max_length=15, description="the service port's name; omitted: its first HTTP port")
    timeout_s: float = Field(default=TIMEOUT_S, gt=0, le=30, description="give up on the answer after this many seconds")


@dataclass(frozen=True, slots=True)
class Prepared:
    """What is sent: the request line's target (path and query), the Host, the headers in order, the body."""

    operation: Operation
    method: str
    target: str
    host: str
    headers: tuple[tuple[str, str], ...]
    body: bytes | None
    trace_id: str


def traceparent(trace_id: str, span_id: str) -> str:
    """A W3C trace context header (version 00) with the sampled flag set."""
    return f"00-{trace_id}-{span_id}-01"


def _new_id(nbytes: int, token_hex: Callable[[int], str]) -> str:
    value = token_hex(nbytes)
    return value if value.strip("0") else _HEX[1] + value[1:]  # W3C: an all-zero id is invalid


def find_operation(operations: Sequence[Operation], wanted: str) -> Operation:
    """The operation named by its operationId, or by 'METHOD /path/template'."""
    by_id = {o.operation_id: o for o in operations if o.operation_id}
    if wanted in by_id:
        return by_id[wanted]
    method, _, path = wanted.strip().partition(" ")
    for o in operations:
        if o.method == method.upper() and o.path == path.strip():
            return o
    names = sorted(by_id) or [f"{o.method} {o.path}" for o in operations]
    near = difflib.get_close_matches(wanted, names, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    raise TryError(400, "operation", f"{wanted!r} is not an operation of the service's current catalog version ({shown or 'it has none'}){hint}")


def _text(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _check_value(field: str, text: str) -> None:
    if len(text) > MAX_VALUE:
        raise TryError(400, field, f"longer than {MAX_VALUE} characters")
    if any(c in text for c in "\r\n\0"):
        raise TryError(400, field, "must not hold CR, LF or NUL")


def expand_path(template: str, values: Mapping[str, Scalar]) -> str:
    """``template`` with each ``{name}`` replaced by its value percent-encoded as part of one segment:
    every character but the unreserved ones (letters, digits, ``-._~``) is encoded, so a value cannot
    add a segment, a query or a fragment; ``.`` and ``..`` (which a server resolves as segments of
    their own), empty values and values with ``/`` or ``\\`` (whose escapes the sidecars' inbound
    listeners refuse) are refused. TryError names ``path.<name>``."""
    names = _PARAM.findall(template)
    for name in values:
        if name not in names:
            raise TryError(400, f"path.{name}", f"not a parameter of the path template {template} (its parameters: {', '.join(names) or 'none'})")

    def one(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in values:
            raise TryError(400, f"path.{name}", f"required: the path template {template} has {{{name}}}")
        text = _text(values[name])
        field = f"path.{name}"
        _check_value(field, text)
        if text in ("", ".", ".."):
            raise TryError(400, field, f"{text!r} cannot be a path parameter's value (it would change the path's segments)")
        if "/" in text or "\\" in text:
            raise TryError(400, field, "holds '/' or '\\': the mesh's sidecars refuse a path with an escaped slash or backslash "
                                       "(%2F, %5C; docs/policy.md), so no request could carry it")
        return quote(text, safe="")

    return _PARAM.sub(one, template)


def query_string(query: Mapping[str, Scalar | list[Scalar]]) -> str:
    """``name=value&...`` with names and values percent-encoded (a list repeats the name); TryError names ``query.<name>``."""
    parts = []
    for name, value in query.items():
        if not name or len(name) > 256:
            raise TryError(400, f"query.{name}", "a query parameter's name has 1 to 256 characters")
        for v in value if isinstance(value, list) else [value]:
            text = _text(v)
            _check_value(f"query.{name}", text)
            parts.append(f"{quote(name, safe='')}={quote(text, safe='')}")
    return "&".join(parts)


def check_headers(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """The headers as sent, or TryError naming ``headers.<name>`` for a refused or malformed one."""
    out = []
    for name, value in headers.items():
        field = f"headers.{name}"
        low = name.lower()
        if not _TOKEN.match(name):
            raise TryError(400, field, "not an HTTP header name")
        if low in _HOP_BY_HOP or low in _MESH or low.startswith(_MESH_PREFIXES):
            raise TryError(400, field, "refused: the mesh or the connection sets this header (hop-by-hop, Host, trace, x-mesh-*, x-envoy-* "
                                       "and client-certificate headers are never taken from a try)")
        _check_value(field, value)
        out.append((name, value))
    return out


def _body(op: Operation, body: Any, headers: list[tuple[str, str]]) -> tuple[bytes | None, str | None]:
    """The body's bytes and the content type to send with it (None: the caller gave one)."""
    if body is None:
        if op.body_required:
            raise TryError(400, "body", f"required: {op.method} {op.path} takes a request body ({', '.join(op.request_body)})")
        return None, None
    if not op.request_body:
        raise TryError(400, "body", f"{op.method} {op.path} declares no request body")
    given = any(n.lower() == "content-type" for n, _ in headers)
    if isinstance(body, str):
        data = body.encode()
        first = op.request_body[0]
        kind = first if "*" not in first else "text/plain; charset=utf-8"
    else:
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        kind = "application/json"
    if len(data) > MAX_REQUEST_BODY_BYTES:
        raise TryError(413, "body", f"{len(data)} bytes; at most {MAX_REQUEST_BODY_BYTES} are sent")
    return data, None if given else kind


def _port(service: Service, name: str | None) -> int:
    if name is not None:
        for p in service.ports:
            if p.name == name.lower():
                return p.port
        raise TryError(400, "port", f"{service.key} has no port {name!r} (its ports: {', '.join(p.name for p in service.ports)})")
    for p in service.ports:
        if p.protocol in ("http", "http2"):
            return p.port
    raise TryError(400, "port", f"{service.key} has no HTTP port to send a try to")


def prepare(service: Service, operations: Sequence[Operation], req: TryIn, token_hex: Callable[[int], str] = secrets.token_hex) -> Prepared:
    """What to send for ``req``, or TryError naming the first field that stops it. Pure but for the
    new trace and span ids (``token_hex``)."""
    op = find_operation(operations, req.operation)
    path = expand_path(op.path, req.path)
    declared = {(loc, name.lower() if loc == "header" else name): required for loc, name, required, _ in op.parameters}
    for (loc, name), required in declared.items():
        if not required:
            continue
        if loc == "query" and name not in req.query:
            raise TryError(400, f"query.{name}", f"required by {op.operation_id or op.key}")
        if loc == "header" and name not in {h.lower() for h in req.headers}:
            raise TryError(400, f"headers.{name}", f"required by {op.operation_id or op.key}")
        if loc == "cookie" and name not in req.cookies:
            raise TryError(400, f"cookies.{name}", f"required by {op.operation_id or op.key}")
    query = query_string(req.query)
    headers = check_headers(req.headers)
    if req.cookies:
        if any(n.lower() == "cookie" for n, _ in headers):
            raise TryError(400, "headers.cookie", "give cookies in cookies or in a Cookie header, not both")
        for name, value in req.cookies.items():
            if not _TOKEN.match(name) or any(c in value for c in ';,\\" \r\n\0'):
                raise TryError(400, f"cookies.{name}", "a cookie's name is a token and its value has no ; , \\ \" or white space")
        headers.append(("Cookie", "; ".join(f"{n}={v}" for n, v in req.cookies.items())))
    data, kind = _body(op, req.body, headers)
    if kind is not None:
        headers.append(("Content-Type", kind))
    trace_id = _new_id(16, token_hex)
    headers.append(("traceparent", traceparent(trace_id, _new_id(8, token_hex))))
    host = f"{service.name}.{service.namespace}:{_port(service, req.port)}"
    return Prepared(op, op.method, path + ("?" + query if query else ""), host, tuple(headers), data, trace_id)


class TryIt:
    """Sends prepared tries to the control plane's own sidecar's outbound listener (``proxy``: HOST:PORT)."""

    def __init__(self, proxy: str) -> None:
        self.proxy = proxy
        self._slots = asyncio.Semaphore(CONCURRENT)

    async def send(self, p: Prepared, timeout_s: float = TIMEOUT_S) -> dict[str, Any]:
        """The answer as the API gives it: status, headers, body (text, cut at MAX_RESPONSE_BYTES with
        ``body_truncated``), duration_ms and the trace id; TryError(502/504) when no answer came, and
        TryError(429, timeout_s) when no slot of CONCURRENT freed within ``timeout_s`` (the wait and the
        answer share that one deadline)."""
        url = URL(f"http://{self.proxy}{p.target}", encoded=True)  # as built: nothing re-encoded or normalised
        headers = {"Host": p.host}
        headers.update(p.headers)  # names are unique: headers given twice in JSON are one key
        # the wait for a slot counts against timeout_s too: tries that hang hold every slot for at most
        # their own timeout, and one waiting behind them is refused when its own runs out
        deadline = asyncio.get_running_loop().time() + timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
        except TimeoutError:
            raise TryError(429, "timeout_s", f"no free try-it slot within {timeout_s:g} s: all {CONCURRENT} are taken by "
                                             "tries still waiting for their answers; try again later or with a longer timeout_s") from None
        try:
            start = time.perf_counter()
            try:
                async with asyncio.timeout_at(deadline):
                    async with aiohttp.ClientSession(auto_decompress=False, skip_auto_headers=("Accept-Encoding", "User-Agent")) as session:
                        async with session.request(p.method, url, headers=headers, data=p.body, allow_redirects=False) as resp:
                            body = await _read_bounded(resp.content, MAX_RESPONSE_BYTES)
                            status = resp.status
                            raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in resp.raw_headers]
            except TimeoutError:
                raise TryError(504, "timeout_s", f"no complete answer within {timeout_s:g} s") from None
            except aiohttp.ClientConnectorError as exc:
                raise TryError(502, "try_it_proxy", f"the control plane's sidecar at {self.proxy} did not take the connection "
                                                    f"({exc.os_error.strerror or exc.os_error}); is it running?") from None
            except aiohttp.ClientError as exc:
                raise TryError(502, "(response)", f"the answer through {self.proxy} broke off: {exc}") from None
            duration_ms = round((time.perf_counter() - start) * 1000, 1)
        finally:
            self._slots.release()
        truncated = len(body) > MAX_RESPONSE_BYTES
        body = body[:MAX_RESPONSE_BYTES]
        return {
            "status": status,
            "headers": [{"name": k, "value": v} for k, v in raw[:MAX_HEADERS_SHOWN]],
            "body": body.decode("utf-8", errors="replace"),
            "body_bytes": len(body),
            "body_truncated": truncated,
            "duration_ms": duration_ms,
            "trace_id": p.trace_id,
            "trace": f"/v1/traces/{p.trace_id}",
            "request": {"method": p.method, "target": p.target, "host": p.host, "operation": p.operation.operation_id or p.operation.key},
        }


async def _read_bounded(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of the body: one past the bound tells that there was more."""
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await stream.read(limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
