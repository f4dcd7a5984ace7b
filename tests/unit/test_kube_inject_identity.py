"""Kubernetes injection with a workload identity: given a join-token Secret, the sidecar mounts it and the
trust bundle ConfigMap read-only and is told where they are; without one nothing about identity is added.
Patched objects must still be accepted by the Kubernetes client library's models."""

from __future__ import annotations

import base64
import json
from typing import Any

import jsonpatch
import yaml

from meshpilot.kube.inject import SIDECAR, InjectConfig, admission_response, inject_documents, validate_object
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
