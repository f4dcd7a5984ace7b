"""Eureka's wire formats, without I/O: its JSON and XML shapes, instance parsing, and the
registry's ``apps__hashcode``.

Eureka's JSON is the JSON rendering of its XML: attributes become ``@name`` keys and element text
becomes ``$`` (``"port": {"$": 8080, "@enabled": "true"}``). Both directions go through one plain
dict form, so one set of views serves ``application/json`` and ``application/xml``. Every
registration is validated here and rejected with ``EurekaError`` naming the field.
"""

from __future__ import annotations

import ipaddress
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from xml.parsers import expat
from xml.sax.saxutils import escape, quoteattr

from meshpilot.boundedjson import MAX_DEPTH

__all__ = [
    "EurekaError",
    "InstanceInfo",
    "STATUSES",
    "from_xml",
    "hashcode",
    "parse_instance",
    "to_xml",
]

STATUSES = ("UP", "DOWN", "STARTING", "OUT_OF_SERVICE", "UNKNOWN")
_XML_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_APP = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_INSTANCE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,199}$")


class EurekaError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    """A registration, reduced to what meshpilot keeps; ``raw`` is the body as sent (plain form)."""

    app: str
    instance_id: str
    host_name: str
    ip: str
    port: int
    status: str
    vip: str
    metadata: dict[str, str] = field(default_factory=dict)
    duration_s: int = 90
    renewal_s: int = 30
    raw: dict[str, Any] = field(default_factory=dict)


def to_xml(tag: str, value: Any) -> str:
    """The XML element for a plain value (dicts with ``@attr``/``$`` keys, lists repeat the tag)."""
    if isinstance(value, list):
        return "".join(to_xml(tag, v) for v in value)
    if not _XML_NAME.match(tag):
        return ""
    if isinstance(value, dict):
        attrs = "".join(f" {k[1:]}={quoteattr(str(v))}" for k, v in value.items() if k.startswith("@") and _XML_NAME.match(k[1:]))
        inner = escape(str(value["$"])) if "$" in value else ""
        inner += "".join(to_xml(k, v) for k, v in value.items() if not k.startswith("@") and k != "$")
        return f"<{tag}{attrs}>{inner}</{tag}>"
    if value is None:
        return f"<{tag}/>"
    if isinstance(value, bool):
        value = "true" if value else "false"
    return f"<{tag}>{escape(str(value))}</{tag}>"


def from_xml(data: bytes) -> tuple[str, Any]:
    """(root tag, plain form) of an XML document; DTDs (so entities) and documents nested deeper
    than ``MAX_DEPTH`` are refused. The DTD is seen by the parser, after decoding, so no encoding
    (UTF-16, UTF-32, a declared charset) hides it."""
    tree = ET.TreeBuilder()
    depth = 0

    def start(tag: str, attrs: dict[str, str]) -> None:
        nonlocal depth
        depth += 1
        if depth > MAX_DEPTH:
            raise EurekaError(400, f"XML documents nested deeper than {MAX_DEPTH} elements are not accepted")
        tree.start(tag, attrs)

    def end(tag: str) -> None:
        nonlocal depth
        depth -= 1
        tree.end(tag)

    def dtd(*_: Any) -> None:
        raise EurekaError(400, "XML documents with a DTD are not accepted")

    parser = expat.ParserCreate()
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = tree.data
    parser.StartDoctypeDeclHandler = dtd
    parser.EntityDeclHandler = dtd
    try:
        parser.Parse(data, True)
    except expat.ExpatError as exc:
        raise EurekaError(400, f"malformed XML: {exc}") from None
    root = tree.close()
    return root.tag, _plain(root)


def _plain(el: ET.Element) -> Any:
    children = list(el)
    if not children and not el.attrib:
        return (el.text or "").strip()
    out: dict[str, Any] = {f"@{k}": v for k, v in el.attrib.items()}
    if not children:
        out["$"] = (el.text or "").strip()
        return out
    for c in children:
        v = _plain(c)
        if c.tag in out:
            prev = out[c.tag]
            out[c.tag] = [*prev, v] if isinstance(prev, list) else [prev, v]
        else:
            out[c.tag] = v
    return out


def hashcode(statuses: Iterable[str]) -> str:
    """Eureka's reconcile hash code: ``<STATUS>_<count>_`` for each status, in name order."""
    counts = Counter(statuses)
    return "".join(f"{s}_{counts[s]}_" for s in sorted(counts))


