"""AuthorizationPolicy path rules hold against path tricks, in real Envoy.

The inbound listener and routes come from the product's builders (translate/listeners.py, the
rules from policy/authz.py) and run in one Envoy with a static bootstrap, their RDS routes
inline; the app behind them is a direct response that echoes the path it was given. A caller
spells ``/admin`` every way an HTTP server might read as ``/admin`` (doubled slashes, dot
segments, percent-encoded letters, encoded slashes and dots) and must be refused: by the DENY
prefix rule once Envoy has normalised the path, or by Envoy itself (400) for escaped slashes.
An ALLOW list of exact paths and a prefix must not be passed the same way. Path rules are
case-sensitive, as in Istio: ``/ADMIN`` is another path (docs/policy.md).

API selectors (``to: [{apis: [...]}]``) become a method and an anchored regex on the normalised
path without its query: a DENY of ``deleteUser`` (DELETE /users/{id}) refuses exactly that
operation, query or not (and one of ``getPhotos``, GET /users/{id}/photos, with a query too), and an ALLOW of ``getUser`` lets only GET /users/{id} through. The regexes
stay within Envoy's RE2 program limit, whose cost the translation estimates exactly.
"""

from __future__ import annotations

import http.client
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

import meshpilot.policy.authz as authz_module
from meshpilot.model import ApiOperation
from meshpilot.policy.authz import AUTHZ, AuthorizationPolicy, inbound_authz, path_template_regex
from meshpilot.translate.clusters import build_inbound_cluster
from meshpilot.translate.listeners import build_inbound_listener, build_inbound_routes
from meshpilot.xds.resource import NodeInfo
from tests.support import ENVOY, EnvoyProc, envoy, free_port, wait_until

TD = "example.org"

# every spelling an app may read as /admin (or below it)
ADMIN_VARIANTS = [
    "/admin", "/admin/x", "//admin", "///admin/x", "/./admin", "/public/../admin", "/public/./../admin/x",
    "/%61dmin", "/%61%64%6d%69%6e/x", "/public/%2e%2e/admin", "/%2e/admin", "/public%2f..%2fadmin",
    "/admin%2fx", "/admin%5cx", "/public/..%2fadmin", "/x/../admin?y=1", "/admin;jsessionid=1", "/admin/.", "/ad%6din/",
    "/admin#x",
]


def _js(msg: Any) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def _policy(body: dict[str, Any]) -> AuthorizationPolicy:
    p = AUTHZ.validate({"namespace": "shop", **body})
    assert isinstance(p, AuthorizationPolicy)
    return p


