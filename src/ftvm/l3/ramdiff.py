"""Level 3 groundwork: find the guest RAM pages that changed since the last checkpoint.

The guest's RAM is a shared file (`memory-backend-file,share=on`); with the VM
stopped, its pages are compared with the copy taken at the previous checkpoint
(no dependence on QEMU's dirty tracking, which TCG on 7.2 gets wrong). The
compare runs in chunks so the temporaries stay small and cache-friendly. The
partner applies the changed pages to its replica RAM file only once the whole
checkpoint has arrived (commit).

`python -m ftvm.l3.ramdiff --bench [MiB]` prints what one compare costs here.
"""

from __future__ import annotations

import argparse
import mmap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PAGE = 4096
CHUNK_PAGES = 4096  # 16 MiB per compare step


@dataclass(frozen=True)
class Delta:
    """The pages of one checkpoint: their indices and contents, in page order."""

    pages: np.ndarray  # int64 page numbers
    data: bytes        # len(pages) * PAGE bytes

    @property
    def nbytes(self) -> int:
        return len(self.data)


class RamTracker:
    """Primary side: the guest's RAM file and the copy as of the last checkpoint."""

    def __init__(self, ram_file: Path) -> None:
        self._file = open(ram_file, "rb")
        self.size = Path(ram_file).stat().st_size
        if self.size % PAGE:
            raise ValueError(f"{ram_file}: size {self.size} is not a whole number of pages")
        self._map = mmap.mmap(self._file.fileno(), self.size, prot=mmap.PROT_READ)
        self.live = np.frombuffer(self._map, dtype=np.uint64).reshape(-1, PAGE // 8)
        self.copy = self.live.copy()  # checkpoint 0: everything (taken while the guest runs: pre-copy)

    def close(self) -> None:
        del self.live
        self._map.close()
        self._file.close()

    def diff(self) -> Delta:
        """Pages changed since the last diff (call with the VM stopped); the copy is updated."""
        dirty = []
        for start in range(0, self.live.shape[0], CHUNK_PAGES):
            live = self.live[start:start + CHUNK_PAGES]
            copy = self.copy[start:start + CHUNK_PAGES]
            changed = np.flatnonzero((live != copy).any(axis=1))
            if changed.size:
                copy[changed] = live[changed]
                dirty.append(changed + start)
        pages = np.concatenate(dirty) if dirty else np.empty(0, dtype=np.int64)
        return Delta(pages.astype(np.int64), self.copy[pages].tobytes())

    def full(self) -> Delta:
        """Every page (the first, full checkpoint), refreshing the copy."""
        self.copy[:] = self.live
        pages = np.arange(self.live.shape[0], dtype=np.int64)
        return Delta(pages, self.copy.tobytes())


def apply(replica: Path, delta: Delta) -> None:
    """Partner side: write a complete checkpoint's pages into the replica RAM file."""
    with open(replica, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        target = np.frombuffer(m, dtype=np.uint64).reshape(-1, PAGE // 8)
        target[delta.pages] = np.frombuffer(delta.data, dtype=np.uint64).reshape(-1, PAGE // 8)
        del target
        m.flush()


def bench(mib: int) -> None:
    import tempfile
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        ram = Path(tmp) / "ram"
        ram.write_bytes(np.random.default_rng(1).integers(0, 255, mib << 20, dtype=np.uint8).tobytes())
        tracker = RamTracker(ram)
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
        print(f"{mib} MiB guest RAM: compare p50 {times[len(times) // 2] * 1000:.1f} ms, "
              f"max {times[-1] * 1000:.1f} ms, {len(delta.pages)} dirty pages in the last epoch")


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m ftvm.l3.ramdiff")
    p.add_argument("--bench", type=int, default=256, metavar="MIB")
    bench(p.parse_args().bench)
