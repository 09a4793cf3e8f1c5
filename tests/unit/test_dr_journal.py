"""The DR site's journal of recovery points (real files): whole points or none, checked on
every read, consolidated without ever changing what a kept point's image holds."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from ftvm.core.dr_points import consolidation
from ftvm.dr.journal import (END, MAX_EXTENT, JournalError, NewestImage, PointHeader, PointWriter, Replica,
                             read_point)

SIZES = (1 << 20, 256 << 10)


def _images(paths: list[Path]) -> list[bytes]:
    return [p.read_bytes() for p in paths]


def _random_point(rep: Replica, number: int, model: list[bytearray], rng: random.Random) -> None:
    """A point of random writes, mirrored into `model` (the disks as the guest saw them)."""
    w = rep.begin(number, 1000.0 + number)
    for _ in range(rng.randint(1, 12)):
        disk = rng.randrange(len(SIZES))
        length = rng.choice([512, 4096, 65536, 3 * 4096])
        offset = rng.randrange(0, SIZES[disk] - length, 512)
        data = rng.choice([bytes([number]) * length, rng.randbytes(length)])  # compressible or not
        w.add(disk, offset, data)
        model[disk][offset:offset + length] = data
    w.commit()


def test_each_point_s_image_is_the_disks_at_its_instant_through_any_consolidation(tmp_path: Path) -> None:
    rng = random.Random(7)
    rep = Replica.create(tmp_path / "vm", SIZES)
    model = [bytearray(s) for s in SIZES]
    expected: dict[int, list[bytes]] = {}
    for n in range(1, 11):
        _random_point(rep, n, model, rng)
        expected[n] = [bytes(m) for m in model]
    for n in (1, 5, 10):
        assert _images(rep.materialize(n, tmp_path / f"img{n}")) == expected[n]
    newest = NewestImage(rep)  # reads of point 10 without materializing it
    for _ in range(50):
        disk = rng.randrange(2)
        length = rng.randrange(1, 200_000)
        offset = rng.randrange(0, SIZES[disk] - length)
        assert newest.read(disk, offset, length) == expected[10][disk][offset:offset + length]
    # keep 4, 7 and 10: 1-3 go into the base, 5-6 fold into 7, 8-9 into 10
    plan = consolidation(rep.numbers(), {4, 7, 10})
    assert plan.into_base == (1, 2, 3) and plan.merges == ((6, 7), (5, 7), (9, 10), (8, 10))
    for n in plan.into_base:
        rep.apply_to_base(n)
    for older, into in plan.merges:
        rep.fold(older, into)
    assert rep.numbers() == [4, 7, 10] and rep.base_point == 3
    assert _images([rep.disk_path(i) for i in range(2)]) == expected[3]
    for n in (4, 7, 10):
        assert _images(rep.materialize(n, tmp_path / f"after{n}")) == expected[n]
    assert Replica(tmp_path / "vm").base_point == 3  # state survives a restart


def test_a_point_not_committed_is_not_a_point(tmp_path: Path) -> None:
    rep = Replica.create(tmp_path / "vm", SIZES)
    w = rep.begin(1, 1.0)
    w.add(0, 0, b"x" * 4096)
    assert rep.numbers() == []  # a .part, as a link or a host lost midway leaves it
    w.commit()
    assert rep.numbers() == [1]
    with pytest.raises(JournalError, match="not newer"):
        rep.begin(1, 2.0)


def test_a_damaged_point_is_refused(tmp_path: Path) -> None:
    rep = Replica.create(tmp_path / "vm", SIZES)
    w = rep.begin(1, 1.0)
    w.add(0, 4096, os.urandom(8192))
    w.commit()
    path = rep.point_path(1)
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(JournalError, match="checksum"):
        read_point(path, SIZES)
    path.write_bytes(bytes(data[:50]))
    with pytest.raises(JournalError):
        read_point(path, SIZES)


def test_extents_outside_the_disk_or_too_large_are_refused(tmp_path: Path) -> None:
    rep = Replica.create(tmp_path / "vm", SIZES)
    w = rep.begin(1, 1.0)
    for disk, offset, length in ((2, 0, 512), (0, SIZES[0] - 512, 1024), (0, -512, 512)):
        with pytest.raises(JournalError):
            w.add(disk, offset, b"\0" * length)
    w.abort()
    with pytest.raises(JournalError):
        PointWriter(tmp_path / "big.pt", PointHeader(1, 1.0, (MAX_EXTENT,))).add(0, 0, b"\0" * (MAX_EXTENT + 1))


def test_a_forged_point_that_passes_its_checksum_still_cannot_write_outside_a_disk(tmp_path: Path) -> None:
    """The checksum is the file's own: it catches damage, not a forger. Bounds hold anyway."""
    import hashlib
    import struct

    from ftvm.dr.journal import EXTENT, HEADER, MAGIC, RAW, TRAILER
    body = (HEADER.pack(MAGIC, 1, 1, 1.0) + struct.pack(">Q", 4096)
            + EXTENT.pack(0, 4096, 512, 512, RAW) + b"\0" * 512)
    path = tmp_path / "1.pt"
    path.write_bytes(body + TRAILER.pack(END, 1, hashlib.sha256(body).digest()))
    with pytest.raises(JournalError, match="outside"):
        read_point(path)


