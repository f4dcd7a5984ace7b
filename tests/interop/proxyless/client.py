"""A proxyless grpcio client for the interop tests: calls ``xds:///<target>`` in a loop and prints
one line per call, ``<unix time> <server name or error code>``, until stdin closes or the time
limit passes. Args: <generated echo code dir> <target> <seconds> [xds-creds]. With ``xds-creds`` it
uses xDS channel credentials (gRFC A29): mutual TLS from the bootstrap's certificate providers for
clusters whose ``transport_socket`` asks for it, plaintext for the rest. GRPC_XDS_BOOTSTRAP must be
set in its environment (grpcio reads it at channel creation, once per process)."""

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
    if len(sys.argv) > 4 and sys.argv[4] == "xds-creds":
        channel = grpc.secure_channel(f"xds:///{target}", grpc.xds_channel_credentials(grpc.experimental.insecure_channel_credentials()))
    else:
        channel = grpc.insecure_channel(f"xds:///{target}")
    with channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                reply = stub.Call(echo_pb2.EchoRequest(message="hi"), timeout=5, wait_for_ready=True)
                outcome = reply.server
            except grpc.RpcError as exc:
                outcome = "error:" + exc.code().name
                sys.stderr.write(f"{time.time():.6f} {exc.code().name}: {exc.details()}\n")
                time.sleep(0.01)
            sys.stdout.write(f"{time.time():.6f} {outcome}\n")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
