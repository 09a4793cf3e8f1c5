"""Level 3: which blocks of each disk the guest wrote since the last checkpoint, from
QEMU dirty bitmaps (FACTS.md: a snapshot bitmap read over NBD matched a full compare
exactly for 97 checkpoints), so a checkpoint reads only those, whatever the disk's size.

    session start: NBD server on a Unix socket in the VM's run directory; bitmap B1
                   recording on each disk's top node (before the pre-copy reads the disk),
                   exported read-only and a connection to it opened
    checkpoint n, guest stopped: B(n+1) added (records from here on: sent right behind
                   `stop`, before `migrate`); B(n)'s extents asked over its open
                   connection while QEMU saves the device state (the guest is stopped and
                   its I/O drained, so B(n) holds exactly epoch n's writes)
    right behind `cont` (`exports`): B(n+1) exported; after the checkpoint's send
                   (`advance`): B(n+1) connected; B(n)'s connection closed, its export and
                   the bitmap removed

B(n) is never disabled: after `cont` it goes on recording the next epoch's writes too, which
nobody reads, until it is removed. What this buys is the pause: one bitmap-add and one NBD
round trip, where freezing and exporting a bitmap and opening a connection to it (a
greeting and three option round trips) took 2-3 ms of every pause. QEMU 7.2 exports an
*enabled* bitmap read-only only when the export names it as {node, name} (the plain name
is refused: "Enabled bitmap incompatible with readonly export"); an exported bitmap is
busy (it cannot be cleared or disabled), which this rotation never needs.

Any failure is the session's: the checkpoint fails, the partner's copy is recorded
outdated and a new session starts with a full pre-copy (there is no copy of a disk to
fall back on comparing: that is the point). A new session first removes every bitmap and
export an earlier one left on this QEMU.
"""

from __future__ import annotations

import asyncio
import secrets
from contextlib import suppress
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..qemu.process import QemuError
from .nbd_status import BitmapReader, Extent, NbdError

PREFIX = "ftvm-l3-"
GRANULARITY = 4096  # one bit per page: what a checkpoint sends is counted in pages
PAGE = 4096
CLOSE_RETRIES = 20  # x 50 ms: a closing session waits this long for its readers to leave QEMU


class Qmp(Protocol):
    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any: ...


