"""Hand-assembled protobuf wire format for xDS responses.

A DiscoveryResponse is per-stream fields (version, nonce) around resources that are the same for
every stream. Protobuf lets fields appear in any order and repeated fields be concatenated, so the
resources are serialised once, kept as ready-made field bytes, and each stream's response is a
join of those bytes with a few small fields of its own.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["bytes_field", "string_field", "varint"]


def varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def bytes_field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return varint((number << 3) | 2) + varint(len(payload)) + payload


def string_field(number: int, value: str) -> bytes:
    return bytes_field(number, value.encode()) if value else b""


def strings_field(number: int, values: Iterable[str]) -> bytes:
    return b"".join(bytes_field(number, v.encode()) for v in values)
