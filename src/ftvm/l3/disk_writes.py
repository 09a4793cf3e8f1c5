"""Level 3: which blocks of each disk the guest wrote since the last checkpoint, from
QEMU dirty bitmaps (FACTS.md: a snapshot bitmap read over NBD matched a full compare
exactly for 97 checkpoints), so a checkpoint reads only those, whatever the disk's size.

    session start: NBD server on a Unix socket in the VM's run directory; bitmap B1
                   recording on each disk's top node (before the pre-copy reads the disk)
    checkpoint n, guest stopped, before `migrate` (block-layer QMP must come first):
        transaction: per disk, B(n+1) added (records from here on), B(n) disabled
        B(n) exported read-only with itself as the export's bitmap (in 7.2 an exported
        bitmap is busy, so it cannot be the one recording); read over NBD (nbd_status.py)
    after `cont` and the checkpoint's send: B(n)'s export and B(n) removed

The rotation costs one two-action transaction per checkpoint (measured 0.9 ms against 1.5 ms
for freezing a copy of one long-lived bitmap by merge and clear). No write falls between
two bitmaps: the guest is stopped and its I/O drained while both exist.

Any failure is the session's: the checkpoint fails, the partner's copy is recorded
outdated and a new session starts with a full pre-copy (there is no copy of a disk to
fall back on comparing: that is the point). A new session first removes every bitmap and
export an earlier one left on this QEMU.
"""

from __future__ import annotations

import secrets
from contextlib import suppress
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..qemu.process import QemuError
from .nbd_status import BitmapReader, Extent

PREFIX = "ftvm-l3-"
GRANULARITY = 4096  # one bit per page: what a checkpoint sends is counted in pages
PAGE = 4096


class Qmp(Protocol):
    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any: ...


class DiskWrites:
    def __init__(self, qmp: Qmp, nodes: list[str], socket_path: Path) -> None:
        self.qmp, self.nodes, self.socket = qmp, nodes, socket_path
        self.session = secrets.token_hex(4)  # names of one session never meet another's leftovers
        self.epoch = 1  # the bitmaps named for this epoch record now

    def names(self, epoch: int) -> list[str]:
        return [f"{PREFIX}{self.session}-{epoch}-d{i}" for i in range(len(self.nodes))]

    async def start(self) -> None:
        """Before the pre-copy: every write from here on is recorded."""
        with suppress(QemuError):  # a server left by an earlier session on this QEMU
            await self.qmp.execute("nbd-server-stop")  # (ends its exports)
        await self._remove_leftovers()
        self.socket.unlink(missing_ok=True)
        # (QMP's legacy socket address form: nbd-server-start predates the flat one)
        await self.qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(self.socket)}}})
        for node, name in zip(self.nodes, self.names(self.epoch), strict=True):
            await self.qmp.execute("block-dirty-bitmap-add", {"node": node, "name": name,
                                                              "granularity": GRANULARITY})

    async def snapshot(self) -> list[str]:
        """Guest stopped: the writes of the epoch just ended, frozen and exported (one
        name per disk); the next epoch's bitmaps record from here on."""
        frozen, recording = self.names(self.epoch), self.names(self.epoch + 1)
        actions: list[dict[str, Any]] = []
        for node, old, new in zip(self.nodes, frozen, recording, strict=True):
            actions += [
                {"type": "block-dirty-bitmap-add", "data": {"node": node, "name": new, "granularity": GRANULARITY}},
                {"type": "block-dirty-bitmap-disable", "data": {"node": node, "name": old}}]
        await self.qmp.execute("transaction", {"actions": actions})
        self.epoch += 1
        for node, name in zip(self.nodes, frozen, strict=True):
            await self.qmp.execute("block-export-add", {"type": "nbd", "id": name, "node-name": node,
                                                        "name": name, "bitmaps": [name]})
        return frozen

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

    async def release(self, names: list[str]) -> list[str]:
        """After the checkpoint: these frozen bitmaps' exports and the bitmaps go. Returns
        those still there (QEMU lets go of an exported bitmap once the export's last client
        has left, which can take a moment): the caller passes them again next time."""
        left = []
        for name in names:
            with suppress(QemuError):  # gone already (a retry)
                await self.qmp.execute("block-export-del", {"id": name})
            try:
                await self.qmp.execute("block-dirty-bitmap-remove", {"node": self._node_of(name), "name": name})
            except QemuError as e:
                if "not found" not in str(e):  # (a retry of one that went)
                    left.append(name)
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
        for node, name in zip(self.nodes, self.names(self.epoch), strict=True):
            with suppress(QemuError):  # the QEMU may be gone already
                await self.qmp.execute("block-dirty-bitmap-remove", {"node": node, "name": name})
        with suppress(QemuError):  # same
            await self.qmp.execute("nbd-server-stop")
        self.socket.unlink(missing_ok=True)


def pages_of(extents: list[Extent], npages: int) -> np.ndarray:
    """The page numbers the extents cover (bounded by the disk's size)."""
    parts = [np.arange(e.offset // PAGE, min(npages, -(-(e.offset + e.length) // PAGE)), dtype=np.int64)
             for e in extents]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