def _inbound(name: str, port: int, app_port: int, policy: AuthorizationPolicy,
             apis: list[ApiOperation] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(listener, its inbound cluster) of a node of web.shop under ``policy``, routes inline."""
    node = NodeInfo(id=f"web-{name}", service="web", namespace="shop", inbound_port=port, app_port=app_port)
    routes = _js(build_inbound_routes(node, (), "t0k3n", (), inbound_authz([policy], "shop", "web", {80}, TD, apis=apis)))
    listener = _js(build_inbound_listener(node))
    listener["name"] = f"inbound-{name}"
    for chain in listener["filter_chains"]:
        cfg = chain["filters"][0]["typed_config"]
        del cfg["rds"]
        cfg["route_config"] = routes
    return listener, _js(build_inbound_cluster(node))


def _app(port: int) -> dict[str, Any]:
    return {"name": "app", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}, "filter_chains": [{"filters": [{
        "name": "envoy.filters.network.http_connection_manager", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "app", "route_config": {"virtual_hosts": [{"name": "app", "domains": ["*"], "routes": [{
                "match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "app\n"}},
                "response_headers_to_add": [{"header": {"key": "x-echo-path", "value": "%REQ(:PATH)%"}}]}]}]},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]}


def _get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    """(status, the path the app saw); the path goes on the wire as given."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        conn.endheaders()
        r = conn.getresponse()
        r.read()
        return r.status, r.getheader("x-echo-path") or ""
    finally:
        conn.close()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("authz-paths")
    p_app, p_deny, p_allow = free_port(), free_port(), free_port()
    deny = _policy({"name": "no-admin", "action": "DENY", "rules": [{"to": [{"prefixes": ["/admin"]}]}]})
    allow = _policy({"name": "public-only", "rules": [{"to": [{"paths": ["/public", "/healthz"], "prefixes": ["/public/"]}]}]})
    deny_listener, cluster = _inbound("deny", p_deny, p_app, deny)
    allow_listener, _ = _inbound("allow", p_allow, p_app, allow)
    boot = {
        "node": {"id": "web-1", "cluster": "web"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": [deny_listener, allow_listener, _app(p_app)], "clusters": [cluster]},
    }
    with envoy(tmp, boot) as e:
        wait_until(lambda: e.stat("listener_manager.total_listeners_active") == 3, 10, what="Envoy's three listeners")
        yield e, p_deny, p_allow


@pytest.mark.parametrize("path", ADMIN_VARIANTS)
def test_a_deny_prefix_rule_refuses_every_spelling_of_the_path(mesh: tuple[EnvoyProc, int, int], path: str) -> None:
    _, p_deny, _ = mesh
    status, seen = _get(p_deny, path)
    assert status in (400, 403), f"expected {path!r} refused (403 by the DENY rule, or 400 for an escaped slash), got {status} with the app seeing {seen!r}"


@pytest.mark.parametrize("path", ADMIN_VARIANTS)
def test_an_allow_list_cannot_be_passed_by_another_spelling(mesh: tuple[EnvoyProc, int, int], path: str) -> None:
    _, _, p_allow = mesh
    status, seen = _get(p_allow, path)
    assert status in (400, 403), f"expected {path!r} refused (no ALLOW rule matches /admin), got {status} with the app seeing {seen!r}"


def test_allowed_paths_still_pass_and_the_app_sees_the_normalised_path(mesh: tuple[EnvoyProc, int, int]) -> None:
    _, p_deny, p_allow = mesh
    assert _get(p_allow, "/public") == (200, "/public")
    assert _get(p_allow, "/public/a/b?q=1") == (200, "/public/a/b?q=1")
    assert _get(p_allow, "//public/./a") == (200, "/public/a"), "expected the app to see the path the rules saw"
    assert _get(p_allow, "/x/../healthz") == (200, "/healthz")
    assert _get(p_deny, "/administrator/../public") == (200, "/public")
    assert _get(p_deny, "/%70ublic") == (200, "/public"), "expected an encoded unreserved letter decoded before the rules"


def test_path_rules_are_case_sensitive(mesh: tuple[EnvoyProc, int, int]) -> None:
    """As in Istio: /ADMIN is not /admin. A DENY rule on /admin leaves it alone (documented; list
    both spellings, or use an ALLOW list, when the app ignores case); an ALLOW list refuses it."""
    _, p_deny, p_allow = mesh
    assert _get(p_deny, "/ADMIN")[0] == 200, "expected path rules to be case-sensitive (docs/policy.md)"
    assert _get(p_allow, "/ADMIN")[0] == 403
    assert _get(p_allow, "/PUBLIC")[0] == 403, "expected an exact ALLOW path to match its own case only"


# ---- API selectors ------------------------------------------------------------------------------

USERS = [
    ApiOperation(method="GET", path="/users/{id}", name="getUser"),
    ApiOperation(method="DELETE", path="/users/{id}", name="deleteUser"),
    ApiOperation(method="GET", path="/users/{id}/photos", name="getPhotos"),
]


@pytest.fixture(scope="module")
def api_mesh(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("authz-apis")
    p_app, p_deny, p_allow = free_port(), free_port(), free_port()
    deny = AUTHZ.validate({"namespace": "shop", "name": "no-delete", "service": "web", "action": "DENY",
                           "rules": [{"to": [{"apis": [{"name": "deleteUser"}]}]}, {"to": [{"apis": [{"name": "getPhotos"}]}]}]})
    allow = AUTHZ.validate({"namespace": "shop", "name": "read-only", "service": "web",
                            "rules": [{"to": [{"apis": [{"name": "getUser"}]}]}]})
    assert isinstance(deny, AuthorizationPolicy) and isinstance(allow, AuthorizationPolicy)
    deny_listener, cluster = _inbound("api-deny", p_deny, p_app, deny, USERS)
    allow_listener, _ = _inbound("api-allow", p_allow, p_app, allow, USERS)
    boot = {
        "node": {"id": "web-2", "cluster": "web"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": [deny_listener, allow_listener, _app(p_app)], "clusters": [cluster]},
    }
    with envoy(tmp, boot) as e:
        wait_until(lambda: e.stat("listener_manager.total_listeners_active") == 3, 10, what="Envoy's three listeners")
        yield e, p_deny, p_allow


@pytest.mark.parametrize(("method", "path", "status"), [
    ("DELETE", "/users/7", 403),
    ("DELETE", "/users/7?x=1", 403),
    ("DELETE", "//users/./7", 403),
    ("DELETE", "/users/%37", 403),
    ("DELETE", "/users/7#frag", 0),  # refused: by the rule, or by Envoy (400) for the fragment
    ("GET", "/users/7", 200),
    ("DELETE", "/users/7/photos", 200),
    ("DELETE", "/users", 200),
    ("DELETE", "/users/", 200),
    ("POST", "/users/7", 200),
    # a template that ends in a literal: the query is no part of the path the rule sees
    ("GET", "/users/7/photos", 403),
    ("GET", "/users/7/photos?size=1", 403),
    ("GET", "/users/7/photos/1", 200),
])
def test_a_deny_of_one_api_refuses_exactly_that_operation(api_mesh: tuple[EnvoyProc, int, int], method: str, path: str, status: int) -> None:
    _, p_deny, _ = api_mesh
    got, seen = _get(p_deny, path, method)
    assert got == status or (status == 0 and got in (400, 403)), f"expected {method} {path} -> {status} under a DENY of deleteUser (DELETE /users/{{id}}), got {got} (app saw {seen!r})"


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/users/7", 200),
    ("GET", "/users/7?fields=name", 200),
    ("GET", "/users/../users/7", 200),
    ("DELETE", "/users/7", 403),
    ("HEAD", "/users/7", 403),
    ("GET", "/users/7/photos", 403),
    ("GET", "/users", 403),
    ("GET", "/users/", 403),
    ("GET", "/admin", 403),
])
def test_an_allow_of_one_api_lets_only_that_operation_through(api_mesh: tuple[EnvoyProc, int, int], method: str, path: str, status: int) -> None:
    _, _, p_allow = api_mesh
    got, seen = _get(p_allow, path, method)
    assert got == status, f"expected {method} {path} -> {status} under an ALLOW of getUser (GET /users/{{id}}) only, got {got} (app saw {seen!r})"


def _program_size_in_envoy(tmp: Path, regex: str) -> int | None:
    """Envoy's RE2 program size of ``regex`` when it is over the limit (None: Envoy accepts it)."""
    import json
    import re
    import subprocess

    boot = {"static_resources": {"listeners": [{"name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "x", "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
                    {"match": {"safe_regex": {"regex": regex}}, "direct_response": {"status": 200}}]}]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]}]}}
    path = tmp / "regex.json"
    path.write_text(json.dumps(boot))
    r = subprocess.run([ENVOY, "--mode", "validate", "-c", str(path), "-l", "error", "--use-dynamic-base-id"],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"RE2 program size of (\d+)", r.stdout + r.stderr)
    if m:
        return int(m.group(1))
    assert r.returncode == 0, f"expected Envoy to accept {regex!r} or report its program size, got {r.stdout + r.stderr}"
    return None


