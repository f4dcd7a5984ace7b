"""The mesh CA's management routes: join tokens, the trust bundle, roots and their rotation, and
the nodes enrolled. Each write is on disk (``store.sync()``) before it is answered. Token and root
administration needs an admin token when the API checks tokens."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from meshpilot.api.app import ApiError, json_body
from meshpilot.api.routes import Route
from meshpilot.identity.ca import ENROLMENTS, MeshCa, RootRefused, UnknownRoot
from meshpilot.identity.tokens import MAX_USES, JoinTokens
from meshpilot.model import dns_label, field_errors

__all__ = ["RootIn", "TokenIn", "identity_routes"]

log = logging.getLogger("meshpilot.identity")


class TokenIn(BaseModel):
    """A join token to create: the identity it enrols a node as, and how long and how often."""

    model_config = ConfigDict(extra="forbid")
    namespace: str
    service: str
    single_use: bool = False
    max_uses: int | None = Field(default=None, ge=1, le=MAX_USES, description="how many nodes it may enrol; null: no bound")
    ttl_s: float | None = Field(default=None, gt=0, le=366 * 86_400, description="seconds until it expires; null: never")
    description: str = Field(default="", max_length=256)

    @field_validator("namespace")
    @classmethod
    def _ns(cls, v: str) -> str:
        return dns_label(v, "namespace")

    @field_validator("service")
    @classmethod
    def _svc(cls, v: str) -> str:
        return dns_label(v, "service")


class RootIn(BaseModel):
    """A root to trust without its key (an operator's next root); no body, or no cert_pem: generate a new root."""

    model_config = ConfigDict(extra="forbid")
    cert_pem: str | None = Field(default=None, max_length=64 * 1024, description="one CA certificate, PEM; omitted: generate a new root")


_Body = TypeVar("_Body", bound=BaseModel)


def _parse(model: type[_Body], data: Any) -> _Body:
    try:
        return model.model_validate_json(json.dumps(data), strict=True)
    except ValidationError as exc:
        fields = field_errors(exc)
        raise ApiError(400, "; ".join(f"{f['field']}: {f['reason']}" for f in fields), fields) from None


class _Handlers:
    def __init__(self, ca: MeshCa, tokens: JoinTokens, enrolment_port: Callable[[], int],
                 on_removed: Callable[[str], None]) -> None:
        self.ca = ca
        self.tokens = tokens
        self.enrolment_port = enrolment_port  # the bound enrolment port, 0 before it listens
        self.on_removed = on_removed

    async def summary(self, request: web.Request) -> web.Response:
        s = self.ca.settings
        return web.json_response({
            "trust_domain": s.trust_domain,
            "enrolment_port": self.enrolment_port(),
            "workload_cert_ttl_s": s.workload_cert_ttl_s,
            "signing_root": self.ca.signing_serial,
            "bundle_pem": self.ca.bundle_pem().decode(),
        })

    async def create_token(self, request: web.Request) -> web.Response:
        body = _parse(TokenIn, await json_body(request))
        record, secret = self.tokens.create(body.namespace, body.service, body.single_use, body.ttl_s, body.description,
                                            max_uses=body.max_uses)
        await self.ca.store.sync()
        return web.json_response({**record, "secret": secret}, status=201)

    async def list_tokens(self, request: web.Request) -> web.Response:
        return web.json_response(self.tokens.list())

    async def revoke_token(self, request: web.Request) -> web.Response:
        token_id = request.match_info["id"]
        try:
            record = self.tokens.revoke(token_id)
        except LookupError:
            raise ApiError(404, f"id: no join token {token_id!r}", [{"field": "id", "reason": "not found"}]) from None
        await self.ca.store.sync()
        return web.json_response(record)

    async def bundle(self, request: web.Request) -> web.Response:
        return web.Response(body=self.ca.bundle_pem(), content_type="text/plain")

    async def list_roots(self, request: web.Request) -> web.Response:
        return web.json_response(self.ca.roots())

    async def add_root(self, request: web.Request) -> web.Response:
        cert_pem: bytes | None = None
        if await request.read():
            body = _parse(RootIn, await json_body(request))
            cert_pem = body.cert_pem.encode() if body.cert_pem is not None else None
        try:
            return web.json_response(await self.ca.add_root(cert_pem), status=201)
        except RootRefused as exc:
            raise ApiError(409, str(exc), [{"field": "cert_pem", "reason": str(exc)}]) from None
        except ValueError as exc:
            raise ApiError(400, str(exc), [{"field": "cert_pem", "reason": str(exc).removeprefix("cert_pem: ")}]) from None

    async def activate_root(self, request: web.Request) -> web.Response:
        serial = request.match_info["serial"].lower()
        try:
            return web.json_response(await self.ca.activate_root(serial))
        except UnknownRoot:
            raise _no_root(serial) from None
        except RootRefused as exc:
            raise ApiError(409, f"serial: {exc}", [{"field": "serial", "reason": str(exc)}]) from None

    async def remove_root(self, request: web.Request) -> web.Response:
        serial = request.match_info["serial"].lower()
        force = request.query.get("force", "").lower() in ("1", "true", "yes")
        try:
            await self.ca.remove_root(serial, force=force)
        except UnknownRoot:
            raise _no_root(serial) from None
        except RootRefused as exc:
            raise ApiError(409, f"serial: {exc}", [{"field": "serial", "reason": str(exc)}]) from None
        return web.json_response({"removed": serial, "roots": self.ca.roots()})

    async def list_enrolments(self, request: web.Request) -> web.Response:
        return web.json_response([doc for _k, doc in self.ca.store.items(ENROLMENTS)])

    async def remove_enrolment(self, request: web.Request) -> web.Response:
        node = request.match_info["node"]
        doc = self.ca.store.get(ENROLMENTS, node)
        if doc is None:
            raise ApiError(404, f"node: no enrolled node {node!r}", [{"field": "node", "reason": "not found"}])
        self.ca.store.write({}, deletes=((ENROLMENTS, node),))
        await self.ca.store.sync()
        # durable first: a node cut off now must not find its enrolment again after a crash
        log.info("event=enrolment_removed node=%r spiffe=%s", node, doc.get("spiffe") if isinstance(doc, dict) else "")
        self.on_removed(node)
        return web.json_response(doc)


def _no_root(serial: str) -> ApiError:
    return ApiError(404, f"serial: no trusted root {serial!r}", [{"field": "serial", "reason": "not found"}])


def identity_routes(ca: MeshCa, tokens: JoinTokens, enrolment_port: Callable[[], int] = lambda: 0,
                    on_removed: Callable[[str], None] = lambda _node: None) -> list[Route]:
    """The /v1/identity routes. ``enrolment_port()``: the enrolment listener's bound port;
    ``on_removed(node_id)``: called once a node's enrolment is removed and on disk, to cut it off."""
    h = _Handlers(ca, tokens, enrolment_port, on_removed)
    return [
        Route("GET", "/v1/identity", h.summary, "The mesh CA: trust domain, enrolment port, signing root, trust bundle"),
        Route("POST", "/v1/identity/tokens", h.create_token, "Create a join token (its secret is shown only in this answer)",
              TokenIn, scope="admin"),
        Route("GET", "/v1/identity/tokens", h.list_tokens, "List join tokens (never their secrets)", scope="admin"),
        Route("DELETE", "/v1/identity/tokens/{id}", h.revoke_token, "Revoke a join token", scope="admin"),
        Route("GET", "/v1/identity/bundle", h.bundle, "The trust bundle: every trusted root, PEM (text/plain)"),
        Route("GET", "/v1/identity/roots", h.list_roots, "List trusted roots and which one signs"),
        Route("POST", "/v1/identity/roots", h.add_root,
              "Generate a new root (no body), or trust an operator's CA certificate ({cert_pem}); trusted now, "
              "signing once activated", scope="admin"),
        Route("POST", "/v1/identity/roots/{serial}/activate", h.activate_root,
              "Make a trusted root the signing one (the previous stays trusted)", scope="admin"),
        Route("DELETE", "/v1/identity/roots/{serial}", h.remove_root,
              "Stop trusting a root (refused for the signing root and while nodes' current certificates "
              "chain to it; ?force=true overrides the latter)", scope="admin"),
        Route("GET", "/v1/identity/enrolments", h.list_enrolments, "List enrolled nodes and their current certificates",
              scope="admin"),
        Route("DELETE", "/v1/identity/enrolments/{node}", h.remove_enrolment,
              "Remove a node's enrolment: its streams are closed, it can no longer renew, and its node id may "
              "enrol again with a join token (as any identity)",
              scope="admin"),
    ]
