"""The sidecar agent with several control-plane replicas: ``--control-plane a:p,b:p`` reaches Envoy's bootstrap,
meshdns' table stream, the certificate's enrolment and renewals, and the management-API calls, each of which
moves to another replica when one fails (in-process HTTP servers on 127.0.0.1, no process)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from aiohttp import web

from meshpilot.sidecar.agent import AgentConfig, _Agent, dns_config
from meshpilot.sidecar.command import _api_urls, _control_planes
from meshpilot.sidecar.render import SidecarOptions, identity_settings, render_bootstrap
from meshpilot.sidecar.spec import load_spec

SPEC = """
metadata: {name: reviews, namespace: shop}
spec:
  ports: [{name: http, port: 80, targetPort: 9080}]
"""
REPLICAS = (("10.0.0.5", 15010), ("10.0.0.6", 15010), ("fd00::7", 16010))


def _endpoints(boot: dict[str, object]) -> list[tuple[str, int]]:
    xds = next(c for c in boot["static_resources"]["clusters"] if c["name"] == "meshpilot-xds")  # type: ignore[index]
    return [(e["endpoint"]["address"]["socket_address"]["address"], e["endpoint"]["address"]["socket_address"]["port_value"])
            for g in xds["load_assignment"]["endpoints"] for e in g["lb_endpoints"]]


def test_every_replica_reaches_envoys_bootstrap_and_meshdns() -> None:
    opts = SidecarOptions(control_plane_host="10.0.0.5", control_plane_port=15010, control_planes=REPLICAS,
                          node_id="reviews-1")
    spec = load_spec(SPEC)
    assert _endpoints(render_bootstrap(spec, opts)) == list(REPLICAS)
    d = dns_config(spec, opts, "reviews-1", Path("/w"))
    assert d.control_plane == "10.0.0.5:15010,10.0.0.6:15010,[fd00::7]:16010", f"got {d.control_plane}"
    one = SidecarOptions(control_plane_host="10.0.0.5", control_plane_port=15010, node_id="reviews-1")
    assert _endpoints(render_bootstrap(spec, one)) == [("10.0.0.5", 15010)], "one address works as before"
    assert dns_config(spec, one, "reviews-1", Path("/w")).control_plane == "10.0.0.5:15010"


def test_the_signer_knows_every_replicas_xds_and_enrolment_port(tmp_path: Path) -> None:
    spec = load_spec(SPEC)
    opts = SidecarOptions(control_planes=REPLICAS, node_id="reviews-1", trust_bundle_file=str(tmp_path / "b.pem"))
    agent = _Agent(AgentConfig(spec=spec, options=opts, api_url="http://127.0.0.1:9", workdir=tmp_path / "w"))
    signer = agent.identity.signer if agent.identity else None
    assert signer is not None
    assert signer.targets == ["10.0.0.5:15010", "10.0.0.6:15010", "[fd00::7]:16010"], signer.targets  # type: ignore[attr-defined]
    assert signer.enrol_targets == ["10.0.0.5:15012", "10.0.0.6:15012", "[fd00::7]:16012"]  # type: ignore[attr-defined]
    s = identity_settings(spec, opts)
    assert s is not None and s.server_name == "localhost", "replicas by address: the control plane's name is localhost"


def test_the_command_line_list() -> None:
    assert _control_planes("10.0.0.5:15010,10.0.0.6", "sidecar") == (("10.0.0.5", 15010), ("10.0.0.6", 15010))
    assert _api_urls(None, REPLICAS) == ("http://10.0.0.5:15014", "http://10.0.0.6:15014", "http://[fd00::7]:15014")
    assert _api_urls(None, (("cp", 15010), ("cp", 16010))) == ("http://cp:15014",), "one host, one API"
    assert _api_urls("http://a:1/, http://b:2", REPLICAS) == ("http://a:1", "http://b:2")


def test_a_wrong_list_is_refused_with_what_is_wrong(capsys: pytest.CaptureFixture[str]) -> None:
    assert _control_planes("10.0.0.5:15010,,10.0.0.6:15010", "sidecar") is None
    err = capsys.readouterr().err
    assert "meshpilot sidecar: --control-plane" in err and "empty entry" in err, err
    assert _control_planes("a:1,a:1", "identity-files") is None
    assert "listed twice" in capsys.readouterr().err


async def _api(name: str, status: int) -> tuple[web.AppRunner, str, list[str]]:
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path}")
        if status != 200:
            return web.Response(status=status, text=f"{name} cannot serve")
        if request.path.endswith("/synced"):
            return web.json_response({"synced": True})
        return web.json_response({"name": "reviews", "replica": name})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}", seen


async def test_the_management_api_calls_move_past_a_dead_or_unavailable_replica(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import socket

    import aiohttp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    cut_off, cut_off_url, cut_off_seen = await _api("cut-off", 503)
    live, live_url, live_seen = await _api("live", 200)
    caplog.set_level(logging.INFO, logger="meshpilot.sidecar")
    agent = _Agent(AgentConfig(spec=load_spec(SPEC), options=SidecarOptions(node_id="reviews-1"),
                               api_url=dead, api_urls=(dead, cut_off_url, live_url), workdir=tmp_path))
    try:
        async with aiohttp.ClientSession() as http:
            await agent.ensure_service(http)
            assert await agent.wait_synced(http, 2.0), "expected the live replica to say synced"
            await agent.deregister(http)
    finally:
        await cut_off.cleanup()
        await live.cleanup()
    assert cut_off_seen == ["GET /v1/services/shop/reviews"], f"asked once, then left: {cut_off_seen}"
    assert live_seen == ["GET /v1/services/shop/reviews", "GET /v1/services/shop/reviews/synced",
                         "DELETE /v1/instances/reviews-1"], f"the answering replica is asked first from then on: {live_seen}"
    assert f"event=api_replica api={live_url}" in caplog.text, caplog.text
