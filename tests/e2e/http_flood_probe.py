"""Before/after figures for a slowloris flood on an HTTP port (not a test; pytest skips it).

A control plane limited to 256 open files gets 400 half-sent requests on its Consul port; then
the probe reports how many the server holds, whether the management API answers, whether a new
Envoy gets its clusters over xDS, and how long a half-sent request stays open (up to WAIT_S).

    PYTHONPATH=TREE .venv/bin/python -m tests.e2e.http_flood_probe [WAIT_S]   # from TREE's root
"""

from __future__ import annotations

import select
import shutil
import socket
import sys
import time

from tests.support import control_plane, envoy, free_port, http, sidecar_bootstrap, tmpdir


def _open(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    return not readable


def main(wait_s: float) -> None:
    work = tmpdir()
    try:
        with control_plane(work, extra=["--consul-port", "0"], nofile=256) as cp:
            cp.call("POST", "/v1/services", {"name": "web", "ports": [{"name": "http", "port": 80}]})
            flood: list[socket.socket] = []
            sent = time.monotonic()
            for _ in range(400):
                try:
                    s = socket.create_connection(("127.0.0.1", cp.ports["consul"]), timeout=1)
                    s.sendall(b"GET /v1/agent/self HTTP/1.1\r\nHost: flood\r\nX-Pad: ")
                    flood.append(s)
                except OSError:
                    pass
            time.sleep(0.5)
            held = [s for s in flood if _open(s)]
            print(f"flood: {len(flood)} connected, {len(held)} held open by the server")
            try:
                status, _, _ = http("GET", cp.api + "/v1/services", timeout=5)
                print(f"management API during the flood: {status}")
            except Exception as exc:  # noqa: BLE001 - the figure is whether it answers at all
                print(f"management API during the flood: no answer ({exc!r})")
            with envoy(work, sidecar_bootstrap("probe", cp.xds_port, outbound_port=free_port())) as e:
                started, served = time.monotonic(), False
                while not served and time.monotonic() - started < 15:
                    served = "outbound|80||web.default.svc.mesh" in e.admin("/clusters")
                    time.sleep(0.1)
                print(f"new Envoy got its clusters over xDS during the flood: {served} ({time.monotonic() - started:.1f} s)")
            while any(_open(s) for s in held) and time.monotonic() - sent < wait_s:
                time.sleep(0.5)
            still = sum(_open(s) for s in held)
            took = time.monotonic() - sent
            print(f"half-sent requests closed by the server: {len(held) - still} of {len(held)}; "
                  + (f"the last {took:.1f} s after they were sent" if not still else f"{still} still open after {took:.0f} s"))
            for s in flood:
                s.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 180.0)
