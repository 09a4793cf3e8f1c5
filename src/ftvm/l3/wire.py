"""Level 3 checkpoint stream between the primary's agent and the partner's (over an A-link).

One TCP connection per protected VM, primary -> partner. Every message is a
9-byte header (type, payload length) then the payload:

    HELLO       P->S  JSON: v, vm, session, files [{name, size}], nonce   (a new session)
    CHALLENGE   S->P  JSON: nonce, proof         (the partner proves it holds the pool key)
    AUTH        P->S  proof                      (the primary proves it too: l3/channel.py)
    REFUSED     S->P  why, as text               (instead of CHALLENGE; then the link closes)
    PRECOPY     P->S  file index, pages, data        (full copy while the guest runs)
    CHECKPOINT  P->S  epoch, per file (index, pages, data), device state (whole, or the
                      chunks that differ from the previous checkpoint's: StatePatch)
    ACK         S->P  epoch                          (checkpoint committed on the partner)
    HEARTBEAT   both  (nothing)                      (the link and the peer are alive)
    PACKED      P->S  inner type (1), inner length (8), zstd frame of a PRECOPY or CHECKPOINT
                      payload (only when the partner's CHALLENGE accepted compression: l3/channel.py)

After AUTH, every message is followed by a 32-byte MAC (l3/channel.py). Each side reads
only the types it expects, each with its own size limit: an ACK is 8 bytes, a checkpoint
at most the replica's size plus a device state, and every page index is checked against
its file before anything is written.

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
MAX_HELLO = 64 << 10
MAX_SMALL = 1024               # CHALLENGE, AUTH, REFUSED
MAX_DEVICE_STATE = 256 << 20   # QEMU's device state (RAM excluded) is a few MiB at most
DELTA_HEAD = 10                # file index (2), page count (8)
PAGE_COST = 8 + PAGE           # page index + page
STATE_CHUNK = 256              # a device state patch's unit
STATE_WHOLE, STATE_PATCH = 0, 1


class Msg(IntEnum):
    HELLO = 1
    PRECOPY = 2
    CHECKPOINT = 3
    ACK = 4
    HEARTBEAT = 5
    CHALLENGE = 6
    AUTH = 7
    REFUSED = 8
    PACKED = 9
    # asynchronous DR (dr/wire.py): the same framing and authenticated channel
    DR_STATE = 20
    DR_BEGIN = 21
    DR_HASHES = 22
    DR_WANT = 23
    DR_EXTENT = 24
    DR_COMMIT = 25
    DR_ACK = 26


def standby_limits(npages: list[int]) -> dict[Msg, int]:
    """What the partner accepts once a session is up, and how large (files of `npages`)."""
    whole = sum(DELTA_HEAD + n * PAGE_COST for n in npages)
    return {Msg.PRECOPY: DELTA_HEAD + max(npages, default=0) * PAGE_COST,
            Msg.CHECKPOINT: 10 + whole + 8 + MAX_DEVICE_STATE, Msg.HEARTBEAT: 0}


PRIMARY_LIMITS = {Msg.ACK: 8, Msg.HEARTBEAT: 0}


class WireError(RuntimeError):
    pass


@dataclass(frozen=True)
class StatePatch:
    """A device state as the STATE_CHUNK-byte chunks that differ from the previous
    checkpoint's. Most of QEMU's device state is the same every time (the ROMs, ~350 KiB
    of 364 KiB here), and it made up half of every checkpoint."""

    length: int          # of the new device state
    chunks: np.ndarray   # indexes of the chunks sent, ascending
    data: bytes          # those chunks (the state's last one may be short)

    @staticmethod
    def between(old: bytes, new: bytes) -> StatePatch:
        """The chunks of `new` that differ from `old`, compared as 64-bit words (~0.05 ms for
        QEMU's ~400 KB: it is on the path from `cont` to the ACK); a chunk past the end of
        `old`, or partly past that of `new`, always differs."""
        n = len(new)
        count = -(-n // STATE_CHUNK)
        same = min(n, len(old)) // STATE_CHUNK  # chunks whole in both
        words = STATE_CHUNK // 8
        a = np.frombuffer(old, dtype=np.uint64, count=same * words).reshape(same, words)
        b = np.frombuffer(new, dtype=np.uint64, count=same * words).reshape(same, words)
        changed = np.flatnonzero((a != b).any(axis=1))
        chunks = np.concatenate([changed, np.arange(same, count, dtype=np.int64)]).astype(np.int64)
        view = memoryview(new)
        return StatePatch(n, chunks, b"".join(view[i * STATE_CHUNK:(i + 1) * STATE_CHUNK] for i in chunks.tolist()))

    def apply(self, old: bytes) -> bytes:
        """The new device state, from the previous checkpoint's."""
        out = bytearray(old[:self.length].ljust(self.length, b"\0"))
        pos = 0
        for i in self.chunks.tolist():
            size = min(STATE_CHUNK, self.length - i * STATE_CHUNK)
            out[i * STATE_CHUNK:i * STATE_CHUNK + size] = self.data[pos:pos + size]
            pos += size
        return bytes(out)

    @property
    def nbytes(self) -> int:
        return len(self.data) + 4 * len(self.chunks)


@dataclass(frozen=True)
class Checkpoint:
    epoch: int
    deltas: dict[int, Delta]  # file index -> changed pages
    device_state: bytes | StatePatch

    @property
    def nbytes(self) -> int:
        state = self.device_state
        return sum(d.nbytes for d in self.deltas.values()) + (len(state) if isinstance(state, bytes) else state.nbytes)


def _delta_parts(index: int, delta: Delta) -> list[bytes]:
    return [struct.pack(">HQ", index, len(delta.pages)), delta.pages.astype(">i8").tobytes(), delta.data]


def _read_delta(buf: memoryview, pos: int, npages: list[int] | None) -> tuple[int, Delta, int]:
    """One file's pages. With `npages` (the receiving side), the index names a file of the
    session and every page lies inside it; else nothing would stop a write past a replica."""
    index, n = struct.unpack_from(">HQ", buf, pos)
    pos += 10
    if n > (len(buf) - pos) // PAGE_COST:
        raise WireError(f"delta of {n} pages is longer than its message")
    if npages is not None:
        if index >= len(npages):
            raise WireError(f"file index {index}: the session has {len(npages)} files")
        if n > npages[index]:
            raise WireError(f"{n} pages for file {index} of {npages[index]} pages")
    pages = np.frombuffer(buf[pos:pos + 8 * n], dtype=">i8").astype(np.int64)
    pos += 8 * n
    if npages is not None and n and (pages.min() < 0 or pages.max() >= npages[index]):
        raise WireError(f"page index outside file {index} ({npages[index]} pages)")
    data = bytes(buf[pos:pos + n * PAGE])
    pos += n * PAGE
    if len(data) != n * PAGE:
        raise WireError("truncated page data")
    return index, Delta(pages, data), pos


def encode_hello(info: dict[str, Any]) -> list[bytes]:
    body = json.dumps(info).encode()
    return [HEADER.pack(Msg.HELLO, len(body)), body]


def encode(kind: Msg, *parts: bytes) -> list[bytes]:
    return [HEADER.pack(kind, sum(map(len, parts))), *parts]


def encode_precopy(index: int, delta: Delta) -> list[bytes]:
    parts = _delta_parts(index, delta)
    return [HEADER.pack(Msg.PRECOPY, sum(map(len, parts))), *parts]


def encode_checkpoint(cp: Checkpoint) -> list[bytes]:
    parts = [struct.pack(">QH", cp.epoch, len(cp.deltas))]
    for index, delta in sorted(cp.deltas.items()):
        parts += _delta_parts(index, delta)
    state = cp.device_state
    if isinstance(state, bytes):
        parts += [struct.pack(">BQ", STATE_WHOLE, len(state)), state]
    else:
        parts += [struct.pack(">BQQ", STATE_PATCH, state.length, len(state.chunks)),
                  state.chunks.astype(">u4").tobytes(), state.data]
    return [HEADER.pack(Msg.CHECKPOINT, sum(map(len, parts))), *parts]


def encode_ack(epoch: int) -> list[bytes]:
    return [HEADER.pack(Msg.ACK, 8), struct.pack(">Q", epoch)]


def encode_heartbeat() -> list[bytes]:
    return [HEADER.pack(Msg.HEARTBEAT, 0)]


def decode_precopy(payload: bytes, npages: list[int] | None = None) -> tuple[int, Delta]:
    try:
        index, delta, pos = _read_delta(memoryview(payload), 0, npages)
    except (struct.error, ValueError) as e:
        raise WireError(f"malformed precopy message: {e}") from None
    if pos != len(payload):
        raise WireError("trailing bytes after a precopy message")
    return index, delta


def decode_checkpoint(payload: bytes, npages: list[int] | None = None) -> Checkpoint:
    try:
        return _decode_checkpoint(payload, npages)
    except (struct.error, ValueError) as e:
        raise WireError(f"malformed checkpoint message: {e}") from None


def _decode_checkpoint(payload: bytes, npages: list[int] | None) -> Checkpoint:
    buf = memoryview(payload)
    epoch, nfiles = struct.unpack_from(">QH", buf, 0)
    if npages is not None and nfiles > len(npages):
        raise WireError(f"checkpoint of {nfiles} files: the session has {len(npages)}")
    pos = 10
    deltas = {}
    for _ in range(nfiles):
        index, delta, pos = _read_delta(buf, pos, npages)
        if index in deltas:
            raise WireError(f"file {index} twice in one checkpoint")
        deltas[index] = delta
    state, pos = _read_state(buf, pos)
    if pos != len(payload):
        raise WireError("checkpoint message has the wrong length")
    return Checkpoint(epoch, deltas, state)


def _read_state(buf: memoryview, pos: int) -> tuple[bytes | StatePatch, int]:
    kind, n = struct.unpack_from(">BQ", buf, pos)
    pos += 9
    if n > MAX_DEVICE_STATE:
        raise WireError(f"device state of {n} bytes")
    if kind == STATE_WHOLE:
        state = bytes(buf[pos:pos + n])
        if len(state) != n:
            raise WireError("truncated device state")
        return state, pos + n
    if kind != STATE_PATCH:
        raise WireError(f"device state of unknown kind {kind}")
    (count,) = struct.unpack_from(">Q", buf, pos)
    pos += 8
    total = -(-n // STATE_CHUNK)
    if count > total:
        raise WireError(f"device state patch of {count} chunks for {total}")
    chunks = np.frombuffer(buf[pos:pos + 4 * count], dtype=">u4").astype(np.int64)
    pos += 4 * count
    if len(chunks) != count or (count and (chunks[-1] >= total or (count > 1 and (np.diff(chunks) <= 0).any()))):
        raise WireError("device state patch chunks out of order or range")
    size = count * STATE_CHUNK - (STATE_CHUNK * total - n if count and chunks[-1] == total - 1 else 0)
    data = bytes(buf[pos:pos + size])
    if len(data) != size:
        raise WireError("truncated device state patch")
    return StatePatch(n, chunks, data), pos + size


def decode_ack(payload: bytes) -> int:
    if len(payload) != 8:
        raise WireError(f"ACK of {len(payload)} bytes")
    return int(struct.unpack(">Q", payload)[0])


# A large message is read in pieces, each telling the reader's caller the peer is alive: on a
# 10 Mb/s link a 128 KiB piece takes ~0.1 s, well inside a partner's takeover limit (0.3 s)
# (the primary's heartbeats wait behind the message on the same stream)
READ_PIECE = 128 << 10


async def read_header(reader: asyncio.StreamReader, limits: dict[Msg, int]) -> tuple[Msg, int, bytes]:
    """A header of one of the types in `limits`, its length within that type's limit."""
    header = await reader.readexactly(HEADER.size)
    kind, length = HEADER.unpack(header)
    try:
        msg = Msg(kind)
    except ValueError:
        raise WireError(f"unknown message type {kind}") from None
    if msg not in limits:
        raise WireError(f"unexpected {msg.name} message")
    if length > limits[msg]:
        raise WireError(f"{msg.name} message of {length} bytes (at most {limits[msg]})")
    return msg, length, header


async def read_message(reader: asyncio.StreamReader, limits: dict[Msg, int],
                       alive: Callable[[], None] | None = None) -> tuple[Msg, bytes]:
    """One whole message of a type in `limits`. `alive` is called as each MiB of a large
    one arrives, so a peer busy sending a big checkpoint is not taken for a silent one."""
    msg, length, _ = await read_header(reader, limits)
    return msg, await read_payload(reader, length, alive)


async def read_payload(reader: asyncio.StreamReader, length: int,
                       alive: Callable[[], None] | None = None) -> bytes:
    if length <= READ_PIECE or alive is None:
        return await reader.readexactly(length) if length else b""
    buf = bytearray()
    while len(buf) < length:
        buf += await reader.readexactly(min(READ_PIECE, length - len(buf)))
        alive()
    return bytes(buf)


def write_message(writer: asyncio.StreamWriter, parts: list[bytes]) -> None:
    writer.writelines(parts)
