"""The Consul-compatible HTTP API (default port 8500): the subset of ``/v1`` that real clients use.

Handlers only move data between HTTP and ``ConsulAgent``: they read the caller's address (its
synthetic node), parse parameters, and answer the way Consul does (JSON with ``X-Consul-Index``
on reads, plain-text errors with Consul's status codes). When authorisation is on (the operator's
bootstrap token is set) every endpoint but ``/v1/status`` needs an access token (meshpilot.access)
from ``X-Consul-Token``, ``?token=`` or a bearer header, the way Consul's ACLs ask for one: reads
need scope read; registrations, check updates, KV writes, transactions and sessions need write;
``/v1/acl/*`` needs admin, but ``/v1/acl/token/self`` answers any valid token about itself. A
missing, unknown or too weak token is a 403 in Consul's words, which Consul clients understand.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from aiohttp import web

from meshpilot import boundedjson
from meshpilot.access import AccessToken, AccessTokens, Scope
from meshpilot.consul.agent import VERSION, Answer, ConsulAgent
from meshpilot.consul.definitions import ConsulError, ServiceDef, canonical_ip, parse_catalog_registration, parse_duration, parse_service
from meshpilot.frontdoor import bearer_token

__all__ = ["build_consul_app", "parse_wait"]

log = logging.getLogger("meshpilot.consul.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

DEFAULT_WAIT_S = 300.0
MAX_WAIT_S = 600.0
MAX_KV_VALUE = 512 * 1024


def parse_wait(value: str | None) -> float:
    """``?wait=``: a Go duration, default 5 minutes, at most 10 (as Consul)."""
    if value is None or value == "":
        return DEFAULT_WAIT_S
    seconds = parse_duration(value, "wait")
    if seconds <= 0:
        return DEFAULT_WAIT_S
    return min(seconds, MAX_WAIT_S)


def parse_index(value: str | None) -> int:
    if value is None or value == "":
        return 0
    try:
        idx = int(value)
    except ValueError:
        raise ConsulError(400, f"Invalid index: {value!r} is not a number") from None
    if idx < 0:
        raise ConsulError(400, f"Invalid index: {value!r} is negative")
    return idx


def _flag(request: web.Request, name: str) -> bool:
    if name not in request.query:
        return False
    return request.query[name].lower() not in ("false", "0", "no")


def _caller(request: web.Request) -> str:
    """The caller's synthetic node: its address, canonical, without an IPv6 zone."""
    return canonical_ip((request.remote or "127.0.0.1").split("%", 1)[0]) or "127.0.0.1"


def _text(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message if message.endswith("\n") else message + "\n", content_type="text/plain")


ANONYMOUS_ACCESSOR = "00000000-0000-0000-0000-000000000002"  # Consul's anonymous token
_TOKEN_SELF = "/v1/acl/token/self"
_READS = ("GET", "HEAD")


def _resource(path: str) -> str:
    """The Consul ACL resource a path acts on, as its permission errors name it."""
    for prefix, resource in (("/v1/acl/", "acl"), ("/v1/kv/", "key"), ("/v1/txn", "key"), ("/v1/session/", "session"),
                             ("/v1/agent/self", "agent"), ("/v1/agent/members", "node"), ("/v1/catalog/node", "node"),
                             ("/v1/health/node/", "node")):
        if path.startswith(prefix):
            return resource
    return "service"


def consul_scope(method: str, path: str) -> Scope | None:
    """The scope a request on the Consul port needs when authorisation is on (None: open)."""
    if path.startswith("/v1/status/"):
        return None
    if path.startswith("/v1/acl/"):
        return Scope.read if path == _TOKEN_SELF else Scope.admin
    return Scope.read if method.upper() in _READS else Scope.write


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _token_json(token: AccessToken, secret: str) -> dict[str, Any]:
    """A token as Consul's /v1/acl/token/self shows it; its policy names its scope."""
    scope = token.scope.name
    policy_id = f"6d657368-7069-6c6f-7400-00000000000{int(token.scope)}"  # "meshpilot" in hex, then the scope
    body: dict[str, Any] = {
        "AccessorID": token.id, "SecretID": secret, "Description": token.description,
        "Policies": [{"ID": policy_id, "Name": f"meshpilot-{scope}"}], "Roles": [], "ServiceIdentities": [], "NodeIdentities": [],
        "Local": False, "CreateTime": _rfc3339(token.created),
        "Hash": hashlib.sha256(f"{token.id}/{scope}".encode()).hexdigest()[:44], "CreateIndex": 0, "ModifyIndex": 0,
    }
    if token.expires is not None:
        body["ExpirationTime"] = _rfc3339(token.expires)
    return body


