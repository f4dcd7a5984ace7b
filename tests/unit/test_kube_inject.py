"""Kubernetes injection: manifests and AdmissionReview v1 documents in, patched objects that the
Kubernetes client library's models accept out; bad input gets errors naming the field (the CLI and the
HTTPS webhook as processes: tests/e2e/test_kube_inject_cli_and_webhook.py)."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import jsonpatch
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpilot.kube.inject import (INIT, SIDECAR, SPEC_ANNOTATION, InjectConfig, InjectError, admission_response,
                                   inject_documents, validate_object)
from meshpilot.sidecar.spec import load_spec

DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: reviews, namespace: shop}
spec:
  replicas: 2
  selector: {matchLabels: {app: reviews}}
  template:
    metadata: {labels: {app: reviews, version: v2}}
    spec:
      containers:
      - name: app
        image: example/reviews:2
        ports: [{name: http, containerPort: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: reviews}
spec: {ports: [{port: 9080}]}
"""

POD = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"generateName": "ratings-7d9f-", "labels": {"app": "ratings"}},
    "spec": {"containers": [{"name": "app", "image": "example/ratings:1", "ports": [{"containerPort": 8080}]}],
             "initContainers": [{"name": "migrate", "image": "example/migrate:1"}]},
}


def review(obj: Any, uid: str = "705ab4f5-6393-11e8-b7cc-42010a800002", kind: str = "Pod") -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": uid, "kind": {"group": "", "version": "v1", "kind": kind},
                    "resource": {"group": "", "version": "v1", "resource": "pods"}, "namespace": "shop",
                    "operation": "CREATE", "object": obj},
    }


def test_inject_deployment() -> None:
    out = list(yaml.safe_load_all(inject_documents(DEPLOYMENT, InjectConfig(image="reg/meshpilot:1"))))
    dep, svc = out
    original_svc = list(yaml.safe_load_all(DEPLOYMENT))[1]
    assert svc == original_svc, f"a Service passes through unchanged; expected {original_svc}, got {svc}"
    pod = dep["spec"]["template"]
    names = [c["name"] for c in pod["spec"]["containers"]]
    assert names == ["app", SIDECAR], f"expected app + sidecar containers, got {names}"
    assert [c["name"] for c in pod["spec"]["initContainers"]] == [INIT]
    assert pod["spec"]["initContainers"][0]["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]
    assert "--exempt-uid" in pod["spec"]["initContainers"][0]["args"], "Envoy's uid must be exempt from capture"
    assert pod["spec"]["containers"][1]["securityContext"]["runAsUser"] == 1337
    spec = load_spec(pod["metadata"]["annotations"][SPEC_ANNOTATION])
    got = (spec.metadata.name, spec.metadata.namespace, spec.app_port, spec.metadata.labels, spec.mesh.sidecar.capture)
    assert got == ("reviews", "shop", 9080, {"version": "v2"}, True), got
    validate_object(dep)
    # injecting twice changes nothing
    again = list(yaml.safe_load_all(inject_documents(yaml.safe_dump_all(out), InjectConfig(image="reg/meshpilot:1"))))
    assert again == out, "injection must be idempotent"


def test_admission_review_gives_a_patch_kubernetes_accepts() -> None:
    status, body = admission_response(json.dumps(review(POD)).encode(), InjectConfig())
    assert status == 200, body
    resp = body["response"]
    assert (resp["uid"], resp["allowed"], resp["patchType"]) == ("705ab4f5-6393-11e8-b7cc-42010a800002", True, "JSONPatch"), resp
    ops = json.loads(base64.b64decode(resp["patch"]))
    patched = jsonpatch.apply_patch(copy.deepcopy(POD), ops)
    validate_object(patched)
    assert [c["name"] for c in patched["spec"]["initContainers"]] == ["migrate", INIT], patched["spec"]["initContainers"]
    assert load_spec(patched["metadata"]["annotations"][SPEC_ANNOTATION]).metadata.name == "ratings"
    # opted out, already injected, not a pod: allowed without a patch
    opted = copy.deepcopy(POD)
    opted["metadata"]["annotations"] = {"meshpilot.io/inject": "false"}
    for obj, kind in ((opted, "Pod"), (patched, "Pod"), (POD, "Deployment")):
        status, body = admission_response(json.dumps(review(obj, kind=kind)).encode(), InjectConfig())
        assert status == 200 and body["response"]["allowed"] and "patch" not in body["response"], body


@pytest.mark.parametrize(
    "raw,status,text",
    [
        (b"{not json", 400, "body"),
        (json.dumps({"kind": "Pod"}).encode(), 400, "kind"),
        (json.dumps({**review(POD), "apiVersion": "admission.k8s.io/v1beta1"}).encode(), 400, "apiVersion"),
        (json.dumps({**review(POD), "request": {"object": POD}}).encode(), 400, "request.uid"),
    ],
)
def test_bad_admission_reviews(raw: bytes, status: int, text: str) -> None:
    got, body = admission_response(raw, InjectConfig())
    assert (got, body.get("error", "").split(":")[0]) == (status, text), f"expected {status} naming {text}, got {got} {body}"


@pytest.mark.parametrize(
    "mutate,field",
    [
        (lambda p: p["spec"].update(containers=[]), "containers"),
        (lambda p: p["spec"]["containers"][0].pop("ports"), "containers.0.ports"),
        (lambda p: p["spec"]["containers"][0]["ports"][0].update(containerPort=70000), "containerPort"),
        (lambda p: p["spec"]["containers"][0].pop("name"), "not a valid Pod"),
        (lambda p: p["metadata"]["labels"].update(app="Bad_Name"), SPEC_ANNOTATION.split("/")[0]),
    ],
)
def test_bad_pods_are_denied_with_the_field_named(mutate: Any, field: str) -> None:
    pod = copy.deepcopy(POD)
    mutate(pod)
    status, body = admission_response(json.dumps(review(pod)).encode(), InjectConfig())
    resp = body["response"]
    assert status == 200 and resp["allowed"] is False, body
    assert field in resp["status"]["message"], f"expected the message to name {field}, got {resp['status']['message']}"


@pytest.mark.parametrize(
    "text,field",
    [
        ("kind: [", "(manifest)"),
        ("- 1\n- 2", "(document 0)"),
        ("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {selector: {}, template: {spec: {containers: [{name: a, image: b}]}}}",
         "containers.0.ports"),
        ("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {replicas: lots, template: {}}", "not a valid Deployment"),
    ],
)
def test_bad_manifests(text: str, field: str) -> None:
    with pytest.raises(InjectError) as err:
        inject_documents(text, InjectConfig())
    assert field in str(err.value), f"expected the error to name {field}, got {err.value}"


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=6),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(
                        ["apiVersion", "kind", "request", "uid", "object", "metadata", "spec", "containers", "ports",
                         "containerPort", "name", "image", "annotations", "labels", "operation"]), c, max_size=4),
                    max_leaves=20))
def test_junk_admission_reviews_never_crash(obj: Any) -> None:
    doc = review(obj) if isinstance(obj, dict) else obj
    status, body = admission_response(json.dumps(doc).encode(), InjectConfig())
    assert status in (200, 400), (status, body)
    if status == 200:
        resp = body["response"]
        assert resp["allowed"] or resp["status"]["message"].startswith("meshpilot injection:"), resp
