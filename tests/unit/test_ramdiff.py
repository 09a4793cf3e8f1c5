"""Level 3 groundwork: RAM page diff on the primary, apply on the partner."""

from __future__ import annotations

import mmap
from pathlib import Path

from ftvm.l3.ramdiff import PAGE, RamTracker, apply


def make(path: Path, pages: int, seed: int = 0) -> None:
    path.write_bytes(bytes((i * 7 + seed) & 0xFF for i in range(256)) * (pages * PAGE // 256))


def test_diff_finds_exactly_the_changed_pages_and_apply_makes_replicas_equal(tmp_path: Path) -> None:
    ram, replica = tmp_path / "ram", tmp_path / "replica"
    make(ram, 10000)
    make(replica, 10000, seed=3)  # the partner starts from different garbage
    tracker = RamTracker(ram)
    try:
        apply(replica, tracker.full())
        assert replica.read_bytes() == ram.read_bytes()
        assert len(tracker.diff().pages) == 0
        with open(ram, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            for page in (0, 4095, 4096, 9999):  # across compare chunks, first and last page
                m[page * PAGE + 100] ^= 0xFF
        delta = tracker.diff()
        assert list(delta.pages) == [0, 4095, 4096, 9999] and delta.nbytes == 4 * PAGE
        assert replica.read_bytes() != ram.read_bytes()
        apply(replica, delta)
        assert replica.read_bytes() == ram.read_bytes()
        assert len(tracker.diff().pages) == 0  # the copy moved on with the checkpoint
    finally:
        tracker.close()
