"""A TCP app behind a sidecar: the inbound listener proxies raw TCP to the app."""

from __future__ import annotations

import socket
import socketserver
import threading
from pathlib import Path

from tests.support import control_plane, envoy, free_port, sidecar_bootstrap, wait_until


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(4096):
            self.request.sendall(b"echo:" + data)


def _roundtrip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        s.sendall(payload)
        want = len(payload) + 5
        got = b""
        while len(got) < want:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
        return got


def test_tcp_app_behind_its_sidecar(workdir: Path) -> None:
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with control_plane(workdir) as cp:
            status, body = cp.call("POST", "/v1/services", {"name": "echo", "ports": [{"name": "tcp", "port": 7000, "protocol": "tcp"}]})
            assert status == 201, body
            inbound = free_port()
            boot = sidecar_bootstrap("echo-1", cp.xds_port, service="echo", inbound_port=inbound, app_port=srv.server_address[1])
            with envoy(workdir, boot) as e:
                got = wait_until(lambda: _roundtrip(inbound, b"hello mesh"), 15, what="a TCP round trip through the inbound listener")
                assert got == b"echo:hello mesh", f"expected the app's echo, got {got!r}"
                dump = e.config_dump("dynamic_listeners")
                inbound_cfg = [c["active_state"]["listener"] for c in dump["configs"] if c.get("name") == "inbound"]
                assert inbound_cfg, f"no active inbound listener in {dump}"
                filters = [f["name"] for chain in inbound_cfg[0]["filter_chains"] for f in chain["filters"]]
                assert filters == ["envoy.filters.network.tcp_proxy"], f"expected a plain TCP proxy, got {filters}"
    finally:
        srv.shutdown()
        srv.server_close()
