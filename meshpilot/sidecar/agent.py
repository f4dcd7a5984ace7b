"""The sidecar agent (``meshpilot sidecar``): one per app, on a VM, bare metal or in a pod.

It makes sure the service exists in the registry, renders the Envoy bootstrap from spec.yaml,
starts the node's meshdns in its own event loop (``mesh.dns``, on by default: fed by the same control
plane over delta ADS, its last table kept in the work directory, upstream queries marked with the
capture rules' exempt SO_MARK), then Envoy (and the app itself when the spec has ``mesh.app``), and
restarts each with back-off when it dies. Registration and health are not the agent's business:
Envoy's HDS stream does that (meshpilot/hds/).

With a workload identity (``--trust-bundle`` or ``mesh.identity``), the agent first enrols with the control
plane's CA (sidecar/identity.py; bounded by ``identity_wait_s``: without a certificate Envoy cannot reach
the control plane), then serves the certificate to Envoy over SDS on a unix socket in the work directory
(sidecar/sds.py), then starts meshdns with its table stream over TLS under the same identity, then Envoy.
Renewals and new trust bundles reach Envoy and meshdns as they happen. With ``mesh.tracing`` on (the
default), the agent first starts the node's span receiver on loopback, whose port the bootstrap's
collector cluster names, and a shipper that sends the spooled spans on (sidecar/traces.py). With ``mesh.logs``
on (the default), it follows Envoy's access log and the app's log files into a spool of log records
shipped to the control plane (sidecar/logs.py). The management-API calls below keep
using the bearer token. On SIGTERM/SIGINT it runs the graceful offline sequence of DESIGN.md:

1. deregister the instance through the management API (HDS has no deregister message);
2. wait, bounded by ``mesh.syncTimeout``, until every Envoy consuming the service has ACKed the
   endpoints without it (``GET /v1/services/{ns}/{name}/synced``);
3. run ``mesh.preStop``;
4. drain Envoy's inbound listeners (admin ``/drain_listeners?inboundonly&graceful``) for
   ``mesh.drainTime``;
5. stop the app, then Envoy; meshdns answers until the very end, then closes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from meshpilot import pki
from meshpilot.meshdns.config import MeshDnsConfig, TableTls
from meshpilot.meshdns.server import MeshDns
from meshpilot.sidecar.identity import ChannelTls, GrpcSigner, Material, WorkloadIdentity, enrol_target
from meshpilot.sidecar.logs import ENVOY_LOG_MAX_BYTES, Collector, LogSource
from meshpilot.sidecar.render import (
    IdentitySettings,
    SidecarOptions,
    bootstrap_options,
    control_plane_addresses,
    control_plane_targets,
    identity_settings,
)
from meshpilot.sidecar.sds import SdsServer, SecretStore
from meshpilot.sidecar.spec import SidecarSpec
from meshpilot.sidecar.supervise import BASE_DELAY_S, MAX_DELAY_S, Supervised
from meshpilot.sidecar.traces import Backend, Receiver, Shipper, Spool
from meshpilot.translate.bootstrap import build_bootstrap

__all__ = ["AgentConfig", "dns_config", "run_agent"]

log = logging.getLogger("meshpilot.sidecar")


def default_envoy() -> str:
    return shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy") or "envoy"


@dataclass(slots=True)
class AgentConfig:
    spec: SidecarSpec
    options: SidecarOptions
    api_url: str
    token: str | None = None
    # every replica's management API (``--api URL,URL``); () means api_url alone
    api_urls: tuple[str, ...] = ()
    workdir: Path = Path(".")
    envoy: str = field(default_factory=default_envoy)
    concurrency: int = 1
    ready_file: Path | None = None
    log_level: str = "info"
    identity_wait_s: float = 60.0  # bound on the first enrolment before the agent gives up


# a unix socket's path is at most 107 bytes (sun_path)
_MAX_SOCKET_PATH = 107


def dns_config(spec: SidecarSpec, options: SidecarOptions, node_id: str, workdir: Path,
               tls: TableTls | None = None) -> MeshDnsConfig:
    """The meshdns settings of a sidecar: ``mesh.dns`` from the spec, the agent's control plane, and a node id
    of its own (``<node>~meshdns``: the Envoy's node id carries listener metadata a table stream must not
    replace). ``tls``: the table stream's TLS under the node's workload identity."""
    d = spec.mesh.dns
    host, port = d.listen_address
    # an empty search list must stay empty rather than fall back to resolv.conf's: "" is the "none" suffix
    search = tuple(d.search_suffixes(spec.metadata.namespace)) or ("",)
    return MeshDnsConfig(
        host=host, port=port, control_plane=",".join(control_plane_targets(options)), node_id=f"{node_id}~meshdns",
        state_file=str(workdir / "meshdns.json"), upstreams=tuple(d.upstream_addresses), ttl=d.ttl, domain=d.domain,
        search=search, namespace=spec.metadata.namespace, upstream_timeout=d.upstreamTimeout,
        upstream_mark=d.upstreamMark, tls=tls,
    )


class _Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.bopts = bootstrap_options(cfg.spec, cfg.options)
        self.instance_id = self.bopts.node_id
        self.admin_port = self.bopts.admin_port
        self.stop_requested = asyncio.Event()
        self._api_index = 0  # the management API replica asked first
        self.timings: dict[str, float] = {}
        cfg.workdir.mkdir(parents=True, exist_ok=True)
        self.admin_path = cfg.workdir / "envoy.admin"
        self.envoy: Supervised | None = None
        self.app: Supervised | None = None
        self.dns: MeshDns | None = None
        self.dns_settled = asyncio.Event()  # meshdns bound, or its first attempt failed
        self.id_settings: IdentitySettings | None = identity_settings(cfg.spec, cfg.options)
        self.identity: WorkloadIdentity | None = None
        self.secrets = SecretStore()
        self.sds_socket = cfg.workdir.resolve() / "sds" / "sds.sock"
        if self.id_settings is not None:
            if len(str(self.sds_socket).encode()) > _MAX_SOCKET_PATH:
                raise ValueError(f"the work directory {cfg.workdir.resolve()} is too long a path for the SDS socket "
                                 f"({self.sds_socket}: at most {_MAX_SOCKET_PATH} bytes)")
            s = self.id_settings
            spec = cfg.spec
            self.identity = WorkloadIdentity(
                node_id=self.instance_id,
                signer=GrpcSigner(control_plane_targets(cfg.options), s.server_name,
                                  enrol_target=[enrol_target(h, p, cfg.options.enrol_port)
                                                for h, p in control_plane_addresses(cfg.options)]),
                trust_bundle_file=Path(s.trust_bundle_file),
                join_token_file=Path(s.join_token_file) if s.join_token_file else None,
                state_dir=cfg.workdir / "identity",
                requested_spiffe=pki.spiffe_id(s.trust_domain or "mesh.local", spec.metadata.namespace,
                                               spec.metadata.name),
            )
            self.identity.add_listener(self._on_identity)

    # ---- identity ----------------------------------------------------------------------------

    def _on_identity(self, m: Material) -> None:
        self.secrets.set(m.key_pem, m.chain_pem, m.bundle_pem)
        if self.envoy is not None:
            self._write_ready()

    async def wait_enrolled(self) -> Material | None:
        """The first certificate, or None when it did not come within ``identity_wait_s`` or a stop came first."""
        assert self.identity is not None
        ready = asyncio.ensure_future(self.identity.ready())
        stop = asyncio.ensure_future(self.stop_requested.wait())
        try:
            await asyncio.wait((ready, stop), timeout=self.cfg.identity_wait_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (ready, stop):
                t.cancel()
            await asyncio.gather(ready, stop, return_exceptions=True)
        if self.identity.material is None:
            log.error("event=identity_unavailable waited_s=%.1f last_error=%s", self.cfg.identity_wait_s,
                      self.identity.last_error or "-")
        return self.identity.material

    def _identity_bootstrap(self, m: Material) -> None:
        assert self.id_settings is not None
        td = self.id_settings.trust_domain or m.trust_domain
        if td != m.trust_domain:
            log.warning("event=trust_domain_mismatch configured=%s certificate=%s", td, m.trust_domain)
        self.bopts = bootstrap_options(self.cfg.spec, self.cfg.options, sds_socket=str(self.sds_socket),
                                       trust_domain=td, tls_server_name=self.id_settings.server_name)

    # ---- management API --------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.cfg.token}"} if self.cfg.token else {}

    async def _call(self, http: aiohttp.ClientSession, method: str, path: str,
                    body: Any = None) -> tuple[int, str]:
        """``method path`` on the management API: (status, body text). With several replicas, one that cannot
        be reached or answers 502/503/504 (cut off from the shared store) is left for the next; the one that
        answered is asked first next time."""
        urls = self.cfg.api_urls or (self.cfg.api_url,)
        failure: BaseException | None = None
        for step in range(len(urls)):
            index = (self._api_index + step) % len(urls)
            url = urls[index]
            try:
                async with http.request(method, f"{url}{path}", json=body, headers=self._headers()) as r:
                    text = await r.text()
                    if r.status in (502, 503, 504) and step < len(urls) - 1:
                        log.info("event=api_replica_failed api=%s status=%d", url, r.status)
                        continue
                    status = r.status
            except (aiohttp.ClientConnectionError, TimeoutError, OSError) as exc:
                failure = exc
                if len(urls) > 1:
                    log.info("event=api_replica_failed api=%s error=%r", url, exc)
                continue
            if index != self._api_index:
                log.info("event=api_replica api=%s", url)
                self._api_index = index
            return status, text
        assert failure is not None
        raise failure

    async def ensure_service(self, http: aiohttp.ClientSession) -> None:
        spec = self.cfg.spec
        path = f"/v1/services/{spec.metadata.namespace}/{spec.metadata.name}"
        status, text = await self._call(http, "GET", path)
        if status == 200:
            return
        if status != 404:
            raise RuntimeError(f"GET {path}: {status} {text}")
        body = spec.service().model_dump(mode="json", exclude={"vip"})
        status, text = await self._call(http, "POST", "/v1/services", body)
        if status not in (201, 409):  # 409: another sidecar created it first
            raise RuntimeError(f"creating service {spec.metadata.name}: {status} {text}")
        log.info("event=service_created service=%s.%s", spec.metadata.name, spec.metadata.namespace)

    async def deregister(self, http: aiohttp.ClientSession) -> None:
        status, text = await self._call(http, "DELETE", f"/v1/instances/{quote(self.instance_id, safe='')}?source=mesh")
        if status not in (200, 404):
            raise RuntimeError(f"deregister: {status} {text}")
        log.info("event=deregistered instance=%s status=%d", self.instance_id, status)

    async def wait_synced(self, http: aiohttp.ClientSession, bound_s: float) -> bool:
        spec = self.cfg.spec
        path = f"/v1/services/{spec.metadata.namespace}/{spec.metadata.name}/synced"
        last: Any = None
        try:
            async with asyncio.timeout(bound_s):
                while True:
                    status, text = await self._call(http, "GET", path)
                    last = text
                    if status == 200:
                        try:
                            last = json.loads(text)
                        except ValueError:
                            last = None
                        if isinstance(last, dict) and last.get("synced"):
                            return True
                    await asyncio.sleep(0.05)
        except TimeoutError:
            log.warning("event=sync_timeout bound_s=%.1f last=%s", bound_s, json.dumps(last)[:300])
            return False

    # ---- processes ---------------------------------------------------------------------------

    def _envoy_argv(self, config: Path) -> list[str]:
        drain = self.cfg.spec.mesh.drainTime
        argv = [
            self.cfg.envoy, "-c", str(config), "--use-dynamic-base-id",
            "--concurrency", str(self.cfg.concurrency), "-l", self.cfg.log_level,
            "--drain-time-s", str(max(1, round(drain))), "--drain-strategy", "immediate",
            "--parent-shutdown-time-s", str(max(2, round(drain) + 1)),
        ]
        if self.bopts.admin_port == 0:
            argv += ["--admin-address-path", str(self.admin_path)]
        return argv

    def forget_admin_address(self) -> None:
        """Before each Envoy start: the address file names the last Envoy's admin port until the new
        one writes its own. Removed here, before the start, and never after it: a new Envoy may write
        its file before the agent notices that it runs, and removing it then would lose the new port."""
        if self.bopts.admin_port == 0:
            self.admin_path.unlink(missing_ok=True)

    async def wait_envoy_admin(self, timeout: float = 20.0) -> int:
        """The admin port of the current Envoy once it answers."""
        async with asyncio.timeout(timeout):
            while True:
                port = self.bopts.admin_port
                if port == 0 and self.admin_path.exists():
                    text = self.admin_path.read_text().strip()
                    port = int(text.rsplit(":", 1)[1]) if text else 0
                if port:
                    try:
                        _, w = await asyncio.open_connection("127.0.0.1", port)
                        w.close()
                        return port
                    except OSError:
                        pass
                await asyncio.sleep(0.05)

    def _write_ready(self) -> None:
        if not self.cfg.ready_file:
            return
        doc = {
            "pid": os.getpid(),
            "envoy_pid": self.envoy.proc.pid if self.envoy and self.envoy.proc else None,
            "envoy_restarts": self.envoy.restarts if self.envoy else 0,
            "app_pid": self.app.proc.pid if self.app and self.app.proc else None,
            "admin_port": self.admin_port,
            "instance_id": self.instance_id,
            "inbound_port": self.bopts.inbound_port,
            "outbound_port": self.bopts.outbound_port,
            "dns_port": self.dns.port if self.dns is not None else None,
            "spiffe_id": self.identity.material.spiffe if self.identity and self.identity.material else None,
            "trace_port": self.bopts.trace_collector_port or None,
        }
        tmp = self.cfg.ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        tmp.replace(self.cfg.ready_file)

    async def _watch_envoy(self) -> None:
        """Keep the ready file current across Envoy restarts (admin port may change)."""
        assert self.envoy is not None
        seen = None
        while True:
            proc = self.envoy.proc
            if proc is not None and proc.pid != seen and proc.returncode is None:
                try:
                    self.admin_port = await self.wait_envoy_admin()
                    seen = proc.pid
                    self._write_ready()
                except TimeoutError:
                    log.warning("event=envoy_admin_timeout pid=%d", proc.pid)
            await asyncio.sleep(0.1)

    async def _run_dns(self) -> None:
        """meshdns in this event loop, restarted with back-off when it cannot bind or fails."""
        tls = ChannelTls(self.identity, self.id_settings.server_name) if self.identity and self.id_settings else None
        config = dns_config(self.cfg.spec, self.cfg.options, self.instance_id, self.cfg.workdir, tls)
        delay = BASE_DELAY_S
        while True:
            try:
                async with MeshDns(config) as dns:
                    self.dns = dns
                    self.dns_settled.set()
                    delay = BASE_DELAY_S
                    log.info("event=meshdns_started listen=%s:%d upstreams=%s search=%s", config.host, dns.port,
                             ",".join(f"{h}:{p}" for h, p in dns.forwarder.upstreams) or "-",
                             ",".join(s for s in config.search if s) or "-")
                    if self.envoy is not None:
                        self._write_ready()
                    await asyncio.Event().wait()
            except Exception as exc:  # noqa: BLE001 - logged and retried; the sidecar keeps running without DNS
                log.error("event=meshdns_failed listen=%s:%d error=%r retry_in_s=%.1f", config.host, config.port,
                          exc, delay)
            finally:
                self.dns = None
            self.dns_settled.set()
            await asyncio.sleep(delay)
            delay = min(MAX_DELAY_S, delay * 2)

    # ---- spans -------------------------------------------------------------------------------

    def _trace_backend(self) -> Backend:
        t = self.cfg.spec.mesh.tracing
        if t.backend:
            return Backend((t.backend,), t.backendFormat, dict(t.backendHeaders))
        urls = tuple(f"{u.rstrip('/')}/v1/spans" for u in (self.cfg.api_urls or (self.cfg.api_url,)))
        return Backend(urls, "meshpilot", self._headers())

    async def _start_traces(self, tg: asyncio.TaskGroup) -> tuple[Receiver, Shipper, asyncio.Task[None]] | None:
        """The span receiver Envoy reports to (its port goes into the bootstrap), the shipper and its
        task; None when tracing is off or the receiver cannot start (Envoy then runs without tracing)."""
        t = self.cfg.spec.mesh.tracing
        if not t.enabled:
            return None
        try:
            spool = Spool(self.cfg.workdir / "traces", t.maxFileBytes, t.maxFiles)
            receiver = Receiver(spool, port=t.port)
            port = await receiver.start()
        except (OSError, ValueError) as exc:
            log.error("event=tracing_unavailable error=%r", exc)
            return None
        self.bopts = replace(self.bopts, trace_collector_port=port)
        shipper = Shipper(spool, self._trace_backend(), receiver.arrived)
        task = tg.create_task(self._ship(shipper))
        log.info("event=span_receiver_started port=%d backend=%s pending=%d", port, shipper.backend.urls[0], spool.pending())
        return receiver, shipper, task

    async def _ship(self, shipper: Shipper) -> None:
        """The shipper, restarted after a failure of its own (a disk error): spans (or log records) wait on disk."""
        delay = BASE_DELAY_S
        while True:
            try:
                await shipper.run()
            except Exception as exc:  # noqa: BLE001 - logged and retried; the sidecar keeps serving
                log.error("event=%s_shipper_failed error=%r retry_in_s=%.1f", shipper.spool.what, exc, delay)
                await asyncio.sleep(delay)
                delay = min(MAX_DELAY_S, delay * 2)

    # ---- logs --------------------------------------------------------------------------------

    def _start_logs(self, tg: asyncio.TaskGroup) -> tuple[Collector, Shipper, list[asyncio.Task[None]]] | None:
        """The collector of Envoy's access log and the app log files, and the shipper of its spool to
        the control plane's /v1/logs (sidecar/logs.py), with their tasks; None when ``mesh.logs`` is off."""
        spec = self.cfg.spec
        lg = spec.mesh.logs
        if not lg.enabled:
            return None
        ns = spec.metadata.namespace
        own = f"{spec.metadata.name}.{ns}"
        # envoy.log is followed even when its access lines are not collected, to keep it bounded
        sources = [LogSource(self.cfg.workdir / "envoy.log", "access" if lg.access else "envoy", own, self.instance_id,
                             max_bytes=ENVOY_LOG_MAX_BYTES)]
        for f in lg.files:
            service = f.service if f.service is None or "." in f.service else f"{f.service}.{ns}"
            sources.append(LogSource(self.cfg.workdir / f.path, "app", service or own, f.instance or self.instance_id))
        try:
            spool = Spool(self.cfg.workdir / "logs", lg.maxFileBytes, lg.maxFiles, prefix="logs-", what="logs")
        except (OSError, ValueError) as exc:
            log.error("event=logs_unavailable error=%r", exc)
            return None
        collector = Collector(spool, sources, self.instance_id, self.cfg.workdir / "logs" / "follow.json")
        urls = tuple(f"{u.rstrip('/')}/v1/logs" for u in (self.cfg.api_urls or (self.cfg.api_url,)))
        shipper = Shipper(spool, Backend(urls, "meshpilot", self._headers()), collector.arrived)
        log.info("event=log_collector_started sources=%d pending=%d", len(sources), spool.pending())
        return collector, shipper, [tg.create_task(collector.run()), tg.create_task(self._ship(shipper))]

    async def _flush_logs(self, collector: Collector, shipper: Shipper, http: aiohttp.ClientSession,
                          bound_s: float = 2.0) -> None:
        """After Envoy and the app stopped: their last lines into the spool, and the spool to the control
        plane for at most ``bound_s`` (what is left goes when the agent starts again)."""
        try:
            collector.poll()
            async with asyncio.timeout(bound_s):
                while await shipper.ship_once(http):
                    pass
        except TimeoutError:
            log.warning("event=logs_flush_unfinished pending=%d", shipper.spool.pending())
        except Exception as exc:  # noqa: BLE001 - the records stay on disk for the next start
            log.error("event=logs_flush_failed error=%r", exc)

    # ---- graceful offline --------------------------------------------------------------------

    async def offline(self, http: aiohttp.ClientSession) -> None:
        mesh = self.cfg.spec.mesh
        t0 = time.monotonic()
        try:
            await self.deregister(http)
            ok = await self.wait_synced(http, mesh.syncTimeout)
            self.timings["synced_s"] = time.monotonic() - t0
            log.info("event=consumers_synced ok=%s after_s=%.3f", ok, self.timings["synced_s"])
        except (aiohttp.ClientError, RuntimeError, OSError) as exc:
            log.error("event=deregister_failed error=%s", exc)
        if mesh.preStop is not None:
            await self._pre_stop(mesh.preStop.command, mesh.preStop.timeout)
        if mesh.drainTime > 0 and self.envoy and self.envoy.proc and self.envoy.proc.returncode is None:
            try:
                url = f"http://127.0.0.1:{self.admin_port}/drain_listeners?inboundonly&graceful"
                async with http.post(url) as r:
                    log.info("event=drain_started status=%d drain_s=%.1f", r.status, mesh.drainTime)
                await asyncio.sleep(mesh.drainTime)
            except (aiohttp.ClientError, OSError) as exc:
                log.error("event=drain_failed error=%s", exc)
        if self.app is not None:
            await self.app.stop(mesh.app.stopTimeout if mesh.app else 10.0)
        if self.envoy is not None:
            await self.envoy.stop(5.0)
        log.info("event=offline_done total_s=%.3f", time.monotonic() - t0)

    async def _pre_stop(self, command: list[str], timeout: float) -> None:
        proc = await asyncio.create_subprocess_exec(*command, cwd=str(self.cfg.workdir))
        try:
            async with asyncio.timeout(timeout):
                code = await proc.wait()
            log.info("event=pre_stop_done code=%s", code)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            log.warning("event=pre_stop_timeout after_s=%.1f", timeout)

    # ---- main --------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_requested.set)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            try:
                await self.ensure_service(http)
            except (aiohttp.ClientError, RuntimeError, OSError) as exc:
                log.error("event=service_check_failed error=%s", exc)
                return 1
            async with asyncio.TaskGroup() as tg:
                if self.identity is None:
                    return await self._run_node(tg, http)
                # enrol first: without a certificate Envoy cannot reach the control plane
                renewals = tg.create_task(self.identity.run())
                try:
                    material = await self.wait_enrolled()
                    if material is None:
                        return 0 if self.stop_requested.is_set() else 1
                    self._identity_bootstrap(material)
                    async with SdsServer(self.secrets, self.sds_socket):
                        return await self._run_node(tg, http)
                finally:
                    renewals.cancel()
        return 0

    async def _run_node(self, tg: asyncio.TaskGroup, http: aiohttp.ClientSession) -> int:
        """meshdns, the app and Envoy until a stop is asked, then the graceful offline."""
        traces = await self._start_traces(tg)  # before the bootstrap, which names its port
        logs = self._start_logs(tg)
        config = self.cfg.workdir / "envoy.json"
        config.write_text(json.dumps(build_bootstrap(self.bopts), indent=2))
        mesh = self.cfg.spec.mesh
        dns_task = None
        if mesh.dns.enabled:  # before the app and Envoy, so the app's first lookups are answered
            dns_task = tg.create_task(self._run_dns())
            try:
                async with asyncio.timeout(5.0):
                    await self.dns_settled.wait()
            except TimeoutError:
                log.warning("event=meshdns_slow_start waited_s=5.0")
        if mesh.app is not None:
            env = {**os.environ, **mesh.app.env}
            self.app = Supervised("app", mesh.app.command, self.cfg.workdir / "app.log", env, mesh.app.workingDir)
            tg.create_task(self.app.run())
        self.envoy = Supervised("envoy", self._envoy_argv(config), self.cfg.workdir / "envoy.log",
                                before_start=self.forget_admin_address)
        tg.create_task(self.envoy.run())
        watcher = tg.create_task(self._watch_envoy())
        log.info("event=sidecar_started instance=%s inbound=%d outbound=%d app=%d spiffe=%s",
                 self.instance_id, self.bopts.inbound_port, self.bopts.outbound_port, self.bopts.app_port,
                 self.identity.material.spiffe if self.identity and self.identity.material else "-")
        await self.stop_requested.wait()
        log.info("event=stop_requested instance=%s", self.instance_id)
        await self.offline(http)
        watcher.cancel()
        if dns_task is not None:
            dns_task.cancel()
        if traces is not None:  # Envoy stopped and flushed its last spans: the spool to its end, bounded
            receiver, span_shipper, span_task = traces
            span_task.cancel()
            await receiver.close()
            await asyncio.gather(span_task, return_exceptions=True)
            await span_shipper.flush(http)
        if logs is not None:
            collector, shipper, tasks = logs
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._flush_logs(collector, shipper, http)
        return 0


async def run_agent(cfg: AgentConfig) -> int:
    return await _Agent(cfg).run()
