"""`meshpilot inject` and `meshpilot webhook` as a user runs them: the CLI patches a manifest or names the
field it refuses, and the webhook, started with a certificate made by openssl, answers an AdmissionReview
over HTTPS with a patch that gives a valid Pod."""

from __future__ import annotations

import base64
import copy
import json
import signal
import ssl
import subprocess
import urllib.request
from pathlib import Path

import jsonpatch

from meshpilot.kube.inject import SIDECAR, validate_object
from tests.support import VENV_BIN, wait_until
from tests.unit.test_kube_inject import DEPLOYMENT, POD, review


def test_inject_cli_and_https_webhook(tmp_path: Path) -> None:
    manifest = tmp_path / "deployment.yaml"
    manifest.write_text(DEPLOYMENT)
    r = subprocess.run([str(VENV_BIN / "meshpilot"), "inject", "-f", str(manifest)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and SIDECAR in r.stdout, f"inject failed: {r.returncode} {r.stderr}"
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: a, image: b}]}\n")
    r = subprocess.run([str(VENV_BIN / "meshpilot"), "inject", "-f", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "spec.containers.0.ports" in r.stderr, f"expected a named error, got {r.returncode} {r.stderr}"

    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    ready = tmp_path / "webhook.json"
    proc = subprocess.Popen([str(VENV_BIN / "meshpilot"), "webhook", "--listen", "127.0.0.1", "--port", "0", "--cert", str(cert),
                             "--key", str(key), "--ready-file", str(ready)], stdout=open(tmp_path / "webhook.log", "ab"),
                            stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: ready.exists() or proc.poll() is not None, 20, what="webhook ready")
        assert proc.poll() is None, (tmp_path / "webhook.log").read_text()
        port = json.loads(ready.read_text())["port"]
        ctx = ssl.create_default_context(cafile=str(cert))
        req = urllib.request.Request(f"https://127.0.0.1:{port}/inject", data=json.dumps(review(POD)).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            body = json.loads(resp.read())
        ops = json.loads(base64.b64decode(body["response"]["patch"]))
        validate_object(jsonpatch.apply_patch(copy.deepcopy(POD), ops))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
