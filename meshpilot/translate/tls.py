"""Mutual TLS between sidecars: SDS secret references and the TLS contexts built on them.

A sidecar whose node has an identity (``NodeInfo.identity``: its agent serves SDS) holds two secrets
that never leave the node: ``default`` (its workload certificate chain and key) and ``ROOTCA`` (the
mesh's trust bundle), served by the agent on the bootstrap's static cluster ``meshpilot-sds``. The
control plane only names them. Callers' clusters of a PERMISSIVE service get a transport socket
match (``tls: mesh``) that talks TLS to the endpoints of sidecars with an identity, checking the
callee's URI SAN against the service's SPIFFE id; every other endpoint (an SDK app without a
sidecar) stays plaintext. Clusters of a STRICT service have that TLS socket as their default and
no plaintext one, whatever the endpoint's metadata says. Callees'
inbound listeners terminate TLS with a required client certificate; who the caller is becomes the
peer certificate's URI SAN (listeners.py puts it in ``x-mesh-caller``; RBAC matches it).

The mode a destination service is in (``DISABLE``, ``PERMISSIVE``, ``STRICT``) comes from the
MtlsPolicy kind (policy/mtls.py) or the mesh-wide setting; translate/ only reads the value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2, grpc_service_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import struct_pb2

from meshpilot.pki import spiffe_id
from meshpilot.translate.bootstrap import SDS_CLUSTER  # the bootstrap's static cluster to the agent's SDS socket
from meshpilot.xds.resource import pack

__all__ = [
    "CERT_SECRET",
    "DISABLE",
    "MODES",
    "PERMISSIVE",
    "ROOT_SECRET",
    "SDS_CLUSTER",
    "STRICT",
    "TLS_MATCH",
    "TLS_MATCH_KEY",
    "TLS_SOCKET",
    "TlsSettings",
    "downstream_tls",
    "mark_tls_endpoint",
    "mesh_socket_matches",
    "sds_secret",
    "tls_socket",
    "upstream_tls",
]

CERT_SECRET = "default"  # tls_certificate: the workload's chain and key
ROOT_SECRET = "ROOTCA"  # validation_context: the trust bundle
TLS_SOCKET = "envoy.transport_sockets.tls"
TLS_MATCH_KEY = "envoy.transport_socket_match"  # endpoint metadata namespace Envoy matches sockets on
TLS_MATCH = {"tls": "mesh"}  # on endpoints of sidecars with an identity

DISABLE = "DISABLE"
PERMISSIVE = "PERMISSIVE"
STRICT = "STRICT"
MODES = (DISABLE, PERMISSIVE, STRICT)


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """What the translation needs to know about identities: whether they are on, the trust domain,
    the mesh-wide mode, and the modes of services (service key → mode) and namespaces (namespace →
    mode) that MtlsPolicies set; a service's own mode wins over its namespace's."""

    enabled: bool = False
    trust_domain: str = "mesh.local"
    default: str = PERMISSIVE
    modes: Mapping[str, str] = field(default_factory=dict)
    namespace_modes: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for mode in (self.default, *self.modes.values(), *self.namespace_modes.values()):
            if mode not in MODES:
                raise ValueError(f"mtls mode must be one of {', '.join(MODES)}, got {mode!r}")

    def mode(self, service_key: str) -> str:
        """The service's mode; DISABLE whenever identities are off."""
        if not self.enabled:
            return DISABLE
        mode = self.modes.get(service_key)
        if mode is None:  # a service key is <name>.<namespace>; names are DNS labels (no dots)
            mode = self.namespace_modes.get(service_key.partition(".")[2], self.default)
        return mode

    def service_id(self, namespace: str, service: str) -> str:
        """The SPIFFE id a service's workloads carry in their certificates."""
        return spiffe_id(self.trust_domain, namespace, service)


_pack = pack


def sds_secret(name: str) -> secret_pb2.SdsSecretConfig:
    """A reference to the agent's secret ``name`` over SDS on ``meshpilot-sds``."""
    source = config_source_pb2.ConfigSource(
        resource_api_version=config_source_pb2.V3,
        api_config_source=config_source_pb2.ApiConfigSource(
            api_type=config_source_pb2.ApiConfigSource.GRPC,
            transport_api_version=config_source_pb2.V3,
            grpc_services=[grpc_service_pb2.GrpcService(envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=SDS_CLUSTER))],
            # as the bootstrap's (translate/bootstrap.py sds_config): Envoy shares one subscription
            # per identical secret config, so the listeners' and clusters' secrets ride the
            # bootstrap's stream instead of opening their own
            set_node_on_first_message_only=True,
        ),
    )
    return secret_pb2.SdsSecretConfig(name=name, sds_config=source)


def _common(peer_uri: str | None) -> tls_pb2.CommonTlsContext:
    """Our certificate, and the trust bundle (plus, when given, the exact URI SAN the peer must show)."""
    validation = common_pb2.CertificateValidationContext()
    if peer_uri is not None:
        validation.match_typed_subject_alt_names.append(common_pb2.SubjectAltNameMatcher(
            san_type=common_pb2.SubjectAltNameMatcher.URI, matcher=string_pb2.StringMatcher(exact=peer_uri)))
    return tls_pb2.CommonTlsContext(
        tls_certificate_sds_secret_configs=[sds_secret(CERT_SECRET)],
        combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
            default_validation_context=validation, validation_context_sds_secret_config=sds_secret(ROOT_SECRET)),
    )


def upstream_tls(peer_uri: str) -> tls_pb2.UpstreamTlsContext:
    """The caller's side: present our certificate; accept only a callee whose URI SAN is ``peer_uri``."""
    return tls_pb2.UpstreamTlsContext(common_tls_context=_common(peer_uri))


def downstream_tls() -> tls_pb2.DownstreamTlsContext:
    """The callee's side: present our certificate; require one from the caller, signed by the trust
    bundle (any workload of the trust domain: who may call is AuthorizationPolicy's business)."""
    ctx = tls_pb2.DownstreamTlsContext(common_tls_context=_common(None))
    ctx.require_client_certificate.value = True
    return ctx


def tls_socket(ctx: tls_pb2.UpstreamTlsContext | tls_pb2.DownstreamTlsContext) -> base_pb2.TransportSocket:
    return base_pb2.TransportSocket(name=TLS_SOCKET, typed_config=_pack(ctx))


def mesh_socket_matches(peer_uri: str) -> list[cluster_pb2.Cluster.TransportSocketMatch]:
    """A cluster's socket per endpoint: TLS to endpoints marked ``tls: mesh`` (sidecars with an
    identity), the cluster's default (plaintext) to the rest."""
    match = struct_pb2.Struct()
    match.update(TLS_MATCH)
    return [cluster_pb2.Cluster.TransportSocketMatch(name="mesh-mtls", match=match, transport_socket=tls_socket(upstream_tls(peer_uri)))]


def mark_tls_endpoint(metadata: base_pb2.Metadata) -> None:
    """Mark an endpoint as a sidecar with an identity (the TLS socket match selects it)."""
    md = struct_pb2.Struct()
    md.update(TLS_MATCH)
    metadata.filter_metadata[TLS_MATCH_KEY].CopyFrom(md)
