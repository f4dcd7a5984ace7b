"""The Python encoder of the filter configuration: field-level errors. Its agreement with the filter's own
parser (the native `check-config` binary) on these policies: tests/e2e/test_filter_accepts_what_the_encoder_renders.py."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshpilot.wasm.config import FilterConfigError, encode

FULL = {
    "tick_ms": 50,
    "max_keys": 64,
    "breakers": [{
        "name": "orders", "match": {"cluster": "orders", "method": "GET", "path": "/orders/{id}"},
        "per": "rule", "sliding_window_type": "time", "sliding_window_size": 30, "minimum_calls": 20,
        "failure_rate_threshold": 50, "failure_status_codes": ["5xx", 429, (400, 401), "502-504"],
        "slow_call_duration": 1.5, "slow_call_rate_threshold": 80.5, "wait_duration_in_open": "30s",
        "permitted_calls_in_half_open": 5,
        "reply": {"status": 503, "body": "open\n\tnow \\", "headers": {"x-team": "orders: a"}},
    }],
    "rate_limits": [{"name": "per-user", "key": {"header": "x-user"}, "rate": "6000/m", "burst": 10,
                     "reply": {"status": 429}}],
}


def test_full_policy_renders() -> None:
    text = encode(FULL)
    assert "slow_call_duration = 1500ms" in text, f"expected seconds rendered as ms, got:\n{text}"
    assert "reply_body = open\\n\\tnow \\\\" in text, f"expected an escaped body, got:\n{text}"
    assert "key = header:x-user" in text, f"expected the header key, got:\n{text}"


@dataclass
class Limit:
    name: str
    rate: float
    burst: int
    key: str = "caller"
    match: dict = field(default_factory=dict)


def test_dataclasses_are_accepted() -> None:
    text = encode({"rate_limits": [Limit("c", 2.5, 3)]})
    assert "rate = 2.5/s" in text and "key = caller" in text, f"got:\n{text}"


@pytest.mark.parametrize(("policy", "field_path"), [
    ({"breakers": [{"name": "a", "failure_rate_threshold": 0}]}, "breakers[0].failure_rate_threshold"),
    ({"breakers": [{"name": "a", "sliding_window_size": 5, "minimum_calls": 6}]}, "breakers[0].minimum_calls"),
    ({"breakers": [{"name": "a", "sliding_window_type": "time", "sliding_window_size": 601}]}, "breakers[0].sliding_window_size"),
    ({"breakers": [{"name": "a"}, {"name": "a"}]}, "breakers[1].name"),
    ({"breakers": [{"name": "a", "match": {"path": "/a/**/b"}}]}, "breakers[0].match.path"),
    ({"breakers": [{"name": "a", "wait_duration_in_open": "10"}]}, "breakers[0].wait_duration_in_open"),
    ({"breakers": [{"name": "a", "failure_status_codes": [600]}]}, "breakers[0].failure_status_codes[0]"),
    ({"breakers": [{"name": "a", "reply": {"headers": {"X-Up": "1"}}}]}, "breakers[0].reply.headers.X-Up"),
    ({"breakers": [{"name": "a", "colour": "red"}]}, "breakers[0].colour"),
    ({"rate_limits": [{"name": "r", "burst": 1}]}, "rate_limits[0].rate"),
    ({"rate_limits": [{"name": "r", "rate": 0, "burst": 1}]}, "rate_limits[0].rate"),
    ({"rate_limits": [{"name": "r", "rate": "5/d", "burst": 1}]}, "rate_limits[0].rate"),
    ({"rate_limits": [{"name": "r", "rate": 5}]}, "rate_limits[0].burst"),
    ({"rate_limits": [{"name": "r", "rate": 5, "burst": 1, "key": "ip"}]}, "rate_limits[0].key"),
    ({"tick_ms": 5}, "tick_ms"),
    ({"rate_limits": [{"name": "bad name", "rate": 1, "burst": 1}]}, "rate_limits[0].name"),
])
def test_errors_name_the_field(policy: dict, field_path: str) -> None:
    with pytest.raises(FilterConfigError) as info:
        encode(policy)
    assert info.value.field == field_path, f"expected an error on {field_path}, got {info.value}"


_names = st.from_regex(r"[A-Za-z0-9_.\-]{1,20}", fullmatch=True)
_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=30)
_matches = st.fixed_dictionaries({}, optional={
    "cluster": _text, "route": _text, "method": st.sampled_from(["GET", "POST", "get", ""]),
    "path": st.sampled_from(["/", "/a/{id}", "/a/**", "/a/*/b", "a", "/a/**/b", "/{}", "/a b"]),
})
_durations = st.one_of(st.floats(min_value=0, max_value=100000, allow_nan=False),
                       st.sampled_from(["0", "1ms", "250ms", "1.5s", "2m", "1h", "25h", "10", "-1s", "0.0000001s"]))
_reply = st.fixed_dictionaries({}, optional={
    "status": st.integers(100, 700), "body": _text,
    "headers": st.dictionaries(st.sampled_from(["x-a", "X-B", "retry-after", "x_c"]), _text, max_size=3),
})
_breaker = st.fixed_dictionaries({"name": _names}, optional={
    "match": _matches, "per": st.sampled_from(["service", "route", "rule", "host"]),
    "sliding_window_type": st.sampled_from(["count", "time"]), "sliding_window_size": st.integers(0, 5000),
    "minimum_calls": st.integers(0, 5000), "failure_rate_threshold": st.floats(-1, 101, allow_nan=False),
    "failure_status_codes": st.lists(st.one_of(st.integers(90, 610), st.sampled_from(["5xx", "6xx", "500-504", "504-500"])), max_size=4),
    "slow_call_duration": _durations, "slow_call_rate_threshold": st.floats(0, 100, allow_nan=False),
    "wait_duration_in_open": _durations, "permitted_calls_in_half_open": st.integers(0, 1001), "reply": _reply,
})
_limit = st.fixed_dictionaries({"name": _names}, optional={
    "match": _matches, "key": st.sampled_from(["service", "route", "caller", "rule", "ip", {"header": "x-user"}, {"header": "X"}]),
    "rate": st.one_of(st.floats(0, 2e6, allow_nan=False), st.sampled_from(["100/s", "6000/m", "0.00006/m", "1/h", "1/d", "0.0000001/s"])),
    "burst": st.integers(0, 10), "reply": _reply,
})
_policy = st.fixed_dictionaries({}, optional={
    "tick_ms": st.integers(0, 20000), "max_keys": st.integers(0, 200000),
    "breakers": st.lists(_breaker, max_size=3), "rate_limits": st.lists(_limit, max_size=3),
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_policy)
def test_any_policy_renders_its_rules_or_names_the_field(policy: dict) -> None:
    try:
        text = encode(policy)
    except FilterConfigError as e:
        assert e.field and e.reason, f"expected a field and a reason, got {e!r}"
        return
    lines = text.split("\n")  # the filter reads lines split at LF only
    sections = [line for line in lines if line.startswith("[")]
    want = ["[filter]", *(f"[breaker {b['name']}]" for b in policy.get("breakers", [])),
            *(f"[ratelimit {r['name']}]" for r in policy.get("rate_limits", []))]
    assert sections == want, f"expected the sections {want}, got {sections} in:\n{text}"
    odd = [line for line in lines if line and not line.startswith(("#", "[")) and " = " not in line]
    assert not odd, f"expected every other line to be `key = value`, got {odd} in:\n{text}"


@pytest.mark.parametrize("value", ["a\x1eb", "caf\u00e9", "a\u2028b", "a\x07", "x\ty ", " x"])
def test_a_reply_header_value_beyond_visible_ascii_is_refused(value: str) -> None:
    policy = {"rate_limits": [{"name": "r", "rate": "10/s", "burst": 1, "reply": {"headers": {"x-a": value}}}]}
    encode({**policy, "rate_limits": [{**policy["rate_limits"][0], "reply": {"headers": {"x-a": "ok value"}}}]})  # the rest is fine
    with pytest.raises(FilterConfigError) as err:
        encode(policy)
    assert err.value.field == "rate_limits[0].reply.headers.x-a", f"expected the header named, got {err.value!r}"
