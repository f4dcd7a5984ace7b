"""Outbound capture in a network namespace created by the test (never the host's tables): the control
plane, an app behind its sidecar and a client sidecar with capture run inside it; after
`meshpilot capture install`, a plain `curl http://<service-vip>/` reaches the service.

With DNS captured as well, an unmodified client resolves mesh names through glibc: the namespace's
resolv.conf names a local resolver (an unbound the test starts), the capture rules send its port 53
to the sidecar agent's meshdns, and meshdns forwards other names to that same resolver with the
exempt socket mark, so its own queries are not captured."""

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

from meshpilot.sidecar.capture import CHAIN, CaptureOptions, install_commands, remove_commands
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
def netns(resolv_conf: str | None = None) -> Iterator[str]:
    """A fresh network namespace with loopback up; with ``resolv_conf``, the /etc/resolv.conf its processes see."""
    name = f"mp-cap-{uuid.uuid4().hex[:8]}"
    etc = Path("/etc/netns") / name
    if resolv_conf is not None:
        etc.mkdir(parents=True)
        (etc / "resolv.conf").write_text(resolv_conf)
    try:
        subprocess.run(["ip", "netns", "add", name], check=True)
        try:
            subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
            yield name
        finally:
            r = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
            assert r.returncode == 0, f"could not delete namespace {name}: {r.stderr}"
    finally:
        shutil.rmtree(etc, ignore_errors=True)


