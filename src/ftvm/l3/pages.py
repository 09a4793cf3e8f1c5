"""Level 3: find the pages of a file that changed since the last checkpoint, and
apply them to the partner's replica of that file.

Used for the guest's RAM (a shared `memory-backend-file`) and for its raw disk
images alike. Two ways to know what changed, neither relying on QEMU's dirty
tracking, which TCG on 7.2 gets wrong (FACTS.md):
  * exact tracking (RAM, where the host allows it: l3/writes.py): the kernel
    reports the pages written since the last checkpoint; only those are read.
    No copy of the file is kept;
  * compare: with the VM stopped, the live file is compared page by page with
    the copy taken at the previous checkpoint, in chunks on two threads (numpy
    releases the GIL), so the temporaries stay small and both cores work.
The partner applies a checkpoint's pages only once the whole checkpoint has
arrived (commit).

`python -m ftvm.l3.pages --bench [MiB]` prints what one compare costs here.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import mmap
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .writes import TrackerError, WriteTracker

PAGE = 4096
CHUNK_PAGES = 4096   # 16 MiB per compare step
_WORDS = PAGE // 8
_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ftvm-pagediff")


@dataclass(frozen=True)
class Delta:
    """Changed pages of one file: their numbers and contents, in page order."""

    pages: np.ndarray  # int64 page numbers
    data: bytes        # len(pages) * PAGE bytes

    @property
    def nbytes(self) -> int:
        return len(self.data)


def _as_pages(buf: mmap.mmap | np.ndarray) -> np.ndarray:
    return np.frombuffer(buf, dtype=np.uint64).reshape(-1, _WORDS)


class PageTracker:
    """Primary side: one live file (RAM or disk) and what changed in it since the last
    checkpoint: the kernel's record of written pages (`writes`), or else a copy of the
    file as of then, compared.

    The replica starts as zeroes (what a new replica file holds); `precopy_chunks`
    then sends everything while the guest runs, and each stopped `diff` sends
    only what changed since, so the replica equals the live file at that instant.
    """

    def __init__(self, path: Path, writes: WriteTracker | None = None, compare: bool = True) -> None:
        """`writes`: the kernel reports this file's written pages (RAM). `compare=False`:
        the caller says which pages changed (`delta_of`: disks, from QEMU dirty bitmaps)."""
        self.path = Path(path)
        self.size = self.path.stat().st_size
        if self.size % PAGE or self.size == 0:
            raise ValueError(f"{path}: size {self.size} is not a whole, non-zero number of pages")
        self._file = open(self.path, "rb")
        self._map = mmap.mmap(self._file.fileno(), self.size, prot=mmap.PROT_READ)
        self.live = _as_pages(self._map)
        self.writes = writes
        if writes is not None and (writes.first_page != 0 or writes.npages != self.npages):
            raise TrackerError(0, f"QEMU maps {writes.npages} pages of {path} from page {writes.first_page}, "
                                  f"not all {self.npages}")
        # compare only: the file as the replica has it. np.zeros, not zeros_like: calloc'ed
        # pages stay the kernel's zero page until written (zeros_like writes every one: a
        # 20 GiB disk's copy took 20 GiB of RAM, and the lab host was OOM-killed)
        self.copy = np.zeros(self.live.shape, dtype=self.live.dtype) if writes is None and compare else None
        self.full_resyncs = 0      # epochs whose scan failed: every page sent
        self.last_error = ""

    @property
    def npages(self) -> int:
        return int(self.live.shape[0])

    def close(self) -> None:
        if self.writes is not None:
            self.writes.close()
            self.writes = None
        del self.live
        try:
            self._map.close()
        except BufferError:  # a view is still alive somewhere: the map goes with it
            pass
        self._file.close()

    def _diff_chunk(self, start: int) -> np.ndarray:
        assert self.copy is not None
        live = self.live[start:start + CHUNK_PAGES]
        copy = self.copy[start:start + CHUNK_PAGES]
        changed = np.flatnonzero((live != copy).any(axis=1))
        if changed.size:
            copy[changed] = live[changed]
        return changed + start

    def diff(self) -> Delta:
        """Pages changed since the last diff; the copy moves on. Call with the VM
        stopped for a checkpoint; while it runs (pre-copy rounds) a page torn by a
        concurrent write differs again at the next stopped diff, so it is resent (tracked:
        a page written after the scan re-protected it is reported again)."""
        if self.writes is not None:
            return self._written()
        parts = [p for p in _POOL.map(self._diff_chunk, range(0, self.npages, CHUNK_PAGES)) if p.size]
        pages = np.concatenate(parts).astype(np.int64) if parts else np.empty(0, dtype=np.int64)
        assert self.copy is not None
        return Delta(pages, self.copy[pages].tobytes())

    @property
    def finds_changes(self) -> bool:
        """Whether `diff` works (tracked by the kernel, or compared); else see `delta_of`."""
        return self.writes is not None or self.copy is not None

    def delta_of(self, pages: np.ndarray) -> Delta:
        """These pages, as they are now (the caller knows they are what changed)."""
        return Delta(pages, self.live[pages].tobytes())

    def _written(self) -> Delta:
        assert self.writes is not None
        try:
            pages = self.writes.scan()
        except TrackerError as e:
            # part of the walk may have re-protected pages it never returned: everything is
            # written, as far as anyone knows. Protect all again first, then send all.
            self.writes.arm()
            self.full_resyncs += 1
            self.last_error = str(e)
            pages = np.arange(self.npages, dtype=np.int64)
        return Delta(pages, self.live[pages].tobytes())

    def precopy_chunks(self) -> Iterator[Delta]:
        """Every page, chunk by chunk, refreshing the copy (the first, full copy, taken
        while the guest runs). All-zero chunks are skipped: the replica starts zeroed.
        Which chunks hold data is read once, before any: reading a chunk makes the kernel
        read ahead, and a falloc'ed disk's unwritten blocks then count as data (a 20 GiB
        disk was read whole: a minute). What is written later is found like any change."""
        for start in list(self._data_chunks()):
            live = self.live[start:start + CHUNK_PAGES]
            nonzero = np.flatnonzero(live.any(axis=1))
            if not nonzero.size:
                continue
            if self.copy is None:  # tracked: a page written after this read is reported again
                yield Delta((nonzero + start).astype(np.int64), live[nonzero].tobytes())
                continue
            self.copy[start + nonzero] = live[nonzero]
            yield Delta((nonzero + start).astype(np.int64), self.copy[start + nonzero].tobytes())


    def _data_chunks(self) -> Iterator[int]:
        """The chunks that hold data (a sparse disk's holes are skipped unread)."""
        fd = self._file.fileno()
        at = 0
        while at < self.size:
            try:
                data = os.lseek(fd, at, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole from here on
                return
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            first, last = data // PAGE // CHUNK_PAGES, (hole - 1) // PAGE // CHUNK_PAGES
            for chunk in range(first, last + 1):
                if chunk * CHUNK_PAGES * PAGE >= at:
                    yield chunk * CHUNK_PAGES
            at = (last + 1) * CHUNK_PAGES * PAGE


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def _punch_hole(fd: int, length: int) -> bool:
    """Deallocate the whole file (reads as zeroes after); False if unsupported here."""
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, 0, length) == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(e, f"punching the replica's blocks: {os.strerror(e)}")


class ReplicaFile:
    """Partner side: a replica file the size of the primary's, written in place."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # create if absent (guest memory and disk: private), never shrink a longer one below
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        os.chmod(self.path, 0o600)
        if self.path.stat().st_size != size:
            with open(self.path, "r+b") as f:
                f.truncate(size)
        self._file = open(self.path, "r+b")
        self._map = mmap.mmap(self._file.fileno(), size)
        self.pages = _as_pages(self._map)

    def zero(self) -> None:
        """All zeroes, as a new replica is (the pre-copy skips zero chunks): the file's blocks
        are deallocated, which takes no time whatever its size (writing zeroes over a 20 GiB
        disk took minutes and allocated all of it)."""
        if _punch_hole(self._file.fileno(), self.path.stat().st_size):
            return
        self.pages[:] = 0  # a file system that cannot punch holes

    def apply(self, delta: Delta) -> None:
        if len(delta.pages):
            self.pages[delta.pages] = np.frombuffer(delta.data, dtype=np.uint64).reshape(-1, _WORDS)

    def close(self) -> None:
        del self.pages
        self._map.flush()
        self._map.close()
        self._file.close()


def bench(mib: int) -> None:
    import tempfile
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        ram = Path(tmp) / "ram"
        ram.write_bytes(np.random.default_rng(1).integers(0, 255, mib << 20, dtype=np.uint8).tobytes())
        tracker = PageTracker(ram)
        for _ in tracker.precopy_chunks():
            pass
        times = []
        with open(ram, "r+b") as rw, mmap.mmap(rw.fileno(), 0) as m:
            for i in range(10):
                for p in range(0, 200):  # ~200 dirty pages, as a busy 250 ms epoch
                    m[(p * 997 + i) % (mib * 256) * PAGE] = i & 0xFF
                t = time.perf_counter()
                delta = tracker.diff()
                times.append(time.perf_counter() - t)
        tracker.close()
        times.sort()
        print(f"{mib} MiB: compare p50 {times[len(times) // 2] * 1000:.1f} ms, "
              f"max {times[-1] * 1000:.1f} ms, {len(delta.pages)} dirty pages in the last epoch")


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m ftvm.l3.pages")
    p.add_argument("--bench", type=int, default=256, metavar="MIB")
    bench(p.parse_args().bench)
