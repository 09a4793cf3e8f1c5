"""Level 3: which blocks of each disk the guest wrote since the last checkpoint, from
QEMU dirty bitmaps (FACTS.md: a snapshot bitmap read over NBD matched a full compare
exactly for 97 checkpoints), so a checkpoint reads only those, whatever the disk's size.

    session start: NBD server on a Unix socket in the VM's run directory; a bitmap
                   LIVE on each disk's top node (before the pre-copy reads the disk)
    each epoch, guest stopped, before `migrate` (block-layer QMP must come first):
        transaction: per disk, SNAP<n> added disabled, LIVE merged into it, LIVE cleared
        SNAP<n> exported read-only with its bitmap (in 7.2 an exported bitmap is busy:
        hence one per epoch); read over NBD (l3/nbd_status.py) beside the device state
    after `cont`: the export and SNAP<n> removed

Any failure is the session's: the checkpoint fails, the partner's copy is recorded
outdated and a new session starts with a full pre-copy (there is no copy of a disk to
fall back on comparing: that is the point).
"""

from __future__ import annotations

import asyncio
import secrets
from contextlib import suppress
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..qemu.process import QemuError
from .nbd_status import BitmapReader, Extent

LIVE = "ftvm-l3-live"
GRANULARITY = 4096  # one bit per page: what a checkpoint sends is counted in pages
PAGE = 4096


class Qmp(Protocol):
    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any: ...


class DiskWrites:
    def __init__(self, qmp: Qmp, nodes: list[str], socket_path: Path) -> None:
        self.qmp, self.nodes, self.socket = qmp, nodes, socket_path
        self.session = secrets.token_hex(4)  # names of one session never meet another's leftovers

    async def start(self) -> None:
        """Before the pre-copy: every write from here on is recorded."""
        with suppress(QemuError):  # a server left by an earlier session on this QEMU
            await self.qmp.execute("nbd-server-stop")
        self.socket.unlink(missing_ok=True)
        # (QMP's legacy socket address form: nbd-server-start predates the flat one)
        await self.qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(self.socket)}}})
        for node in self.nodes:
            with suppress(QemuError):  # left by an earlier session: it counted for that one
                await self.qmp.execute("block-dirty-bitmap-remove", {"node": node, "name": LIVE})
            await self.qmp.execute("block-dirty-bitmap-add", {"node": node, "name": LIVE,
                                                              "granularity": GRANULARITY})

    async def snapshot(self, epoch: int) -> list[str]:
        """Guest stopped: the writes of the epoch just ended, frozen and exported (one
        name per disk); LIVE records the next epoch's from here on."""
        names = [f"ftvm-l3-{self.session}-{epoch}-d{i}" for i in range(len(self.nodes))]
        actions: list[dict[str, Any]] = []
        for node, name in zip(self.nodes, names, strict=True):
            actions += [
                {"type": "block-dirty-bitmap-add", "data": {"node": node, "name": name,
                                                            "granularity": GRANULARITY, "disabled": True}},
                {"type": "block-dirty-bitmap-merge", "data": {"node": node, "target": name, "bitmaps": [LIVE]}},
                {"type": "block-dirty-bitmap-clear", "data": {"node": node, "name": LIVE}}]
        await self.qmp.execute("transaction", {"actions": actions})
        for node, name in zip(self.nodes, names, strict=True):
            await self.qmp.execute("block-export-add", {"type": "nbd", "id": name, "node-name": node,
                                                        "name": name, "bitmaps": [name]})
        return names

    def read(self, names: list[str]) -> list[list[Extent]]:
        """(In a thread.) Each disk's written extents in the snapshot."""
        out = []
        for name in names:
            reader = BitmapReader(str(self.socket), name, name)
            try:
                out.append(reader.dirty())
            finally:
                reader.close()
        return out

    async def release(self, names: list[str]) -> None:
        """After `cont`: these snapshots' exports and bitmaps go (names of any epoch of this
        session: a failed release is retried with the next). QemuError if a bitmap stays."""
        for name in names:
            with suppress(QemuError):  # gone already (a retry)
                await self.qmp.execute("block-export-del", {"id": name})
        left = set(names)
        for _ in range(200):  # an export lets go of its bitmap once its last client has left
            for name in sorted(left & await self._bitmaps()):
                with suppress(QemuError):  # still busy: QEMU is finishing the export
                    await self.qmp.execute("block-dirty-bitmap-remove",
                                           {"node": self.nodes[int(name.rsplit("-d", 1)[1])], "name": name})
            left &= await self._bitmaps()
            if not left:
                return
            await asyncio.sleep(0.005)
        raise QemuError(f"bitmaps {', '.join(sorted(left))} could not be removed")

    async def _bitmaps(self) -> set[str]:
        """The names of the bitmaps on the disks' nodes now."""
        nodes = set(self.nodes)
        return {str(b.get("name")) for n in await self.qmp.execute("query-named-block-nodes", {"flat": True})
                if n.get("node-name") in nodes for b in n.get("dirty-bitmaps", [])}

    async def close(self) -> None:
        for node in self.nodes:
            with suppress(QemuError):  # the QEMU may be gone already
                await self.qmp.execute("block-dirty-bitmap-remove", {"node": node, "name": LIVE})
        with suppress(QemuError):  # same
            await self.qmp.execute("nbd-server-stop")
        self.socket.unlink(missing_ok=True)


def pages_of(extents: list[Extent], npages: int) -> np.ndarray:
    """The page numbers the extents cover (bounded by the disk's size)."""
    parts = [np.arange(e.offset // PAGE, min(npages, -(-(e.offset + e.length) // PAGE)), dtype=np.int64)
             for e in extents]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
