"""A proxyless grpcio client for the interop tests: calls ``xds:///<target>`` in a loop and prints
one line per call, ``<unix time> <server name or error code>``, until stdin closes or the time
limit passes. GRPC_XDS_BOOTSTRAP must be set in its environment (grpcio reads it at channel
creation, once per process)."""

from __future__ import annotations

import sys
import threading
import time

import grpc


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
    with grpc.insecure_channel(f"xds:///{target}") as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                reply = stub.Call(echo_pb2.EchoRequest(message="hi"), timeout=5, wait_for_ready=True)
                outcome = reply.server
            except grpc.RpcError as exc:
                outcome = "error:" + exc.code().name
                time.sleep(0.01)
            sys.stdout.write(f"{time.time():.6f} {outcome}\n")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
