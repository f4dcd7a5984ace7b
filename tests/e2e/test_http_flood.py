"""A flood of half-sent requests on one HTTP port (slowloris) leaves xDS and the other ports
served: the port holds at most its share of the open-file limit, refuses the rest with a 503 at
once, and closes a half-sent request after ``http_idle_timeout_s``.

The control plane runs with a limit of 256 open files and receives more half-sent requests than
that on its Consul port. Before the port was capped the flood used up every descriptor: a new
Envoy got no xDS configuration and the management API accepted no connection.
"""

from __future__ import annotations

import select
import socket
import time
from pathlib import Path

from tests.support import control_plane, envoy, free_port, http, sidecar_bootstrap, wait_until


NOFILE = 256
FLOOD = 400  # more half-sent requests than the process has descriptors
IDLE_S = 10
CAP = NOFILE // (2 * 2)  # two HTTP ports (management API, Consul) within half the descriptors
HALF_REQUEST = b"GET /v1/agent/self HTTP/1.1\r\nHost: flood\r\nX-Pad: "  # the head never ends


def _open(sock: socket.socket) -> bool:
    """Whether the server has neither answered nor closed this connection."""
    readable, _, _ = select.select([sock], [], [], 0)
    return not readable


def test_a_flooded_http_port_leaves_xds_and_the_api_served(workdir: Path) -> None:
    cfg = workdir / "settings.yaml"
    cfg.write_text(f"http_idle_timeout_s: {IDLE_S}\n")
    with control_plane(workdir, extra=["--config", str(cfg), "--consul-port", "0"], nofile=NOFILE) as cp:
        status, body = cp.call("POST", "/v1/services", {"name": "web", "ports": [{"name": "http", "port": 80}]})
        assert status == 201, body
        flood: list[socket.socket] = []
        try:
            for _ in range(FLOOD):
                try:
                    s = socket.create_connection(("127.0.0.1", cp.ports["consul"]), timeout=1)
                    s.sendall(HALF_REQUEST)
                    flood.append(s)
                except OSError:
                    pass  # a connection the kernel could not queue is no less a flood
            sent = time.monotonic()
            # a connection over the cap is answered at once, not left hanging (and, accepted after
            # the flood, it tells that the server has seen every earlier connection)
            with socket.create_connection(("127.0.0.1", cp.ports["consul"]), timeout=5) as extra:
                first = extra.recv(64)  # (unread request bytes would turn the server's close into a reset)
            assert first.startswith(b"HTTP/1.1 503"), f"expected a 503 from the full port, got {first!r}"

            held = [s for s in flood if _open(s)]
            assert len(held) <= CAP, f"expected the Consul port to hold at most {CAP} connections, it holds {len(held)} of {len(flood)}"

            status, body, _ = http("GET", cp.api + "/v1/services", timeout=5)
            assert status == 200 and [s["name"] for s in body] == ["web"], f"management API during the flood: {status} {body!r}"

            boot = sidecar_bootstrap("flood-node", cp.xds_port, outbound_port=free_port())
            with envoy(workdir, boot) as e:
                wait_until(lambda: "outbound|80||web.default.svc.mesh" in e.admin("/clusters"), 15,
                           what="a new Envoy's clusters over xDS while the Consul port is flooded")
            still = sum(_open(s) for s in held)
            assert still == len(held), f"the flood must still be on when Envoy is served; {len(held) - still} of {len(held)} closed early"

            # the half-sent requests are closed after the idle timeout
            wait_until(lambda: not any(_open(s) for s in held), IDLE_S + 10, interval=0.2,
                       what=f"the server to close {len(held)} half-sent requests (http_idle_timeout_s={IDLE_S})")
            print(f"half-sent requests held: {len(held)} of {len(flood)}; the last closed {time.monotonic() - sent:.1f} s after the flood")
        finally:
            for s in flood:
                s.close()


def test_a_body_that_does_not_arrive_is_answered_408(workdir: Path) -> None:
    cfg = workdir / "settings.yaml"
    cfg.write_text("http_idle_timeout_s: 2\n")
    with control_plane(workdir, extra=["--config", str(cfg)]) as cp:
        with socket.create_connection(("127.0.0.1", cp.ports["api"]), timeout=15) as s:
            s.sendall(b"POST /v1/services HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"name\":")
            try:
                answer = s.recv(200)
            except TimeoutError:
                raise AssertionError("expected a 408 for a body that stops half way, the connection stayed silent for 15 s") from None
        assert answer.startswith(b"HTTP/1.1 408"), f"expected a 408 for a body that stops half way, got {answer[:120]!r}"
        status, body = cp.call("GET", "/v1/services")
        assert status == 200 and body == [], f"nothing may be stored from the half body, got {status} {body!r}"