def test_api_regexes_stay_within_envoys_program_limit_and_the_estimate_is_envoys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The largest template the translation accepts is accepted by Envoy; past the limit, the
    estimate the translation refuses by is the size Envoy reports."""
    largest = "/{id}/" + "abcdefghij" * 8 + "kl"
    regex = path_template_regex(largest)
    assert regex is not None and path_template_regex(largest + "m") is None
    assert _program_size_in_envoy(tmp_path, regex) is None, "expected Envoy to accept the largest template's regex"
    estimates: list[int] = []
    size = authz_module._program_size

    def recorded(pieces: Any) -> int:
        estimates.append(size(pieces))
        return estimates[-1]

    monkeypatch.setattr(authz_module, "_MAX_PROGRAM", 10**6)
    monkeypatch.setattr(authz_module, "_program_size", recorded)
    for template in ["/api/v1/{org}/" + "projects-and.members~" * 5, "/{a}/{b}/{c}/{d}/{e}/{f}/{g}/{h}/{i}/{j}/{k}/{l}/{m}/{n}/{o}/{p}/{q}/{r}/{s}/{t}/{u}/{v}/{w}/{x}/{y}/{z}",
                     "/caf\u00e9/{x}/" + "\u00e9" * 20 + "/**"]:
        regex = path_template_regex(template)
        assert regex is not None
        assert _program_size_in_envoy(tmp_path, regex) == estimates[-1], f"expected Envoy's size of {regex!r} to be the estimate {estimates[-1]}"