def _text(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("$", "")
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        raise EurekaError(400, "expected a single value, got a list")
    return str(value).strip()


def _int(doc: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    raw = _text(doc.get(key, ""))
    if raw == "":
        return default
    try:
        n = int(raw)
    except ValueError:
        raise EurekaError(400, f"{key}: expected an integer, got {raw!r}") from None
    if not lo <= n <= hi:
        raise EurekaError(400, f"{key}: must be between {lo} and {hi}, got {n}")
    return n


def _enabled(value: Any, default: bool) -> bool:
    if isinstance(value, dict) and "@enabled" in value:
        return str(value["@enabled"]).lower() == "true"
    return default


def parse_instance(doc: Any, app_in_path: str) -> InstanceInfo:
    """Validate an ``{"instance": {...}}`` body (or its XML form) registered under ``app_in_path``."""
    if isinstance(doc, dict) and set(doc) == {"instance"}:
        doc = doc["instance"]
    if not isinstance(doc, dict):
        raise EurekaError(400, "instance: expected an object")
    app = _text(doc.get("app", ""))
    if not app:
        raise EurekaError(400, "Missing appName")
    if app.lower() != app_in_path.lower():
        raise EurekaError(400, f"Mismatched appName, expecting {app_in_path} but was {app}")
    if not _APP.match(app):
        raise EurekaError(400, f"app: {app!r} must be a DNS label (letters, digits and '-', at most 63) to be a meshpilot service")
    host = _text(doc.get("hostName", ""))
    if not host:
        raise EurekaError(400, "Missing hostname")
    ip = _text(doc.get("ipAddr", ""))
    if not ip:
        raise EurekaError(400, "Missing ip address")
    try:
        ip = str(ipaddress.ip_address(ip))
    except ValueError:
        raise EurekaError(400, f"ipAddr: {ip!r} is not an IP address") from None
    instance_id = _text(doc.get("instanceId", "")) or host
    if not _INSTANCE_ID.match(instance_id):
        raise EurekaError(400, f"instanceId: {instance_id!r} must be 1-200 letters, digits and _.:@-")
    status = _text(doc.get("status", "")).upper() or "UP"
    if status not in STATUSES:
        raise EurekaError(400, f"status: {status!r} is not one of {', '.join(STATUSES)}")
    dci = doc.get("dataCenterInfo")
    if not isinstance(dci, dict) or not (_text(dci.get("name", "")) or dci.get("@class")):
        raise EurekaError(400, "Missing dataCenterInfo Name")
    port_raw, secure_raw = doc.get("port"), doc.get("securePort")
    port_on = _enabled(port_raw, True)
    secure_on = _enabled(secure_raw, False)
    use = port_raw if port_on or not secure_on else secure_raw
    try:
        port = int(_text(use) or "0")
    except ValueError:
        raise EurekaError(400, f"port: expected an integer, got {_text(use)!r}") from None
    if not 1 <= port <= 65535:
        raise EurekaError(400, f"port: must be 1-65535 (meshpilot routes to a port), got {port}")
    metadata: dict[str, str] = {}
    md = doc.get("metadata") or {}
    if not isinstance(md, dict):
        raise EurekaError(400, "metadata: expected an object")
    for k, v in md.items():
        if k.startswith("@"):
            continue
        text = _text(v)
        if not k or len(k) > 128 or len(text) > 512:
            raise EurekaError(400, f"metadata[{k!r}]: keys must be 1-128 characters, values at most 512")
        metadata[k] = text
    if len(metadata) > 60:
        raise EurekaError(400, "metadata: at most 60 entries")
    protocol = metadata.get("protocol", "http").lower()
    if protocol not in ("http", "http2", "grpc", "tcp"):
        raise EurekaError(400, f"metadata[protocol]: {protocol!r} is not one of http, http2, grpc, tcp")
    lease = doc.get("leaseInfo") or {}
    if not isinstance(lease, dict):
        raise EurekaError(400, "leaseInfo: expected an object")
    duration = _int(lease, "durationInSecs", 90, 1, 86400)
    renewal = _int(lease, "renewalIntervalInSecs", 30, 1, 86400)
    vip = _text(doc.get("vipAddress", "")) or app.lower()
    return InstanceInfo(
        app=app.upper(), instance_id=instance_id, host_name=host, ip=ip, port=port, status=status, vip=vip,
        metadata=metadata, duration_s=duration, renewal_s=renewal, raw=doc,
    )
