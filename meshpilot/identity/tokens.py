"""Join tokens: what lets a new node enrol as one service of one namespace.

An operator creates a token for (namespace, service) and hands its secret (``mpj.<id>.<random>``,
shown once) to the node's agent, which sends it with its first CSR. The store's ``join_tokens``
table keeps the token's record and the SHA-256 of its secret, never the secret. A token may be
single-use, or good for at most ``max_uses`` enrolments, and may expire; a revoked token is kept (marked) so lists show what happened to it.
Methods write to the store without waiting; the caller awaits ``store.sync()`` before it answers.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from typing import Any

from meshpilot import pki
from meshpilot.model import dns_label
from meshpilot.registry.store import Store

__all__ = ["MAX_USES", "TOKENS", "JoinTokens", "TokenRefused"]

TOKENS = "join_tokens"
MAX_USES = 1_000_000
_MAX_DESCRIPTION = 256
_MAX_TTL_S = 366 * 86_400.0


class TokenRefused(Exception):
    """A secret that does not enrol: ``reason`` is unknown, revoked, expired, already used (single
    use) or used up (``max_uses`` reached)."""

    def __init__(self, reason: str, token_id: str = "") -> None:
        super().__init__(f"join token {token_id or '(unparseable)'}: {reason}")
        self.reason = reason
        self.token_id = token_id


def _public(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "digest"}


class JoinTokens:
    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    def create(
        self, namespace: str, service: str, single_use: bool = False, ttl_s: float | None = None, description: str = "",
        max_uses: int | None = None,
    ) -> tuple[dict[str, Any], str]:
        """A new token: (its record, its secret). ``max_uses``: how many enrolments it may make (None:
        no bound). ValueError names the field that is wrong."""
        namespace = dns_label(namespace, "namespace")
        service = dns_label(service, "service")
        if ttl_s is not None and not (0 < ttl_s <= _MAX_TTL_S):
            raise ValueError(f"ttl_s must be more than 0 and at most {_MAX_TTL_S:.0f} seconds")
        if max_uses is not None and (isinstance(max_uses, bool) or not isinstance(max_uses, int)
                                     or not 1 <= max_uses <= MAX_USES):
            raise ValueError(f"max_uses must be a whole number from 1 to {MAX_USES}")
        if len(description) > _MAX_DESCRIPTION:
            raise ValueError(f"description must be at most {_MAX_DESCRIPTION} characters")
        now = self.clock()
        token_id, secret = pki.new_token()
        doc: dict[str, Any] = {
            "id": token_id,
            "namespace": namespace,
            "service": service,
            "single_use": bool(single_use),
            "max_uses": max_uses,
            "description": description,
            "created_at": now,
            "expires_at": None if ttl_s is None else now + ttl_s,
            "revoked": False,
            "used": 0,
            "last_used_at": None,
            "digest": pki.token_digest(secret),
        }
        self.store.write({(TOKENS, token_id): doc})
        return _public(doc), secret

    def list(self) -> list[dict[str, Any]]:
        """Every token's record (never a secret or its digest), oldest first."""
        docs = [doc for _k, doc in self.store.items(TOKENS) if isinstance(doc, dict)]
        return [_public(d) for d in sorted(docs, key=lambda d: (d.get("created_at", 0), d.get("id", "")))]

    def get(self, token_id: str) -> dict[str, Any] | None:
        doc = self.store.get(TOKENS, token_id)
        return _public(doc) if isinstance(doc, dict) else None

    def revoke(self, token_id: str) -> dict[str, Any]:
        """Mark a token revoked (LookupError when there is none); it enrols no node from now on."""
        doc = self.store.get(TOKENS, token_id) if isinstance(token_id, str) and token_id else None
        if not isinstance(doc, dict):
            raise LookupError(token_id)
        doc = {**doc, "revoked": True}
        self.store.write({(TOKENS, token_id): doc})
        return _public(doc)

    def check(self, secret: str) -> tuple[str, str]:
        """(namespace, service) the secret enrols as, without using it up; TokenRefused otherwise."""
        _doc, namespace, service = self._valid(secret)
        return namespace, service

    def redeem(self, secret: str) -> tuple[str, str]:
        """(namespace, service) the secret enrols as, counting the use (a single-use token is then
        spent); TokenRefused otherwise."""
        doc, namespace, service = self._valid(secret)
        doc = {**doc, "used": int(doc.get("used", 0)) + 1, "last_used_at": self.clock()}
        self.store.write({(TOKENS, doc["id"]): doc})
        return namespace, service

    def _valid(self, secret: str) -> tuple[dict[str, Any], str, str]:
        token_id = pki.token_id_of(secret)
        if token_id is None:
            raise TokenRefused("unknown")
        doc = self.store.get(TOKENS, token_id)
        if not isinstance(doc, dict) or not hmac.compare_digest(str(doc.get("digest", "")), pki.token_digest(secret)):
            raise TokenRefused("unknown", token_id)
        if doc.get("revoked"):
            raise TokenRefused("revoked", token_id)
        expires = doc.get("expires_at")
        if expires is not None and self.clock() >= float(expires):
            raise TokenRefused("expired", token_id)
        if doc.get("single_use") and int(doc.get("used", 0)) > 0:
            raise TokenRefused("already used", token_id)
        max_uses = doc.get("max_uses")
        if max_uses is not None and int(doc.get("used", 0)) >= int(max_uses):
            raise TokenRefused("used up", token_id)
        return doc, str(doc["namespace"]), str(doc["service"])