class DiskWrites:
    def __init__(self, qmp: Qmp, nodes: list[str], socket_path: Path) -> None:
        self.qmp, self.nodes, self.socket = qmp, nodes, socket_path
        self.session = secrets.token_hex(4)  # names of one session never meet another's leftovers
        self.epoch = 1  # the bitmaps named for this epoch record now; checkpoint `epoch` reads them
        self._readers: list[BitmapReader] = []  # open on this epoch's exports, one per disk
        self._stale: list[str] = []  # bitmaps of past epochs whose removal must be tried again

    def names(self, epoch: int) -> list[str]:
        return [f"{PREFIX}{self.session}-{epoch}-d{i}" for i in range(len(self.nodes))]

    async def start(self) -> None:
        """Before the pre-copy: every write from here on is recorded, and readable."""
        with suppress(QemuError):  # a server left by an earlier session on this QEMU
            await self.qmp.execute("nbd-server-stop")  # (ends its exports)
        await self._remove_leftovers()
        self.socket.unlink(missing_ok=True)
        # (QMP's legacy socket address form: nbd-server-start predates the flat one)
        await self.qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(self.socket)}}})
        for node, name in zip(self.nodes, self.names(self.epoch), strict=True):
            await self.qmp.execute("block-dirty-bitmap-add", {"node": node, "name": name,
                                                              "granularity": GRANULARITY})
        await self._open(self.epoch)

    def rotate(self) -> list[tuple[str, dict[str, Any]]]:
        """The commands that start the next epoch's bitmaps, to send right behind `stop`
        (QEMU runs a monitor's commands in order: no write falls between two bitmaps, the
        guest being stopped). Plain commands, not a transaction: a transaction drains every
        block node first, ~1 ms here, and with the guest stopped there is nothing to drain."""
        return [("block-dirty-bitmap-add", {"node": node, "name": name, "granularity": GRANULARITY})
                for node, name in zip(self.nodes, self.names(self.epoch + 1), strict=True)]

    def read(self) -> list[list[Extent]]:
        """(In a thread, with the guest stopped.) Each disk's extents written this epoch."""
        if len(self._readers) != len(self.nodes):
            raise NbdError(0, f"no open bitmap connection for epoch {self.epoch}")
        return [reader.dirty() for reader in self._readers]

    def exports(self) -> list[tuple[str, dict[str, Any]]]:
        """The commands that export the next epoch's bitmaps (they exist from `rotate` on),
        to send right behind `cont`; `advance` connects to them."""
        return [("block-export-add", self._export_args(node, name))
                for node, name in zip(self.nodes, self.names(self.epoch + 1), strict=True)]

    @staticmethod
    def _export_args(node: str, name: str) -> dict[str, Any]:
        return {"type": "nbd", "id": name, "node-name": node, "name": name, "bitmaps": [{"node": node, "name": name}]}

    async def advance(self) -> None:
        """After the checkpoint (guest running, `exports` sent): the next epoch's bitmaps
        connected; this epoch's connections closed, exports and bitmaps removed (one still
        busy is tried again next time)."""
        done, self._readers = self._readers, []
        for reader in done:
            await asyncio.to_thread(reader.close)
        old = self.names(self.epoch)
        self.epoch += 1
        for name in self.names(self.epoch):
            self._readers.append(await asyncio.to_thread(BitmapReader, str(self.socket), name, name))
        self._stale = await self._release(self._stale + old)

    async def _open(self, epoch: int) -> None:
        for node, name in zip(self.nodes, self.names(epoch), strict=True):
            await self.qmp.execute("block-export-add", self._export_args(node, name))
            self._readers.append(await asyncio.to_thread(BitmapReader, str(self.socket), name, name))

    async def _release(self, names: list[str]) -> list[str]:
        """These bitmaps' exports and the bitmaps go (the commands sent at once, QEMU runs
        them in order). Returns those still there (QEMU lets go of an exported bitmap once
        the export's last client has left, which can take a moment): the caller passes
        them again next time."""
        replies = []
        for name in names:
            replies.append(asyncio.ensure_future(self.qmp.execute("block-export-del", {"id": name})))
            replies.append(asyncio.ensure_future(self.qmp.execute(
                "block-dirty-bitmap-remove", {"node": self._node_of(name), "name": name})))
        results = await asyncio.gather(*replies, return_exceptions=True)
        left = []
        for name, removed in zip(names, results[1::2], strict=True):
            if isinstance(removed, QemuError) and "not found" not in str(removed):  # (not: a retry of one gone)
                left.append(name)
            elif isinstance(removed, BaseException) and not isinstance(removed, QemuError):
                raise removed
        for deleted in results[0::2]:  # gone already (a retry) is fine; anything else is not QEMU's answer
            if isinstance(deleted, BaseException) and not isinstance(deleted, QemuError):
                raise deleted
        return left

    def _node_of(self, name: str) -> str:
        return self.nodes[int(name.rsplit("-d", 1)[1])]

    async def _remove_leftovers(self) -> None:
        """Every bitmap of ours on the disks' nodes (earlier sessions', on this QEMU)."""
        nodes = set(self.nodes)
        for n in await self.qmp.execute("query-named-block-nodes", {"flat": True}):
            if n.get("node-name") not in nodes:
                continue
            for b in n.get("dirty-bitmaps", []):
                name = str(b.get("name", ""))
                if name.startswith(PREFIX):
                    with suppress(QemuError):  # busy: an export of a dead session still ends
                        await self.qmp.execute("block-dirty-bitmap-remove", {"node": n["node-name"], "name": name})

    async def close(self) -> None:
        readers, self._readers = self._readers, []
        for reader in readers:
            reader.close()
        with suppress(QemuError):  # the QEMU may be gone already
            left = await self._release(self._stale + self.names(self.epoch) + self.names(self.epoch + 1))
            for _ in range(CLOSE_RETRIES):  # a reader just closed may not have left its export yet
                if not left:
                    break
                await asyncio.sleep(0.05)
                left = await self._release(left)
        with suppress(QemuError):  # same
            await self.qmp.execute("nbd-server-stop")
        self.socket.unlink(missing_ok=True)


def pages_of(extents: list[Extent], npages: int) -> np.ndarray:
    """The page numbers the extents cover (bounded by the disk's size)."""
    parts = [np.arange(e.offset // PAGE, min(npages, -(-(e.offset + e.length) // PAGE)), dtype=np.int64)
             for e in extents]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
