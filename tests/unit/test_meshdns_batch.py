"""The batched UDP reader answers each sender from its own slot of a batch, hands misses on, and stops at once.

Datagrams are queued on a real 127.0.0.1 socket before the reader starts, so they arrive in one ``recvmmsg``
batch: the order of hits and misses inside a batch is what decides which send slot answers which sender.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from meshpilot.meshdns import batch

pytestmark = pytest.mark.skipif(not batch.available(socket.AF_INET), reason="recvmmsg needs Linux")


def _query(qid: int, name: bytes) -> bytes:
    return qid.to_bytes(2, "big") + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + name + b"\x00\x00\x01\x00\x01"


@contextmanager
def _server(hot: dict[bytes, batch.HotEntry]) -> Iterator[tuple[batch.BatchedUdp, socket.socket, list[bytes]]]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    missed: list[bytes] = []

    def miss(data: bytes, reply: Callable[[bytes], Any]) -> None:
        missed.append(data)
        reply(b"\x00\x00MISS")

    udp = batch.BatchedUdp(sock, lambda: hot, miss, clock=lambda: 0.0)
    try:
        yield udp, sock, missed
    finally:
        udp.stop()
        sock.close()


def _start(udp: batch.BatchedUdp) -> threading.Thread:
    thread = threading.Thread(target=udp.run, args=(lambda fn, *args: fn(*args),), daemon=True)
    thread.start()
    return thread


def test_hits_after_a_miss_in_one_batch_go_to_their_own_senders() -> None:
    hit_a, hit_b = _query(1, b"\x01a\x04mesh"), _query(2, b"\x01b\x04mesh")
    hot: dict[bytes, batch.HotEntry] = {
        hit_a[4:]: (b"\x81\x00A0", b"\x81\x00A1", b"\x81\x00A2", b"\x81\x00A3", float("inf")),
        hit_b[4:]: (b"\x81\x00B0", b"\x81\x00B1", b"\x81\x00B2", b"\x81\x00B3", float("inf")),
    }
    with _server(hot) as (udp, sock, missed):
        clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(4)]
        try:
            port = sock.getsockname()[1]
            for c in clients:
                c.settimeout(2)
            # queued before the reader runs: one batch of hit, miss, hit (RD set: variant 1), and hit again
            clients[0].sendto(hit_a, ("127.0.0.1", port))
            clients[1].sendto(_query(3, b"\x01x\x07example"), ("127.0.0.1", port))
            clients[2].sendto(hit_b, ("127.0.0.1", port))
            clients[3].sendto(hit_a, ("127.0.0.1", port))
            thread = _start(udp)
            got = [c.recv(512) for c in clients]
            assert got == [b"\x00\x01\x81\x00A1", b"\x00\x00MISS", b"\x00\x02\x81\x00B1", b"\x00\x01\x81\x00A1"], (
                f"expected each sender its own answer (A, the miss's, B, A), got {got}")
            assert len(missed) == 1 and missed[0][:2] == b"\x00\x03", f"expected the one miss handed on: {missed}"
            # later batches, all hits: every send slot is back to its own receive slot's sender
            for order in ([2], [3, 2, 0]):
                for k in order:
                    clients[k].sendto(hit_b, ("127.0.0.1", port))
                for k in order:
                    got_k = clients[k].recv(512)
                    assert got_k == b"\x00\x02\x81\x00B1", f"expected client {k} answered B, got {got_k!r}"
            assert udp.hits == 7, f"expected 7 fast-path hits, got {udp.hits}"
            udp.stop()
            thread.join(2)
            assert not thread.is_alive(), "expected the reader to return at once when stopped"
        finally:
            for c in clients:
                c.close()
