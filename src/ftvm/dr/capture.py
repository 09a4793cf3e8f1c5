"""Recovery points on the owner's QEMU: a crash-consistent cut across all of a VM's disks,
read while the guest runs on (image fleecing), each disk's writes since the last point from
a dirty bitmap.

    start         bitmap P1 on each disk's top node (records every write from here on)
    take(n)       one transaction, so the same instant on every disk:
                    bitmap P(n+1) added (the next point's writes), P(n) disabled (frozen:
                    exactly the writes between point n-1 and n), and a `blockdev-backup
                    sync=none` from the disk into a fleecing node: a temporary qcow2 whose
                    backing is the disk, into which QEMU copies each block's old content
                    before the guest overwrites it. The fleecing node therefore reads as
                    the disk did at the instant of the cut, for as long as it exists.
                  each fleecing node exported over NBD (Unix socket) with P(n)
    read          the dirty extents of P(n) (every extent for a full point) and their data,
                  from the fleecing export (dr/nbd_read.py, l3/nbd_status.py)
    release(n)    fleecing job cancelled, node and file removed; P(n) removed, or merged
                  into P(n+1) first when the point was not delivered (the next point then
                  carries its writes too: nothing is skipped)

Guest writes are never blocked by the DR link: a point's read is local, and only the
copy-before-write of a block the guest overwrites while its point is read costs a write
to the fleecing file.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import time
from collections.abc import Callable, Generator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..l3.nbd_status import BitmapReader, Extent
from ..qemu.process import QemuError
from .nbd_read import NbdReader

PREFIX = "ftvm-dr-"
GRANULARITY = 64 << 10   # the unit a point ships: a 4 KiB write sends 64 KiB, fewer extents
READ_CHUNK = 4 << 20     # bytes per NBD read (a multiple of the 64 KiB blocks diff points hash)


class Qmp(Protocol):
    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any: ...


@dataclass(frozen=True)
class Taken:
    number: int
    taken_at: float            # the cut's instant (this host's clock)
    sizes: tuple[int, ...]
    exports: tuple[str, ...]   # the fleecing exports, one per disk
    bitmaps: tuple[str, ...]   # P(number), frozen


class Capture(Protocol):
    """Where a sender's points come from: the VM's QEMU (PointCapture), or at level 3 its
    partner's replica (dr/standby_capture.py)."""

    async def take(self) -> Taken: ...
    def extents(self, taken: Taken, full: bool) -> list[list[Extent]]: ...
    def read(self, taken: Taken, disk: int, extents: list[Extent]) -> Generator[tuple[int, bytes], None, None]: ...
    async def release(self, taken: Taken, delivered: bool) -> None: ...
    async def stop(self) -> None: ...


