"""The mesh CA as the control plane runs it: which roots are trusted, which one signs, and the
control plane's own serving certificate.

Roots live in the store's ``ca_roots`` table (certificate, key and chain, PEM), so a restart signs
with the same root and every issued certificate stays valid. On first start, without an operator
CA, a root is generated and kept there. With ``ca_cert_file``/``ca_key_file`` (and ``ca_chain_file``
for an intermediate) the operator's CA signs; its key stays in its file and is read at each start.
Several roots can be trusted at once and exactly one signs, which is how a root is rotated: add a
new root (trusted, not signing), activate it (it signs from now on; the old one stays trusted), and
remove the old one once every certificate it signed has expired or been renewed (the signing root
can not be removed, nor one that signed a node's current certificate that is still valid).

The xDS port serves with ``server_credentials``: a certificate for the control plane's SPIFFE id,
renewed at half its lifetime, and the trust bundle for client certificates, both read again on new
connections through grpc's dynamic credentials, so neither a renewal nor a rotation needs a restart.
grpc asks for them from its own threads while the event loop adds and removes roots, so everything
those threads read is one immutable ``_Trust`` snapshot (and one serving tuple), each replaced by a
single assignment: a fetch sees the roots before a change or after it, never half of one.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from meshpilot import pki
from meshpilot.registry.store import Store
from meshpilot.settings import Settings

__all__ = ["ENROLMENTS", "ROOTS", "MeshCa", "RootRefused", "UnknownRoot"]

log = logging.getLogger("meshpilot.identity")

ROOTS = "ca_roots"
ENROLMENTS = "enrolments"
_FILE = "file"  # the source of the operator's CA (never written to the store)
_INTERMEDIATE = "intermediate:"  # key prefix, in the roots' table, of an intermediate that signed here


class UnknownRoot(LookupError):
    """No trusted root has this serial."""


class RootRefused(ValueError):
    """The root can not be changed that way (the reason is the message)."""


def _fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


@dataclass(frozen=True, slots=True)
class _Trust:
    """What the CA trusts and who signs, at one instant. Never changed: a change builds a new one."""

    operator: pki.Authority | None
    roots: tuple[tuple[str, pki.Authority], ...]  # (anchor serial, authority) of stored roots, by serial
    anchors: tuple[tuple[str, x509.Certificate], ...]  # (serial, root) trusted without its key here
    # every operator CA certificate that signed here, the current one too (kept across file changes: a
    # call's auth context holds only the leaf, and renewal verifies its chain and its issuer again)
    signed_here: tuple[tuple[str, x509.Certificate], ...]
    signing: str  # anchor serial of the signing authority
    bundle: bytes = field(default=b"", compare=False)

    @staticmethod
    def of(operator: pki.Authority | None, roots: dict[str, pki.Authority], anchors: dict[str, x509.Certificate],
           signed_here: dict[str, x509.Certificate], signing: str) -> _Trust:
        draft = _Trust(operator, tuple(sorted(roots.items())), tuple(sorted(anchors.items())),
                       tuple(sorted(signed_here.items())), signing)
        bundle = pki.bundle_pem(c.public_bytes(serialization.Encoding.PEM) for c, _src in draft.listed())
        return _Trust(draft.operator, draft.roots, draft.anchors, draft.signed_here, signing, bundle)

    def root(self, serial: str) -> pki.Authority | None:
        return next((a for s, a in self.roots if s == serial), None)

    def authority(self) -> pki.Authority:
        if self.operator is not None:
            return self.operator
        found = self.root(self.signing)
        assert found is not None, "the signing root is a stored root"
        return found

    def trusted(self) -> list[pki.Authority]:
        return ([self.operator] if self.operator is not None else []) + [a for _s, a in self.roots]

    def listed(self) -> list[tuple[x509.Certificate, str]]:
        """(root certificate, source) of every trusted root, each serial once, the operator's first."""
        seen: set[str] = set()
        out: list[tuple[x509.Certificate, str]] = []
        keyed = [(a.anchor, _FILE if a is self.operator else "store") for a in self.trusted()]
        for cert, source in [*keyed, *((c, "added") for _s, c in self.anchors)]:
            serial = pki.serial_of(cert)
            if serial not in seen:
                seen.add(serial)
                out.append((cert, source))
        return out


