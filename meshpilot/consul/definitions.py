"""Parsing of Consul request bodies and parameters: durations, service and check definitions.

Pure functions, no I/O. Consul's decoder accepts field names in any case and in snake_case
(``DeregisterCriticalServiceAfter``, ``deregister_critical_service_after``); so do these, by
folding every key to lower case without ``_`` and ``-``. Anything invalid raises ``ConsulError``
with the status code and plain-text message Consul would answer; nothing here touches the registry.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "CheckDef",
    "ConsulError",
    "ServiceDef",
    "canonical_ip",
    "fold",
    "mesh_name",
    "parse_catalog_registration",
    "parse_check",
    "parse_duration",
    "parse_service",
]

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_SERVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")
_CHECK_ID = re.compile(r"^[^\s/?#%]{1,200}$")
_MESH_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SERVICE_NAME = re.compile(r"^[^/\x00-\x1f\x7f]{1,256}$")
_META_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_PROTOCOLS = ("http", "http2", "grpc", "tcp")
MAX_DURATION_S = 7 * 24 * 3600.0


class ConsulError(Exception):
    """An error answered as Consul does: a status code and a plain-text body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_duration(value: Any, what: str = "duration") -> float:
    """A Go duration (``10s``, ``1m30s``, ``500ms``) or a number of nanoseconds, in seconds."""
    if isinstance(value, bool):
        raise ConsulError(400, f"Request decode failed: {what}: invalid duration {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value) / 1e9
    elif isinstance(value, str):
        text = value.strip()
        if text in ("", "0"):
            return 0.0
        sign = 1.0
        if text[0] in "+-":
            sign = -1.0 if text[0] == "-" else 1.0
            text = text[1:]
        pos = 0
        seconds = 0.0
        while pos < len(text):
            m = _DURATION_PART.match(text, pos)
            if m is None:
                raise ConsulError(400, f"Request decode failed: {what}: time: invalid duration {value!r}")
            seconds += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if not text:
            raise ConsulError(400, f"Request decode failed: {what}: time: invalid duration {value!r}")
        seconds *= sign
    else:
        raise ConsulError(400, f"Request decode failed: {what}: invalid duration {value!r}")
    if seconds != seconds or seconds > MAX_DURATION_S or seconds < -MAX_DURATION_S:
        raise ConsulError(400, f"Request decode failed: {what}: duration {value!r} out of range")
    return seconds


def fold(data: Any) -> Any:
    """Keys folded to lower case without '_' and '-' (recursively, except inside Meta and Header)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        known = _FOLDED
        for k, v in data.items():
            key = known.get(k) if type(k) is str else None
            if key is None:
                key = _folded_key(str(k))
            if isinstance(v, (dict, list)):
                if key == "taggedaddresses" and isinstance(v, dict):
                    out[key] = {str(tag): fold(addr) for tag, addr in v.items()}
                else:
                    out[key] = v if key in _VERBATIM else fold(v)
            else:
                out[key] = v
        return out
    if isinstance(data, list):
        return [fold(x) if isinstance(x, (dict, list)) else x for x in data]
    return data


_VERBATIM = frozenset({"meta", "header", "nodemeta"})
_FOLDED: dict[str, str] = {}  # field name as sent -> folded: clients send the same few dozen in every request
_MAX_FOLDED = 4096


def _folded_key(key: str) -> str:
    folded = key.lower().replace("_", "").replace("-", "")
    if len(_FOLDED) < _MAX_FOLDED:
        _FOLDED[key] = folded
    return folded


@dataclass(frozen=True, slots=True)
class CheckDef:
    """One check as registered: how meshpilot keeps it current."""

    id: str
    name: str
    kind: str  # ttl | http | tcp | none (the status is set by whoever registered it: the catalog)
    service_id: str = ""
    ttl_s: float = 0.0
    url: str = ""
    method: str = "GET"
    headers: tuple[tuple[str, str], ...] = ()
    tcp: str = ""
    interval_s: float = 0.0
    timeout_s: float = 10.0
    deregister_after_s: float = 0.0
    status: str = "critical"
    notes: str = ""
    output: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "kind": self.kind, "service_id": self.service_id,
            "ttl_s": self.ttl_s, "url": self.url, "method": self.method, "headers": [list(h) for h in self.headers],
            "tcp": self.tcp, "interval_s": self.interval_s, "timeout_s": self.timeout_s,
            "deregister_after_s": self.deregister_after_s, "status": self.status, "notes": self.notes,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CheckDef:
        return cls(
            id=d["id"], name=d["name"], kind=d["kind"], service_id=d.get("service_id", ""), ttl_s=d.get("ttl_s", 0.0),
            url=d.get("url", ""), method=d.get("method", "GET"), headers=tuple(tuple(h) for h in d.get("headers", [])),
            tcp=d.get("tcp", ""), interval_s=d.get("interval_s", 0.0), timeout_s=d.get("timeout_s", 10.0),
            deregister_after_s=d.get("deregister_after_s", 0.0), status=d.get("status", "critical"), notes=d.get("notes", ""),
        )

    def definition(self) -> dict[str, Any]:
        """The check's ``Definition`` as Consul shows it."""
        out: dict[str, Any] = {}
        if self.kind == "http":
            out.update(HTTP=self.url, Method=self.method, Header={k: [v] for k, v in self.headers})
        if self.kind == "tcp":
            out["TCP"] = self.tcp
        if self.interval_s:
            out["Interval"] = _go_duration(self.interval_s)
            out["Timeout"] = _go_duration(self.timeout_s)
        if self.ttl_s:
            out["TTL"] = _go_duration(self.ttl_s)
        if self.deregister_after_s:
            out["DeregisterCriticalServiceAfter"] = _go_duration(self.deregister_after_s)
        return out


@dataclass(frozen=True, slots=True)
class ServiceDef:
    """A service registration; ``address`` is an IP address or a host name still to resolve."""

    id: str
    name: str  # as registered; ``mesh_name(name)`` is the registry's name for it
    address: str
    port: int  # 0: registered without a port (listed, never routed to)
    tags: tuple[str, ...] = ()
    meta: dict[str, str] = field(default_factory=dict)
    weight: int = 1
    protocol: str = "http"
    checks: tuple[CheckDef, ...] = ()
    tagged: dict[str, dict[str, Any]] = field(default_factory=dict)  # TaggedAddresses as registered


def _str(d: dict[str, Any], key: str, what: str, default: str = "") -> str:
    v = d.get(key, default)
    if v is None:
        return default
    if not isinstance(v, str):
        raise ConsulError(400, f"Request decode failed: {what}: expected a string, got {type(v).__name__}")
    return v


def _go_duration(seconds: float) -> str:
    if seconds >= 1 and float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{int(round(seconds * 1000))}ms"


def parse_check(raw: Any, *, service_id: str = "", service_name: str = "", index: int = 0, total: int = 1,
                folded: bool = False) -> CheckDef:
    """A check definition (inside a service registration, or for ``/v1/agent/check/register``);
    ``folded``: its keys are already folded (it comes from a folded registration)."""
    if not isinstance(raw, dict):
        raise ConsulError(400, "Request decode failed: Check: expected an object")
    d = raw if folded else fold(raw)
    for unsupported, label in (("args", "script"), ("script", "script"), ("grpc", "gRPC"), ("dockercontainerid", "Docker"),
                               ("h2ping", "H2PING"), ("udp", "UDP"), ("osservice", "OSService"), ("aliasservice", "alias"),
                               ("aliasnode", "alias")):
        if d.get(unsupported):
            raise ConsulError(400, f"Invalid check: {label} checks are not supported by meshpilot; use TTL, HTTP or TCP")
    sid = _str(d, "serviceid", "ServiceID", service_id) or service_id
    ttl = parse_duration(d["ttl"], "TTL") if d.get("ttl") not in (None, "") else 0.0
    http = _str(d, "http", "HTTP")
    tcp = _str(d, "tcp", "TCP")
    interval = parse_duration(d["interval"], "Interval") if d.get("interval") not in (None, "") else 0.0
    timeout = parse_duration(d["timeout"], "Timeout") if d.get("timeout") not in (None, "") else 10.0
    dereg = (
        parse_duration(d["deregistercriticalserviceafter"], "DeregisterCriticalServiceAfter")
        if d.get("deregistercriticalserviceafter") not in (None, "")
        else 0.0
    )
    kinds = [k for k, on in (("ttl", ttl > 0 or "ttl" in d and d["ttl"] not in (None, "")), ("http", bool(http)), ("tcp", bool(tcp))) if on]
    if not kinds:
        raise ConsulError(400, "Invalid check: TTL must be > 0 for TTL checks; or set HTTP or TCP with an Interval")
    if len(kinds) > 1:
        raise ConsulError(400, f"Invalid check: only one of TTL, HTTP and TCP may be set (got {', '.join(k.upper() for k in kinds)})")
    kind = kinds[0]
    if kind == "ttl" and ttl <= 0:
        raise ConsulError(400, "Invalid check: TTL must be > 0 for TTL checks")
    if kind in ("http", "tcp") and interval <= 0:
        raise ConsulError(400, f"Invalid check: Interval must be > 0 for {kind.upper()} checks")
    if kind in ("http", "tcp") and interval < 0.1:
        raise ConsulError(400, f"Invalid check: Interval must be at least 100ms for {kind.upper()} checks")
    if timeout <= 0:
        raise ConsulError(400, "Invalid check: Timeout must be > 0")
    if dereg < 0:
        raise ConsulError(400, "Invalid check: DeregisterCriticalServiceAfter must not be negative")
    url = ""
    if kind == "http":
        if not re.match(r"^https?://[^\s/]+(/\S*)?$", http):
            raise ConsulError(400, f"Invalid check: HTTP must be an http:// or https:// URL, got {http!r}")
        url = http
    if kind == "tcp":
        host, sep, port = tcp.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConsulError(400, f"Invalid check: TCP must be host:port, got {tcp!r}")
    method = _str(d, "method", "Method", "GET").upper() or "GET"
    if method not in ("GET", "HEAD", "POST", "PUT", "OPTIONS", "DELETE", "PATCH"):
        raise ConsulError(400, f"Invalid check: Method {method!r} is not an HTTP method")
    headers: list[tuple[str, str]] = []
    raw_headers = d.get("header") or {}
    if not isinstance(raw_headers, dict):
        raise ConsulError(400, "Request decode failed: Header: expected an object of lists of strings")
    for hk, hv in raw_headers.items():
        values = hv if isinstance(hv, list) else [hv]
        for one in values:
            if not isinstance(one, str) or "\n" in one or "\r" in one or "\n" in str(hk) or "\r" in str(hk):
                raise ConsulError(400, f"Invalid check: Header {hk!r} must be a list of single-line strings")
            headers.append((str(hk), one))
    status = _str(d, "status", "Status", "critical").lower() or "critical"
    if status not in ("passing", "warning", "critical"):
        raise ConsulError(400, f"Invalid check: Status must be passing, warning or critical, got {status!r}")
    default_id = f"service:{sid}" if sid else ""
    if sid and total > 1:
        default_id = f"service:{sid}:{index + 1}"
    cid = _str(d, "checkid", "CheckID") or _str(d, "id", "ID") or default_id or _str(d, "name", "Name")
    if not cid:
        raise ConsulError(400, "Missing check name")
    if not _CHECK_ID.match(cid):
        raise ConsulError(400, f"Invalid check: CheckID {cid!r} must be 1-200 characters without spaces, '/', '?', '#' or '%'")
    name = _str(d, "name", "Name") or (f"Service '{service_name}' check" if service_name else cid)
    return CheckDef(
        id=cid, name=name[:256], kind=kind, service_id=sid, ttl_s=ttl, url=url, method=method, headers=tuple(headers),
        tcp=tcp, interval_s=interval, timeout_s=timeout, deregister_after_s=dereg, status=status,
        notes=_str(d, "notes", "Notes")[:1024],
    )


@functools.lru_cache(maxsize=8192)
def canonical_ip(text: str) -> str | None:
    """``text`` as an IP address in its canonical form, or None when it is not one (remembered: a
    registration's address is parsed once per request, and the same few thousand come back)."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def parse_service(raw: Any, caller: str) -> ServiceDef:
    """A ``/v1/agent/service/register`` body; ``caller`` is the calling address (the default Address)."""
    if not isinstance(raw, dict):
        raise ConsulError(400, "Request decode failed: expected a JSON object")
    d = fold(raw)
    name = _str(d, "name", "Name").strip()
    if not name:
        raise ConsulError(400, "Missing service name")
    if not _SERVICE_NAME.match(name):
        raise ConsulError(400, f"Invalid service name {name!r}: at most 256 characters, without '/' or control characters")
    sid = _str(d, "id", "ID").strip() or name
    if not _SERVICE_ID.match(sid):
        raise ConsulError(400, f"Invalid service ID {sid!r}: use 1-128 letters, digits and _.:@-")
    kind = _str(d, "kind", "Kind")
    if kind:
        raise ConsulError(400, f"Invalid service Kind {kind!r}: meshpilot registers typical services only")
    address = _str(d, "address", "Address").strip() or caller
    ip = canonical_ip(address)
    if ip is not None:
        address = ip
    elif not _HOSTNAME.match(address):
        raise ConsulError(400, f"Invalid service address {address!r}: must be an IP address or a host name")
    port = d.get("port", 0)
    if isinstance(port, bool) or not isinstance(port, int):
        raise ConsulError(400, f"Request decode failed: Port: expected an integer, got {port!r}")
    if not 0 <= port <= 65535:
        raise ConsulError(400, f"Invalid service port {port}: must be 0-65535")
    tags_raw = d.get("tags") or []
    if not isinstance(tags_raw, list) or not all(isinstance(t, str) for t in tags_raw):
        raise ConsulError(400, "Request decode failed: Tags: expected a list of strings")
    tags = tuple(dict.fromkeys(t for t in tags_raw if t))
    for t in tags:
        if "," in t or len(t) > 256:
            raise ConsulError(400, f"Invalid tag {t!r}: tags must be at most 256 characters without ','")
    if len(",".join(tags)) > 512:
        raise ConsulError(400, "Invalid tags: at most 512 characters in all")
    meta_raw = d.get("meta") or {}
    if not isinstance(meta_raw, dict):
        raise ConsulError(400, "Request decode failed: Meta: expected an object of strings")
    meta: dict[str, str] = {}
    for k, v in meta_raw.items():
        if not isinstance(v, str):
            raise ConsulError(400, f"Request decode failed: Meta[{k!r}]: expected a string")
        if not _META_KEY.match(str(k)):
            raise ConsulError(400, f"Invalid meta key {k!r}: 1-128 letters, digits, '_', '.' and '-'")
        if len(v) > 512:
            raise ConsulError(400, f"Invalid meta value for {k!r}: at most 512 characters")
        meta[str(k)] = v
    if len(meta) > 64:
        raise ConsulError(400, "Invalid meta: at most 64 keys")
    weight = 1
    weights = d.get("weights")
    if weights is not None:
        if not isinstance(weights, dict):
            raise ConsulError(400, "Request decode failed: Weights: expected an object")
        passing = weights.get("passing") or 1  # 0 (a client's zero value) means the default, as in Consul
        if isinstance(passing, bool) or not isinstance(passing, int) or not 1 <= passing <= 10_000:
            raise ConsulError(400, f"Invalid weights: Passing must be 1-10000, got {passing!r}")
        weight = passing
    protocol = meta.get("protocol", "").lower()
    if protocol and protocol not in _PROTOCOLS:
        raise ConsulError(400, f"Invalid meta protocol {protocol!r}: one of {', '.join(_PROTOCOLS)}")
    if not protocol:
        lowered = {t.lower() for t in tags}
        protocol = next((p for p in ("grpc", "http2", "tcp") if p in lowered), "http")
    raw_checks: list[Any] = []
    if d.get("check"):
        raw_checks.append(d["check"])
    extra = d.get("checks") or []
    if not isinstance(extra, list):
        raise ConsulError(400, "Request decode failed: Checks: expected a list")
    raw_checks.extend(extra)
    checks = tuple(parse_check(c, service_id=sid, service_name=name, index=n, total=len(raw_checks), folded=True)
                   for n, c in enumerate(raw_checks))
    ids = [c.id for c in checks]
    if len(set(ids)) != len(ids):
        raise ConsulError(400, "Invalid check: CheckIDs must be unique within a service")
    return ServiceDef(id=sid, name=name, address=address, port=port, tags=tags, meta=meta, weight=weight,
                      protocol=protocol, checks=checks, tagged=_tagged_addresses(d.get("taggedaddresses")))


def parse_catalog_registration(raw: Any) -> tuple[str, ServiceDef]:
    """A ``/v1/catalog/register`` body: (node, the service with its checks, statuses as given)."""
    if not isinstance(raw, dict):
        raise ConsulError(400, "Request decode failed: expected a JSON object")
    d = fold(raw)
    node = _str(d, "node", "Node").strip()
    if not node:
        raise ConsulError(400, "Must provide node")
    address = _str(d, "address", "Address").strip()
    if not address:
        raise ConsulError(400, "Must provide address")
    svc = d.get("service")
    if not isinstance(svc, dict) or not svc:
        raise ConsulError(400, "Invalid catalog registration: meshpilot registers services, not bare nodes; set Service")
    body = {k: v for k, v in svc.items() if k not in ("check", "checks", "service")}
    body["name"] = svc.get("service") or svc.get("name")
    sdef = parse_service(body, address)
    raw_checks = [*([d["check"]] if d.get("check") else []), *(d.get("checks") or [])]
    checks = []
    for c in raw_checks:
        if not isinstance(c, dict):
            raise ConsulError(400, "Request decode failed: Check: expected an object")
        sid = _str(c, "serviceid", "ServiceID") or sdef.id
        if sid != sdef.id:
            raise ConsulError(400, f"Invalid check: ServiceID {sid!r} is not the registered service {sdef.id!r}; node checks are not supported")
        cid = _str(c, "checkid", "CheckID") or _str(c, "name", "Name")
        if not cid or not _CHECK_ID.match(cid):
            raise ConsulError(400, f"Invalid check: CheckID {cid!r} must be 1-200 characters without spaces, '/', '?', '#' or '%'")
        status = _str(c, "status", "Status", "critical").lower() or "critical"
        if status not in ("passing", "warning", "critical"):
            raise ConsulError(400, f"Invalid check: Status must be passing, warning or critical, got {status!r}")
        checks.append(CheckDef(id=cid, name=(_str(c, "name", "Name") or cid)[:256], kind="none", service_id=sid, status=status,
                               notes=_str(c, "notes", "Notes")[:1024], output=_str(c, "output", "Output")[:4096]))
    if len({c.id for c in checks}) != len(checks):
        raise ConsulError(400, "Invalid check: CheckIDs must be unique within a service")
    return node, replace(sdef, checks=tuple(checks))


def _tagged_addresses(raw: Any) -> dict[str, dict[str, Any]]:
    """Service ``TaggedAddresses``: tag -> {Address, Port}, kept as registered."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConsulError(400, "Request decode failed: TaggedAddresses: expected an object of {Address, Port}")
    out: dict[str, dict[str, Any]] = {}
    for tag, addr in raw.items():
        if not isinstance(addr, dict):
            raise ConsulError(400, f"Request decode failed: TaggedAddresses[{tag!r}]: expected {{Address, Port}}")
        address = _str(addr, "address", f"TaggedAddresses[{tag!r}].Address")
        port = addr.get("port", 0)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConsulError(400, f"Invalid TaggedAddresses[{tag!r}].Port {port!r}: must be 0-65535")
        if not tag or len(tag) > 128 or len(address) > 256:
            raise ConsulError(400, f"Invalid TaggedAddresses[{tag!r}]: tags of 1-128 and addresses of at most 256 characters")
        out[tag] = {"Address": address, "Port": port}
    if len(out) > 16:
        raise ConsulError(400, "Invalid TaggedAddresses: at most 16 entries")
    return out


def mesh_name(name: str) -> str:
    """The registry's (DNS-label) name for a Consul service name.

    Consul accepts names that are not DNS labels (``my_service``, ``api.v2``, ``MixedCase``); the mesh
    needs one for Envoy and meshdns. Case is folded, any run of other characters becomes ``-``, and
    a name still too long (or left empty) is cut and given a hash of the original to stay unique.
    """
    low = name.lower()
    if _MESH_NAME.match(low):
        return low
    base = re.sub(r"[^a-z0-9]+", "-", low).strip("-")
    if base and len(base) <= 63:
        return base
    digest = hashlib.sha256(low.encode()).hexdigest()[:8]
    return f"{base[:54].strip('-')}-{digest}" if base else f"svc-{digest}"
