"""The control plane's one settings object: defaults that work on one machine, then a YAML file,
then ``MESHPILOT_<FIELD>`` environment variables, then command-line flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Settings", "load_settings", "read_token"]


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    listen_address: str = "127.0.0.1"
    xds_port: int = Field(default=15010, ge=0, le=65535)
    api_port: int = Field(default=15014, ge=0, le=65535)
    consul_port: int | None = Field(default=8500, ge=0, le=65535, description="null disables the Consul API")
    eureka_port: int | None = Field(default=8761, ge=0, le=65535, description="null disables the Eureka API")
    store: str = Field(default="sqlite:var/meshpilot.db", description="sqlite:PATH (one control plane), etcd://HOST:PORT[,HOST:PORT...][/PREFIX/] (replicas sharing one etcd: docs/ha.md) or memory:")
    domain: str = "mesh"
    vip_cidr: str = "240.240.0.0/16"
    vip6_cidr: str | None = None
    single_vip: str | None = Field(default=None, description="give every service this one virtual IP (HTTP only)")
    debounce_ms: int = Field(default=100, ge=0, le=10_000)
    debounce_max_ms: int = Field(default=1_000, ge=0, le=60_000)
    token: str | None = Field(default=None, description="the bootstrap admin token; when set, every request to the HTTP front doors needs a token (docs/api.md: Access)")
    token_file: str | None = Field(default=None, description="read the token from this file instead (not visible in ps)")
    http_idle_timeout_s: float = Field(default=30.0, gt=0, le=3600, description="an HTTP connection holding no complete request is closed this long after it opened or answered; a request body must arrive within it")
    http_max_connections: int = Field(default=4096, ge=1, description="open connections per HTTP port (all HTTP ports together stay within half the open-file limit)")
    debug_api: bool = Field(default=False, description="enable /v1/debug (test-only resource injection)")
    hds_interval_s: float = Field(default=1.0, gt=0, le=300)
    hds_critical_after_s: float = Field(default=45.0, gt=0)
    hds_dead_after_s: float = Field(default=5.0, gt=0, description="critical this soon once a sidecar's health and ADS streams both closed")
    hds_remove_after_s: float = Field(default=300.0, gt=0)
    xds_write_timeout_s: float = Field(default=30.0, gt=0, le=3600, description="an xDS client that leaves a response unanswered this long is disconnected")
    identity: bool = Field(default=False, description="workload identities: the mesh CA issues certificates, xDS/HDS/meshdns streams need a client certificate over TLS (the plaintext xDS port is off), sidecars talk mTLS")
    trust_domain: str = Field(default="mesh.local", pattern=r"^[a-z0-9]([a-z0-9.-]{0,253}[a-z0-9])?$", description="the SPIFFE trust domain: workload ids are spiffe://<trust_domain>/ns/<namespace>/sa/<service>")
    ca_cert_file: str | None = Field(default=None, description="an operator's CA certificate (root or intermediate, PEM); without it a root is generated on first start and kept in the store")
    ca_key_file: str | None = Field(default=None, description="the private key of ca_cert_file (PEM)")
    ca_chain_file: str | None = Field(default=None, description="the certificates above ca_cert_file up to its root (PEM), when it is an intermediate")
    workload_cert_ttl_s: float = Field(default=86_400.0, ge=10, le=90 * 86_400, description="lifetime of a workload certificate; agents renew at half of it")
    enrolment_port: int | None = Field(default=None, ge=0, le=65535, description="with identity on: the port where a node enrols with its join token (TLS, no client certificate); unset: xds_port + 2 (15012), or one the OS picks when xds_port is 0")
    xds_server_names: list[str] = Field(default_factory=lambda: ["localhost"], description="DNS names in the control plane's serving certificate, besides listen_address")
    mtls_mode: str = Field(default="PERMISSIVE", pattern="^(DISABLE|PERMISSIVE|STRICT)$", description="the mesh-wide mTLS mode between sidecars when identity is on; MtlsPolicy overrides it per namespace or service")
    prometheus_sd_file: str | None = Field(default=None, description="keep a Prometheus file_sd JSON file here: every connected sidecar's stats listener and every replica's /metrics (docs/observability.md)")
    prometheus_url: str | None = Field(default=None, pattern=r"^https?://[^\s/]+(/[^\s]*)?$", description="the Prometheus that scrapes the mesh (http://HOST:PORT); /v1/topology queries it")
    topology_window_s: float = Field(default=300.0, ge=1, le=86_400, description="the default window /v1/topology counts requests over")
    trace_store_spans: int = Field(default=100_000, ge=1, le=10_000_000, description="spans the control plane's trace store keeps in memory (newest traces; not kept across restarts)")
    trace_store_bytes: int = Field(default=256 * 1024 * 1024, ge=1024 * 1024, le=64 * 1024**3, description="bytes (about: the spans' names, tags and annotations and a fixed cost per span and per trace) the control plane's trace store keeps in memory; past it the traces least recently written go, as past trace_store_spans")
    try_it_proxy: str | None = Field(default=None, pattern=r"^[^\s/:]+:\d{1,5}$", description="HOST:PORT of the outbound listener of a sidecar run on the control plane's host (e.g. for meshpilot-console): the API catalog's try-it sends requests through it (docs/catalog.md: Try it); unset: try-it is off")
    log_store_records: int = Field(default=100_000, ge=1, le=10_000_000, description="log records the control plane's log store keeps in memory (the newest arrivals; not kept across restarts)")
    log_store_bytes: int = Field(default=256 * 1024 * 1024, ge=1024 * 1024, le=64 * 1024**3, description="bytes (about: the lines, names and a fixed cost per record) the control plane's log store keeps in memory; past it the earliest arrivals go, as past log_store_records")
    alert_interval_s: float = Field(default=15.0, ge=0.1, le=3600, description="how often the control plane evaluates the alert rules")
    log_level: str = "INFO"


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    data: dict[str, Any] = {}
    if path:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: settings must be a mapping")
        data.update(loaded)
    for name in Settings.model_fields:
        env = os.environ.get(f"MESHPILOT_{name.upper()}")
        if env is not None:
            data[name] = None if env == "" else env
    data.update(overrides)  # as given: None means 'disabled' for the optional ports
    settings = Settings.model_validate(data)
    if settings.token_file:
        if settings.token:
            raise ValueError("token, token_file: set one of them, not both")
        settings = settings.model_copy(update={"token": read_token(settings.token_file, "token_file")})
    if settings.identity and not settings.token:
        # the management API makes join tokens and changes roots: open to anyone, the CA would be too
        raise ValueError("identity: needs token (or token_file): without one, anyone who reaches the management API "
                         "could make a join token and enrol as any service")
    return settings


def read_token(path: str | Path, what: str) -> str:
    """A secret kept in a file (one line; surrounding white space is not part of it)."""
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc}") from None
    if not token:
        raise ValueError(f"{what}: {path} is empty")
    return token
