"""Kubernetes injection with a workload identity: given a join-token Secret, the sidecar mounts it and the
trust bundle ConfigMap read-only and is told where they are; without one nothing about identity is added.
A join token enrols one service, so each pod gets its own service's Secret: its annotation's, else the
operator's one for all, else meshpilot-join-<service>. Patched objects must still be accepted by the
Kubernetes client library's models."""

from __future__ import annotations

import base64
import json
from typing import Any

import jsonpatch
import pytest
import yaml

from meshpilot.kube.inject import (JOIN_TOKEN_ANNOTATION, SIDECAR, InjectConfig, InjectError, admission_response,
                                   inject_documents, validate_object)
from tests.unit.test_kube_inject import DEPLOYMENT, POD, review

CFG = InjectConfig(join_token_secret="reviews-join", trust_bundle_configmap="mesh-roots")


def _sidecar(pod_spec: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in pod_spec["containers"] if c["name"] == SIDECAR)


def _arg(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def test_a_join_token_secret_is_mounted_and_passed_to_the_sidecar() -> None:
    deployment = next(d for d in yaml.safe_load_all(inject_documents(DEPLOYMENT, CFG)) if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    sidecar = _sidecar(pod)
    token, bundle = _arg(sidecar["args"], "--join-token-file"), _arg(sidecar["args"], "--trust-bundle")
    assert token and bundle, f"expected --join-token-file and --trust-bundle, got {sidecar['args']}"
    mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    by_source = {("secret" if "secret" in v else "configMap" if "configMap" in v else "other"): v for v in volumes.values()}
    secret, configmap = by_source["secret"], by_source["configMap"]
    assert secret["secret"]["secretName"] == "reviews-join"
    assert configmap["configMap"]["name"] == "mesh-roots"
    for vol, path, key in ((secret, token, "token"), (configmap, bundle, "bundle.pem")):
        mount = mounts[vol["name"]]
        assert mount["readOnly"] is True
        item = (vol.get("secret") or vol.get("configMap"))["items"][0]
        assert item["key"] == key and path == f"{mount['mountPath']}/{item['path']}", (vol, mount, path)
    app = next(c for c in pod["containers"] if c["name"] == "app")
    assert "volumeMounts" not in app, "only the sidecar sees the token"
    validate_object(deployment)


def test_without_a_secret_no_identity_is_added() -> None:
    deployment = next(d for d in yaml.safe_load_all(inject_documents(DEPLOYMENT, InjectConfig())) if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert "--join-token-file" not in _sidecar(pod)["args"] and "--trust-bundle" not in _sidecar(pod)["args"]
    assert [v["name"] for v in pod["volumes"]] == ["meshpilot-spec"]


def test_the_webhook_patch_adds_the_identity_volumes_to_existing_ones() -> None:
    pod = json.loads(json.dumps(POD))
    pod["spec"]["volumes"] = [{"name": "data", "emptyDir": {}}]
    status, out = admission_response(json.dumps(review(pod)).encode(), CFG)
    assert status == 200 and out["response"]["allowed"], out
    patched = jsonpatch.apply_patch(pod, json.loads(base64.b64decode(out["response"]["patch"])))
    names = [v["name"] for v in patched["spec"]["volumes"]]
    assert names[0] == "data" and len(names) == 4 and len(set(names)) == 4, names
    assert _arg(_sidecar(patched["spec"])["args"], "--join-token-file")
    validate_object({**patched, "kind": "Pod"})


TWO_SERVICES = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: reviews, namespace: shop}
spec:
  selector: {matchLabels: {app: reviews}}
  template:
    metadata: {labels: {app: reviews}}
    spec:
      containers: [{name: app, image: example/reviews:2, ports: [{containerPort: 9080}]}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ratings, namespace: shop}
spec:
  selector: {matchLabels: {app: ratings}}
  template:
    metadata: {labels: {app: ratings}, annotations: {meshpilot.io/service: stars}}
    spec:
      containers: [{name: app, image: example/ratings:1, ports: [{containerPort: 8080}]}]
"""


def _secrets_of(text: str, cfg: InjectConfig) -> dict[str, str | None]:
    """Deployment name → the Secret its sidecar's token comes from (None: no identity)."""
    out: dict[str, str | None] = {}
    for d in yaml.safe_load_all(inject_documents(text, cfg)):
        pod = d["spec"]["template"]["spec"]
        secret = next((v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v), None)
        args = _sidecar(pod)["args"]
        assert (secret is None) == ("--join-token-file" not in args), args
        validate_object(d)
        out[d["metadata"]["name"]] = secret
    return out


def test_with_identity_on_each_service_reads_its_own_derived_secret() -> None:
    assert _secrets_of(TWO_SERVICES, InjectConfig(identity=True)) == {
        "reviews": "meshpilot-join-reviews", "ratings": "meshpilot-join-stars"}, "named after the service, not the workload"


def test_a_pods_annotation_names_its_secret_over_the_operators_default_and_alone_turns_identity_on() -> None:
    annotated = TWO_SERVICES.replace("annotations: {meshpilot.io/service: stars}",
                                     "annotations: {meshpilot.io/service: stars, meshpilot.io/join-token-secret: stars-token}")
    assert _secrets_of(annotated, InjectConfig()) == {"reviews": None, "ratings": "stars-token"}
    assert _secrets_of(annotated, InjectConfig(identity=True)) == {"reviews": "meshpilot-join-reviews",
                                                                   "ratings": "stars-token"}
    assert _secrets_of(annotated, InjectConfig(join_token_secret="shared")) == {"reviews": "shared",
                                                                                "ratings": "stars-token"}


def test_a_bad_secret_name_in_the_annotation_is_named() -> None:
    bad = TWO_SERVICES.replace("annotations: {meshpilot.io/service: stars}",
                               "annotations: {meshpilot.io/join-token-secret: Not_A_Name}")
    with pytest.raises(InjectError) as exc:
        inject_documents(bad, InjectConfig(identity=True))
    assert f"metadata.annotations.{JOIN_TOKEN_ANNOTATION}" in exc.value.field and "Not_A_Name" in exc.value.reason
    pod = json.loads(json.dumps(POD))
    pod["metadata"]["annotations"] = {JOIN_TOKEN_ANNOTATION: "x" * 254}
    status, out = admission_response(json.dumps(review(pod)).encode(), InjectConfig())
    assert status == 200 and out["response"]["allowed"] is False
    assert JOIN_TOKEN_ANNOTATION in out["response"]["status"]["message"]


def test_the_webhook_gives_a_pod_its_services_secret() -> None:
    status, out = admission_response(json.dumps(review(POD)).encode(), InjectConfig(identity=True))
    assert status == 200 and out["response"]["allowed"], out
    patched = jsonpatch.apply_patch(POD, json.loads(base64.b64decode(out["response"]["patch"])))
    secrets = [v["secret"]["secretName"] for v in patched["spec"]["volumes"] if "secret" in v]
    assert secrets == ["meshpilot-join-ratings"]
    validate_object({**patched, "kind": "Pod"})


def test_the_command_line_turns_identity_on_and_passes_the_default_secret() -> None:
    import argparse

    from meshpilot.kube.command import _config, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert _config(parser.parse_args(["inject", "-f", "-"])).identity is False
    cfg = _config(parser.parse_args(["inject", "-f", "-", "--identity"]))
    assert cfg.identity and cfg.join_token_secret == ""
    cfg = _config(parser.parse_args(["webhook", "--cert", "c", "--key", "k", "--join-token-secret", "web-join"]))
    assert cfg.join_token_secret == "web-join"
