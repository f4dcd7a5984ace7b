"""Outbound capture in a network namespace created by the test (never the host's tables): the control
plane, an app behind its sidecar and a client sidecar with capture run inside it; after
`meshpilot capture install`, a plain `curl http://<service-vip>/` reaches the service."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from meshpilot.sidecar.capture import CaptureOptions, install_commands, remove_commands
from tests.support import VENV_BIN, wait_until

MESHPILOT = str(VENV_BIN / "meshpilot")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("iptables"), reason="needs root, ip and iptables"
)


def test_rules_are_scoped_and_exempt_by_uid_or_mark_never_root() -> None:
    cmds = [" ".join(c) for c in install_commands(CaptureOptions(exempt_uids=(1337,), exempt_marks=(0x539,)))]
    assert cmds[0] == "iptables -w -t nat -N MESHPILOT_OUTPUT", cmds
    assert "--uid-owner 1337 -j RETURN" in cmds[1] and "--mark 0x539 -j RETURN" in cmds[2], cmds
    assert any("-d 240.240.0.0/16 -j REDIRECT --to-ports 15001" in c for c in cmds), cmds
    assert any("-p udp --dport 53 -j REDIRECT --to-ports 15053" in c for c in cmds), cmds
    assert cmds[-1] == "iptables -w -t nat -A OUTPUT -j MESHPILOT_OUTPUT", "the jump comes last, once the chain is complete"
    assert [c[4] for c in remove_commands(CaptureOptions())] == ["-D", "-F", "-X"]
    for bad, field in [(CaptureOptions(exempt_uids=(0,)), "exempt-uid"), (CaptureOptions(vip_cidr="nope"), "vip-cidr"),
                       (CaptureOptions(exempt_marks=()), "exempt-uid/exempt-mark"), (CaptureOptions(outbound_port=0), "outbound-port")]:
        with pytest.raises(ValueError) as err:
            install_commands(bad)
        assert str(err.value).startswith(field), f"expected an error naming {field}, got {err.value}"


@contextlib.contextmanager
def netns() -> Iterator[str]:
    name = f"mp-cap-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        r = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
        assert r.returncode == 0, f"could not delete namespace {name}: {r.stderr}"


def ns(name: str, *cmd: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", name, *cmd], capture_output=True, text=True, timeout=timeout)


def test_curl_service_vip_inside_a_namespace(tmp_path: Path) -> None:
    procs: list[subprocess.Popen[bytes]] = []
    with netns() as name, contextlib.ExitStack() as stack:

        def spawn(*cmd: str, log: str) -> subprocess.Popen[bytes]:
            p = subprocess.Popen(["ip", "netns", "exec", name, *cmd], stdout=open(tmp_path / log, "ab"),
                                 stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(p)
            return p

        def cleanup() -> None:
            for p in reversed(procs):
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            for ready in tmp_path.glob("*/ready.json"):  # an Envoy whose agent was killed must not survive
                with contextlib.suppress(Exception):
                    os.kill(json.loads(ready.read_text())["envoy_pid"], signal.SIGKILL)

        stack.callback(cleanup)
        ready = tmp_path / "cp-ready.json"
        spawn(MESHPILOT, "serve", "--store", "memory:", "--xds-port", "0", "--api-port", "0", "--consul-port", "-1",
              "--eureka-port", "-1", "--ready-file", str(ready), "--debounce-ms", "20", log="cp.log")
        wait_until(lambda: ready.exists(), 20, what="control plane ready in the namespace")
        ports = json.loads(ready.read_text())
        api = f"http://127.0.0.1:{ports['api']}"
        spawn("python3", "-m", "http.server", "18080", "--bind", "127.0.0.1", "--directory", str(tmp_path), log="app.log")
        (tmp_path / "index.html").write_text("hello from b\n")

        def sidecar(svc: str, app_port: int, inbound: int, outbound: int, capture: bool) -> None:
            d = tmp_path / svc
            d.mkdir()
            spec = {
                "metadata": {"name": svc}, "spec": {"ports": [{"name": "http", "port": 80, "targetPort": app_port}]},
                "mesh": {"healthCheck": {"http": {"path": "/"}, "interval": "300ms", "timeout": "300ms"}, "drainTime": "0s",
                         "syncTimeout": "1s",
                         "sidecar": {"adminPort": 0, "inboundPort": inbound, "outboundPort": outbound, "capture": capture}},
            }
            (d / "spec.yaml").write_text(yaml.safe_dump(spec))
            spawn(MESHPILOT, "sidecar", "--spec", str(d / "spec.yaml"), "--control-plane", f"127.0.0.1:{ports['xds']}",
                  "--api", api, "--node-id", f"{svc}-1", "--workdir", str(d), "--ready-file", str(d / "ready.json"),
                  log=f"{svc}-agent.log")
            wait_until(lambda: (d / "ready.json").exists(), 20, what=f"{svc} sidecar ready")

        sidecar("b", 18080, 18006, 18001, capture=False)
        sidecar("c", 18090, 15006, 15001, capture=True)

        def b_routable() -> bool:
            r = ns(name, "curl", "-s", f"{api}/v1/instances/b-1")
            return r.returncode == 0 and json.loads(r.stdout).get("routable") is True

        wait_until(b_routable, 20, what="b routable")
        vip = json.loads(ns(name, "curl", "-s", f"{api}/v1/services/default/b").stdout)["vip"]

        r = ns(name, MESHPILOT, "capture", "install", "--outbound-port", "15001", "--dns-port", "0", "--exempt-mark", "0x539")
        assert r.returncode == 0, f"capture install failed: {r.stdout} {r.stderr}"
        stack.callback(lambda: ns(name, MESHPILOT, "capture", "remove", "--dns-port", "0"))
        rules = ns(name, "iptables", "-t", "nat", "-S", "MESHPILOT_OUTPUT").stdout
        assert "--to-ports 15001" in rules, f"expected the REDIRECT rule in the namespace, got:\n{rules}"

        def curl_vip() -> str:
            r = ns(name, "curl", "-s", "--max-time", "3", f"http://{vip}/index.html")
            return r.stdout if "hello from b" in r.stdout else ""

        body = wait_until(curl_vip, 20, interval=0.2, what=f"curl http://{vip}/ through the captured outbound listener")
        print(f"curl http://{vip}/index.html inside {name}: {body.strip()!r}")
        host_rules = subprocess.run(["iptables", "-t", "nat", "-S"], capture_output=True, text=True).stdout
        assert "MESHPILOT_OUTPUT" not in host_rules, "the host's own tables must not be touched"

        r = ns(name, MESHPILOT, "capture", "remove", "--dns-port", "0")
        assert r.returncode == 0, f"capture remove failed: {r.stderr}"
        after = ns(name, "iptables", "-t", "nat", "-S").stdout
        assert "MESHPILOT_OUTPUT" not in after, f"rules left after remove:\n{after}"
