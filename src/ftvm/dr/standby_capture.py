"""Recovery points of a level 3 VM, cut from its partner's replica (l3/standby.py) instead of
from its QEMU. A point on the primary's QEMU (dr/capture.py) needs a backup job on the disks,
and while that job runs every checkpoint's device-state save fails (QEMU will not inactivate
a node a job writes through), so the VM would fall to unprotected at each point. The
replica at a committed checkpoint is already what a point must be: every disk as it was at
one instant, the checkpoint's, whatever the guest does next.

    start       registered with the standby: each page it is about to write to a disk
                file marks that page's 64 KiB block written
    take(n)     between two commits (nothing is applied meanwhile): the blocks written
                since the last point become point n's, and recording starts afresh. Until
                the release, a block about to be overwritten is first copied to a keep file
                (copy before write, as image fleecing does in QEMU): every block of the
                replica while a diff is read, only the point's own once it is incremental
    read        each block from the keep file if kept, else from the replica, under the
                lock the copy before write takes: never half old and half new
    release(n)  keeping stops; an undelivered point's blocks go back into the recording

The replica stops being this capture's when its standby starts a new session (the files are
zeroed and copied again) or freezes for a takeover (a QEMU writes them from then on): a
read that finds either fails the point, and the shipper starts a new capture (a diff).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Generator
from contextlib import suppress
from pathlib import Path

import numpy as np

from ..l3.nbd_status import Extent
from ..l3.pages import PAGE
from ..l3.standby import Standby
from .capture import READ_CHUNK, Taken
from .wire import BLOCK, blocks_of

PAGES_PER_BLOCK = BLOCK // PAGE


class ReplicaGone(OSError):
    """The replica is no longer the one this capture follows (a new session, a takeover)."""


class StandbyCapture:
    def __init__(self, standby: Standby, session: str, sizes: tuple[int, ...], work_dir: Path) -> None:
        """`session`: the standby's session whose replica files this follows; `sizes`: the
        disks' sizes (the spec's); `work_dir`: a private directory for the keep files."""
        self.standby, self.session, self.sizes, self.work_dir = standby, session, sizes, work_dir
        self.next = 1
        self._lock = threading.Lock()  # the apply's copy-before-write against a point's reads
        self._written = [np.zeros(blocks_of(size), dtype=bool) for size in sizes]
        self._point: list[np.ndarray] = []  # the held point's blocks, per disk
        self._kept: list[np.ndarray] = []   # blocks whose content at the cut is in the keep file
        self._keep_all = False              # a diff reads every block: keep every one overwritten
        self._held: Taken | None = None
        self._disk_fds: list[int] = []
        self._keep_fds: list[int] = []

    def _keep_path(self, disk: int) -> Path:
        return self.work_dir / f"keep-{self.session}-d{disk}"

    async def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            for disk, (path, size) in enumerate(zip(self.standby.paths.disks, self.sizes, strict=True)):
                fd = os.open(path, os.O_RDONLY)
                self._disk_fds.append(fd)
                if os.fstat(fd).st_size != size:
                    raise ReplicaGone(f"replica {path} is {os.fstat(fd).st_size} bytes, the spec says {size}")
                self._keep_fds.append(os.open(self._keep_path(disk), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600))
        except BaseException:
            self._close_files()
            raise
        self.standby.before_write.append(self._before_write)

    def _before_write(self, index: int, pages: np.ndarray) -> None:
        """(Wherever the standby applies: its loop or a thread.) File 0 is the RAM."""
        disk = index - 1
        if disk < 0 or disk >= len(self._written) or not len(pages):
            return
        blocks = np.unique(pages // PAGES_PER_BLOCK)
        with self._lock:
            self._written[disk][blocks] = True
            if self._held is None:
                return
            keep = blocks[~self._kept[disk][blocks]]
            if not self._keep_all:
                keep = keep[self._point[disk][keep]]
            size = self.sizes[disk]
            for b in keep.tolist():
                at = b * BLOCK
                os.pwrite(self._keep_fds[disk], os.pread(self._disk_fds[disk], min(BLOCK, size - at), at), at)
            self._kept[disk][keep] = True

    async def take(self) -> Taken:
        async with self.standby.between_commits() as held:
            if held is None or held[0] != self.session:
                raise ReplicaGone(f"the partner's replica of {self.standby.vm} holds no checkpoint of "
                                  f"session {self.session} now")
            with self._lock:
                self._point, self._written = self._written, [np.zeros_like(w) for w in self._written]
                self._kept = [np.zeros_like(w) for w in self._written]
                self._keep_all = True  # until the sender says it reads only the point's blocks
                self._held = Taken(self.next, time.time(), self.sizes, (), ())
                taken = self._held
        self.next += 1
        return taken

    def extents(self, taken: Taken, full: bool) -> list[list[Extent]]:
        if full:
            return [[Extent(0, size)] for size in self.sizes]
        with self._lock:
            self._keep_all = False
            return [_runs(blocks, size) for blocks, size in zip(self._point, self.sizes, strict=True)]

    def read(self, taken: Taken, disk: int, extents: list[Extent]) -> Generator[tuple[int, bytes], None, None]:
        """(In a thread.) (offset, data) pieces of at most READ_CHUNK bytes, as of the cut."""
        for e in extents:
            at, end = e.offset, e.offset + e.length
            while at < end:
                length = min(READ_CHUNK, end - at)
                yield at, self._read(disk, at, length)
                at += length

    def _read(self, disk: int, offset: int, length: int) -> bytes:
        out = bytearray()
        at, end = offset, offset + length
        while at < end:
            block = at // BLOCK
            n = min((block + 1) * BLOCK, end) - at
            with self._lock:  # (one block at a time: a commit waits at most one read)
                fd = self._keep_fds[disk] if self._kept[disk][block] else self._disk_fds[disk]
                data = os.pread(fd, n, at)
                if not self.standby.feeds(self.session):
                    raise ReplicaGone(f"the partner's replica of {self.standby.vm} was taken over or "
                                      "restarted while a point was read")
            if len(data) != n:
                raise ReplicaGone(f"short read of the replica of {self.standby.vm} at {at}")
            out += data
            at += n
        return bytes(out)

    async def release(self, taken: Taken, delivered: bool) -> None:
        with self._lock:
            if not delivered:  # the next point carries these writes as well
                for written, point in zip(self._written, self._point, strict=True):
                    written |= point
            self._held, self._point, self._kept, self._keep_all = None, [], [], False
            for fd in self._keep_fds:
                os.ftruncate(fd, 0)  # (its blocks freed: kept again from nothing by the next point)

    async def stop(self) -> None:
        with suppress(ValueError):
            self.standby.before_write.remove(self._before_write)
        with self._lock:
            self._held = None
            self._close_files()

    def _close_files(self) -> None:
        for fd in self._disk_fds + self._keep_fds:
            os.close(fd)
        self._disk_fds, self._keep_fds = [], []
        for disk in range(len(self.sizes)):
            self._keep_path(disk).unlink(missing_ok=True)


def _runs(blocks: np.ndarray, size: int) -> list[Extent]:
    """Runs of marked blocks as extents (the last block may be short)."""
    marked = np.flatnonzero(blocks)
    if not len(marked):
        return []
    breaks = np.flatnonzero(np.diff(marked) != 1)
    starts = np.concatenate(([marked[0]], marked[breaks + 1]))
    ends = np.concatenate((marked[breaks], [marked[-1]])) + 1
    return [Extent(int(s) * BLOCK, min(int(e) * BLOCK, size) - int(s) * BLOCK)
            for s, e in zip(starts, ends, strict=True)]
