"""The node's workload identity: the renewal schedule as a pure machine, and the enrol/renew/bundle loop on
an injected clock against a fake signer backed by a real (in-memory) CA. No process, no socket."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshpilot import pki
from meshpilot.sidecar.identity import (
    Lifecycle,
    Material,
    Phase,
    SignError,
    SignResult,
    WorkloadIdentity,
    server_name_for,
)

TD = "mesh.test"
TTL = 3600.0


# ---- the schedule ---------------------------------------------------------------------------------------


def test_without_a_certificate_the_plan_is_to_enrol_now() -> None:
    plan = Lifecycle().plan(1000.0)
    assert (plan.phase, plan.at) == (Phase.ENROL, 1000.0)


def test_a_certificate_is_renewed_at_half_its_life() -> None:
    lc = Lifecycle()
    lc.issued(1000.0, 1000.0 + TTL, now=1000.0)
    plan = lc.plan(1001.0)
    assert (plan.phase, plan.at) == (Phase.RENEW, 1000.0 + TTL / 2)


def test_half_life_counts_from_arrival_not_from_the_backdated_start() -> None:
    lc = Lifecycle()
    lc.issued(940.0, 1060.0, now=1000.0)  # a 60 s certificate, backdated by 60 s
    assert lc.plan(1000.0).at == 1030.0, "renewing at once would renew in a loop"
    lc.issued(0.0, 100.0, now=80.0)  # loaded at a restart with 20 s left
    assert lc.plan(80.0).at == 90.0


def test_an_expired_certificate_means_enrolling_again() -> None:
    lc = Lifecycle()
    lc.issued(0.0, 100.0, now=0.0)
    assert lc.plan(99.9).phase is Phase.RENEW
    assert lc.plan(100.0).phase is Phase.ENROL


def test_failures_back_off_exponentially_up_to_the_cap() -> None:
    lc = Lifecycle(base_delay_s=1.0, max_delay_s=8.0, rand=lambda: 1.0)  # no jitter
    delays = [lc.failed(0.0, refused=False) for _ in range(6)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0], delays
    assert lc.plan(0.0).at == 8.0
    lc.issued(10.0, 110.0, now=10.0)
    assert lc.failures == 0 and lc.plan(11.0).at == 60.0, "a success must clear the back-off"


def test_a_failed_renewal_retries_after_the_delay_and_keeps_the_certificate() -> None:
    lc = Lifecycle(base_delay_s=1.0, rand=lambda: 1.0)
    lc.issued(0.0, 100.0, now=0.0)
    lc.failed(50.0, refused=False)
    plan = lc.plan(50.0)
    assert (plan.phase, plan.at) == (Phase.RENEW, 51.0)


def test_a_refused_renewal_drops_the_certificate() -> None:
    lc = Lifecycle(base_delay_s=1.0, rand=lambda: 1.0)
    lc.issued(0.0, 100.0, now=0.0)
    lc.failed(50.0, refused=True)
    plan = lc.plan(50.0)
    assert (plan.phase, plan.at) == (Phase.ENROL, 51.0)
    assert not lc.has_certificate(50.0)


@given(nb=st.floats(0, 1e9), life=st.floats(1, 1e7), now=st.floats(0, 2e9), fails=st.integers(0, 50),
       jitter=st.floats(0, 1), got=st.floats(0, 2e9))
def test_plans_are_never_before_the_half_life_nor_the_back_off(nb: float, life: float, now: float, fails: int,
                                                              jitter: float, got: float) -> None:
    lc = Lifecycle(base_delay_s=0.5, max_delay_s=30.0, rand=lambda: jitter)
    lc.issued(nb, nb + life, now=got)
    start = min(max(nb, got), nb + life)
    last = 0.0
    for _ in range(fails):
        last = lc.failed(now, refused=False)
        assert 0.25 <= last <= 30.0
    plan = lc.plan(now)
    if now >= nb + life:
        assert plan.phase is Phase.ENROL
    else:
        assert plan.phase is Phase.RENEW and plan.at >= start + ((nb + life) - start) / 2
    if fails:
        assert plan.at >= now + last


def test_the_server_name_is_the_host_or_localhost_for_an_address() -> None:
    assert server_name_for("cp.example") == "cp.example"
    assert server_name_for("10.0.0.1") == "localhost"
    assert server_name_for("[::1]") == "localhost"
    assert server_name_for("10.0.0.1", "cp.internal") == "cp.internal"


# ---- the loop -------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = time.time()
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s
        await asyncio.sleep(0)


@dataclass
class FakeSigner:
    """The control plane's Identity service with a real CA: token → identity, cert → renewal."""

    clock: Clock
    authority: pki.Authority = field(default_factory=lambda: pki.Authority.generate(TD))
    tokens: dict[str, tuple[str, str]] = field(default_factory=dict)  # secret → (ns, svc), single use
    calls: list[tuple[str, Material | None]] = field(default_factory=list)
    fail_with: SignError | None = None
    bundles: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    watchers: list[Material] = field(default_factory=list)
    trust_seen: list[bytes] = field(default_factory=list)

    @property
    def root(self) -> bytes:
        return self.authority.anchor_pem()

    async def sign(self, csr_pem: bytes, node_id: str, token: str, client: Material | None,
                   trust_pem: bytes) -> SignResult:
        self.calls.append((token, client))
        self.trust_seen.append(trust_pem)
        if self.fail_with is not None:
            raise self.fail_with
        if token:
            if token not in self.tokens:
                raise SignError("UNAUTHENTICATED", "unknown or used token", refused=True)
            ns, svc = self.tokens.pop(token)
            spiffe = pki.spiffe_id(TD, ns, svc)
        else:
            assert client is not None, "a renewal without a token must present the client certificate"
            if self.clock() >= client.not_after:
                raise SignError("UNAUTHENTICATED", "certificate expired", refused=True)
            spiffe = client.spiffe
        issued = self.authority.sign(csr_pem, spiffe, node_id, TTL, now=self.clock())
        return SignResult(issued.chain_pem, self.root, issued.not_after)

    async def watch_bundle(self, client: Material, trust_pem: bytes) -> AsyncIterator[bytes]:
        self.watchers.append(client)
        yield self.root
        while True:
            yield await self.bundles.get()


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "bundle.pem", tmp_path / "token"


