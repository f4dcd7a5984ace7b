"""Sidecar injection for Kubernetes: ``meshpilot inject -f deployment.yaml`` and the mutating
admission webhook share this pure core.

A pod template gets: the ``meshpilot-sidecar`` container (the agent, running Envoy as uid 1337),
the ``meshpilot-capture`` init container (``meshpilot capture install``, exempting uid 1337), and a
downward-API volume that mounts the pod's ``meshpilot.io/spec`` annotation as spec.yaml. The spec
is a Kubernetes Service document built from the pod's first container's ports, so the sidecar
registers the pod through HDS like any VM.

Workload identity: a join token lets one service enrol, so each pod gets the Secret of its own service:
the one its ``meshpilot.io/join-token-secret`` annotation names, else ``join_token_secret`` when the
operator set one for every pod, else ``meshpilot-join-<service>`` (:func:`join_token_secret`). Identity is
on for a pod with the annotation, and for every pod when ``identity`` or ``join_token_secret`` is set. The
Secret's ``token`` and the trust bundle ConfigMap's ``bundle.pem`` are mounted read-only into the sidecar
only and passed as ``--join-token-file`` and ``--trust-bundle``.
``inject_documents`` patches manifests;
``pod_patch`` returns the RFC 6902 JSONPatch the webhook answers with. Every error names the
offending field (``spec.template.spec.containers``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import yaml

from meshpilot import boundedjson

__all__ = ["InjectConfig", "InjectError", "inject_documents", "join_token_secret", "pod_patch", "validate_object"]

SIDECAR = "meshpilot-sidecar"
INIT = "meshpilot-capture"
VOLUME = "meshpilot-spec"
TOKEN_VOLUME = "meshpilot-join-token"
BUNDLE_VOLUME = "meshpilot-trust-bundle"
TOKEN_DIR = "/etc/meshpilot/identity"
BUNDLE_DIR = "/etc/meshpilot/trust"
SPEC_ANNOTATION = "meshpilot.io/spec"
INJECT_ANNOTATION = "meshpilot.io/inject"
SERVICE_ANNOTATION = "meshpilot.io/service"
JOIN_TOKEN_ANNOTATION = "meshpilot.io/join-token-secret"
JOIN_TOKEN_PREFIX = "meshpilot-join-"  # + the service name: the Secret a pod's token is read from by default
PROXY_UID = 1337
_WORKLOADS = {"Deployment": "V1Deployment", "StatefulSet": "V1StatefulSet", "DaemonSet": "V1DaemonSet",
              "ReplicaSet": "V1ReplicaSet", "Job": "V1Job", "Pod": "V1Pod"}
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")  # a Secret's name


class InjectError(ValueError):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True, slots=True)
class InjectConfig:
    image: str = "meshpilot/meshpilot:latest"
    control_plane: str = "meshpilot.meshpilot-system.svc:15010"
    api: str = "http://meshpilot.meshpilot-system.svc:15014"
    vip_cidr: str = "240.240.0.0/16"
    # workload identity for every pod: on with ``identity``, each pod reading its join token (key "token")
    # from the Secret meshpilot-join-<service>; ``join_token_secret`` (which also turns identity on) replaces
    # that derived name for every pod, so it fits only where all pods are one service. A pod's
    # meshpilot.io/join-token-secret annotation wins over both and turns identity on for that pod alone.
    identity: bool = False
    join_token_secret: str = ""
    # the ConfigMap holding the trust bundle under key "bundle.pem"
    trust_bundle_configmap: str = "meshpilot-trust-bundle"


def _obj(v: Any, field: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise InjectError(field, "must be an object")
    return v


def _service_name(pod_meta: dict[str, Any], owner_name: str) -> str:
    labels = pod_meta.get("labels") or {}
    annotations = pod_meta.get("annotations") or {}
    name = annotations.get(SERVICE_ANNOTATION) or labels.get("app") or owner_name
    if not isinstance(name, str) or not _LABEL.match(name):
        raise InjectError(f"metadata.annotations.{SERVICE_ANNOTATION}", f"service name {name!r} must be a DNS label")
    return name


def join_token_secret(annotations: dict[str, Any], service: str, cfg: InjectConfig) -> str | None:
    """The Secret a pod of ``service`` reads its join token from, or None when the pod gets no identity:
    the pod's ``meshpilot.io/join-token-secret`` annotation, else the operator's ``join_token_secret``, else
    (with ``identity`` on) ``meshpilot-join-<service>``."""
    named = annotations.get(JOIN_TOKEN_ANNOTATION)
    if named is not None:
        if not isinstance(named, str) or len(named) > 253 or not _SUBDOMAIN.match(named):
            raise InjectError(f"metadata.annotations.{JOIN_TOKEN_ANNOTATION}",
                              f"{named!r} is not a Secret name (lowercase DNS subdomain, at most 253 characters)")
        return named
    if cfg.join_token_secret:
        return cfg.join_token_secret
    if cfg.identity:
        return JOIN_TOKEN_PREFIX + service
    return None


def _service_spec(pod_meta: dict[str, Any], pod_spec: dict[str, Any], name: str, namespace: str, where: str) -> str:
    containers = pod_spec.get("containers")
    if not isinstance(containers, list) or not containers:
        raise InjectError(f"{where}.containers", "a pod needs at least one container")
    app = _obj(containers[0], f"{where}.containers.0")
    labels = pod_meta.get("labels") or {}
    ports = []
    for n, p in enumerate(app.get("ports") or []):
        p = _obj(p, f"{where}.containers.0.ports.{n}")
        number = p.get("containerPort")
        if not isinstance(number, int) or not 1 <= number <= 65535:
            raise InjectError(f"{where}.containers.0.ports.{n}.containerPort", "must be a port number between 1 and 65535")
        if str(p.get("protocol", "TCP")).upper() != "TCP":
            continue
        ports.append({"name": p.get("name") or f"port-{number}", "port": number, "targetPort": number})
    if not ports:
        raise InjectError(f"{where}.containers.0.ports", "the app container must declare at least one TCP containerPort")
    version = labels.get("version")
    doc = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": {"version": version} if isinstance(version, str) else {}},
        "spec": {"ports": ports},
        "mesh": {"sidecar": {"adminPort": 15000, "inboundPort": 15006, "outboundPort": 15001, "bindAddress": "0.0.0.0",
                             "capture": True}},
    }
    return yaml.safe_dump(doc, sort_keys=False)


def _containers(cfg: InjectConfig, token_secret: str | None) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    sidecar: dict[str, Any] = {
        "name": SIDECAR,
        "image": cfg.image,
        "args": ["sidecar", "--spec", "/etc/meshpilot/spec.yaml", "--control-plane", cfg.control_plane, "--api", cfg.api,
                 "--workdir", "/tmp/meshpilot"],
        "env": [
            {"name": "MESHPILOT_ADVERTISE_ADDRESS", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "MESHPILOT_TOKEN", "valueFrom": {"secretKeyRef": {"name": "meshpilot-token", "key": "token", "optional": True}}},
        ],
        "ports": [{"name": "mesh-inbound", "containerPort": 15006}],
        "securityContext": {"runAsUser": PROXY_UID, "runAsNonRoot": True, "allowPrivilegeEscalation": False},
        "volumeMounts": [{"name": VOLUME, "mountPath": "/etc/meshpilot", "readOnly": True}],
    }
    init = {
        "name": INIT,
        "image": cfg.image,
        "args": ["capture", "install", "--vip-cidr", cfg.vip_cidr, "--outbound-port", "15001", "--dns-port", "15053",
                 "--exempt-uid", str(PROXY_UID)],
        "securityContext": {"runAsUser": 0, "capabilities": {"add": ["NET_ADMIN", "NET_RAW"]}},
    }
    volumes: list[dict[str, Any]] = [{"name": VOLUME, "downwardAPI": {"items": [
        {"path": "spec.yaml", "fieldRef": {"fieldPath": f"metadata.annotations['{SPEC_ANNOTATION}']"}}]}}]
    if token_secret:
        sidecar["args"] += ["--join-token-file", f"{TOKEN_DIR}/token", "--trust-bundle", f"{BUNDLE_DIR}/bundle.pem"]
        sidecar["volumeMounts"] += [{"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
                                    {"name": BUNDLE_VOLUME, "mountPath": BUNDLE_DIR, "readOnly": True}]
        volumes += [
            {"name": TOKEN_VOLUME, "secret": {"secretName": token_secret,
                                              "items": [{"key": "token", "path": "token"}]}},
            {"name": BUNDLE_VOLUME, "configMap": {"name": cfg.trust_bundle_configmap,
                                                 "items": [{"key": "bundle.pem", "path": "bundle.pem"}]}},
        ]
    return sidecar, init, volumes


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def pod_patch(pod_meta: object, pod_spec: object, cfg: InjectConfig, *, owner_name: str = "",
              namespace: str = "default", prefix: str = "", where: str = "spec") -> list[dict[str, Any]]:
    """JSONPatch operations that inject the sidecar into one pod (template); [] when it is
    already injected or opted out. ``prefix`` is the JSON pointer of the pod object; ``pod_meta`` and
    ``pod_spec`` are taken as the manifest has them and checked here."""
    pod_meta = _obj(pod_meta or {}, "metadata")
    pod_spec = _obj(pod_spec, where)
    annotations = pod_meta.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise InjectError("metadata.annotations", "must be a mapping")
    if str(annotations.get(INJECT_ANNOTATION, "true")).lower() == "false":
        return []
    containers = pod_spec.get("containers")
    if isinstance(containers, list) and any(isinstance(c, dict) and c.get("name") == SIDECAR for c in containers):
        return []
    cfg = InjectConfig() if cfg is None else cfg
    service = _service_name(pod_meta, owner_name)
    spec_yaml = _service_spec(pod_meta, pod_spec, service, namespace, where)
    sidecar, init, volumes = _containers(cfg, join_token_secret(annotations, service, cfg))
    ops: list[dict[str, Any]] = []
    if not pod_meta.get("annotations"):
        ops.append({"op": "add", "path": f"{prefix}/metadata/annotations", "value": {}})
    ops.append({"op": "add", "path": f"{prefix}/metadata/annotations/{_escape(SPEC_ANNOTATION)}", "value": spec_yaml})
    ops.append({"op": "add", "path": f"{prefix}/spec/containers/-", "value": sidecar})
    for key, values in (("initContainers", [init]), ("volumes", volumes)):
        if pod_spec.get(key):
            ops += [{"op": "add", "path": f"{prefix}/spec/{key}/-", "value": value} for value in values]
        else:
            ops.append({"op": "add", "path": f"{prefix}/spec/{key}", "value": values})
    return ops


def validate_object(doc: dict[str, Any]) -> None:
    """Check a manifest against the Kubernetes client library's models (required fields, types)."""
    from kubernetes.client import ApiClient

    kind = doc.get("kind")
    model = _WORKLOADS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise InjectError("kind", f"cannot inject into {kind!r}; expected one of {', '.join(sorted(_WORKLOADS))}")
    try:
        # the client's model deserializer is name-mangled private: invisible to the type checker
        ApiClient()._ApiClient__deserialize(doc, model)  # type: ignore[attr-defined]
    except (ValueError, TypeError, AttributeError) as exc:
        raise InjectError("(manifest)", f"not a valid {kind}: {exc}") from None


