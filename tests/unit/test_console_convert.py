"""Reading policy text: a number JSON cannot carry is refused naming ``text``, whichever format it is read
as (YAML's ``.inf``, and JSON's ``1e999``, which Python reads as infinity); the reading and rendering run off
the event loop, with libyaml's reader when pyyaml has it."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from meshpilot.api.app import ApiError
from meshpilot.console import plugin as console
from meshpilot.console.plugin import parse_text
from meshpilot.controlplane import ControlPlane
from meshpilot.settings import Settings

TOKEN = "console-convert-t0ken"


@pytest.mark.parametrize("text,fmt", [("1e999", "json"), ('{"rate": -1e400}', "json"), ("[1, 2e308]", "json"), ("rate: .inf\n", "yaml")])
def test_infinity_is_refused_naming_text(text: str, fmt: str) -> None:
    with pytest.raises(ApiError) as caught:
        doc = parse_text(text, fmt)
        pytest.fail(f"expected {text!r} ({fmt}) refused, got {doc!r}")
    assert caught.value.status == 400 and caught.value.fields == [{"field": "text", "reason": "NaN or infinity"}], \
        f"expected a 400 naming text (NaN or infinity), got {caught.value.status} {caught.value.fields}"


async def test_convert_reads_and_renders_off_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading 256 KiB of YAML takes a second or more; on the loop it would stall xDS and the API, so the
    handler reads and renders in a worker thread."""
    threads: dict[str, int] = {}
    real_parse, real_render = console.parse_text, console.render_text

    def parse(text: str, fmt: str) -> Any:
        threads["parse"] = threading.get_ident()
        return real_parse(text, fmt)

    def render(doc: Any, fmt: str, sort_keys: bool = False) -> str:
        threads["render"] = threading.get_ident()
        return real_render(doc, fmt, sort_keys)

    monkeypatch.setattr(console, "parse_text", parse)
    monkeypatch.setattr(console, "render_text", render)
    cp = ControlPlane(Settings(store=f"sqlite:{tmp_path / 'db.sqlite'}", token=TOKEN))
    cp.include(console.install(cp))
    client = TestClient(TestServer(cp.api_app()))
    await client.start_server()
    try:
        resp = await client.post("/ui/api/convert", json={"text": "a: [1, 2]\n", "to": "json"}, headers={"Authorization": f"Bearer {TOKEN}"})
        data = await resp.json()
    finally:
        await client.close()
        cp.registry.store.close()
    assert resp.status == 201 and data["document"] == {"a": [1, 2]}, f"expected the document read, got {resp.status}: {data}"
    loop_thread = threading.get_ident()
    assert set(threads) == {"parse", "render"} and loop_thread not in threads.values(), \
        f"expected parse and render on a worker thread, not the loop's ({loop_thread}), got {threads}"


@pytest.mark.skipif(not getattr(yaml, "__with_libyaml__", False), reason="pyyaml built without libyaml")
def test_yaml_is_read_with_libyaml_when_pyyaml_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """libyaml reads 256 KiB in a fraction of the pure-Python reader's time; the pure-Python reader is not used."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("expected libyaml's reader, got pyyaml's pure-Python reader")

    monkeypatch.setattr(yaml.SafeLoader, "__init__", refuse)
    doc = parse_text("kind: RoutingPolicy\nroutes: [{weight: 90}]\n", "yaml")
    assert doc == {"kind": "RoutingPolicy", "routes": [{"weight": 90}]}, f"expected the document read, got {doc!r}"