def _identity(signer: FakeSigner, clock: Clock, tmp_path: Path, token_file: Path | None) -> WorkloadIdentity:
    bundle = tmp_path / "bundle.pem"
    if not bundle.exists():
        bundle.write_bytes(signer.root)
    return WorkloadIdentity(node_id="reviews-1", signer=signer, trust_bundle_file=bundle, join_token_file=token_file,
                            state_dir=tmp_path / "identity", clock=clock, sleep=clock.sleep,
                            lifecycle=Lifecycle(rand=lambda: 1.0))


def _with_token(tmp_path: Path, service: str = "reviews") -> tuple[Clock, FakeSigner, Path]:
    """A clock, a fake CA that takes join token "t" for shop/<service>, and that token in a file."""
    clock = Clock()
    signer = FakeSigner(clock)
    signer.tokens["t"] = ("shop", service)
    token = tmp_path / "token"
    token.write_text("t")
    return clock, signer, token


async def test_enrols_with_the_token_and_keeps_the_key_in_0600_files(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    signer = FakeSigner(clock)
    _, secret = pki.new_token()
    signer.tokens[secret] = ("shop", "reviews")
    (tmp_path / "token").write_text(secret + "\n")
    ident = _identity(signer, clock, tmp_path, tmp_path / "token")
    seen: list[Material] = []
    ident.add_listener(seen.append)
    with caplog.at_level(logging.INFO, "meshpilot.identity"):
        plan = await ident.step()
    assert plan.phase is Phase.ENROL
    assert signer.calls[0] == (secret, None), "first contact must carry the token and no client certificate"
    m = ident.material
    assert m is not None and seen == [m]
    assert m.spiffe == f"spiffe://{TD}/ns/shop/sa/reviews" and m.node_id == "reviews-1" and m.trust_domain == TD
    assert pki.peer_of(m.chain_pem) is not None
    assert "event=enrolled" in caplog.text and "spiffe://mesh.test/ns/shop/sa/reviews" in caplog.text
    assert secret not in caplog.text, "the join token must never be logged"
    d = tmp_path / "identity"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for name in ("key.pem", "cert.pem", "bundle.pem"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name
    assert (d / "key.pem").read_bytes() == m.key_pem and (d / "cert.pem").read_bytes() == m.chain_pem
    assert b"PRIVATE KEY" in m.key_pem


async def test_renews_at_half_life_with_its_certificate_and_a_new_key(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    clock, signer, _token = _with_token(tmp_path)
    ident = _identity(signer, clock, tmp_path, tmp_path / "token")
    await ident.step()
    first = ident.material
    assert first is not None
    start = clock()
    with caplog.at_level(logging.INFO, "meshpilot.identity"):
        while len(signer.calls) < 2:
            await ident.step()
    half = start + (first.not_after - start) / 2
    assert half <= clock() < half + 1, f"renewal must come at half-life, came {clock() - start:.0f} s after enrolment"
    token, client = signer.calls[1]
    assert token == "" and client == first, "a renewal authenticates with the current certificate, no token"
    second = ident.material
    assert second is not None and second.not_after > first.not_after and second.key_pem != first.key_pem
    assert second.spiffe == first.spiffe and ident.generation == 2
    assert "event=renewed" in caplog.text
    assert (tmp_path / "identity" / "cert.pem").read_bytes() == second.chain_pem


async def test_a_restarted_agent_renews_with_its_stored_certificate_without_a_token(tmp_path: Path) -> None:
    clock, signer, _token = _with_token(tmp_path)
    await _identity(signer, clock, tmp_path, tmp_path / "token").step()
    (tmp_path / "token").unlink()  # a single-use token is gone
    arrived = clock()
    os.utime(tmp_path / "identity" / "cert.pem", (arrived, arrived))
    clock.now += TTL * 0.6
    again = _identity(signer, clock, tmp_path, tmp_path / "token")
    assert again.material is not None, "the stored key and certificate must be loaded at start"
    assert again.lifecycle.plan(clock()).at == pytest.approx(arrived + TTL / 2, abs=1), (
        "past its half-life since it arrived, a loaded certificate is renewed at once")
    plan = await again.step()
    assert plan.phase is Phase.RENEW and signer.calls[-1][0] == "" and again.last_error is None


async def test_a_stored_certificate_of_another_node_is_not_used(tmp_path: Path) -> None:
    clock, signer, _token = _with_token(tmp_path)
    await _identity(signer, clock, tmp_path, tmp_path / "token").step()
    other = WorkloadIdentity(node_id="ratings-1", signer=signer, trust_bundle_file=tmp_path / "bundle.pem",
                             state_dir=tmp_path / "identity", clock=clock, sleep=clock.sleep)
    assert other.material is None and other.lifecycle.plan(clock()).phase is Phase.ENROL


async def test_without_a_token_enrolment_fails_with_a_reason_and_backs_off(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    signer = FakeSigner(clock)
    ident = _identity(signer, clock, tmp_path, tmp_path / "missing-token")
    with caplog.at_level(logging.INFO, "meshpilot.identity"):
        await ident.step()
        await ident.step()
    assert ident.material is None and signer.calls == []
    assert "event=enrol_failed reason=no_token" in caplog.text
    assert clock.slept and clock.slept[0] == pytest.approx(0.5), clock.slept


async def test_a_used_token_is_reported_and_retried(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    signer = FakeSigner(clock)
    (tmp_path / "token").write_text("spent")
    ident = _identity(signer, clock, tmp_path, tmp_path / "token")
    with caplog.at_level(logging.INFO, "meshpilot.identity"):
        await ident.step()
    assert "event=enrol_failed reason=UNAUTHENTICATED" in caplog.text and ident.material is None
    signer.tokens["fresh"] = ("shop", "reviews")
    (tmp_path / "token").write_text("fresh")  # the operator drops a new token in
    while ident.material is None:
        await ident.step()
    assert ident.material.spiffe.endswith("/ns/shop/sa/reviews")


async def test_an_unreachable_control_plane_keeps_the_certificate_until_it_expires(tmp_path: Path) -> None:
    clock, signer, _token = _with_token(tmp_path)
    ident = _identity(signer, clock, tmp_path, tmp_path / "token")
    await ident.step()
    held = ident.material
    assert held is not None
    signer.fail_with = SignError("UNAVAILABLE", "connection refused")
    while clock() < held.not_after:
        await ident.step()
        assert ident.material == held, "a failed renewal must not lose the current certificate"
    assert ident.lifecycle.plan(clock()).phase is Phase.ENROL, "past expiry only a token helps"
    retries = [c for c in signer.calls[1:] if c[0] == ""]
    assert len(retries) > 3 and all(c[1] == held for c in retries)
    assert max(clock.slept) <= 60.0, "sleeps are sliced so a jumping clock is noticed"


async def test_a_refused_renewal_falls_back_to_the_token(tmp_path: Path) -> None:
    clock, signer, _token = _with_token(tmp_path)
    ident = _identity(signer, clock, tmp_path, tmp_path / "token")
    await ident.step()
    signer.fail_with = SignError("UNAUTHENTICATED", "revoked", refused=True)
    while len(signer.calls) < 2:
        await ident.step()
    signer.fail_with = None
    signer.tokens["t2"] = ("shop", "reviews")
    (tmp_path / "token").write_text("t2")
    while len(signer.calls) < 3:
        await ident.step()
    assert signer.calls[2] == ("t2", None)


async def test_a_certificate_for_another_key_is_rejected(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock, signer, _token = _with_token(tmp_path)
    other = pki.build_csr(pki.new_key(), pki.spiffe_id(TD, "shop", "reviews"), "reviews-1")
    real_sign = signer.sign

    async def swapped(csr: bytes, node_id: str, token: str, client: Material | None, trust: bytes) -> SignResult:
        return await real_sign(other, node_id, token, client, trust)

    signer.sign = swapped  # type: ignore[method-assign,assignment]
    ident = _identity(signer, clock, tmp_path, tmp_path / "token")
    with caplog.at_level(logging.INFO, "meshpilot.identity"):
        await ident.step()
    assert ident.material is None and "reason=bad_certificate" in caplog.text


async def test_the_bundle_watch_tells_listeners_of_a_new_root(tmp_path: Path) -> None:
    clock, signer, _token = _with_token(tmp_path)
    ident = _identity(signer, clock, tmp_path, tmp_path / "token")
    seen: list[Material] = []
    ident.add_listener(seen.append)
    await ident.step()
    watch = asyncio.create_task(ident.watch_bundle())
    try:
        await asyncio.sleep(0.01)
        assert signer.watchers == [ident.material], "the bundle is watched with the current certificate"
        assert len(seen) == 1, "the same bundle again is no change"
        new_root = pki.Authority.generate(TD).anchor_pem()
        await signer.bundles.put(pki.bundle_pem([signer.root, new_root]))
        gen = await asyncio.wait_for(ident.wait_newer(1), 1.0)
    finally:
        watch.cancel()
    assert gen == 2 and len(seen) == 2
    assert new_root in seen[-1].bundle_pem and signer.root in seen[-1].bundle_pem
    assert seen[-1].chain_pem == seen[0].chain_pem
    assert (tmp_path / "identity" / "bundle.pem").read_bytes() == seen[-1].bundle_pem
    assert new_root in ident.trust_pem(), "the next channel trusts the new root too"


async def test_ready_waits_for_the_first_certificate(tmp_path: Path) -> None:
    clock, signer, _token = _with_token(tmp_path)
    ident = _identity(signer, clock, tmp_path, tmp_path / "token")
    waiter = asyncio.create_task(ident.ready())
    await asyncio.sleep(0)
    assert not waiter.done()
    await ident.step()
    m = await asyncio.wait_for(waiter, 1.0)
    assert m.spiffe.endswith("/sa/reviews")


# ---- meshdns's table stream over TLS with the node's identity -------------------------------------------


async def test_the_table_stream_uses_the_identity_and_reconnects_on_new_credentials(tmp_path: Path) -> None:
    import grpc

    from meshpilot.meshdns.ads import AdsState, run_ads
    from meshpilot.sidecar.identity import ChannelTls

    clock, signer, _token = _with_token(tmp_path)
    ident = _identity(signer, clock, tmp_path, tmp_path / "token")
    await ident.step()
    cp_key = pki.new_key()
    served = signer.authority.serve(cp_key, pki.control_plane_id(TD), ["localhost"], ["127.0.0.1"], TTL)
    peers: list[str] = []

    async def ads(request_iterator: object, context: grpc.aio.ServicerContext[object, object]) -> None:
        peer = pki.peer_from_context(context)
        peers.append(peer.spiffe if peer else "")
        async for _ in request_iterator:  # type: ignore[attr-defined]
            pass

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "envoy.service.discovery.v3.AggregatedDiscoveryService",
        {"DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(ads)})])
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
        [(pki.key_pem(cp_key), served.chain_pem)], root_certificates=signer.root, require_client_auth=True))
    await server.start()
    counters: dict[str, int] = {}

    async def on_change() -> None:
        pass

    feed = asyncio.create_task(run_ads(f"127.0.0.1:{port}", AdsState("reviews-1~meshdns"), on_change,
                                       backoff_initial=0.05, counters=counters, tls=ChannelTls(ident, "localhost")))
    watch = asyncio.create_task(ident.watch_bundle())
    try:
        async with asyncio.timeout(5):
            while not peers:
                await asyncio.sleep(0.01)
        assert peers == [f"spiffe://{TD}/ns/shop/sa/reviews"], f"the server saw {peers}"
        await signer.bundles.put(pki.bundle_pem([signer.root, pki.Authority.generate(TD).anchor_pem()]))
        async with asyncio.timeout(5):
            while len(peers) < 2:
                await asyncio.sleep(0.01)
    finally:
        feed.cancel()
        watch.cancel()
        await asyncio.gather(feed, watch, return_exceptions=True)
        await server.stop(None)
    assert counters.get("ads_credential_reconnects") == 1, counters
    assert peers[1] == peers[0]


# ---- files for a proxyless app ----------------------------------------------------------------------------


async def test_identity_files_are_swapped_together(tmp_path: Path) -> None:
    from meshpilot.sidecar.identity import publish_files

    clock, signer, _token = _with_token(tmp_path, "grpc-client")
    ident = _identity(signer, clock, tmp_path, tmp_path / "token")
    await ident.step()
    first = ident.material
    assert first is not None
    out = tmp_path / "files"
    gen1 = publish_files(out, first)
    assert (out / "key.pem").read_bytes() == first.key_pem and (out / "cert.pem").read_bytes() == first.chain_pem
    assert (out / "bundle.pem").read_bytes() == first.bundle_pem
    assert all((out / n).is_symlink() for n in ("key.pem", "cert.pem", "bundle.pem"))
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert stat.S_IMODE((gen1 / "key.pem").stat().st_mode) == 0o600
    clock.now += TTL / 2
    await ident.step()
    second = ident.material
    assert second is not None and second != first
    gen2 = publish_files(out, second)
    assert (out / "key.pem").read_bytes() == second.key_pem and (out / "cert.pem").read_bytes() == second.chain_pem
    assert (out / "..data").resolve() == gen2.resolve() and not gen1.exists(), "the old generation is removed"


# ---- the agent's settings and start ---------------------------------------------------------------------

SPEC = """
metadata: {name: reviews, namespace: shop}
spec:
  ports: [{name: http, port: 80, targetPort: 9080}]
mesh:
  dns: {enabled: false}
"""


def test_identity_is_off_without_a_trust_bundle_and_on_with_one() -> None:
    from meshpilot.sidecar.render import SidecarOptions, identity_settings
    from meshpilot.sidecar.spec import load_spec

    spec = load_spec(SPEC)
    assert identity_settings(spec, SidecarOptions()) is None
    s = identity_settings(spec, SidecarOptions(trust_bundle_file="/etc/mesh/bundle.pem", join_token_file="/t"))
    assert s is not None and (s.trust_bundle_file, s.join_token_file, s.server_name) == ("/etc/mesh/bundle.pem", "/t",
                                                                                          "localhost")
    on = load_spec(SPEC + "  identity: {enabled: true, trustBundleFile: /b.pem, joinTokenFile: /tok, trustDomain: corp.test,"
                          " controlPlaneName: cp.internal}\n")
    s = identity_settings(on, SidecarOptions())
    assert s is not None and (s.trust_bundle_file, s.join_token_file, s.trust_domain, s.server_name) == (
        "/b.pem", "/tok", "corp.test", "cp.internal")
    s = identity_settings(on, SidecarOptions(trust_bundle_file="/flag.pem", control_plane_name="other"))
    assert s is not None and (s.trust_bundle_file, s.server_name) == ("/flag.pem", "other"), "flags win over the spec"
    with pytest.raises(ValueError, match="trust bundle"):
        identity_settings(load_spec(SPEC + "  identity: {enabled: true}\n"), SidecarOptions())


def test_a_bad_trust_domain_in_the_spec_is_named() -> None:
    from meshpilot.sidecar.spec import SpecError, load_spec

    with pytest.raises(SpecError) as exc:
        load_spec(SPEC + "  identity: {trustDomain: 'Not A Domain'}\n")
    assert any(f["field"] == "mesh.identity.trustDomain" for f in exc.value.fields), exc.value.fields


def _agent(tmp_path: Path, clock: Clock, wait_s: float = 5.0) -> tuple[object, FakeSigner]:
    from meshpilot.sidecar.agent import AgentConfig, _Agent
    from meshpilot.sidecar.render import SidecarOptions
    from meshpilot.sidecar.spec import load_spec

    signer = FakeSigner(clock)
    (tmp_path / "bundle.pem").write_bytes(signer.root)
    agent = _Agent(AgentConfig(
        spec=load_spec(SPEC), api_url="http://127.0.0.1:9", workdir=tmp_path / "work", ready_file=tmp_path / "ready.json",
        options=SidecarOptions(node_id="reviews-1", trust_bundle_file=str(tmp_path / "bundle.pem"),
                               join_token_file=str(tmp_path / "token")), identity_wait_s=wait_s))
    assert agent.identity is not None
    agent.identity.signer = signer
    return agent, signer


async def test_the_agent_enrols_then_serves_the_certificate_and_renders_a_tls_bootstrap(tmp_path: Path) -> None:
    from meshpilot.sidecar.agent import _Agent
    from meshpilot.sidecar.sds import DEFAULT, ROOTCA
    from meshpilot.translate.bootstrap import build_bootstrap
    from meshpilot.xds.resource import META

    clock = Clock()
    agent, signer = _agent(tmp_path, clock)
    assert isinstance(agent, _Agent) and agent.identity is not None
    signer.tokens["t"] = ("shop", "reviews")
    (tmp_path / "token").write_text("t")
    run = asyncio.create_task(agent.identity.run())
    try:
        m = await agent.wait_enrolled()
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
    assert m is not None and m.spiffe == f"spiffe://{TD}/ns/shop/sa/reviews"
    assert set(agent.secrets.snapshot()) == {DEFAULT, ROOTCA}, "the SDS store holds the certificate at once"
    agent._identity_bootstrap(m)
    boot = build_bootstrap(agent.bopts)
    assert boot["node"]["metadata"][META.IDENTITY] is True
    assert boot["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0][
        "endpoint"]["address"]["pipe"]["path"] == str(agent.sds_socket)
    san = boot["static_resources"]["clusters"][1]["transport_socket"]["typed_config"]["common_tls_context"][
        "combined_validation_context"]["default_validation_context"]["match_typed_subject_alt_names"]
    assert san[0]["matcher"]["exact"] == pki.control_plane_id(TD), "the trust domain comes from the certificate"
    agent._write_ready()
    import json

    assert json.loads((tmp_path / "ready.json").read_text())["spiffe_id"] == m.spiffe


async def test_the_agent_gives_up_when_no_certificate_comes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from meshpilot.sidecar.agent import _Agent

    clock = Clock()
    agent, signer = _agent(tmp_path, clock, wait_s=0.2)
    assert isinstance(agent, _Agent) and agent.identity is not None
    agent.identity._sleep = asyncio.sleep  # real waits, so the bound is reached
    run = asyncio.create_task(agent.identity.run())
    with caplog.at_level(logging.INFO):
        try:
            m = await agent.wait_enrolled()
        finally:
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
    assert m is None and "event=identity_unavailable" in caplog.text and "no_token" in caplog.text


def test_a_work_directory_too_long_for_the_socket_is_refused(tmp_path: Path) -> None:
    from meshpilot.sidecar.agent import AgentConfig, _Agent
    from meshpilot.sidecar.render import SidecarOptions
    from meshpilot.sidecar.spec import load_spec

    with pytest.raises(ValueError, match="too long"):
        _Agent(AgentConfig(spec=load_spec(SPEC), api_url="http://127.0.0.1:9", workdir=tmp_path / ("w" * 120),
                           options=SidecarOptions(node_id="r", trust_bundle_file="/b.pem")))


# ---- a removed root leaves the node's trust (the operator's file only authenticates first contact) ------


def _roots(pem: bytes) -> set[bytes]:
    return {c.strip() for c in pki.bundle_pem([pem]).split(b"-----END CERTIFICATE-----") if c.strip()}


async def test_a_root_only_in_the_operators_file_is_not_trusted_after_the_control_planes_bundle(
        tmp_path: Path) -> None:
    """The node was installed with a bundle file holding A (since removed: `identity roots remove A`) and B;
    the control plane's bundle, over the channel that file authenticated, holds B only. From then on Envoy's
    ROOTCA, the channel's trust, the saved state and a proxyless app's files hold B, never A."""
    from meshpilot.sidecar.identity import publish_files
    from meshpilot.sidecar.sds import ROOTCA, SecretStore

    clock = Clock()
    signer = FakeSigner(clock)  # signs with B and answers with the bundle [B]
    root_a, root_b = pki.Authority.generate(TD).anchor_pem(), signer.root
    (tmp_path / "bundle.pem").write_bytes(pki.bundle_pem([root_a, root_b]))
    signer.tokens["t"] = ("shop", "reviews")
    (tmp_path / "token").write_text("t")
    ident = _identity(signer, clock, tmp_path, tmp_path / "token")
    assert _roots(ident.trust_pem()) == _roots(root_a + root_b), "first contact is checked against the file"
    store = SecretStore()
    ident.add_listener(lambda m: store.set(m.key_pem, m.chain_pem, m.bundle_pem))
    await ident.step()
    m = ident.material
    assert m is not None
    from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

    rootca = secret_pb2.Secret.FromString(store.snapshot()[ROOTCA].resource.value)
    assert _roots(rootca.validation_context.trusted_ca.inline_bytes) == _roots(root_b), "Envoy's ROOTCA"
    assert _roots(m.bundle_pem) == _roots(root_b)
    assert _roots(ident.trust_pem()) == _roots(root_b), "the next channel to the control plane"
    assert _roots((tmp_path / "identity" / "bundle.pem").read_bytes()) == _roots(root_b), "the saved state"
    out = tmp_path / "files"
    publish_files(out, m)
    assert _roots((out / "bundle.pem").read_bytes()) == _roots(root_b), "identity-files' bundle.pem"

    # a restarted agent keeps the control plane's bundle, not the file's
    again = _identity(signer, clock, tmp_path, tmp_path / "token")
    assert again.material is not None and _roots(again.material.bundle_pem) == _roots(root_b)
    assert _roots(again.trust_pem()) == _roots(root_b)

    # down longer than its certificate's life: the certificate is ignored, the control plane's bundle is not
    # (first contact again, with the token, must not be authenticated by the file's removed root)
    clock.now = m.not_after + 1
    late = _identity(signer, clock, tmp_path, tmp_path / "token")
    assert late.material is None and _roots(late.trust_pem()) == _roots(root_b)
    signer.tokens["t"] = ("shop", "reviews")
    await late.step()
    assert late.material is not None and signer.calls[-1][0] == "t"
    assert _roots(signer.trust_seen[-1]) == _roots(root_b), "the enrolment channel checked against B only"


async def test_a_new_bundle_over_the_watch_replaces_the_old_one_and_junk_is_ignored(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    signer = FakeSigner(clock)
    root_a, root_b, root_c = pki.Authority.generate(TD).anchor_pem(), signer.root, pki.Authority.generate(TD).anchor_pem()
    (tmp_path / "bundle.pem").write_bytes(pki.bundle_pem([root_a, root_b]))
    signer.tokens["t"] = ("shop", "reviews")
    (tmp_path / "token").write_text("t")
    ident = _identity(signer, clock, tmp_path, tmp_path / "token")
    await ident.step()
    watch = asyncio.create_task(ident.watch_bundle())
    try:
        await signer.bundles.put(pki.bundle_pem([root_b, root_c]))
        gen = await asyncio.wait_for(ident.wait_newer(1), 1.0)
        with caplog.at_level(logging.INFO, "meshpilot.identity"):
            await signer.bundles.put(b"")
            await signer.bundles.put(b"not a certificate")
            await signer.bundles.put(pki.bundle_pem([root_c]))
            await asyncio.wait_for(ident.wait_newer(gen), 1.0)
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
    assert ident.material is not None
    assert _roots(ident.material.bundle_pem) == _roots(root_c), "junk never replaced the bundle, the next one did"
    assert _roots(ident.trust_pem()) == _roots(root_c)
    assert caplog.text.count("event=bundle_ignored") == 2
    assert _roots((tmp_path / "identity" / "bundle.pem").read_bytes()) == _roots(root_c)


# ---- private files: created private, never narrowed after the fact --------------------------------------


async def test_keys_and_their_directories_are_created_private_not_narrowed_afterwards(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a umask that hides nothing and chmod/fchmod disabled, every directory and file the agent's state
    and identity-files make must still come out 0700 / 0600: the mode is set when each is created, so there
    is no moment when another user could open one."""
    from meshpilot.sidecar.identity import publish_files

    clock, signer, _token = _with_token(tmp_path)
    out = tmp_path / "run" / "files"  # identity-files' --out, its parent missing too
    ident = WorkloadIdentity(node_id="reviews-1", signer=signer, trust_bundle_file=tmp_path / "bundle.pem",
                             join_token_file=tmp_path / "token", state_dir=out / ".state", clock=clock,
                             sleep=clock.sleep, lifecycle=Lifecycle(rand=lambda: 1.0))
    (tmp_path / "bundle.pem").write_bytes(signer.root)
    monkeypatch.setattr(os, "chmod", lambda *a, **k: None)
    monkeypatch.setattr(os, "fchmod", lambda *a, **k: None)
    old = os.umask(0)
    try:
        await ident.step()
        assert ident.material is not None
        publish_files(out, ident.material)
    finally:
        os.umask(old)
    made = [p for p in [tmp_path / "run", *sorted(out.rglob("*"))] if not p.is_symlink()]
    assert {p.name for p in made if p.is_file()} >= {"key.pem", "cert.pem", "bundle.pem"}
    for p in made:
        want = 0o700 if p.is_dir() else 0o600
        assert stat.S_IMODE(p.stat().st_mode) == want, f"{p.relative_to(tmp_path)}: {oct(p.stat().st_mode)}"
    assert stat.S_IMODE(out.stat().st_mode) == 0o700


def test_write_private_replaces_a_file_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    from meshpilot.sidecar.identity import write_private

    target = tmp_path / "key.pem"
    target.write_bytes(b"old")
    os.chmod(target, 0o644)
    write_private(target, b"x" * 200_000)
    assert target.read_bytes() == b"x" * 200_000 and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.pem"]


# ---- which port each call goes to (real TLS, in-process servers) ------------------------------------------


async def test_the_token_goes_to_the_enrolment_port_and_renewals_and_the_bundle_watch_to_the_xds_port(
        tmp_path: Path) -> None:
    """Two TLS servers of one CA: the enrolment port (no client certificate asked) and the xDS port (client
    certificate required). Only the first Sign, with the token, may reach the enrolment port; the renewal
    and WatchBundle go to the xDS port under the node's certificate (the enrolment port does not serve
    WatchBundle)."""
    import grpc

    from meshpilot.pki import ca_pb2
    from meshpilot.sidecar.identity import GrpcSigner

    authority = pki.Authority.generate(TD)
    root = authority.anchor_pem()
    cp_key = pki.new_key()
    served = authority.serve(cp_key, pki.control_plane_id(TD), ["localhost"], ["127.0.0.1"], TTL)
    calls: list[tuple[str, str, str]] = []  # (port, method, caller's SPIFFE id or "")

    def handlers(port_name: str) -> grpc.GenericRpcHandler:
        async def sign(req: ca_pb2.SignRequest, context: grpc.aio.ServicerContext[object, object]) -> ca_pb2.SignResponse:
            peer = pki.peer_from_context(context)
            calls.append((port_name, "Sign", peer.spiffe if peer else ""))
            spiffe = peer.spiffe if peer else pki.spiffe_id(TD, "shop", "reviews")
            issued = authority.sign(req.csr_pem, spiffe, req.node_id, TTL)
            return ca_pb2.SignResponse(cert_chain_pem=issued.chain_pem, trust_bundle_pem=root,
                                       not_after=issued.not_after)

        async def watch(req: ca_pb2.BundleRequest,
                        context: grpc.aio.ServicerContext[object, object]) -> AsyncIterator[ca_pb2.BundleResponse]:
            peer = pki.peer_from_context(context)
            calls.append((port_name, "WatchBundle", peer.spiffe if peer else ""))
            yield ca_pb2.BundleResponse(trust_bundle_pem=root)
            await asyncio.Event().wait()

        methods: dict[str, grpc.RpcMethodHandler] = {
            "Sign": grpc.unary_unary_rpc_method_handler(
                sign, request_deserializer=ca_pb2.SignRequest.FromString,
                response_serializer=ca_pb2.SignResponse.SerializeToString)}
        if port_name == "xds":
            methods["WatchBundle"] = grpc.unary_stream_rpc_method_handler(
                watch, request_deserializer=ca_pb2.BundleRequest.FromString,
                response_serializer=ca_pb2.BundleResponse.SerializeToString)
        return grpc.method_handlers_generic_handler("meshpilot.identity.v1.Identity", methods)

    servers, ports = [], {}
    for name, require in (("enrol", False), ("xds", True)):
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([handlers(name)])
        ports[name] = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
            [(pki.key_pem(cp_key), served.chain_pem)], root_certificates=root if require else None,
            require_client_auth=require))
        await server.start()
        servers.append(server)
    (tmp_path / "bundle.pem").write_bytes(root)
    (tmp_path / "token").write_text("t")
    ident = WorkloadIdentity(
        node_id="reviews-1", trust_bundle_file=tmp_path / "bundle.pem", join_token_file=tmp_path / "token",
        signer=GrpcSigner(f"127.0.0.1:{ports['xds']}", "localhost", enrol_target=f"127.0.0.1:{ports['enrol']}"),
        lifecycle=Lifecycle(rand=lambda: 1.0))
    watch = None
    try:
        await asyncio.wait_for(ident.step(), 10)
        assert ident.material is not None, ident.last_error
        watch = asyncio.create_task(ident.watch_bundle())
        async with asyncio.timeout(10):
            while not any(m == "WatchBundle" for _, m, _ in calls):
                await asyncio.sleep(0.01)
        await asyncio.wait_for(ident.attempt(Phase.RENEW), 10)
    finally:
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        for server in servers:
            await server.stop(None)
    me = pki.spiffe_id(TD, "shop", "reviews")
    assert calls == [("enrol", "Sign", ""), ("xds", "WatchBundle", me), ("xds", "Sign", me)], calls


# ---- several control-plane replicas (real TLS, in-process servers) ---------------------------------------


async def _ca_replica(authority: pki.Authority, cp_key: Any, chain_pem: bytes, name: str,
                      calls: list[tuple[str, str]]) -> tuple[list[Any], int, int]:
    """One replica of the control plane's Identity service: its enrolment port and its xDS port."""
    import grpc

    from meshpilot.pki import ca_pb2

    root = authority.anchor_pem()

    def handlers(port_name: str) -> grpc.GenericRpcHandler:
        async def sign(req: ca_pb2.SignRequest, context: grpc.aio.ServicerContext[object, object]) -> ca_pb2.SignResponse:
            calls.append((f"{name}-{port_name}", "Sign"))
            issued = authority.sign(req.csr_pem, pki.spiffe_id(TD, "shop", "reviews"), req.node_id, TTL)
            return ca_pb2.SignResponse(cert_chain_pem=issued.chain_pem, trust_bundle_pem=root,
                                       not_after=issued.not_after)

        async def watch(req: ca_pb2.BundleRequest,
                        context: grpc.aio.ServicerContext[object, object]) -> AsyncIterator[ca_pb2.BundleResponse]:
            calls.append((f"{name}-{port_name}", "WatchBundle"))
            yield ca_pb2.BundleResponse(trust_bundle_pem=root)
            await asyncio.Event().wait()

        return grpc.method_handlers_generic_handler("meshpilot.identity.v1.Identity", {
            "Sign": grpc.unary_unary_rpc_method_handler(
                sign, request_deserializer=ca_pb2.SignRequest.FromString,
                response_serializer=ca_pb2.SignResponse.SerializeToString),
            "WatchBundle": grpc.unary_stream_rpc_method_handler(
                watch, request_deserializer=ca_pb2.BundleRequest.FromString,
                response_serializer=ca_pb2.BundleResponse.SerializeToString)})

    servers, ports = [], []
    for port_name, require in (("enrol", False), ("xds", True)):
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([handlers(port_name)])
        ports.append(server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
            [(pki.key_pem(cp_key), chain_pem)], root_certificates=root if require else None,
            require_client_auth=require)))
        await server.start()
        servers.append(server)
    return servers, ports[0], ports[1]


async def test_enrolment_renewal_and_the_bundle_watch_move_to_another_replica(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Three replicas sharing one CA, the first not listening: the enrolment skips it within the same attempt,
    the bundle watch opens on the replica that signed, and when that replica goes away the watch and the next
    renewal move to the third. Each log line names the replica."""
    import socket

    from meshpilot.sidecar.identity import GrpcSigner

    authority = pki.Authority.generate(TD)
    cp_key = pki.new_key()
    served = authority.serve(cp_key, pki.control_plane_id(TD), ["localhost"], ["127.0.0.1"], TTL)
    calls: list[tuple[str, str]] = []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    r1, r1_enrol, r1_xds = await _ca_replica(authority, cp_key, served.chain_pem, "r1", calls)
    r2, r2_enrol, r2_xds = await _ca_replica(authority, cp_key, served.chain_pem, "r2", calls)
    (tmp_path / "bundle.pem").write_bytes(authority.anchor_pem())
    (tmp_path / "token").write_text("t")
    signer = GrpcSigner([f"127.0.0.1:{dead}", f"127.0.0.1:{r1_xds}", f"127.0.0.1:{r2_xds}"], "localhost",
                        enrol_target=f"127.0.0.1:{dead},127.0.0.1:{r1_enrol},127.0.0.1:{r2_enrol}", first=0)
    ident = WorkloadIdentity(node_id="reviews-1", trust_bundle_file=tmp_path / "bundle.pem",
                             join_token_file=tmp_path / "token", signer=signer, lifecycle=Lifecycle(rand=lambda: 1.0))
    watch = None
    caplog.set_level(logging.INFO, logger="meshpilot.identity")
    try:
        await asyncio.wait_for(ident.step(), 10)
        assert ident.material is not None, f"expected the enrolment to skip the dead replica, got {ident.last_error}"
        watch = asyncio.create_task(ident.watch_bundle())
        async with asyncio.timeout(10):
            while ("r1-xds", "WatchBundle") not in calls:
                await asyncio.sleep(0.01)
        for server in r1:
            await server.stop(None)
        async with asyncio.timeout(10):
            while ("r2-xds", "WatchBundle") not in calls:
                await asyncio.sleep(0.01)
        await asyncio.wait_for(ident.attempt(Phase.RENEW), 10)
    finally:
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        for server in (*r1, *r2):
            await server.stop(None)
    assert calls == [("r1-enrol", "Sign"), ("r1-xds", "WatchBundle"), ("r2-xds", "WatchBundle"), ("r2-xds", "Sign")], calls
    text = caplog.text
    assert f"event=sign_replica_failed control_plane=127.0.0.1:{dead}" in text, text
    assert f"event=enrolled" in text and f"control_plane=127.0.0.1:{r1_enrol}" in text, text
    assert f"event=bundle_watch_open control_plane=127.0.0.1:{r2_xds}" in text, text


async def test_a_refusal_is_not_sent_to_another_replica(tmp_path: Path) -> None:
    """A replica that says no (a bad token) has answered: the next replica is not asked the same."""
    import grpc

    from meshpilot.sidecar.identity import GrpcSigner

    asked: list[int] = []

    def refusing(i: int) -> grpc.GenericRpcHandler:
        async def sign(req: Any, context: grpc.aio.ServicerContext[object, object]) -> Any:
            asked.append(i)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad token")

        return grpc.method_handlers_generic_handler("meshpilot.identity.v1.Identity", {
            "Sign": grpc.unary_unary_rpc_method_handler(sign, request_deserializer=bytes,
                                                        response_serializer=bytes)})

    authority = pki.Authority.generate(TD)
    cp_key = pki.new_key()
    served = authority.serve(cp_key, pki.control_plane_id(TD), ["localhost"], ["127.0.0.1"], TTL)
    servers, ports = [], []
    for i in range(2):
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([refusing(i)])
        ports.append(server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
            [(pki.key_pem(cp_key), served.chain_pem)])))
        await server.start()
        servers.append(server)
    signer = GrpcSigner([f"127.0.0.1:{p}" for p in ports], "localhost", first=0)
    try:
        with pytest.raises(SignError) as refused:
            await signer.sign(b"csr", "n", "token", None, authority.anchor_pem())
    finally:
        for server in servers:
            await server.stop(None)
    assert refused.value.refused and asked == [0], f"expected one refusal from replica 0 only, got {asked}"