def _pod_location(doc: dict[str, Any]) -> tuple[str, str]:
    """(JSON pointer of the pod object, dotted field name of its spec)."""
    if doc.get("kind") == "Pod":
        return "", "spec"
    if doc.get("kind") == "Job" or "template" in (doc.get("spec") or {}):
        return "/spec/template", "spec.template.spec"
    raise InjectError("spec.template", "a workload needs a pod template")


def inject_document(doc: Any, cfg: InjectConfig) -> dict[str, Any]:
    import jsonpatch

    doc = _obj(doc, "(document)")
    validate_object(doc)
    prefix, where = _pod_location(doc)
    pod = doc if not prefix else doc["spec"]["template"]
    meta = doc.get("metadata") or {}
    ops = pod_patch(pod.get("metadata") or {}, pod.get("spec"), cfg, owner_name=str(meta.get("name", "")),
                    namespace=str(meta.get("namespace") or "default"), prefix=prefix, where=where)
    if not prefix and not pod.get("metadata"):
        ops.insert(0, {"op": "add", "path": "/metadata", "value": {}})
    out: dict[str, Any] = jsonpatch.apply_patch(doc, ops)
    validate_object(out)
    return out


def inject_documents(text: str, cfg: InjectConfig) -> str:
    """Inject every workload of a (multi-document) YAML manifest; other kinds pass through."""
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise InjectError("(manifest)", f"not valid YAML: {exc}".replace("\n", " ")) from None
    out = []
    for n, doc in enumerate(docs):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise InjectError(f"(document {n})", "must be a Kubernetes object (a mapping)")
        if doc.get("kind") in _WORKLOADS:
            try:
                doc = inject_document(doc, cfg)
            except InjectError as exc:
                raise InjectError(f"(document {n}, {doc.get('kind')} {((doc.get('metadata') or {}).get('name'))}) {exc.field}", exc.reason) from None
        out.append(doc)
    return yaml.safe_dump_all(out, sort_keys=False)