class PointCapture:
    def __init__(self, qmp: Qmp, nodes: list[str], work_dir: Path, socket_path: Path,
                 own: Callable[[Path], None] = lambda p: None) -> None:
        """`nodes`: the disks' top nodes; `work_dir`: where fleecing files go (QEMU's user
        must open them: `own` hands them over); `socket_path`: the QEMU's NBD server."""
        self.qmp, self.nodes, self.work_dir, self.socket, self.own = qmp, nodes, work_dir, socket_path, own
        self.session = secrets.token_hex(4)
        self.next = 1  # the point whose bitmap records now
        self._disk_sizes: tuple[int, ...] | None = None

    def bitmap(self, n: int, i: int) -> str:
        return f"{PREFIX}{self.session}-{n}-d{i}"

    def fleece(self, n: int, i: int) -> str:
        return f"{PREFIX}{self.session}-{n}-f{i}"

    async def start(self) -> None:
        for i, node in enumerate(self.nodes):
            await self.qmp.execute("block-dirty-bitmap-add", {"node": node, "name": self.bitmap(1, i),
                                                              "granularity": GRANULARITY})

    async def _sizes(self) -> tuple[int, ...]:
        """The disks' sizes, asked once per capture (a running VM's disks keep their size)."""
        if self._disk_sizes is None:
            nodes = await self.qmp.execute("query-named-block-nodes", {"flat": True})
            by_name = {n["node-name"]: n for n in nodes}
            self._disk_sizes = tuple(int(by_name[node]["image"]["virtual-size"]) for node in self.nodes)
        return self._disk_sizes

    async def _serve_nbd(self) -> None:
        """The QEMU's one NBD server, on our socket: a level 3 session of this QEMU stops and
        restarts it (l3/disk_writes.py), so it is started again when it is not running."""
        try:
            await self.qmp.execute("nbd-server-start",
                                   {"addr": {"type": "unix", "data": {"path": str(self.socket)}}})
        except QemuError as e:
            if "already running" not in str(e):
                raise

    async def take(self) -> Taken:
        n = self.next
        sizes = await self._sizes()
        await self._serve_nbd()
        files = [self.work_dir / f"{self.fleece(n, i)}.qcow2" for i in range(len(self.nodes))]
        for path, size in zip(files, sizes, strict=True):
            await asyncio.to_thread(_make_fleece_file, path, size)
            self.own(path)
        added: list[str] = []
        try:
            for i, (node, path) in enumerate(zip(self.nodes, files, strict=True)):
                await self.qmp.execute("blockdev-add", {
                    "driver": "qcow2", "node-name": self.fleece(n, i), "backing": node,
                    "file": {"driver": "file", "filename": str(path)}})
                added.append(self.fleece(n, i))
            actions: list[dict[str, Any]] = []
            for i, node in enumerate(self.nodes):
                actions += [
                    {"type": "block-dirty-bitmap-add", "data": {"node": node, "name": self.bitmap(n + 1, i),
                                                                "granularity": GRANULARITY}},
                    {"type": "block-dirty-bitmap-disable", "data": {"node": node, "name": self.bitmap(n, i)}},
                    {"type": "blockdev-backup", "data": {"device": node, "target": self.fleece(n, i),
                                                         "sync": "none", "job-id": self.fleece(n, i),
                                                         "auto-finalize": True, "auto-dismiss": True}}]
            await self.qmp.execute("transaction", {"actions": actions})
            taken_at = time.time()
        except BaseException:
            for name in added:
                with suppress(QemuError):
                    await self.qmp.execute("blockdev-del", {"node-name": name})
            for path in files:
                path.unlink(missing_ok=True)
            raise
        self.next = n + 1
        taken = Taken(n, taken_at, sizes, tuple(self.fleece(n, i) for i in range(len(self.nodes))),
                      tuple(self.bitmap(n, i) for i in range(len(self.nodes))))
        try:
            for i, node in enumerate(self.nodes):
                await self.qmp.execute("block-export-add", {
                    "type": "nbd", "id": self.fleece(n, i), "node-name": self.fleece(n, i),
                    "name": self.fleece(n, i), "bitmaps": [{"node": node, "name": self.bitmap(n, i)}]})
        except BaseException:  # (else its fleecing job would stay for good: one more per failed point)
            with suppress(QemuError, OSError):
                await self.release(taken, delivered=False)
            raise
        return taken

    def extents(self, taken: Taken, full: bool) -> list[list[Extent]]:
        """(In a thread.) Each disk's extents of the point: all of it for a full point."""
        if full:
            return [[Extent(0, size)] for size in taken.sizes]
        out = []
        for export, bitmap in zip(taken.exports, taken.bitmaps, strict=True):
            reader = BitmapReader(str(self.socket), export, bitmap)
            try:
                out.append(reader.dirty())
            finally:
                reader.close()
        return out

    def read(self, taken: Taken, disk: int, extents: list[Extent]) -> Generator[tuple[int, bytes], None, None]:
        """(In a thread.) (offset, data) pieces of at most READ_CHUNK bytes, as of the cut."""
        reader = NbdReader(str(self.socket), taken.exports[disk])
        try:
            for e in extents:
                at, end = e.offset, e.offset + e.length
                while at < end:
                    length = min(READ_CHUNK, end - at)
                    yield at, reader.read(at, length)
                    at += length
        finally:
            reader.close()

    async def release(self, taken: Taken, delivered: bool) -> None:
        n = taken.number
        for i in range(len(self.nodes)):
            with suppress(QemuError):
                await self.qmp.execute("block-export-del", {"id": self.fleece(n, i)})
            with suppress(QemuError):
                await self.qmp.execute("block-job-cancel", {"device": self.fleece(n, i), "force": True})
        await self._wait_jobs_gone({self.fleece(n, i) for i in range(len(self.nodes))})
        for i, node in enumerate(self.nodes):
            await self._retry("blockdev-del", {"node-name": self.fleece(n, i)})
            (self.work_dir / f"{self.fleece(n, i)}.qcow2").unlink(missing_ok=True)
            if not delivered:  # the next point carries these writes as well
                await self.qmp.execute("block-dirty-bitmap-merge", {"node": node, "target": self.bitmap(n + 1, i),
                                                                    "bitmaps": [self.bitmap(n, i)]})
            await self._retry("block-dirty-bitmap-remove", {"node": node, "name": self.bitmap(n, i)})

    async def stop(self) -> None:
        """No more points on this QEMU: the bitmap recording for the next one goes (DR turned
        off, or the VM moved on); the QEMU may be gone already."""
        for i, node in enumerate(self.nodes):
            with suppress(QemuError):
                await self.qmp.execute("block-dirty-bitmap-remove", {"node": node, "name": self.bitmap(self.next, i)})

    async def _wait_jobs_gone(self, ids: set[str]) -> None:
        for _ in range(500):
            jobs = {j["id"] for j in await self.qmp.execute("query-jobs")}
            if not jobs & ids:
                return
            await asyncio.sleep(0.01)
        raise QemuError(f"fleecing jobs {sorted(ids)} did not end")

    async def _retry(self, cmd: str, args: dict[str, Any]) -> None:
        """An export's last client may take a moment to let go of its node and bitmap;
        one already gone is fine."""
        for attempt in range(100):
            try:
                await self.qmp.execute(cmd, args)
                return
            except QemuError as e:
                if "not found" in str(e) or "does not exist" in str(e):
                    return
                if attempt == 99:
                    raise
                await asyncio.sleep(0.02)


