"""`meshpilot perf route`'s own parts: wrk's report parsed, callgrind's totals summed, the scenarios'
proxy configurations (the switched-off route, the probes, the CEL header), the identity hop's
caller and callee (certificates from the mesh CA, the product's TLS contexts on static secrets, a
connection per request, resumption off) and its ratios, and bad flag pairs."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from meshpilot.perf import route
from meshpilot.wasm import modules

needs_modules = pytest.mark.skipif(not all((modules._DIR / f"{m}.wasm").is_file() for m in modules.MODULES),
                                   reason="the WASM modules are not built (scripts/build-filters.sh)")

WRK = """Running 10s test @ http://127.0.0.1:1234/
  2 threads and 16 connections
  Latency Distribution
     50%    2.36ms
     75%  870.00us
     90%    1.02s
     99%    3.92ms
  65343 requests in 10.00s, 9.54MB read
  Non-2xx or 3xx responses: 12
Requests/sec:   6534.30
"""


def test_wrk_report_is_parsed_with_units() -> None:
    got = route._parse_wrk(WRK)
    assert got["rps"] == 6534.3 and got["requests"] == 65343 and got["non_2xx"] == 12, f"unexpected totals {got}"
    assert got["latency_ms"] == {"p50": 2.36, "p75": 0.87, "p90": 1020.0, "p99": 3.92}, f"unexpected latencies {got['latency_ms']}"
    with pytest.raises(RuntimeError, match="unexpected wrk output"):
        route._parse_wrk("connection refused")


def test_callgrind_totals_are_summed_over_dumps(tmp_path: Path) -> None:
    (tmp_path / "cg.out.1").write_text("events: Ir\nfn=main\n1 5\nsummary: 1500\ntotals: 1500\n")
    (tmp_path / "cg.out").write_text("events: Ir\ntotals: 20\n")
    (tmp_path / "envoy.log").write_text("totals: 999999\n")
    assert route._callgrind_total(str(tmp_path)) == 1520, "expected the dumps' totals summed and other files ignored"


@needs_modules
def test_scenario_configurations() -> None:
    def routes(name: str) -> list[dict]:
        boot = route._bootstrap(name, 10001, 10002)
        hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        return hcm["route_config"]["virtual_hosts"][0]["routes"]

    off = routes("h_switched_off")[0].get("typed_per_filter_config", {}).get("meshpilot", {})
    assert off.get("disabled") is True, f"expected (h) to switch the filter off on its route, got {off}"
    assert "typed_per_filter_config" not in routes("e_both")[0], "expected (e) to run the filter"
    both = route._filters("e_both")[0]["typed_config"]["config"]["configuration"]["value"]
    assert "[breaker" in both and "[ratelimit" in both, f"expected (e) to configure both sections, got:\n{both}"
    probe = route._filters("p_route")[0]["typed_config"]["config"]
    assert probe["configuration"]["value"] == "route = 10" and probe["vm_config"]["vm_id"] == "probe", f"unexpected probe config {probe}"
    cel = routes("p_cel_header")[0]["response_headers_to_add"][0]
    assert cel["header"]["value"].startswith("%CEL(") and cel["keep_empty_value"] is False, f"unexpected CEL header {cel}"


def test_probes_need_instructions() -> None:
    parser = argparse.ArgumentParser()
    route.add_arguments(parser)
    assert route.main(parser.parse_args(["--probes"])) == 2, "expected --probes without --instructions to be refused"
    assert route.main(parser.parse_args(["--instructions", "-5"])) == 2, "expected a negative request count to be refused"


@pytest.fixture(scope="module")
def certs() -> route.MeshCerts:
    return route.mesh_certs()


def _chain(boot: dict) -> dict:
    return boot["static_resources"]["listeners"][0]["filter_chains"][0]


def _inbound_route(boot: dict) -> dict:
    return _chain(boot)["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0]


def test_hop_certificates_come_from_one_mesh_ca(certs: route.MeshCerts) -> None:
    from cryptography import x509

    root = x509.load_pem_x509_certificate(certs.bundle)
    for chain, key, spiffe in ((certs.caller_chain, certs.caller_key, route._CALLER_ID),
                               (certs.callee_chain, certs.callee_key, route._CALLEE_ID)):
        leaf = x509.load_pem_x509_certificates(chain)[0]
        leaf.verify_directly_issued_by(root)
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe], f"expected only {spiffe}, got {sans}"
        assert key.startswith(b"-----BEGIN PRIVATE KEY-----"), "expected a PKCS#8 key"
    assert route._CALLER_ID != route._CALLEE_ID


def test_plain_hop_has_no_tls_and_strips_the_caller_header(certs: route.MeshCerts) -> None:
    caller, callee = route.hop_bootstraps("j_hop_plain", 10001, 10002, 10003, certs)
    cluster = caller["static_resources"]["clusters"][0]
    assert "transport_socket" not in cluster and "transport_socket" not in _chain(callee), "expected plaintext both ways"
    assert "secrets" not in caller["static_resources"] and "secrets" not in callee["static_resources"]
    assert "typed_extension_protocol_options" not in cluster, "expected connections reused"
    ep = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert ep["port_value"] == 10002, f"expected the caller to reach the callee's port, got {ep}"
    assert _inbound_route(callee)["route"]["cluster"] == "backend"
    assert _inbound_route(callee)["request_headers_to_remove"] == ["x-mesh-caller"]


def test_mtls_hop_uses_the_products_contexts_with_static_secrets(certs: route.MeshCerts) -> None:
    caller, callee = route.hop_bootstraps("k_hop_mtls", 10001, 10002, 10003, certs)
    up = caller["static_resources"]["clusters"][0]["transport_socket"]
    assert up["name"] == "envoy.transport_sockets.tls"
    ctx = up["typedConfig"]
    assert ctx["@type"].endswith("UpstreamTlsContext") and "maxSessionKeys" not in ctx, f"unexpected {ctx}"
    common = ctx["commonTlsContext"]
    # the product's SDS references, pointed at the bootstrap's static secrets (no config source)
    assert common["tlsCertificateSdsSecretConfigs"] == [{"name": "default"}], f"unexpected {common}"
    combined = common["combinedValidationContext"]
    assert combined["validationContextSdsSecretConfig"] == {"name": "ROOTCA"}
    assert combined["defaultValidationContext"]["matchTypedSubjectAltNames"] == [
        {"sanType": "URI", "matcher": {"exact": route._CALLEE_ID}}], f"expected the callee's SPIFFE id matched, got {combined}"
    down = _chain(callee)["transport_socket"]["typedConfig"]
    assert down["@type"].endswith("DownstreamTlsContext") and down["requireClientCertificate"] is True, f"unexpected {down}"
    secrets = {s["name"]: s for s in caller["static_resources"]["secrets"]}
    assert secrets["default"]["tls_certificate"]["certificate_chain"]["inline_string"] == certs.caller_chain.decode()
    assert secrets["ROOTCA"]["validation_context"]["trusted_ca"]["inline_string"] == certs.bundle.decode()
    callee_secrets = {s["name"]: s for s in callee["static_resources"]["secrets"]}
    assert callee_secrets["default"]["tls_certificate"]["private_key"]["inline_string"] == certs.callee_key.decode()
    stamp = _inbound_route(callee)["request_headers_to_add"][0]["header"]
    assert stamp == {"key": "x-mesh-caller", "value": "%DOWNSTREAM_PEER_URI_SAN%"}, f"unexpected {stamp}"


@pytest.mark.parametrize("name, per_request, resumption", [
    ("l_hop_plain_per_request", True, None), ("m_hop_mtls_per_request", True, True),
    ("n_hop_mtls_full_handshake", True, False), ("k_hop_mtls", False, True)])
def test_hop_connection_per_request_and_resumption(certs: route.MeshCerts, name: str, per_request: bool, resumption: bool | None) -> None:
    caller, _callee = route.hop_bootstraps(name, 10001, 10002, 10003, certs)
    cluster = caller["static_resources"]["clusters"][0]
    options = cluster.get("typed_extension_protocol_options", {}).get("envoy.extensions.upstreams.http.v3.HttpProtocolOptions", {})
    got = options.get("common_http_protocol_options", {}).get("max_requests_per_connection")
    assert got == (1 if per_request else None), f"{name}: expected max_requests_per_connection {per_request}, got {options}"
    if resumption is None:
        assert "transport_socket" not in cluster
    else:
        ctx = cluster["transport_socket"]["typedConfig"]
        assert ("maxSessionKeys" not in ctx) is resumption, f"{name}: unexpected session keys setting in {ctx}"
        if not resumption:
            assert ctx["maxSessionKeys"] == 0


def test_identity_cost_ratios_pair_each_mtls_way_with_its_plaintext_twin() -> None:
    results = {"j_hop_plain": {"rps": 1000.0}, "k_hop_mtls": {"rps": 800.0}, "l_hop_plain_per_request": {"rps": 500.0},
               "m_hop_mtls_per_request": {"rps": 250.0}, "n_hop_mtls_full_handshake": {"rps": 100.0}, "a_none": {"rps": 2000.0}}
    cost = route._identity_cost(results, "rps")
    assert cost == {"mtls_reuse_vs_plain": 0.8, "mtls_per_request_vs_plain_per_request": 0.5,
                    "full_handshake_vs_plain_per_request": 0.2, "mtls_per_request_vs_plain": 0.25,
                    "full_handshake_vs_plain": 0.1}, f"unexpected {cost}"
    route._ratios(results, "rps", "j_hop_plain", "ratio_to_j", lambda n: n in route.HOP_SCENARIOS)
    assert results["k_hop_mtls"]["ratio_to_j"] == 0.8 and "ratio_to_j" not in results["a_none"], f"unexpected {results}"
    assert route._identity_cost({"k_hop_mtls": {"rps": 1.0}}, "rps") == {}, "expected no ratio without plaintext"


def test_hop_scenarios_need_certificates() -> None:
    with pytest.raises(ValueError, match="certificates"):
        route._bootstraps("k_hop_mtls", 10001, 10003, None)
    roles = [role for role, _boot, _port in route._bootstraps("j_hop_plain", 10001, 10003, route.mesh_certs())]
    assert roles == ["caller", "callee"], f"expected the caller first (wrk's target), got {roles}"