def ns(name: str, *cmd: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", name, *cmd], capture_output=True, text=True, timeout=timeout)


class NsMesh:
    """The control plane, apps and sidecars running inside one namespace; ``close`` stops every process it
    started (SIGTERM, then SIGKILL of the process group) and any Envoy whose agent did not get to stop it."""

    def __init__(self, name: str, tmp_path: Path) -> None:
        self.name, self.tmp = name, tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []
        self.api = ""
        self.xds = 0

    def spawn(self, *cmd: str, log: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], stdout=open(self.tmp / log, "ab"),
                             stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for ready in self.tmp.glob("*/ready.json"):  # an Envoy whose agent was killed must not survive
            with contextlib.suppress(Exception):
                os.kill(json.loads(ready.read_text())["envoy_pid"], signal.SIGKILL)

    def control_plane(self) -> None:
        ready = self.tmp / "cp-ready.json"
        self.spawn(MESHPILOT, "serve", "--store", "memory:", "--xds-port", "0", "--api-port", "0", "--consul-port", "-1",
                   "--eureka-port", "-1", "--ready-file", str(ready), "--debounce-ms", "20", log="cp.log")
        wait_until(lambda: ready.exists(), 20, what="control plane ready in the namespace")
        ports = json.loads(ready.read_text())
        self.api, self.xds = f"http://127.0.0.1:{ports['api']}", ports["xds"]

    def sidecar(self, svc: str, app_port: int, inbound: int, outbound: int, capture: bool,
                dns: dict[str, object] | None = None) -> dict[str, object]:
        d = self.tmp / svc
        d.mkdir()
        spec = {
            "metadata": {"name": svc}, "spec": {"ports": [{"name": "http", "port": 80, "targetPort": app_port}]},
            "mesh": {"healthCheck": {"http": {"path": "/"}, "interval": "300ms", "timeout": "300ms"}, "drainTime": "0s",
                     "syncTimeout": "1s", "dns": dns if dns is not None else {"enabled": False},
                     "sidecar": {"adminPort": 0, "inboundPort": inbound, "outboundPort": outbound, "capture": capture}},
        }
        (d / "spec.yaml").write_text(yaml.safe_dump(spec))
        self.spawn(MESHPILOT, "sidecar", "--spec", str(d / "spec.yaml"), "--control-plane", f"127.0.0.1:{self.xds}",
                   "--api", self.api, "--node-id", f"{svc}-1", "--workdir", str(d), "--ready-file", str(d / "ready.json"),
                   log=f"{svc}-agent.log")
        wait_until(lambda: (d / "ready.json").exists(), 20, what=f"{svc} sidecar ready")
        return dict(json.loads((d / "ready.json").read_text()))

    def routable(self, instance: str) -> None:
        def check() -> bool:
            r = ns(self.name, "curl", "-s", "--noproxy", "*", f"{self.api}/v1/instances/{instance}")
            return r.returncode == 0 and json.loads(r.stdout).get("routable") is True

        wait_until(check, 20, what=f"{instance} routable")

    def vip(self, svc: str) -> str:
        return str(json.loads(ns(self.name, "curl", "-s", "--noproxy", "*", f"{self.api}/v1/services/default/{svc}").stdout)["vip"])


def test_curl_service_vip_inside_a_namespace(tmp_path: Path) -> None:
    with netns() as name, contextlib.ExitStack() as stack:
        mesh = NsMesh(name, tmp_path)
        stack.callback(mesh.close)
        mesh.control_plane()
        mesh.spawn("python3", "-m", "http.server", "18080", "--bind", "127.0.0.1", "--directory", str(tmp_path), log="app.log")
        (tmp_path / "index.html").write_text("hello from b\n")
        mesh.sidecar("b", 18080, 18006, 18001, capture=False)
        mesh.sidecar("c", 18090, 15006, 15001, capture=True)
        mesh.routable("b-1")
        vip = mesh.vip("b")

        r = ns(name, MESHPILOT, "capture", "install", "--outbound-port", "15001", "--dns-port", "0", "--exempt-mark", "0x539")
        assert r.returncode == 0, f"capture install failed: {r.stdout} {r.stderr}"
        stack.callback(lambda: ns(name, MESHPILOT, "capture", "remove", "--dns-port", "0"))
        rules = ns(name, "iptables", "-t", "nat", "-S", "MESHPILOT_OUTPUT").stdout
        assert "--to-ports 15001" in rules, f"expected the REDIRECT rule in the namespace, got:\n{rules}"

        def curl_vip() -> str:
            r = ns(name, "curl", "-s", "--noproxy", "*", "--max-time", "3", f"http://{vip}/index.html")
            return r.stdout if "hello from b" in r.stdout else ""

        body = wait_until(curl_vip, 20, interval=0.2, what=f"curl http://{vip}/ through the captured outbound listener")
        print(f"curl http://{vip}/index.html inside {name}: {body.strip()!r}")
        host_rules = subprocess.run(["iptables", "-t", "nat", "-S"], capture_output=True, text=True).stdout
        assert "MESHPILOT_OUTPUT" not in host_rules, "the host's own tables must not be touched"

        r = ns(name, MESHPILOT, "capture", "remove", "--dns-port", "0")
        assert r.returncode == 0, f"capture remove failed: {r.stderr}"
        after = ns(name, "iptables", "-t", "nat", "-S").stdout
        assert "MESHPILOT_OUTPUT" not in after, f"rules left after remove:\n{after}"


RESOLVER = "127.0.0.2"  # the namespace's "real" resolver: an unbound on loopback, never the internet


def _unbound_conf(workdir: Path) -> str:
    lines = [
        "server:", f"  interface: {RESOLVER}", "  port: 53", "  do-daemonize: no", '  username: ""', '  chroot: ""',
        f'  directory: "{workdir}"', '  pidfile: ""', "  use-syslog: no", '  logfile: ""', "  do-ip6: no",
        "  num-threads: 1", "  access-control: 127.0.0.0/8 allow", '  module-config: "iterator"', "  verbosity: 0",
        '  local-zone: "." static',  # answers only its own data: nothing is ever asked of the internet
        '  local-data: "ext.example. 300 IN A 192.0.2.7"',
        '  local-data: "example. 300 IN SOA ns.example. hostmaster.example. 1 3600 600 86400 60"',
        "remote-control:", "  control-enable: no",
    ]
    return "\n".join(lines) + "\n"


def _rule_packets(name: str) -> dict[str, int]:
    """Packets counted by the capture chain's rules, keyed 'mark' (exempt by SO_MARK) and 'dns-udp' (redirected)."""
    out = ns(name, "iptables", "-t", "nat", "-L", CHAIN, "-n", "-v", "-x").stdout
    got = {"mark": 0, "dns-udp": 0}
    for line in out.splitlines():
        words = line.split()
        if len(words) > 3 and words[0].isdigit():
            if words[2] == "RETURN" and "mark match 0x539" in line:
                got["mark"] += int(words[0])
            elif words[2] == "REDIRECT" and words[3] in ("udp", "17") and "dpt:53" in line:
                got["dns-udp"] += int(words[0])
    return got


def test_glibc_clients_resolve_mesh_names_through_captured_dns(tmp_path: Path) -> None:
    if not shutil.which("unbound") and not Path("/usr/sbin/unbound").exists():
        pytest.skip("needs unbound")
    resolv = f"nameserver {RESOLVER}\nsearch default.svc.mesh svc.mesh\noptions timeout:1 attempts:2\n"
    with netns(resolv) as name, contextlib.ExitStack() as stack:
        mesh = NsMesh(name, tmp_path)
        stack.callback(mesh.close)
        conf = tmp_path / "unbound.conf"
        conf.write_text(_unbound_conf(tmp_path))
        unbound = shutil.which("unbound") or "/usr/sbin/unbound"
        mesh.spawn(unbound, "-d", "-c", str(conf), log="unbound.log")
        wait_until(lambda: "192.0.2.7" in ns(name, "kdig", f"@{RESOLVER}", "+short", "+timeout=1", "ext.example").stdout,
                   10, interval=0.1, what="the namespace's resolver answering")

        mesh.control_plane()
        mesh.spawn("python3", "-m", "http.server", "18080", "--bind", "127.0.0.1", "--directory", str(tmp_path), log="app.log")
        (tmp_path / "index.html").write_text("hello from b\n")
        mesh.sidecar("b", 18080, 18006, 18001, capture=False)
        # c runs meshdns with the defaults: 127.0.0.1:15053, upstreams from resolv.conf, exempt mark 0x539
        c = mesh.sidecar("c", 18090, 15006, 15001, capture=True, dns={})
        assert c.get("dns_port") == 15053, f"expected c's meshdns on 15053, got {c}"
        mesh.routable("b-1")
        vip = mesh.vip("b")

        before = ns(name, "getent", "hosts", "b.default.svc.mesh")
        assert before.returncode != 0, f"expected no answer for a mesh name before DNS is captured, got {before.stdout!r}"

        r = ns(name, MESHPILOT, "capture", "install", "--outbound-port", "15001", "--dns-port", "15053",
               "--exempt-mark", "0x539")
        assert r.returncode == 0, f"capture install failed: {r.stdout} {r.stderr}"
        stack.callback(lambda: ns(name, MESHPILOT, "capture", "remove"))

        got = ns(name, "getent", "hosts", "b").stdout.split()
        assert got[:1] == [vip], f"getent hosts b: expected {vip}, got {got}"
        for url in ("http://b/index.html", "http://b.default.svc.mesh:80/index.html"):
            def curl(url: str = url) -> str:
                r = ns(name, "curl", "-s", "--noproxy", "*", "--max-time", "3", url)
                return r.stdout if "hello from b" in r.stdout else ""

            body = wait_until(curl, 20, interval=0.2, what=f"curl {url} through captured DNS and Envoy")
            print(f"curl {url} inside {name}: {body.strip()!r}")

        counts = _rule_packets(name)
        got = ns(name, "getent", "hosts", "ext.example").stdout.split()
        assert got[:1] == ["192.0.2.7"], f"getent hosts ext.example: expected 192.0.2.7 forwarded by meshdns, got {got}"
        after = _rule_packets(name)
        assert after["dns-udp"] > counts["dns-udp"], f"expected the lookup redirected to meshdns, counters {counts} -> {after}"
        assert after["mark"] > counts["mark"], \
            f"expected meshdns's upstream query to pass the capture by its mark, counters {counts} -> {after}"
        missing = ns(name, "getent", "hosts", "nosuch.example")
        assert missing.returncode == 2, f"expected 'not found' for a name nobody knows, got {missing.returncode} {missing.stdout!r}"
