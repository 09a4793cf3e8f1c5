"""Level 3 page tracking: diff on the primary, apply on the partner (real files)."""

from __future__ import annotations

import mmap
from pathlib import Path

from ftvm.l3.pages import PAGE, PageTracker, ReplicaFile


def make(path: Path, pages: int, seed: int = 0) -> None:
    path.write_bytes(bytes((i * 7 + seed) & 0xFF for i in range(256)) * (pages * PAGE // 256))


def test_precopy_then_diffs_keep_the_replica_byte_identical(tmp_path: Path) -> None:
    ram, replica_path = tmp_path / "ram", tmp_path / "replica"
    make(ram, 10000)
    with open(ram, "r+b") as f:  # an all-zero stretch is skipped by the pre-copy
        f.seek(5000 * PAGE)
        f.write(bytes(4096 * PAGE))
    make(replica_path, 10000, seed=3)  # the partner starts from different garbage
    tracker = PageTracker(ram)
    replica = ReplicaFile(replica_path, tracker.size)
    try:
        replica.zero()
        sent = 0
        for delta in tracker.precopy_chunks():
            replica.apply(delta)
            sent += len(delta.pages)
        assert sent == 10000 - 4096
        assert replica_path.read_bytes() == ram.read_bytes()
        assert len(tracker.diff().pages) == 0
        with open(ram, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            for page in (0, 4095, 4096, 9999):  # across compare chunks, first and last page
                m[page * PAGE + 100] ^= 0xFF
        delta = tracker.diff()
        assert list(delta.pages) == [0, 4095, 4096, 9999] and delta.nbytes == 4 * PAGE
        assert replica_path.read_bytes() != ram.read_bytes()
        replica.apply(delta)
        assert replica_path.read_bytes() == ram.read_bytes()
        assert len(tracker.diff().pages) == 0  # the copy moved on with the checkpoint
    finally:
        tracker.close()
        replica.close()


def test_zeroing_a_replica_deallocates_it_whatever_its_size(tmp_path: Path) -> None:
    """A new session zeroes the replica (the pre-copy skips zero chunks): a 20 GiB disk
    replica full of an old session's data must not be rewritten page by page."""
    path = tmp_path / "disk"
    replica = ReplicaFile(path, 20 << 30)
    try:
        for p in (0, 1 << 18, (20 << 18) - 1):  # data near the start, the middle, the end
            replica.pages[p] = 7
        assert path.stat().st_blocks > 0
        replica.zero()
        assert path.stat().st_size == 20 << 30 and path.stat().st_blocks == 0
        assert not replica.pages[0].any() and not replica.pages[(20 << 18) - 1].any()
    finally:
        replica.close()
