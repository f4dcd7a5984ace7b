"""Encoder from plain policy dicts to the text configuration of meshpilot's WASM filter.

The filter (``filters/mesh``) reads a small line-based format with its own parser (no JSON or protobuf
inside the VM). The policy layer turns ``CircuitBreakerPolicy`` / ``RateLimitPolicy`` objects into one
dict per Envoy and calls :func:`encode`; the result goes into the Wasm filter's ``configuration``
(a ``google.protobuf.StringValue``) and travels by ECDS. :func:`encode` validates with the same limits
as the filter, so a policy the API accepts is never NACKed by the filter; errors name the field.

Input shape (every key optional unless marked required; dataclasses are accepted too)::

    {
      "tick_ms": 100,                    # how often workers fold their counters into shared data
      "max_keys": 1024,                  # distinct targets / bucket keys per rule (bounded key space)
      "breakers": [{
        "name": "orders",                # required; [A-Za-z0-9_.-]{1,64}, unique among breakers
        "match": {"cluster": "orders", "route": "orders-get", "method": "GET", "path": "/orders/{id}"},
        "per": "service",                # service (upstream cluster) | route (xds.route_name) | rule
        "sliding_window_type": "count",  # count | time
        "sliding_window_size": 100,      # calls (count, <= 4096) or seconds (time, <= 600)
        "minimum_calls": 10,
        "failure_rate_threshold": 50,    # percent, (0, 100]
        "failure_status_codes": ["5xx"], # ints, "5xx" classes, "500-504" ranges or (lo, hi) tuples
        "slow_call_duration": 0,         # seconds (number) or "500ms"/"2s"; 0 = no slow-call tracking
        "slow_call_rate_threshold": 100, # percent
        "wait_duration_in_open": 30,     # seconds or "30s"
        "permitted_calls_in_half_open": 3,
        "reply": {"status": 503, "body": "circuit open\\n", "headers": {"x-team": "orders"}},
      }],
      "rate_limits": [{
        "name": "per-caller",            # required, unique among rate limits
        "match": {...},                  # as above
        "key": "caller",                 # service | route | caller | rule | {"header": "x-user"}
        "rate": 100,                     # tokens per second (number) or "6000/m", "100/s", "10/h"
        "burst": 20,                     # required, bucket size >= 1
        "reply": {"status": 429, "body": "...", "headers": {...}},
      }],
    }
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["FilterConfigError", "encode"]

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_HEADER = re.compile(r"^[a-z0-9_.\-]{1,128}$")
# a header value as HTTP allows it and Envoy sends it: visible ASCII, inner spaces and tabs (no control
# characters, which also covers every character a line-splitting reader could take for a line break)
_HEADER_VALUE = re.compile(r"^([\x21-\x7e]([\x20-\x7e\t]*[\x21-\x7e])?)?$")
_METHOD = re.compile(r"^[A-Z]{1,32}$")
_DURATION = re.compile(r"^(\d{1,12}(?:\.\d{1,6})?)(ms|s|m|h)$")
_RATE = re.compile(r"^\s*(\d{1,12}(?:\.\d{1,6})?)\s*/\s*([smh])\s*$")
_UNIT_NS = {"ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}
_MAX_DURATION_NS = 24 * 3600 * 10**9


class FilterConfigError(ValueError):
    """A policy that cannot become filter configuration; ``field`` is a path like ``breakers[0].name``."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _mapping(field: str, value: Any) -> Mapping[str, Any]:
    value = _plain(value)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise FilterConfigError(field, f"expected a mapping, got {type(value).__name__}")
    return value


def _check_keys(field: str, value: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise FilterConfigError(f"{field}.{unknown[0]}", f"unknown field (allowed: {', '.join(sorted(allowed))})")


def _int(field: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FilterConfigError(field, f"expected an integer, got {value!r}")
    if not lo <= value <= hi:
        raise FilterConfigError(field, f"expected {lo}..{hi}, got {value}")
    return value


def _decimal(value: float | int) -> str:
    """A non-negative number as the filter reads it: at most six fractional digits, no exponent."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text or "0"


def _percent(field: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FilterConfigError(field, f"expected a percentage, got {value!r}")
    if not 0 < value <= 100:
        raise FilterConfigError(field, f"expected a percentage in (0, 100], got {value}")
    bp = round(value * 100)
    if bp == 0:
        raise FilterConfigError(field, f"expected at least 0.01, got {value}")
    return _decimal(bp / 100)


def _duration(field: str, value: Any, *, minimum_ns: int = 0) -> str:
    if isinstance(value, str):
        m = _DURATION.match(value.strip())
        if not m and value.strip() != "0":
            raise FilterConfigError(field, f"expected a duration like '500ms' or '2s', got {value!r}")
        ns = 0 if not m else int(float(m.group(1)) * _UNIT_NS[m.group(2)])
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        ns = round(value * 10**9)
    else:
        raise FilterConfigError(field, f"expected seconds or a duration string, got {value!r}")
    if ns > _MAX_DURATION_NS:
        raise FilterConfigError(field, f"at most 24h, got {value!r}")
    if ns < minimum_ns:
        raise FilterConfigError(field, f"at least {minimum_ns // 10**6}ms, got {value!r}")
    if ns == 0:
        return "0"
    if ns % 10**6 == 0:
        return f"{ns // 10**6}ms"
    return f"{_decimal(ns / 10**6)}ms"


def _micro(number: str) -> int:
    """A decimal string (``12`` or ``0.5``, at most six fractional digits) in millionths, exactly."""
    whole, _, frac = number.partition(".")
    return int(whole) * 10**6 + int((frac + "000000")[:6])


def _rate(field: str, value: Any) -> str:
    if isinstance(value, str):
        m = _RATE.match(value)
        if not m:
            raise FilterConfigError(field, f"expected tokens per second or a rate like '100/s', '6000/m', got {value!r}")
        number, unit = m.group(1), m.group(2)
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        number, unit = _decimal(value), "s"
    else:
        raise FilterConfigError(field, f"expected a number or a rate string, got {value!r}")
    per_s_micro = _micro(number) // {"s": 1, "m": 60, "h": 3600}[unit]
    if per_s_micro < 1:
        raise FilterConfigError(field, f"must be a positive rate of at least 0.000001/s, got {value!r}")
    if per_s_micro > 10**12:
        raise FilterConfigError(field, f"at most 1000000/s, got {value!r}")
    return f"{number}/{unit}"


def _statuses(field: str, value: Any) -> str:
    if isinstance(value, (str, int, tuple)):
        value = [value]
    if not isinstance(value, Sequence) or not value or len(value) > 32:
        raise FilterConfigError(field, "expected 1..32 status codes, classes or ranges")
    parts = []
    for i, item in enumerate(value):
        f = f"{field}[{i}]"
        if isinstance(item, tuple) or (isinstance(item, list) and len(item) == 2):
            lo, hi = (_int(f, x, 100, 599) for x in item)
            if lo > hi:
                raise FilterConfigError(f, f"range {lo}-{hi} is reversed")
            parts.append(f"{lo}-{hi}")
        elif isinstance(item, int) and not isinstance(item, bool):
            parts.append(str(_int(f, item, 100, 599)))
        elif isinstance(item, str) and re.fullmatch(r"[1-5]xx", item):
            parts.append(item)
        elif isinstance(item, str) and re.fullmatch(r"\d{3}(-\d{3})?", item):
            nums = [int(x) for x in item.split("-")]
            for n in nums:
                _int(f, n, 100, 599)
            if len(nums) == 2 and nums[0] > nums[1]:
                raise FilterConfigError(f, f"range {item} is reversed")
            parts.append(item)
        else:
            raise FilterConfigError(f, f"expected a code, '5xx' or '500-504', got {item!r}")
    return ", ".join(parts)


def _text_value(field: str, value: Any, limit: int) -> str:
    if not isinstance(value, str) or not value.strip() or len(value.encode()) > limit:
        raise FilterConfigError(field, f"expected a non-empty string of at most {limit} bytes, got {value!r}")
    if value != value.strip() or any(c in value for c in "\r\n\0"):
        raise FilterConfigError(field, "must not have surrounding spaces or control characters")
    return value


def _match(field: str, value: Any) -> list[str]:
    m = _mapping(field, value)
    _check_keys(field, m, {"cluster", "route", "method", "path"})
    lines = []
    for key in ("cluster", "route"):
        if m.get(key) is not None:
            v = _text_value(f"{field}.{key}", m[key], 256)
            if "#" in v[:1]:
                raise FilterConfigError(f"{field}.{key}", "must not start with '#'")
            lines.append(f"match.{key} = {v}")
    if m.get("method") is not None:
        if not isinstance(m["method"], str) or not _METHOD.match(m["method"]):
            raise FilterConfigError(f"{field}.method", f"expected an upper-case HTTP method, got {m['method']!r}")
        lines.append(f"match.method = {m['method']}")
    if m.get("path") is not None:
        path = m["path"]
        ok = isinstance(path, str) and path.startswith("/") and len(path) <= 512
        if ok:
            segments = path[1:].split("/")
            for i, seg in enumerate(segments):
                if seg == "**":
                    ok = ok and i == len(segments) - 1
                elif seg == "*" or (len(seg) > 2 and seg.startswith("{") and seg.endswith("}")):
                    continue
                elif any(c in seg for c in "*{}?") or any(ord(c) <= 32 for c in seg):
                    ok = False
        if not ok:
            raise FilterConfigError(f"{field}.path", f"expected a template like /orders/{{id}} or /api/**, got {path!r}")
        lines.append(f"match.path = {path}")
    return lines


def _escape_body(body: str) -> str:
    return body.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")


def _reply(field: str, value: Any) -> list[str]:
    r = _mapping(field, value)
    _check_keys(field, r, {"status", "body", "headers"})
    lines = []
    if r.get("status") is not None:
        lines.append(f"reply_status = {_int(f'{field}.status', r['status'], 200, 599)}")
    if r.get("body") is not None:
        body = r["body"]
        if not isinstance(body, str) or "\r" in body or "\0" in body or len(body.encode()) > 4096:
            raise FilterConfigError(f"{field}.body", "expected text of at most 4096 bytes without CR or NUL")
        escaped = _escape_body(body)
        if escaped != escaped.strip():
            raise FilterConfigError(f"{field}.body", "must not start or end with spaces")
        line = f"reply_body = {escaped}"
        if len(line.encode()) > 4096:
            raise FilterConfigError(f"{field}.body", "longer than 4096 bytes once escaped")
        lines.append(line)
    headers = _mapping(f"{field}.headers", r.get("headers"))
    if len(headers) > 16:
        raise FilterConfigError(f"{field}.headers", "at most 16 headers")
    for name, hv in headers.items():
        f = f"{field}.headers.{name}"
        if not isinstance(name, str) or not _HEADER.match(name):
            raise FilterConfigError(f, "header names are lower-case tokens")
        if not isinstance(hv, str) or len(hv) > 1024 or not _HEADER_VALUE.match(hv):
            raise FilterConfigError(f, "header values are visible ASCII (inner spaces allowed), at most 1024 characters")
        lines.append(f"reply_header = {name}: {hv}")
    return lines


_BREAKER_FIELDS = {
    "name", "match", "per", "sliding_window_type", "sliding_window_size", "minimum_calls",
    "failure_rate_threshold", "failure_status_codes", "slow_call_duration", "slow_call_rate_threshold",
    "wait_duration_in_open", "permitted_calls_in_half_open", "reply",
}
_LIMIT_FIELDS = {"name", "match", "key", "rate", "burst", "reply"}


def _name(field: str, value: Any, seen: set[str]) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise FilterConfigError(field, f"expected 1..64 of A-Z a-z 0-9 - _ ., got {value!r}")
    if value in seen:
        raise FilterConfigError(field, f"duplicate name {value!r}")
    seen.add(value)
    return value


def _breaker(field: str, b: Mapping[str, Any], seen: set[str]) -> list[str]:
    _check_keys(field, b, _BREAKER_FIELDS)
    lines = [f"[breaker {_name(f'{field}.name', b.get('name'), seen)}]"]
    lines += _match(f"{field}.match", b.get("match"))
    per = b.get("per", "service")
    if per not in ("service", "route", "rule"):
        raise FilterConfigError(f"{field}.per", f"expected service, route or rule, got {per!r}")
    lines.append(f"per = {per}")
    kind = b.get("sliding_window_type", "count")
    if kind not in ("count", "time"):
        raise FilterConfigError(f"{field}.sliding_window_type", f"expected count or time, got {kind!r}")
    size = _int(f"{field}.sliding_window_size", b.get("sliding_window_size", 100), 1, 4096 if kind == "count" else 600)
    minimum = _int(f"{field}.minimum_calls", b.get("minimum_calls", min(10, size)), 1, 1_000_000)
    if kind == "count" and minimum > size:
        raise FilterConfigError(f"{field}.minimum_calls", f"{minimum} exceeds the count window of {size}; it could never open")
    lines += [f"window = {kind}", f"window_size = {size}", f"min_calls = {minimum}"]
    lines.append(f"failure_rate = {_percent(f'{field}.failure_rate_threshold', b.get('failure_rate_threshold', 50))}")
    if b.get("failure_status_codes") is not None:
        lines.append(f"failure_status = {_statuses(f'{field}.failure_status_codes', b['failure_status_codes'])}")
    lines.append(f"slow_call_duration = {_duration(f'{field}.slow_call_duration', b.get('slow_call_duration', 0))}")
    lines.append(f"slow_call_rate = {_percent(f'{field}.slow_call_rate_threshold', b.get('slow_call_rate_threshold', 100))}")
    wait = _duration(f"{field}.wait_duration_in_open", b.get("wait_duration_in_open", 30), minimum_ns=10**6)
    lines.append(f"open_wait = {wait}")
    lines.append(f"half_open_calls = {_int(f'{field}.permitted_calls_in_half_open', b.get('permitted_calls_in_half_open', 3), 1, 1000)}")
    lines += _reply(f"{field}.reply", b.get("reply"))
    return lines


def _limit(field: str, r: Mapping[str, Any], seen: set[str]) -> list[str]:
    _check_keys(field, r, _LIMIT_FIELDS)
    lines = [f"[ratelimit {_name(f'{field}.name', r.get('name'), seen)}]"]
    lines += _match(f"{field}.match", r.get("match"))
    key = _plain(r.get("key", "rule"))
    if isinstance(key, Mapping):
        _check_keys(f"{field}.key", key, {"header"})
        key = f"header:{key.get('header')}"
    if not isinstance(key, str):
        raise FilterConfigError(f"{field}.key", f"expected service, route, caller, rule or {{'header': name}}, got {key!r}")
    if key.startswith("header:"):
        if not _HEADER.match(key[len("header:"):]):
            raise FilterConfigError(f"{field}.key", f"header names are lower-case tokens, got {key[len('header:'):]!r}")
    elif key not in ("service", "route", "caller", "rule"):
        raise FilterConfigError(f"{field}.key", f"expected service, route, caller, rule or {{'header': name}}, got {key!r}")
    lines.append(f"key = {key}")
    if r.get("rate") is None:
        raise FilterConfigError(f"{field}.rate", "required")
    lines.append(f"rate = {_rate(f'{field}.rate', r['rate'])}")
    if r.get("burst") is None:
        raise FilterConfigError(f"{field}.burst", "required")
    lines.append(f"burst = {_int(f'{field}.burst', r['burst'], 1, 100_000_000)}")
    lines += _reply(f"{field}.reply", r.get("reply"))
    return lines


def encode(policy: Mapping[str, Any] | Any) -> str:
    """Renders the filter configuration for one Envoy; raises :class:`FilterConfigError`."""
    p = _mapping("config", policy)
    _check_keys("config", p, {"tick_ms", "max_keys", "breakers", "rate_limits"})
    lines = ["# meshpilot filter configuration", "[filter]", "version = 1"]
    lines.append(f"tick_ms = {_int('tick_ms', p.get('tick_ms', 100), 10, 10_000)}")
    lines.append(f"max_keys = {_int('max_keys', p.get('max_keys', 1024), 1, 100_000)}")
    for section, build in (("breakers", _breaker), ("rate_limits", _limit)):
        items = _plain(p.get(section) or [])
        if not isinstance(items, Sequence) or isinstance(items, (str, bytes)):
            raise FilterConfigError(section, "expected a list")
        if len(items) > 64:
            raise FilterConfigError(section, "at most 64 rules")
        seen: set[str] = set()
        for i, item in enumerate(items):
            lines.append("")
            lines += build(f"{section}[{i}]", _mapping(f"{section}[{i}]", item), seen)
    text = "\n".join(lines) + "\n"
    if len(text.encode()) > 64 * 1024:
        raise FilterConfigError("config", f"renders to {len(text.encode())} bytes, at most 65536")
    return text
