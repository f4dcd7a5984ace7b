"""Consul request parsing: Go durations, service and check definitions, and junk thrown at them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpilot.consul.definitions import ConsulError, mesh_name, parse_catalog_registration, parse_check, parse_duration, parse_service
from meshpilot.model import dns_label
from meshpilot.consul.http import parse_wait

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=20,
)
keys = st.sampled_from(["Name", "name", "ID", "Address", "Port", "Tags", "Meta", "Check", "Checks", "Weights", "Kind",
                        "TTL", "HTTP", "TCP", "Interval", "Timeout", "DeregisterCriticalServiceAfter", "Status", "Header"])


@pytest.mark.parametrize(("text", "seconds"), [("10s", 10), ("1m30s", 90), ("500ms", 0.5), ("1h", 3600), ("1.5s", 1.5),
                                               ("0", 0), ("", 0), (2_000_000_000, 2.0), ("250us", 0.00025)])
def test_go_durations(text: object, seconds: float) -> None:
    got = parse_duration(text)
    assert got == pytest.approx(seconds), f"expected {text!r} -> {seconds}s, got {got}"


@pytest.mark.parametrize("text", ["10", "s", "1x", "ten seconds", "1s2", True, [1], "1e3s"])
def test_bad_durations_are_400(text: object) -> None:
    with pytest.raises(ConsulError) as err:
        parse_duration(text)
    assert err.value.status == 400, f"expected 400 for {text!r}, got {err.value.status}"


def test_wait_defaults_and_caps() -> None:
    assert parse_wait(None) == 300.0
    assert parse_wait("1s") == 1.0
    assert parse_wait("1h") == 600.0, "expected wait capped at 10 minutes as in Consul"


@given(st.text(max_size=30))
def test_duration_parser_never_crashes(text: str) -> None:
    try:
        got = parse_duration(text)
    except ConsulError as exc:
        assert exc.status == 400
    else:
        assert isinstance(got, float)


def test_service_definition_in_any_case_and_snake_case() -> None:
    sdef = parse_service({"name": "Web", "id": "web-1", "port": 80, "tags": ["a", "http2"], "meta": {"version": "2"},
                          "checks": [{"ttl": "5s"}, {"http": "http://127.0.0.1:80/h", "interval": "1s", "deregister_critical_service_after": "1m"}]},
                         "10.1.2.3")
    assert (sdef.name, sdef.id, sdef.address, sdef.port, sdef.protocol) == ("Web", "web-1", "10.1.2.3", 80, "http2")
    assert [c.kind for c in sdef.checks] == ["ttl", "http"]
    assert [c.id for c in sdef.checks] == ["service:web-1:1", "service:web-1:2"], "expected Consul's default check ids"
    assert sdef.checks[1].deregister_after_s == 60
    assert all(c.status == "critical" for c in sdef.checks), "expected new checks to start critical"


def test_meta_protocol_wins_over_tags() -> None:
    assert parse_service({"Name": "a", "Port": 1, "Tags": ["grpc"], "Meta": {"protocol": "tcp"}}, "127.0.0.1").protocol == "tcp"
    assert parse_service({"Name": "a", "Port": 1, "Tags": ["grpc"]}, "127.0.0.1").protocol == "grpc"
    assert parse_service({"Name": "a", "Port": 1}, "127.0.0.1").protocol == "http"


@pytest.mark.parametrize(
    ("body", "message"),
    [({}, "Missing service name"), ({"Name": "a", "Port": 65536}, "Invalid service port"), ({"Name": "a/b"}, "Invalid service name"),
     ({"Name": "a", "TaggedAddresses": {"wan": "1.2.3.4"}}, "TaggedAddresses"), ({"Name": "a", "Port": 1, "Address": "a b"}, "Invalid service address"),
     ({"Name": "a", "Port": 1, "Check": {"TTL": "0s"}}, "TTL must be > 0"), ({"Name": "a", "Port": 1, "Check": {"TCP": "nope", "Interval": "1s"}}, "host:port"),
     ({"Name": "a", "Port": 1, "Check": {"TTL": "1s", "HTTP": "http://x/", "Interval": "1s"}}, "only one of"),
     ({"Name": "a", "Port": 1, "Meta": {"protocol": "udp"}}, "Invalid meta protocol"), ({"Name": "a", "Port": 1, "Tags": ["a,b"]}, "Invalid tag")],
)
def test_bad_service_definitions(body: dict[str, object], message: str) -> None:
    with pytest.raises(ConsulError) as err:
        parse_service(body, "127.0.0.1")
    assert err.value.status == 400 and message in err.value.message, f"expected 400 {message!r}, got {err.value.status} {err.value.message!r}"


@settings(max_examples=300)
@given(st.dictionaries(keys, json_values, max_size=8) | json_values)
def test_junk_registrations_give_a_definition_or_a_400(body: object) -> None:
    try:
        sdef = parse_service(body, "127.0.0.1")
    except ConsulError as exc:
        assert exc.status == 400 and exc.message, f"expected a 400 with a message, got {exc.status} {exc.message!r}"
    else:
        assert sdef.name and 0 <= sdef.port <= 65535
        assert dns_label(mesh_name(sdef.name)) == mesh_name(sdef.name), f"expected a DNS label for {sdef.name!r}"


@settings(max_examples=300)
@given(st.dictionaries(keys, json_values, max_size=8) | json_values)
def test_junk_checks_give_a_definition_or_a_400(body: object) -> None:
    try:
        d = parse_check(body, service_id="s")
    except ConsulError as exc:
        assert exc.status == 400
    else:
        assert d.kind in ("ttl", "http", "tcp") and d.id


def test_names_consul_accepts_are_kept_and_mapped_to_dns_labels() -> None:
    for name, mesh in (("under_score", "under-score"), ("api.v2", "api-v2"), ("MixedCase", "mixedcase"), ("web", "web"), ("__", None)):
        sdef = parse_service({"Name": name, "ID": "x", "Port": 0}, "127.0.0.1")
        assert (sdef.name, sdef.port) == (name, 0), f"expected {name!r} with Port 0 kept as registered, got {sdef}"
        got = mesh_name(name)
        assert dns_label(got) == got and (mesh is None or got == mesh), f"expected mesh name {mesh!r} for {name!r}, got {got!r}"
    long = "x" * 70
    assert mesh_name(long) != mesh_name(long + "y") and len(mesh_name(long)) <= 63, "expected long names cut and kept distinct"


def test_meta_and_tagged_addresses_kept_as_given() -> None:
    sdef = parse_service({"Name": "a", "Port": 1, "Meta": {"Protocol_X": "1"}, "tagged_addresses": {"wan_ipv4": {"address": "1.2.3.4", "port": 5}}}, "127.0.0.1")
    assert sdef.meta == {"Protocol_X": "1"}, sdef.meta
    assert sdef.tagged == {"wan_ipv4": {"Address": "1.2.3.4", "Port": 5}}, f"expected tag names kept unfolded, got {sdef.tagged}"


def test_catalog_registration() -> None:
    node, sdef = parse_catalog_registration({
        "Node": "ext", "Address": "10.0.0.9", "Service": {"ID": "e1", "Service": "ext_svc", "Port": 443, "Weights": {"Passing": 0, "Warning": 0}},
        "Check": {"CheckID": "alive", "Status": "passing", "ServiceID": "e1", "Definition": {"Interval": 0}},
    })
    assert (node, sdef.name, sdef.id, sdef.address, sdef.weight) == ("ext", "ext_svc", "e1", "10.0.0.9", 1), sdef
    assert [(c.id, c.kind, c.status) for c in sdef.checks] == [("alive", "none", "passing")], sdef.checks
    for body, message in (({"Address": "1.2.3.4", "Service": {"Service": "a"}}, "Must provide node"),
                          ({"Node": "n", "Address": "1.2.3.4"}, "not bare nodes"),
                          ({"Node": "n", "Address": "1.2.3.4", "Service": {"Service": "a"}, "Check": {"CheckID": "c", "ServiceID": "b"}}, "node checks")):
        with pytest.raises(ConsulError) as err:
            parse_catalog_registration(body)
        assert err.value.status == 400 and message in err.value.message, f"expected 400 {message!r}, got {err.value.status} {err.value.message!r}"


@settings(max_examples=200)
@given(st.dictionaries(st.sampled_from(["Node", "Address", "Service", "Check", "Checks"]), json_values | st.dictionaries(keys, json_values, max_size=6), max_size=5))
def test_junk_catalog_registrations_give_a_definition_or_a_400(body: object) -> None:
    try:
        node, sdef = parse_catalog_registration(body)
    except ConsulError as exc:
        assert exc.status == 400 and exc.message, f"expected a 400 with a message, got {exc.status} {exc.message!r}"
    else:
        assert node and sdef.name
