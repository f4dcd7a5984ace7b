"""Batched UDP receive and send for meshdns on Linux (``recvmmsg``/``sendmmsg`` through ctypes).

One Python-level ``recvfrom`` + ``sendto`` per query costs two system calls and an address tuple each way, and
caps a single meshdns process well below a C resolver on a busy machine. This reader wakes up from the event
loop (``loop.add_reader``), takes up to 64 datagrams per system call, answers prebuilt-response hits (mesh
names, and cached upstream answers while their TTLs are current; see server.py) in place
(the client's socket address is reused as raw bytes, never converted) and sends them back with one
``sendmmsg``. Misses go to the same slow path as the asyncio DatagramProtocol, which stays the fallback where
this is unavailable (not Linux, IPv6 listeners, no libc).
"""

from __future__ import annotations

import ctypes
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["BatchedUdp", "HotEntry", "available"]

#: a prebuilt response from byte 2 on in its four RD/CD variants, and the clock value until which it may be sent
HotEntry = tuple[bytes, bytes, bytes, bytes, float]

_N = 64
_SLOT = 4096
_NAME = 16  # sockaddr_in
_MSG_DONTWAIT = 0x40


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(_Iovec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t), ("msg_flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        # the C library this Python already runs on; find_library("c") would run ldconfig at import
        libc = ctypes.CDLL(None, use_errno=True)
        libc.recvmmsg.restype = ctypes.c_int
        libc.sendmmsg.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def available(family: int) -> bool:
    return _LIBC is not None and family == socket.AF_INET


class BatchedUdp:
    """Reads and answers datagrams on a bound, non-blocking IPv4 UDP socket in batches."""

    def __init__(self, sock: socket.socket, hot: Callable[[], dict[bytes, HotEntry]],
                 miss: Callable[[bytes, Callable[[bytes], Any]], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sock = sock
        self._clock = clock
        self.fd = sock.fileno()
        self._hot = hot
        self._miss = miss
        self.hits = 0
        self.send_drops = 0
        self._rbuf = ctypes.create_string_buffer(_N * _SLOT)
        self._sbuf = ctypes.create_string_buffer(_N * _SLOT)
        self._names = ctypes.create_string_buffer(_N * _NAME)
        self._riov = (_Iovec * _N)()
        self._siov = (_Iovec * _N)()
        self._rmsgs = (_Mmsghdr * _N)()
        self._smsgs = (_Mmsghdr * _N)()
        rb, sb, nb = (ctypes.addressof(b) for b in (self._rbuf, self._sbuf, self._names))
        for i in range(_N):
            self._riov[i].iov_base, self._riov[i].iov_len = rb + i * _SLOT, _SLOT
            self._siov[i].iov_base = sb + i * _SLOT
            for msgs, iov in ((self._rmsgs, self._riov), (self._smsgs, self._siov)):
                msgs[i].msg_hdr.msg_name = nb + i * _NAME
                msgs[i].msg_hdr.msg_namelen = _NAME
                msgs[i].msg_hdr.msg_iov = ctypes.pointer(iov[i])
                msgs[i].msg_hdr.msg_iovlen = 1
        stride = ctypes.sizeof(_Mmsghdr)
        assert stride % 8 == 0
        self._stride32 = stride // 4
        self._len_at = _Mmsghdr.msg_len.offset // 4
        self._namelen_at = _Msghdr.msg_namelen.offset // 4
        self._name_at = _Msghdr.msg_name.offset // 8
        self._r32 = memoryview(self._rmsgs).cast("B").cast("I")
        self._s64 = memoryview(self._smsgs).cast("B").cast("Q")
        self._siov64 = memoryview(self._siov).cast("B").cast("Q")
        self._rmv = memoryview(self._rbuf).cast("B")
        self._smv = memoryview(self._sbuf).cast("B")
        self._nmv = memoryview(self._names).cast("B")
        self._nb = nb

    def close(self) -> None:
        for mv in (self._r32, self._s64, self._siov64, self._rmv, self._smv, self._nmv):
            mv.release()

    def _reply_to(self, i: int) -> Callable[[bytes], Any]:
        name = bytes(self._nmv[i * _NAME:(i + 1) * _NAME])
        addr = (socket.inet_ntoa(name[4:8]), int.from_bytes(name[2:4], "big"))
        sock = self.sock

        def reply(out: bytes) -> None:
            try:
                sock.sendto(out, addr)
            except OSError:
                self.send_drops += 1

        return reply

    def on_readable(self) -> None:
        r32, s64, siov64, rmv, smv = self._r32, self._s64, self._siov64, self._rmv, self._smv
        stride32, len_at, namelen_at = self._stride32, self._len_at, self._namelen_at
        name_at, stride64, nb = self._name_at, self._stride32 // 2, self._nb
        for _ in range(8):  # bounded, so one busy socket cannot starve the rest of the loop
            for i in range(_N):
                r32[i * stride32 + namelen_at] = _NAME
            n = _LIBC.recvmmsg(self.fd, self._rmsgs, _N, _MSG_DONTWAIT, None)
            if n <= 0:
                return
            hot = self._hot()
            now = self._clock()  # after the datagrams arrived: an entry valid now was valid when they came
            j = 0
            for i in range(n):
                off = i * _SLOT
                data = bytes(rmv[off:off + r32[i * stride32 + len_at]])
                entry = hot.get(data[4:])
                if entry is not None and not data[2] & 0xF8 and entry[4] > now:
                    # the index is 0-3, a bytes variant (4 is the expiry); a cast() would cost a call per query
                    out = data[:2] + entry[(data[2] & 1) | ((data[3] & 0x10) >> 3)]  # type: ignore[operator]
                    soff = j * _SLOT
                    smv[soff:soff + len(out)] = out
                    siov64[j * 2 + 1] = len(out)
                    s64[j * stride64 + name_at] = nb + i * _NAME
                    j += 1
                else:
                    self._miss(data, self._reply_to(i))
            if j:
                sent = _LIBC.sendmmsg(self.fd, self._smsgs, j, _MSG_DONTWAIT)
                self.hits += max(sent, 0)
                if sent < j:
                    self.send_drops += j - max(sent, 0)
            if n < _N:
                return
