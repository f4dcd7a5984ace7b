"""The console in a real browser (Debian's headless Chromium, driven by Playwright) against a running
control plane with real sidecar Envoys: sign-in with an API token (a wrong or revoked one is sent
back with the API's reason), the services page with SDK (Consul) and mesh (HDS) instances side by
side, the proxies page with ACKed versions and Envoy's own NACK text, values from the API shown as
text, and a RoutingPolicy edited in the console (preview diff, refused field errors, apply) that
changes where a sidecar sends traffic. Screenshots of each page go to docs/console/."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT, control_plane, envoy, free_port, http, http_backend, sidecar_bootstrap, through, tmpdir, wait_until

playwright = pytest.importorskip("playwright.sync_api", reason="the console's browser tests need playwright (pip install -e '.[test]')")

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "console-e2e-bootstrap-t0ken"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
# where the screenshots go: docs/console when asked (MESHPILOT_CONSOLE_SHOTS=docs, to refresh the
# docs' pictures), else a temporary directory, so a test run leaves the tree as it was
_SHOTS: list[Path] = []
HOSTILE = '<img src=x onerror="window.__pwned=1">'
HOSTILE_ZONE = "<script>window.__pwned=2</script>"
BROKEN_CLUSTER = {  # Envoy refuses it (not an IP address): its NACK text is what the proxies page shows
    "name": "console-broken", "type": "STATIC", "connect_timeout": "1s",
    "load_assignment": {"cluster_name": "console-broken",
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "not-an-ip", "port_value": 1}}}}]}]},
}
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
SPLIT = {"name": "reviews-split", "service": "reviews",
         "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}],
         "routes": [{"destinations": [{"subset": "v1"}]}]}


@dataclass
class Mesh:
    cp: Any
    web: Any  # the calling sidecar (web-1)
    outbound: int
    reviews_mesh: Any  # the sidecar that registered reviews-mesh-1 over HDS
    page_errors: list[str] = field(default_factory=list)

    @property
    def base(self) -> str:
        return self.cp.api

    def api(self, method: str, path: str, body: Any = None, token: str = TOKEN) -> Any:
        status, data = self.cp.call(method, path, body, {"Authorization": f"Bearer {token}"})
        assert status < 300, f"expected {method} {path} to succeed, got {status}: {data}"
        return data

    def server_behind_reviews(self) -> str:
        status, body = through(self.outbound, "reviews")
        return str(body.get("server")) if status == 200 and isinstance(body, dict) else f"status {status}"


def _consul_register(cp: Any, body: dict[str, Any]) -> None:
    url = f"http://127.0.0.1:{cp.ports['consul']}/v1/agent/service/register"
    status, data, _ = http("PUT", url, body, {"X-Consul-Token": TOKEN})
    assert status == 200, f"expected the Consul registration to succeed, got {status}: {data}"


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    if not CHROMIUM.exists():
        pytest.fail(f"expected Debian's chromium at {CHROMIUM} (run.sh installs it)")
    workdir = tmpdir("meshpilot-console-")
    with contextlib.ExitStack() as stack:
        cp = stack.enter_context(control_plane(workdir, extra=["--token", TOKEN, "--consul-port", "0", "--debug-api"]))
        v1 = stack.enter_context(http_backend("reviews-v1"))
        v2 = stack.enter_context(http_backend("reviews-v2"))

        def api(method: str, path: str, body: Any = None) -> None:
            status, data = cp.call(method, path, body, ADMIN)
            assert status < 300, f"expected {method} {path} to succeed, got {status}: {data}"

        api("POST", "/v1/services", {"name": "reviews", "ports": [{"name": "http", "port": 80}]})
        api("POST", "/v1/services", {"name": "ratings", "namespace": "shop", "ports": [{"name": "http", "port": 8080}]})
        api("POST", "/v1/services/shop/ratings/instances", {"id": "ratings-1", "address": "127.0.0.2", "ports": {"http": 9080},
                                                            "zone": "zone-c", "labels": {"version": "v3"}})
        # an SDK app: registered through the Consul-compatible API
        _consul_register(cp, {"ID": "reviews-v1", "Name": "reviews", "Address": "127.0.0.1", "Port": v1.port,
                              "Meta": {"version": "v1", "zone": "zone-a"}})
        # values a page must show as text, never as markup
        api("POST", "/v1/services", {"name": "xss-probe", "ports": [{"name": "http", "port": 80}]})
        api("POST", "/v1/services/default/xss-probe/instances", {"id": "probe-1", "address": "127.0.0.9", "ports": {"http": 9},
                                                                 "zone": HOSTILE_ZONE, "labels": {"version": HOSTILE}})
        api("PUT", "/v1/instances/probe-1/health", {"status": "warning", "check_id": "probe", "output": HOSTILE})
        api("POST", "/v1/policies/RateLimitPolicy", {"name": "probe-limit", "service": "xss-probe", "rate": 100, "burst": 10,
                                                     "description": HOSTILE})
        api("POST", "/v1/policies/RoutingPolicy", SPLIT)
        # a mesh instance: a sidecar that registers its app (reviews-v2) over HDS
        inbound = free_port()
        boot = sidecar_bootstrap("reviews-mesh-1", cp.xds_port, service="reviews", inbound_port=inbound, app_port=v2.port,
                                 zone="zone-b", hds=True)
        boot["node"]["metadata"]["LABELS"] = {"version": "v2"}
        boot["node"]["metadata"]["HEALTH_CHECK"] = {"kind": "http", "path": "/", "interval_s": 0.2, "healthy_threshold": 1}
        reviews_mesh = stack.enter_context(envoy(workdir, boot, name="reviews-mesh-1"))
        stack.callback(lambda: cp.call("DELETE", "/v1/instances/reviews-mesh-1", None, ADMIN))

        def mesh_health() -> str:
            status, body = cp.call("GET", "/v1/instances/reviews-mesh-1", None, ADMIN)
            return str(body.get("health")) if status == 200 else f"status {status}"

        seen: list[str] = []
        try:
            wait_until(lambda: seen.append(mesh_health()) or seen[-1] == "passing", 20, what="reviews-mesh-1 registered over HDS and passing")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the API showed its health as {sorted(set(seen))}") from None
        outbound = free_port()
        web = stack.enter_context(envoy(workdir, sidecar_bootstrap("web-1", cp.xds_port, service="web", outbound_port=outbound), name="web-1"))
        m = Mesh(cp, web, outbound, reviews_mesh)
        wait_until(lambda: m.server_behind_reviews() == "reviews-v1", 20, what="web-1 routing reviews to its v1 subset")
        yield m


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])  # root in CI: no user namespaces
        try:
            yield b
        finally:
            b.close()


# the browser logs every refused request; the tests make the API refuse some on purpose
_REFUSAL = re.compile(r"^Failed to load resource: the server responded with a status of (400|401|403) ")


@contextlib.contextmanager
def watched_tab(browser: Any, height: int = 900) -> Iterator[Any]:
    """A fresh tab (its own sessionStorage); what the page logs as an error (a CSP violation, a
    script exception, a failed request other than a refusal) fails the test."""
    context = browser.new_context(viewport={"width": 1360, "height": height})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(f"exception: {exc}"))
    pg.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" and not _REFUSAL.match(msg.text) else None)
    try:
        yield pg
    finally:
        context.close()
    assert errors == [], f"expected no script errors or CSP violations in the page, got {errors}"


@pytest.fixture
def page(browser: Any, mesh: Mesh) -> Iterator[Any]:
    with watched_tab(browser) as pg:
        yield pg


def sign_in_at(pg: Any, base: str, token: str) -> None:
    """Sign in to the console at ``base`` and wait for the first page."""
    pg.goto(f"{base}/ui/")
    pg.fill("#token", token)
    pg.click("#signin button[type=submit]")
    pg.wait_for_selector("#services-page", timeout=10_000)


def sign_in(pg: Any, mesh: Mesh, token: str = TOKEN) -> None:
    sign_in_at(pg, mesh.base, token)


def shot(pg: Any, name: str) -> None:
    if not _SHOTS:
        _SHOTS.append(ROOT / "docs" / "console" if os.environ.get("MESHPILOT_CONSOLE_SHOTS") == "docs" else tmpdir("meshpilot-console-shots-"))
    _SHOTS[0].mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(_SHOTS[0] / name), full_page=True)


def test_the_ui_is_served_with_a_strict_csp_and_no_data_without_a_token(mesh: Mesh) -> None:
    status, body, headers = http("GET", f"{mesh.base}/ui/")
    assert status == 200 and "<script type=\"module\" src=\"/ui/app.js\">" in body, f"expected the console's page, got {status}: {body[:300]}"
    assert "default-src 'self'" in headers.get("Content-Security-Policy", ""), f"expected a strict CSP, got {headers}"
    status, data, _ = http("GET", f"{mesh.base}/v1/services")
    assert status == 401 and "reviews" not in json.dumps(data), f"expected no data without a token, got {status}: {data}"


def test_a_wrong_token_is_refused_at_sign_in(page: Any, mesh: Mesh) -> None:
    page.goto(f"{mesh.base}/ui/")
    page.fill("#token", "not-a-token")
    page.click("#signin button[type=submit]")
    page.wait_for_selector("#signin-status .notice.error")
    status = page.inner_text("#signin-status")
    assert "refused this token" in status and "not valid" in status, f"expected the API's refusal on the sign-in page, got {status!r}"
    assert page.is_hidden("#nav"), "expected no navigation before sign-in"
    assert page.evaluate("sessionStorage.length") == 0, "expected nothing kept from a refused sign-in"
    shot(page, "signin.png")


def test_a_revoked_token_sends_the_user_back_to_sign_in_with_the_reason(page: Any, mesh: Mesh) -> None:
    issued = mesh.api("POST", "/v1/access/tokens", {"scope": "read", "description": "console e2e"})
    sign_in(page, mesh, issued["secret"])
    mesh.api("DELETE", f"/v1/access/tokens/{issued['id']}")
    page.click("#nav a[data-page=proxies]")
    page.wait_for_selector("#signin-status .notice.error", timeout=10_000)
    status = page.inner_text("#signin-status")
    assert "Signed out" in status and "not valid" in status, f"expected the sign-in page to say why, got {status!r}"
    assert page.evaluate("sessionStorage.getItem('meshpilot.console.token')") is None, "expected the refused token forgotten"
    assert "reviews-mesh-1" not in page.inner_text("body"), "expected no data shown after the 401"


def test_services_show_sdk_and_mesh_instances_side_by_side(page: Any, mesh: Mesh) -> None:
    sign_in(page, mesh)
    card = page.locator("article.service[data-service=reviews]")
    sdk = card.locator("section[data-group='SDK instances']").inner_text()
    meshed = card.locator("section[data-group='Mesh instances']").inner_text()
    for want in ("reviews-v1", "consul", "127.0.0.1", "zone-a", "v1", "passing"):
        assert want in sdk, f"expected {want!r} among reviews' SDK instances, got {sdk!r}"
    inst = mesh.api("GET", "/v1/instances/reviews-mesh-1")
    for want in ("reviews-mesh-1", "mesh", inst["address"], str(inst["ports"]["http"]), "zone-b", "v2", "passing", inst["checks"][0]["id"]):
        assert want in meshed, f"expected {want!r} among reviews' mesh instances, got {meshed!r}"
    assert "reviews-mesh-1" not in sdk and "reviews-v1" not in meshed, f"expected each instance on its own side, got {sdk!r} / {meshed!r}"
    vip = mesh.api("GET", "/v1/services/default/reviews")["vip"]
    assert vip in card.locator("header").inner_text(), f"expected reviews' VIP {vip} in its header"
    shot(page, "services.png")
    page.select_option("#namespace", "shop")
    page.wait_for_selector("article.service[data-service=ratings]")
    shown = page.locator("article.service").evaluate_all("els => els.map(e => e.dataset.namespace + '/' + e.dataset.service)")
    assert shown == ["shop/ratings"], f"expected only namespace shop's services, got {shown}"
    assert "zone-c" in page.inner_text("#services-page"), "expected ratings-1's zone"


def test_proxies_show_acked_versions_and_envoys_nack_text(page: Any, mesh: Mesh) -> None:
    mesh.api("POST", "/v1/debug/resources", {"type_url": CLUSTER_TYPE, "name": "console-broken", "resource": BROKEN_CLUSTER, "scope": "web-1"})
    try:
        def nack() -> Any:
            return next((p["last_nack"] for p in mesh.api("GET", "/v1/proxies") if p["node_id"] == "web-1" and p["last_nack"]), None)

        recorded = wait_until(nack, 10, what="web-1's NACK of the broken cluster recorded")
    finally:
        status, data = mesh.cp.call("DELETE", f"/v1/debug/resources?type_url={CLUSTER_TYPE}&name=console-broken&scope=web-1", None, ADMIN)
        assert status == 200, f"expected the broken cluster taken back, got {status}: {data}"
    sign_in(page, mesh)
    page.click("#nav a[data-page=proxies]")
    page.wait_for_selector("#proxies-page")
    rows = {r.locator("code.node").inner_text(): r for r in page.locator("#proxies-page tbody tr:has(code.node)").all()}
    assert {"web-1", "reviews-mesh-1"} <= set(rows), f"expected both Envoys listed, got {sorted(rows)}"
    shown_error = rows["web-1"].locator("pre.nack-error").inner_text()
    assert shown_error == recorded["error"] and "not-an-ip" in shown_error, f"expected Envoy's NACK text {recorded['error']!r}, got {shown_error!r}"
    web = next(p for p in mesh.api("GET", "/v1/proxies") if p["node_id"] == "web-1")
    text = rows["web-1"].inner_text()
    for type_url, version in web["acked"].items():
        assert version and version in text, f"expected web-1's ACKed {type_url.rsplit('.', 1)[-1]} version {version!r} shown, got {text!r}"
    assert "reviews" in rows["reviews-mesh-1"].inner_text(), "expected reviews-mesh-1's service"
    shot(page, "proxies.png")


def test_values_from_the_api_render_as_text(page: Any, mesh: Mesh) -> None:
    sign_in(page, mesh)
    probe = page.locator("article.service[data-service=xss-probe]").inner_text()
    for want in (HOSTILE, HOSTILE_ZONE):
        assert want in probe, f"expected {want!r} shown as text on the services page, got {probe!r}"
    page.click("#nav a[data-page=policies]")
    page.wait_for_selector("section.kind[data-kind=RateLimitPolicy]")
    limits = page.inner_text("section.kind[data-kind=RateLimitPolicy]")
    assert HOSTILE in limits, f"expected the policy's description shown as text, got {limits!r}"
    assert page.locator("main img, main script").count() == 0, "expected no element made from an API value"
    assert page.evaluate("window.__pwned") is None, "expected no script from an API value to have run"


def test_a_refused_policy_shows_the_apis_field_errors_and_stores_nothing(page: Any, mesh: Mesh) -> None:
    before = mesh.api("GET", "/v1/policies/RoutingPolicy/default/reviews-split")
    sign_in(page, mesh)
    page.goto(f"{mesh.base}/ui/#/policies/RoutingPolicy/default/reviews-split")
    page.wait_for_selector("#policy-text")  # shown once it holds the stored policy's text (the CSP forbids wait_for_function's eval)
    text = page.input_value("#policy-text")
    page.fill("#policy-text", re.sub(r"subset: v\d", "subset: v3", text))
    page.click("#apply-button")
    page.wait_for_selector("#field-errors li")
    item = page.locator("#field-errors li[data-field='routes.0.destinations.0.subset']")
    assert item.count() == 1, f"expected the API's field error on routes.0.destinations.0.subset, got {page.inner_text('#errors')!r}"
    assert "no subset named 'v3'" in item.inner_text(), f"expected the API's reason, got {item.inner_text()!r}"
    shot(page, "policy-refused.png")
    after = mesh.api("GET", "/v1/policies/RoutingPolicy/default/reviews-split")
    assert after == before, f"expected the stored policy unchanged by a refused apply, got {after} (was {before})"


def test_a_policy_edited_in_the_console_reaches_envoy(page: Any, mesh: Mesh) -> None:
    assert mesh.server_behind_reviews() == "reviews-v1", "expected web-1 to send reviews to v1 before the edit"
    sign_in(page, mesh)
    page.click("#nav a[data-page=policies]")
    page.wait_for_selector("section.kind[data-kind=RoutingPolicy]")
    shot(page, "policies.png")
    page.click("section.kind[data-kind=RoutingPolicy] a:text-is('reviews-split')")
    page.wait_for_selector("#policy-text")
    text = page.input_value("#policy-text")
    edited = text.replace("subset: v1", "subset: v2")
    assert edited != text, f"expected a destination to edit in {text!r}"
    page.fill("#policy-text", edited)
    page.click("#preview-button")
    page.wait_for_selector("#diff")
    removed = page.locator("#diff span.del").all_inner_texts()
    added = page.locator("#diff span.add").all_inner_texts()
    assert any("subset: v1" in line for line in removed) and any("subset: v2" in line for line in added), \
        f"expected the preview to show v1 replaced by v2, got - {removed} + {added}"
    shot(page, "policy-preview.png")
    page.click("#apply-button")
    page.wait_for_selector("#errors .notice.ok")
    stored = mesh.api("GET", "/v1/policies/RoutingPolicy/default/reviews-split")
    assert stored["routes"][0]["destinations"][0]["subset"] == "v2", f"expected the edit stored, got {stored}"

    def routes_to_v2() -> bool:
        dump = json.dumps(mesh.web.config_dump("dynamic_route_configs"))
        return "|v2|reviews." in dump and "|v1|reviews." not in dump

    wait_until(routes_to_v2, 10, what="web-1's route configuration sending reviews to the v2 subset cluster")
    wait_until(lambda: mesh.server_behind_reviews() == "reviews-v2", 10, what="traffic from web-1 reaching reviews-v2")
    servers = {mesh.server_behind_reviews() for _ in range(10)}
    assert servers == {"reviews-v2"}, f"expected every request to reach reviews-v2 (the mesh instance) after the edit, got {servers}"


def test_a_read_token_sees_a_policy_as_json_but_cannot_apply_it(page: Any, mesh: Mesh) -> None:
    issued = mesh.api("POST", "/v1/access/tokens", {"scope": "read", "description": "console e2e, read only"})
    try:
        before = mesh.api("GET", "/v1/policies/RoutingPolicy/default/reviews-split")
        sign_in(page, mesh, issued["secret"])
        page.goto(f"{mesh.base}/ui/#/policies/RoutingPolicy/default/reviews-split")
        page.wait_for_selector("#policy-text")
        page.select_option("#format", "json")
        wait_until(lambda: page.input_value("#policy-text").lstrip().startswith("{"), 10, what="the policy shown as JSON")
        shown = json.loads(page.input_value("#policy-text"))
        assert shown == before, f"expected the stored policy as JSON, got {shown} (stored {before})"
        page.click("#apply-button")
        page.wait_for_selector("#errors .notice.error")
        refusal = page.inner_text("#errors")
        assert "scope read" in refusal and "needs scope write" in refusal, f"expected the API's 403 reason, got {refusal!r}"
        after = mesh.api("GET", "/v1/policies/RoutingPolicy/default/reviews-split")
        assert after == before, f"expected nothing stored by a read token, got {after}"
    finally:
        mesh.api("DELETE", f"/v1/access/tokens/{issued['id']}")


def _inbound_limits(proxy: Any) -> str:
    """The configuration text of the inbound governance filter (rate limits) as Envoy holds it."""
    for c in proxy.config_dump("ecds_filters").get("configs", []):
        f = c.get("ecds_filter", {})
        if f.get("name") == "meshpilot.governance.inbound":
            return str(f.get("typed_config", {}).get("config", {}).get("configuration", {}).get("value", ""))
    return ""


def test_a_policy_created_in_the_console_reaches_the_services_envoy(page: Any, mesh: Mesh) -> None:
    sign_in(page, mesh)
    page.click("#nav a[data-page=policies]")
    page.wait_for_selector("section.kind[data-kind=RateLimitPolicy]")
    page.click("section.kind[data-kind=RateLimitPolicy] a:text-is('New RateLimitPolicy')")
    page.wait_for_selector("#policy-text")
    template = page.input_value("#policy-text")
    assert "kind: RateLimitPolicy" in template and "burst: 0" in template, f"expected the kind's template, got {template!r}"
    try:
        page.fill("#policy-text", "kind: RateLimitPolicy\nname: reviews-limit\nservice: reviews\nrate: 5/s\nburst: 7\n")
        page.click("#apply-button")
        page.wait_for_selector("h1:text-is('RateLimitPolicy default/reviews-limit')", timeout=10_000)
        stored = mesh.api("GET", "/v1/policies/RateLimitPolicy/default/reviews-limit")
        assert (stored["rate"], stored["burst"]) == ("5/s", 7), f"expected the new policy stored, got {stored}"
        wait_until(lambda: "reviews-limit" in _inbound_limits(mesh.reviews_mesh) and "burst = 7" in _inbound_limits(mesh.reviews_mesh), 10,
                   what="reviews-mesh-1's inbound filter holding the limit created in the console")
    finally:
        mesh.cp.call("DELETE", "/v1/policies/RateLimitPolicy/default/reviews-limit", None, ADMIN)


def test_without_authorisation_the_console_signs_in_without_a_token(browser: Any) -> None:
    workdir = tmpdir("meshpilot-console-open-")
    with control_plane(workdir) as cp:
        status, data = cp.call("POST", "/v1/services", {"name": "open-door", "ports": [{"name": "http", "port": 80}]})
        assert status == 201, f"expected the service created, got {status}: {data}"
        context = browser.new_context()
        try:
            pg = context.new_page()
            pg.goto(f"{cp.api}/ui/")
            pg.click("#signin button[type=submit]")  # the token field left empty
            pg.wait_for_selector("article.service[data-service=open-door]", timeout=10_000)
            assert pg.is_visible("#nav"), "expected the navigation once signed in"
        finally:
            context.close()
