"""The DR link between a VM's owner (sender) and the DR pool's receiver: l3/wire.py's framing
and l3/channel.py's authenticated channel (HELLO, CHALLENGE, AUTH, then a MAC on every
message), under a key derived from the DR pairing secret.

    HELLO      S->R  JSON: vm, pool (the sender's), sizes [bytes per disk]
    DR_STATE   R->S  JSON: replica (its id), newest (point number), newest_taken_at, failed_over
    DR_BEGIN   S->R  JSON: number, taken_at, kind ("incremental" | "diff"), final (a failback's last point)
    DR_HASHES  S->R  disk (2), first block (8), then 16-byte BLAKE2b hashes of 64 KiB blocks
                     of the point's image (a diff point: compared with the receiver's newest)
    DR_WANT    R->S  disk (2), first block (8), count (4), bitmap (1 bit per block: differs)
    DR_EXTENT  S->R  disk (2), offset (8), length (4), codec (1: 0 raw, 1 zstd), data
    DR_COMMIT  S->R  number (8): the point is whole; the receiver commits it, then
    DR_ACK     R->S  number (8)
    HEARTBEAT  both

A receiver checks every extent against its disk before it writes anything, inflates at
most the extent's stated length, and commits a point only on DR_COMMIT: a sender that
vanishes midway leaves the previous point as the newest.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from ..l3.wire import HEADER, Msg, WireError

BLOCK = 64 << 10              # the unit of diff points (and of the owner's dirty bitmaps)
HASH = 16
HASHES_PER_MSG = 1 << 16      # 1 MiB of hashes per DR_HASHES
MAX_JSON = 4 << 10
MAX_EXTENT = 4 << 20          # data bytes of one DR_EXTENT (raw length)
EXTENT_HEAD = struct.Struct(">HQIB")
HASHES_HEAD = struct.Struct(">HQ")
WANT_HEAD = struct.Struct(">HQI")
RAW, ZSTD = 0, 1

SENDER_LIMITS = {Msg.DR_STATE: MAX_JSON, Msg.DR_WANT: WANT_HEAD.size + HASHES_PER_MSG // 8,
                 Msg.DR_ACK: 8, Msg.HEARTBEAT: 0}
RECEIVER_LIMITS = {Msg.DR_BEGIN: MAX_JSON, Msg.DR_HASHES: HASHES_HEAD.size + HASH * HASHES_PER_MSG,
                   Msg.DR_EXTENT: EXTENT_HEAD.size + MAX_EXTENT + (MAX_EXTENT >> 6) + 64,
                   Msg.DR_COMMIT: 8, Msg.HEARTBEAT: 0}


def encode(kind: Msg, *parts: bytes) -> list[bytes]:
    return [HEADER.pack(kind, sum(map(len, parts))), *parts]


def encode_json(kind: Msg, obj: dict[str, Any]) -> list[bytes]:
    return encode(kind, json.dumps(obj).encode())


def decode_json(payload: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except ValueError:
        raise WireError(f"{what} is not JSON") from None
    if not isinstance(obj, dict):
        raise WireError(f"{what} is not a JSON object")
    return obj


def encode_number(kind: Msg, n: int) -> list[bytes]:
    return encode(kind, struct.pack(">Q", n))


def decode_number(payload: bytes, what: str) -> int:
    if len(payload) != 8:
        raise WireError(f"{what} of {len(payload)} bytes")
    return int(struct.unpack(">Q", payload)[0])


def encode_hashes(disk: int, first: int, hashes: bytes) -> list[bytes]:
    return encode(Msg.DR_HASHES, HASHES_HEAD.pack(disk, first), hashes)


def decode_hashes(payload: bytes, sizes: list[int]) -> tuple[int, int, list[bytes]]:
    if len(payload) < HASHES_HEAD.size or (len(payload) - HASHES_HEAD.size) % HASH:
        raise WireError("malformed DR_HASHES")
    disk, first = HASHES_HEAD.unpack_from(payload)
    count = (len(payload) - HASHES_HEAD.size) // HASH
    if disk >= len(sizes) or first + count > blocks_of(sizes[disk]):
        raise WireError(f"DR_HASHES for blocks {first}+{count} outside disk {disk}")
    body = payload[HASHES_HEAD.size:]
    return disk, first, [body[i * HASH:(i + 1) * HASH] for i in range(count)]


def encode_want(disk: int, first: int, differs: list[bool]) -> list[bytes]:
    bits = bytearray((len(differs) + 7) // 8)
    for i, d in enumerate(differs):
        if d:
            bits[i // 8] |= 1 << (i % 8)
    return encode(Msg.DR_WANT, WANT_HEAD.pack(disk, first, len(differs)), bytes(bits))


def decode_want(payload: bytes) -> tuple[int, int, list[bool]]:
    if len(payload) < WANT_HEAD.size:
        raise WireError("malformed DR_WANT")
    disk, first, count = WANT_HEAD.unpack_from(payload)
    bits = payload[WANT_HEAD.size:]
    if count > HASHES_PER_MSG or len(bits) != (count + 7) // 8:
        raise WireError("malformed DR_WANT bitmap")
    return disk, first, [bool(bits[i // 8] >> (i % 8) & 1) for i in range(count)]


def encode_extent(disk: int, offset: int, length: int, codec: int, data: bytes) -> list[bytes]:
    return encode(Msg.DR_EXTENT, EXTENT_HEAD.pack(disk, offset, length, codec), data)


def decode_extent(payload: bytes) -> tuple[int, int, int, int, bytes]:
    """disk, offset, raw length, codec, stored data (bounds are the receiver's to check)."""
    if len(payload) < EXTENT_HEAD.size:
        raise WireError("malformed DR_EXTENT")
    disk, offset, length, codec = EXTENT_HEAD.unpack_from(payload)
    if codec not in (RAW, ZSTD) or not 0 < length <= MAX_EXTENT:
        raise WireError(f"DR_EXTENT with codec {codec}, length {length}")
    data = payload[EXTENT_HEAD.size:]
    if codec == RAW and len(data) != length:
        raise WireError("DR_EXTENT: raw data of the wrong length")
    return disk, offset, length, codec, data


def blocks_of(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK
