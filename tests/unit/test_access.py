"""Access tokens: scopes, hashed storage, expiry and revocation, and how the management API and the
Consul-compatible API honour them."""

from __future__ import annotations

import hmac
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from meshpilot.access import AccessTokens, Scope
from meshpilot.access import tokens as tokens_module
from meshpilot.registry.store import MemoryStore, SqliteStore


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_scopes_are_ordered_read_write_admin() -> None:
    assert Scope.read < Scope.write < Scope.admin, "expected read < write < admin"
    assert [Scope.named(n) for n in ("read", "write", "admin")] == [Scope.read, Scope.write, Scope.admin]
    with pytest.raises(ValueError, match="scope"):
        Scope.named("root")


def test_round_trip_through_sqlite_stores_only_the_digest(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    store = SqliteStore(path)
    tokens = AccessTokens(store, "boot")
    issued = tokens.create(Scope.write, "deploy bot", ttl_s=3600)
    assert issued.secret.startswith(f"mpa.{issued.token.id}."), f"expected mpa.<id>.<random>, got {issued.secret!r}"
    store.flush()
    store.close()
    raw = sqlite3.connect(path).execute("SELECT k, v FROM access_tokens").fetchall()
    assert [k for k, _v in raw] == [issued.token.id], f"expected one row keyed by the id, got {raw}"
    random_part = issued.secret.rsplit(".", 1)[1]
    assert random_part not in raw[0][1] and issued.secret not in raw[0][1], f"the secret is stored: {raw[0][1]}"
    assert json.loads(raw[0][1])["digest"] == tokens_module.digest(issued.secret)
    # a new process over the same file knows the token
    again = AccessTokens(SqliteStore(path), "boot")
    assert again.check(issued.secret) == Scope.write
    listed = again.list()
    assert [(t.id, t.scope, t.description) for t in listed] == [(issued.token.id, Scope.write, "deploy bot")]
    assert "secret" not in listed[0].public(0.0) and "digest" not in listed[0].public(0.0)


def test_bootstrap_token_is_admin_and_unknown_secrets_are_refused() -> None:
    tokens = AccessTokens(MemoryStore(), "boot")
    assert tokens.enabled and tokens.check("boot") == Scope.admin
    for bad in ("", "boot ", "Boot", "mpa.nope.x", "mpa..x", "x" * 10_000, "\udcff"):
        assert tokens.check(bad) is None, f"expected {bad[:20]!r} refused"
    issued = tokens.create(Scope.read)
    forged = issued.secret[:-1] + ("A" if issued.secret[-1] != "A" else "B")
    assert tokens.check(forged) is None, "a secret with the right id and a wrong random part must be refused"
    assert not AccessTokens(MemoryStore(), None).enabled, "without a bootstrap token authorisation is off"


def test_expiry() -> None:
    clock = Clock()
    tokens = AccessTokens(MemoryStore(), "boot", clock)
    issued = tokens.create(Scope.read, ttl_s=60)
    assert tokens.check(issued.secret) == Scope.read
    clock.now += 59.9
    assert tokens.check(issued.secret) == Scope.read
    clock.now += 0.1
    assert tokens.check(issued.secret) is None, "expected the token refused once its ttl has passed"
    assert tokens.list()[0].public(clock.now)["expired"] is True
    for ttl in (0, -1, 10**10):
        with pytest.raises(ValueError, match="ttl_s"):
            tokens.create(Scope.read, ttl_s=ttl)
    with pytest.raises(ValueError, match="description"):
        tokens.create(Scope.read, "d" * 257)


def test_revoke_takes_effect_at_once() -> None:
    store = MemoryStore()
    tokens = AccessTokens(store, "boot")
    other_door = AccessTokens(store, "boot")  # the Consul port builds its own over the same store
    a, b = tokens.create(Scope.admin), tokens.create(Scope.read)
    assert other_door.check(a.secret) == Scope.admin
    assert tokens.revoke(a.token.id) is not None
    assert tokens.check(a.secret) is None and other_door.check(a.secret) is None, "a revoked token must be refused at once"
    assert tokens.check(b.secret) == Scope.read
    assert tokens.revoke(a.token.id) is None, "revoking twice: nothing to revoke"
    assert [t.id for t in tokens.list()] == [b.token.id]


def test_check_compares_digests_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every comparison goes through hmac.compare_digest, on digests, never on the secrets."""
    tokens = AccessTokens(MemoryStore(), "boot")
    issued = tokens.create(Scope.write)
    seen: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(tokens_module.hmac, "compare_digest", spy)
    assert tokens.check(issued.secret) == Scope.write
    assert tokens.check("boot") == Scope.admin
    stored = tokens_module.digest(issued.secret)
    assert (tokens_module.digest(issued.secret), stored) in seen, f"expected the stored digest compared, got {seen}"
    for a, b in seen:
        assert len(a) == len(b) == 64 and issued.secret not in (a, b) and "boot" not in (a, b), f"compared more than digests: {a!r} {b!r}"


# ---- the management API ---------------------------------------------------------------------

WEB = {"name": "web", "ports": [{"name": "http", "port": 80}]}
BOOT = "boot-s3cret"


def _bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def _api(tmp: Path, routes: tuple[Any, ...] = ()) -> tuple[Any, TestClient]:
    from meshpilot.api.app import build_api
    from meshpilot.controlplane import ControlPlane
    from meshpilot.settings import Settings

    cp = ControlPlane(Settings(store=f"sqlite:{tmp / 'db.sqlite'}", token=BOOT))
    app = cp.api_app() if not routes else build_api(cp.settings, cp.registry, cp.xds, routes=list(routes))
    client = TestClient(TestServer(app))
    await client.start_server()
    return cp, client


async def _token(client: TestClient, scope: str, as_: str = BOOT, **extra: Any) -> dict[str, Any]:
    r = await client.post("/v1/access/tokens", json={"scope": scope, **extra}, headers=_bearer(as_))
    body = await r.json()
    assert r.status == 201, f"creating a {scope} token: expected 201, got {r.status} {body}"
    return dict(body)


async def test_a_stranger_gets_401_and_no_data(tmp_path: Path) -> None:
    cp, client = await _api(tmp_path)
    try:
        assert (await client.post("/v1/services", json=WEB, headers=_bearer(BOOT))).status == 201
        for path in ("/v1/services", "/v1/services/default/web", "/v1/instances", "/v1/proxies", "/v1/policies",
                     "/openapi.json", "/v1/access/tokens", "/v1/services/default/web/synced", "/no/such/path"):
            for headers in ({}, _bearer("wrong"), _bearer("mpa.0011223344556677.forged")):
                r = await client.get(path, headers=headers)
                text = await r.text()
                assert r.status == 401, f"GET {path} with {headers}: expected 401, got {r.status}: {text[:200]}"
                assert "240.240." not in text and '"web"' not in text, f"GET {path}: a refused read shows data: {text[:200]}"
                assert r.headers.get("WWW-Authenticate", "").startswith("Bearer"), f"GET {path}: expected a Bearer challenge"
                need = "scope admin" if path.startswith("/v1/access/") else "scope read"
                assert need in (await r.json())["error"], f"GET {path}: expected the message to name {need}, got {text}"
        for path in ("/healthz", "/metrics"):
            r = await client.get(path)
            assert r.status == 200, f"GET {path} stays open for probes and scrapers, got {r.status}"
        r = await client.get("/v1/wasm/mesh.wasm")  # Envoy fetches it without a token
        assert r.status in (200, 404) and r.status != 401, f"the filter module must stay open to Envoy, got {r.status}"
    finally:
        await client.close()
        cp.registry.store.close()


async def test_read_token_cannot_write_and_write_token_cannot_administer(tmp_path: Path) -> None:
    cp, client = await _api(tmp_path)
    try:
        reader = (await _token(client, "read", description="dashboards"))["secret"]
        writer = (await _token(client, "write"))["secret"]
        r = await client.get("/v1/services", headers=_bearer(reader))
        assert r.status == 200, f"a read token reads, got {r.status}"
        r = await client.post("/v1/services", json=WEB, headers=_bearer(reader))
        body = await r.json()
        assert r.status == 403 and "scope read" in body["error"] and "needs scope write" in body["error"], f"expected 403 naming both scopes, got {r.status} {body}"
        assert cp.registry.services() == [], "a refused write stored something"
        r = await client.post("/v1/services", json=WEB, headers=_bearer(writer))
        assert r.status == 201, f"a write token writes, got {r.status} {await r.text()}"
        r = await client.delete("/v1/services/default/web", headers=_bearer(reader))
        assert r.status == 403 and cp.registry.service("web.default") is not None
        for method, path, body in (("POST", "/v1/access/tokens", {"scope": "read"}), ("GET", "/v1/access/tokens", None),
                                   ("DELETE", "/v1/access/tokens/0011223344556677", None)):
            r = await client.request(method, path, json=body, headers=_bearer(writer))
            assert r.status == 403, f"{method} {path} with a write token: expected 403, got {r.status} {await r.text()}"
            assert "needs scope admin" in (await r.json())["error"]
        r = await client.post("/v1/access/tokens", json={"scope": "admin"}, headers=_bearer(reader))
        assert r.status == 403, f"a read token must not mint an admin token, got {r.status}"
    finally:
        await client.close()
        cp.registry.store.close()


async def test_admin_creates_lists_and_revokes_and_a_revoked_token_is_refused_at_once(tmp_path: Path) -> None:
    cp, client = await _api(tmp_path)
    try:
        admin = await _token(client, "admin", description="ops")
        made = await _token(client, "write", as_=admin["secret"], description="ci", ttl_s=600)
        assert made["scope"] == "write" and made["description"] == "ci" and made["expires"] == pytest.approx(made["created"] + 600)
        r = await client.get("/v1/access/tokens", headers=_bearer(admin["secret"]))
        listed = await r.json()
        assert [t["id"] for t in listed] == [admin["id"], made["id"]], f"expected both tokens listed, got {listed}"
        text = json.dumps(listed)
        assert "secret" not in text and "digest" not in text and made["secret"] not in text, f"a listing shows secrets: {text}"
        assert (await client.get("/v1/services", headers=_bearer(made["secret"]))).status == 200
        r = await client.delete(f"/v1/access/tokens/{made['id']}", headers=_bearer(admin["secret"]))
        assert r.status == 200 and (await r.json())["id"] == made["id"], f"revoking: got {r.status} {await r.text()}"
        r = await client.get("/v1/services", headers=_bearer(made["secret"]))
        assert r.status == 401, f"a revoked token must be refused at once, got {r.status}"
        r = await client.delete(f"/v1/access/tokens/{made['id']}", headers=_bearer(admin["secret"]))
        assert r.status == 404, f"revoking twice: expected 404, got {r.status}"
        r = await client.delete("/v1/access/tokens/bootstrap", headers=_bearer(BOOT))
        assert r.status == 400 and (await client.get("/v1/services", headers=_bearer(BOOT))).status == 200
        for bad, field in (({"scope": "root"}, "scope"), ({"scope": "read", "ttl_s": 0}, "ttl_s"), ({"scope": "read", "ttl_s": "60"}, "ttl_s"),
                           ({"scope": "read", "colour": 1}, "colour"), ({"scope": "read", "description": "d" * 257}, "description")):
            r = await client.post("/v1/access/tokens", json=bad, headers=_bearer(BOOT))
            got = await r.json()
            assert r.status == 400 and field in [f["field"] for f in got["fields"]], f"{bad}: expected 400 naming {field}, got {r.status} {got}"
    finally:
        await client.close()
        cp.registry.store.close()


async def test_a_route_declares_its_scope_and_administration_needs_admin_whatever_it_declares(tmp_path: Path) -> None:
    from aiohttp import web

    from meshpilot.api.routes import Route

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"hello": request.path})

    routes = (Route("GET", "/v1/public", hello, "open", scope="open"), Route("GET", "/v1/secret", hello, "admin read", scope="admin"),
              Route("POST", "/v1/identity/tokens", hello, "join token", scope="write"), Route("GET", "/v1/identity/roots", hello, "bundle"),
              Route("PUT", "/v1/identity/roots", hello, "replace roots"))
    cp, client = await _api(tmp_path, routes)
    try:
        writer = (await _token(client, "write"))["secret"]
        reader = (await _token(client, "read"))["secret"]
        assert (await client.get("/v1/public")).status == 200, "a route declared open needs no token"
        assert (await client.get("/v1/secret", headers=_bearer(writer))).status == 403
        assert (await client.get("/v1/secret", headers=_bearer(BOOT))).status == 200
        assert (await client.post("/v1/identity/tokens", headers=_bearer(writer))).status == 403, "join tokens need admin"
        assert (await client.post("/v1/identity/tokens", headers=_bearer(BOOT))).status == 200
        assert (await client.get("/v1/identity/roots", headers=_bearer(reader))).status == 200, "reading the roots needs read"
        assert (await client.put("/v1/identity/roots", headers=_bearer(writer))).status == 403, "writing the roots needs admin"
    finally:
        await client.close()
        cp.registry.store.close()


async def test_without_a_bootstrap_token_every_request_stays_open(tmp_path: Path) -> None:
    from meshpilot.controlplane import ControlPlane
    from meshpilot.settings import Settings

    cp = ControlPlane(Settings(store=f"sqlite:{tmp_path / 'db.sqlite'}"))
    client = TestClient(TestServer(cp.api_app()))
    await client.start_server()
    try:
        assert (await client.post("/v1/services", json=WEB)).status == 201
        assert (await client.get("/v1/services")).status == 200
    finally:
        await client.close()
        cp.registry.store.close()


def test_openapi_document_says_what_each_operation_needs() -> None:
    from meshpilot.api.app import openapi_document

    doc = openapi_document(token=True)
    reads = doc["paths"]["/v1/services"]["get"]
    assert reads["security"] == [{"bearer": []}] and "401" in reads["responses"] and reads["x-meshpilot-scope"] == "read"
    writes = doc["paths"]["/v1/services"]["post"]
    assert writes["x-meshpilot-scope"] == "write" and {"401", "403"} <= set(writes["responses"])
    admin = doc["paths"]["/v1/access/tokens"]["post"]
    assert admin["x-meshpilot-scope"] == "admin" and "403" in admin["responses"]
    metrics_op = doc["paths"]["/metrics"]["get"]
    assert "security" not in metrics_op and metrics_op["x-meshpilot-scope"] == "open"
    assert doc["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    off = openapi_document(token=False)
    assert "security" not in off["paths"]["/v1/services"]["get"] and "401" not in off["paths"]["/v1/services"]["post"]["responses"]


# ---- the Consul-compatible API ----------------------------------------------------------------


async def _consul(tokens_on: bool = True) -> tuple[AccessTokens, TestClient]:
    from meshpilot.consul.agent import ConsulAgent
    from meshpilot.consul.http import build_consul_app
    from meshpilot.registry import Registry

    store = MemoryStore()
    tokens = AccessTokens(store, BOOT if tokens_on else None)
    client = TestClient(TestServer(build_consul_app(ConsulAgent(Registry(store)), tokens)))
    await client.start_server()
    return tokens, client


REGISTER = {"Name": "web", "ID": "web-1", "Port": 8080}


async def test_consul_read_token_reads_but_cannot_register() -> None:
    tokens, client = await _consul()
    try:
        reader = tokens.create(Scope.read, "sdk").secret
        writer = tokens.create(Scope.write).secret
        r = await client.put("/v1/agent/service/register", json=REGISTER, headers={"X-Consul-Token": reader})
        text = await r.text()
        assert r.status == 403 and "Permission denied" in text and "service:write" in text, f"expected Consul's 403, got {r.status} {text!r}"
        r = await client.get("/v1/catalog/services", headers={"X-Consul-Token": reader})
        assert r.status == 200 and "web" not in await r.json(), "a refused registration registered"
        for how in ({"headers": {"X-Consul-Token": writer}}, {"params": {"token": writer}}, {"headers": _bearer(writer)}):
            r = await client.put("/v1/agent/service/register", json=REGISTER, **how)
            assert r.status == 200, f"a write token ({how}) registers, got {r.status} {await r.text()}"
        r = await client.get("/v1/catalog/services", params={"token": reader})
        assert r.status == 200 and "web" in await r.json(), "a read token reads the catalog"
        for method, path in (("PUT", "/v1/kv/a"), ("PUT", "/v1/session/create"), ("DELETE", "/v1/kv/a")):
            r = await client.request(method, path, headers={"X-Consul-Token": reader})
            assert r.status == 403, f"{method} {path} with a read token: expected 403, got {r.status}"
        assert (await client.put("/v1/kv/a", data=b"1", headers={"X-Consul-Token": writer})).status == 200
        assert (await client.get("/v1/kv/a", headers={"X-Consul-Token": reader})).status == 200
        r = await client.get("/v1/catalog/services")
        assert r.status == 403 and "anonymous" in await r.text(), f"no token: expected Consul's anonymous 403, got {r.status}"
        r = await client.get("/v1/catalog/services", headers={"X-Consul-Token": "nope"})
        assert r.status == 403 and "ACL not found" in await r.text()
        assert (await client.get("/v1/status/leader")).status == 200, "status stays open"
    finally:
        await client.close()


async def test_consul_token_self_describes_the_caller_and_acl_needs_admin() -> None:
    tokens, client = await _consul()
    try:
        issued = tokens.create(Scope.read, "billing app", ttl_s=3600)
        r = await client.get("/v1/acl/token/self", headers={"X-Consul-Token": issued.secret})
        body = await r.json()
        assert r.status == 200, f"expected 200, got {r.status} {body}"
        assert body["AccessorID"] == issued.token.id and body["Description"] == "billing app" and body["SecretID"] == issued.secret
        assert [p["Name"] for p in body["Policies"]] == ["meshpilot-read"], f"expected the policy to name the scope, got {body['Policies']}"
        assert "ExpirationTime" in body
        r = await client.get("/v1/acl/token/self", headers={"X-Consul-Token": BOOT})
        assert [p["Name"] for p in (await r.json())["Policies"]] == ["meshpilot-admin"]
        r = await client.get("/v1/acl/token/self")
        assert r.status == 403, f"token/self without a token: expected 403, got {r.status}"
        r = await client.get("/v1/acl/tokens", headers={"X-Consul-Token": tokens.create(Scope.write).secret})
        assert r.status == 403 and "acl:write" in await r.text(), "the rest of /v1/acl needs admin"
        tokens.revoke(issued.token.id)
        r = await client.get("/v1/acl/token/self", headers={"X-Consul-Token": issued.secret})
        assert r.status == 403 and "ACL not found" in await r.text(), "a revoked token is refused at once"
    finally:
        await client.close()


async def test_consul_without_a_bootstrap_token_is_open_and_has_no_acls() -> None:
    _tokens, client = await _consul(tokens_on=False)
    try:
        assert (await client.put("/v1/agent/service/register", json=REGISTER)).status == 200
        r = await client.get("/v1/acl/token/self")
        assert r.status == 401 and "ACL support disabled" in await r.text(), f"expected Consul's answer with ACLs off, got {r.status}"
    finally:
        await client.close()


# ---- the Eureka-compatible API ----------------------------------------------------------------


async def test_eureka_takes_the_same_scopes_as_bearer_or_basic_password() -> None:
    import base64

    from meshpilot.eureka.front import EurekaFront
    from meshpilot.eureka.http import build_eureka_app
    from meshpilot.registry import Registry

    store = MemoryStore()
    tokens = AccessTokens(store, BOOT)
    client = TestClient(TestServer(build_eureka_app(EurekaFront(Registry(store)), tokens)))
    await client.start_server()
    instance = {"instance": {"instanceId": "i-1", "hostName": "h", "app": "BILLING", "ipAddr": "127.0.0.1", "status": "UP",
                             "port": {"$": 8080, "@enabled": "true"}, "dataCenterInfo": {"name": "MyOwn"}}}

    def basic(secret: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"app:{secret}".encode()).decode(), "Accept": "application/json"}

    try:
        reader, writer = tokens.create(Scope.read).secret, tokens.create(Scope.write).secret
        r = await client.get("/eureka/apps", headers={"Accept": "application/json"})
        assert r.status == 401 and "Basic" in r.headers.get("WWW-Authenticate", ""), f"a fetch without a token: expected a 401 challenge, got {r.status}"
        r = await client.post("/eureka/apps/BILLING", json=instance, headers=basic(reader))
        assert r.status == 403, f"a read token must not register, got {r.status} {await r.text()}"
        r = await client.post("/eureka/apps/BILLING", json=instance, headers=basic(writer))
        assert r.status == 204, f"a write token registers (Basic password), got {r.status} {await r.text()}"
        r = await client.get("/eureka/apps/BILLING", headers={**_bearer(reader), "Accept": "application/json"})
        assert r.status == 200 and "i-1" in await r.text(), f"a read token fetches, got {r.status}"
        r = await client.get("/eureka/apps/BILLING", headers=basic("wrong"))
        assert r.status == 401 and "i-1" not in await r.text()
    finally:
        await client.close()
