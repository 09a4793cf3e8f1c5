"""The owner's end of DR replication: one recovery point at a time, from the VM's QEMU
(dr/capture.py) to the DR pool's receiver (dr/receiver.py), over dr/wire.py.

Which kind of point:
  incremental  the receiver's newest point is the last one this sender delivered to that
               same replica: the dirty bitmaps continue from it exactly (an undelivered
               point's bitmap was merged into the next one)
  diff         anything else: the first point, a new owner (failover, live migration, level
               change, agent restart), a commit whose ACK was lost. Every 64 KiB block of
               the point's image is hashed here and compared with the receiver's newest;
               only blocks that differ are sent. What a diff costs on the link is the
               hashes (16 bytes per 64 KiB: 256 KiB per GiB) plus the blocks that differ.

Guest writes never wait for the link: the point is read from a fleecing node while the
guest runs on, and a slow link only makes the next point later (lag).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import zstandard

from ..l3.channel import Channel, open_session
from ..l3.nbd_status import Extent
from ..l3.wire import Msg, WireError
from .capture import Capture, Taken
from .receiver import block_hash
from .wire import (BLOCK, HASH, HASHES_PER_MSG, RAW, SENDER_LIMITS, ZSTD, blocks_of, decode_json,
                   decode_number, decode_want, encode, encode_extent, encode_hashes, encode_json, encode_number)

ZSTD_LEVEL = 1
CONNECT_S = 10.0
ACK_S = 120.0     # a commit (fsync of the point) answered within this


class DrError(RuntimeError):
    pass


class FailedOver(DrError):
    """The DR site runs the VM now (`ftvm dr failover` there): it takes no more points, and
    the source must stop the VM and never start it again without a failback."""


async def probe(addr: tuple[str, int], key: bytes, pool: str, vm: str) -> dict[str, Any]:
    """Ask a receiver whether it has taken `vm` over: its DR_STATE (`failed_over`, `newest`).
    Raises DrError when it cannot be asked."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*addr), CONNECT_S)
    except (OSError, asyncio.TimeoutError) as e:
        raise DrError(f"cannot reach {addr[0]}:{addr[1]}: {e}") from e
    try:
        ch = await open_session(reader, writer, key, {"vm": vm, "pool": pool, "sizes": [], "probe": True})
        kind, payload = await asyncio.wait_for(ch.receive(SENDER_LIMITS), CONNECT_S)
        if kind is not Msg.DR_STATE:
            raise WireError(f"expected DR_STATE, got {kind.name}")
        state = decode_json(payload, "DR_STATE")
        if not isinstance(state.get("failed_over"), bool):
            raise WireError("DR_STATE without failed_over")
        return state
    except (OSError, WireError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
        raise DrError(f"{addr[0]}:{addr[1]} did not answer: {e}") from e
    finally:
        writer.close()


def receiver_addr(text: str) -> tuple[str, int]:
    """A receiver named ADDRESS:PORT (checked when its DR target was set: receiver_problem)."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class TargetWord:
    receiver: str                  # the receiver that answered ("": none did)
    state: dict[str, Any] | None   # its DR_STATE (`failed_over`, `newest`)
    errors: tuple[str, ...]        # why those asked before it did not answer


async def ask_target(receivers: Sequence[str], key: bytes, pool: str, vm: str) -> TargetWord:
    """A DR target's word on `vm`: the first of its receivers that answers. Every receiver of a
    DR pool says the same ("failed over" from the moment a failover is asked anywhere in it,
    dr/receiver.py), and one that cannot tell does not answer."""
    errors: list[str] = []
    for receiver in receivers:
        try:
            return TargetWord(receiver, await probe(receiver_addr(receiver), key, pool, vm), tuple(errors))
        except DrError as e:
            errors.append(str(e))
    return TargetWord("", None, tuple(errors))


@dataclass(frozen=True)
class Shipped:
    number: int         # the point's number at the receiver
    taken_at: float
    kind: str           # "incremental" | "diff"
    data_bytes: int     # bytes of disk content in the point
    wire_bytes: int     # bytes sent for it (compressed data, hashes, framing)
    seconds: float      # from the cut to the receiver's ACK (the lag the point closed)


class DrSender:
    def __init__(self, capture: Capture, vm: str, pool: str, key: bytes, addr: tuple[str, int],
                 spec: dict[str, Any] | None = None, confirm_s: float = 0.0) -> None:
        """`spec`: the VM's spec, kept at the DR site for a failover there; `confirm_s`: this
        pool's dr_confirm, which a failover there waits out."""
        self.capture, self.vm, self.pool, self.key, self.addr, self.spec = capture, vm, pool, key, addr, spec
        self.confirm_s = confirm_s
        self.ch: Channel | None = None
        self.state: dict[str, Any] = {}
        self.delivered: tuple[str, int] | None = None  # (replica id, point) this sender's bitmaps continue from
        self._zc = zstandard.ZstdCompressor(level=ZSTD_LEVEL)

    async def _connect(self, sizes: tuple[int, ...]) -> Channel:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*self.addr), CONNECT_S)
        try:
            hello: dict[str, Any] = {"vm": self.vm, "pool": self.pool, "sizes": list(sizes),
                                     "confirm_s": self.confirm_s}
            if self.spec is not None:
                hello["spec"] = self.spec
            ch = await open_session(reader, writer, self.key, hello)
            kind, payload = await asyncio.wait_for(ch.receive(SENDER_LIMITS), CONNECT_S)
            if kind is not Msg.DR_STATE:
                raise WireError(f"expected DR_STATE, got {kind.name}")
            state = decode_json(payload, "DR_STATE")
            if not isinstance(state.get("replica"), str) or not isinstance(state.get("newest"), int):
                raise WireError("malformed DR_STATE")
            if state.get("failed_over") is True:
                raise FailedOver(f"the DR site at {self.addr[0]}:{self.addr[1]} has taken {self.vm} over "
                                 f"(from its point {state['newest']})")
        except BaseException:
            writer.close()
            raise
        self.state = state
        return ch

    async def heartbeat(self) -> None:
        """Between points: the receiver hears the source is alive (what a failover there states
        of the writes it loses). A broken session is closed; the next point opens another."""
        if self.ch is None:
            return
        try:
            await self.ch.send(encode(Msg.HEARTBEAT))
            await asyncio.wait_for(self.ch.writer.drain(), CONNECT_S)
        except (OSError, WireError, asyncio.TimeoutError):
            self.close()

    def close(self) -> None:
        if self.ch is not None:
            self.ch.close()
            self.ch = None

    async def ship(self, final: bool = False) -> Shipped:
        """Take a point and deliver it. On any failure the session is closed (the next
        point opens another) and the point's writes move to the next one. `final`: a
        failback's last point (the guest is paused; the receiving pool starts the VM from it)."""
        taken = await self.capture.take()
        delivered = False
        try:
            if self.ch is None:
                self.ch = await self._connect(taken.sizes)
            else:
                await self.ch.send(encode(Msg.HEARTBEAT))
            shipped = await self._send(self.ch, taken, final)
            delivered = True
            self.delivered = (str(self.state["replica"]), shipped.number)
            self.state["newest"] = shipped.number
            return shipped
        except (OSError, WireError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            self.close()
            raise DrError(f"point not delivered: {e}") from e
        finally:
            await self.capture.release(taken, delivered)

    async def _send(self, ch: Channel, taken: Taken, final: bool = False) -> Shipped:
        number = int(self.state["newest"]) + 1
        incremental = self.delivered == (self.state["replica"], self.state["newest"])
        kind = "incremental" if incremental else "diff"
        wire = await ch.send(encode_json(Msg.DR_BEGIN, {"number": number, "taken_at": taken.taken_at, "kind": kind,
                                                        "final": final}))
        if incremental:
            extents = await asyncio.to_thread(self.capture.extents, taken, False)
        else:
            extents, sent = await self._diff(ch, taken)
            wire += sent
        data = 0
        for disk, disk_extents in enumerate(extents):
            pieces = self.capture.read(taken, disk, disk_extents)
            try:
                while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
                    offset, raw = piece
                    packed = await asyncio.to_thread(self._zc.compress, raw)
                    codec, body = (ZSTD, packed) if len(packed) < len(raw) else (RAW, raw)
                    wire += await ch.send(encode_extent(disk, offset, len(raw), codec, body))
                    data += len(raw)
                    await ch.writer.drain()
            finally:  # (its NBD connection holds the point's export: closed before the release)
                pieces.close()
        wire += await ch.send(encode_number(Msg.DR_COMMIT, number))
        await ch.writer.drain()
        while True:
            msg, payload = await asyncio.wait_for(ch.receive(SENDER_LIMITS), ACK_S)
            if msg is Msg.DR_ACK:
                break
            if msg is not Msg.HEARTBEAT:
                raise WireError(f"expected DR_ACK, got {msg.name}")
        if decode_number(payload, "DR_ACK") != number:
            raise WireError("DR_ACK of another point")
        return Shipped(number, taken.taken_at, kind, data, wire, time.time() - taken.taken_at)

    async def _diff(self, ch: Channel, taken: Taken) -> tuple[list[list[Extent]], int]:
        """Hashes of every block of the point's image out, the receiver's verdicts in (read
        concurrently: a large disk's hashes fill the socket buffers both ways)."""
        messages = sum((blocks_of(size) + HASHES_PER_MSG - 1) // HASHES_PER_MSG for size in taken.sizes)
        wants: list[list[bool]] = [[False] * blocks_of(size) for size in taken.sizes]

        async def collect() -> None:
            for _ in range(messages):
                msg, payload = await asyncio.wait_for(ch.receive(SENDER_LIMITS), ACK_S)
                if msg is not Msg.DR_WANT:
                    raise WireError(f"expected DR_WANT, got {msg.name}")
                disk, first, differs = decode_want(payload)
                if disk >= len(wants) or first + len(differs) > len(wants[disk]):
                    raise WireError("DR_WANT outside the disk")
                wants[disk][first:first + len(differs)] = differs

        async def send() -> int:
            wire = 0
            for disk, size in enumerate(taken.sizes):
                batches = _hash_batches(self.capture, taken, disk, size)
                try:
                    while (batch := await asyncio.to_thread(next, batches, None)) is not None:
                        first, hashes = batch
                        wire += await ch.send(encode_hashes(disk, first, hashes))
                        await ch.writer.drain()
                finally:
                    batches.close()
            return wire

        sent, _ = await asyncio.gather(send(), collect())
        extents = []
        for disk, size in enumerate(taken.sizes):
            extents.append(_runs(wants[disk], size))
        return extents, sent


def _hash_batches(capture: Capture, taken: Taken, disk: int,
                  size: int) -> Generator[tuple[int, bytes], None, None]:
    """(In a thread.) (first block, hashes) of the point's image, HASHES_PER_MSG at a time.
    (capture.read's pieces start at block boundaries: READ_CHUNK is a multiple of BLOCK.)"""
    block, batch, first = 0, bytearray(), 0
    for _, chunk in capture.read(taken, disk, [Extent(0, size)]):
        for at in range(0, len(chunk), BLOCK):
            batch += block_hash(chunk[at:at + BLOCK])
            block += 1
            if len(batch) == HASH * HASHES_PER_MSG:
                yield first, bytes(batch)
                batch, first = bytearray(), block
    if batch:
        yield first, bytes(batch)


def _runs(differs: list[bool], size: int) -> list[Extent]:
    """Runs of differing blocks as extents (the last block may be short)."""
    out: list[Extent] = []
    for i, d in enumerate(differs):
        if not d:
            continue
        start, length = i * BLOCK, min(BLOCK, size - i * BLOCK)
        if out and out[-1].offset + out[-1].length == start:
            out[-1] = Extent(out[-1].offset, out[-1].length + length)
        else:
            out.append(Extent(start, length))
    return out
