"""The sidecar bootstrap with a workload identity: an SDS cluster on the agent's unix socket ahead of the
control plane's cluster, which talks TLS with the SDS secrets and accepts only the control plane's SPIFFE
id; the node says it has an identity. Envoy's own verdict is in tests/e2e/test_sidecar_identity.py."""

from __future__ import annotations

import json
from typing import Any

import pytest

from meshpilot import pki
from meshpilot.translate.bootstrap import SDS_CLUSTER, BootstrapOptions, build_bootstrap
from meshpilot.xds.resource import META, node_info

SOCK = "/var/run/meshpilot/sds/sds.sock"


def _boot(**kw: Any) -> dict[str, Any]:
    return build_bootstrap(BootstrapOptions(node_id="web-1", service="web", control_plane_host="cp.example",
                                            **kw))


def _cluster(boot: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in boot["static_resources"]["clusters"] if c["name"] == name)


def test_without_identity_nothing_changes_but_the_flag() -> None:
    boot = _boot()
    names = [c["name"] for c in boot["static_resources"]["clusters"]]
    assert names == ["meshpilot-xds"] and "transport_socket" not in _cluster(boot, "meshpilot-xds")
    assert boot["node"]["metadata"][META.IDENTITY] is False


def test_identity_puts_the_sds_cluster_first_and_tls_on_the_control_plane_cluster() -> None:
    boot = _boot(identity=True, sds_socket=SOCK, trust_domain="corp.test", tls_server_name="cp.example", hds=True)
    names = [c["name"] for c in boot["static_resources"]["clusters"]]
    assert names.index(SDS_CLUSTER) < names.index("meshpilot-xds"), f"the SDS cluster must come first: {names}"
    sds = _cluster(boot, SDS_CLUSTER)
    assert sds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {"pipe": {"path": SOCK}}
    assert "http2_protocol_options" in json.dumps(sds["typed_extension_protocol_options"])
    tls = _cluster(boot, "meshpilot-xds")["transport_socket"]["typed_config"]
    assert tls["@type"].endswith("UpstreamTlsContext") and tls["sni"] == "cp.example"
    ctx = tls["common_tls_context"]
    cert = ctx["tls_certificate_sds_secret_configs"]
    assert [c["name"] for c in cert] == ["default"]
    assert cert[0]["sds_config"]["api_config_source"]["grpc_services"][0]["envoy_grpc"]["cluster_name"] == SDS_CLUSTER
    combined = ctx["combined_validation_context"]
    assert combined["validation_context_sds_secret_config"]["name"] == "ROOTCA"
    assert combined["default_validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": pki.control_plane_id("corp.test")}}]
    # HDS rides the same cluster, so it is TLS as well
    assert boot["hds_config"]["grpc_services"][0]["envoy_grpc"]["cluster_name"] == "meshpilot-xds"
    md = boot["node"]["metadata"]
    assert md[META.IDENTITY] is True and node_info("web-1", "web", md).identity


def test_no_certificate_or_key_file_is_named() -> None:
    text = json.dumps(_boot(identity=True, sds_socket=SOCK, trust_domain="corp.test"))
    for word in ("filename", ".pem", "private_key", "certificate_chain", "trusted_ca", "inline"):
        assert word not in text, f"expected no {word!r} in the bootstrap: secrets come over SDS"


def test_identity_without_a_socket_is_refused() -> None:
    with pytest.raises(ValueError, match="sds_socket"):
        _boot(identity=True)


def test_no_sni_without_a_server_name() -> None:
    tls = _cluster(_boot(identity=True, sds_socket=SOCK), "meshpilot-xds")["transport_socket"]["typed_config"]
    assert "sni" not in tls