def _make_fleece_file(path: Path, size: int) -> None:
    proc = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise QemuError(f"qemu-img create {path}: {proc.stderr.strip()}")


async def clear_stale_points(qmp: Qmp) -> None:
    """Remove what a capture left on a QEMU it no longer drives (its agent restarted): the
    jobs, exports, fleecing nodes and bitmaps named PREFIX. A new capture starts afresh."""
    jobs = {str(j["id"]) for j in await qmp.execute("query-jobs") if str(j.get("id", "")).startswith(PREFIX)}
    for job in jobs:
        with suppress(QemuError):
            await qmp.execute("job-cancel", {"id": job})
    for _ in range(500):
        if not {str(j["id"]) for j in await qmp.execute("query-jobs")} & jobs:
            break
        await asyncio.sleep(0.01)
    for export in await qmp.execute("query-block-exports"):
        if str(export.get("id", "")).startswith(PREFIX):
            with suppress(QemuError):
                await qmp.execute("block-export-del", {"id": export["id"], "mode": "hard"})
    for node in await qmp.execute("query-named-block-nodes", {"flat": True}):
        for bitmap in node.get("dirty-bitmaps", []):
            if str(bitmap.get("name", "")).startswith(PREFIX):
                with suppress(QemuError):
                    await qmp.execute("block-dirty-bitmap-remove", {"node": node["node-name"], "name": bitmap["name"]})
    for node in await qmp.execute("query-named-block-nodes", {"flat": True}):
        if str(node.get("node-name", "")).startswith(PREFIX):
            with suppress(QemuError):
                await qmp.execute("blockdev-del", {"node-name": node["node-name"]})
