"""Output-commit packet relay for Level 3.

QEMU's NIC backend is `-netdev stream` connected to this relay's Unix socket
(frames are a 4-byte big-endian length then the Ethernet frame); the relay
owns the VM's tap. Frames *toward* the guest pass straight through. Frames
*from* the guest are tagged with the checkpoint epoch in which they were
sent and held until `release(epoch)` says that checkpoint is safe on the
partner; only then do they reach the tap (output commit). With gating off,
frames pass at once (a VM that is not checkpointed).

QEMU 7.2's `-netdev stream` does not reconnect: the relay must listen before
QEMU starts and must outlive it.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

MAX_FRAME = 65536


@dataclass
class RelayStats:
    to_guest: int = 0
    from_guest: int = 0
    released: int = 0
    held_max: int = 0
    # (epoch, time released) of every frame from the guest, for tests of output commit
    release_log: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=100_000))


class OutputCommitRelay:
    def __init__(self, socket_path: Path, tap_fd: int, gated: bool = True) -> None:
        self.socket_path = socket_path
        self.tap_fd = tap_fd
        self.gated = gated
        self.epoch = 0          # frames from the guest now belong to this epoch
        self.held: deque[tuple[int, bytes]] = deque()
        self.stats = RelayStats()
        self._writer: asyncio.StreamWriter | None = None
        self._server: asyncio.AbstractServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.on_held: Callable[[], None] | None = None  # output-triggered checkpoints

    async def start(self) -> None:
        """Listen for QEMU. A relay made with tap_fd -1 gets its tap later (`attach_tap`):
        raising a running VM to level 3, the tap is the old QEMU's until it is gone."""
        self._loop = asyncio.get_running_loop()
        self.socket_path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.socket_path))
        if self.tap_fd >= 0:
            self._loop.add_reader(self.tap_fd, self._from_tap)

    def attach_tap(self, fd: int) -> None:
        assert self._loop is not None and self.tap_fd < 0
        self.tap_fd = fd
        self._loop.add_reader(fd, self._from_tap)

    async def close(self) -> None:
        if self._loop is not None and self.tap_fd >= 0:
            self._loop.remove_reader(self.tap_fd)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._writer is not None:
            self._writer.close()

    # --- checkpoint interface ------------------------------------------------------
    def begin_epoch(self, epoch: int) -> None:
        """Frames the guest sends from now on belong to `epoch` (call when the VM resumes)."""
        self.epoch = epoch

    def release(self, epoch: int) -> int:
        """Checkpoint `epoch` is safe on the partner: let its frames (and older) out."""
        n = 0
        while self.held and self.held[0][0] <= epoch:
            e, frame = self.held.popleft()
            self._to_tap(frame, e)
            n += 1
        return n

    def discard(self) -> int:
        """Failover or lost checkpoint: frames not yet released never leave."""
        n = len(self.held)
        self.held.clear()
        return n

    # --- data paths ----------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        try:
            while True:
                header = await reader.readexactly(4)
                (length,) = struct.unpack(">I", header)
                if length > MAX_FRAME:
                    break
                frame = await reader.readexactly(length)
                self.stats.from_guest += 1
                if self.gated:
                    self.held.append((self.epoch, frame))
                    self.stats.held_max = max(self.stats.held_max, len(self.held))
                    if self.on_held is not None:
                        self.on_held()
                else:
                    self._to_tap(frame, self.epoch)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            if self._writer is writer:
                self._writer = None

    def _to_tap(self, frame: bytes, epoch: int) -> None:
        try:
            os.write(self.tap_fd, frame)
        except BlockingIOError:
            return  # the tap queue is full: drop, as a NIC would
        except OSError:
            return  # the tap is down (EIO): the frame is lost, as on an unplugged cable
        self.stats.released += 1
        self.stats.release_log.append((epoch, time.monotonic()))

    def _from_tap(self) -> None:
        while True:
            try:
                frame = os.read(self.tap_fd, MAX_FRAME)
            except BlockingIOError:
                return
            except OSError:  # the tap went away (EBADFD): stop reading it rather than spin
                if self._loop is not None:
                    self._loop.remove_reader(self.tap_fd)
                return
            if self._writer is None:
                continue  # no guest connected: the frame is lost, as on an unplugged NIC
            self._writer.write(struct.pack(">I", len(frame)) + frame)
            self.stats.to_guest += 1