def _read(path: str, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from None


class MeshCa:
    """The trusted roots and the signing authority, kept in ``store``; see the module docstring."""

    def __init__(self, store: Store, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self._lock = threading.Lock()  # grpc's credential fetcher runs on its own threads
        self._watchers: list[Callable[[bytes], None]] = []
        # read by grpc's threads: only ever replaced whole, by one assignment (see the module docstring)
        self._trust: _Trust = self._load(self._load_operator())
        # the serving certificate: (key, chain, issued at, not_after, serial of the root it chains to)
        self._serving: tuple[bytes, bytes, float, float, str] | None = None

    # ---- loading ------------------------------------------------------------------------

    def _load_operator(self) -> pki.Authority | None:
        s = self.settings
        if not s.ca_cert_file and not s.ca_key_file:
            if s.ca_chain_file:
                raise ValueError("ca_chain_file: given without ca_cert_file and ca_key_file")
            return None
        if not s.ca_cert_file or not s.ca_key_file:
            missing = "ca_key_file" if s.ca_cert_file else "ca_cert_file"
            raise ValueError(f"{missing}: ca_cert_file and ca_key_file go together")
        cert = _read(s.ca_cert_file, "ca_cert_file")
        key = _read(s.ca_key_file, "ca_key_file")
        chain = _read(s.ca_chain_file, "ca_chain_file") if s.ca_chain_file else b""
        try:
            authority = pki.Authority.from_pem(cert, key, chain)
        except pki.AuthorityError as exc:
            setting = {"cert": "ca_cert_file", "key": "ca_key_file", "chain": "ca_chain_file"}[exc.part]
            raise ValueError(f"{setting}: {exc}") from None
        if authority.not_after <= self.clock():
            raise ValueError(f"ca_cert_file: {s.ca_cert_file} has expired")
        return authority

    def _load(self, operator: pki.Authority | None) -> _Trust:
        signing = ""
        roots: dict[str, pki.Authority] = {}
        anchors: dict[str, x509.Certificate] = {}
        signed_here: dict[str, x509.Certificate] = {}
        for serial, doc in self.store.items(ROOTS):
            try:
                if serial.startswith(_INTERMEDIATE):
                    signed_here[serial] = x509.load_pem_x509_certificate(doc["cert"].encode())
                    continue
                if not doc.get("key"):
                    anchors[serial] = x509.load_pem_x509_certificate(doc["cert"].encode())
                    continue
                authority = pki.Authority.from_pem(doc["cert"].encode(), doc["key"].encode(), doc.get("chain", "").encode())
            except (KeyError, AttributeError, ValueError) as exc:
                raise ValueError(f"store table {ROOTS}: root {serial} cannot be read: {exc}") from None
            roots[serial] = authority
            if doc.get("signing"):
                signing = serial
        if operator is not None:
            # the operator's signing certificate and the intermediates above it: leaves they signed
            # renew after the files change to the next CA (the certificate itself too when it is a
            # root: a root added without its key is trusted, but is no issuer of ours)
            for cert in [operator.cert, *operator.intermediates()]:
                key = _INTERMEDIATE + pki.serial_of(cert)
                if key not in signed_here:
                    signed_here[key] = cert
                    self.store.write({(ROOTS, key): {"cert": cert.public_bytes(serialization.Encoding.PEM).decode()}})
            return _Trust.of(operator, roots, anchors, signed_here, _anchor_serial(operator))
        if not roots:
            authority = pki.Authority.generate(self.settings.trust_domain, now=self.clock())
            serial = _anchor_serial(authority)
            roots[serial] = authority
            self.store.write({(ROOTS, serial): self._root_doc(serial, authority, signing=True)})
            log.info("event=ca_root_generated serial=%s trust_domain=%s", serial, self.settings.trust_domain)
            signing = serial
        if not signing:  # a store from an interrupted rotation: the newest root signs
            signing = max(roots, key=lambda k: roots[k].cert.not_valid_before_utc)
            self.store.write({(ROOTS, signing): self._root_doc(signing, roots[signing], signing=True)})
        return _Trust.of(None, roots, anchors, signed_here, signing)

    def follow_store(self) -> None:
        """Another control-plane replica changed the roots (added, activated, removed one): take them
        from the store, and tell the bundle's watchers if the bundle changed. Two replicas that each
        generated a root at their first start end up trusting both and signing with the same one."""
        with self._lock:
            before = self.bundle_pem(), self.signing_serial
            self._trust = self._load(self._trust.operator)
            after = self.bundle_pem(), self.signing_serial
        if after != before:
            log.info("event=ca_roots_followed signing=%s roots=%d", after[1], len(self._trust.roots))
            self._changed()

    def _root_doc(self, serial: str, authority: pki.Authority, signing: bool) -> dict[str, Any]:
        cert, key, chain = authority.to_pem()
        doc: dict[str, Any] = {"cert": cert.decode(), "key": key.decode(), "chain": chain.decode(), "signing": signing,
                               "added_at": self.clock()}
        old = self.store.get(ROOTS, serial)
        if isinstance(old, dict) and "added_at" in old:
            doc["added_at"] = old["added_at"]
        return doc

    def _replace(self, roots: dict[str, pki.Authority] | None = None, anchors: dict[str, x509.Certificate] | None = None,
                 signing: str | None = None) -> None:
        """A new snapshot from the current one and the parts given, assigned in one statement."""
        t = self._trust
        self._trust = _Trust.of(t.operator, dict(t.roots) if roots is None else roots,
                                dict(t.anchors) if anchors is None else anchors, dict(t.signed_here),
                                t.signing if signing is None else signing)

    # ---- reading --------------------------------------------------------------------------

    @property
    def authority(self) -> pki.Authority:
        """The authority that signs now."""
        return self._trust.authority()

    def bundle_pem(self) -> bytes:
        """Every trusted root, PEM, each once: what peers verify against."""
        return self._trust.bundle

    def intermediates(self) -> list[x509.Certificate]:
        """The certificates between trusted roots and the leaves they sign (an operator's intermediate)."""
        t = self._trust
        current = [c for a in t.trusted() for c in a.intermediates()]
        # signed_here also keeps an operator CA that was its own root: no intermediate
        return current + [c for _s, c in t.signed_here if c not in current and c.subject != c.issuer]

    def issuers(self) -> list[x509.Certificate]:
        """The mesh's own issuing CAs: every trusted authority's signing certificate (a generated
        root, the operator's intermediate) and every operator CA that signed here before. A leaf
        that chains to a trusted root but was issued by another CA (a sibling of the operator's
        intermediate under the same corporate root) is not the mesh's."""
        t = self._trust
        out = [a.cert for a in t.trusted()]
        return out + [c for _s, c in t.signed_here if c not in out]

    def issued_here(self, leaf: x509.Certificate) -> bool:
        """Whether one of ``issuers()`` signed ``leaf`` directly (its chain is checked elsewhere)."""
        for ca in self.issuers():
            try:
                leaf.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return True
        return False

    def roots(self) -> list[dict[str, Any]]:
        """The trusted roots: serial, subject, not_before, not_after, signing, fingerprint, source."""
        t = self._trust
        signing = _anchor_serial(t.authority())
        return [
            {
                "serial": pki.serial_of(anchor),
                "subject": anchor.subject.rfc4514_string(),
                "not_before": anchor.not_valid_before_utc.timestamp(),
                "not_after": anchor.not_valid_after_utc.timestamp(),
                "signing": pki.serial_of(anchor) == signing,
                "fingerprint": _fingerprint(anchor),
                "source": source,
            }
            for anchor, source in t.listed()
        ]

    def watch(self, callback: Callable[[bytes], None]) -> Callable[[], None]:
        """Call ``callback(bundle_pem)`` on every change of the bundle; returns the unsubscribe."""
        self._watchers.append(callback)

        def cancel() -> None:
            if callback in self._watchers:
                self._watchers.remove(callback)

        return cancel

    def _changed(self) -> None:
        bundle = self.bundle_pem()
        for cb in list(self._watchers):
            try:
                cb(bundle)
            except Exception:  # one broken watcher must not stop the others hearing of it
                log.exception("event=ca_watcher_failed")

    # ---- signing --------------------------------------------------------------------------

    def sign(self, csr_pem: bytes, spiffe: str, node_id: str) -> pki.Issued:
        """A workload certificate (see pki.Authority.sign), valid ``workload_cert_ttl_s``."""
        return self._trust.authority().sign(csr_pem, spiffe, node_id, self.settings.workload_cert_ttl_s, now=self.clock())

    @property
    def signing_serial(self) -> str:
        """The serial of the root the signing authority chains to."""
        return _anchor_serial(self._trust.authority())

    async def durable(self) -> None:
        """Return when every root written so far is on disk."""
        await self.store.sync()

    # ---- rotation ---------------------------------------------------------------------------

    async def add_root(self, cert_pem: bytes | None = None) -> dict[str, Any]:
        """Generate a new root: trusted from now on, not signing until activated. With ``cert_pem``,
        trust that CA certificate instead (its key stays elsewhere: it can not sign here); that is how
        nodes come to trust an operator's next root before ``ca_cert_file`` changes to it."""
        if cert_pem is None:
            authority = pki.Authority.generate(self.settings.trust_domain, now=self.clock())
            serial = _anchor_serial(authority)
            self.store.write({(ROOTS, serial): self._root_doc(serial, authority, signing=False)})
            self._replace(roots={**dict(self._trust.roots), serial: authority})
        else:
            cert = self._trust_only(cert_pem)
            serial = pki.serial_of(cert)
            pem = cert.public_bytes(serialization.Encoding.PEM).decode()
            self.store.write({(ROOTS, serial): {"cert": pem, "key": "", "chain": "", "signing": False,
                                                "added_at": self.clock()}})
            self._replace(anchors={**dict(self._trust.anchors), serial: cert})
        await self.store.sync()
        log.info("event=ca_root_added serial=%s with_key=%s", serial, cert_pem is None)
        self._changed()
        return next(r for r in self.roots() if r["serial"] == serial)

    def _trust_only(self, cert_pem: bytes) -> x509.Certificate:
        try:
            certs = x509.load_pem_x509_certificates(cert_pem)
        except ValueError:
            raise ValueError("cert_pem: not a PEM certificate") from None
        if len(certs) != 1:
            raise ValueError(f"cert_pem: one certificate, not {len(certs)}")
        cert = certs[0]
        try:
            ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except (x509.ExtensionNotFound, ValueError):
            ca = False
        if not ca:
            raise ValueError("cert_pem: not a CA certificate (basicConstraints CA:TRUE)")
        if cert.not_valid_after_utc.timestamp() <= self.clock():
            raise ValueError("cert_pem: the certificate has expired")
        # the operator's current root may be added: kept in the store, it stays trusted when the files change
        t = self._trust
        if t.root(pki.serial_of(cert)) is not None or pki.serial_of(cert) in dict(t.anchors):
            raise RootRefused(f"root {pki.serial_of(cert)} is trusted already")
        return cert

    async def activate_root(self, serial: str) -> dict[str, Any]:
        """Make a trusted root the one that signs; the previous one stays trusted."""
        t = self._trust
        authority = t.root(serial)
        if authority is None:
            if t.operator is not None and serial == _anchor_serial(t.operator):
                return next(r for r in self.roots() if r["serial"] == serial)
            if serial in dict(t.anchors):
                raise RootRefused(f"root {serial} is trusted without its key here: it can not sign")
            raise UnknownRoot(serial)
        if t.operator is not None:
            raise RootRefused("ca_cert_file: the operator's CA signs while ca_cert_file is set; change the file "
                              "(or remove the setting) and restart")
        if authority.not_after <= self.clock() + self.settings.workload_cert_ttl_s:
            raise RootRefused(f"root {serial} expires before a certificate signed now would")
        previous = t.signing
        previous_authority = t.root(previous)
        if previous != serial and previous_authority is not None:
            # one write: a crash leaves either the old root signing or the new one, never none or both
            self.store.write({(ROOTS, previous): self._root_doc(previous, previous_authority, signing=False),
                              (ROOTS, serial): self._root_doc(serial, authority, signing=True)})
            self._replace(signing=serial)
            await self.store.sync()
            log.info("event=ca_root_activated serial=%s previous=%s", serial, previous)
        return next(r for r in self.roots() if r["serial"] == serial)

    def still_valid_under(self, serial: str) -> list[dict[str, Any]]:
        """Enrolled nodes whose current certificate chains to root ``serial`` and has not expired."""
        now = self.clock()
        return [doc for _node, doc in self.store.items(ENROLMENTS)
                if isinstance(doc, dict) and doc.get("root") == serial and float(doc.get("not_after", 0)) > now]

    async def remove_root(self, serial: str, force: bool = False) -> None:
        """Stop trusting a root. Refused for the signing root, and (unless ``force``) while a node's
        current certificate signed under it is still valid."""
        t = self._trust
        if t.operator is not None and serial == _anchor_serial(t.operator):
            raise RootRefused("ca_cert_file: the operator's CA is removed by removing the setting and restarting")
        if t.root(serial) is None and serial not in dict(t.anchors):
            raise UnknownRoot(serial)
        if serial == t.signing and t.operator is None:
            raise RootRefused(f"root {serial} signs; activate another root first")
        live = self.still_valid_under(serial)
        if live and not force:
            last = max(float(d["not_after"]) for d in live)
            raise RootRefused(
                f"root {serial} signed the current certificate of {len(live)} node(s) "
                f"(e.g. {live[0].get('node_id', '?')}), valid until {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(last))}; "
                "wait until they have renewed or expired"
            )
        self.store.write({}, deletes=((ROOTS, serial),))
        t = self._trust
        self._replace(roots={s: a for s, a in t.roots if s != serial}, anchors={s: c for s, c in t.anchors if s != serial})
        await self.store.sync()
        log.info("event=ca_root_removed serial=%s forced=%s", serial, force and bool(live))
        self._changed()

    # ---- the control plane's own certificate ------------------------------------------------

    def _serving_names(self) -> tuple[list[str], list[str]]:
        ips: list[str] = []
        try:
            ip = ipaddress.ip_address(self.settings.listen_address)
        except ValueError:
            pass
        else:
            if not ip.is_unspecified:
                ips.append(str(ip))
        return list(self.settings.xds_server_names), ips

    def serving_pem(self) -> tuple[bytes, bytes]:
        """(key PEM, chain PEM) of the control plane's serving certificate, renewed at half-life and
        whenever another root signs (so removing the previous root never strands it)."""
        with self._lock:
            now = self.clock()
            s = self._serving
            authority = self._trust.authority()  # one snapshot: the root checked is the one that signs
            signing = _anchor_serial(authority)
            if s is None or now >= s[2] + (s[3] - s[2]) / 2 or s[4] != signing:
                key = pki.new_key()
                dns, ips = self._serving_names()
                issued = authority.serve(key, pki.control_plane_id(self.settings.trust_domain), dns, ips,
                                              self.settings.workload_cert_ttl_s, now=now)
                self._serving = s = (pki.key_pem(key), issued.chain_pem, now, issued.not_after, signing)
                log.info("event=ca_serving_cert_issued serial=%s not_after=%.0f root=%s",
                         issued.serial, issued.not_after, signing)
            return s[0], s[1]

    def server_credentials(self, require_client_cert: bool = True) -> grpc.ServerCredentials:
        """TLS credentials for a gRPC port. ``require_client_cert``: the client must present a
        certificate that chains to the bundle (gRPC Python can either require and verify client
        certificates or not ask for them at all: it has no "ask, but optional")."""
        served: list[tuple[bytes, bytes, bytes]] = []  # what this port serves now
        lock = threading.Lock()

        def configuration() -> grpc.ServerCertificateConfiguration | None:
            key, chain = self.serving_pem()
            now = (key, chain, self.bundle_pem())
            with lock:
                if served and served[-1] == now:
                    return None
                served[:] = [now]
            return grpc.ssl_server_certificate_configuration(
                [(key, chain)], root_certificates=now[2] if require_client_cert else None
            )

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # grpc asks on new connections, from its own threads; None keeps what it has
            try:
                return configuration()
            except Exception:  # never raise into grpc's thread: keep serving what it has
                log.exception("event=ca_serving_config_failed")
                return None

        initial = configuration()
        assert initial is not None

        # grpc documents None as "no change"; its type stub leaves None out
        fetcher = cast(Callable[[], grpc.ServerCertificateConfiguration], fetch)
        return grpc.dynamic_ssl_server_credentials(initial, fetcher, require_client_authentication=require_client_cert)


def _anchor_serial(authority: pki.Authority) -> str:
    return pki.serial_of(authority.anchor)
