"""The Eureka-compatible REST API (default port 8761, under ``/eureka``): register, renew, status
override, metadata, cancel, full and delta fetch, by app, instance and VIP; JSON or XML both ways.

Handlers only convert between HTTP and ``EurekaFront``. The answer is JSON when the client accepts
JSON (Spring's and Eureka's own clients ask for it), XML otherwise or when it asks for XML. Write
errors answer Eureka's status codes (400, 404) with a plain-text reason. When authorisation is on
(the operator's bootstrap token is set), every request needs an access token (meshpilot.access) as
``Authorization: Bearer <token>`` or as the HTTP Basic password (Eureka clients put credentials in
the service URL, ``http://app:<token>@host:8761/eureka``): scope read for fetches, write for
registration, renewal, status, metadata and cancel; 401 without a valid token, 403 when it is too weak.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from meshpilot import boundedjson
from meshpilot.access import AccessTokens, Scope
from meshpilot.eureka.codec import STATUSES, EurekaError, from_xml, parse_instance, to_xml
from meshpilot.eureka.front import EurekaFront
from meshpilot.frontdoor import bearer_token

__all__ = ["build_eureka_app"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _wants_xml(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "").lower()
    if "json" in accept:
        return False
    return "xml" in accept


def _secret(request: web.Request) -> str | None:
    """The caller's token: a bearer token, else the password of HTTP Basic credentials."""
    bearer = bearer_token(request)
    if bearer is not None:
        return bearer
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("basic "):
        try:
            _user, _, password = base64.b64decode(auth[6:].strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        return password or None
    return None


def _authorise(request: web.Request, tokens: AccessTokens | None) -> None:
    if tokens is None or not tokens.enabled:
        return
    need = Scope.read if request.method in ("GET", "HEAD") else Scope.write
    secret = _secret(request)
    got = None if secret is None else tokens.check(secret)
    if got is None:
        raise EurekaError(401, f"a valid token with scope {need.name} is required (bearer, or the HTTP Basic password)")
    if got < need:
        raise EurekaError(403, f"this token has scope {got.name}; {request.method} needs scope {need.name}")


def build_eureka_app(front: EurekaFront, tokens: AccessTokens | None = None) -> web.Application:
    """The Eureka-compatible app over ``front``; ``tokens``: the access tokens it honours (None, or
    tokens without a bootstrap token: authorisation off)."""
    def render(request: web.Request, root: str, value: Any, status: int = 200) -> web.Response:
        if _wants_xml(request):
            body = '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>' + to_xml(root, value)
            return web.Response(status=status, body=body.encode(), content_type="application/xml")
        return web.Response(status=status, body=json.dumps({root: value}, separators=(",", ":")).encode(), content_type="application/json")

    @web.middleware
    async def eureka_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            _authorise(request, tokens)
            return await handler(request)
        except EurekaError as exc:
            # a client that sends credentials only when challenged (Basic from the service URL) is challenged
            challenge = {"WWW-Authenticate": 'Basic realm="meshpilot"'} if exc.status == 401 else None
            return web.Response(status=exc.status, text=exc.message + "\n", content_type="text/plain", headers=challenge)
        except web.HTTPException as exc:
            if exc.status >= 400:
                return web.Response(status=exc.status, text=(exc.reason or "error") + "\n", content_type="text/plain")
            raise

    async def register(request: web.Request) -> web.Response:
        app = request.match_info["app"]
        raw = await request.read()
        ctype = request.headers.get("Content-Type", "").lower()
        if not raw.strip():
            raise EurekaError(400, "instance: a body is required")
        if "xml" in ctype or raw.lstrip().startswith(b"<"):
            tag, doc = from_xml(raw)
            if tag != "instance":
                raise EurekaError(400, f"expected an <instance> document, got <{tag}>")
        else:
            try:
                doc = boundedjson.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                raise EurekaError(400, f"malformed JSON: {exc}") from None
        info = parse_instance(doc, app)
        front.register(info)
        return web.Response(status=204)

    async def renew(request: web.Request) -> web.Response:
        view = front.renew(request.match_info["app"], request.match_info["id"])
        return render(request, "instance", view)

    async def cancel(request: web.Request) -> web.Response:
        front.cancel(request.match_info["app"], request.match_info["id"])
        return web.Response(status=200)

    async def status_override(request: web.Request) -> web.Response:
        value = request.query.get("value", "").upper()
        if value not in STATUSES:
            raise EurekaError(400, f"value: {value!r} is not one of {', '.join(STATUSES)}")
        front.set_status(request.match_info["app"], request.match_info["id"], value)
        return web.Response(status=200)

    async def clear_override(request: web.Request) -> web.Response:
        value = request.query.get("value", "").upper()
        if value and value not in STATUSES:
            raise EurekaError(400, f"value: {value!r} is not one of {', '.join(STATUSES)}")
        front.set_status(request.match_info["app"], request.match_info["id"], None, value if value and value != "UNKNOWN" else None)
        return web.Response(status=200)

    async def metadata(request: web.Request) -> web.Response:
        front.set_metadata(request.match_info["app"], request.match_info["id"], dict(request.query))
        return web.Response(status=200)

    async def apps(request: web.Request) -> web.Response:
        return render(request, "applications", front.applications())

    async def delta(request: web.Request) -> web.Response:
        return render(request, "applications", front.deltas())

    async def one_app(request: web.Request) -> web.Response:
        return render(request, "application", front.application(request.match_info["app"]))

    async def one_instance(request: web.Request) -> web.Response:
        return render(request, "instance", front.instance(request.match_info["app"], request.match_info["id"]))

    async def instance_by_id(request: web.Request) -> web.Response:
        return render(request, "instance", front.instance(None, request.match_info["id"]))

    async def vip(request: web.Request) -> web.Response:
        return render(request, "applications", front.applications(vip=request.match_info["vip"]))

    app = web.Application(middlewares=[eureka_errors], client_max_size=1024 * 1024)
    r = app.router
    for base in ("/eureka", "/eureka/v2"):
        r.add_get(f"{base}/apps", apps)
        r.add_get(f"{base}/apps/", apps)
        r.add_get(f"{base}/apps/delta", delta)
        r.add_get(f"{base}/apps/{{app}}", one_app)
        r.add_post(f"{base}/apps/{{app}}", register)
        r.add_get(f"{base}/apps/{{app}}/{{id}}", one_instance)
        r.add_put(f"{base}/apps/{{app}}/{{id}}", renew)
        r.add_delete(f"{base}/apps/{{app}}/{{id}}", cancel)
        r.add_put(f"{base}/apps/{{app}}/{{id}}/status", status_override)
        r.add_delete(f"{base}/apps/{{app}}/{{id}}/status", clear_override)
        r.add_put(f"{base}/apps/{{app}}/{{id}}/metadata", metadata)
        r.add_get(f"{base}/instances/{{id}}", instance_by_id)
        r.add_get(f"{base}/vips/{{vip}}", vip)
        r.add_get(f"{base}/svips/{{vip}}", vip)
    return app