def build_consul_app(agent: ConsulAgent, tokens: AccessTokens | None = None) -> web.Application:
    """The Consul-compatible app over ``agent``; ``tokens``: the access tokens it honours (None, or
    tokens without a bootstrap token: authorisation off)."""
    headers_base = {"X-Consul-KnownLeader": "true", "X-Consul-LastContact": "0", "X-Consul-Effective-Consistency": "leader"}

    def json_response(data: Any, index: int | None = None, status: int = 200) -> web.Response:
        h = dict(headers_base)
        if index is not None:
            h["X-Consul-Index"] = str(index)
        return web.Response(status=status, body=json.dumps(data, separators=(",", ":")).encode(), headers=h, content_type="application/json")

    def answer_response(ans: Answer, status: int = 200) -> web.Response:
        h = {**headers_base, "X-Consul-Index": str(ans.index)}
        return web.Response(status=status, body=ans.body, headers=h, content_type="application/json")

    def secret_of(request: web.Request) -> str:
        return request.headers.get("X-Consul-Token") or request.query.get("token") or bearer_token(request) or ""

    def authorise(request: web.Request) -> None:
        """Raise Consul's 403 when the request needs a token and has none that suffices."""
        if tokens is None or not tokens.enabled:
            return
        need = consul_scope(request.method, request.path)
        if need is None:
            return
        permission = f"{_resource(request.path)}:{'read' if need is Scope.read else 'write'}"
        secret = secret_of(request)
        if not secret:
            raise ConsulError(403, f"Permission denied: anonymous token lacks permission '{permission}'")
        token = tokens.lookup(secret)
        if token is None:
            raise ConsulError(403, "ACL not found")
        if token.scope < need:
            raise ConsulError(403, f"Permission denied: token with AccessorID '{token.id}' lacks permission '{permission}'")

    @web.middleware
    async def consul_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            authorise(request)
            dc = request.query.get("dc")
            if dc and dc != agent.datacenter:
                raise ConsulError(500, "No path to datacenter")
            if request.query.get("filter"):
                raise ConsulError(400, "Failed to create boolean expression evaluator: filter expressions are not supported by meshpilot")
            return await handler(request)
        except ConsulError as exc:
            return _text(exc.status, exc.message)
        except web.HTTPException as exc:
            if exc.status >= 400:
                return _text(exc.status, exc.reason or "error")
            raise

    async def body_json(request: web.Request) -> Any:
        raw = await request.read()
        if not raw.strip():
            return None
        try:
            return boundedjson.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConsulError(400, f"Request decode failed: {exc}") from None

    async def blocking(request: web.Request, key: str, topic: str, compute: Callable[[], Any]) -> Answer:
        """A blocking query on ``index`` (or, where Consul offers it, the content ``hash``) and ``wait``."""
        index = parse_index(request.query.get("index"))
        content_hash = request.query.get("hash", "")
        wait = parse_wait(request.query.get("wait")) if index or content_hash else 0.0
        if wait:
            wait += random.uniform(0, wait / 16)
        return await agent.blocking(key, topic, compute, index, wait, content_hash)

    def query_key(request: web.Request, *extra: str) -> str:
        params = sorted((k, v) for k, v in request.query.items() if k not in ("index", "hash", "wait", "token", "stale", "consistent", "cached"))
        return "|".join((request.path, *extra, json.dumps(params)))

    # ---- agent ------------------------------------------------------------------------------

    async def service_register(request: web.Request) -> web.Response:
        data = await body_json(request)
        node = _caller(request)
        sdef = await _resolved(parse_service(data, node))
        agent.register(sdef, node, replace_checks=_flag(request, "replace-existing-checks"))
        return web.Response(status=200, headers=headers_base)

    async def service_deregister(request: web.Request) -> web.Response:
        agent.deregister(_caller(request), request.match_info["id"])
        return web.Response(status=200, headers=headers_base)

    async def service_maintenance(request: web.Request) -> web.Response:
        if "enable" not in request.query:
            raise ConsulError(400, "Missing value for enable")
        enable = request.query["enable"].lower()
        if enable not in ("true", "false"):
            raise ConsulError(400, f"Invalid value for enable: {enable!r}")
        agent.maintenance(_caller(request), request.match_info["id"], enable == "true", request.query.get("reason", ""))
        return web.Response(status=200, headers=headers_base)

    async def agent_services(request: web.Request) -> web.Response:
        node = _caller(request)
        return json_response(agent.agent_services(node))

    async def agent_service(request: web.Request) -> web.Response:
        node = _caller(request)
        sid = request.match_info["id"]

        def compute() -> Any:
            return agent.agent_services(node).get(sid)

        ans = await blocking(request, query_key(request, node), "catalog", compute)
        if ans.body == b"null":
            raise ConsulError(404, f"unknown service ID: {sid}")
        return web.Response(body=ans.body, headers={**headers_base, "X-Consul-ContentHash": ans.hash, "X-Consul-Index": str(ans.index)}, content_type="application/json")

    async def agent_checks(request: web.Request) -> web.Response:
        return json_response(agent.agent_checks(_caller(request)))

    async def check_register(request: web.Request) -> web.Response:
        agent.register_check(await body_json(request), _caller(request))
        return web.Response(status=200, headers=headers_base)

    async def check_deregister(request: web.Request) -> web.Response:
        agent.deregister_check(_caller(request), request.match_info["id"])
        return web.Response(status=200, headers=headers_base)

    def check_update(status: str | None) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            output = request.query.get("note", "")
            new_status = status
            if new_status is None:
                data = await body_json(request)
                if not isinstance(data, dict):
                    raise ConsulError(400, "Request decode failed: expected a JSON object with Status and Output")
                folded = {str(k).lower(): v for k, v in data.items()}
                new_status = str(folded.get("status", "")).lower()
                output = str(folded.get("output", ""))
                if new_status not in ("passing", "warning", "critical"):
                    raise ConsulError(400, f"Invalid check status: {new_status!r}")
            agent.update_check(_caller(request), request.match_info["id"], new_status, output)
            return web.Response(status=200, headers=headers_base)

        return handler

    async def agent_self(request: web.Request) -> web.Response:
        node = _caller(request)
        return json_response({
            "Config": {"Datacenter": agent.datacenter, "PrimaryDatacenter": agent.datacenter, "NodeName": node,
                       "NodeID": agent.node_json(node, node)["ID"], "Revision": "meshpilot", "Server": True, "Version": VERSION},
            "DebugConfig": {}, "Coord": None,
            "Member": {"Name": node, "Addr": node, "Port": 8301, "Tags": {"dc": agent.datacenter, "role": "consul", "build": VERSION},
                       "Status": 1, "ProtocolMin": 1, "ProtocolMax": 5, "ProtocolCur": 2, "DelegateMin": 2, "DelegateMax": 5, "DelegateCur": 4},
            "Meta": {"consul-network-segment": ""},
            "Stats": {}, "xDS": None,
        })

    async def agent_members(request: web.Request) -> web.Response:
        return json_response([
            {"Name": n, "Addr": a, "Port": 8301, "Tags": {"dc": agent.datacenter, "role": "node"}, "Status": 1,
             "ProtocolMin": 1, "ProtocolMax": 5, "ProtocolCur": 2, "DelegateMin": 2, "DelegateMax": 5, "DelegateCur": 4}
            for n, a in sorted(agent.nodes().items())
        ])

    # ---- catalog and health -------------------------------------------------------------------

    async def health_service(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        passing = _flag(request, "passing")
        tags = request.query.getall("tag", [])
        svc = agent.lookup(name)
        topic = f"svc:{svc.key}" if svc else "catalog"
        ans = await blocking(request, query_key(request), topic, lambda: agent.health_service(name, passing, tags))
        return answer_response(ans)

    async def health_checks(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        svc = agent.lookup(name)
        ans = await blocking(request, query_key(request), f"svc:{svc.key}" if svc else "catalog", lambda: agent.health_checks(name))
        return answer_response(ans)

    async def health_state(request: web.Request) -> web.Response:
        state = request.match_info["state"]
        if state not in ("any", "passing", "warning", "critical"):
            raise ConsulError(400, f"Invalid state: {state!r}")
        ans = await blocking(request, query_key(request), "catalog", lambda: agent.health_state(state))
        return answer_response(ans)

    async def health_node(request: web.Request) -> web.Response:
        node = request.match_info["node"]
        ans = await blocking(request, query_key(request), "catalog", lambda: agent.health_node(node))
        return answer_response(ans)

    async def catalog_services(request: web.Request) -> web.Response:
        ans = await blocking(request, query_key(request), "catalog", agent.catalog_services)
        return answer_response(ans)

    async def catalog_service(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        tags = request.query.getall("tag", [])
        svc = agent.lookup(name)
        ans = await blocking(request, query_key(request), f"svc:{svc.key}" if svc else "catalog", lambda: agent.catalog_service(name, tags))
        return answer_response(ans)

    async def catalog_nodes(request: web.Request) -> web.Response:
        ans = await blocking(request, query_key(request), "catalog", agent.catalog_nodes)
        return answer_response(ans)

    async def catalog_node(request: web.Request) -> web.Response:
        node = request.match_info["node"]
        ans = await blocking(request, query_key(request), "catalog", lambda: agent.catalog_node(node))
        return answer_response(ans)

    async def catalog_datacenters(request: web.Request) -> web.Response:
        return json_response([agent.datacenter])

    async def token_self(request: web.Request) -> web.Response:
        if tokens is None or not tokens.enabled:
            raise ConsulError(401, "ACL support disabled")
        secret = secret_of(request)
        token = tokens.lookup(secret)
        if token is None:  # authorise let it through, so it was revoked in between
            raise ConsulError(403, "ACL not found")
        return json_response(_token_json(token, secret))

    async def status_leader(request: web.Request) -> web.Response:
        return json_response("127.0.0.1:8300")

    async def status_peers(request: web.Request) -> web.Response:
        return json_response(["127.0.0.1:8300"])

    # ---- KV -----------------------------------------------------------------------------------

    def kv_key(request: web.Request) -> str:
        return request.match_info.get("key", "").lstrip("/")

    async def kv_get(request: web.Request) -> web.StreamResponse:
        key = kv_key(request)
        recurse = _flag(request, "recurse")
        if "keys" in request.query:
            sep = request.query.get("separator", "")
            ans = await blocking(request, query_key(request), "kv", lambda: agent.kv.keys(key, sep))
            if ans.body == b"[]":
                return web.Response(status=404, headers={**headers_base, "X-Consul-Index": str(ans.index)})
            return answer_response(ans)
        if not key and not recurse:
            raise ConsulError(400, "Missing key name")
        ans = await blocking(request, query_key(request), "kv", lambda: agent.kv.entries_json(key, recurse))
        if ans.body == b"[]":
            return web.Response(status=404, headers={**headers_base, "X-Consul-Index": str(ans.index)})
        if _flag(request, "raw") and not recurse:
            return web.Response(body=agent.kv.value(key) or b"", headers={**headers_base, "X-Consul-Index": str(ans.index)},
                                content_type="application/octet-stream")
        return answer_response(ans)

    async def kv_put(request: web.Request) -> web.Response:
        key = kv_key(request)
        if not key:
            raise ConsulError(400, "Missing key name")
        if len(key) > 2048:
            raise ConsulError(400, "Key too long")
        value = await request.read()
        if len(value) > MAX_KV_VALUE:
            raise ConsulError(413, f"Request body(value) too large, max size: {MAX_KV_VALUE} bytes")
        flags = _uint(request.query.get("flags"), "flags")
        if "acquire" in request.query:
            return json_response(await agent.kv.acquire(key, value, flags, request.query["acquire"]))
        if "release" in request.query:
            return json_response(await agent.kv.release(key, value, flags, request.query["release"]))
        cas = _uint(request.query.get("cas"), "cas") if "cas" in request.query else None
        return json_response(await agent.kv.put(key, value, flags, cas))

    async def kv_delete(request: web.Request) -> web.Response:
        key = kv_key(request)
        recurse = _flag(request, "recurse")
        if not key and not recurse:
            raise ConsulError(405, "Missing key name")
        cas = _uint(request.query.get("cas"), "cas") if "cas" in request.query else None
        return json_response(await agent.kv.delete(key, recurse, cas))

    # ---- transactions, sessions, catalog writes --------------------------------------------

    async def txn(request: web.Request) -> web.Response:
        results, errors = await agent.kv.txn(await body_json(request))
        status = 200 if errors is None else 409
        return json_response({"Results": results, "Errors": errors}, index=agent.index, status=status)

    async def session_create(request: web.Request) -> web.Response:
        sid = agent.kv.create_session(await body_json(request), _caller(request), agent.check_status)
        return json_response({"ID": sid})

    async def session_renew(request: web.Request) -> web.Response:
        sid = request.match_info["id"]
        session = agent.kv.renew(sid)
        if session is None:
            raise ConsulError(404, f"Session id '{sid}' not found")
        return json_response([session])

    async def session_destroy(request: web.Request) -> web.Response:
        agent.kv.destroy(request.match_info["id"])
        return json_response(True)

    async def session_info(request: web.Request) -> web.Response:
        sid = request.match_info["id"]
        return json_response([s for s in agent.kv.sessions_json() if s["ID"] == sid], index=agent.index)

    async def session_list(request: web.Request) -> web.Response:
        return json_response(agent.kv.sessions_json(request.match_info.get("node")), index=agent.index)

    async def catalog_register(request: web.Request) -> web.Response:
        node, sdef = parse_catalog_registration(await body_json(request))
        agent.catalog_register(node, await _resolved(sdef))
        return json_response(True)

    async def catalog_deregister(request: web.Request) -> web.Response:
        agent.catalog_deregister(await body_json(request))
        return json_response(True)

    app = web.Application(middlewares=[consul_errors], client_max_size=MAX_KV_VALUE + 4096)
    r = app.router
    r.add_put("/v1/agent/service/register", service_register)
    r.add_put("/v1/agent/service/deregister/{id:.+}", service_deregister)
    r.add_put("/v1/agent/service/maintenance/{id:.+}", service_maintenance)
    r.add_get("/v1/agent/services", agent_services)
    r.add_get("/v1/agent/service/{id:.+}", agent_service)
    r.add_get("/v1/agent/checks", agent_checks)
    r.add_put("/v1/agent/check/register", check_register)
    r.add_put("/v1/agent/check/deregister/{id:.+}", check_deregister)
    r.add_put("/v1/agent/check/pass/{id:.+}", check_update("passing"))
    r.add_put("/v1/agent/check/warn/{id:.+}", check_update("warning"))
    r.add_put("/v1/agent/check/fail/{id:.+}", check_update("critical"))
    r.add_put("/v1/agent/check/update/{id:.+}", check_update(None))
    r.add_get("/v1/agent/self", agent_self)
    r.add_get("/v1/agent/members", agent_members)
    r.add_get("/v1/health/service/{name}", health_service)
    r.add_get("/v1/health/checks/{name}", health_checks)
    r.add_get("/v1/health/state/{state}", health_state)
    r.add_get("/v1/health/node/{node}", health_node)
    r.add_get("/v1/catalog/services", catalog_services)
    r.add_get("/v1/catalog/service/{name}", catalog_service)
    r.add_get("/v1/catalog/nodes", catalog_nodes)
    r.add_get("/v1/catalog/node/{node}", catalog_node)
    r.add_get("/v1/catalog/datacenters", catalog_datacenters)
    r.add_get(_TOKEN_SELF, token_self)
    r.add_get("/v1/status/leader", status_leader)
    r.add_get("/v1/status/peers", status_peers)
    r.add_get("/v1/kv/{key:.*}", kv_get)
    r.add_put("/v1/kv/{key:.*}", kv_put)
    r.add_delete("/v1/kv/{key:.*}", kv_delete)
    r.add_put("/v1/txn", txn)
    r.add_put("/v1/session/create", session_create)
    r.add_put("/v1/session/renew/{id}", session_renew)
    r.add_put("/v1/session/destroy/{id}", session_destroy)
    r.add_get("/v1/session/info/{id}", session_info)
    r.add_get("/v1/session/list", session_list)
    r.add_get("/v1/session/node/{node}", session_list)
    r.add_put("/v1/catalog/register", catalog_register)
    r.add_put("/v1/catalog/deregister", catalog_deregister)
    return app


def _uint(value: str | None, what: str) -> int:
    if value is None or value == "":
        return 0
    try:
        n = int(value)
    except ValueError:
        raise ConsulError(400, f"Invalid {what}: {value!r}") from None
    if n < 0 or n >= 2**64:
        raise ConsulError(400, f"Invalid {what}: {value!r}")
    return n


async def _resolved(sdef: ServiceDef) -> ServiceDef:
    """The registration with its host-name Address resolved to an IP address."""
    if canonical_ip(sdef.address) is not None:
        return sdef
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(2.0):
            infos = await loop.getaddrinfo(sdef.address, None, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError):
        raise ConsulError(400, f"Invalid service address {sdef.address!r}: cannot resolve it to an IP address") from None
    addrs = [str(i[4][0]) for i in infos]  # AF_INET/AF_INET6 addresses are already strings
    v4 = [a for a in addrs if ":" not in a]
    return replace(sdef, address=(v4 or addrs)[0])
