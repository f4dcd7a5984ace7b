"""The topology computed from Prometheus query results: exact window counts, edges by caller and callee,
requests from callers without a sidecar, latency and the registry's services as nodes."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshpilot.model import Instance, Service, ServicePort
from meshpilot.topology.graph import Queried, Series, histogram_quantile, parse_series, topology, window_increase
from meshpilot.topology.plugin import parse_window

WEB = Service(name="web", namespace="shop", ports=[ServicePort(name="http", port=80)])
PAY = Service(name="pay", namespace="shop", ports=[ServicePort(name="http", port=8080)])


def series(value: float | list[float], __name__: str = "", **labels: str) -> Series:
    values = value if isinstance(value, list) else [value]
    if __name__:
        labels["__name__"] = __name__
    return Series(labels, tuple((1000.0 + i, v) for i, v in enumerate(values)))


def out(src: str, host: str, values: list[float], port: int = 80, instance: str = "a") -> Series:
    return series(values, source_service=src, envoy_cluster_name=f"outbound|{port}||{host}", instance=instance)


def direct(dest: str, peer: str, values: list[float], code: str = "200") -> Series:
    return series(values, destination_service=dest, peer=peer, response_code=code, instance="w")


def edges(topo: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(e["source"], e["destination"]): e for e in topo["edges"]}


@pytest.mark.parametrize(("samples", "before", "want"), [
    ([10, 15, 30], 10, 20),  # a series that existed before the window: from its value then
    ([0, 5, 7], None, 7),  # a series that began inside the window: from 0
    ([3, 5], None, 5),  # its first sample already counted requests: those are in the window too
    ([50, 60, 4, 9], 40, 29),  # a restart (Envoy's counters start again at 0): 20 before it, 9 after
    ([], 10, 0),
])
def test_a_counter_increase_is_counted_sample_by_sample_without_extrapolation(samples: list[float], before: float | None, want: float) -> None:
    got = window_increase([(float(i), v) for i, v in enumerate(samples)], before)
    assert got == want, f"expected {want} from {samples} (before: {before}), got {got}"


def test_edges_come_from_the_callers_outbound_clusters_summed_over_instances_and_ports() -> None:
    q = Queried(
        requests=[out("client.shop", "web_shop_svc_mesh", [100, 300], instance="c1"),
                  out("client.shop", "web_shop_svc_mesh", [0, 50], instance="c2"),
                  out("client.shop", "web_shop_svc_mesh", [0, 5], port=81),
                  out("client.shop", "pay.shop.svc.mesh", [0, 0], port=8080)],
        requests_before=[out("client.shop", "web_shop_svc_mesh", [100], instance="c1")],
        errors=[series([0, 11], source_service="client.shop", envoy_cluster_name="outbound|80||web_shop_svc_mesh")],
        services=[WEB, PAY], window_s=100.0,
    )
    got = edges(topology(q))
    assert set(got) == {("client.shop", "web.shop")}, f"expected one edge (pay carried nothing), got {got}"
    e = got[("client.shop", "web.shop")]
    assert (e["requests"], e["rps"], e["errors"], e["error_rate"], e["reporter"]) == (255, 2.55, 11, round(11 / 255, 4), "source"), \
        f"expected 200 + 50 + 5 requests and 11 errors over 100 s, got {e}"


def test_a_deleted_service_is_still_named_from_its_cluster_and_other_clusters_are_no_edges() -> None:
    q = Queried(requests=[out("client.shop", "gone_shop_svc_mesh", [0, 4]),
                          series([0, 9], source_service="client.shop", envoy_cluster_name="meshpilot-xds")], services=[WEB])
    got = edges(topology(q))
    assert set(got) == {("client.shop", "gone.shop")}, f"expected only the edge to the deleted service, got {got}"


LEGACY = Instance(id="legacy-1", service="legacy", namespace="shop", address="10.0.0.9", ports={"http": 80}, source="consul")
WEB_1 = Instance(id="web-1", service="web", namespace="shop", address="10.0.0.5", ports={"http": 80}, source="mesh")


def test_requests_without_a_sidecar_are_named_by_the_sdk_registration_at_their_address() -> None:
    q = Queried(
        direct=[direct("web.shop", "10.0.0.9", [0, 50]), direct("web.shop", "10.0.0.9", [0, 4], code="503"),
                direct("web.shop", "::ffff:10.0.0.9", [0, 6]),  # a dual-stack listener's view of the same IPv4 peer
                direct("web.shop", "10.0.0.5", [10, 17]),  # the sidecar node's own address: not an SDK app
                direct("web.shop", "192.0.2.1", [0, 3])],
        direct_before=[direct("web.shop", "10.0.0.5", [10])],
        direct_buckets=[bucket("10", 50, destination_service="web.shop", peer="10.0.0.9"),
                        bucket("+Inf", 54, destination_service="web.shop", peer="10.0.0.9"),
                        bucket("10", 0, destination_service="web.shop", peer="::ffff:10.0.0.9"),
                        bucket("+Inf", 6, destination_service="web.shop", peer="::ffff:10.0.0.9")],
        services=[WEB], instances=[LEGACY, WEB_1],
    )
    got = edges(topology(q))
    legacy = got.get(("legacy.shop", "web.shop"))
    assert legacy is not None and (legacy["requests"], legacy["errors"], legacy["reporter"], legacy["p50_ms"]) == (60, 4, "destination", 6.0), \
        f"expected legacy -> web with 60 requests, 4 of them 5xx, reported by web, latency over both spellings of its address, got {got}"
    unknown = got.get(("unknown", "web.shop"))
    assert unknown is not None and unknown["requests"] == 10, f"expected 7 + 3 requests from unregistered addresses, got {got}"


def test_an_address_two_sdk_services_share_cannot_name_a_caller() -> None:
    other = Instance(id="batch-1", service="batch", namespace="shop", address="10.0.0.9", ports={"http": 80}, source="eureka")
    got = edges(topology(Queried(direct=[direct("web.shop", "10.0.0.9", [0, 5])], services=[WEB], instances=[LEGACY, other])))
    assert set(got) == {("unknown", "web.shop")}, f"expected unknown for a shared address, got {got}"


@pytest.mark.parametrize(("q", "buckets", "want"), [
    (0.5, {1.0: 10, 2.0: 20, math.inf: 20}, 1.0),  # the 10th of 20 is the last of the first bucket
    (0.75, {1.0: 10, 2.0: 20, math.inf: 20}, 1.5),  # halfway through (1, 2]
    (0.25, {0.5: 0, 5.0: 10, math.inf: 10}, 0.5 + 4.5 * 0.25),  # an empty first bucket: from its bound
    (0.99, {1.0: 10, math.inf: 20}, 1.0),  # in the +Inf bucket: the highest finite bound
    (0.5, {1.0: 0, math.inf: 0}, None),  # no requests
    (0.5, {1.0: 3}, None),  # no +Inf bucket: not a histogram
])
def test_histogram_quantile_interpolates_inside_the_bucket_as_prometheus_does(q: float, buckets: dict[float, float], want: float | None) -> None:
    got = histogram_quantile(q, buckets)
    assert got == (pytest.approx(want) if want is not None else None), f"expected {want} for q={q} over {buckets}, got {got}"


def bucket(le: str, n: float, **labels: str) -> Series:
    return series(n, le=le, **labels)


def test_latency_quantiles_per_edge_and_per_service_from_the_bucket_counts() -> None:
    client = {"source_service": "client.shop", "envoy_cluster_name": "outbound|80||web_shop_svc_mesh"}
    q = Queried(
        requests=[out("client.shop", "web_shop_svc_mesh", [0, 100])],
        buckets=[bucket("1", 50, **client), bucket("10", 100, **client), bucket("100", 100, **client), bucket("+Inf", 100, **client)],
        direct=[direct("web.shop", "10.0.0.9", [0, 100])],
        direct_buckets=[bucket("10", 0, destination_service="web.shop", peer="10.0.0.9"),
                        bucket("100", 100, destination_service="web.shop", peer="10.0.0.9"),
                        bucket("+Inf", 100, destination_service="web.shop", peer="10.0.0.9")],
        services=[WEB], instances=[LEGACY],
    )
    topo = topology(q)
    got = edges(topo)
    assert (got[("client.shop", "web.shop")]["p50_ms"], got[("client.shop", "web.shop")]["p99_ms"]) == (1.0, 9.82), f"got {got}"
    assert (got[("legacy.shop", "web.shop")]["p50_ms"], got[("legacy.shop", "web.shop")]["p99_ms"]) == (55.0, 99.1), f"got {got}"
    web = next(n for n in topo["nodes"] if n["id"] == "web.shop")
    # both callers' requests together: 200, of which 100 under 10 ms
    assert (web["p50_ms_in"], web["p99_ms_in"]) == (10.0, 98.2), f"expected the service's quantiles over all its callers, got {web}"
    assert got[("client.shop", "web.shop")]["reporter"] == "source"


def test_latency_counts_only_the_requests_of_the_window() -> None:
    client = {"source_service": "client.shop", "envoy_cluster_name": "outbound|80||web_shop_svc_mesh"}
    q = Queried(
        requests=[out("client.shop", "web_shop_svc_mesh", [0, 10])],
        # before the window 1,000 requests took under 1 ms; in it, 10 took between 10 and 100 ms
        buckets_before=[bucket("1", 1000, **client), bucket("10", 1000, **client), bucket("100", 1000, **client), bucket("+Inf", 1000, **client)],
        buckets=[bucket("1", 1000, **client), bucket("10", 1000, **client), bucket("100", 1010, **client), bucket("+Inf", 1010, **client)],
        services=[WEB],
    )
    e = edges(topology(q))[("client.shop", "web.shop")]
    assert (e["p50_ms"], e["p99_ms"]) == (55.0, 99.1), f"expected the window's 10 requests only (10-100 ms), got {e}"


def test_no_latency_without_buckets() -> None:
    got = edges(topology(Queried(requests=[out("client.shop", "web_shop_svc_mesh", [0, 3])], services=[WEB])))
    assert got[("client.shop", "web.shop")]["p99_ms"] is None, f"expected no quantile without buckets, got {got}"


def test_every_registered_service_is_a_node_with_its_front_doors_and_callers_seen_only_in_stats_too() -> None:
    consul = Instance(id="pay-1", service="pay", namespace="shop", address="10.0.0.9", ports={"http": 8080}, source="consul")
    mesh = Instance(id="web-1", service="web", namespace="shop", address="10.0.0.5", ports={"http": 80}, source="mesh")
    q = Queried(requests=[out("client.shop", "web_shop_svc_mesh", [0, 7])], services=[WEB, PAY], instances=[consul, mesh], window_s=7)
    nodes = {n["id"]: n for n in topology(q)["nodes"]}
    assert set(nodes) == {"client.shop", "pay.shop", "web.shop"}, f"expected both services and the caller, got {nodes}"
    assert (nodes["pay.shop"]["registered"], nodes["pay.shop"]["sources"], nodes["pay.shop"]["instances"]) == (True, ["consul"], 1)
    assert (nodes["client.shop"]["registered"], nodes["client.shop"]["requests_out"]) == (False, 7)
    assert (nodes["web.shop"]["requests_in"], nodes["web.shop"]["rps_in"]) == (7, 1.0), f"got {nodes['web.shop']}"


def test_parse_series_reads_vectors_and_matrices_and_names_what_is_wrong() -> None:
    got = parse_series([{"metric": {"__name__": "x", "a": "1"}, "values": [[1, "2"], [2, "3"]]},
                        {"metric": {"a": "2"}, "value": [1, "+Inf"]}])
    assert got == [Series({"__name__": "x", "a": "1"}, ((1.0, 2.0), (2.0, 3.0))), Series({"a": "2"}, ())], f"got {got}"
    for junk, where in [({}, "result"), ([1], "result.0"), ([{"metric": {}, "values": "x"}], "result.0.values"),
                        ([{"metric": {}, "values": [[1]]}], "result.0")]:
        with pytest.raises(ValueError, match=f"^{where}[:.]"):
            parse_series(junk)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
                           max_leaves=20)


@given(json_values)
def test_parse_series_takes_any_json_and_answers_series_or_a_value_error(junk: Any) -> None:
    try:
        got = parse_series(junk)
    except ValueError:
        return
    assert all(isinstance(s, Series) for s in got)


@pytest.mark.parametrize(("text", "want"), [("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("90", 90.0), ("1500ms", 1.5)])
def test_a_window_is_a_duration(text: str, want: float) -> None:
    assert parse_window(text) == want


@pytest.mark.parametrize("text", ["", "5 minutes", "-5m", "0s", "25h", "1d", "nan"])
def test_a_bad_window_is_refused_naming_the_field(text: str) -> None:
    with pytest.raises(ValueError, match="^window: "):
        parse_window(text)


@given(st.text(max_size=12))
def test_any_window_text_is_a_duration_in_range_or_refused_naming_the_field(text: str) -> None:
    try:
        got = parse_window(text)
    except ValueError as exc:
        assert str(exc).startswith("window: "), f"expected the error to name window, got {exc}"
        return
    assert 1.0 <= got <= 86_400.0, f"expected a window between 1 s and 24 h from {text!r}, got {got}"


def test_a_namespace_keeps_the_edges_that_start_or_end_there_and_their_other_ends() -> None:
    shop_web, bank_pay = WEB, Service(name="pay", namespace="bank", ports=[ServicePort(name="http", port=80)])
    q = Queried(requests=[out("client.shop", "web_shop_svc_mesh", [0, 5]), out("web.shop", "pay_bank_svc_mesh", [0, 3]),
                          out("batch.ops", "pay_bank_svc_mesh", [0, 2])],
                services=[shop_web, bank_pay])
    topo = topology(q, namespace="shop")
    assert set(edges(topo)) == {("client.shop", "web.shop"), ("web.shop", "pay.bank")}, f"expected shop's edges only, got {topo['edges']}"
    assert [n["id"] for n in topo["nodes"]] == ["client.shop", "pay.bank", "web.shop"], f"expected shop's nodes and pay, got {topo['nodes']}"
    assert len(topology(q)["edges"]) == 3