def test_a_packed_extent_must_inflate_to_what_it_says(tmp_path: Path) -> None:
    import zstandard
    rep = Replica.create(tmp_path / "vm", SIZES)
    w = rep.begin(1, 1.0)
    good = zstandard.ZstdCompressor().compress(b"a" * 8192)
    w.add_packed(0, 0, 8192, good)
    with pytest.raises(JournalError):
        w.add_packed(0, 0, 4096, good)  # says less than it holds
    with pytest.raises(JournalError):
        w.add_packed(0, 0, 8192, b"not zstd")
    bomb = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * (8 << 20))
    with pytest.raises(JournalError):
        w.add_packed(0, 0, 8192, bomb)  # no declared size: refused, nothing inflated
    w.commit()
    assert NewestImage(rep).read(0, 0, 8192) == b"a" * 8192


def test_retention_consolidates_old_points_without_changing_a_kept_point_s_image(tmp_path: Path) -> None:
    from ftvm.core.dr_points import Retention
    rng = random.Random(3)
    rep = Replica.create(tmp_path / "vm", SIZES)
    model = [bytearray(s) for s in SIZES]
    expected = {}
    for n in range(1, 9):  # taken at 1001..1008 s (see _random_point)
        _random_point(rep, n, model, rng)
        expected[n] = [bytes(m) for m in model]
    rep.mark_tested(3)
    # now = 1008 + 3600 + 4.5: points older than an hour go, one per hour (all in one hour) stays;
    # the tested one stays too; the newest always
    plan = rep.retain(Retention(all_for_s=3600, hourly_for_s=7 * 86400), 1008 + 3600 + 4.5)
    kept = rep.numbers()
    assert 8 in kept and 3 in kept and len(kept) < 8, (kept, plan)
    for n in kept:
        assert _images(rep.materialize(n, tmp_path / f"k{n}")) == expected[n]
    assert rep.header(8).taken_at == 1008.0


def test_a_point_never_holds_more_than_its_disks(tmp_path: Path) -> None:
    """A sender repeating the same block cannot fill the DR site's storage."""
    rep = Replica.create(tmp_path / "vm", SIZES)
    w = rep.begin(1, 1.0)
    block = b"z" * 65536
    with pytest.raises(JournalError, match="more than its disks"):
        for _ in range(sum(SIZES) // len(block) + 1):
            w.add(0, 0, block)
    w.abort()
    assert rep.numbers() == [] and not list((tmp_path / "vm" / "points").iterdir())


def test_a_failbacks_last_point_stays_marked_until_its_replica_goes(tmp_path: Path) -> None:
    """The home host tries the install again (after a failure, after a restart) from the mark."""
    rep = Replica.create(tmp_path / "r", SIZES)
    assert Replica.final_point(rep.dir) is None
    rep.mark_final(7)
    assert Replica.final_point(tmp_path / "r") == 7
    (rep.dir / "final").write_text("junk\n")  # a damaged mark names no point
    assert Replica.final_point(rep.dir) is None
    rep.mark_final(8)
    rep.remove()
    assert Replica.final_point(tmp_path / "r") is None