def admission_response(body: bytes, cfg: InjectConfig) -> tuple[int, dict[str, Any]]:
    """AdmissionReview v1 in, (HTTP status, AdmissionReview v1 with a JSONPatch) out."""
    import base64

    try:
        review = boundedjson.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return 400, {"error": f"body: not JSON: {exc}"}
    if not isinstance(review, dict) or review.get("kind") != "AdmissionReview":
        return 400, {"error": "kind: expected an AdmissionReview"}
    if review.get("apiVersion") != "admission.k8s.io/v1":
        return 400, {"error": f"apiVersion: expected admission.k8s.io/v1, got {review.get('apiVersion')!r}"}
    req = review.get("request")
    if not isinstance(req, dict) or not isinstance(req.get("uid"), str) or not req.get("uid"):
        return 400, {"error": "request.uid: an AdmissionReview request needs a uid"}
    resp: dict[str, Any] = {"uid": req["uid"], "allowed": True}
    out = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": resp}
    kind = (req.get("kind") or {}).get("kind") if isinstance(req.get("kind"), dict) else None
    obj = req.get("object")
    if kind != "Pod" or req.get("operation", "CREATE") != "CREATE":
        return 200, out  # not ours to change
    try:
        pod = _obj(obj, "request.object")
        validate_object({**pod, "kind": "Pod", "apiVersion": pod.get("apiVersion", "v1")})
        ops = pod_patch(pod.get("metadata") or {}, pod.get("spec"), cfg,
                        owner_name=str((pod.get("metadata") or {}).get("generateName", "")).rstrip("-"),
                        namespace=str(req.get("namespace") or "default"))
        if ops and not pod.get("metadata"):
            ops.insert(0, {"op": "add", "path": "/metadata", "value": {}})
    except InjectError as exc:
        resp.update(allowed=False, status={"code": 400, "message": f"meshpilot injection: {exc}"})
        return 200, out
    if ops:
        resp["patchType"] = "JSONPatch"
        resp["patch"] = base64.b64encode(json.dumps(ops).encode()).decode()
    return 200, out
