"""Access tokens for the HTTP front doors: who may read, who may write, who may administer.

The management API and the Consul-compatible API ask one question of a caller's secret: what may
it do (``check``). A token has a scope, ordered ``read < write < admin``, an id that names it in
listings and revocations, a description and an optional expiry. Only the sha256 digest of its
secret is stored (table ``access_tokens``, keyed by id); the secret itself is shown once, when the
token is created, and cannot be read back. A secret reads ``mpa.<id>.<random>``: the id finds the
record, and the digests are compared with ``hmac.compare_digest``, so how long a comparison takes
says nothing about the stored digest. The operator's bootstrap token (``settings.token``) is an
admin token that lives only in the settings; while it is unset, authorisation is off (``enabled``)
and every door stays open, as before tokens had scopes.

The object keeps nothing in memory besides the bootstrap digest: each check reads the store, so
several doors built over one store agree at once on a new or a revoked token.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from meshpilot.registry.store import Store

__all__ = ["BOOTSTRAP_ID", "TABLE", "AccessToken", "AccessTokens", "Issued", "Scope"]

TABLE = "access_tokens"
BOOTSTRAP_ID = "bootstrap"
PREFIX = "mpa"
MAX_DESCRIPTION = 256
MAX_TTL_S = 10 * 366 * 86400
_MAX_SECRET = 512  # longer is no secret of ours: refused before hashing


class Scope(IntEnum):
    """What a token may do; a higher scope may do everything a lower one may."""

    read = 1
    write = 2
    admin = 3

    @classmethod
    def named(cls, name: str) -> Scope:
        """The scope called ``name`` (``read``, ``write`` or ``admin``); ValueError otherwise."""
        try:
            return cls[name]
        except KeyError:
            raise ValueError(f"scope: {name!r} is not one of read, write, admin") from None


@dataclass(frozen=True, slots=True)
class AccessToken:
    """A token as listed: everything but its secret (``expires``: unix time, None for never)."""

    id: str
    scope: Scope
    description: str
    created: float
    expires: float | None = None

    def expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires

    def public(self, now: float) -> dict[str, Any]:
        """The token as the API shows it."""
        return {"id": self.id, "scope": self.scope.name, "description": self.description,
                "created": self.created, "expires": self.expires, "expired": self.expired(now)}


@dataclass(frozen=True, slots=True)
class Issued:
    """A token just created, with its secret: the only time the secret is known."""

    token: AccessToken
    secret: str


def digest(secret: str) -> str:
    """The sha256 (hex) of a secret, as stored; any string, lone surrogates included, has one."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def _id_of(secret: str) -> str | None:
    prefix, _, rest = secret.partition(".")
    token_id, _, random = rest.partition(".")
    if prefix != PREFIX or not token_id or not random:
        return None
    return token_id


def _record(token: AccessToken, secret_digest: str) -> dict[str, Any]:
    return {"id": token.id, "digest": secret_digest, "scope": token.scope.name, "description": token.description,
            "created": token.created, "expires": token.expires}


def _token(rec: dict[str, Any]) -> AccessToken:
    return AccessToken(id=str(rec["id"]), scope=Scope.named(str(rec["scope"])), description=str(rec.get("description", "")),
                       created=float(rec.get("created", 0.0)), expires=None if rec.get("expires") is None else float(rec["expires"]))


class AccessTokens:
    """The tokens in ``store`` and the operator's ``bootstrap_token`` (admin; None: authorisation off).
    ``clock``: the time used for creation and expiry (unix seconds)."""

    def __init__(self, store: Store, bootstrap_token: str | None, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._bootstrap = digest(bootstrap_token) if bootstrap_token else None
        self._clock = clock

    @property
    def enabled(self) -> bool:
        """Whether the doors ask for tokens: the bootstrap token is set."""
        return self._bootstrap is not None

    def now(self) -> float:
        return self._clock()

    # ---- checking ---------------------------------------------------------------------------

    def lookup(self, secret: str) -> AccessToken | None:
        """The valid token whose secret this is (the bootstrap token as id ``bootstrap``), else None:
        unknown, revoked, expired or malformed."""
        if not secret or len(secret) > _MAX_SECRET:
            return None
        got = digest(secret)
        if self._bootstrap is not None and hmac.compare_digest(got, self._bootstrap):
            return AccessToken(BOOTSTRAP_ID, Scope.admin, "the operator's bootstrap token (settings.token)", 0.0)
        token_id = _id_of(secret)
        if token_id is None:
            return None
        rec = self._store.get(TABLE, token_id)
        if not isinstance(rec, dict) or not hmac.compare_digest(got, str(rec.get("digest", ""))):
            return None
        token = _token(rec)
        return None if token.expired(self._clock()) else token

    def check(self, secret: str) -> Scope | None:
        """The scope of a valid secret, else None."""
        token = self.lookup(secret)
        return None if token is None else token.scope

    # ---- administering ----------------------------------------------------------------------

    def create(self, scope: Scope, description: str = "", ttl_s: float | None = None) -> Issued:
        """A new token; only its digest is stored. ValueError names a bad argument."""
        if len(description) > MAX_DESCRIPTION:
            raise ValueError(f"description: at most {MAX_DESCRIPTION} characters")
        if ttl_s is not None and not 0 < ttl_s <= MAX_TTL_S:
            raise ValueError(f"ttl_s: between 1 s and {MAX_TTL_S} s (ten years), or absent for no expiry")
        now = self._clock()
        token_id = secrets.token_hex(8)
        secret = f"{PREFIX}.{token_id}.{secrets.token_urlsafe(32)}"
        token = AccessToken(token_id, Scope(scope), description, now, None if ttl_s is None else now + ttl_s)
        self._store.write({(TABLE, token_id): _record(token, digest(secret))})
        return Issued(token, secret)

    def list(self) -> builtins.list[AccessToken]:
        """Every stored token (expired ones too, until revoked), oldest first."""
        tokens = [_token(rec) for _key, rec in self._store.items(TABLE) if isinstance(rec, dict)]
        return sorted(tokens, key=lambda t: (t.created, t.id))

    def revoke(self, token_id: str) -> AccessToken | None:
        """Delete the token: refused from the next check on. None when there is no such token."""
        rec = self._store.get(TABLE, token_id)
        if not isinstance(rec, dict):
            return None
        self._store.write({}, ((TABLE, token_id),))
        return _token(rec)
