"""Recovery points cut from a level 3 partner's replica (dr/standby_capture.py): a point reads
as the replica was at its cut, whatever checkpoints are applied while it is read; an
undelivered point's blocks go into the next; a replica taken over or restarted fails the
point instead of giving it another instant's blocks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from ftvm.dr.standby_capture import BLOCK, ReplicaGone, StandbyCapture
from ftvm.l3.pages import PAGE, Delta, ReplicaFile
from ftvm.l3.standby import Committed, ReplicaPaths, Standby

SIZE = 16 * BLOCK + 3 * PAGE  # (a short last block)


class Replica:
    def __init__(self, tmp: Path) -> None:
        paths = ReplicaPaths(tmp / "ram", (tmp / "disk",), tmp / "state", tmp / "meta")
        self.standby = Standby("vm", paths)
        self.files = [ReplicaFile(paths.ram, 4 * PAGE), ReplicaFile(paths.disks[0], SIZE)]
        self.standby.session, self.standby.connected = "s1", True
        self.standby.committed = Committed("s1", 1, 0.0)
        self.rng = np.random.default_rng(7)

    def write(self, *pages: int) -> None:
        """One checkpoint applied to the disk (file 1), as the standby applies it."""
        data = self.rng.integers(0, 256, len(pages) * PAGE, dtype=np.uint8).tobytes()
        self.standby._apply(self.files, 1, Delta(np.array(pages, dtype=np.int64), data))

    def image(self) -> bytes:
        return self.standby.paths.disks[0].read_bytes()


def _read(cap: StandbyCapture, taken, extents) -> dict[int, bytes]:  # type: ignore[no-untyped-def]
    return dict(cap.read(taken, 0, extents))


def test_an_incremental_point_reads_as_at_its_cut_while_checkpoints_go_on(tmp_path: Path) -> None:
    async def run() -> None:
        r = Replica(tmp_path)
        cap = StandbyCapture(r.standby, "s1", (SIZE,), tmp_path / "keep")
        await cap.start()
        r.write(0, 1, 40, 16 * 16 + 2)             # blocks 0, 2 and the short last one
        taken = await cap.take()
        at_cut = r.image()
        extents = cap.extents(taken, full=False)[0]
        assert [(e.offset, e.length) for e in extents] == [(0, BLOCK), (2 * BLOCK, BLOCK),
                                                          (16 * BLOCK, 3 * PAGE)]
        r.write(1, 33, 100, 16 * 16)                # over blocks 0 and 2 and the last; 6 is new
        for offset, data in _read(cap, taken, extents).items():
            assert data == at_cut[offset:offset + len(data)], offset
        kept = (tmp_path / "keep" / "keep-s1-d0").stat().st_blocks * 512
        assert 2 * BLOCK <= kept < 3 * BLOCK, kept  # the point's blocks overwritten, not block 6
        await cap.release(taken, delivered=True)
        nxt = await cap.take()                      # only what was written since the cut
        assert [(e.offset, e.length) for e in cap.extents(nxt, full=False)[0]] == [
            (0, BLOCK), (2 * BLOCK, BLOCK), (6 * BLOCK, BLOCK), (16 * BLOCK, 3 * PAGE)]
        await cap.release(nxt, delivered=True)
        await cap.stop()
        assert not list((tmp_path / "keep").iterdir())
    asyncio.run(run())


def test_a_diff_reads_the_whole_disk_as_at_its_cut_and_an_undelivered_point_goes_into_the_next(
        tmp_path: Path) -> None:
    async def run() -> None:
        r = Replica(tmp_path)
        cap = StandbyCapture(r.standby, "s1", (SIZE,), tmp_path / "keep")
        await cap.start()
        r.write(5 * 16)
        taken = await cap.take()
        at_cut = r.image()
        r.write(0, 7 * 16 + 1, 9 * 16)              # blocks outside the point: kept for the diff
        whole = b"".join(_read(cap, taken, cap.extents(taken, full=True)[0]).values())
        assert whole == at_cut
        await cap.release(taken, delivered=False)
        nxt = await cap.take()
        assert [e.offset // BLOCK for e in cap.extents(nxt, full=False)[0]] == [0, 5, 7, 9]
        await cap.release(nxt, delivered=True)
        await cap.stop()
    asyncio.run(run())


def test_a_replica_restarted_or_taken_over_fails_the_point(tmp_path: Path) -> None:
    async def run() -> None:
        r = Replica(tmp_path)
        cap = StandbyCapture(r.standby, "s1", (SIZE,), tmp_path / "keep")
        await cap.start()
        taken = await cap.take()
        r.standby.session = "s2"                    # a new session zeroes and refills the files
        with pytest.raises(ReplicaGone):
            _read(cap, taken, cap.extents(taken, full=True)[0])
        await cap.release(taken, delivered=False)
        with pytest.raises(ReplicaGone):
            await cap.take()
        r.standby.session = "s1"
        r.standby._frozen = True                    # a takeover: a QEMU writes the files now
        with pytest.raises(ReplicaGone):
            await cap.take()
        await cap.stop()
    asyncio.run(run())
