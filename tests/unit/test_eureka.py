"""Eureka codec and server core: instance parsing, XML/JSON forms, hash codes, deltas, leases."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpilot.eureka.codec import EurekaError, from_xml, hashcode, parse_instance, to_xml
from meshpilot.eureka.front import EurekaFront
from meshpilot.model import Check, CheckStatus, Instance, Service, ServicePort
from meshpilot.registry import Registry
from meshpilot.registry.store import MemoryStore


def _doc(app: str = "ORDERS", iid: str = "h1:orders:8080", status: str = "UP", **extra: object) -> dict[str, object]:
    return {"instance": {"instanceId": iid, "app": app, "hostName": "h1", "ipAddr": "10.0.0.5", "status": status,
                         "port": {"$": 8080, "@enabled": "true"}, "securePort": {"$": 443, "@enabled": "false"},
                         "dataCenterInfo": {"@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo", "name": "MyOwn"},
                         "leaseInfo": {"renewalIntervalInSecs": 1, "durationInSecs": 2},
                         "metadata": {"version": "7", "zone": "z2", "management.port": "8080"}, "vipAddress": "orders", **extra}}


def test_hashcode_counts_statuses_in_name_order() -> None:
    assert hashcode(["UP", "DOWN", "UP", "OUT_OF_SERVICE"]) == "DOWN_1_OUT_OF_SERVICE_1_UP_2_"
    assert hashcode([]) == ""


def test_xml_round_trip_of_an_instance() -> None:
    inst = _doc()["instance"]
    tag, back = from_xml(to_xml("instance", inst).encode())
    assert tag == "instance"
    info = parse_instance(back, "orders")
    assert (info.app, info.ip, info.port, info.metadata["version"], info.duration_s) == ("ORDERS", "10.0.0.5", 8080, "7", 2)


@pytest.mark.parametrize(("change", "message"), [({"app": ""}, "Missing appName"), ({"app": "OTHER"}, "Mismatched appName"),
                                                 ({"ipAddr": "x"}, "not an IP address"), ({"hostName": ""}, "Missing hostname"),
                                                 ({"dataCenterInfo": None}, "dataCenterInfo"), ({"status": "MAYBE"}, "status"),
                                                 ({"port": {"$": 0, "@enabled": "true"}}, "port")])
def test_bad_registrations_are_400(change: dict[str, object], message: str) -> None:
    doc = _doc()
    doc["instance"].update(change)  # type: ignore[union-attr]
    with pytest.raises(EurekaError) as err:
        parse_instance(doc, "orders")
    assert err.value.status == 400 and message in err.value.message, f"expected 400 {message!r}, got {err.value.message!r}"


def test_dtd_is_refused() -> None:
    with pytest.raises(EurekaError):
        from_xml(b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "b">]><instance>&a;</instance>')


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-16-le", "utf-16-be"])
def test_dtd_is_refused_whatever_the_encoding(encoding: str) -> None:
    def encoded(body: str) -> bytes:  # with a byte-order mark, as a UTF-16 client sends it
        text = f'<?xml version="1.0" encoding="UTF-16"?>{body}' if "16" in encoding else body
        return (b"" if encoding == "utf-16" else "\ufeff".encode(encoding)) + text.encode(encoding)  # utf-16 adds its own

    try:
        got = from_xml(encoded('<!DOCTYPE x [<!ENTITY a "b">]><instance><app>&a;</app></instance>'))
    except EurekaError as exc:
        assert exc.status == 400 and "DTD" in exc.message, f"{encoding}: expected a 400 about the DTD, got {exc.status} {exc.message!r}"
    else:
        raise AssertionError(f"{encoding}: expected the DTD to be refused, got a parsed document {got!r}")
    assert from_xml(encoded("<instance><app>ORDERS</app></instance>")) == ("instance", {"app": "ORDERS"})


json_values = st.recursive(st.none() | st.integers() | st.text(max_size=10),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=10), c, max_size=5), max_leaves=15)


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(["app", "hostName", "ipAddr", "status", "port", "securePort", "dataCenterInfo", "leaseInfo",
                                         "metadata", "instanceId", "vipAddress"]), json_values, max_size=11))
def test_junk_registrations_give_an_instance_or_a_400(doc: dict[str, object]) -> None:
    try:
        info = parse_instance(doc, str(doc.get("app", "x")))
    except EurekaError as exc:
        assert exc.status == 400 and exc.message
    else:
        assert 1 <= info.port <= 65535 and info.app


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_junk_xml_gives_a_document_or_a_400(data: bytes) -> None:
    try:
        from_xml(data)
    except EurekaError as exc:
        assert exc.status == 400


def test_register_fetch_delta_override_cancel() -> None:
    reg = Registry(MemoryStore())
    front = EurekaFront(reg)
    front.register(parse_instance(_doc(), "ORDERS"))
    inst = reg.instance("eureka:orders:h1:orders:8080")
    assert inst is not None and inst.routable, f"expected an UP Eureka instance to be routable, got {inst}"
    assert inst.labels == {"version": "7"} and inst.zone == "z2", "expected version and zone in the shared model"
    apps = front.applications()
    assert apps["apps__hashcode"] == "UP_1_" and apps["application"][0]["name"] == "ORDERS"
    delta = front.deltas()["application"][0]["instance"]
    assert [d["actionType"] for d in delta] == ["ADDED"]
    front.set_status("ORDERS", "h1:orders:8080", "OUT_OF_SERVICE")
    assert not reg.instance("eureka:orders:h1:orders:8080").routable, "expected OUT_OF_SERVICE to leave EDS"  # type: ignore[union-attr]
    assert front.hashcode() == "OUT_OF_SERVICE_1_", f"expected the override to be the status clients see, got {front.hashcode()}"
    view = front.instance("ORDERS", "h1:orders:8080")
    assert (view["status"], view["overriddenStatus"]) == ("OUT_OF_SERVICE", "OUT_OF_SERVICE")
    assert front.deltas()["application"][0]["instance"][0]["actionType"] == "MODIFIED"
    front.cancel("ORDERS", "h1:orders:8080")
    assert reg.instance("eureka:orders:h1:orders:8080") is None and reg.lookup("orders") is None
    assert front.deltas()["application"][0]["instance"][0]["actionType"] == "DELETED"
    assert front.hashcode() == ""


def test_mesh_instances_appear_with_their_health() -> None:
    reg = Registry(MemoryStore())
    front = EurekaFront(reg)
    reg.put_service(Service(name="pay", ports=[ServicePort(name="http", port=80)]))
    reg.register(Instance(id="pay-1", service="pay", address="10.0.0.9", ports={"http": 9000}, source="mesh",
                          checks=[Check(id="hds", owner="hds", status=CheckStatus.passing)]))
    view = front.application("PAY")["instance"][0]
    assert (view["status"], view["port"]["$"], view["vipAddress"]) == ("UP", 9000, "pay")
    reg.set_check("pay-1", Check(id="hds", owner="hds", status=CheckStatus.critical))
    assert front.application("PAY")["instance"][0]["status"] == "DOWN"
    assert front.hashcode() == "DOWN_1_"


def test_lease_expiry_cancels() -> None:
    reg = Registry(MemoryStore())
    front = EurekaFront(reg)
    front.register(parse_instance(_doc(), "ORDERS"))
    front.leases["eureka:orders:h1:orders:8080"].renewed_at = time.monotonic() - 3
    assert front.expire() == ["eureka:orders:h1:orders:8080"]
    assert reg.instance("eureka:orders:h1:orders:8080") is None
