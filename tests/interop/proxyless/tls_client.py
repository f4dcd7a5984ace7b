"""A proxyless grpcio client with xDS credentials (gRFC A29): calls ``xds:///<target>`` in a loop,
taking mutual TLS (certificates from the bootstrap's certificate providers) for clusters whose
``transport_socket`` asks for it and plaintext for the rest. Prints one line per call, ``<unix
time> <server name or error code>``, until stdin closes or the time limit passes. Args: <generated
echo code dir> <target> <seconds>. GRPC_XDS_BOOTSTRAP must be set in its environment."""

from __future__ import annotations

import sys
import threading
import time

import grpc
import grpc.experimental


def main() -> int:
    gen_dir, target, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
    sys.path.insert(0, gen_dir)
    import echo_pb2
    import echo_pb2_grpc

    stop = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    deadline = time.monotonic() + limit
    creds = grpc.xds_channel_credentials(grpc.experimental.insecure_channel_credentials())
    with grpc.secure_channel(f"xds:///{target}", creds) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                reply = stub.Call(echo_pb2.EchoRequest(message="hi"), timeout=5)
                outcome = reply.server
            except grpc.RpcError as exc:
                outcome = "error:" + exc.code().name
                sys.stderr.write(f"{time.time():.6f} {exc.code().name}: {exc.details()}\n")
                time.sleep(0.05)
            sys.stdout.write(f"{time.time():.6f} {outcome}\n")
            sys.stdout.flush()
            time.sleep(0.02)
    return 0


if __name__ == "__main__":
    sys.exit(main())
