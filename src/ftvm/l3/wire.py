"""Level 3 checkpoint stream between the primary's agent and the partner's (over an A-link).

One TCP connection per protected VM, primary -> partner. Every message is a
9-byte header (type, payload length) then the payload:

    HELLO       P->S  JSON: vm, session, files [{name, size}]   (a new protection session)
    PRECOPY     P->S  file index, pages, data        (full copy while the guest runs)
    CHECKPOINT  P->S  epoch, per file (index, pages, data), device state
    ACK         S->P  epoch                          (checkpoint committed on the partner)
    HEARTBEAT   both  (nothing)                      (the link and the peer are alive)

A CHECKPOINT is applied only once its whole message has arrived: a primary
that dies halfway through leaves the partner at the previous checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

from .pages import PAGE, Delta

HEADER = struct.Struct(">BQ")
MAX_PAYLOAD = 1 << 34  # a checkpoint can hold a whole RAM; anything larger is corrupt


class Msg(IntEnum):
    HELLO = 1
    PRECOPY = 2
    CHECKPOINT = 3
    ACK = 4
    HEARTBEAT = 5


class WireError(RuntimeError):
    pass


@dataclass(frozen=True)
class Checkpoint:
    epoch: int
    deltas: dict[int, Delta]  # file index -> changed pages
    device_state: bytes

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes for d in self.deltas.values()) + len(self.device_state)


def _delta_parts(index: int, delta: Delta) -> list[bytes]:
    return [struct.pack(">HQ", index, len(delta.pages)), delta.pages.astype(">i8").tobytes(), delta.data]


def _read_delta(buf: memoryview, pos: int) -> tuple[int, Delta, int]:
    index, n = struct.unpack_from(">HQ", buf, pos)
    pos += 10
    pages = np.frombuffer(buf[pos:pos + 8 * n], dtype=">i8").astype(np.int64)
    pos += 8 * n
    data = bytes(buf[pos:pos + n * PAGE])
    pos += n * PAGE
    if len(data) != n * PAGE:
        raise WireError("truncated page data")
    return index, Delta(pages, data), pos


def encode_hello(info: dict[str, Any]) -> list[bytes]:
    body = json.dumps(info).encode()
    return [HEADER.pack(Msg.HELLO, len(body)), body]


def encode_precopy(index: int, delta: Delta) -> list[bytes]:
    parts = _delta_parts(index, delta)
    return [HEADER.pack(Msg.PRECOPY, sum(map(len, parts))), *parts]


def encode_checkpoint(cp: Checkpoint) -> list[bytes]:
    parts = [struct.pack(">QH", cp.epoch, len(cp.deltas))]
    for index, delta in sorted(cp.deltas.items()):
        parts += _delta_parts(index, delta)
    parts += [struct.pack(">Q", len(cp.device_state)), cp.device_state]
    return [HEADER.pack(Msg.CHECKPOINT, sum(map(len, parts))), *parts]


def encode_ack(epoch: int) -> list[bytes]:
    return [HEADER.pack(Msg.ACK, 8), struct.pack(">Q", epoch)]


def encode_heartbeat() -> list[bytes]:
    return [HEADER.pack(Msg.HEARTBEAT, 0)]


def decode_precopy(payload: bytes) -> tuple[int, Delta]:
    index, delta, pos = _read_delta(memoryview(payload), 0)
    if pos != len(payload):
        raise WireError("trailing bytes after a precopy message")
    return index, delta


def decode_checkpoint(payload: bytes) -> Checkpoint:
    try:
        return _decode_checkpoint(payload)
    except (struct.error, ValueError) as e:
        raise WireError(f"malformed checkpoint message: {e}") from None


def _decode_checkpoint(payload: bytes) -> Checkpoint:
    buf = memoryview(payload)
    epoch, nfiles = struct.unpack_from(">QH", buf, 0)
    pos = 10
    deltas = {}
    for _ in range(nfiles):
        index, delta, pos = _read_delta(buf, pos)
        deltas[index] = delta
    (n,) = struct.unpack_from(">Q", buf, pos)
    pos += 8
    state = bytes(buf[pos:pos + n])
    if len(state) != n or pos + n != len(payload):
        raise WireError("checkpoint message has the wrong length")
    return Checkpoint(epoch, deltas, state)


def decode_ack(payload: bytes) -> int:
    return int(struct.unpack(">Q", payload)[0])


READ_PIECE = 1 << 20


async def read_message(reader: asyncio.StreamReader,
                       alive: Callable[[], None] | None = None) -> tuple[Msg, bytes]:
    """One whole message. `alive` is called as each MiB of a large one arrives, so a peer
    busy sending a big checkpoint is not taken for a silent one."""
    kind, length = HEADER.unpack(await reader.readexactly(HEADER.size))
    if length > MAX_PAYLOAD:
        raise WireError(f"message of {length} bytes: corrupt stream")
    try:
        msg = Msg(kind)
    except ValueError as e:
        raise WireError(f"unknown message type {kind}") from e
    if length <= READ_PIECE or alive is None:
        return msg, await reader.readexactly(length) if length else b""
    buf = bytearray()
    while len(buf) < length:
        buf += await reader.readexactly(min(READ_PIECE, length - len(buf)))
        alive()
    return msg, bytes(buf)


def write_message(writer: asyncio.StreamWriter, parts: list[bytes]) -> None:
    writer.writelines(parts)
