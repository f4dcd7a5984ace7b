"""Bodies nested too deep for a recursive parser answer 4xx on every HTTP front door (never a 500),
and the bounded JSON decoder accepts exactly up to its limit."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpilot import boundedjson
from meshpilot.consul.agent import ConsulAgent
from meshpilot.consul.http import build_consul_app
from meshpilot.controlplane import ControlPlane
from meshpilot.eureka.front import EurekaFront
from meshpilot.eureka.http import build_eureka_app
from meshpilot.kube.inject import InjectConfig
from meshpilot.kube.webhook import build_app as build_webhook
from meshpilot.registry import Registry
from meshpilot.registry.store import MemoryStore
from meshpilot.settings import Settings

DEEP_JSON = b"[" * 100_000 + b"]" * 100_000
DEEP_OBJECT = b'{"a":' * 5_000 + b"1" + b"}" * 5_000  # decodes in Python, too deep for what walks it later
DEEP_XML = b"<instance>" + b"<a>" * 100_000 + b"</a>" * 100_000 + b"</instance>"


def _api(tmp: Path) -> web.Application:
    return ControlPlane(Settings(store="memory:")).api_app()


def _consul(tmp: Path) -> web.Application:
    return build_consul_app(ConsulAgent(Registry(MemoryStore())))


def _eureka(tmp: Path) -> web.Application:
    return build_eureka_app(EurekaFront(Registry(MemoryStore())))


def _webhook(tmp: Path) -> web.Application:
    return build_webhook(InjectConfig())


CASES = [
    ("management", _api, "PUT", "/v1/services/default/web", DEEP_JSON, "application/json"),
    ("management", _api, "POST", "/v1/services", DEEP_OBJECT, "application/json"),
    ("consul", _consul, "PUT", "/v1/agent/service/register", DEEP_JSON, "application/json"),
    ("consul", _consul, "PUT", "/v1/agent/service/register", DEEP_OBJECT, "application/json"),
    ("eureka", _eureka, "POST", "/eureka/apps/ORDERS", DEEP_JSON, "application/json"),
    ("eureka", _eureka, "POST", "/eureka/apps/ORDERS", DEEP_XML, "application/xml"),
    ("webhook", _webhook, "POST", "/inject", DEEP_JSON, "application/json"),
    ("webhook", _webhook, "POST", "/inject", DEEP_OBJECT, "application/json"),
]


@pytest.mark.parametrize("door,factory,method,path,body,ctype", CASES, ids=[f"{c[0]}-{c[2]}-{c[5]}-{len(c[4])}" for c in CASES])
async def test_deeply_nested_body_is_a_4xx(tmp_path: Path, door: str, factory: Callable[[Path], web.Application],
                                          method: str, path: str, body: bytes, ctype: str) -> None:
    client = TestClient(TestServer(factory(tmp_path)))
    await client.start_server()
    try:
        resp = await client.request(method, path, data=body, headers={"Content-Type": ctype})
        text = await resp.text()
        assert 400 <= resp.status < 500, f"{door} {method} {path}: expected a 4xx for a deeply nested body, got {resp.status}: {text[:300]}"
        assert "nested deeper" in text, f"{door}: expected the answer to say the body is nested too deep, got {text[:300]!r}"
    finally:
        await client.close()


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def test_the_limit_is_exact() -> None:
    assert boundedjson.loads(_nested(boundedjson.MAX_DEPTH)) is not None
    with pytest.raises(ValueError, match="nested deeper than 64"):
        boundedjson.loads(_nested(boundedjson.MAX_DEPTH + 1))
    wide = json.dumps([[1, 2]] * 1000).encode()  # many brackets, shallow
    assert boundedjson.loads(wide) == [[1, 2]] * 1000
    got = boundedjson.loads(b"[5.0, 1e3, 1.5]")
    assert got == [5, 1000, 1.5] and [type(v) for v in got] == [int, int, float], f"integral numbers decode as integers, got {got!r}"


json_values = st.recursive(st.none() | st.integers() | st.text(max_size=5),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=40)


def _depth(v: object) -> int:
    if isinstance(v, dict):
        return 1 + max(map(_depth, v.values()), default=0)
    if isinstance(v, list):
        return 1 + max(map(_depth, v), default=0)
    return 0


@settings(max_examples=300)
@given(json_values, st.integers(min_value=1, max_value=8))
def test_loads_agrees_with_json_below_the_limit_and_refuses_above(doc: object, limit: int) -> None:
    raw = json.dumps(doc).encode()
    if _depth(doc) <= limit:
        assert boundedjson.loads(raw, limit) == doc
    else:
        with pytest.raises(boundedjson.TooDeep):
            boundedjson.loads(raw, limit)
