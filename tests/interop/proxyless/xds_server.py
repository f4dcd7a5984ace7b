"""An xDS-enabled grpcio echo server for the interop tests (gRFC A36): ``grpc.server(..., xds=True)``
with ``xds_server_credentials`` (plaintext fallback), so its Listener, its TLS (from the bootstrap's
certificate providers) and its RBAC filters come from the control plane. Serves until stdin closes.
Args: <generated echo code dir> <listening address host:port> <name replies carry>.
GRPC_XDS_BOOTSTRAP must be set in its environment. Prints ``serving`` once the port is bound."""

from __future__ import annotations

import sys
from concurrent import futures
from typing import Any

import grpc


def main() -> int:
    gen_dir, address, name = sys.argv[1], sys.argv[2], sys.argv[3]
    sys.path.insert(0, gen_dir)
    import echo_pb2
    import echo_pb2_grpc

    class Servicer(echo_pb2_grpc.EchoServicer):
        def Call(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
            return echo_pb2.EchoReply(server=name, message=request.message)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), xds=True)
    echo_pb2_grpc.add_EchoServicer_to_server(Servicer(), server)
    port = server.add_secure_port(address, grpc.xds_server_credentials(grpc.insecure_server_credentials()))
    if not port:
        sys.stderr.write(f"cannot listen on {address}\n")
        return 1
    server.start()
    sys.stdout.write("serving\n")
    sys.stdout.flush()
    sys.stdin.read()
    server.stop(grace=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
